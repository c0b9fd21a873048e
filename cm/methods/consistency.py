"""Consistency distillation (CD) and consistency training (CT), CM paper Algorithms 2 and 3, and
improved consistency training (iCT, Song & Dhariwal 2023): CT on noise-level pairs drawn from a
discretised lognormal, with iCT's weighting, distance and curriculum as flag defaults."""

import torch

from ..losses import consistency_loss
from ..schedule import index_to_sigma, inverse_cdf_indices, lognormal_index_probabilities
from .base import LOGNORMAL_FLAGS, LOGNORMAL_RANGES
from .target import TargetNetworkMethod


class ConsistencyTraining(TargetNetworkMethod):
    name = "consistency_training"

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.teacher_solver = args.teacher_solver

    def draw_noise(self, rand, batch):
        return rand.randn(*batch.shape[1:])

    def draw(self, rand, batch, step):
        noise = self.draw_noise(rand, batch)
        _, num_scales = self.ema_scale_fn(step)
        return {"noise": noise, "indices": rand.randint(0, num_scales - 1)}  # n in 0..N-2: pairs (t_n, t_{n+1})

    def level_rows(self, sigma, step):
        """The pair (t_n, t_{n+1}) whose online level t_n is the smallest of the grid's t_0..t_{N-2} at or above
        sigma (t_0 = sigma_max above it): a law over sigma put on the grid as iCT puts the lognormal's mass."""
        _, num_scales = self.ema_scale_fn(step)
        d = self.diffusion
        levels = index_to_sigma(torch.arange(num_scales - 1, dtype=torch.float64, device=sigma.device), num_scales,
                                d.sigma_min, d.sigma_max, d.rho)
        above = (levels[None, :] >= sigma.double()[:, None]).sum(1)
        return {"indices": (above - 1).clamp(min=0)}

    def losses(self, model, micro, cond, rows, step):
        _, num_scales = self.ema_scale_fn(step)
        return consistency_loss(
            self.diffusion, model, micro, num_scales, cond, self.target(), self.teacher_model,
            self.teacher_diffusion, rows["noise"], rows["indices"], self.teacher_solver,
            self.diffusion.lpips_network(micro.device),
        )


class ConsistencyDistillation(ConsistencyTraining):
    name = "consistency_distillation"
    needs_teacher = True
    runs_teacher = True


class ImprovedConsistencyTraining(ConsistencyTraining):
    name = "improved_consistency_training"
    # Song & Dhariwal 2023, Table 1: no target EMA, pseudo-Huber, exponential curriculum s0 = 10, s1 = 1280,
    # weighting 1 / (sigma_{i+1} - sigma_i) (the lognormal noise levels come with the method itself)
    flags = LOGNORMAL_FLAGS
    flag_ranges = LOGNORMAL_RANGES
    flag_defaults = dict(
        target_ema_mode="fixed", start_ema=0.0, scale_mode="exponential", start_scales=10, end_scales=1280,
        loss_norm="pseudo-huber", weight_schedule="inverse-step",
    )

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.p_mean, self.p_std = args.p_mean, args.p_std

    def draw(self, rand, batch, step):
        # the pair (t_n, t_{n+1}) drawn from the lognormal's mass between them, by inverse CDF
        noise = self.draw_noise(rand, batch)
        _, num_scales = self.ema_scale_fn(step)
        d = self.diffusion
        probs = lognormal_index_probabilities(num_scales, d.sigma_min, d.sigma_max, d.rho, self.p_mean, self.p_std)
        return {"noise": noise, "indices": inverse_cdf_indices(probs, rand.rand())}
