"""EDM training (Karras et al. 2022): denoising score matching at noise levels from the schedule sampler."""

from ..losses import edm_loss
from ..parameterizations import DENOISER
from ..schedule import index_to_sigma, lognormal_sigmas
from .base import TrainingMethod


def sample_edm_sigmas(schedule_sampler, rand, diffusion):
    """Training noise levels of the EDM loss.
    lognormal: ln sigma ~ N(-1.2, 1.2^2) (the published LogNormalSampler);
    uniform: a uniform index of the diffusion's num_timesteps-point Karras grid (the published
    sampler handed the integer index itself to the loss as sigma; we use the grid's sigma)."""
    if schedule_sampler == "lognormal":
        return lognormal_sigmas(rand.randn(), -1.2, 1.2)
    if schedule_sampler == "uniform":
        n = diffusion.num_timesteps
        return index_to_sigma(rand.randint(0, n).float(), n, diffusion.sigma_min, diffusion.sigma_max, diffusion.rho)
    raise ValueError(f"unknown schedule_sampler {schedule_sampler!r} for EDM training; choose lognormal or uniform")


class EDM(TrainingMethod):
    name = "edm"
    boundary_condition = False
    parameterization = DENOISER
    trains_without_end = True

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.schedule_sampler = args.schedule_sampler

    def draw(self, rand, batch, step):
        return {"noise": rand.randn(*batch.shape[1:]), "sigmas": sample_edm_sigmas(self.schedule_sampler, rand, self.diffusion)}

    def losses(self, model, micro, cond, rows, step):
        return edm_loss(self.diffusion, model, micro, rows["sigmas"], cond, rows["noise"])

    def done(self, step, total_training_steps, lr_anneal_steps):
        # as published: until lr_anneal_steps (0: no end), and total_training_steps, ours, when given
        limits = [n for n in (total_training_steps, lr_anneal_steps) if n]
        return bool(limits) and step >= min(limits)
