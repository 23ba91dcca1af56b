"""A run's record: the human log and metrics.jsonl side by side in the run folder, TensorBoard when asked for,
the loss curves as a picture, and the latent trajectory as a GIF."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from images import save_gif
from utils import UserError


# ---------------------------------------------------------------------------------------------
# Logging: a human log and JSON lines side by side in the run folder
# ---------------------------------------------------------------------------------------------


class NullLogger:
    """What ranks other than 0 log: nothing."""

    def info(self, message: str) -> None:
        pass

    def metrics(self, kind: str, **values: Any) -> None:
        pass

    def curves(self) -> None:
        pass

    wants_images = False

    def image(self, tag: str, images, nrow: int, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_writer(log_dir: Path | None = None):
    """torch's SummaryWriter into ``log_dir`` (None: only check that it can be made), or a one-line error naming the
    install command where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install -r requirements-app.txt)") from None
    return None if log_dir is None else SummaryWriter(log_dir=str(log_dir))


def _scalars(values: dict, prefix: str = "") -> list[tuple[str, float]]:
    """The numbers of a metrics record as (name, value), nested dicts (KL per resolution) as name/key."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
            out.append((f"{prefix}{key}", float(value)))
    return out


class RunLogger:
    """Writes ``log.txt`` (human) and ``metrics.jsonl`` (one JSON object per record) in a run folder, draws
    ``curves.png`` from the metrics when asked, and with ``tensorboard`` logs the same scalars (and sample grids)
    to TensorBoard in ``RUN/tensorboard``."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None] = print, tensorboard: bool = False):
        self.run_dir = run_dir
        self.echo = echo
        self.writer = tensorboard_writer(run_dir / "tensorboard") if tensorboard else None
        self._log = open(run_dir / "log.txt", "a", encoding="utf-8")
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    @property
    def wants_images(self) -> bool:
        """Whether sample grids are worth drawing for the log (TensorBoard is on)."""
        return self.writer is not None

    def image(self, tag: str, images, nrow: int, step: int) -> None:
        """A grid of uint8 images (N, C, H, W) to TensorBoard at ``step``."""
        if self.writer is not None:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images, nrow=nrow, padding=1), step)
            self.writer.flush()

    def info(self, message: str) -> None:
        self.echo(message)
        self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self._log.flush()

    def metrics(self, kind: str, **values: Any) -> None:
        record = {"kind": kind, "time": round(time.time(), 3), **values}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.writer is not None and "step" in values:  # train/loss, valid/kl_per_resolution/4, final/test_bpd
            group = values.get("split", kind)
            for name, value in _scalars({k: v for k, v in values.items() if k != "split"}):
                self.writer.add_scalar(f"{group}/{name}", value, values["step"])
            self.writer.flush()

    def curves(self) -> Path:
        """Redraw ``curves.png`` from the metrics so far (see draw_curves)."""
        return draw_curves({self.run_dir.name: read_metrics(self.run_dir)}, self.run_dir / "curves.png")

    def close(self) -> None:
        self._log.close()
        self._metrics.close()
        if self.writer is not None:
            self.writer.close()


class LatentTrajectory:
    """Where the encoder puts fixed held-out images over training (train.py --track_latents): the ``latents``
    records of metrics.jsonl (a step, the images' labels and the 2-D posterior means) drawn as an animated GIF,
    one scatter coloured by class per evaluation, on axes that every frame shares so that motion is real."""

    def __init__(self, path: Path, class_names: list[str], records: list[dict] = ()):
        self.path, self.class_names = Path(path), class_names
        self.records = {r["step"]: r for r in records}  # a resumed run's earlier evaluations
        self._frames: dict[int, Any] = {}  # drawn frames by step, for the current axes
        self._bound = 0.0

    def add(self, record: dict) -> Path:
        """A new evaluation's record, then the GIF rewritten. Records at this step or later are dropped first: they
        come from a run that was stopped and resumed from an earlier checkpoint, and this run replaces them."""
        for step in [s for s in self.records if s >= record["step"]]:
            del self.records[step]
            self._frames.pop(step, None)
        self.records[record["step"]] = record
        return self.write()

    def bound(self) -> float:
        """Half the width of the square axes: the prior's +-3 standard deviations, widened in whole units until
        every mean fits (so the axes, and the frames drawn on them, rarely change)."""
        biggest = max((abs(v) for r in self.records.values() for point in r["means"] for v in point), default=0.0)
        return float(max(3, math.ceil(biggest * 1.05)))

    def write(self, fps: float = 2.0) -> Path:
        bound = self.bound()
        if bound != self._bound:  # new axes: every frame is drawn again on them
            self._frames, self._bound = {}, bound
        frames = []
        for step in sorted(self.records):
            if step not in self._frames:
                self._frames[step] = self._draw(self.records[step], bound)
            frames.append(self._frames[step])
        save_gif(frames, self.path, fps)
        return self.path

    def _draw(self, record: dict, bound: float):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from PIL import Image

        means = np.asarray(record["means"], dtype=float).reshape(-1, 2)
        labels = record.get("labels")
        fig, ax = plt.subplots(figsize=(6.0, 4.8), dpi=80)
        if labels is None or not self.class_names:  # no class per image (attributes, an unlabelled set): one colour
            ax.scatter(means[:, 0], means[:, 1], s=8, color="tab:blue")
        else:
            labels = np.asarray(labels)
            cmap = plt.get_cmap("tab10" if len(self.class_names) <= 10 else "tab20")
            for c, name in enumerate(self.class_names):
                mask = labels == c
                if mask.any():
                    ax.scatter(means[mask, 0], means[mask, 1], s=8, color=cmap(c % cmap.N), label=name)
            if len(self.class_names) <= 20:  # beyond that a legend would be taller than the plot (CIFAR-100)
                ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False)
        ax.set_xlim(-bound, bound)
        ax.set_ylim(-bound, bound)
        ax.set_aspect("equal")
        ax.set_xlabel("z1 (posterior mean)")
        ax.set_ylabel("z2")
        ax.set_title(f"step {record['step']} ({record.get('split', 'test')}, {len(means)} images)")
        fig.tight_layout()
        fig.canvas.draw()
        picture = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
        plt.close(fig)
        return picture


