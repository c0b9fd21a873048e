"""Training losses: EDM denoising, consistency distillation (CD), consistency training (CT, and iCT's
variant of it), easy consistency tuning (ECT) and progressive distillation, each returning per-sample
values; the distances d(x, y) between outputs.

Every loss takes the KarrasDenoiser `diffusion` whose preconditioning, noise range, weighting and
distance it uses. CD and CT share one ODE step (`ode_step`): CD steps with the teacher's denoiser, CT
with the clean image itself standing in for it (CM paper, Algorithms 2 and 3). iCT is CT with other
noise levels, weighting, distance and curriculum (chosen by the training loop and the flags); ECT
compares the model at t and at r(t) < t on one noise direction, in continuous time.
"""

import torch
import torch.nn.functional as F

from .lpips import LPIPS
from .nn import append_dims, mean_flat
from .random_util import rng_states, set_rng_states
from .schedule import index_to_sigma, karras_sigma

# lambda(sigma) of each --weight_schedule, from the signal-to-noise ratio snr = sigma^-2 and sigma_data
SNR_WEIGHTINGS = {
    "snr": lambda snrs, sigma_data: snrs,
    "snr+1": lambda snrs, sigma_data: snrs + 1,
    "karras": lambda snrs, sigma_data: snrs + 1.0 / sigma_data**2,  # EDM's (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    "truncated-snr": lambda snrs, sigma_data: torch.clamp(snrs, min=1.0),
    "uniform": lambda snrs, sigma_data: torch.ones_like(snrs),
}
WEIGHT_SCHEDULES = (*SNR_WEIGHTINGS, "inverse-step")
LOSS_NORMS = ("l1", "l2", "l2-32", "lpips", "pseudo-huber")


class LossSettings:
    """What the losses below take besides the networks and the denoiser: the weighting lambda(sigma)
    (--weight_schedule) and the distance d (--loss_norm; pseudo-Huber's c, None: iCT's 0.00054 sqrt(d); the LPIPS
    network of loss_norm "lpips", VGG-16 weights from `lpips_vgg_path` or torchvision's cache, built on first use).
    The methods are handed them with the denoiser (cm.karras_diffusion.KarrasDenoiser is both)."""

    def __init__(self, weight_schedule="karras", loss_norm="lpips", huber_c=None, lpips_vgg_path=None):
        if weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"unknown weight_schedule {weight_schedule!r}; choose one of {', '.join(WEIGHT_SCHEDULES)}")
        if loss_norm not in LOSS_NORMS:
            raise ValueError(f"unknown loss_norm {loss_norm!r}; choose one of {', '.join(LOSS_NORMS)}")
        self.weight_schedule = weight_schedule
        self.loss_norm = loss_norm
        self.lpips_vgg_path = lpips_vgg_path
        self.huber_c = huber_c
        self.lpips_loss = None  # built on first use (loss_norm "lpips")

    def lpips_network(self, device):
        """The LPIPS network of loss_norm 'lpips' (None for the other distances), built on first use
        and kept on `device`."""
        if self.loss_norm != "lpips":
            return None
        if self.lpips_loss is None:
            self.lpips_loss = LPIPS(vgg_weights=self.lpips_vgg_path)
        return self.lpips_loss.to(device)


def get_weightings(weight_schedule, snrs, sigma_data):
    """Per-sample loss weight lambda(sigma) from the signal-to-noise ratio snr = sigma^-2."""
    if weight_schedule in SNR_WEIGHTINGS:
        return SNR_WEIGHTINGS[weight_schedule](snrs, sigma_data)
    if weight_schedule == "inverse-step":
        raise ValueError("weight_schedule 'inverse-step' weights a consistency step (CD, CT, iCT, ECT); "
                         "the EDM and progressive-distillation losses need another")
    raise ValueError(f"unknown weight_schedule {weight_schedule!r}; choose one of {', '.join(WEIGHT_SCHEDULES)}")


def step_weightings(diffusion, t, t_next):
    """Loss weight of a consistency step from t down to t_next < t: "inverse-step" is
    1 / (t - t_next), iCT's lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) (Song & Dhariwal 2023, Sec. 3.1)
    and ECT's w(t, r) = 1 / (t - r) (Geng et al. 2024); every other schedule is lambda(t) of get_weightings."""
    if diffusion.weight_schedule == "inverse-step":
        return 1.0 / (t - t_next)
    return get_weightings(diffusion.weight_schedule, diffusion.get_snr(t), diffusion.sigma_data)


def pseudo_huber_c(x):
    """iCT's pseudo-Huber constant c = 0.00054 sqrt(d), d the dimension of one sample (Song & Dhariwal 2023)."""
    return 0.00054 * x[0].numel() ** 0.5


