"""TrigFlow (Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", ICLR 2025,
Sec. 2): x_t = cos(t) x_0 + sin(t) z with z ~ N(0, sigma_d^2 I), t in [0, pi/2]; the probability-flow ODE
dx_t/dt = sigma_d F(x_t / sigma_d, t); the consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t),
for which f(x, 0) = x exactly.

Its relation to the Karras/EDM noise level: at equal signal-to-noise ratio sigma = sigma_d tan(t), and the EDM
input is x_sigma = x_t / cos(t). EDM's scalings then give c_in x_sigma = x_t / sigma_d, c_skip = cos^2 t,
c_out = sigma_d sin t, so an EDM network's raw output F_edm (our U-Net under cm.denoiser's EDM scalings, or any
published EDM checkpoint) is a TrigFlow network with F = -F_edm at the time input c_noise = 250 ln(sigma_d tan t):
no retraining. Networks trained from scratch take the identity time input c_noise(t) = t (the paper's choice).
"""

import math

import torch

from .denoiser import check_c_noise, network_time
from .nn import append_dims
from .schedule import lognormal_sigmas

TIME_INPUTS = ("edm", "identity")


def sigma_of_t(t, sigma_data):
    """The EDM noise level of TrigFlow time t (equal signal-to-noise ratio)."""
    return sigma_data * torch.tan(t)


def t_of_sigma(sigma, sigma_data):
    """The TrigFlow time of EDM noise level sigma."""
    return torch.atan(sigma / sigma_data)


def lognormal_t(normal, p_mean, p_std, sigma_data, bounds=None):
    """Training times t = arctan(exp(P_mean + P_std n) / sigma_d) from standard normal draws n (sCM, Sec. 4),
    the noise level optionally truncated to `bounds`."""
    return t_of_sigma(lognormal_sigmas(normal, p_mean, p_std, bounds), sigma_data)


def diffuse(x0, z, t):
    """x_t = cos(t) x_0 + sin(t) z, t one time per sample (z already of standard deviation sigma_d)."""
    t = append_dims(t, x0.ndim)
    return torch.cos(t) * x0 + torch.sin(t) * z


class TrigFlowDenoiser:
    """F(x_t / sigma_d, t) from a U-Net, and the consistency function f.

    time_input "identity": the network sees c_noise(t) = t and its output is F; "edm": it sees the EDM
    network's own c_noise(sigma_d tan t) (`c_noise`: cm.denoiser.C_NOISE_SCALES; published 250 ln sigma)
    and its output is -F (an EDM network, unchanged). Sampling starts at
    t_max = arctan(sigma_max / sigma_d) (1.5645 for sigma_max 80), as the paper does to match EDM."""

    def __init__(self, sigma_data=0.5, time_input="identity", sigma_max=80.0, c_noise="published"):
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {time_input!r}; choose one of {', '.join(TIME_INPUTS)}")
        self.sigma_data = sigma_data
        self.time_input = time_input
        self.sigma_max = sigma_max
        check_c_noise(c_noise)
        self.c_noise = c_noise

    @property
    def t_max(self):
        """The time sampling starts at: arctan(sigma_max / sigma_d)."""
        return math.atan(self.sigma_max / self.sigma_data)

    def network_time(self, t):
        if self.time_input == "edm":
            return network_time(sigma_of_t(t, self.sigma_data), self.c_noise)
        return t

    def network(self, model, x_t, t, **model_kwargs):
        """F(x_t / sigma_d, t)."""
        out = model(x_t / self.sigma_data, self.network_time(t), **model_kwargs)
        return -out if self.time_input == "edm" else out

    def consistency(self, x_t, t, F):
        """f = cos(t) x_t - sin(t) sigma_d F."""
        t = append_dims(t, x_t.ndim)
        return torch.cos(t) * x_t - torch.sin(t) * self.sigma_data * F

    def denoise(self, model, x_t, t, **model_kwargs):
        """(F, f(x_t, t)), as cm.denoiser.Denoiser.denoise returns (raw output, denoised)."""
        F = self.network(model, x_t, t, **model_kwargs)
        return F, self.consistency(x_t, t, F)


class SigmaView:
    """A TrigFlow model seen in EDM's variables: denoise(model, x_sigma, sigma) = f(cos(t) x_sigma, t) at
    t = arctan(sigma / sigma_d), so every loop written in EDM's noise levels (the editing of cm/editing.py)
    runs a TrigFlow model unchanged (x_sigma = x_0 + sigma n is x_t / cos t at equal signal-to-noise ratio)."""

    def __init__(self, trigflow, sigma_min=0.002, rho=7.0):
        self.trigflow = trigflow
        self.sigma_data, self.sigma_max, self.sigma_min = trigflow.sigma_data, trigflow.sigma_max, sigma_min
        self.rho = rho  # of the Karras grid the loops index

    def denoise(self, model, x_sigma, sigma, **model_kwargs):
        t = t_of_sigma(sigma, self.sigma_data)
        return self.trigflow.denoise(model, x_sigma * append_dims(torch.cos(t), x_sigma.ndim), t, **model_kwargs)


@torch.no_grad()
def sample_trigflow(denoiser, model, shape, generator, ts=None, model_kwargs=None, device=None, clip_denoised=True):
    """One- or multistep TrigFlow consistency sampling (sCM, Algorithm 1 of its appendix): x = sigma_d z at
    t_max, x_0 = f(x, t_max); then for each further t: x = cos(t) x_0 + sin(t) sigma_d z, x_0 = f(x, t).
    `ts` lists the further times in decreasing order (the paper's ImageNet-64 two-step: [1.1])."""
    model_kwargs = model_kwargs or {}
    sd = denoiser.sigma_data
    times = [denoiser.t_max] + [float(t) for t in (ts or [])]
    x0 = None
    for i, t_value in enumerate(times):
        z = generator.randn(*shape, device=device) * sd
        t = torch.full((shape[0],), t_value, device=device)
        x = z if i == 0 else diffuse(x0, z, t)
        x0 = denoiser.denoise(model, x, t, **model_kwargs)[1]
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
    return x0
