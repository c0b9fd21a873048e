"""Noise levels and training curricula.

The Karras et al. (2022) rho interpolation lives here once; the losses, the samplers and the
editing loops all reach noise levels through `karras_sigma` / `index_to_sigma`.
"""

import math

import numpy as np
import torch

from .nn import append_zero


def karras_sigma(fraction, sigma_min, sigma_max, rho=7.0):
    """sigma at `fraction` in [0, 1] along the Karras schedule (EDM eq. 5; CM paper eq. in Sec. 5):
    (sigma_max^(1/rho) + fraction * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    fraction 0 gives sigma_max, 1 gives sigma_min; works on floats, arrays and tensors."""
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + fraction * (min_inv_rho - max_inv_rho)) ** rho


def index_to_sigma(index, num_scales, sigma_min, sigma_max, rho=7.0):
    """The noise level t_i of discretisation index i in 0..num_scales-1 (index 0 is sigma_max):
    the grid of CD/CT training (CM paper Sec. 5) and of multistep sampling's `ts`."""
    return karras_sigma(index / (num_scales - 1), sigma_min, sigma_max, rho)


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """n Karras noise levels from sigma_max down to sigma_min, then a trailing 0 (n + 1 values)."""
    sigmas = karras_sigma(torch.linspace(0, 1, n), sigma_min, sigma_max, rho)
    return append_zero(sigmas).to(device)


def progressive_num_scales(step, total_steps, start_scales, end_scales):
    """N(k) of the CT curriculum (CM paper Appendix C, with s0 = start_scales, s1 = end_scales):
    ceil(sqrt(k/K * ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, at least 2."""
    scales = np.ceil(
        np.sqrt((step / total_steps) * ((end_scales + 1) ** 2 - start_scales**2) + start_scales**2) - 1
    ).astype(np.int32)
    return np.maximum(scales, 1) + 1


