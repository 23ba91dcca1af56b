"""A web page for a trained model (Gradio, on localhost): sample, cherry-pick, reconstruct, interpolate, swap and,
for a 2-D latent, the manifold.

    pip install -r requirements-app.txt        # gradio and the other optional extras
    python app.py                              # ./weights.pt, else the shipped digits model: http://127.0.0.1:7860
    python app.py --weights weights/cifar10 --port 8000 --device cpu

Tabs: **Sample** (a class by name, how many, one temperature or one per resolution, a seed, and a guidance
scale for models trained with --label_dropout), **Cherry-pick**
(NVAE's workflow: draw 3x3 samples, click the good ones until the selection is full, draw again as often as
needed, reorder, download the grid as a PNG), **Reconstruct**, **Interpolate**, **Class swap** and, for a cvae or
vlae with ``--zdim 2``, **Manifold**. Every tab calls
the runner of the matching sample.py mode (sampling.py), so a picture here is the one the command line draws with
the same flags. It loads whatever sample.py loads (run folders, .pt, .safetensors, hf:ORG/NAME), and bad input is a
message on the page, not a stack trace.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

from sampling import RUNNERS, Session, build_parser, parse_classes, sample_batched
from images import save_grid
from utils import CliParser, UserError, add_checkpoint_flags, check_port_free, resolve_weights_flag, run_cli

PICK_BATCH = 9  # NVAE's cherry-picking shows 3x3 samples at a time
DISPLAY_SIDE = 96  # small images are enlarged (nearest neighbour) for the page


class App:
    """One loaded model and what the page's buttons call. Each picture comes from sample.py's runner for the mode,
    with the flags the page's fields translate to; the model is loaded once and shared."""

    def __init__(self, weights: str, device: str, raw_weights: bool = False, hps: str | None = None):
        self.common = ["--weights", weights, "--device", device, *(["--raw_weights"] if raw_weights else []),
                       *(["--hps", hps] if hps else [])]
        self.session = Session(build_parser().parse_args(["grid", *self.common]))  # loads the model (or one line)
        self.workdir = Path(tempfile.mkdtemp(prefix="vdvae-app-"))
        model = self.session.model
        self.class_names = list(self.session.class_names) if self.session.conditional else []
        self.abilities = model.abilities
        # classifier-free guidance: a model whose prior depends on the class, trained with --label_dropout
        self.guidable = ("guidance" in model.abilities and self.session.conditional and not self.session.multi_label
                         and model.H.label_dropout > 0)
        self.resolutions = sorted({b.base for b in model.decoder.dec_blocks}) if "groups" in model.abilities else []

    # ---- running sample.py's modes ----------------------------------------------------------------
    def run_mode(self, mode: str, flags: list[str], suffix: str = ".png") -> Path:
        """sample.py MODE with ``flags`` on the loaded model: the path of the picture it wrote."""
        out = self.workdir / f"{mode}-{uuid.uuid4().hex[:8]}{suffix}"
        args = build_parser().parse_args([mode, *self.common, "--out", str(out), *flags])
        RUNNERS[mode](self.session.with_args(args))
        return out

    def temperature(self, value: float, per_resolution: bool, values: list[float]) -> str:
        """The --temperature flag: one value, or RES:T for each latent resolution."""
        if per_resolution and self.resolutions:
            return ",".join(f"{r}:{t:g}" for r, t in zip(self.resolutions, values))
        return f"{value:g}"

    def sample(self, class_name: str, n: int, seed: int, value: float, per_resolution: bool,
               *values_then_guidance) -> str:
        """The Sample tab: the temperature sliders of each resolution, then the guidance scale."""
        *values, guidance = values_then_guidance
        flags = ["--n", str(int(n)), "--seed", str(int(seed)),
                 "--temperature", self.temperature(value, per_resolution, list(values))]
        if guidance and float(guidance) > 0:
            flags += ["--guidance", f"{float(guidance):g}"]
        if class_name and class_name != "all":
            flags += ["--classes", class_name]
        return str(self.run_mode("grid", flags))

    def recon(self, n: int, ks: str, seed: int) -> str:
        return str(self.run_mode("recon", ["--n", str(int(n)), "--seed", str(int(seed)),
                                           *(["--k", ks.strip()] if ks.strip() else [])]))

    def interp(self, between: str, value: str, frames: int, seed: int) -> tuple[str, str]:
        flag = {"two held-out images": "--images", "two seeds": "--seeds", "two classes": "--classes"}[between]
        flags = ["--frames", str(int(frames)), "--seed", str(int(seed)), *([flag, value.strip()] if value.strip()
                                                                           else [])]
        png = self.run_mode("interp", flags)
        return str(png), str(png.with_suffix(".gif"))

    def swap(self, n: int, classes: str, seed: int) -> str:
        return str(self.run_mode("swap", ["--n", str(int(n)), "--seed", str(int(seed)),
                                          *(["--classes", classes.strip()] if classes.strip() else [])]))

    def manifold(self, class_name: str, n: int, draws: int, value: float) -> str:
        flags = ["--n", str(int(n)), "--draws", str(int(draws)), "--temperature", f"{value:g}"]
        if class_name and class_name != "all":
            flags += ["--class", class_name]
        return str(self.run_mode("manifold", flags))

    # ---- cherry-picking (NVAE's workflow) ------------------------------------------------------------
    def draw(self, class_name: str, value: float, seed: int, state: dict) -> tuple[list, dict, str]:
        """PICK_BATCH fresh samples of the class (each draw its own seed: seed, seed + 1, ...)."""
        s = self.session
        state = dict(state or {}, draws=(state or {}).get("draws", 0) + 1)
        labels = None
        if s.conditional:
            labels = s.labels(parse_classes(class_name, s.class_names)[0], PICK_BATCH)
        torch.manual_seed(int(seed) + state["draws"] - 1)
        images = sample_batched(s.model, PICK_BATCH, labels, float(value), PICK_BATCH, s.amp_dtype)
        state["pool"] = [image for image in s.visible(images)]
        return [self.picture(i) for i in state["pool"]], state, self.status(state)

    def keep(self, index: int, state: dict) -> tuple[list, dict, str]:
        """Add sample ``index`` of the current draw to the selection (until it holds ``target``)."""
        state = dict(state or {})
        pool, kept = state.get("pool", []), list(state.get("kept", []))
        if not pool:
            raise UserError("draw samples first")
        if not 0 <= int(index) < len(pool):
            raise UserError(f"sample {int(index)} is not in the draw (0..{len(pool) - 1})")
        if len(kept) >= state.get("target", PICK_BATCH):
            raise UserError(f"the selection is full ({len(kept)}): reorder it, download it, or clear it")
        kept.append(pool[int(index)])
        state["kept"] = kept
        return [self.picture(i) for i in kept], state, self.status(state)

    def set_target(self, target: int, state: dict) -> tuple[dict, str]:
        state = dict(state or {}, target=int(target))
        return state, self.status(state)

    def clear(self, state: dict) -> tuple[list, dict, str]:
        state = dict(state or {}, kept=[])
        return [], state, self.status(state)

    def reorder(self, order: str, state: dict) -> tuple[list, dict, str]:
        """The selection in the order given: positions 0..n-1, comma-separated, each once."""
        state = dict(state or {})
        kept = list(state.get("kept", []))
        try:
            positions = [int(t) for t in order.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"the order must be comma-separated positions, got {order!r}") from None
        if sorted(positions) != list(range(len(kept))):
            raise UserError(f"the order must name each of the {len(kept)} kept samples once (0..{len(kept) - 1})")
        state["kept"] = [kept[p] for p in positions]
        return [self.picture(i) for i in state["kept"]], state, self.status(state)

    def export(self, state: dict) -> tuple[str, str]:
        """The selection as one grid (rows of 3), written as a PNG: the same picture twice (preview, download)."""
        kept = (state or {}).get("kept", [])
        if not kept:
            raise UserError("the selection is empty: keep some samples first")
        out = self.workdir / f"cherry-picked-{uuid.uuid4().hex[:8]}.png"
        save_grid(torch.stack(kept), out, nrow=3)
        return str(out), str(out)

    @staticmethod
    def status(state: dict) -> str:
        return f"kept {len(state.get('kept', []))} of {state.get('target', PICK_BATCH)}"

    @staticmethod
    def picture(image: torch.Tensor) -> np.ndarray:
        """A uint8 (C, H, W) image as an (H, W, 3) array, enlarged for the page when small."""
        scale = max(1, DISPLAY_SIDE // image.shape[-1])
        array = image.repeat_interleave(scale, -1).repeat_interleave(scale, -2).permute(1, 2, 0).numpy()
        return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def shown_errors(fn):
    """A page handler whose UserErrors become Gradio messages (a line on the page, no stack trace)."""
    import functools

    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise gr.Error(str(err)) from None
    return wrapped


def held_out_tab(title: str, n: int, text: str, shows: str, fn, api_name: str) -> None:
    """A tab over held-out images: how many, one text field of the mode's flag, a seed, a button, the picture."""
    import gradio as gr

    with gr.Tab(title):
        with gr.Row():
            count = gr.Slider(1, 16, value=n, step=1, label="held-out images")
            field = gr.Textbox(label=text)
            seed = gr.Number(0, precision=0, label="seed")
        go = gr.Button(title, variant="primary")
        out = gr.Image(label=shows, type="filepath")
        go.click(shown_errors(fn), [count, field, seed], out, api_name=api_name)


def build_page(app: App):
    """The Gradio Blocks page; each button's api_name is its endpoint for gradio_client."""
    import gradio as gr

    classes = ["all", *app.class_names] if app.class_names else ["all"]
    with gr.Blocks(title="class-conditional VDVAE") as page:
        gr.Markdown(f"### {app.session.model.family} on {app.session.H.dataset}: "
                    f"{len(app.class_names)} classes" if app.class_names else f"### {app.session.model.family}")
        sample_tab(app, classes)
        cherry_pick_tab(app, classes)
        held_out_tab("Reconstruct", 6, "top-k latent groups from the image (comma-separated; empty: 0, 1, 2, 4, ...)",
                     "input, then each k", app.recon, "recon")
        if "prior_noise" in app.abilities:
            interpolate_tab(app)
            held_out_tab("Class swap", 4, "target classes (comma-separated; empty: all)",
                         "each image under each class", app.swap, "swap")
        else:
            gr.Markdown(f"Interpolation and class swap need prior noise, which the {app.session.model.family} "
                        f"family does not have.")
        if "manifold" in app.abilities:  # a cvae or vlae with a 2-D latent
            manifold_tab(app, classes)
    return page


def sample_tab(app: App, classes: list[str]) -> None:
    """Samples of a class, with one temperature or one per latent resolution."""
    import gradio as gr

    with gr.Tab("Sample"):
        with gr.Row():
            s_class = gr.Dropdown(classes, value="all", label="class")
            s_n = gr.Slider(1, 16, value=8, step=1, label="samples per class")
            s_seed = gr.Number(0, precision=0, label="seed")
        s_t = gr.Slider(0.05, 1.5, value=1.0, step=0.05, label="temperature")
        s_per_res = gr.Checkbox(False, label="a temperature per resolution",
                                visible=bool(app.resolutions))
        s_res = [gr.Slider(0.05, 1.5, value=1.0, step=0.05, label=f"{r}x{r}", visible=bool(app.resolutions))
                 for r in app.resolutions]
        s_guidance = gr.Slider(0.0, 6.0, value=0.0, step=0.25, label="guidance (0: none)", visible=app.guidable)
        s_go = gr.Button("Sample", variant="primary", elem_id="sample-button")
        s_out = gr.Image(label="samples", type="filepath", elem_id="sample-output")
        s_go.click(shown_errors(app.sample), [s_class, s_n, s_seed, s_t, s_per_res, *s_res, s_guidance], s_out,
                   api_name="sample")


def cherry_pick_tab(app: App, classes: list[str]) -> None:
    """NVAE's workflow: draw 3x3, keep the samples worth keeping, draw again until the selection is full."""
    import gradio as gr

    first = app.class_names[0] if app.class_names else "all"
    with gr.Tab("Cherry-pick"):
        state = gr.State({})
        with gr.Row():
            c_class = gr.Dropdown(classes[1:] or ["all"], value=first, label="class")
            c_t = gr.Slider(0.05, 1.5, value=1.0, step=0.05, label="temperature")
            c_seed = gr.Number(0, precision=0, label="first seed")
            c_target = gr.Slider(1, 36, value=PICK_BATCH, step=1, label="selection size")
        c_draw = gr.Button("Draw 3x3", variant="primary")
        c_pool = gr.Gallery(label="click a sample to keep it", columns=3, height="auto", allow_preview=False)
        c_status = gr.Markdown(App.status({}))
        c_index = gr.Number(0, precision=0, label="or keep sample number (0-8)")
        c_keep = gr.Button("Keep")
        c_kept = gr.Gallery(label="selection", columns=6, height="auto", allow_preview=False)
        with gr.Row():
            c_order = gr.Textbox(label="new order (positions, e.g. 2,0,1)")
            c_reorder = gr.Button("Reorder")
            c_clear = gr.Button("Clear")
        c_export = gr.Button("Make the grid")
        c_grid = gr.Image(label="final grid", type="filepath")
        c_file = gr.File(label="download")
        c_draw.click(shown_errors(app.draw), [c_class, c_t, c_seed, state], [c_pool, state, c_status],
                     api_name="draw")
        c_keep.click(shown_errors(app.keep), [c_index, state], [c_kept, state, c_status], api_name="keep")

        def keep_clicked(state, evt):  # a click on a sample of the draw: Gradio passes which one
            return shown_errors(app.keep)(evt.index, state)
        keep_clicked.__annotations__ = {"state": dict, "evt": gr.SelectData}  # real types, not strings
        c_pool.select(keep_clicked, [state], [c_kept, state, c_status], api_visibility="private")
        c_target.change(shown_errors(app.set_target), [c_target, state], [state, c_status], api_name="target")
        c_reorder.click(shown_errors(app.reorder), [c_order, state], [c_kept, state, c_status], api_name="reorder")
        c_clear.click(shown_errors(app.clear), [state], [c_kept, state, c_status], api_name="clear")
        c_export.click(shown_errors(app.export), [state], [c_grid, c_file], api_name="export")


def interpolate_tab(app: App) -> None:
    """Between two held-out images, two seeds or two classes: a strip and an animation."""
    import gradio as gr

    with gr.Tab("Interpolate"):
        with gr.Row():
            i_between = gr.Radio(["two held-out images", "two seeds", "two classes"],
                                 value="two held-out images", label="between")
            i_value = gr.Textbox(label="which two (indices, seeds or classes, comma-separated; empty: "
                                       "drawn with the seed)")
            i_frames = gr.Slider(2, 32, value=10, step=1, label="frames")
            i_seed = gr.Number(0, precision=0, label="seed")
        i_go = gr.Button("Interpolate", variant="primary")
        i_png = gr.Image(label="strip", type="filepath")
        i_gif = gr.Image(label="animation", type="filepath")
        i_go.click(shown_errors(app.interp), [i_between, i_value, i_frames, i_seed], [i_png, i_gif],
                   api_name="interp")


def manifold_tab(app: App, classes: list[str]) -> None:
    """A 2-D latent decoded on a grid at the prior's quantiles."""
    import gradio as gr

    first = app.class_names[0] if app.class_names else "all"
    with gr.Tab("Manifold"):
        with gr.Row():
            m_class = gr.Dropdown(classes[1:] or ["all"], value=first, label="class")
            m_n = gr.Slider(3, 30, value=15, step=1, label="grid side")
            m_draws = gr.Slider(1, 32, value=8, step=1, label="pixel draws averaged per cell")
            m_t = gr.Slider(0.05, 1.5, value=1.0, step=0.05, label="temperature (spread of the grid)")
        m_go = gr.Button("Draw the manifold", variant="primary")
        m_out = gr.Image(label="the latent grid at the prior's quantiles", type="filepath")
        m_go.click(shown_errors(app.manifold), [m_class, m_n, m_draws, m_t], m_out, api_name="manifold")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = add_checkpoint_flags(CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise UserError("app.py needs gradio: pip install -r requirements-app.txt")
    check_port_free(args.host, args.port)  # before the model is loaded
    resolve_weights_flag(args)  # no --weights: ./weights.pt when here, else the shipped model (one line says which)
    app = App(args.weights, args.device, args.raw_weights, args.hps)
    page = build_page(app)
    print(f"serving {args.weights} on http://{args.host}:{args.port}", flush=True)
    try:
        page.launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True)
    except OSError as err:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {err}") from None


if __name__ == "__main__":
    run_cli(main)
