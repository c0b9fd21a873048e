"""Training curves of one or several runs in one PNG: loss, gradient norm, learning rate and every metric of the
evaluations during training (--eval_interval: fid_1step_ema0.9999, ...) against training images, one line per run,
the legend by run folder name; and a table of each evaluation metric's best value (lowest distance, highest
precision, recall, ...) and last value, by run: which EMA, which step.

  python scripts/plot_runs.py runs/ct_a runs/ct_b                       # -> runs_curves.png
  python scripts/plot_runs.py runs/ct_a --keys loss,fid_1step_ema0.9999 --x step --out ct_a.png
"""

import argparse
import os

from cm.cli import run_cli
from cm.plots import best_values, curves_png


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (each with its progress.csv)")
    parser.add_argument("--out", default="runs_curves.png", help="the PNG written")
    parser.add_argument("--keys", default="", help="comma-separated columns (default: loss, grad_norm, lr and every "
                        "evaluation metric)")
    parser.add_argument("--x", default="samples", choices=("samples", "step"), help="samples: training images")
    parser.add_argument("--title", default="", help="a line above the panels")
    args = parser.parse_args(argv)
    runs = {}
    for folder in args.runs:
        path = os.path.join(folder, "progress.csv")
        if not os.path.isfile(path):
            raise ValueError(f"{folder} has no progress.csv: pass the folders of training runs (their --log_dir)")
        name = os.path.basename(os.path.normpath(folder))
        runs[name if name not in runs else os.path.normpath(folder)] = path
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] or None
    drawn = curves_png(runs, args.out, keys=keys, x=args.x, title=args.title)
    if not drawn:
        raise ValueError("nothing to draw: no run has two or more values of the chosen columns"
                         + (f" ({args.keys})" if args.keys else ""))
    print(f"wrote {args.out} ({drawn} lines)")
    x_name = "images" if args.x == "samples" else "step"
    for name, path in runs.items():
        table = best_values(path, args.x)
        if table:
            width = max(len(k) for k in table)
            print(f"{name}: {'metric':{width}s} {'best':>10s} {'at ' + x_name:>14s} {'last':>10s} {'at ' + x_name:>14s}")
            for key, (best, at, last, last_at) in table.items():
                print(f"{' ' * len(name)}  {key:{width}s} {best:10.4g} {at:14g} {last:10.4g} {last_at:14g}")


if __name__ == "__main__":
    run_cli(main)
