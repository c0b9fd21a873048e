"""The linear flow path of flow-map methods (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for
One-step Generative Modeling", Sec. 3-4): z_t = (1 - t) x + t e,
t in [0, 1], e ~ N(0, I), the velocity v = dz_t/dt = e - x. A flow-map network u(z_t, r, t), the average velocity
over [r, t], moves a point of the path to time r: z_r = z_t - (t - r) u(z_t, r, t); at r = t it is the
instantaneous velocity v(z_t, t).

The network is conditioned on two times, (t, t - r) (the paper's best embedding, Table 1c), each given as it is,
t in [0, 1] (the paper's official U-Net), and sees z_t without an input scaling.

Its relation to the Karras/EDM noise level: at equal signal-to-noise ratio sigma = t / (1 - t), and the EDM input is
x_sigma = z_t / (1 - t); the jump to r = 0 is the flow map's estimate of the data, x_0 = z_t - t u(z_t, 0, t), so a
flow map seen in EDM's variables is a denoiser (FlowMapSigmaView), and every loop written in noise levels (the
editing of cm/editing.py) runs it unchanged.
"""

import torch

from .nn import append_dims


def sigma_of_t(t):
    """The EDM noise level of flow time t (equal signal-to-noise ratio)."""
    return t / (1 - t)


def t_of_sigma(sigma):
    """The flow time of EDM noise level sigma."""
    return sigma / (1 + sigma)


def interpolate(x0, e, t):
    """z_t = (1 - t) x_0 + t e, t one time per sample."""
    t = append_dims(t, x0.ndim)
    return (1 - t) * x0 + t * e


def logit_normal(normal, p_mean, p_std):
    """Times sigmoid(P_mean + P_std n) in (0, 1) from standard normal draws n (Mean Flows, Sec. 4.3)."""
    return torch.sigmoid(p_mean + p_std * normal)


class FlowMap:
    """u(z_t, r, t) from a network called as model(z_t, [t, t - r], **model_kwargs), and the jump z_r."""

    def network(self, model, z_t, r, t, **model_kwargs):
        return model(z_t, torch.stack([t, t - r], dim=1), **model_kwargs)

    @staticmethod
    def jump(z_t, r, t, u):
        """z_r = z_t - (t - r) u."""
        return z_t - append_dims(t - r, z_t.ndim) * u

    def denoise(self, model, z_t, t, **model_kwargs):
        """(u(z_t, 0, t), the jump to the data z_0), as cm.denoiser.Denoiser.denoise returns (raw output, denoised)."""
        r = torch.zeros_like(t)
        u = self.network(model, z_t, r, t, **model_kwargs)
        return u, self.jump(z_t, r, t, u)


class FlowMapSigmaView:
    """A flow map seen in EDM's variables: denoise(model, x_sigma, sigma) = the jump to r = 0 from z_t = (1 - t) x_sigma
    at t = sigma / (1 + sigma)."""

    def __init__(self, flow_map, rho=7.0):
        self.flow_map = flow_map
        self.rho = rho  # (of the Karras grid the loops index)

    def denoise(self, model, x_sigma, sigma, **model_kwargs):
        t = t_of_sigma(sigma)
        return self.flow_map.denoise(model, x_sigma * append_dims(1 - t, x_sigma.ndim), t, **model_kwargs)


@torch.no_grad()
def sample_flow_map(flow_map, model, shape, generator, ts=(), model_kwargs=None, device=None, clip_denoised=True):
    """Flow-map sampling (Mean Flows, Algorithm 2): z_1 = e, then one jump per interval of 1 > ts[0] > ... > 0,
    z_r = z_t - (t - r) u(z_t, r, t); no noise is drawn after e. One step: z_0 = z_1 - u(z_1, 0, 1)."""
    model_kwargs = model_kwargs or {}
    z = generator.randn(*shape, device=device)
    times = [1.0, *[float(t) for t in ts], 0.0]
    for t_value, r_value in zip(times[:-1], times[1:]):
        t = torch.full((shape[0],), t_value, device=device)
        r = torch.full((shape[0],), r_value, device=device)
        z = flow_map.jump(z, r, t, flow_map.network(model, z, r, t, **model_kwargs))
    return z.clamp(-1, 1) if clip_denoised else z