def distance(a, b, loss_norm, lpips_fn=None, huber_c=None):
    """Per-sample distance d(a, b) between two [N x C x H x W] batches in [-1, 1] space.

    l1, l2: mean absolute / squared difference; l2-32: l2 after bilinear resizing to 32x32;
    lpips: LPIPS on [0, 1] images, upsampled bilinearly to 224 when smaller than 256 (as published);
    pseudo-huber: sqrt(||a - b||^2 + c^2) - c (iCT), c defaulting to 0.00054 sqrt(d); c = 0 gives
    the l2 norm ||a - b|| (ECT's adaptive weighting with p = 0.5).
    """
    if loss_norm == "l1":
        return mean_flat(torch.abs(a - b))
    if loss_norm == "l2":
        return mean_flat((a - b) ** 2)
    if loss_norm == "l2-32":
        a, b = (F.interpolate(v, size=32, mode="bilinear") for v in (a, b))
        return mean_flat((a - b) ** 2)
    if loss_norm == "lpips":
        if lpips_fn is None:
            raise ValueError("loss_norm 'lpips' needs an LPIPS network (cm.lpips.LPIPS)")
        if a.shape[-1] < 256:
            a, b = (F.interpolate(v, size=224, mode="bilinear") for v in (a, b))
        return lpips_fn((a + 1) / 2.0, (b + 1) / 2.0)
    if loss_norm == "pseudo-huber":
        c = pseudo_huber_c(a) if huber_c is None else huber_c
        return torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c**2) - c
    raise ValueError(f"unknown loss_norm {loss_norm!r}; choose one of {', '.join(LOSS_NORMS)}")


def edm_loss(diffusion, model, x_start, sigmas, model_kwargs=None, noise=None):
    """EDM denoising score matching at the given sigmas: lambda(sigma) ||D(x + sigma n, sigma) - x||^2."""
    model_kwargs = model_kwargs or {}
    if noise is None:
        noise = torch.randn_like(x_start)
    x_t = x_start + noise * append_dims(sigmas, x_start.ndim)
    _, denoised = diffusion.denoise(model, x_t, sigmas, **model_kwargs)
    weights = get_weightings(diffusion.weight_schedule, diffusion.get_snr(sigmas), diffusion.sigma_data)
    weights = append_dims(weights, x_start.ndim)
    mse = mean_flat(weights * (denoised - x_start) ** 2)
    return {"xs_mse": mean_flat((denoised - x_start) ** 2), "mse": mse, "loss": mse}


@torch.inference_mode()
def ode_step(x, t, next_t, x0_fn, solver="heun"):
    """One step of the probability-flow ODE dx/dsigma = (x - x0(x, sigma)) / sigma from t to next_t,
    under inference mode (no autograd bookkeeping at all; the result only enters the loss as a constant).

    `x0_fn(x, sigma)` is the teacher's denoiser (CD) or returns the clean image (CT, where both
    Heun evaluations give the same x0 and the step is exactly Euler's)."""
    dims = x.ndim
    d = (x - x0_fn(x, t)) / append_dims(t, dims)
    x_euler = x + d * append_dims(next_t - t, dims)
    if solver == "euler":
        return x_euler
    if solver != "heun":
        raise ValueError(f"unknown ODE solver {solver!r}; choose heun or euler")
    next_d = (x_euler - x0_fn(x_euler, next_t)) / append_dims(next_t, dims)
    return x + (d + next_d) * append_dims((next_t - t) / 2, dims)


def _random_inputs(x_start, model_kwargs, noise, indices, num_indices):
    """Defaults for what the caller did not give: no labels, fresh noise, grid indices uniform in
    0..num_indices-1 (returned in x_start's dtype, for the sigma arithmetic)."""
    if noise is None:
        noise = torch.randn_like(x_start)
    if indices is None:
        indices = torch.randint(0, num_indices, (x_start.shape[0],), device=x_start.device)
    return model_kwargs or {}, noise, indices.to(x_start.dtype)


