"""Easy consistency tuning (ECT, Geng et al. 2024): continuous t ~ lognormal(P_mean, P_std^2), r = r(t)
from the stage schedule, starting from an EDM model; trained with EDM's scalings, as published (the
network switches to the boundary-condition scalings only to sample)."""

from ..losses import ect_loss
from ..schedule import ect_r, ect_stage, lognormal_sigmas
from ..cli import NON_NEGATIVE
from .base import LOGNORMAL_FLAGS, LOGNORMAL_RANGES
from .target import TargetNetworkMethod


class EasyConsistencyTuning(TargetNetworkMethod):
    name = "easy_consistency_tuning"
    boundary_condition = False
    needs_teacher = True  # the EDM model it starts from
    # the published CIFAR-10 code: target = the online network without gradient, ||.||_2 (pseudo-Huber
    # with c = 0) weighted by 1 / (t - r)
    flags = dict(
        **LOGNORMAL_FLAGS,
        ect_q=(2.0, "r(t) = t (1 - n(t) / q^(stage + 1)): q"),
        ect_k=(8.0, "n(t) = 1 + k sigmoid(-b t): k (0: the constant mapping)"),
        ect_b=(1.0, "n(t)'s b"),
        ect_stage_steps=(25000, "d: a stage lasts this many steps (published CIFAR-10: 25k at batch 128)"),
        ect_ratio_limit=(1.0, "cap of the ratio 1 - 1 / q^(stage + 1) (1: none, as the ECT paper; NVlabs/TCM: 0.999)"),
    )
    flag_ranges = {**LOGNORMAL_RANGES, "ect_k": NON_NEGATIVE}
    flag_defaults = dict(
        target_ema_mode="fixed", start_ema=0.0, loss_norm="pseudo-huber", huber_c=0.0, weight_schedule="inverse-step",
    )

    @classmethod
    def check_flags(cls, args):
        super().check_flags(args)
        if not (args.ect_q > 1 and args.ect_stage_steps >= 1):
            raise ValueError(f"ECT needs --ect_q > 1 and --ect_stage_steps >= 1, got {args.ect_q} and {args.ect_stage_steps}")
        if not 0 < args.ect_ratio_limit <= 1:
            raise ValueError(f"--ect_ratio_limit must lie in (0, 1], got {args.ect_ratio_limit}")

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.p_mean, self.p_std = args.p_mean, args.p_std
        self.q, self.k, self.b, self.stage_steps = args.ect_q, args.ect_k, args.ect_b, args.ect_stage_steps
        self.ratio_limit = args.ect_ratio_limit

    def draw_noise(self, rand, batch):
        return rand.randn(*batch.shape[1:])

    def draw(self, rand, batch, step):
        noise = self.draw_noise(rand, batch)
        return {"noise": noise, **self.level_rows(lognormal_sigmas(rand.randn(), self.p_mean, self.p_std), step)}

    def level_rows(self, sigma, step):
        """The online level t = sigma and its target's r(t) of this step's stage."""
        stage = ect_stage(step, self.stage_steps)
        return {"t": sigma, "r": ect_r(sigma, stage, self.q, self.k, self.b, self.ratio_limit)}

    def losses(self, model, micro, cond, rows, step):
        return ect_loss(
            self.diffusion, model, micro, rows["t"], rows["r"], cond, self.target(), rows["noise"],
            self.diffusion.lpips_network(micro.device),
        )

    def log_values(self, step):
        target_ema, _ = self.ema_scale_fn(step)
        return {"target_ema": target_ema, "ect_stage": ect_stage(step, self.stage_steps)}
