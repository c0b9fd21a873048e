"""CT, iCT, sCT, MeanFlow, ECT, CD, sCD from one EDM teacher, and TCM's stage 2 from the CT, iCT and sCT runs, compared
on the embedded digits on a CPU, on one network (base/digits_compare): at equal training steps and at equal
wall-clock, the teacher's time and both of TCM's stages counted.

  bash launch.sh compare        (or: python scripts/compare_digits.py [--log_dir runs/compare] [--quick True])

1. Trains the EDM teacher that ECT, CD and sCD start from (preset demo_edm, --teacher_steps steps).
2. Equal steps: CT (demo_ct), iCT (demo_ict), sCT (compare_sct), ECT (demo_ect), CD (compare_cd), sCD
   (compare_scd) and MeanFlow (compare_meanflow), --steps steps of batch 64 each; each run's seconds are measured.
3. Equal wall-clock, the teacher counted: every method gets the seconds CT took in 2, less the teacher's
   for the methods that need one, priced at its own measured seconds per step (iCT and ECT do CT's work
   per step, so CT's price is theirs). CT and iCT keep their runs of 2; sCT, CD, sCD and MeanFlow, whose schedules
   do not depend on the run's length, take the checkpoint of their run of 2 at the budget's step (saved
   every SAVE_EVERY steps; it is the shorter run exactly); ECT trains anew with its stage length fitted.
   TCM (CT), TCM (iCT), TCM (sCT): stage 1 is the checkpoint of that method's run at 5/7 of its steps (equal steps:
   1000 of 1400; equal wall-clock: of its equal-time steps), stage 2 (cm/methods/tcm.py, the paper's CIFAR-10
   settings at half the stage-1 lr, its curriculum frozen where stage 1 stopped) the rest: 400 steps, or the seconds
   left at its measured price per step. CT (EDM2): CT as CT's row on a tiny EDM2 network (compare_ct_edm2), at
   equal steps only.
4. Samples every model one-step and two-step (presets compare_sample_*: ts 0,10,20 of 21 for the Karras
   models, t_mid 1.1 for the TrigFlow ones, a jump through t = 0.5 for the flow map; TCM's through t' = 1) and the
   teacher with Heun
   (18 steps, 35 evaluations) for reference, and evaluates them against the real digits with the digits feature extractor: FID,
   precision, recall, class accuracy.

Writes results.json, results.md, grid_onestep.png and grid_twostep.png (one row per model in the order of
the table, two samples of each class), scm_curves.png (sCT's and sCD's loss, error, tangent norm and learned
log-weight against steps) and each run's samples_grid.png. Every stage resumes if interrupted.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch


import cm_train  # a sibling script (python puts scripts/ first on the path)
import edm_train
import image_sample
from cm.atomic import atomic_write_text
from cm.config import load_preset
from cm.image_datasets import digits_reference_sets
from cm.precision import cpu_model_name
from cm.image_io import save_grid
from cm.plots import curves_png
from cm.cli import run_cli, str2bool
from cm.checkpoints import MODEL_FILE, checkpoint_config, parse_resume_step_from_filename
from cm.methods.target import TargetNetworkMethod
from evaluations.evaluator import evaluate

# preset; needs the EDM teacher; its equal-wall-clock run: "ct" (CT itself, the budget), "ct_work" (CT's work
# per step: its run of the equal steps), "prefix" (a checkpoint of that run), "retrain" (ECT: a new, shorter run),
# "steps_only" (none: CT on another network, a row of the equal steps only)
METHODS = {
    "CT": ("demo_ct", False, "ct"),
    "iCT": ("demo_ict", False, "ct_work"),
    "sCT": ("compare_sct", False, "prefix"),
    "ECT": ("demo_ect", True, "retrain"),
    "CD": ("compare_cd", True, "prefix"),
    "sCD": ("compare_scd", True, "prefix"),
    "MeanFlow": ("compare_meanflow", False, "prefix"),
    "CT (EDM2)": ("compare_ct_edm2", False, "steps_only"),
    "TCM (CT)": ("demo_ct", False, "tcm"),
    "TCM (iCT)": ("demo_ict", False, "tcm"),
    "TCM (sCT)": ("compare_sct", False, "tcm"),
}
# TCM's stage 2 (cm/methods/tcm.py) from the checkpoint of its stage-1 method's run at TCM_STAGE1_SHARE of its steps,
# trained for the rest, so that both stages together take the steps (or the seconds) of the others; the paper's
# CIFAR-10 stage-2 settings (NVlabs/TCM README) at half the stage-1 learning rate (as 1e-4 -> 5e-5 there)
TCM_STAGE1 = {"TCM (CT)": "CT", "TCM (iCT)": "iCT", "TCM (sCT)": "sCT"}
TCM_STAGE1_SHARE = 5 / 7  # 1000 of 1400 steps
TCM_FLAGS = ["--tcm_transition", "1.0", "--tcm_boundary_share", "0.25", "--tcm_boundary_weight", "0.1",
             "--tcm_log_t_mean", "0.0", "--tcm_log_t_std", "0.2", "--tcm_log_t_df", "0.01"]
ECT_STAGES = 8  # ECT's stages per run, as in the published CIFAR-10 schedule (200k steps, d = 25k)
SAVE_EVERY = 50  # the "prefix" runs' checkpoint interval
METRICS = ("fid", "precision", "recall", "class_accuracy")
SCM_CURVES = ("loss", "mse", "tangent_norm", "log_weight")


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


def sampling_flags(preset):
    """What image_sample.py needs besides compare_sample_* to sample a model of training preset `preset`: its
    method in place of the sampling preset's (the network's flags come from the model file's stored config)."""
    return ["--training_mode", load_preset(preset)["flags"].get("training_mode", "edm")]


