"""Training methods by their --training_mode name (the published names unchanged).

Adding a method: one module here with a TrainingMethod subclass (cm/methods/base.py), one line below
(or register() from your own code), and its presets in configs/.
"""

from ..checkpoints import stored_training_mode
from .base import MethodContext as MethodContext  # (what methods are handed; cm.train_util builds it)
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
    """What models of --training_mode `name` are sampled as (a cm.parameterizations object)."""
    return method_class(name).parameterization


def trained_parameterization(state_dict):
    """(--training_mode, its parameterization) a checkpoint was trained with, from its stored config; None when it
    does not say (published or converted files) or names a method unknown here."""
    mode = stored_training_mode(state_dict)
    return (mode, parameterization(mode)) if mode in METHODS else None
