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
from .meanflow import MeanFlow
from .progdist import ProgressiveDistillation
from .scm import ContinuousConsistencyDistillation, ContinuousConsistencyTraining
from .tcm import truncated

METHODS = {}


def register(cls):
    """Make `cls` (a TrainingMethod subclass) trainable as --training_mode cls.name. A flag it declares that
    another method declares too must have the same default (the parser holds one)."""
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod) and cls.name):
        raise ValueError(f"{cls!r} is not a named TrainingMethod subclass")
    for other in METHODS.values():
        clash = sorted(k for k in cls.flags.keys() & other.flags.keys()
                       if other.name != cls.name and cls.flags[k][0] != other.flags[k][0])
        if clash:
            raise ValueError(f"--training_mode {cls.name}: the flags {', '.join(clash)} of {other.name} have other "
                             "defaults there; give them the same defaults, or other names")
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
    MeanFlow,
    *map(truncated, (ConsistencyTraining, ImprovedConsistencyTraining, ConsistencyDistillation, EasyConsistencyTuning,
                     ContinuousConsistencyTraining, ContinuousConsistencyDistillation)),
):
    register(_cls)


def method_class(name):
    """The class of --training_mode `name`; one clear error for an unknown name."""
    if name not in METHODS:
        raise ValueError(f"unknown --training_mode {name}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def flag_groups():
    """{title: {flag: (default, help)}}: each registered method's own flags (inherited ones included), grouped by the
    modes that declare them, under the title "--training_mode MODE | MODE..." (a flag several methods share, as
    iCT, ECT and sCM the lognormal's, is listed once, with the first help)."""
    declared = {}  # flag -> (default, help, modes)
    for name, cls in METHODS.items():
        for flag, (default, text) in cls.flags.items():
            declared.setdefault(flag, (default, text, []))[2].append(name)
    groups = {}
    for flag, (default, text, modes) in declared.items():
        groups.setdefault(f"--training_mode {' | '.join(modes)}", {})[flag] = (default, text)
    return groups


def flag_defaults():
    """{flag: default} of every registered method's own flags (cm.script_util.cm_train_defaults holds them)."""
    return {k: default for group in flag_groups().values() for k, (default, _) in group.items()}


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
