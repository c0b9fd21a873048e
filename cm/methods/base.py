"""What the training loop asks a training method (cm.train_util.TrainLoop knows nothing else about it).

A method owns everything that differs between methods: its random draws per step (from the step's
generator, cm.train_util.StepRandom, so a run does not depend on process count, microbatches or
resumption), its per-sample loss, its curriculum, the extra networks it needs and how they start and
update, the checkpoint files and training state beyond the model, EMAs and optimizer, its log keys,
the scalings it trains and samples with, the flags it needs and the flag values it brings.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from ..cli import POSITIVE, check_ranges
from ..jvp import JVP_METHODS
from ..parameterizations import CONSISTENCY


@dataclass(frozen=True)
class MethodContext:
    """What a method is handed of the training run, never the loop itself: where the run stands and the few things
    a method may do to it."""

    step: int  # the step about to be taken (setup), or just taken and not yet counted (after_step)
    device: torch.device
    world_size: int
    precision: str  # the torso's precision: "fp32", "bf16" or "fp16" (float32 master weights, loss scaling)
    fast_paths: dict  # cm.fast_paths switches, for the method's own networks
    config: dict  # the run's resolved config, stored in every file the method saves
    model: torch.nn.Module  # the online network (not its DDP wrapper)
    master_params: list  # the float32 weights the optimizer steps (the model's own parameters unless fp16)
    state_dict_of: Callable  # (params, model=None) -> the model's state dict holding `params`, the run's config attached
    restart_optimization: Callable  # () -> a fresh optimizer and sampling averages at the current weights


# the lognormal noise levels of iCT (on its grid), ECT and sCM, declared once for the three (each brings its values)
LOGNORMAL_FLAGS = dict(
    p_mean=(-1.1, "lognormal noise levels ln(sigma) ~ N(p_mean, p_std^2): the mean"),
    p_std=(2.0, "the lognormal's standard deviation"),
)
LOGNORMAL_RANGES = {"p_std": POSITIVE}

# the time derivative of the network that sCM's tangent and the flow map's target take (cm/jvp.py), declared once for both
JVP_FLAGS = dict(
    jvp=("forward", "dF/dt: forward (torch.func.jvp) | finite_diff"),
    jvp_eps=(1e-3, "the step of --jvp finite_diff (in t; x moves by eps dx/dt)"),
)
JVP_RANGES = {"jvp_eps": POSITIVE}


def check_jvp_flags(mode, args):
    """One clear error for the flags a method that takes a JVP (in float32, cm.jvp) cannot run with."""
    if args.use_fp16:
        raise ValueError(f"--training_mode {mode} runs its JVP in float32 and trains in float32 or bf16; fp16 is "
                         "refused (pass --precision bf16 or fp32 instead of --use_fp16)")
    if args.jvp not in JVP_METHODS:
        raise ValueError(f"unknown --jvp {args.jvp!r}; choose one of {', '.join(JVP_METHODS)}")


def start_from_teacher(model, build_teacher):
    """The (network, denoiser) of --teacher_model_path, its weights also loaded into the student `model`:
    the student starts from the teacher (as published, for every method)."""
    teacher, teacher_diffusion = build_teacher()
    model.load_state_dict(teacher.state_dict())
    return teacher, teacher_diffusion


class TrainingMethod:
    """The interface, with the defaults most methods keep. Subclasses set the class attributes and
    implement draw() and losses(); see cm/methods/edm.py for the smallest one.

    A method that evaluates its online network at one noise level per sample may also offer the hooks a wrapper
    redraws those levels with (the consistency methods do): draw_noise(rand, batch), the noise its draw() takes
    first; level_rows(sigma, step), the rows its draw() makes for the online EDM noise levels sigma; and, where its
    loss reads no target network (sCM), denoised(model, micro, rows, cond), the clean-image estimate at the rows."""

    name = ""  # its --training_mode
    parameterization = CONSISTENCY  # what its models are sampled as (cm.parameterizations)
    sampler = ""  # the sampler evaluations during training use for a denoiser's samples (empty: heun, its first)
    flags = {}  # its own flags, declared here only: {flag: (default, one-line help)} (a subclass inherits them)
    # the ranges of those number flags that have one, {flag: (test, words)} (cm.cli.POSITIVE, ...): checked with every
    # number flag before a run starts (cm.run_setup), and by check_flags
    flag_ranges = {}
    flag_defaults = {}  # flag values it brings (a --config preset and the command line override them)
    boundary_condition = True  # trains with the consistency scalings f(x, sigma_min) = x (CM paper, eq. 3)
    trains_without_end = False  # --total_training_steps 0 runs until stopped (EDM, as published)
    needs_teacher = False  # requires --teacher_model_path (an EDM checkpoint)

    @classmethod
    def check_flags(cls, args):
        """One clear error for flags the method cannot run with (before anything is built)."""
        check_ranges(args, cls.flag_ranges)
        if cls.needs_teacher and not getattr(args, "teacher_model_path", ""):
            raise ValueError(f"--training_mode {cls.name} needs --teacher_model_path (an EDM checkpoint)")
        if not cls.trains_without_end and getattr(args, "total_training_steps", 1) < 1:
            raise ValueError(f"--total_training_steps must be at least 1 for --training_mode {cls.name}, got "
                             f"{args.total_training_steps}")

    def __init__(self, args, diffusion):
        self.check_flags(args)
        self.diffusion = diffusion

    # ---- networks ----------------------------------------------------------------------------

    def build_networks(self, model, build_teacher=None):
        """Before the loop: make the extra networks from the freshly built `model`; `build_teacher()`
        returns the (network, denoiser) of --teacher_model_path with its weights, on the device (None:
        not given). A method without extra networks takes no teacher."""
        if build_teacher is not None:
            raise ValueError(
                f"--training_mode {self.name} takes no --teacher_model_path (to start from a checkpoint, pass "
                "--resume_checkpoint)"
            )

    def trainables(self):
        """{name: module}: the method's own trainable modules beside the network (built by build_networks, float32),
        trained by the loop's machinery: its optimizer (as a second parameter group), precision and loss scaling,
        gradient averaging over processes, clipping and learning-rate schedule. Their weights are saved by saved()."""
        return {}

    def setup(self, ctx, resumed):
        """Once the loop holds the model, its precision and optimizer (`ctx`, a MethodContext), and the method's
        saved files are restored (`resumed`: whether the run resumed): ready the extra networks for training."""

    # ---- one step ----------------------------------------------------------------------------

    def draw(self, rand, batch, step):
        """This step's random inputs, {name: tensor with one row per sample of this process}."""
        raise NotImplementedError

    def losses(self, model, micro, cond, rows, step):
        """{name: per-sample tensor}, "loss" the one trained on; `rows` are draw()'s rows of `micro`."""
        raise NotImplementedError

    def averages(self, step):
        """(params, rate) averages that follow the trained weights, updated with the sampling EMAs
        in one fused update after each optimizer step."""
        return []

    def after_step(self, ctx):
        """After the optimizer step and the averages, before the loop's step count moves on."""

    def lr(self, base_lr, step, lr_anneal_steps):
        """The learning rate at `step`: constant, or decayed linearly to 0 over lr_anneal_steps."""
        if not lr_anneal_steps:
            return base_lr
        return base_lr * (1 - step / lr_anneal_steps)

    def done(self, step, total_training_steps, lr_anneal_steps):
        # the published CM loop never ended with lr_anneal_steps=0; total_training_steps ends it
        return step >= total_training_steps

    def log_values(self, step):
        """{key: value} logged with every log line, beyond the loop's own."""
        return {}

    # ---- checkpoints -------------------------------------------------------------------------

    def saved(self, ctx):
        """{NAME: cm.checkpoints.Saved}: the method's files of every checkpoint (NAMENNNNNN.pt), declared once:
        what each holds, and how a resumed checkpoint's file (or its absence) restores it, before setup()."""
        return {}

    def state(self):
        """Training state beyond the loop's, saved in train_stateNNNNNN.pt."""
        return {}

    def load_state(self, state):
        pass
