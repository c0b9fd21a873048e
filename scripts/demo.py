"""The embedded demo: consistency training on the 1,797 handwritten digits, on a CPU, in minutes.

  bash launch.sh demo            (or: python scripts/demo.py [--log_dir runs/demo] [--quick True])

Trains a class-conditional consistency model from scratch with improved consistency training (preset
demo_train), draws one-step and two-step samples of every class (presets demo_sample_onestep /
demo_sample_twostep), evaluates them against the real digits with the digits feature extractor (FID,
precision, recall, and the accuracy with which the digits classifier recognises the requested class)
and by their high-frequency energy (pixel noise, which those features do not see), prints a table
with the targets, and writes results.json, the sample grids and a PNG of the loss and of the FID measured during
training (every 100 steps, 500 samples). Every stage resumes if interrupted.
"""

import argparse
import json
import os
import time

import torch


import cm_train  # a sibling script (python puts scripts/ first on the path)
import image_sample
from cm.atomic import atomic_write_text
from cm.config import load_preset
from cm.image_datasets import digits_reference_sets
from cm.plots import curves_png, ema_label, eval_column
from cm.precision import cpu_model_name
from cm.cli import run_cli, str2bool
from evaluations.evaluator import evaluate
from evaluations.pixel_noise import high_frequency_energy, high_frequency_ratio

# What the demo aims for (docs/digits.md, "The demo"): one-step samples recognisably of the requested class, an
# FID (in the digits classifier's features, 1,000 samples against the 1,797 digits; real digits score 7,
# half against half) of at most 25, one-step samples as free of pixel noise as the digits themselves (the
# classifier's features do not see noise; the high-frequency energy does: real digits score 1.0 against
# each other), and two steps better than one.
TARGET_CLASS_ACCURACY = 0.90
TARGET_FID = 25.0
TARGET_HF_RATIO = 1.25
TRAIN_PRESET = "demo_train"  # the recipe (docs/digits.md: how it was chosen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_dir", default="runs/demo", help="folder for everything the demo writes")
    parser.add_argument("--quick", type=str2bool, default=False, help="a few training steps only (smoke test)")
    args = parser.parse_args(argv)
    os.makedirs(args.log_dir, exist_ok=True)
    train_dir = os.path.join(args.log_dir, "train")
    train_flags = load_preset(TRAIN_PRESET)["flags"]
    steps = train_flags["total_training_steps"]
    start = time.time()

    print(f"[1/4] consistency training on the digits ({steps} steps; resumes if interrupted)", flush=True)
    argv = ["--config", TRAIN_PRESET, "--log_dir", train_dir]
    if args.quick:
        steps = 4
        argv += ["--total_training_steps", "4", "--lr_anneal_steps", "4", "--save_interval", "4", "--log_interval", "2",
                 "--eval_interval", "2", "--eval_samples", "20"]
    cm_train.main(argv)
    train_seconds = time.time() - start
    rate = str(train_flags["ema_rate"]).split(",")[-1]
    model_path = os.path.join(train_dir, f"ema_{rate}_{steps:06d}.pt")

    print("[2/4] the real digits as the reference batch", flush=True)
    ref_path, halves = digits_reference_sets(args.log_dir)

    results = {}
    ref_energy = high_frequency_energy(ref_path)
    for k, name in enumerate(("onestep", "twostep")):
        print(f"[{3 + k // 2}/4] {name} sampling", flush=True)
        out = os.path.join(args.log_dir, f"samples_{name}")
        image_sample.main(["--config", f"demo_sample_{name}", "--model_path", model_path, "--log_dir", out])
        num = load_preset(f"demo_sample_{name}")["flags"]["num_samples"]
        npz = os.path.join(out, f"samples_{num}x16x16x3.npz")
        results[name] = evaluate(ref_path, npz, features="digits")
        results[name]["hf_ratio"] = high_frequency_ratio(ref_energy, npz)
    print("[4/4] evaluation with the digits feature extractor", flush=True)
    # what real data score: half of the digits (with their labels) against the other half
    real = results["real digits (half vs half)"] = evaluate(halves[0], halves[1], features="digits")
    real["hf_ratio"] = high_frequency_ratio(halves[0], halves[1])

    header = f"{'':26s} {'FID':>8s} {'precision':>10s} {'recall':>8s} {'class acc.':>11s} {'HF energy':>10s}"
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        lines.append(f"{name:26s} {m['fid']:8.3f} {m['precision']:10.3f} {m['recall']:8.3f} "
                     f"{m.get('class_accuracy', float('nan')):11.3f} {m['hf_ratio']:10.3f}")
    one, two = results["onestep"], results["twostep"]
    checks = {
        f"one-step class accuracy >= {TARGET_CLASS_ACCURACY}": one["class_accuracy"] >= TARGET_CLASS_ACCURACY,
        f"one-step FID <= {TARGET_FID}": one["fid"] <= TARGET_FID,
        f"one-step HF energy <= {TARGET_HF_RATIO}": one["hf_ratio"] <= TARGET_HF_RATIO,
        "two-step FID below one-step": two["fid"] < one["fid"],
    }
    lines.append("HF energy: high-frequency energy over the real digits' (1.0: as smooth as the data; pixel noise raises it)")
    lines += [f"target {'met' if ok else 'NOT met'}: {name}" for name, ok in checks.items()]
    with open(os.path.join(train_dir, "config.json")) as f:
        precision = json.load(f)["precision"]
    lines.append(f"this run: {time.time() - start:.0f} s in all, {train_seconds:.0f} s of training, precision {precision}, "
                 f"{torch.get_num_threads()} threads, CPU {cpu_model_name()}")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(os.path.join(args.log_dir, "results.json"), json.dumps(results, indent=2))
    atomic_write_text(os.path.join(args.log_dir, "results.txt"), table + "\n")
    # the evaluations during training (every 100 steps, 500 samples: FID reads higher than with the 1,000 above)
    curves_png({"iCT": os.path.join(train_dir, "progress.csv")}, os.path.join(args.log_dir, "curves.png"),
               keys=["loss", eval_column("fid", 1, ema_label(rate)), eval_column("fid", 2, ema_label(rate))],
               title="the demo: training loss, and FID of one- and two-step samples as it trains")
    print(f"grids: {args.log_dir}/samples_onestep/samples_grid.png, {args.log_dir}/samples_twostep/samples_grid.png; "
          f"curves: {args.log_dir}/curves.png")


if __name__ == "__main__":
    run_cli(main)
