"""Continuous-time consistency training and distillation (sCT, sCD; Lu & Song, ICLR 2025, Algorithm 1) on
TrigFlow (cm/trigflow.py).

Per sample: t = arctan(exp(P_mean + P_std n) / sigma_d), x_t = cos(t) x_0 + sin(t) z with z ~ N(0, sigma_d^2 I);
dx_t/dt = cos(t) z - sin(t) x_0 (sCT) or sigma_d F_teacher(x_t / sigma_d, t) (sCD); F^- and dF^-/dt, the online
network under stop-gradient with the same dropout mask (no EMA target), from one JVP along (dx_t/dt, 1)
(cm/jvp.py); the tangent
    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),
r warmed up linearly from 0 to 1 over --tangent_warmup_steps, normalised g / (||g|| + c); the loss
    e^{-w(t)} / D ||F_theta - F^- - g||^2 + w(t),
where F^- in the residual is sg(F_theta) of the trained pass itself (zero in value under bf16 autocast too,
so the gradient is exactly -2 e^{-w} g dF_theta / D) and g uses the JVP's float32 F^-;
w(t) a small learned head (adaptive weighting; D the numbers per image), or w(t) = -ln(prior weight) fixed.
The teacher of sCD is class-conditional and has no unconditional mode (none of the published EDM checkpoints
has one), so there is no classifier-free guidance.
"""

import torch
import torch.nn as nn

from .. import logger
from ..checkpoints import CheckpointIO, Saved
from ..denoiser import network_time
from ..nn import append_dims, mean_flat, timestep_embedding
from ..parameterizations import TRIGFLOW
from ..random_util import rng_states, set_rng_states
from ..jvp import network_jvp
from ..trigflow import TrigFlowDenoiser, diffuse, lognormal_t, sigma_of_t, t_of_sigma
from ..cli import NON_NEGATIVE
from .base import JVP_FLAGS, JVP_RANGES, LOGNORMAL_FLAGS, LOGNORMAL_RANGES, TrainingMethod, check_jvp_flags, start_from_teacher

WEIGHTINGS = ("adaptive", "prior")


class AdaptiveWeight(nn.Module):
    """w_phi(t): a linear head on sinusoidal features of EDM's time input 250 ln(sigma_d tan t); zero at start."""

    def __init__(self, channels=128, sigma_data=0.5):
        super().__init__()
        self.channels, self.sigma_data = channels, sigma_data
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t):
        features = timestep_embedding(network_time(sigma_of_t(t.float(), self.sigma_data)), self.channels)
        return self.linear(features)[:, 0]


def prior_log_weight(t, sigma_data):
    """-ln of the prior weighting 1 / (sigma_d tan t) (sCM, Sec. 4.2), as the fixed w(t)."""
    return torch.log(sigma_data * torch.tan(t))


