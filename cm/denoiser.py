"""Preconditioning: how a raw network becomes a denoiser D(x, sigma) or a consistency function f(x, sigma).

All scalings live here (EDM, Karras et al. 2022, Table 1; CM paper, Appendix C, eq. for c_skip/c_out).
`KarrasDenoiser` also carries the training losses under their published method names (cm/losses.py).
"""

import torch

from . import losses
from .losses import WEIGHT_SCHEDULES
from .nn import append_dims


def network_time(sigmas):
    """The network's time input c_noise(sigma) = 1000 * 0.25 * log(sigma) (EDM Table 1, times 1000).
    The tiny offset keeps sigma = 0 finite, as published."""
    return 1000 * 0.25 * torch.log(sigmas + 1e-44)


class KarrasDenoiser:
    """The preconditioned model: c_skip, c_out, c_in around a backbone, plus the settings the
    losses and samplers share (noise range, rho, loss weighting, distance).

    With `distillation=True` (every consistency model) the scalings satisfy the boundary condition
    f(x, sigma_min) = x exactly: c_skip(sigma_min) = 1, c_out(sigma_min) = 0 (CM paper, eq. 3 / App. C).
    """

    def __init__(
        self,
        sigma_data=0.5,
        sigma_max=80.0,
        sigma_min=0.002,
        rho=7.0,
        weight_schedule="karras",
        distillation=False,
        loss_norm="lpips",
        lpips_vgg_path=None,
        huber_c=None,
    ):
        if weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(
                f"unknown weight_schedule {weight_schedule!r}; choose one of {', '.join(WEIGHT_SCHEDULES)}"
            )
        self.sigma_data = sigma_data
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.rho = rho
        self.weight_schedule = weight_schedule
        self.distillation = distillation
        if loss_norm not in losses.LOSS_NORMS:
            raise ValueError(f"unknown loss_norm {loss_norm!r}; choose one of {', '.join(losses.LOSS_NORMS)}")
        self.loss_norm = loss_norm
        self.lpips_vgg_path = lpips_vgg_path
        self.huber_c = huber_c  # pseudo-Huber c; None: iCT's 0.00054 sqrt(d)
        self.lpips_loss = None  # built on first use (loss_norm "lpips")
        self.num_timesteps = 40  # the grid of the published "uniform" schedule sampler

    def get_snr(self, sigmas):
        return sigmas**-2

    def get_sigmas(self, sigmas):
        return sigmas

    def get_scalings(self, sigma):
        """EDM scalings (Karras et al. 2022, Table 1)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1 / (sigma**2 + sd2) ** 0.5
        return c_skip, c_out, c_in

    def get_scalings_for_boundary_condition(self, sigma):
        """Consistency-model scalings: EDM's, shifted by sigma_min so that f(x, sigma_min) = x."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1 / (sigma**2 + sd2) ** 0.5
        return c_skip, c_out, c_in

    def scalings(self, sigma):
        if self.distillation:
            return self.get_scalings_for_boundary_condition(sigma)
        return self.get_scalings(sigma)

    def denoise(self, model, x_t, sigmas, **model_kwargs):
        """Return (raw network output F, preconditioned output c_skip * x + c_out * F)."""
        c_skip, c_out, c_in = [append_dims(c, x_t.ndim) for c in self.scalings(sigmas)]
        model_output = model(c_in * x_t, network_time(sigmas), **model_kwargs)
        denoised = c_out * model_output + c_skip * x_t
        return model_output, denoised

    def lpips_network(self, device):
        """The LPIPS network of loss_norm 'lpips', built on first use (VGG-16 weights from the cache
        or `self.lpips_vgg_path`) and kept on `device`."""
        if self.loss_norm != "lpips":
            return None
        if self.lpips_loss is None:
            from .lpips import LPIPS

            self.lpips_loss = LPIPS(vgg_weights=self.lpips_vgg_path)
        return self.lpips_loss.to(device)

    def training_losses(self, model, x_start, sigmas, model_kwargs=None, noise=None):
        """EDM denoising loss at the given sigmas (per-sample terms "loss", "mse", "xs_mse")."""
        return losses.edm_loss(self, model, x_start, sigmas, model_kwargs, noise)

    def consistency_losses(
        self,
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
    ):
        """CD with a teacher, CT without (per-sample term "loss")."""
        return losses.consistency_loss(
            self, model, x_start, num_scales, model_kwargs, target_model, teacher_model, teacher_diffusion,
            noise, indices, teacher_solver, self.lpips_network(x_start.device),
        )

    def ect_losses(self, model, x_start, t, r, model_kwargs=None, target_model=None, noise=None):
        """Easy consistency tuning between noise levels t and r(t) (per-sample term "loss")."""
        return losses.ect_loss(
            self, model, x_start, t, r, model_kwargs, target_model, noise, self.lpips_network(x_start.device)
        )

    def progdist_losses(
        self, model, x_start, num_scales, model_kwargs=None, teacher_model=None, teacher_diffusion=None, noise=None,
        indices=None,
    ):
        """Progressive distillation against the teacher (per-sample term "loss")."""
        return losses.progdist_loss(
            self, model, x_start, num_scales, model_kwargs, teacher_model, teacher_diffusion, noise, indices,
            self.lpips_network(x_start.device),
        )
