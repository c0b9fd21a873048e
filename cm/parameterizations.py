"""The time parameterisations a model is trained and sampled in, as objects: sampling, editing, the checkpoint
checks and the converters ask the one a method declares (cm/methods: `parameterization`) instead of comparing
names of time variables.

- `denoiser`: EDM's noise level sigma and a denoiser D(x, sigma) without the boundary scalings (cm.denoiser);
  sampled by integrating its ODE or SDE (heun, euler, dpm, ancestral) or progressive distillation's sampler.
- `consistency`: sigma with the consistency boundary scalings, f(x, sigma_min) = x (CM paper, eq. 3); one step,
  or multistep on the Karras grid at --ts (CM paper, Algorithm 1), or through the noise levels --t_mid.
- `trigflow`: TrigFlow time t (cm.trigflow; sCM, Lu & Song 2025); one step, or multistep at the times --t_mid.
- `flow_map`: the linear flow path z_t = (1 - t) x + t e and a flow map u(z_t, r, t) (cm.flowmap; Mean Flows); one
  jump from t = 1 to 0, or jumps through the times --t_mid (0.5 when not given: ours, one jump to the middle).

A new one is one subclass here and one entry of PARAMETERIZATIONS.
"""

import math

from .flowmap import FlowMap, FlowMapSigmaView, sample_flow_map
from .samplers import karras_sample
from .trigflow import SigmaView, TrigFlowDenoiser, sample_trigflow


def parse_int_list(text, flag):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated integers, got {text!r}") from None


def check_grid_indices(ts, steps):
    """--ts: at least two strictly increasing indices of the --steps-point Karras grid."""
    if len(ts) < 2 or any(not 0 <= t < steps for t in ts) or list(ts) != sorted(set(ts)):
        raise ValueError(f"--ts must be two or more increasing grid indices in 0..{steps - 1} (--steps {steps}), "
                         f"e.g. 0,{steps // 2},{steps - 1}; got {','.join(map(str, ts)) or 'none'}")


def parse_times(text, end, interval):
    """The decreasing times of --t_mid, each in (0, end); () for an empty text."""
    try:
        times = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--t_mid must be comma-separated numbers, got {text!r}") from None
    if any(not 0 < t < end for t in times) or list(times) != sorted(times, reverse=True):
        raise ValueError(f"--t_mid must be decreasing times in {interval}; got {text!r}")
    return times


class Parameterization:
    """What a model's time variable decides outside training. Subclasses set the attributes and the methods."""

    name = ""
    description = ""  # what such a model is, for messages
    samplers = ()  # the --sampler values it is sampled with, the default first
    boundary_condition = False  # sampled with the consistency scalings (create_model_and_diffusion's distillation)
    stored_flags = ()  # flags a checkpoint must agree on beyond cm.checkpoints.UNSEEN_FLAGS
    t_mid_default = ()  # the intermediate times of its few-step samples when none are given (one-step kinds)

    def check_sampler(self, sampler, training_mode):
        if sampler not in self.samplers:
            raise ValueError(f"--sampler {sampler} does not sample --training_mode {training_mode}: its models are "
                             f"{self.description}")

    def sampler_steps(self, args):
        """The checked settings of --sampler's steps besides --steps: {"ts": grid indices, "t_mid": times}."""
        return {"ts": None, "t_mid": ()}

    def sampling_denoiser(self, diffusion, args):
        """The object the samplers call denoise() on, from the network's KarrasDenoiser and the flags."""
        return diffusion

    def editing_denoiser(self, denoiser, args):
        """The denoiser as the editing loops of cm/editing.py see it: in EDM's noise levels."""
        return denoiser

    def sample(self, denoiser, model, shape, generator, *, sampler, steps, ts, t_mid, model_kwargs, device, **sample_kwargs):
        raise NotImplementedError


