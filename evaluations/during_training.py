"""Evaluation during training (--eval_interval N): every N steps, and at the last step, each chosen sampling EMA
(--eval_ema) draws --eval_samples images with the same seeds every time, once per --eval_steps count, sharded over
the processes exactly as scripts/image_sample.py draws them; rank 0 measures them against --eval_ref with the
evaluator (evaluations/evaluator.py) and the training loop logs the metrics as columns METRIC_NSTEP_LABEL of
progress.csv (and the log backends), e.g. fid_1step_ema0.9999, precision_2step_ema0.9999, fd_dinov2_1step_model.

The images are those of `image_sample.py --model_path ema_RATE_STEP.pt --seed 42 --generator determ --num_samples K
--batch_size B` with the evaluation's sampler settings, so the evaluator run by hand on them gives the same numbers.
Samples: one step and multistep through the first count - 1 times of --eval_t_mid (default: the parameterization's
t_mid_default) for one-step models (consistency, sCM, flow maps); the method's sampler (EDM: Heun; progressive
distillation: its own) at `count` steps for denoisers. The loop runs this with its random streams forked, in
separately built networks: the run itself is the same with evaluation on or off (tests/test_eval_training.py).
"""

import os
import time

from cm import dist_util, logger
from cm.image_datasets import digits_reference_sets
from cm.image_io import save_grid
from cm.parameterizations import parse_int_list
from cm.plots import ema_label, eval_column
from cm.sample_util import (NonFiniteSamples, build_sampling_model, check_sampling_args, generate_samples,
                            latent_decoding, sample_kwargs, sampling_argparser)
from evaluations.evaluator import Evaluator
from evaluations.feature_extractors import FEATURES

EVAL_SEED = 42  # the sampling script's default seed: the same images at every evaluation
DENOISER_STEPS = (18,)  # a denoiser's default --eval_steps: EDM's Heun steps for CIFAR-10 (35 network evaluations)
RENAMED = {"dinov2": {"fid": "fd_dinov2"}}  # the Frechet distance's name in other features than Inception's
GRID_IMAGES = 64  # images of each evaluation's sample grid (RUN/eval/LABEL_NSTEP_STEP.png)


def training_evaluation(args, method_cls):
    """The evaluation of a run (TrainingEvaluation), its flags checked in one line each; None with --eval_interval 0."""
    if args.eval_interval < 0:
        raise ValueError(f"--eval_interval must be 0 (no evaluation) or a number of steps, got {args.eval_interval}")
    if args.eval_interval == 0:
        return None
    return TrainingEvaluation(args, method_cls)