def exponential_num_scales(step, total_steps, start_scales, end_scales):
    """N(k) of iCT's exponential curriculum (Song & Dhariwal 2023, Sec. 3.4 and Table 1):
    min(s0 * 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)), so N doubles
    every K' steps and reaches s1 + 1 for the last K' steps. When K is shorter than that many stages
    (K' would be 0) we take K' = 1, our reading for runs too short for the formula."""
    stages = np.log2(end_scales // start_scales) + 1
    stage_steps = max(int(np.floor(total_steps / stages)), 1)
    doublings = min(int(step) // stage_steps, 62)
    return int(min(start_scales * 2**doublings, end_scales)) + 1


def lognormal_sigmas(normal, p_mean, p_std, bounds=None):
    """Noise levels sigma = exp(P_mean + P_std * n) for standard normal draws n: EDM's training
    distribution (Karras et al. 2022, Sec. 5) and ECT's t ~ p(t). With `bounds` (sigma_lo, sigma_hi), the
    lognormal truncated to them (as NVlabs/FastGen draws): n's quantile is mapped into the bounds' quantiles, so
    one draw still makes one sigma."""
    if bounds is not None:
        lo, hi = (torch.special.ndtr(torch.tensor((math.log(b) - p_mean) / p_std, dtype=torch.float64)) for b in bounds)
        quantile = lo + torch.special.ndtr(normal.double()) * (hi - lo)
        normal = torch.special.ndtri(quantile).to(normal.dtype)
    return torch.exp(p_mean + p_std * normal)


def lognormal_index_probabilities(num_scales, sigma_min, sigma_max, rho, p_mean, p_std):
    """iCT's discretised lognormal over the pairs of the Karras grid (Song & Dhariwal 2023, Sec. 3.5):
    p(sigma_i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) /
    (sqrt(2) P_std)), the lognormal's mass between two neighbouring levels sigma_i < sigma_{i+1}.
    Our grid is indexed from sigma_max down (index n holds t_n > t_{n+1}), so entry n (0..N-2) is the
    probability of the pair (t_{n+1}, t_n); float64, summing to 1."""
    sigmas = index_to_sigma(torch.arange(num_scales, dtype=torch.float64), num_scales, sigma_min, sigma_max, rho)
    cdf = torch.erf((torch.log(sigmas) - p_mean) / (2**0.5 * p_std))
    mass = cdf[:-1] - cdf[1:]
    return mass / mass.sum()


def inverse_cdf_indices(probabilities, uniforms):
    """Indices drawn from `probabilities` by inverting its CDF at `uniforms` in [0, 1): index i when
    CDF(i - 1) <= u < CDF(i). Deterministic given the uniforms (the training loop's per-step draws)."""
    cdf = torch.cumsum(probabilities.to(uniforms.device, torch.float64), 0)
    index = torch.searchsorted(cdf, uniforms.to(torch.float64), right=True)
    return index.clamp(max=len(probabilities) - 1)


def ect_stage(step, stage_steps):
    """ECT's stage floor(step / d): the mapping r(t) tightens every d steps (Geng et al. 2024, Sec. 3;
    the published loop advances it every `--double` ticks)."""
    return int(step) // stage_steps


def ect_r(t, stage, q, k, b, ratio_limit=1.0):
    """ECT's mapping r(t) = max(t (1 - n(t) / q^(stage + 1)), 0), n(t) = 1 + k sigmoid(-b t) (Geng et al.
    2024, Sec. 3, the "sigmoid" mapping; k = 0 gives the constant one). The paper writes q^ceil(i/d); we
    follow the published code, which divides by q^(floor(i/d) + 1) (equal except at multiples of d).
    r = 0 means the target is the clean image: at stage 0 small t fall back to EDM's denoising loss.
    `ratio_limit` < 1 caps the ratio 1 - 1 / q^(stage + 1) there (NVlabs/TCM's ECT loss, --ratio_limit: 0.999 on
    CIFAR-10, 0.9961 on ImageNet-64), so t - r stops shrinking; without it t - r vanishes in float32 once
    q^(stage + 1) nears 2^24."""
    n = 1 + k * torch.sigmoid(-b * t)
    if ratio_limit < 1 and (stage + 1) * math.log(q) >= -math.log(1 - ratio_limit):
        return torch.clamp(t * (1 - n * (1 - ratio_limit)), min=0)
    return torch.clamp(t * (1 - n / q ** (stage + 1)), min=0)


def create_ema_and_scales_fn(
    target_ema_mode,
    start_ema,
    scale_mode,
    start_scales,
    end_scales,
    total_steps,
    distill_steps_per_iter,
):
    """Return step -> (target EMA rate mu(k), number of discretisation points N(k)).

    Supported (target_ema_mode, scale_mode) pairs, as published:
      fixed/fixed          CD: constant mu and N.
      fixed/progressive    constant mu, N(k) growing as in CT.
      adaptive/progressive CT (Appendix C): N(k) growing, mu(k) = exp(s0 * log(mu0) / (N(k) - 1)).
                           The paper writes N(k) in that denominator; the published code, with which
                           the checkpoints were trained, uses N(k) - 1, and so do we.
      fixed/progdist       progressive distillation: N halves every distill_steps_per_iter steps.
      fixed/exponential    iCT: N(k) doubling from s0 to s1 (exponential_num_scales); iCT's target
                           is the online network, start_ema 0.
    """
    modes = {
        ("fixed", "fixed"),
        ("fixed", "progressive"),
        ("adaptive", "progressive"),
        ("fixed", "progdist"),
        ("fixed", "exponential"),
    }
    if (target_ema_mode, scale_mode) not in modes:
        raise ValueError(
            f"unsupported target_ema_mode/scale_mode pair {target_ema_mode}/{scale_mode}; "
            f"choose one of {sorted('/'.join(m) for m in modes)}"
        )
    if scale_mode == "exponential" and not 1 <= start_scales <= end_scales:
        raise ValueError(f"scale_mode exponential needs 1 <= start_scales <= end_scales, got {start_scales} and {end_scales}")
    if scale_mode == "progressive" and not 2 <= start_scales <= end_scales:
        raise ValueError(
            f"--scale_mode progressive needs 2 <= --start_scales <= --end_scales, got {start_scales} and {end_scales}"
        )
    if scale_mode == "fixed" and start_scales < 2:
        raise ValueError(f"--scale_mode fixed needs --start_scales of at least 2, got {start_scales}")
    if not 0 <= start_ema < 1:
        raise ValueError(f"--start_ema must be in [0, 1), got {start_ema}")

    def ema_and_scales_fn(step):
        if scale_mode == "fixed":
            return float(start_ema), int(start_scales)
        if scale_mode == "exponential":
            return float(start_ema), exponential_num_scales(step, total_steps, start_scales, end_scales)
        if scale_mode == "progressive":
            scales = progressive_num_scales(step, total_steps, start_scales, end_scales)
            if target_ema_mode == "adaptive":
                target_ema = np.exp(np.log(start_ema) * start_scales / (scales - 1))
            else:
                target_ema = start_ema
            return float(target_ema), int(scales)
        # progdist: halve N each stage down to 2, then go from 2 to 1 over two more stages
        stage = step // distill_steps_per_iter
        scales = np.maximum(start_scales // (2**stage), 2)
        sub_stage = np.maximum(step - distill_steps_per_iter * (np.log2(start_scales) - 1), 0)
        sub_stage = sub_stage // (distill_steps_per_iter * 2)
        sub_scales = np.maximum(2 // (2**sub_stage), 1)
        scales = np.where(scales == 2, sub_scales, scales)
        return 1.0, int(scales)

    return ema_and_scales_fn