class KarrasSigma(Parameterization):
    def __init__(self, name, description, samplers, boundary_condition, t_mid_default=()):
        self.name, self.description, self.samplers = name, description, samplers
        self.boundary_condition, self.t_mid_default = boundary_condition, t_mid_default

    def sampler_steps(self, args):
        if args.sampler != "multistep":
            return super().sampler_steps(args)
        if args.t_mid:  # the noise levels themselves (TCM's and ECT's two steps go through a sigma, not a grid index)
            if args.ts:
                raise ValueError("pass --ts (grid indices) or --t_mid (noise levels), not both")
            return {"ts": None, "t_mid": parse_times(args.t_mid, args.sigma_max, f"(0, sigma_max = {args.sigma_max})")}
        ts = parse_int_list(args.ts, "ts")
        check_grid_indices(ts, args.steps)
        return {"ts": ts, "t_mid": ()}

    def sample(self, denoiser, model, shape, generator, *, sampler, steps, ts, t_mid, model_kwargs, device, **sample_kwargs):
        return karras_sample(denoiser, model, shape, steps=steps, model_kwargs=model_kwargs, device=device,
                             sampler=sampler, generator=generator, ts=ts, t_mid=t_mid, **sample_kwargs)


class JumpsInTime(Parameterization):
    """Models sampled in one step from the largest time, and with --sampler multistep once more at each time of
    --t_mid (decreasing, in (0, t_end); empty: t_mid_default) by `sampler`."""

    samplers = ("onestep", "multistep")
    t_end, t_interval, t_mid_default = None, "", ()
    sampler = None  # staticmethod(f): f(denoiser, model, shape, generator, ts=, model_kwargs=, device=, clip_denoised=)

    def sampler_steps(self, args):
        if args.sampler != "multistep":
            return super().sampler_steps(args)
        return {"ts": None, "t_mid": parse_times(args.t_mid, self.t_end, self.t_interval) or self.t_mid_default}

    def sample(self, denoiser, model, shape, generator, *, sampler, steps, ts, t_mid, model_kwargs, device, **sample_kwargs):
        return self.sampler(denoiser, model, shape, generator, ts=t_mid, model_kwargs=model_kwargs, device=device,
                            clip_denoised=sample_kwargs["clip_denoised"])


class TrigFlow(JumpsInTime):
    name = "trigflow"
    description = "an sCM TrigFlow model F(x, t), sampled with onestep or multistep"
    stored_flags = ("time_input",)
    t_end, t_interval, t_mid_default = math.pi / 2, "(0, pi/2)", (1.1,)  # (the paper's ImageNet-64 two-step: 1.1)
    sampler = staticmethod(sample_trigflow)

    def sampling_denoiser(self, diffusion, args):
        # f = cos(t) x - sin(t) sigma_d F, from the network's own sigma_data, sigma_max and c_noise
        return TrigFlowDenoiser(diffusion.sigma_data, args.time_input, diffusion.sigma_max, diffusion.c_noise)

    def editing_denoiser(self, denoiser, args):
        return SigmaView(denoiser, args.sigma_min)  # (rho 7, the grid of --ts)


class LinearFlowMap(JumpsInTime):
    name = "flow_map"
    description = "a flow map u(z_t, r, t) on the linear path z_t = (1 - t) x + t e, sampled with onestep or multistep"
    t_end, t_interval, t_mid_default = 1.0, "(0, 1)", (0.5,)  # (ours: one jump to the middle of the path)
    sampler = staticmethod(sample_flow_map)

    def sampling_denoiser(self, diffusion, args):
        return FlowMap()

    def editing_denoiser(self, denoiser, args):
        return FlowMapSigmaView(denoiser)  # (rho 7, the grid of --ts)


DENOISER = KarrasSigma("denoiser", "an EDM-style denoiser D(x, sigma), sampled with heun, euler, dpm, ancestral or progdist",
                       ("heun", "euler", "dpm", "ancestral", "progdist"), boundary_condition=False)
CONSISTENCY = KarrasSigma("consistency", "a consistency model f(x, sigma) with the boundary condition, sampled with "
                          "onestep or multistep", ("onestep", "multistep"), boundary_condition=True,
                          t_mid_default=(0.821,))  # (iCT's and ECT's CIFAR-10 two-step level; evaluation only: the
                          # sampling script's multistep takes --ts or --t_mid)
TRIGFLOW = TrigFlow()
FLOW_MAP = LinearFlowMap()
PARAMETERIZATIONS = {p.name: p for p in (DENOISER, CONSISTENCY, TRIGFLOW, FLOW_MAP)}
