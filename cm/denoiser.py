"""Preconditioning: how a raw network becomes a denoiser D(x, sigma) or a consistency function f(x, sigma).

All scalings live here (EDM, Karras et al. 2022, Table 1; CM paper, Appendix C, eq. for c_skip/c_out).
The published `KarrasDenoiser` (cm.karras_diffusion) adds the loss settings and methods to it.
"""

import torch

from .nn import append_dims


# the network's time input c_noise(sigma): "published" 1000 * 0.25 ln(sigma) (openai's code and checkpoints:
# EDM Table 1 times 1000), "edm" 0.25 ln(sigma) (EDM Table 1 as NVlabs/edm trains it; FastGen's sCD teachers)
C_NOISE_SCALES = {"published": 250.0, "edm": 0.25}


def network_time(sigmas, c_noise="published"):
    """c_noise(sigma) (C_NOISE_SCALES); the tiny offset keeps sigma = 0 finite, as published."""
    return C_NOISE_SCALES[c_noise] * torch.log(sigmas + 1e-44)


def check_c_noise(c_noise):
    if c_noise not in C_NOISE_SCALES:
        raise ValueError(f"unknown --c_noise {c_noise!r}; choose one of {', '.join(C_NOISE_SCALES)}")


class Denoiser:
    """The preconditioned model: c_skip, c_out, c_in around a backbone, and the noise range and rho
    the samplers and losses share.

    With `distillation=True` (every consistency model) the scalings satisfy the boundary condition
    f(x, sigma_min) = x exactly: c_skip(sigma_min) = 1, c_out(sigma_min) = 0 (CM paper, eq. 3 / App. C).
    """

    def __init__(
        self,
        sigma_data=0.5,
        sigma_max=80.0,
        sigma_min=0.002,
        rho=7.0,
        distillation=False,
        c_noise="published",
    ):
        check_c_noise(c_noise)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"--sigma_min must be positive and below --sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_data = sigma_data
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.rho = rho
        self.distillation = distillation
        self.c_noise = c_noise
        self.num_timesteps = 40  # the grid of the published "uniform" schedule sampler

    def get_snr(self, sigmas):
        return sigmas**-2

    def get_sigmas(self, sigmas):
        """The identity (a published method name, kept for callers of the published API)."""
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
        model_output = model(c_in * x_t, network_time(sigmas, self.c_noise), **model_kwargs)
        denoised = c_out * model_output + c_skip * x_t
        return model_output, denoised
