"""Samplers: pure functions over (denoiser, x, sigmas, generator), with a progress bar and a callback.

`denoiser(x, sigma_batch)` returns the model's estimate of the clean image (a diffusion model's
D(x, sigma) or a consistency model's f(x, sigma)). The ODE samplers follow Karras et al. (2022,
Algorithm 2) and k-diffusion; `sample_onestep` and `stochastic_iterative_sampler` are the CM
paper's Algorithm 1.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from .nn import append_dims
from .random_util import get_generator
from .schedule import get_sigmas_karras, index_to_sigma


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to):
    """Split a step sigma_from -> sigma_to into a deterministic step to sigma_down and fresh noise sigma_up."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _steps(n, progress, desc):
    return tqdm(range(n), desc=desc, leave=False) if progress else range(n)


def _churned_derivative(denoiser, x, sigmas, i, generator, churn, callback):
    """Karras Algorithm 2 lines 4-7: raise sigma_i to sigma_hat = sigma_i (1 + gamma) with fresh noise
    (gamma > 0 only inside [s_tmin, s_tmax]), then evaluate the ODE derivative there.
    Noise is drawn every step, as published, so the random stream does not depend on gamma."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = generator.randn_like(x) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    denoised = denoiser(x, sigma_hat * x.new_ones([x.shape[0]]))
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
    return x, sigma_hat, to_d(x, sigma_hat, denoised)


@torch.no_grad()
def sample_heun(
    denoiser,
    x,
    sigmas,
    generator,
    progress=False,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """Heun's second-order method with optional churn (Karras et al. 2022, Algorithm 2)."""
    s_in = x.new_ones([x.shape[0]])
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    for i in _steps(len(sigmas) - 1, progress, "heun"):
        x, sigma_hat, d = _churned_derivative(denoiser, x, sigmas, i, generator, churn, callback)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt  # Euler step into sigma = 0
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, generator, progress=False, callback=None):
    """Euler's first-order method on the probability-flow ODE."""
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(sigmas) - 1, progress, "euler"):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm(
    denoiser,
    x,
    sigmas,
    generator,
    progress=False,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """DPM-Solver-2-like midpoint method, the midpoint on a rho = 3 Karras schedule, with churn."""
    s_in = x.new_ones([x.shape[0]])
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    for i in _steps(len(sigmas) - 1, progress, "dpm"):
        x, sigma_hat, d = _churned_derivative(denoiser, x, sigmas, i, generator, churn, callback)
        sigma_mid = ((sigma_hat ** (1 / 3) + sigmas[i + 1] ** (1 / 3)) / 2) ** 3
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in))
        x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, generator, progress=False, callback=None):
    """Ancestral sampling with Euler steps."""
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(sigmas) - 1, progress, "ancestral"):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        x = x + generator.randn_like(x) * sigma_up
    return x


@torch.no_grad()
def sample_onestep(distiller, x, sigmas, generator=None, progress=False, callback=None):
    """One-step generation x_0 = f(x_T, sigma_max) (CM paper, Algorithm 1 with N = 1)."""
    s_in = x.new_ones([x.shape[0]])
    out = distiller(x, sigmas[0] * s_in)
    if callback is not None:
        callback({"x": x, "i": 0, "sigma": sigmas[0], "denoised": out})
    return out


