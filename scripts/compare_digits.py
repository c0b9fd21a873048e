"""CT, iCT and ECT compared on the embedded digits, on a CPU: at equal training steps and at equal wall-clock.

  bash launch.sh compare        (or: python scripts/compare_digits.py [--log_dir runs/compare] [--quick True])

1. Trains the EDM teacher that ECT starts from (preset demo_edm: the demo's model, --teacher_steps steps).
2. Equal steps: CT (demo_ct), iCT (demo_ict) and ECT (demo_ect, from the teacher's EMA weights), --steps
   steps of batch 64 each. All three cost the same per step (one forward and backward of the online
   network, one forward of the target), so these runs also took about equal wall-clock, the teacher not
   counted; each run's measured seconds are reported.
3. Equal wall-clock, the teacher counted: every method gets the seconds CT took in 2. As the three
   cost the same per step, CT and iCT keep their runs of 2 (their measured seconds show how close they
   came), and ECT trains anew for the budget minus the teacher's training time, converted to steps at
   CT's measured seconds per step, with its stage length fitted to the new length.
4. Samples every model one-step and two-step (presets compare_sample_*, ts 0,10,20 of 21) and the
   teacher with Heun (18 steps, 35 evaluations) for reference, and evaluates them against the real
   digits with the digits feature extractor: FID, precision, recall, class accuracy.

Writes results.json, results.md, grid_onestep.png and grid_twostep.png (one row per model in the order of
the table, two samples of each class) and each run's samples_grid.png. Every stage resumes if interrupted.
"""

import argparse
import json
import os
import time

import numpy as np


import cm_train  # a sibling script (python puts scripts/ first on the path)
import edm_train
import image_sample
from cm.atomic import atomic_write_text
from cm.config import load_preset
from cm.image_datasets import load_digits_arrays
from cm.image_io import save_grid, save_npz
from cm.cli import run_cli, str2bool
from cm.checkpoints import MODEL_FILE, parse_resume_step_from_filename
from evaluations.evaluator import evaluate

METHODS = {"CT": "demo_ct", "iCT": "demo_ict", "ECT": "demo_ect"}
ECT_STAGES = 8  # ECT's stages per run, as in the published CIFAR-10 schedule (200k steps, d = 25k)
METRICS = ("fid", "precision", "recall", "class_accuracy")


def newest_step(run_dir):
    if not os.path.isdir(run_dir):
        return 0
    return max((parse_resume_step_from_filename(f) for f in os.listdir(run_dir) if MODEL_FILE.match(f)), default=0)


