"""The published module's public names, from where they now live (denoiser, schedule, samplers, editing)."""

from .denoiser import KarrasDenoiser
from .editing import iterative_colorization, iterative_inpainting, iterative_superres
from .losses import get_weightings
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
