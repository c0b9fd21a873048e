"""Training methods by their --training_mode name (the published names unchanged).

Adding a method: one module here with a TrainingMethod subclass (cm/methods/base.py), one line below
(or register() from your own code), and its presets in configs/.
"""

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
