"""What the published consistency loop's methods share (CD, CT, iCT, ECT, progressive distillation):
the target network f^-, an optional frozen teacher, and the curriculum step -> (mu(k), N(k)).

The target starts as the online network and follows it with the curriculum's rate mu(k) (CM paper,
Algorithms 2 and 3; mu = 0: the online network itself, as iCT and ECT use it). Progressive
distillation keeps a target too, which its loss does not use: the published loop saved one for every
mode, and so do we.
"""

import copy

import torch

from ..checkpoints import Saved, load_model_weights
from ..fast_paths import apply_fast_paths
from ..schedule import create_ema_and_scales_fn
from .base import TrainingMethod, start_from_teacher


class TargetNetworkMethod(TrainingMethod):
    runs_teacher = False  # the loss evaluates the teacher network (CD, progdist); others only start from it

    @classmethod
    def check_flags(cls, args):
        super().check_flags(args)
        cls.curriculum(args)  # one clear error for a target EMA or N(k) schedule that cannot run

    @staticmethod
    def curriculum(args):
        return create_ema_and_scales_fn(
            target_ema_mode=args.target_ema_mode,
            start_ema=args.start_ema,
            scale_mode=args.scale_mode,
            start_scales=args.start_scales,
            end_scales=args.end_scales,
            total_steps=args.total_training_steps,
            distill_steps_per_iter=args.distill_steps_per_iter,
        )

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.ema_scale_fn = self.curriculum(args)
        self.use_fp16 = args.use_fp16
        self.target_model = self.teacher_model = self.teacher_diffusion = None

    def build_networks(self, model, build_teacher=None):
        if build_teacher is not None:
            teacher, teacher_diffusion = start_from_teacher(model, build_teacher)
            if self.runs_teacher:
                self.teacher_model, self.teacher_diffusion = teacher.eval(), teacher_diffusion
                if self.use_fp16:
                    self.teacher_model.convert_to_fp16()
        self.target_model = copy.deepcopy(model)  # f^- starts as the online network

    def setup(self, ctx, resumed):
        self.target_model.requires_grad_(False)
        self.target_model.train()  # dropout as in the online network (its mask state is shared)
        if ctx.precision == "fp16":
            self.target_master = [p.detach().float().clone() for p in self.target_model.parameters()]
            self.target_model.convert_to_fp16()
        else:
            self.target_master = list(self.target_model.parameters())
        if self.teacher_model is not None:
            self.teacher_model.requires_grad_(False)
            self.teacher_model.eval()
        apply_fast_paths([self.target_model, self.teacher_model], **ctx.fast_paths)

    def target(self):
        """The network the loss reads its targets f^- from: the target network (a subclass may answer some
        noise levels with another network, as truncated training does below its transition time)."""
        return self.target_model

    def averages(self, step):
        target_ema, _ = self.ema_scale_fn(step)
        return [(self.target_master, target_ema)]

    def after_step(self, ctx):
        if ctx.precision == "fp16":
            with torch.no_grad():
                for p, master in zip(self.target_model.parameters(), self.target_master):
                    p.copy_(master)

    def log_values(self, step):
        target_ema, num_scales = self.ema_scale_fn(step)
        return {"target_ema": target_ema, "num_scales": num_scales}

    def saved(self, ctx):
        return {"target_model": Saved(
            state=lambda: ctx.state_dict_of(self.target_master, self.target_model),
            load=lambda path: load_model_weights(self.target_model, path, what="target checkpoint"),
            # fine-tuning from a bare model file (a published or converted checkpoint): the target starts as the
            # loaded network (the published loop left it at the random initialisation)
            missing=lambda path: self.target_model.load_state_dict(ctx.model.state_dict()))}
