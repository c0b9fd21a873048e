"""Truncated consistency models (TCM; Lee, Xu, Geffner, Fanti, Kreis, Vahdat, Nie, ICLR 2025): the second stage, as a
wrapper of a consistency method here (CT, iCT, CD, ECT, sCT, sCD) around a stage-1 checkpoint of that method;
--training_mode truncated_<the method's mode>.

Stage 2 trains the truncated range [t', T] only (EDM noise levels, t' = --tcm_transition, T = sigma_max). The network
starts as the stage-1 model (--tcm_stage1), which stays frozen and answers every noise level below t': the two-stage
model of the paper (Sec. 4) is stage 2 at t >= t' and stage 1 below. Per sample:
- the boundary t = t' with probability --tcm_boundary_share, else ln t from a Student-t (location --tcm_log_t_mean,
  scale --tcm_log_t_std, --tcm_log_t_df degrees of freedom) truncated to [ln t', ln T], by inverse CDF of one uniform
  (the published stage-2 law: "tdist t");
- the wrapped method's own rows at that online level (its r(t), its grid pair, its TrigFlow time: level_rows) and its
  own loss, whose targets below t' come from the frozen stage-1 model, so the boundary samples tie stage 2 to stage 1;
- sCT and sCD read no target below t: their boundary samples' loss is the squared distance between the clean-image
  estimates of the network and of the stage-1 model at t' (ours: the discrete boundary loss as r -> t');
- the loss is the non-boundary samples' mean plus --tcm_boundary_weight times the boundary samples' mean (the published
  sum), as per-sample weights 1 / (1 - share) and weight / share (equal in expectation; the published code fixes the
  count of boundary samples per batch, which would need the whole global batch on every process).
Sampled as the wrapped method's models are (the student alone, as published); two steps go through t' or just above
(the published CIFAR-10 and ImageNet-64 presets: 1.0 and 1.526; configs/sample_tcm_*.json).
"""

import copy

import numpy as np
import torch
from scipy import stats

from ..cli import FRACTION, NON_NEGATIVE, POSITIVE
from ..checkpoints import load_model_weights, read_model_state, stored_training_mode
from ..denoiser import network_time
from ..fast_paths import apply_fast_paths
from ..nn import mean_flat
from ..random_util import rng_states, set_rng_states

FLAGS = dict(
    tcm_stage1=("", "the stage-1 checkpoint (a model or EMA file of a run of the wrapped method) stage 2 starts from"),
    tcm_transition=(1.0, "t': stage 2 trains noise levels [t', sigma_max]; below t' the stage-1 model answers"),
    tcm_boundary_share=(0.25, "share of samples at the boundary t = t'"),
    tcm_boundary_weight=(0.1, "w_b: the boundary samples' mean loss counts w_b times"),
    tcm_log_t_mean=(0.0, "ln t ~ Student-t truncated to [ln t', ln sigma_max]: the location"),
    tcm_log_t_std=(0.2, "the Student-t's scale"),
    tcm_log_t_df=(0.01, "the Student-t's degrees of freedom"),
)
RANGES = {"tcm_boundary_share": FRACTION, "tcm_boundary_weight": NON_NEGATIVE, "tcm_log_t_std": POSITIVE,
          "tcm_log_t_df": POSITIVE}


def truncated_log_t(uniforms, mean, std, df, low, high):
    """Noise levels exp(x), x ~ a Student-t (location `mean`, scale `std`, `df` degrees of freedom) truncated to
    [ln low, ln high], by inverting its CDF at `uniforms` in [0, 1) (one level per uniform; float64 arithmetic)."""
    a, b = stats.t.cdf((np.log([low, high]) - mean) / std, df)
    quantiles = a + uniforms.detach().cpu().double().numpy() * (b - a)
    levels = np.exp(stats.t.ppf(quantiles, df) * std + mean).clip(low, high)
    return torch.from_numpy(levels).to(uniforms.device, torch.float32)


class LevelSwitch:
    """The two-stage network: rows whose noise level (read from the network's time input) is below `transition` go
    to `lower` (frozen, without gradient), the others to `upper`; both see the same dropout state, as one network."""

    def __init__(self, lower, upper, transition, c_noise):
        self.lower, self.upper = lower, upper
        self.transition, self.c_noise = transition, c_noise

    def __call__(self, x, timesteps, **kwargs):
        below = timesteps < network_time(torch.tensor(self.transition, dtype=timesteps.dtype), self.c_noise)
        if not below.any():
            return self.upper(x, timesteps, **kwargs)
        state = rng_states(x.device)
        with torch.no_grad():
            out = self.lower(x, timesteps, **kwargs)
        if below.all():
            return out
        set_rng_states(x.device, state)
        upper = self.upper(x, timesteps, **kwargs)
        return torch.where(below.view(-1, *[1] * (x.ndim - 1)), out.to(upper.dtype), upper)