def timed_training(script_main, flags, run_dir, steps):
    """Train to `steps` in `run_dir` (resuming if interrupted); return the training seconds, measured
    once and kept in timing.json. A run resumed part-way is timed over its remaining steps and scaled
    to all of them."""
    timing_path = os.path.join(run_dir, "timing.json")
    if os.path.exists(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
        if timing["steps"] == steps:
            return timing["seconds"]
    start_step = newest_step(run_dir)
    begin = time.time()
    script_main(flags + ["--total_training_steps", str(steps), "--log_dir", run_dir, "--progress", "False"])
    elapsed = time.time() - begin
    seconds = elapsed * steps / (steps - start_step) if start_step < steps else float("nan")
    atomic_write_text(timing_path, json.dumps({"steps": steps, "seconds": seconds, "resumed_from": start_step}))
    return seconds


def ema_path(run_dir, preset, steps):
    rate = load_preset(preset)["flags"]["ema_rate"].split(",")[-1]
    return os.path.join(run_dir, f"ema_{rate}_{steps:06d}.pt")


def draw(model_path, out_dir, kind, num_samples, heun_steps=18):
    """Samples of every class from `model_path`: kind onestep / twostep (presets compare_sample_*) or heun
    (an EDM model, `heun_steps` Heun steps); returns the .npz path (kept, so a rerun skips it)."""
    npz = os.path.join(out_dir, f"samples_{num_samples}x16x16x3.npz")
    if not os.path.exists(npz):
        preset = "compare_sample_twostep" if kind == "twostep" else "compare_sample_onestep"
        extra = ["--training_mode", "edm", "--sampler", "heun", "--steps", str(heun_steps)] if kind == "heun" else []
        image_sample.main(["--config", preset, "--model_path", model_path, "--log_dir", out_dir,
                           "--num_samples", str(num_samples), *extra])
    return npz


def per_class_rows(npz, per_class=2, num_classes=10):
    """The first `per_class` samples of each class, in class order (one row of the comparison grid)."""
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    return np.concatenate([images[labels == c][:per_class] for c in range(num_classes)])


def fmt(value, digits=3):
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def markdown_table(rows, settings):
    head = ("| comparison | model | steps | train s | 1-step FID | prec. | rec. | class acc. | "
            "2-step FID | prec. | rec. | class acc. |")
    lines = [head, "|" + "---|" * 12]
    for row in rows:
        seconds = fmt(row["train_seconds"], 0)
        if "teacher_seconds" in row:
            seconds += " + " + fmt(row["teacher_seconds"], 0)  # ECT's own + its teacher's
        cells = [row["round"], row["model"], str(row["steps"]), seconds]
        for kind in ("onestep", "twostep"):
            m = row.get(kind) or {}
            cells += [fmt(m.get("fid"), 1)] + [fmt(m.get(k)) for k in METRICS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Digits feature extractor; {settings['num_samples']} samples per model against the 1,797 real digits; "
        "two-step: ts 0,10,20 of a 21-point Karras grid; batch 64; training seconds measured on this machine "
        "(ECT: its own + its teacher's).",
        f"Equal wall-clock: {fmt(settings['budget_seconds'], 0)} s each (CT's run); ECT's budget includes the "
        f"teacher's {fmt(settings['teacher_seconds'], 0)} s of training ({settings['teacher_steps']} EDM steps).",
        "Grid rows (grid_onestep.png, grid_twostep.png), top to bottom: " + ", ".join(
            f"{r['round']} {r['model']}" for r in rows if r.get("grid")) + "; two samples of each class per row.",
    ]
    return "\n".join(lines + notes) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_dir", default="runs/compare", help="folder for everything the comparison writes")
    parser.add_argument("--steps", type=int, default=1400, help="training steps of CT, iCT and ECT (equal steps)")
    parser.add_argument("--teacher_steps", type=int, default=800, help="EDM teacher training steps")
    parser.add_argument("--num_samples", type=int, default=1000, help="samples per model and sampler")
    parser.add_argument("--quick", type=str2bool, default=False, help="a few steps, 100 samples, 4 Heun steps (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.teacher_steps, args.num_samples = 4, 4, 100
    if min(args.steps, args.teacher_steps, args.num_samples) < 1:
        raise ValueError("--steps, --teacher_steps and --num_samples must be at least 1")
    os.makedirs(args.log_dir, exist_ok=True)
    run = lambda name: os.path.join(args.log_dir, name)  # noqa: E731

    print(f"[1/4] EDM teacher on the digits ({args.teacher_steps} steps)", flush=True)
    teacher_dir = run(f"edm_teacher_{args.teacher_steps}steps")
    teacher_seconds = timed_training(edm_train.main, ["--config", "demo_edm"], teacher_dir, args.teacher_steps)
    teacher_path = ema_path(teacher_dir, "demo_edm", args.teacher_steps)

    def train(method, name, steps):
        flags = ["--config", METHODS[method]]
        if method == "ECT":
            flags += ["--teacher_model_path", teacher_path, "--ect_stage_steps", str(max(steps // ECT_STAGES, 1))]
        run_dir = run(f"{name}_{steps}steps")
        seconds = timed_training(cm_train.main, flags, run_dir, steps)
        return {"steps": steps, "train_seconds": seconds, "model_path": ema_path(run_dir, METHODS[method], steps)}

    print(f"[2/4] equal steps: CT, iCT, ECT, {args.steps} steps each", flush=True)
    equal_steps = {method: train(method, method.lower(), args.steps) for method in METHODS}

    budget = equal_steps["CT"]["train_seconds"]
    print(f"[3/4] equal wall-clock: {budget:.0f} s each, the teacher's {teacher_seconds:.0f} s counted in ECT's", flush=True)
    # one step of CT, iCT or ECT is the same work, so CT's measured seconds per step prices all three
    ect_steps = min(int((budget - teacher_seconds) / (budget / args.steps)), args.steps)
    equal_time = {"CT": equal_steps["CT"], "iCT": equal_steps["iCT"]}
    if ect_steps < 1:
        equal_time["ECT"] = {"steps": 0, "train_seconds": 0.0, "model_path": None}
    else:
        equal_time["ECT"] = train("ECT", "ect", ect_steps)

    print("[4/4] sampling and evaluation with the digits feature extractor", flush=True)
    images, labels = load_digits_arrays()
    ref = run("digits_ref.npz")
    halves = [run(f"digits_half_{k}.npz") for k in (0, 1)]
    if not os.path.exists(ref):
        save_npz(ref, images, labels)
    for k, path in enumerate(halves):
        if not os.path.exists(path):
            save_npz(path, images[k::2], labels[k::2])

    rows, grids = [], {"onestep": [], "twostep": []}
    for round_name, results in (("equal steps", equal_steps), ("equal wall-clock", equal_time)):
        for method, result in results.items():
            row = {"round": round_name, "model": method, **{k: v for k, v in result.items() if k != "model_path"}}
            if method == "ECT":
                row["model"] = "ECT (+ EDM teacher)"
                row["teacher_steps"], row["teacher_seconds"] = args.teacher_steps, teacher_seconds
            if result["model_path"] is None:
                row["note"] = "the teacher alone took longer than the budget"
                rows.append(row)
                continue
            reused = round_name == "equal wall-clock" and result["model_path"] == equal_steps[method]["model_path"]
            out = run(f"samples/{os.path.basename(os.path.dirname(result['model_path']))}")
            for kind in ("onestep", "twostep"):
                npz = draw(result["model_path"], f"{out}_{kind}", kind, args.num_samples)
                row[kind] = evaluate(ref, npz, features="digits")
                if not reused:
                    grids[kind].append(per_class_rows(npz))
            if reused:
                row["note"] = "the equal-steps run (the same work per step as CT)"
            row["grid"] = not reused
            rows.append(row)
    heun_steps = 4 if args.quick else 18
    heun = draw(teacher_path, run(f"samples/edm_teacher_{args.teacher_steps}steps_heun"), "heun", args.num_samples,
                heun_steps)
    rows.append({"round": "reference", "model": f"EDM teacher, Heun {2 * heun_steps - 1} NFE (both columns)",
                 "steps": args.teacher_steps, "train_seconds": teacher_seconds,
                 "onestep": evaluate(ref, heun, features="digits")})
    rows[-1]["twostep"] = rows[-1]["onestep"]
    real = evaluate(halves[0], halves[1], features="digits")
    rows.append({"round": "reference", "model": "real digits, half vs half", "steps": 0, "train_seconds": None,
                 "onestep": real, "twostep": real})

    for row in rows:
        for kind in ("onestep", "twostep"):
            if row.get(kind):
                row[kind] = {k: row[kind].get(k) for k in METRICS}
    for kind, parts in grids.items():
        save_grid(np.concatenate(parts), run(f"grid_{kind}.png"), nrow=20)
    settings = {"steps": args.steps, "teacher_steps": args.teacher_steps, "teacher_seconds": teacher_seconds,
                "budget_seconds": budget, "num_samples": args.num_samples, "batch_size": 64}
    table = markdown_table(rows, settings)
    print(table)
    atomic_write_text(run("results.json"), json.dumps({"settings": settings, "rows": rows}, indent=2))
    atomic_write_text(run("results.md"), table)
    print(f"wrote {run('results.md')}, {run('results.json')}, {run('grid_onestep.png')}, {run('grid_twostep.png')}")


if __name__ == "__main__":
    run_cli(main)
