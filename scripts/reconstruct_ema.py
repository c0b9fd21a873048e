"""Post-hoc EMA (EDM2, Karras et al. 2024, Section 3): from the power-function EMA snapshots of a run
(trained with --phema_std and --phema_snapshot_interval), the average for any relative standard deviation
sigma_rel, or a classic EMA's half-life, chosen after training.

    python scripts/reconstruct_ema.py --run_dir runs/sct --std 0.02,0.05,0.1,0.2
    python scripts/reconstruct_ema.py --run_dir runs/sct --halflife_images 20000 --step 700
    python scripts/image_sample.py --config demo_sample_sct_onestep --model_path runs/sct/posthoc/posthoc_0.05_000700.pt

Solves EDM2's least-squares system of profile inner products (cm.phema) over the snapshots up to --step
(default: the newest), prints each request's fit error (the relative L2 distance of the combined profile
from the requested one) and writes an ordinary model file for each, its config and the profile inside,
to --out_dir (default: RUN_DIR/posthoc). A request the snapshots cannot express (fit error above
--max_error) is refused in one line, and nothing is written for it. The snapshots must be of one run (the run id
in their config) and one network; those at step 0 are skipped, as EDM2's reconstruct_phema.py does.
"""

import argparse
import math
import os
import re
from collections import OrderedDict

import numpy as np
import torch

from cm.atomic import write_failure
from cm.checkpoints import atomic_save, checkpoint_config, with_config
from cm.cli import run_cli
from cm.dist_util import read_weight_file
from cm.phema import solve_weights, std_to_exp

SNAPSHOT = re.compile(r"^phema_([0-9.eE+-]+)_(\d{6,})\.pt$")


def read_snapshot(path):
    return read_weight_file(path, mmap=True, what="power-function EMA snapshot")