class TruncatedConsistency:
    """Stage 2 of TCM over the consistency method it is mixed into (truncated(): the registered classes)."""

    @classmethod
    def check_flags(cls, args):
        super().check_flags(args)
        if not args.tcm_stage1:
            raise ValueError(f"--training_mode {cls.name} needs --tcm_stage1: a checkpoint of a stage-1 "
                             f"--training_mode {cls.wrapped} run (its model or EMA file)")
        if not 0 < args.tcm_transition < args.sigma_max:
            raise ValueError(f"--tcm_transition must lie in (0, sigma_max = {args.sigma_max}), got {args.tcm_transition}")

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.stage1_path, self.transition = args.tcm_stage1, args.tcm_transition
        self.sigma_max, self.c_noise = diffusion.sigma_max, diffusion.c_noise
        self.share, self.boundary_weight = args.tcm_boundary_share, args.tcm_boundary_weight
        self.log_t = (args.tcm_log_t_mean, args.tcm_log_t_std, args.tcm_log_t_df)
        self.stage1 = None

    def build_networks(self, model, build_teacher=None):
        if build_teacher is not None and not self.needs_teacher:
            raise ValueError(f"--training_mode {self.name} starts from --tcm_stage1 and takes no --teacher_model_path")
        super().build_networks(model, build_teacher)
        state = read_model_state(self.stage1_path)
        mode = stored_training_mode(state)
        if mode not in (None, self.wrapped, self.name):
            raise ValueError(f"--tcm_stage1 {self.stage1_path} was trained as --training_mode {mode}; stage 2 of "
                             f"{self.wrapped} starts from a {self.wrapped} run (or pass --training_mode truncated_{mode})")
        self.stage1 = copy.deepcopy(model)
        load_model_weights(self.stage1, self.stage1_path, state, what="stage-1 checkpoint")
        for net in (model, getattr(self, "target_model", None)):  # the student and its target start as stage 1
            if net is not None:
                net.load_state_dict(self.stage1.state_dict())

    def setup(self, ctx, resumed):
        super().setup(ctx, resumed)
        # frozen; in train mode, its dropout as the target network's (as published and in NVlabs/FastGen)
        self.stage1.requires_grad_(False).train()
        if ctx.precision == "fp16":
            self.stage1.convert_to_fp16()
        apply_fast_paths([self.stage1], **ctx.fast_paths)

    def draw(self, rand, batch, step):
        noise = self.draw_noise(rand, batch)
        boundary = rand.rand() < self.share
        levels = truncated_log_t(rand.rand(), *self.log_t, self.transition, self.sigma_max)
        sigma = torch.where(boundary, torch.full_like(levels, self.transition), levels)
        return {"noise": noise, **self.level_rows(sigma, step), "boundary": boundary}

    def target(self):
        return LevelSwitch(self.stage1, super().target(), self.transition, self.c_noise)

    def losses(self, model, micro, cond, rows, step):
        inner = {k: v for k, v in rows.items() if k != "boundary"}
        out = super().losses(model, micro, cond, inner, step)
        boundary, loss = rows["boundary"], out["loss"]
        if not self.reads_targets and boundary.any():  # no target below t: the boundary's distance itself
            rows_at = boundary.nonzero()[:, 0]
            loss = loss.clone()
            loss[rows_at] = self.boundary_distance(model, micro[rows_at], {k: v[rows_at] for k, v in inner.items()},
                                                   {k: v[rows_at] for k, v in cond.items()}).to(loss.dtype)
        share_weight = self.boundary_weight / self.share if self.share else 0.0
        weight = torch.where(boundary, share_weight, 1 / (1 - self.share))
        return {**out, "loss": weight * loss}

    def boundary_distance(self, model, micro, rows, cond):
        """||f(x_t', t') - f_stage1(x_t', t')||^2 per sample, the mean over the image (same dropout state)."""
        state = rng_states(micro.device)
        estimate = self.denoised(model, micro, rows, cond)
        set_rng_states(micro.device, state)
        with torch.no_grad():
            reference = self.denoised(self.stage1, micro, rows, cond)
        return mean_flat((estimate - reference.to(estimate.dtype)) ** 2)


def runs_teacher(inner):
    """Whether stage 2 of `inner` needs --teacher_model_path: when its loss runs the teacher (CD, sCD), not when the
    teacher only started stage 1 (ECT)."""
    return getattr(inner, "runs_teacher", inner.needs_teacher)


def truncated(inner):
    """The registered stage-2 class of consistency method `inner` (which offers the level hooks, cm/methods/base.py)."""
    return type(f"Truncated{inner.__name__}", (TruncatedConsistency, inner), dict(
        name=f"truncated_{inner.name}", wrapped=inner.name, reads_targets=hasattr(inner, "target"),
        flags={**inner.flags, **FLAGS}, flag_ranges={**inner.flag_ranges, **RANGES}, needs_teacher=runs_teacher(inner),
        __doc__=f"TCM's stage 2 of --training_mode {inner.name} (cm/methods/tcm.py)."))
