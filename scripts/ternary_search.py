"""Find the intermediate step of two-step (or k-step) consistency sampling with the lowest FID, by
ternary search over the grid indices between --begin and --end (published: scripts/ternary_search.py).

Each evaluated point samples --num_samples images with ts = begin + (p,) + end, saves them as
samples_ts_<ts>.npz and records its metrics in ternary_search.json in the run folder, so a
stopped search started again reuses every point it already has. Differences from the published
script: the sampler gets its `ts` (the published call crashed), the two- and three-point endgames
compare the right candidates, and every process takes part in the final evaluation.
"""

import json
import os

import torch

from cm import dist_util, logger
from cm.config import parse_args_with_config
from cm.methods import parameterization
from cm.atomic import atomic_write_text
from cm.image_io import save_npz
from cm.parameterizations import parse_int_list
from cm.sample_util import (
    SAMPLE_SETTINGS,
    generate_samples,
    load_sampling_model,
    sample_kwargs,
    sampling_argparser,
)
from cm.cli import run_cli


class PointCache:
    """Metrics of each evaluated ts, kept in a JSON file (rank 0 reads and writes it)."""

    def __init__(self, path, settings):
        self.path, self.settings = path, settings
        self.points = {}
        if dist_util.get_rank() == 0 and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("settings") == settings:
                self.points = saved["points"]
            else:
                logger.log(f"{path} was made with other settings; starting the search afresh")

    def get(self, ts):
        return self.points.get(",".join(map(str, ts)))

    def put(self, ts, metrics):
        self.points[",".join(map(str, ts))] = metrics
        atomic_write_text(self.path, json.dumps({"settings": self.settings, "points": self.points}, indent=1))


def make_fid_fn(args, model, diffusion, cache):
    from evaluations.evaluator import evaluate

    def fid_at(ts):
        """FID of samples drawn with `ts`, the same value on every rank."""
        metrics = cache.get(ts) if dist_util.get_rank() == 0 else None
        known = torch.tensor(float(metrics is not None), device=dist_util.dev())
        if not dist_util.broadcast_from_rank0(known).item():
            images, labels = generate_samples(
                diffusion, model, kind=parameterization(args.training_mode), num_samples=args.num_samples,
                batch_size=args.batch_size,
                image_size=args.image_size, sampler="multistep", steps=args.steps, ts=ts, generator=args.generator,
                seed=args.seed, class_cond=args.class_cond, num_classes=args.num_classes, **sample_kwargs(args),
            )
            if dist_util.get_rank() == 0:
                path = os.path.join(logger.get_dir(), f"samples_ts_{'_'.join(map(str, ts))}.npz")
                save_npz(path, *([images] + ([labels] if args.class_cond else [])))
                metrics = evaluate(args.ref_batch, path, features=args.features, inception_path=args.inception_path or None)
                cache.put(ts, metrics)
        fid = torch.tensor(metrics["fid"] if metrics else 0.0, dtype=torch.float64, device=dist_util.dev())
        fid = dist_util.broadcast_from_rank0(fid).item()
        logger.log(f"ts {','.join(map(str, ts))}: FID {fid:.4f}")
        return fid

    return fid_at


def ternary_search(fid_at, before, after):
    """The index p in (before[-1], after[0]) minimising fid_at(before + (p,) + after), assuming FID is
    unimodal in p; each interval loses a third per round, the last two or three points are compared."""
    left, right = before[-1], after[0]

    def fid(p):
        return fid_at(before + (p,) + after)

    while right - left >= 3:
        m1 = int(left + (right - left) / 3.0)
        m2 = int(right - (right - left) / 3.0)
        if fid(m1) < fid(m2):
            right = m2
        else:
            left = m1
        logger.log(f"new interval [{left}, {right}]")
    candidates = list(range(left, right + 1))
    return min(candidates, key=fid)


def main(argv=None):
    args = parse_args_with_config(create_argparser(), argv, "ternary_search.py")
    if not args.ref_batch:
        raise ValueError("pass --ref_batch, the reference .npz to compute FID against")
    before, after = parse_int_list(args.begin, "begin"), parse_int_list(args.end, "end")
    if not before or not after or after[0] - before[-1] < 2:
        raise ValueError(f"--begin {args.begin} and --end {args.end} leave no index between them to search")
    if after[-1] > args.steps - 1:
        raise ValueError(f"--end indices must lie in 0..{args.steps - 1} (--steps {args.steps})")
    dist_util.setup_dist(device=args.device or None)
    logger.configure(args.log_dir or None)
    model, diffusion = load_sampling_model(args)
    settings = {k: str(getattr(args, k)) for k in SAMPLE_SETTINGS + ("ref_batch", "features", "begin", "end")}
    cache = PointCache(os.path.join(logger.get_dir(), "ternary_search.json"), settings)
    fid_at = make_fid_fn(args, model, diffusion, cache)
    best = ternary_search(fid_at, before, after)
    logger.log(f"ternary_search_results: {best}")
    logger.log(f"fid at optimal p = {best} is {fid_at(before + (best,) + after)}")


def create_argparser():
    return sampling_argparser(
        __doc__,
        begin="0",  # grid indices before the searched one (comma-separated)
        end="39",  # grid indices after it
        training_mode="consistency_distillation",
        ref_batch="",  # reference .npz (its precomputed statistics are used when present)
        features="inception",  # feature space of the FID: inception | digits | random
        inception_path="",  # Inception weights file (default: the cache, else a download)
    )


if __name__ == "__main__":
    run_cli(main)