def multistep_consistency_loop(
    distiller,
    x,
    ts,
    generator,
    t_min=0.002,
    t_max=80.0,
    rho=7.0,
    steps=40,
    project=None,
    progress=False,
    callback=None,
    levels=None,
):
    """CM paper Algorithm 1 (multistep consistency sampling) over the index list `ts` of a
    `steps`-point Karras grid (or over the noise levels `levels` themselves, decreasing, the last one only
    the final noise); also the loop of Algorithm 4 (zero-shot editing), where `project(x0)` replaces the
    known part of each clean estimate.

    Each step: x0 = f(x, t_i); optionally x0 = project(x0);
    x = x0 + sqrt(t_{i+1}^2 - t_min^2) * z. The last index's t only sets the final noise level.
    """
    if levels is None:
        if ts is None or len(ts) < 2:
            raise ValueError("multistep sampling needs --ts with at least two indices, e.g. --ts 0,22,39")
        if any(not 0 <= t <= steps - 1 for t in ts):
            raise ValueError(f"--ts indices must lie in 0..{steps - 1} (steps={steps}), got {list(ts)}")
        levels = [index_to_sigma(t, steps, t_min, t_max, rho) for t in ts]
    if generator is None:
        generator = get_generator("dummy")
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(levels) - 1, progress, "multistep"):
        t = levels[i]
        x0 = distiller(x, t * s_in)
        if project is not None:
            x0 = project(x0)
        next_t = np.clip(levels[i + 1], t_min, t_max)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": t, "denoised": x0})
        x = x0 + generator.randn_like(x) * np.sqrt(next_t**2 - t_min**2)
    return x


@torch.no_grad()
def stochastic_iterative_sampler(
    distiller,
    x,
    sigmas,
    generator,
    ts,
    progress=False,
    callback=None,
    t_min=0.002,
    t_max=80.0,
    rho=7.0,
    steps=40,
    levels=None,
):
    """Multistep consistency sampling (CM paper, Algorithm 1) at the grid indices `ts` (or the noise levels
    `levels`)."""
    return multistep_consistency_loop(
        distiller, x, ts, generator, t_min, t_max, rho, steps, progress=progress, callback=callback, levels=levels
    )


@torch.no_grad()
def sample_progdist(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """Euler steps over sigmas without its trailing zero (progressive-distillation students)."""
    sigmas = sigmas[:-1]
    return sample_euler(denoiser, x, sigmas, generator, progress=progress, callback=callback)


SAMPLERS = {
    "heun": sample_heun,
    "dpm": sample_dpm,
    "ancestral": sample_euler_ancestral,
    "onestep": sample_onestep,
    "progdist": sample_progdist,
    "euler": sample_euler,
    "multistep": stochastic_iterative_sampler,
}


def karras_sample(
    diffusion,
    model,
    shape,
    steps,
    clip_denoised=True,
    progress=False,
    callback=None,
    model_kwargs=None,
    device=None,
    sigma_min=0.002,
    sigma_max=80,
    rho=7.0,
    sampler="heun",
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    generator=None,
    ts=None,
    t_mid=(),
):
    """Draw x_T = sigma_max * z from `generator` and run `sampler` with `diffusion`'s preconditioned
    `model`; returns samples clamped to [-1, 1]. Multistep goes through the grid indices `ts`, or (given) the
    noise levels `t_mid` between sigma_max and sigma_min."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if generator is None:
        generator = get_generator("dummy")
    if model_kwargs is None:
        model_kwargs = {}
    if device is None:
        device = next(model.parameters()).device

    n = steps + 1 if sampler == "progdist" else steps
    sigmas = get_sigmas_karras(n, sigma_min, sigma_max, rho, device=device)
    x_T = generator.randn(*shape, device=device) * sigma_max

    if sampler in ("heun", "dpm"):
        sampler_args = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    elif sampler == "multistep":
        # the consistency grid uses the diffusion's rho, as published
        sampler_args = dict(ts=ts, t_min=sigma_min, t_max=sigma_max, rho=diffusion.rho, steps=steps,
                            levels=(sigma_max, *t_mid, sigma_min) if t_mid else None)
    else:
        sampler_args = {}

    def denoiser(x_t, sigma):
        _, denoised = diffusion.denoise(model, x_t, sigma, **model_kwargs)
        return denoised.clamp(-1, 1) if clip_denoised else denoised

    x_0 = SAMPLERS[sampler](denoiser, x_T, sigmas, generator, progress=progress, callback=callback, **sampler_args)
    return x_0.clamp(-1, 1)