# TCM's two steps go through t' = 1 (as the paper's CIFAR-10 sampler), not the grid's 2.5 or TrigFlow's 1.1 (sigma 0.98)
TCM_TWO_STEP = {"demo_ct": ["--ts", "", "--t_mid", "1.0"], "demo_ict": ["--ts", "", "--t_mid", "1.0"],
                "compare_sct": ["--t_mid", repr(math.atan(1.0 / 0.5))]}


def draw(model_path, out_dir, kind, num_samples, extra=()):
    """Samples of every class from `model_path`: kind onestep / twostep (presets compare_sample_*) or heun
    (extra: the Heun flags); returns the .npz path (kept, so a rerun skips it)."""
    npz = os.path.join(out_dir, f"samples_{num_samples}x16x16x3.npz")
    if not os.path.exists(npz):
        preset = "compare_sample_twostep" if kind == "twostep" else "compare_sample_onestep"
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
    head = ("| comparison | model | steps | train s | s / step | 1-step FID | prec. | rec. | class acc. | "
            "2-step FID | prec. | rec. | class acc. |")
    lines = [head, "|" + "---|" * 13]
    for row in rows:
        seconds = fmt(row["train_seconds"], 0)
        if "teacher_seconds" in row:
            seconds += " + " + fmt(row["teacher_seconds"], 0)  # its own + its teacher's
        per_step = row["train_seconds"] / row["steps"] if row.get("steps") and row["train_seconds"] else None
        cells = [row["round"], row["model"], str(row["steps"]), seconds, fmt(per_step, 3)]
        for kind in ("onestep", "twostep"):
            m = row.get(kind) or {}
            cells += [fmt(m.get("fid"), 1)] + [fmt(m.get(k)) for k in METRICS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Digits feature extractor; {settings['num_samples']} samples per model against the 1,797 real digits; "
        "two-step: ts 0,10,20 of a 21-point Karras grid (TrigFlow models: t_mid 1.1; flow maps: a jump through t = 0.5; "
        "TCM: through t' = 1, sigma 1); batch 64; training seconds measured on this machine (the teacher's methods: their "
        "own + the teacher's; TCM: both stages, stage 1's prorated from its run).",
        f"Equal wall-clock: {fmt(settings['budget_seconds'], 0)} s each (CT's run), the teacher's "
        f"{fmt(settings['teacher_seconds'], 0)} s ({settings['teacher_steps']} EDM steps) counted in ECT's, CD's "
        "and sCD's.",
        "Grid rows (grid_onestep.png, grid_twostep.png), top to bottom: " + ", ".join(
            f"{r['round']} {r['model']}" for r in rows if r.get("grid")) + "; two samples of each class per row.",
    ]
    return "\n".join(lines + notes) + "\n"


