"""Training methods by their --training_mode name (the published names unchanged).

Adding a method: one module here with a TrainingMethod subclass (cm/methods/base.py), one line below
(or register() from your own code), and its presets in configs/.
"""

from ..checkpoints import stored_training_mode
from .base import TrainingMethod
from .consistency import ConsistencyDistillation, ConsistencyTraining, ImprovedConsistencyTraining
from .ect import EasyConsistencyTuning
from .edm import EDM
from .progdist import ProgressiveDistillation
from .scm import ContinuousConsistencyDistillation, ContinuousConsistencyTraining

METHODS = {}


def register(cls):
    """Make `cls` (a TrainingMethod subclass) trainable as --training_mode cls.name."""
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod) and cls.name):
        raise ValueError(f"{cls!r} is not a named TrainingMethod subclass")
    METHODS[cls.name] = cls
    return cls


for _cls in (
    EDM,
    ConsistencyDistillation,
    ConsistencyTraining,
    ProgressiveDistillation,
    ImprovedConsistencyTraining,
    EasyConsistencyTuning,
    ContinuousConsistencyTraining,
    ContinuousConsistencyDistillation,
):
    register(_cls)


def method_class(name):
    """The class of --training_mode `name`; one clear error for an unknown name."""
    if name not in METHODS:
        raise ValueError(f"unknown --training_mode {name}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def mode_flag_defaults():
    """{training_mode: {flag: value}}: the flag values each method brings (cm.config.parse_args_with_config)."""
    return {name: dict(cls.flag_defaults) for name, cls in METHODS.items() if cls.flag_defaults}


def parameterization(name):
    """The time variable of --training_mode `name`'s models: "karras" (sigma) or "trigflow" (t)."""
    return method_class(name).parameterization


def samples_with_boundary_condition(name):
    """Whether models of --training_mode `name` sample with the consistency scalings (the sampling scripts)."""
    return method_class(name).samples_with_boundary_condition


CONSISTENCY_SAMPLERS = ("onestep", "multistep")  # a consistency model's samplers; the others integrate a denoiser's ODE/SDE

# what a network trained by a method computes, and so what samples it or may serve as a teacher
KINDS = {
    "denoiser": "an EDM-style denoiser D(x, sigma), sampled with heun, euler, dpm, ancestral or progdist",
    "consistency": "a consistency model f(x, sigma) with the boundary condition, sampled with onestep or multistep",
    "trigflow": "an sCM TrigFlow model F(x, t), sampled with onestep or multistep",
}


def model_kind(name):
    """The KINDS key of models trained with --training_mode `name`."""
    cls = method_class(name)
    if cls.parameterization == "trigflow":
        return "trigflow"
    return "consistency" if cls.samples_with_boundary_condition else "denoiser"


def trained_kind(state_dict):
    """(--training_mode, model_kind) a checkpoint was trained with, from its stored config; None when it does not say
    (published or converted files) or names a method unknown here."""
    mode = stored_training_mode(state_dict)
    return (mode, model_kind(mode)) if mode in METHODS else None
