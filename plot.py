"""Curves of one training run or several overlaid: bits/dim, KL per resolution, gradient norm, skipped updates.

    python plot.py weights/digits                                   # -> weights/digits/curves.png
    python plot.py weights/digits weights/digits-2 --out cmp.png    # two runs (two presets, two families)
    python plot.py weights/digits --x time --out time.png           # against seconds instead of steps

Reads each run folder's metrics.jsonl (train.py writes it; a run still training can be plotted). train.py itself
redraws RUN/curves.png at every evaluation and at the end.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from runlog import draw_curves, read_metrics
from utils import CliParser, UserError, check_output_file, run_cli


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl)")
    p.add_argument("--x", default="step", choices=["step", "time"], help="x axis: steps, or seconds of the run")
    p.add_argument("--out", default=None, help="PNG to write (default: curves.png in the one run's folder)")
    return p


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.out is None and len(args.runs) > 1:
        raise UserError("several runs need --out FILE.png")
    out = Path(args.out) if args.out else Path(args.runs[0]) / "curves.png"
    if out.suffix != ".png":
        raise UserError(f"--out must end in .png, got {out}")
    check_output_file(out)
    names = [Path(r).resolve().name for r in args.runs]
    if len(set(names)) < len(names):  # two folders of the same name in different places: label by the path given
        names = list(args.runs)
    runs = {name: read_metrics(run) for name, run in zip(names, args.runs)}
    print(f"wrote {draw_curves(runs, out, args.x)}")


if __name__ == "__main__":
    run_cli(main)