def stage1_steps(steps, save_every):
    """Stage 1's share of `steps`, rounded down to its checkpoints (at least one checkpoint's worth)."""
    k = int(steps * TCM_STAGE1_SHARE)
    return max(k - k % save_every, save_every)


def frozen_curriculum(stage1_path, step):
    """The stage-1 run's target EMA rate and N(k) at `step` (from the config its checkpoint stores), as fixed flags:
    stage 2 goes on from where stage 1 stopped (the published stage 2 resumes stage 1's tick)."""
    config = checkpoint_config(torch.load(stage1_path, map_location="cpu", weights_only=True))
    if config["training_mode"] not in ("consistency_training", "improved_consistency_training"):
        return ["--tangent_warmup_steps", "0"]  # (sCT: its tangent warmed up by then)
    target_ema, num_scales = TargetNetworkMethod.curriculum(argparse.Namespace(**config))(step)
    return ["--target_ema_mode", "fixed", "--start_ema", repr(float(target_ema)), "--scale_mode", "fixed",
            "--start_scales", str(int(num_scales))]


def equal_time_steps(method, equal_steps, budget, teacher_seconds, steps):
    """The steps `method` gets for CT's wall-clock, its teacher's time counted, at its price per step."""
    preset, needs_teacher, kind = METHODS[method]
    if kind in ("ct", "ct_work"):
        return steps
    price = equal_steps["CT" if kind == "retrain" else method]["train_seconds"] / steps  # ECT: CT's work
    return max(0, min(int((budget - (teacher_seconds if needs_teacher else 0.0)) / price), steps))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_dir", default="runs/compare", help="folder for everything the comparison writes")
    parser.add_argument("--steps", type=int, default=1400, help="training steps of every method (equal steps)")
    parser.add_argument("--teacher_steps", type=int, default=800, help="EDM teacher training steps")
    parser.add_argument("--num_samples", type=int, default=1000, help="samples per model and sampler")
    parser.add_argument("--methods", default=",".join(METHODS), help="which of " + ", ".join(METHODS))
    parser.add_argument("--quick", type=str2bool, default=False,
                        help="a few steps of batch 16, 100 samples, 4 Heun steps (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.teacher_steps, args.num_samples = 4, 4, 100
    if min(args.steps, args.teacher_steps, args.num_samples) < 1:
        raise ValueError("--steps, --teacher_steps and --num_samples must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "CT" not in methods:
        raise ValueError(f"--methods takes CT (the budget) and any of {', '.join(METHODS)}; got {args.methods!r}")
    missing = [f"{m} needs {TCM_STAGE1[m]}" for m in methods if m in TCM_STAGE1 and TCM_STAGE1[m] not in methods]
    if missing:
        raise ValueError(f"--methods: {'; '.join(missing)} (its stage 1) in the list too")
    tcm_methods = [m for m in methods if m in TCM_STAGE1]
    methods = [m for m in methods if m not in TCM_STAGE1]
    save_every = 2 if args.quick else SAVE_EVERY
    quick_flags = ["--global_batch_size", "16"] if args.quick else []  # (the smoke test: a quarter of the batch)
    os.makedirs(args.log_dir, exist_ok=True)
    run = lambda name: os.path.join(args.log_dir, name)  # noqa: E731

    print(f"[1/4] EDM teacher on the digits ({args.teacher_steps} steps)", flush=True)
    teacher_dir = run(f"edm_teacher_{args.teacher_steps}steps")
    teacher_flags = ["--config", "demo_edm", *quick_flags]
    teacher_seconds = timed_training(edm_train.main, teacher_flags, teacher_dir, args.teacher_steps)
    teacher_path = ema_path(teacher_dir, "demo_edm", args.teacher_steps)

    def train(method, steps):
        preset, needs_teacher, kind = METHODS[method]
        flags = ["--config", preset]
        if needs_teacher:
            flags += ["--teacher_model_path", teacher_path]
        if method == "ECT":
            flags += ["--ect_stage_steps", str(max(steps // ECT_STAGES, 1))]
        if kind == "prefix" or method in TCM_STAGE1.values():  # (TCM's stage 2 starts from a checkpoint of the run)
            flags += ["--save_interval", str(save_every)]
        if args.quick:
            flags += ["--log_interval", "1", *quick_flags]  # the curves need logged steps
        run_dir = run(f"{method.lower()}_{steps}steps")
        seconds = timed_training(cm_train.main, flags, run_dir, steps)
        return {"steps": steps, "train_seconds": seconds, "run_dir": run_dir}

    print(f"[2/4] equal steps: {', '.join(methods)}, {args.steps} steps each", flush=True)
    equal_steps = {method: train(method, args.steps) for method in methods}
    for method, result in equal_steps.items():
        result["model_path"] = ema_path(result["run_dir"], METHODS[method][0], args.steps)

    def train_stage2(method, stage1_run, stage1_steps, steps):
        """TCM's stage 2 of `method` for `steps` steps from its stage-1 run's checkpoint at `stage1_steps`."""
        stage1 = TCM_STAGE1[method]
        preset = METHODS[method][0]
        stage1_path = ema_path(stage1_run, preset, stage1_steps)
        lr = load_preset(preset)["flags"]["lr"] / 2
        flags = ["--config", preset, "--training_mode", f"truncated_{load_preset(preset)['flags']['training_mode']}",
                 "--tcm_stage1", stage1_path, "--lr", repr(lr), *TCM_FLAGS, *frozen_curriculum(stage1_path, stage1_steps),
                 "--save_interval", str(save_every), *quick_flags]
        if args.quick:
            flags += ["--log_interval", "1"]
        run_dir = run(f"tcm_{stage1.lower()}_{stage1_steps}+{steps}steps")
        seconds = timed_training(cm_train.main, flags, run_dir, steps)
        return {"steps": steps, "train_seconds": seconds, "run_dir": run_dir, "model_path": ema_path(run_dir, preset, steps)}

    def tcm_result(method, stage1_result, stage1_steps, stage2, stage2_steps):
        """The row of a TCM model: both stages' steps and seconds (stage 1's, prorated, of its run)."""
        stage1_seconds = stage1_result["train_seconds"] * stage1_steps / stage1_result["steps"]
        stage2_seconds = stage2["train_seconds"] * stage2_steps / stage2["steps"]
        return {"steps": stage1_steps + stage2_steps, "train_seconds": stage1_seconds + stage2_seconds,
                "stage_steps": (stage1_steps, stage2_steps),
                "model_path": ema_path(stage2["run_dir"], METHODS[method][0], stage2_steps)}

    k1 = stage1_steps(args.steps, save_every)
    if tcm_methods:
        print(f"[2/4] TCM's stage 2: {', '.join(tcm_methods)}, {args.steps - k1} steps each from step {k1} of stage 1",
              flush=True)
    stage2_runs = {}
    for method in tcm_methods:
        stage2_runs[method] = train_stage2(method, equal_steps[TCM_STAGE1[method]]["run_dir"], k1, args.steps - k1)
        equal_steps[method] = tcm_result(method, equal_steps[TCM_STAGE1[method]], k1, stage2_runs[method], args.steps - k1)

    budget = equal_steps["CT"]["train_seconds"]
    print(f"[3/4] equal wall-clock: {budget:.0f} s each, the teacher's {teacher_seconds:.0f} s counted", flush=True)
    equal_time = {}
    for method in methods:
        if METHODS[method][2] == "steps_only":
            continue
        k = equal_time_steps(method, equal_steps, budget, teacher_seconds, args.steps)
        kind = METHODS[method][2]
        if kind == "prefix":
            k -= k % save_every
        if k == args.steps:
            equal_time[method] = equal_steps[method]
        elif k < 1:
            equal_time[method] = {"steps": 0, "train_seconds": 0.0, "model_path": None}
        elif kind == "prefix":
            own = equal_steps[method]
            equal_time[method] = {"steps": k, "train_seconds": own["train_seconds"] * k / args.steps,
                                  "model_path": ema_path(own["run_dir"], METHODS[method][0], k)}
        else:
            equal_time[method] = train(method, k)
            equal_time[method]["model_path"] = ema_path(equal_time[method]["run_dir"], METHODS[method][0], k)

    for method in tcm_methods:  # stage 1's share of its own equal-time steps, then stage 2 for the seconds left
        stage1_result = equal_steps[TCM_STAGE1[method]]
        j1 = stage1_steps(equal_time[TCM_STAGE1[method]]["steps"], save_every)
        stage1_seconds = stage1_result["train_seconds"] * j1 / stage1_result["steps"]
        stage2_price = stage2_runs[method]["train_seconds"] / stage2_runs[method]["steps"]
        j2 = max(0, min(int((budget - stage1_seconds) / stage2_price), args.steps - j1))
        j2 -= j2 % save_every
        if j2 < 1:
            equal_time[method] = {"steps": j1, "train_seconds": stage1_seconds, "model_path": None}
            continue
        stage2 = stage2_runs[method] if j1 == k1 and j2 <= stage2_runs[method]["steps"] else train_stage2(
            method, stage1_result["run_dir"], j1, j2)
        equal_time[method] = tcm_result(method, stage1_result, j1, stage2, j2)
        if equal_time[method]["model_path"] == equal_steps[method]["model_path"]:
            equal_time[method] = equal_steps[method]
    methods += tcm_methods

    print("[4/4] sampling and evaluation with the digits feature extractor", flush=True)
    ref, halves = digits_reference_sets(args.log_dir)

    rows, grids = [], {"onestep": [], "twostep": []}
    for round_name, results in (("equal steps", equal_steps), ("equal wall-clock", equal_time)):
        for method, result in results.items():
            row = {"round": round_name, "model": method, "steps": result["steps"], "train_seconds": result["train_seconds"]}
            if METHODS[method][1]:
                row["model"] = f"{method} (+ EDM teacher)"
                row["teacher_steps"], row["teacher_seconds"] = args.teacher_steps, teacher_seconds
            if "stage_steps" in result:
                row["model"] = f"{method}: {result['stage_steps'][0]} + {result['stage_steps'][1]} steps"
            if result["model_path"] is None:
                row["note"] = ("stage 1 alone took the budget" if method in TCM_STAGE1 else
                               "the teacher alone took longer than the budget")
                rows.append(row)
                continue
            reused = round_name == "equal wall-clock" and result is equal_steps[method]
            name = os.path.basename(result["model_path"])[: -len(".pt")]
            out = run(f"samples/{os.path.basename(os.path.dirname(result['model_path']))}_{name}")
            for kind in ("onestep", "twostep"):
                npz = draw(result["model_path"], f"{out}_{kind}", kind, args.num_samples,
                           sampling_flags(METHODS[method][0]) + (TCM_TWO_STEP[METHODS[method][0]] if
                                                                 method in TCM_STAGE1 and kind == "twostep" else []))
                row[kind] = evaluate(ref, npz, features="digits")
                if not reused:
                    grids[kind].append(per_class_rows(npz))
            if reused:
                row["note"] = "the equal-steps run"
            row["grid"] = not reused
            rows.append(row)
    heun_steps = 4 if args.quick else 18
    heun = draw(teacher_path, run(f"samples/edm_teacher_{args.teacher_steps}steps_heun"), "heun", args.num_samples,
                ["--training_mode", "edm", "--sampler", "heun", "--steps", str(heun_steps), *sampling_flags("demo_edm")])
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
    scm_runs = {m: os.path.join(equal_steps[m]["run_dir"], "progress.csv") for m in ("sCT", "sCD") if m in equal_steps}
    if scm_runs:
        curves_png(scm_runs, run("scm_curves.png"), keys=SCM_CURVES, title="sCM training on the digits")
    settings = {"steps": args.steps, "teacher_steps": args.teacher_steps, "teacher_seconds": teacher_seconds,
                "budget_seconds": budget, "num_samples": args.num_samples, "batch_size": 64,
                "machine": cpu_model_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    table = markdown_table(rows, settings)
    print(table)
    atomic_write_text(run("results.json"), json.dumps({"settings": settings, "rows": rows}, indent=2))
    atomic_write_text(run("results.md"), table)
    print(f"wrote {run('results.md')}, {run('results.json')}, {run('grid_onestep.png')}, {run('grid_twostep.png')}")


if __name__ == "__main__":
    run_cli(main)
