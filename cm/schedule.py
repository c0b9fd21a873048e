"""Noise levels and training curricula.

The Karras et al. (2022) rho interpolation lives here once; the losses, the samplers and the
editing loops all reach noise levels through `karras_sigma` / `index_to_sigma`.
"""

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
    """
    modes = {
        ("fixed", "fixed"),
        ("fixed", "progressive"),
        ("adaptive", "progressive"),
        ("fixed", "progdist"),
    }
    if (target_ema_mode, scale_mode) not in modes:
        raise ValueError(
            f"unsupported target_ema_mode/scale_mode pair {target_ema_mode}/{scale_mode}; "
            f"choose one of {sorted('/'.join(m) for m in modes)}"
        )

    def ema_and_scales_fn(step):
        if scale_mode == "fixed":
            return float(start_ema), int(start_scales)
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
