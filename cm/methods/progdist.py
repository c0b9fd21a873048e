"""Progressive distillation (Salimans & Ho 2022) on the Karras grid: N halves every
distill_steps_per_iter steps (scale_mode progdist); at each new stage the student becomes the teacher
and training restarts (fresh optimizer and EMAs, learning-rate annealing from the top). Trained and
sampled with EDM's scalings."""

import torch

from ..checkpoints import Saved, load_model_weights, with_config
from ..losses import progdist_loss
from ..parameterizations import DENOISER
from .target import TargetNetworkMethod


class ProgressiveDistillation(TargetNetworkMethod):
    name = "progdist"
    boundary_condition = False
    parameterization = DENOISER
    sampler = "progdist"
    needs_teacher = True
    runs_teacher = True

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.stage_start = 0  # the step the current stage began

    def draw(self, rand, batch, step):
        noise = rand.randn(*batch.shape[1:])
        _, num_scales = self.ema_scale_fn(step)
        return {"noise": noise, "indices": rand.randint(0, num_scales)}  # n in 0..N-1

    def losses(self, model, micro, cond, rows, step):
        # the published loop passed keywords progdist_losses does not take; the meant teacher is the
        # teacher network, refreshed from the student at every new stage
        _, num_scales = self.ema_scale_fn(step)
        return progdist_loss(
            self.diffusion, model, micro, num_scales, cond, self.teacher_model, self.teacher_diffusion,
            rows["noise"], rows["indices"], self.diffusion.lpips_network(micro.device),
        )

    def after_step(self, ctx):
        super().after_step(ctx)
        if self.ema_scale_fn(ctx.step + 1)[1] == self.ema_scale_fn(ctx.step)[1]:
            return
        with torch.no_grad():
            for t, p in zip(self.teacher_model.parameters(), ctx.master_params):
                t.copy_(p)
        ctx.restart_optimization()
        self.stage_start = ctx.step + 1

    def lr(self, base_lr, step, lr_anneal_steps):
        if not lr_anneal_steps:
            return base_lr
        # annealed within each stage; the last stages (N = 2 and 1) last twice as long, as published
        length = lr_anneal_steps * (2 if self.ema_scale_fn(step)[1] <= 2 else 1)
        return base_lr * max(1 - (step - self.stage_start) / length, 0.0)

    def saved(self, ctx):
        # the teacher as it is at the checkpoint (the student of the stage's start)
        return super().saved(ctx) | {"teacher_model": Saved(
            state=lambda: with_config(self.teacher_model.state_dict(), ctx.config),
            load=lambda path: load_model_weights(self.teacher_model, path, what="teacher checkpoint"))}

    def state(self):
        return {"stage_start": self.stage_start}

    def load_state(self, state):
        self.stage_start = int(state.get("stage_start", 0))