def find_snapshots(run_dir):
    """[(path, std, step, images)] of the run's snapshots after step 0 (EDM2 drops those at 0: they average no
    training), oldest first; times from each file's own config. Snapshots of two runs (their run ids, made by
    cm.run_setup) or of two networks (keys, shapes) are refused in one line; those without an id, alone, are taken."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run_dir {run_dir} is not a folder")
    found, first = [], None
    for name in sorted(os.listdir(run_dir)):
        match = SNAPSHOT.match(name)
        if not match:
            continue
        path = os.path.join(run_dir, name)
        state = read_snapshot(path)
        config = checkpoint_config(state) or {}
        try:
            profile = config["phema"]
            std, step, images = float(profile["std"]), int(profile["step"]), float(profile["images"])
            shapes = {k: tuple(v.shape) for k, v in state.items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{path} is not a power-function EMA snapshot (no profile in its config); "
                             "move it out of --run_dir") from None
        first = first or (name, config.get("run_id"), shapes)
        check_same_run(run_dir, first, (name, config.get("run_id"), shapes))
        if step == 0:
            print(f"skipped {name}: a snapshot at step 0 averages no training")
            continue
        found.append((path, std, step, images))
    if not found:
        raise FileNotFoundError(f"no phema_STD_NNNNNN.pt snapshots in {run_dir}: train with --phema_std 0.05,0.10 "
                                "(and --phema_snapshot_interval IMAGES for more than one snapshot per checkpoint)")
    return sorted(found, key=lambda s: (s[2], s[1]))


def check_same_run(run_dir, a, b):
    """Refuse snapshots a, b = (file name, run id, {key: shape}) of two runs or two networks in one line."""
    (name_a, id_a, shapes_a), (name_b, id_b, shapes_b) = a, b
    if id_a != id_b:
        runs = [f"{n} (run {i})" if i else f"{n} (no run id: from before runs had one)"
                for n, i in ((name_a, id_a), (name_b, id_b))]
        raise ValueError(f"{run_dir} holds snapshots of two runs, {' and '.join(runs)}; move one run's phema_*.pt "
                         "files to another folder")
    differ = sorted(k for k in shapes_a.keys() | shapes_b.keys() if shapes_a.get(k) != shapes_b.get(k))
    if differ:
        raise ValueError(f"{name_a} and {name_b} in {run_dir} are snapshots of different networks (differing in "
                         f"{', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}); move one run's phema_*.pt files "
                         "to another folder")


def combine(snapshots, weights):
    """sum_i weights[i] * snapshot_i, tensor by tensor in float64, one snapshot in memory at a time."""
    total, config = None, None
    for (path, *_), w in zip(snapshots, weights):
        state = read_snapshot(path)
        config = checkpoint_config(state)
        if total is None:
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
        for k, v in state.items():
            if v.is_floating_point():
                total[k] += float(w) * v.double()
            else:
                total[k] = v  # (integer buffers: taken as they are)
    return OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in total.items()), config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="the run folder holding phema_STD_NNNNNN.pt snapshots")
    parser.add_argument("--std", default="", help="comma-separated sigma_rel values to reconstruct, e.g. 0.05,0.1")
    parser.add_argument("--halflife_images", default="", help="comma-separated classic-EMA half-lives, in images")
    parser.add_argument("--step", type=int, default=0, help="the training step of the averages (default: the newest snapshot)")
    parser.add_argument("--out_dir", default="", help="where the model files go (default: RUN_DIR/posthoc)")
    parser.add_argument("--max_error", type=float, default=0.05, help="refuse a request whose profile fit error exceeds this")
    args = parser.parse_args(argv)
    try:
        stds = [float(v) for v in args.std.split(",") if v.strip()]
        halflives = [float(v) for v in args.halflife_images.split(",") if v.strip()]
    except ValueError:
        raise ValueError("--std and --halflife_images take comma-separated numbers") from None
    if not stds and not halflives:
        raise ValueError("nothing to reconstruct: pass --std (sigma_rel values) and/or --halflife_images")
    for std in stds:
        try:
            std_to_exp(std)
        except ValueError as err:
            raise ValueError(f"--std: {err}") from None
    if not all(0 < h < math.inf for h in halflives):
        raise ValueError(f"--halflife_images must be positive finite numbers of images, got {args.halflife_images}")
    if not 0 < args.max_error < math.inf:
        raise ValueError(f"--max_error must be a positive finite number, got {args.max_error}")

    snapshots = find_snapshots(args.run_dir)
    step = args.step or snapshots[-1][2]
    usable = [s for s in snapshots if s[2] <= step]
    at_step = [s for s in usable if s[2] == step]
    if not at_step:
        raise ValueError(f"no snapshot at step {step} in {args.run_dir} (snapshot steps: "
                         f"{', '.join(str(k) for k in sorted({s[2] for s in snapshots}))})")
    images = at_step[0][3]
    times, profiles = np.array([s[3] for s in usable]), [s[1] for s in usable]
    out_dir = args.out_dir or os.path.join(args.run_dir, "posthoc")
    print(f"{len(usable)} snapshots of sigma_rel {', '.join(sorted({f'{p:g}' for p in profiles}))} up to step {step} "
          f"({images:.0f} images)")

    requests = [(f"posthoc_{std:g}_{step:06d}.pt", {"std": std}) for std in stds]
    requests += [(f"posthoc_halflife{h:g}_{step:06d}.pt", {"halflife_images": h}) for h in halflives]
    fits = []
    for name, request in requests:
        weights, error = solve_weights(times, profiles, images, target_std=request.get("std"),
                                       target_halflife=request.get("halflife_images"))
        what = f"sigma_rel {request['std']:g}" if "std" in request else f"half-life {request['halflife_images']:g} images"
        if not error <= args.max_error:  # (a NaN fit too)
            raise ValueError(f"the snapshots cannot express {what} at step {step}: profile fit error {error:.3g} > "
                             f"--max_error {args.max_error:g}; track profiles around it (--phema_std) or snapshot more often")
        fits.append((name, request, weights, error, what))
    for name, request, weights, error, what in fits:
        state, config = combine(usable, weights)
        config = {**(config or {}), "phema": {**request, "step": step, "images": images, "fit_error": error}}
        path = os.path.join(out_dir, name)
        try:
            os.makedirs(out_dir, exist_ok=True)
            atomic_save(with_config(state, config), path)  # (a failed write leaves no part of the file)
        except (OSError, RuntimeError) as err:  # a full disk, a read-only folder (torch.save's writer: RuntimeError)
            raise ValueError(f"{write_failure(path, err)}; make room, or pass a writable --out_dir") from None
        print(f"{what}: fit error {error:.2e} -> {path}")


if __name__ == "__main__":
    run_cli(main)
