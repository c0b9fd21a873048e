"""Post-hoc EMA on the embedded digits: one run of the demo's method with power-function EMA snapshots, then
the averages of many sigma_rel reconstructed after training, each sampled one- and two-step and scored.

  bash launch.sh phema_sweep     (or: python scripts/phema_sweep_digits.py [--log_dir runs/phema_sweep] [--quick True])

1. Trains the demo (preset demo_train) with --phema_std 0.05,0.10 and a snapshot every 1 % of the run.
2. Reconstructs the averages of --stds (scripts/reconstruct_ema.py; each one's profile fit error recorded).
3. Samples each, and the run's fixed --ema_rate average, one-step and two-step (presets demo_sample_*), and
   evaluates them against the real digits with the digits feature extractor: FID, precision, recall,
   class accuracy.

Writes results.json, results.md and phema_sweep.png (FID and class accuracy against sigma_rel, the fixed EMA
as a flat line). Every stage resumes if interrupted.
"""

import argparse
import json
import os

import torch

import cm_train  # sibling scripts (python puts scripts/ first on the path)
import image_sample
import reconstruct_ema
from cm.atomic import atomic_write_text
from cm.checkpoints import checkpoint_config
from cm.cli import run_cli, str2bool
from cm.config import load_preset
from cm.image_datasets import digits_reference_sets
from cm.plots import panels_png
from cm.precision import cpu_model_name
from evaluations.evaluator import evaluate

TRAIN_PRESET = "demo_train"
TRACKED = "0.05,0.1"
METRICS = ("fid", "precision", "recall", "class_accuracy")
KINDS = ("onestep", "twostep")


def scores(model_path, out_dir, ref, num_samples):
    """{kind: digits-feature metrics} of one- and two-step samples of `model_path` (kept, so a rerun skips them)."""
    result = {}
    for kind in KINDS:
        folder = f"{out_dir}_{kind}"
        npz = os.path.join(folder, f"samples_{num_samples}x16x16x3.npz")
        if not os.path.exists(npz):
            image_sample.main(["--config", f"demo_sample_{kind}", "--model_path", model_path, "--log_dir", folder,
                               "--num_samples", str(num_samples)])
        metrics = evaluate(ref, npz, features="digits")
        result[kind] = {k: metrics.get(k) for k in METRICS}
    return result


def markdown_table(rows, settings):
    lines = ["| average | fit error | 1-step FID | prec. | rec. | class acc. | 2-step FID | prec. | rec. | class acc. |",
             "|" + "---|" * 10]
    for row in rows:
        cells = [row["average"], "" if row["fit_error"] is None else f"{row['fit_error']:.2e}"]
        for kind in KINDS:
            m = row[kind]
            cells += [f"{m['fid']:.1f}"] + [f"{m[k]:.3f}" for k in METRICS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    best = {kind: min((r for r in rows if r["fit_error"] is not None), key=lambda r: r[kind]["fid"]) for kind in KINDS}
    lines += ["", f"One run of {settings['train_preset']} ({settings['steps']} steps), profiles {TRACKED} tracked, "
              f"a snapshot every {settings['snapshot_interval']} images; {settings['num_samples']} samples per model "
              f"against the 1,797 digits; {settings['machine']}. Best one-step FID at sigma_rel "
              f"{best['onestep']['std']:g}, two-step at {best['twostep']['std']:g}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_dir", default="runs/phema_sweep", help="folder for everything the sweep writes")
    parser.add_argument("--stds", default="0.01,0.015,0.02,0.03,0.05,0.07,0.1,0.15,0.2,0.25",
                        help="the sigma_rel values to reconstruct")
    parser.add_argument("--num_samples", type=int, default=1000, help="samples per model and sampler")
    parser.add_argument("--quick", type=str2bool, default=False, help="a few steps, two values, 100 samples (smoke test)")
    args = parser.parse_args(argv)
    flags = load_preset(TRAIN_PRESET)["flags"]
    steps, batch = int(flags["total_training_steps"]), int(flags["global_batch_size"])
    stds = [float(v) for v in args.stds.split(",") if v.strip()]
    extra = []
    if args.quick:
        steps, stds, args.num_samples = 4, [0.05, 0.2], 100
        extra = ["--total_training_steps", "4", "--lr_anneal_steps", "4", "--save_interval", "4", "--log_interval", "2"]
    interval = max(steps * batch // 100, batch)
    train_dir = os.path.join(args.log_dir, "train")

    print(f"[1/3] {TRAIN_PRESET} with power-function EMA snapshots ({steps} steps; resumes if interrupted)", flush=True)
    cm_train.main(["--config", TRAIN_PRESET, "--log_dir", train_dir, "--phema_std", TRACKED,
                   "--phema_snapshot_interval", str(interval), "--progress", "False", *extra])

    print(f"[2/3] post-hoc averages for sigma_rel {', '.join(f'{s:g}' for s in stds)}", flush=True)
    posthoc = os.path.join(train_dir, "posthoc")
    paths = {std: os.path.join(posthoc, f"posthoc_{std:g}_{steps:06d}.pt") for std in stds}
    missing = [std for std, path in paths.items() if not os.path.exists(path)]
    if missing:
        reconstruct_ema.main(["--run_dir", train_dir, "--std", ",".join(f"{s:g}" for s in missing), "--step", str(steps),
                              "--max_error", "1"])

    print("[3/3] sampling and evaluation with the digits feature extractor", flush=True)
    ref, _ = digits_reference_sets(args.log_dir)
    rows = []
    for std, path in paths.items():
        fit = checkpoint_config(torch.load(path, map_location="cpu", weights_only=True, mmap=True))["phema"]["fit_error"]
        rows.append({"average": f"post-hoc sigma_rel {std:g}", "std": std, "fit_error": fit,
                     **scores(path, os.path.join(args.log_dir, f"samples/posthoc_{std:g}"), ref, args.num_samples)})
    rate = str(flags["ema_rate"]).split(",")[-1]
    fixed = os.path.join(train_dir, f"ema_{rate}_{steps:06d}.pt")
    rows.append({"average": f"fixed --ema_rate {rate}", "std": None, "fit_error": None,
                 **scores(fixed, os.path.join(args.log_dir, f"samples/ema_{rate}"), ref, args.num_samples)})

    x = [r["std"] for r in rows if r["std"] is not None]
    panels = []
    for metric, name in (("fid", "FID"), ("class_accuracy", "class accuracy")):
        lines = {}
        for kind, label in (("onestep", "1-step"), ("twostep", "2-step")):
            lines[f"{label} post-hoc"] = (x, [r[kind][metric] for r in rows if r["std"] is not None])
            lines[f"{label} fixed EMA"] = ([min(x), max(x)], [rows[-1][kind][metric]] * 2)
        panels.append((name, lines))
    panels_png(panels, os.path.join(args.log_dir, "phema_sweep.png"), title="post-hoc EMA on the digits",
               x_label="sigma_rel", log_x=True)
    settings = {"train_preset": TRAIN_PRESET, "steps": steps, "snapshot_interval": interval,
                "num_samples": args.num_samples, "machine": cpu_model_name()}
    table = markdown_table(rows, settings)
    print(table)
    atomic_write_text(os.path.join(args.log_dir, "results.json"), json.dumps({"settings": settings, "rows": rows}, indent=2))
    atomic_write_text(os.path.join(args.log_dir, "results.md"), table)


if __name__ == "__main__":
    run_cli(main)