def consistency_loss(
    diffusion,
    model,
    x_start,
    num_scales,
    model_kwargs=None,
    target_model=None,
    teacher_model=None,
    teacher_diffusion=None,
    noise=None,
    indices=None,
    teacher_solver="heun",
    lpips_fn=None,
):
    """CD (with a teacher) or CT (without): lambda(t_n) d(f(x_{t_{n+1}}), f^-(x_hat_{t_n})).

    With indices n drawn uniformly from 0..N-2 on the Karras grid (index 0 = sigma_max),
    t = t_n, t2 = t_{n+1} < t: x_t = x + t z; x_t2 = one ODE step from x_t (teacher Heun for CD,
    Euler with x itself for CT); the target network f^- sees x_t2 under the same dropout mask
    state as the online network (CM paper, Algorithms 2 and 3).
    `indices` may be given (the training loop draws them per global batch)."""
    if target_model is None:
        raise ValueError("consistency losses need a target model")
    model_kwargs, noise, indices = _random_inputs(x_start, model_kwargs, noise, indices, num_scales - 1)
    grid = dict(num_scales=num_scales, sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max, rho=diffusion.rho)
    t = index_to_sigma(indices, **grid)
    t2 = index_to_sigma(indices + 1, **grid)
    x_t = x_start + noise * append_dims(t, x_start.ndim)

    dropout_state = rng_states(x_start.device)
    distiller = diffusion.denoise(model, x_t, t, **model_kwargs)[1]

    if teacher_model is None:
        x_t2 = ode_step(x_t, t, t2, lambda x, s: x_start, solver="euler")
    else:
        x_t2 = ode_step(
            x_t, t, t2, lambda x, s: teacher_diffusion.denoise(teacher_model, x, s, **model_kwargs)[1], teacher_solver
        )

    set_rng_states(x_start.device, dropout_state)
    with torch.inference_mode():  # a constant of the loss: no autograd bookkeeping
        distiller_target = diffusion.denoise(target_model, x_t2, t2, **model_kwargs)[1]

    weights = step_weightings(diffusion, t, t2)
    loss = distance(distiller, distiller_target, diffusion.loss_norm, lpips_fn, diffusion.huber_c) * weights
    return {"loss": loss}


def ect_loss(diffusion, model, x_start, t, r, model_kwargs=None, target_model=None, noise=None, lpips_fn=None):
    """Easy consistency tuning (Geng et al. 2024): w(t, r) d(f(x + t z, t), f^-(x + r z, r)) with one
    noise direction z for both points, r = r(t) < t from the stage schedule (cm.schedule.ect_r), the
    target network f^- under the online network's dropout state and without gradient, and the clean
    image itself as the target where r = 0. As in the published loss, d is the pseudo-Huber distance
    with ECT's c (c = 0: the l2 norm, the paper's adaptive weighting with p = 1/2) and w is 1/(t - r)
    ("inverse-step", the published CIFAR-10 code) or lambda(t) ("karras" = SNR(t) + 1/sigma_data^2, the
    published ImageNet code)."""
    if target_model is None:
        raise ValueError("easy consistency tuning needs a target model (the online network without gradient)")
    model_kwargs = model_kwargs or {}
    if noise is None:
        noise = torch.randn_like(x_start)
    dims = x_start.ndim
    dropout_state = rng_states(x_start.device)
    online = diffusion.denoise(model, x_start + noise * append_dims(t, dims), t, **model_kwargs)[1]
    set_rng_states(x_start.device, dropout_state)
    with torch.inference_mode():  # a constant of the loss: no autograd bookkeeping
        target = diffusion.denoise(target_model, x_start + noise * append_dims(r, dims), r, **model_kwargs)[1]
        target = torch.where(append_dims(r > 0, dims), target, x_start)
    weights = step_weightings(diffusion, t, r)
    return {"loss": distance(online, target, diffusion.loss_norm, lpips_fn, diffusion.huber_c) * weights}


def progdist_loss(
    diffusion,
    model,
    x_start,
    num_scales,
    model_kwargs=None,
    teacher_model=None,
    teacher_diffusion=None,
    noise=None,
    indices=None,
    lpips_fn=None,
):
    """Progressive distillation (Salimans & Ho 2022) on the Karras grid: the student's one step from
    t_n to t_{n+1} must match two teacher Euler steps through the midpoint t_{n+1/2}; the target is
    the denoised image that makes one Euler step land where the teacher's two did."""
    if teacher_model is None:
        raise ValueError("progressive distillation needs a teacher model")
    model_kwargs, noise, indices = _random_inputs(x_start, model_kwargs, noise, indices, num_scales)
    dims = x_start.ndim

    def sigma_at(position):
        return karras_sigma(position / num_scales, diffusion.sigma_min, diffusion.sigma_max, diffusion.rho)

    t, t2, t3 = sigma_at(indices), sigma_at(indices + 0.5), sigma_at(indices + 1)
    x_t = x_start + noise * append_dims(t, dims)
    denoised_x = diffusion.denoise(model, x_t, t, **model_kwargs)[1]

    def teacher_x0(x, s):
        return teacher_diffusion.denoise(teacher_model, x, s, **model_kwargs)[1]

    x_t2 = ode_step(x_t, t, t2, teacher_x0, solver="euler")
    x_t3 = ode_step(x_t2, t2, t3, teacher_x0, solver="euler")
    # the x0 whose Euler step from (x_t, t) reaches x_t3 at t3
    target_x = (x_t - append_dims(t, dims) * (x_t3 - x_t) / append_dims(t3 - t, dims)).detach()

    weights = get_weightings(diffusion.weight_schedule, diffusion.get_snr(t), diffusion.sigma_data)
    return {"loss": distance(denoised_x, target_x, diffusion.loss_norm, lpips_fn, diffusion.huber_c) * weights}
