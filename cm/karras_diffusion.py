"""The published module's public names, from where they now live (denoiser, schedule, samplers, editing),
and `KarrasDenoiser`: the preconditioning of cm.denoiser plus the loss settings (weighting, distance)
and the published loss methods, thin wrappers of cm.losses (which the training methods call too)."""

from . import losses
from .denoiser import Denoiser
from .editing import iterative_colorization, iterative_inpainting, iterative_superres
from .losses import LossSettings, get_weightings
from .samplers import (
    get_ancestral_step,
    karras_sample,
    sample_dpm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_onestep,
    sample_progdist,
    stochastic_iterative_sampler,
    to_d,
)
from .schedule import get_sigmas_karras

__all__ = [
    "KarrasDenoiser",
    "get_weightings",
    "karras_sample",
    "get_sigmas_karras",
    "to_d",
    "get_ancestral_step",
    "sample_heun",
    "sample_euler",
    "sample_dpm",
    "sample_euler_ancestral",
    "sample_onestep",
    "sample_progdist",
    "stochastic_iterative_sampler",
    "iterative_colorization",
    "iterative_inpainting",
    "iterative_superres",
]


class KarrasDenoiser(Denoiser, LossSettings):
    """The published denoiser: preconditioning (cm.denoiser.Denoiser), the loss weighting lambda(sigma)
    and distance d, and the losses under their published method names. `huber_c` None is iCT's
    0.00054 sqrt(d); `lpips_vgg_path` None: torchvision's VGG-16 from the torch hub cache."""

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
        c_noise="published",
    ):
        LossSettings.__init__(self, weight_schedule, loss_norm, huber_c, lpips_vgg_path)
        Denoiser.__init__(self, sigma_data=sigma_data, sigma_max=sigma_max, sigma_min=sigma_min, rho=rho,
                          distillation=distillation, c_noise=c_noise)

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
