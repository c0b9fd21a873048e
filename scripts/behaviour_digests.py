"""Digests of what short runs of every training method, every sampler and an editing task produce: the record a
refactor is checked against (a refactor keeps behaviour bit-identical).

    python scripts/behaviour_digests.py --out before.json      # on the old code
    python scripts/behaviour_digests.py --out after.json --compare before.json

Each run is tiny (a 16x16 U-Net on the digits, a few steps, float32 on the CPU) and its files are digested:
every tensor and value of every checkpoint file (SHA-256 of its bytes, by file and key) but the run's config
(a record of the flags, which a refactor may extend, holding the run's id and folder), progress.csv without its
wall-clock columns, and each samples .npz. --compare lists every digest that differs and exits 1 if any does.
"""

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
       "--num_head_channels 16 --class_cond True --num_classes 10 --resblock_updown True --precision fp32")
TRAIN = NET + " --data_dir digits --global_batch_size 8 --lr 2e-4 --ema_rate 0.9 --progress False --log_interval 1"
CONSISTENCY = "--loss_norm l2 --start_scales 4 --end_scales 8"
WALL_CLOCK = ("images_per_s",)  # progress.csv columns that measure time, not the run


def training_runs(teacher):
    """(name, script, flags) of the recorded trainings; `teacher` is the EDM run's model file."""
    steps = " --total_training_steps 4 --save_interval 4"
    distil = f" --teacher_model_path {teacher} --loss_norm l2 --start_scales 4 --end_scales 4"
    return [
        ("edm", "edm_train", TRAIN + " --total_training_steps 6 --save_interval 6"),
        ("cd_heun", "cm_train", TRAIN + steps + " --training_mode consistency_distillation --teacher_solver heun" + distil),
        ("cd_euler", "cm_train", TRAIN + steps + " --training_mode consistency_distillation --teacher_solver euler" + distil),
        ("ct", "cm_train", TRAIN + steps + " --training_mode consistency_training --scale_mode progressive "
         "--target_ema_mode adaptive --start_ema 0.9 " + CONSISTENCY),
        ("ct_phema", "cm_train", TRAIN + steps + " --training_mode consistency_training --phema_std 0.05,0.1 "
         "--phema_snapshot_interval 16 " + CONSISTENCY),
        ("ict", "cm_train", TRAIN + steps + " --training_mode improved_consistency_training --loss_norm pseudo-huber "
         "--start_scales 4 --end_scales 8 --scale_mode exponential"),
        ("ect", "cm_train", TRAIN + steps + f" --training_mode easy_consistency_tuning --loss_norm l2 --ect_stage_steps 2 "
         f"--teacher_model_path {teacher}"),
        ("progdist", "cm_train", TRAIN + steps + f" --training_mode progdist --teacher_model_path {teacher} --loss_norm l2 "
         "--start_scales 8 --scale_mode progdist --distill_steps_per_iter 2"),
        ("sct", "cm_train", TRAIN + steps + " --training_mode continuous_consistency_training --tangent_warmup_steps 2"),
        ("scd", "cm_train", TRAIN + steps + " --training_mode continuous_consistency_distillation "
         f"--teacher_model_path {teacher} --tangent_warmup_steps 2"),
    ]


def sampling_runs(folder):
    """(name, script, flags) of the recorded samplings and the editing task, from the runs in `folder`."""
    model = lambda run, step=4: os.path.join(folder, run, f"model{step:06d}.pt")  # noqa: E731
    sample = NET + " --num_samples 4 --batch_size 4 --steps 8"
    runs = [(f"sample_edm_{s}", "image_sample", sample + f" --training_mode edm --sampler {s} --model_path {model('edm', 6)}")
            for s in ("heun", "euler", "dpm", "ancestral")]
    runs.append(("sample_progdist", "image_sample",
                 sample + f" --training_mode progdist --sampler progdist --model_path {model('progdist')}"))
    runs += [(f"sample_ct_{s}", "image_sample", sample + f" --training_mode consistency_training --sampler {s} --ts 0,3,7 "
              f"--model_path {model('ct')}") for s in ("onestep", "multistep")]
    runs += [(f"sample_sct_{s}", "image_sample", sample + " --training_mode continuous_consistency_training "
              f"--time_input identity --double_norm True --sampler {s} --model_path {model('sct')}")
             for s in ("onestep", "multistep")]
    runs.append(("edit_inpainting", "image_edit", NET + " --training_mode consistency_training --task inpainting "
                 f"--data_dir digits --num_images 4 --batch_size 4 --steps 8 --model_path {model('ct')}"))
    return runs


def tensor_digests(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = hashlib.sha256(value.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                if k != "config":
                    walk(f"{prefix}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            out[prefix] = repr(value)

    walk("", state)
    return out


def folder_digests(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".pt"):
            out.update({f"{name}{k}": v for k, v in tensor_digests(path).items()})
        elif name == "progress.csv":
            with open(path) as f:
                rows = [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in csv.DictReader(f)]
            out[name] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
        elif name.endswith(".npz"):
            with np.load(path) as data:
                for key in sorted(data.files):
                    out[f"{name}/{key}"] = hashlib.sha256(data[key].tobytes()).hexdigest()[:16]
    return out


def run(script, flags, log_dir):
    command = [sys.executable, os.path.join(ROOT, "scripts", f"{script}.py"), *flags.split(), "--log_dir", log_dir]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if result.returncode != 0:
        raise SystemExit(f"{script} failed:\n{' '.join(command)}\n{result.stderr[-3000:]}")


def record(folder):
    digests = {}
    runs = training_runs(os.path.join(folder, "edm", "model000006.pt"))
    for name, script, flags in runs + sampling_runs(folder):
        print(f"{name} ...", flush=True)
        run(script, flags, os.path.join(folder, name))
        digests[name] = folder_digests(os.path.join(folder, name))
    return digests


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file of digests to write")
    parser.add_argument("--compare", default="", help="an earlier JSON to compare with")
    parser.add_argument("--keep", default="", help="a folder to keep the runs in (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        digests = record(args.keep)
    else:
        with tempfile.TemporaryDirectory() as folder:
            digests = record(folder)
    with open(args.out, "w") as f:
        json.dump(digests, f, indent=1, sort_keys=True)
    print(f"{sum(len(d) for d in digests.values())} digests of {len(digests)} runs in {args.out}")
    if args.compare:
        with open(args.compare) as f:  # (a record made before configs were left out: they are dropped here)
            before = {run: {k: v for k, v in d.items() if not k.endswith("/config")} for run, d in json.load(f).items()}
        differ = [f"{run}: {key}" for run in sorted(set(before) | set(digests))
                  for key in sorted(set(before.get(run, {})) | set(digests.get(run, {})))
                  if before.get(run, {}).get(key) != digests.get(run, {}).get(key)]
        print("\n".join(differ[:50]) or f"identical to {args.compare}")
        if differ:
            raise SystemExit(f"{len(differ)} digests differ from {args.compare}")


if __name__ == "__main__":
    main()