# ---------------------------------------------------------------------------------------------
# Curves: a run's metrics.jsonl as a picture (train.py's curves.png, plot.py's comparisons)
# ---------------------------------------------------------------------------------------------


def run_finished(run_dir: str | Path) -> bool:
    """Whether a run folder's training reached its end (train.py's final record); False where no run is yet."""
    try:
        return any(r.get("kind") == "final" or "test_bpd" in r for r in read_metrics(run_dir))
    except (OSError, ValueError, UserError):
        return False


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl; a half-written last line (a run killed while writing it) is
    left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no metrics.jsonl: not a run folder of train.py")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _curve_x(records: list[dict], x: str, start: float) -> list[float]:
    return [r["step"] if x == "step" else r["time"] - start for r in records]


def draw_curves(runs: dict[str, list[dict]], out: str | Path, x: str = "step") -> Path:
    """Four panels for one run or several overlaid (a colour each): training and validation bits/dim (and the
    final test figure), the validation KL per resolution, the gradient norm, and the skipped updates, against
    steps or (``x="time"``) seconds since each run's first record. Written as a PNG with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    if x not in ("step", "time"):
        raise UserError(f"--x must be step or time, got {x!r}")
    fig, ((ax_bpd, ax_kl), (ax_grad, ax_skip)) = plt.subplots(2, 2, figsize=(12, 8))
    several = len(runs) > 1
    for i, (name, records) in enumerate(runs.items()):
        prefix, color = (f"{name} " if several else ""), f"C{i}"
        start = min((r["time"] for r in records if "time" in r), default=0.0)
        train = [r for r in records if r.get("kind") == "train"]
        valid = [r for r in records if r.get("kind") == "eval" and r.get("split") == "valid"]
        test = [r for r in records if r.get("kind") == "eval" and r.get("split") == "test"]
        ax_bpd.plot(_curve_x(train, x, start), [r["loss"] for r in train], color=color, alpha=0.45, lw=1,
                    label=f"{prefix}train")
        ax_bpd.plot(_curve_x(valid, x, start), [r["loss"] for r in valid], color=color, marker="o", ms=3,
                    label=f"{prefix}valid (EMA)")
        if test:
            ax_bpd.plot(_curve_x(test[-1:], x, start), [test[-1]["loss"]], color=color, marker="*", ms=12, ls="",
                        label=f"{prefix}test {test[-1]['loss']:.4f}")
        resolutions = sorted({res for r in valid for res in r.get("kl_per_resolution", {})},
                             key=lambda res: (not res.isdigit(), int(res) if res.isdigit() else 0))
        for j, res in enumerate(resolutions):
            points = [(xv, r["kl_per_resolution"][res]) for xv, r in zip(_curve_x(valid, x, start), valid)
                      if res in r.get("kl_per_resolution", {})]
            label = f"{prefix}{res}x{res}" if res.isdigit() else f"{prefix}{res}"
            ax_kl.plot(*zip(*points), color=color if several else f"C{j}", marker="o", ms=3, label=label,
                       ls=["-", "--", ":", "-."][j % 4] if several else "-")
        ax_grad.plot(_curve_x(train, x, start), [r["grad_norm"] for r in train], color=color, lw=1,
                     label=f"{prefix}gradient norm")
        ax_skip.plot(_curve_x(train, x, start), [r.get("skipped_updates", 0) for r in train], color=color,
                     label=f"{prefix}skipped updates")
    ax_bpd.set(title="negative ELBO (bits/dim)", ylabel="bits/dim")
    ax_kl.set(title="validation KL per resolution (bits/dim)", ylabel="bits/dim")
    ax_grad.set(title="gradient norm (of the loss in nats/dim)", yscale="log")
    ax_skip.set(title="skipped updates (cumulative)")
    for ax in (ax_bpd, ax_kl, ax_grad, ax_skip):
        ax.set_xlabel("step" if x == "step" else "seconds since the run's first record")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    try:
        fig.savefig(out, dpi=90)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    finally:
        plt.close(fig)
    return out