class TrainingEvaluation:
    """What the training loop asks: due(step, last) and run(step, weights) (cm.train_util)."""

    def __init__(self, args, method_cls):
        self.interval = args.eval_interval
        self.features, self.features_path = args.eval_features, args.eval_features_path or None
        if self.features not in FEATURES:
            raise ValueError(f"unknown --eval_features {self.features}; choose one of {', '.join(FEATURES)}")
        self.ref = args.eval_ref
        if not self.ref:
            raise ValueError("--eval_interval needs --eval_ref: a reference batch .npz (images, or the published "
                             "batches' Inception statistics), an EDM2 reference .pkl, or digits (the embedded digits)")
        if self.ref != "digits" and not os.path.isfile(self.ref):
            raise ValueError(f"--eval_ref {self.ref}: no such file (a reference batch .npz, an EDM2 .pkl, or digits)")
        if args.eval_samples < 4:
            raise ValueError(f"--eval_samples must be at least 4 (precision and recall use 3 neighbours), got "
                             f"{args.eval_samples}")
        if args.eval_batch_size < 0:
            raise ValueError(f"--eval_batch_size must be 0 (the training batch) or positive, got {args.eval_batch_size}")
        self.num_samples, self.batch_size = args.eval_samples, args.eval_batch_size
        self.labels = evaluated_labels(args.eval_ema, args.ema_rate)
        self.kind = method_cls.parameterization
        self.args, self.method_cls = args, method_cls  # (read again by prepare(), once the precision is resolved)
        self.sampling = {count: self._sampling_args(args, method_cls, count) for count in self._counts(args)}
        self.evaluator = self.reference = None

    def _counts(self, args):
        counts = parse_int_list(args.eval_steps, "eval_steps")
        if any(c < 1 for c in counts) or len(set(counts)) != len(counts):
            raise ValueError(f"--eval_steps must be distinct positive step counts, e.g. 1,2; got {args.eval_steps!r}")
        return counts or ((1, 2) if "onestep" in self.kind.samplers else DENOISER_STEPS)

    def _sampling_args(self, args, method_cls, count):
        """image_sample.py's flags for the `count`-step samples (checked as that script checks them)."""
        ns = sampling_argparser("").parse_args([])
        for key, value in vars(args).items():
            if hasattr(ns, key):
                setattr(ns, key, value)
        ns.training_mode, ns.model_path, ns.compile, ns.ts, ns.class_labels = method_cls.name, "", False, "", ""
        ns.generator, ns.seed, ns.num_samples, ns.clip_denoised = "determ", EVAL_SEED, self.num_samples, True
        ns.batch_size = self.batch_size or 1  # (0 until prepare() knows the training batch)
        if "onestep" not in self.kind.samplers:
            ns.sampler, ns.steps = method_cls.sampler or self.kind.samplers[0], count
        elif count == 1:
            ns.sampler = "onestep"
        else:
            times = [t for t in args.eval_t_mid.split(",") if t.strip()] or [str(t) for t in self.kind.t_mid_default]
            if len(times) < count - 1:
                raise ValueError(f"--eval_steps {count} needs {count - 1} intermediate times in --eval_t_mid (decreasing), "
                                 f"got {args.eval_t_mid or 'none'}")
            ns.sampler, ns.t_mid = "multistep", ",".join(times[: count - 1])
        try:
            ns.sampled_with = check_sampling_args(ns)[0]
        except ValueError as err:
            raise ValueError(f"--eval_steps {count}: {err}".replace("--t_mid", "--eval_t_mid")) from None
        return ns

    def prepare(self, batch_size):
        """Once the processes are up and the run folder open: the per-process sampling batch (0: `batch_size`), the
        latent decoder (every rank) and, on rank 0, the feature network and the reference's statistics (cached
        beside the reference file), so that a missing weight file or a bad reference stops the run before training."""
        self.batch_size = self.batch_size or batch_size
        self.sampling = {count: self._sampling_args(self.args, self.method_cls, count) for count in self.sampling}
        first = next(iter(self.sampling.values()))
        self.latent = latent_decoding(first)
        if dist_util.get_rank() != 0:
            return
        folder = os.path.join(logger.get_dir(), "eval")  # (the sample grids' folder; the digits reference's)
        os.makedirs(folder, exist_ok=True)
        ref = digits_reference_sets(folder)[0] if self.ref == "digits" else self.ref
        # (a progress bar while the reference's features are computed the first time: 50,000 images take minutes)
        self.evaluator = Evaluator(self.features, device=dist_util.dev(), progress=self.args.progress,
                                   inception_path=self.features_path, dinov2_path=self.features_path)
        self.reference = self.evaluator.read_reference(ref)
        logger.log(f"evaluation every {self.interval} steps: {self.num_samples} samples of {', '.join(self.labels)} "
                   f"at {', '.join(map(str, self.sampling))} steps against {self.ref} ({self.features} features)")

    def due(self, step, last):
        return step > 0 and (step % self.interval == 0 or last)

    def run(self, step, weights):
        """The metrics at `step` of the networks `weights` ({label: () -> state dict}, e.g. "ema0.9999"), as
        {column: value} on rank 0 ({} elsewhere); writes each sample grid to RUN/eval/ and the log backends."""
        start, row = time.time(), {}
        for label in self.labels:
            # (one network for every count: the counts' flags differ in the sampler's only)
            model, denoiser = build_sampling_model(next(iter(self.sampling.values())), weights[label](),
                                                   f"the {label} weights at step {step}")
            for count, ns in self.sampling.items():
                try:
                    images, classes = generate_samples(
                        denoiser, model, kind=self.kind, num_samples=self.num_samples, batch_size=ns.batch_size,
                        image_size=ns.image_size, sampler=ns.sampler, steps=ns.steps, ts=ns.sampled_with["ts"],
                        t_mid=ns.sampled_with["t_mid"], generator=ns.generator, seed=ns.seed, class_cond=ns.class_cond,
                        num_classes=ns.num_classes, progress=self.args.progress, **sample_kwargs(ns), **self.latent)
                except NonFiniteSamples:
                    logger.log(f"evaluation at step {step}: the {label} network's {count}-step samples hold inf/NaN")
                    images = classes = None
                if dist_util.get_rank() == 0:
                    row.update(self._measure(step, count, label, images, classes))
            del model, denoiser
        if dist_util.get_rank() != 0:
            return {}
        row["eval_seconds"] = time.time() - start
        logger.log(f"evaluation at step {step} ({row['eval_seconds']:.1f} s): "
                   + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "eval_seconds"))
        return row

    def _measure(self, step, count, label, images, classes):
        """{column: value} of one batch of `count`-step samples of `label` (the Frechet distance NaN when they could
        not be drawn)."""
        renamed = RENAMED.get(self.features, {})
        if images is None:
            return {eval_column(renamed.get("fid", "fid"), count, label): float("nan")}
        name = f"{count}step_{label}"
        grid = save_grid(images[:GRID_IMAGES], os.path.join(logger.get_dir(), "eval", f"{name}_{step:06d}.png"))
        logger.log_image(f"samples/{name}", grid, step)
        metrics = self.evaluator.evaluate_images(self.reference, images, classes)
        return {eval_column(renamed.get(k, k), count, label): float(v) for k, v in metrics.items() if v is not None}


def evaluated_labels(eval_ema, ema_rate):
    """The networks --eval_ema names ("ema" + a rate of --ema_rate, "model" for the trained weights), or every rate."""
    def label(text):
        try:
            return ema_label(text)
        except ValueError:
            return text.strip()

    rates = [label(r) for r in str(ema_rate).split(",") if r.strip()]
    chosen = [label(r) for r in str(eval_ema).split(",") if r.strip()] or rates
    unknown = [c for c in chosen if c != "model" and c not in rates]
    if unknown:
        raise ValueError(f"--eval_ema {','.join(c.removeprefix('ema') for c in unknown)} is not a rate of --ema_rate "
                         f"{ema_rate} (or model, the trained weights)")
    return list(dict.fromkeys(chosen))

