"""EDM training (Karras et al. 2022): denoising score matching at noise levels from the schedule sampler; for a
network with an uncertainty head (EDM2's logvar, cm/networks/edm2.py), EDM2's loss weighted by it."""

import torch

from ..denoiser import network_time
from ..losses import edm_loss
from ..parameterizations import DENOISER
from ..schedule import index_to_sigma, lognormal_sigmas
from .base import TrainingMethod


def sample_edm_sigmas(schedule_sampler, rand, diffusion, p_mean=-1.2, p_std=1.2):
    """Training noise levels of the EDM loss.
    lognormal: ln sigma ~ N(p_mean, p_std^2) (the published LogNormalSampler: -1.2, 1.2; EDM2: -0.8, 1.6 at
    ImageNet-64, -0.4, 1.0 on ImageNet-512 latents);
    uniform: a uniform index of the diffusion's num_timesteps-point Karras grid (the published
    sampler handed the integer index itself to the loss as sigma; we use the grid's sigma)."""
    if schedule_sampler == "lognormal":
        return lognormal_sigmas(rand.randn(), p_mean, p_std)
    if schedule_sampler == "uniform":
        n = diffusion.num_timesteps
        return index_to_sigma(rand.randint(0, n).float(), n, diffusion.sigma_min, diffusion.sigma_max, diffusion.rho)
    raise ValueError(f"unknown schedule_sampler {schedule_sampler!r} for EDM training; choose lognormal or uniform")


class EDM(TrainingMethod):
    name = "edm"
    boundary_condition = False
    parameterization = DENOISER
    trains_without_end = True
    flags = dict(
        edm_p_mean=(-1.2, "--schedule_sampler lognormal: ln sigma ~ N(edm_p_mean, edm_p_std^2), the mean"),
        edm_p_std=(1.2, "the lognormal's standard deviation"),
    )

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.schedule_sampler = args.schedule_sampler
        self.p_mean, self.p_std = args.edm_p_mean, args.edm_p_std

    def draw(self, rand, batch, step):
        noise = rand.randn(*batch.shape[1:])
        return {"noise": noise, "sigmas": sample_edm_sigmas(self.schedule_sampler, rand, self.diffusion, self.p_mean, self.p_std)}

    def losses(self, model, micro, cond, rows, step):
        out = edm_loss(self.diffusion, model, micro, rows["sigmas"], cond, rows["noise"])
        net = getattr(model, "module", model)
        if hasattr(net, "logvar"):  # EDM2's loss (eq. 21): e^-u(sigma) lambda(sigma) ||D - x||^2 + u(sigma), per pixel
            with torch.autocast(micro.device.type, enabled=False):
                u = net.logvar(network_time(rows["sigmas"], self.diffusion.c_noise)).to(out["mse"].dtype)
            out = {**out, "loss": torch.exp(-u) * out["mse"] + u, "logvar": u}
        return out

    def done(self, step, total_training_steps, lr_anneal_steps):
        # as published: until lr_anneal_steps (0: no end), and total_training_steps, ours, when given
        limits = [n for n in (total_training_steps, lr_anneal_steps) if n]
        return bool(limits) and step >= min(limits)