class ContinuousConsistencyTraining(TrainingMethod):
    name = "continuous_consistency_training"
    parameterization = TRIGFLOW
    boundary_condition = False  # TrigFlow's f(x, 0) = x holds by construction
    # the paper's ImageNet-64 settings for a network trained as TrigFlow: identity time input, adaptive double
    # normalisation (with the scale-shift conditioning), lognormal (-1.0, 1.6); warmup 10k steps, c = 0.1 are the
    # flags' own defaults
    flags = dict(
        **LOGNORMAL_FLAGS,
        time_input=("edm", "the network's time input: edm (250 ln(sigma_d tan t), an EDM network's own) | identity (t)"),
        tangent_warmup_steps=(10000, "r of the tangent rises linearly from 0 to 1 over this many steps"),
        p_truncate=(False, "the lognormal noise levels truncated to [sigma_min, sigma_max] (as FastGen draws them)"),
        tangent_norm_c=(0.1, "tangent normalisation g / (||g|| + c)"),
        **JVP_FLAGS,
        scm_weighting=("adaptive", "the loss weighting: adaptive (learned w(t)) | prior (1 / (sigma_d tan t))"),
    )
    flag_ranges = {**LOGNORMAL_RANGES, **JVP_RANGES, "tangent_warmup_steps": NON_NEGATIVE, "tangent_norm_c": NON_NEGATIVE}
    flag_defaults = dict(time_input="identity", double_norm=True, use_scale_shift_norm=True, p_mean=-1.0, p_std=1.6)

    @classmethod
    def check_flags(cls, args):
        super().check_flags(args)
        check_jvp_flags(cls.name, args)
        if args.scm_weighting not in WEIGHTINGS:
            raise ValueError(f"unknown --scm_weighting {args.scm_weighting!r}; choose one of {', '.join(WEIGHTINGS)}")

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.trigflow = TrigFlowDenoiser(diffusion.sigma_data, args.time_input, diffusion.sigma_max, diffusion.c_noise)
        self.p_mean, self.p_std = args.p_mean, args.p_std
        self.sigma_bounds = (diffusion.sigma_min, diffusion.sigma_max) if args.p_truncate else None
        self.warmup_steps = args.tangent_warmup_steps
        self.norm_c = args.tangent_norm_c
        self.jvp, self.jvp_eps = args.jvp, args.jvp_eps
        self.weighting = args.scm_weighting
        self.teacher_model = None
        self.weight_head = None

    def build_networks(self, model, build_teacher=None):
        if build_teacher is not None:
            teacher, _ = start_from_teacher(model, build_teacher)
            if self.needs_teacher:
                self.teacher_model = teacher.eval().requires_grad_(False)
        if self.weighting == "adaptive":
            device = next(model.parameters()).device
            self.weight_head = AdaptiveWeight(sigma_data=self.trigflow.sigma_data).to(device)

    def trainables(self):
        # w(t) learns with the network (one optimizer, schedule, clipping and precision), as FastGen's logvar head
        return {"scm_weight": self.weight_head} if self.weight_head is not None else {}

    def tangent_r(self, step):
        return min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0

    def draw_noise(self, rand, batch):
        return rand.randn(*batch.shape[1:]) * self.trigflow.sigma_data

    def draw(self, rand, batch, step):
        z = self.draw_noise(rand, batch)
        t = lognormal_t(rand.randn(), self.p_mean, self.p_std, self.trigflow.sigma_data, self.sigma_bounds)
        return {"noise": z, "t": t}

    def level_rows(self, sigma, step):
        """The TrigFlow time of EDM noise level sigma."""
        return {"t": t_of_sigma(sigma, self.trigflow.sigma_data)}

    def denoised(self, model, micro, rows, cond):
        """The model's clean-image estimate f(x_t, t) = cos(t) x_t - sin(t) sigma_d F at the rows' x_t and t."""
        t = rows["t"].to(micro.dtype)
        return self.trigflow.denoise(model, diffuse(micro, rows["noise"], t), t, **cond)[1]

    def dx_dt(self, x_t, x0, z, t, cond):
        """sCT: the exact dx_t/dt of this sample's trajectory, cos(t) z - sin(t) x_0."""
        t = append_dims(t, x0.ndim)
        return torch.cos(t) * z - torch.sin(t) * x0

    def losses(self, model, micro, cond, rows, step):
        sd = self.trigflow.sigma_data
        z, t = rows["noise"], rows["t"].to(micro.dtype)
        tt = append_dims(t, micro.ndim)
        x_t = diffuse(micro, z, t)
        dx_dt = self.dx_dt(x_t, micro, z, t, cond)
        net = getattr(model, "module", model)  # the stop-gradient passes need no DDP

        def network(x, s):
            return self.trigflow.network(net, x, s, **cond)

        dropout_state = rng_states(micro.device)
        F_minus, dF_dt = network_jvp(network, x_t, t, dx_dt, self.jvp, self.jvp_eps)
        r = self.tangent_r(step)
        g = -torch.cos(tt) ** 2 * (sd * F_minus - dx_dt) - r * torch.cos(tt) * torch.sin(tt) * (x_t + sd * dF_dt)
        g_norm = g.flatten(1).norm(dim=1)
        g = g / (append_dims(g_norm, g.ndim) + self.norm_c)
        set_rng_states(micro.device, dropout_state)
        F_theta = self.trigflow.network(model, x_t, t, **cond).to(g.dtype)  # g in float32 (float64 in tests)
        # the residual against F^- = sg(F_theta) of this very pass, exactly zero whatever the precision: the JVP's
        # float32 primal differs from a bf16 F_theta by more than g's entries, and would bias the gradient
        mse = mean_flat((F_theta - F_theta.detach() - g) ** 2)
        with torch.autocast(micro.device.type, enabled=False):
            w = self.weight_head(t) if self.weight_head is not None else prior_log_weight(t, sd)
        return {"loss": torch.exp(-w) * mse + w, "mse": mse, "tangent_norm": g_norm, "log_weight": w}

    def log_values(self, step):
        return {"tangent_r": self.tangent_r(step)}

    def saved(self, ctx):
        if self.weight_head is None:
            return {}
        return {"scm_weight": Saved(
            state=lambda: {"head": self.weight_head.state_dict()},  # (its optimizer state is in the loop's opt file)
            load=lambda path: self.weight_head.load_state_dict(CheckpointIO.load(path, map_location=ctx.device)["head"]),
            # a run that used the prior weighting until now
            missing=lambda path: logger.log(f"no scm_weight{ctx.step:06d}.pt beside {path}: the adaptive weight w(t) "
                                            "starts at 0"))}


class ContinuousConsistencyDistillation(ContinuousConsistencyTraining):
    name = "continuous_consistency_distillation"
    needs_teacher = True
    # from an EDM teacher: its own time input (250 ln sigma) and architecture (so published checkpoints distil)
    flag_defaults = dict(time_input="edm", double_norm=False, p_mean=-1.0, p_std=1.6)

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.teacher_trigflow = TrigFlowDenoiser(diffusion.sigma_data, "edm", diffusion.sigma_max, diffusion.c_noise)

    def dx_dt(self, x_t, x0, z, t, cond):
        """sCD: the teacher's ODE direction sigma_d F_teacher(x_t / sigma_d, t), without gradient."""
        with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
            return self.trigflow.sigma_data * self.teacher_trigflow.network(self.teacher_model, x_t, t, **cond)

