"""MeanFlow (Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling", 2025, Algorithm 1) on the
linear flow path of cm/flowmap.py.

Per sample: two times from one logit-normal, t the larger and r the smaller, and r set to t with probability
1 - ratio (the paper's sampler; r = t trains the instantaneous velocity); z_t = (1 - t) x + t e, v = e - x; the
average velocity u_theta(z_t, r, t) of a network conditioned on (t, t - r); by the MeanFlow identity the target
    u_tgt = v - (t - r) (v d_z u + d_t u),
the total derivative d u / dt from one JVP along (v, 0, 1) (cm/jvp.py: r held fixed, so along (v, 1) in (z, t)),
under stop-gradient; the loss sg(w) ||u_theta - u_tgt||^2, summed over the image, with the adaptive weight
w = 1 / (||Delta||^2 + c)^p (Sec. 4.3). Sampled in one step, z_0 = z_1 - u(z_1, 0, 1), or in several jumps.

Classifier-free guidance folded into training (Sec. 4.2, an option; the network needs a null class, --null_class):
a share of the samples (--meanflow_class_dropout) trains without its class, on v; the others on the guided field
    v~ = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | no class)
(the instantaneous velocities r = t of the network itself, without gradient and without dropout) where t lies in
[--meanflow_cfg_t_min, --meanflow_cfg_t_max], in place of v in the JVP's direction and the target; one step then
samples the guided model, whose effective scale is omega / (1 - kappa).
"""

import torch

from ..flowmap import FlowMap, interpolate, logit_normal
from ..jvp import network_jvp
from ..nn import append_dims
from ..parameterizations import FLOW_MAP
from ..random_util import rng_states, set_rng_states
from ..cli import FRACTION, NON_NEGATIVE, POSITIVE
from .base import JVP_FLAGS, JVP_RANGES, TrainingMethod, check_jvp_flags


class MeanFlow(TrainingMethod):
    name = "meanflow"
    parameterization = FLOW_MAP
    boundary_condition = False  # (no Karras scalings: the flow map's jump to r = 0 is its estimate of the data)
    # the paper's CIFAR-10 U-Net settings (Table 3 / py-meanflow's v0 script): ratio 0.75, logit-normal (-2.0, 2.0),
    # p 0.75, c 1e-3; its ImageNet settings are in configs/meanflow_*.json
    flags = dict(
        meanflow_ratio=(0.75, "share of samples with r != t (the others r = t: the instantaneous velocity)"),
        meanflow_p_mean=(-2.0, "the times' logit-normal: sigmoid(N(p_mean, p_std^2)), the mean"),
        meanflow_p_std=(2.0, "the times' logit-normal: the standard deviation"),
        meanflow_norm_p=(0.75, "adaptive weight 1 / (||Delta||^2 + c)^p: p (0: the plain squared error)"),
        meanflow_norm_c=(1e-3, "adaptive weight 1 / (||Delta||^2 + c)^p: c"),
        meanflow_class_dropout=(0.0, "share of samples trained without their class (guidance; needs --null_class)"),
        meanflow_cfg_omega=(1.0, "guidance folded into training: omega (1 with kappa 0: none)"),
        meanflow_cfg_kappa=(0.0, "guidance folded into training: kappa (the mixture's conditional share)"),
        meanflow_cfg_t_min=(0.0, "guidance only for t >= this"),
        meanflow_cfg_t_max=(1.0, "guidance only for t <= this"),
        **JVP_FLAGS,
    )
    flag_ranges = {**JVP_RANGES, "meanflow_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"), "meanflow_p_std": POSITIVE,
                   "meanflow_norm_p": NON_NEGATIVE, "meanflow_norm_c": POSITIVE, "meanflow_class_dropout": FRACTION}
    flag_defaults = dict(time_inputs=2, dropout=0.2)

    @classmethod
    def check_flags(cls, args):
        super().check_flags(args)
        if getattr(args, "time_inputs", 1) != 2:
            raise ValueError(f"--training_mode {cls.name} conditions the network on two times (t, t - r): pass "
                             f"--time_inputs 2, got {getattr(args, 'time_inputs', 1)}")
        check_jvp_flags(cls.name, args)
        if not 0 <= args.meanflow_cfg_t_min <= args.meanflow_cfg_t_max <= 1:
            raise ValueError("--meanflow_cfg_t_min and --meanflow_cfg_t_max must satisfy 0 <= t_min <= t_max <= 1, got "
                             f"{args.meanflow_cfg_t_min} and {args.meanflow_cfg_t_max}")
        if cls.guided(args) and not (args.class_cond and getattr(args, "null_class", False)):
            raise ValueError(f"--training_mode {cls.name} with guidance (--meanflow_class_dropout, --meanflow_cfg_omega "
                             "or --meanflow_cfg_kappa) needs a class-conditional network with a null class: pass "
                             "--class_cond True --null_class True")

    @staticmethod
    def guided(args):
        return args.meanflow_class_dropout > 0 or args.meanflow_cfg_omega != 1 or args.meanflow_cfg_kappa != 0

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.flow_map = FlowMap()
        self.ratio, self.p_mean, self.p_std = args.meanflow_ratio, args.meanflow_p_mean, args.meanflow_p_std
        self.norm_p, self.norm_c = args.meanflow_norm_p, args.meanflow_norm_c
        self.jvp, self.jvp_eps = args.jvp, args.jvp_eps
        self.null_class = args.num_classes if self.guided(args) else None  # the label meaning no class
        self.class_dropout = args.meanflow_class_dropout
        self.omega, self.kappa = args.meanflow_cfg_omega, args.meanflow_cfg_kappa
        self.cfg_times = (args.meanflow_cfg_t_min, args.meanflow_cfg_t_max)

    def draw(self, rand, batch, step):
        a, b = (logit_normal(rand.randn(), self.p_mean, self.p_std) for _ in range(2))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r = torch.where(rand.rand() < self.ratio, r, t)
        rows = {"noise": rand.randn(*batch.shape[1:]), "t": t, "r": r}
        if self.null_class is not None:
            rows["unconditional"] = rand.rand() < self.class_dropout
        return rows

    @torch.no_grad()
    def guided_velocity(self, net, z_t, t, v, cond, unconditional):
        """The field the samples learn: v~ (module docstring) for the conditional samples at guided times, v elsewhere;
        and the labels they are trained with (the null class for the unconditional ones)."""
        y = cond["y"]
        null = torch.full_like(y, self.null_class)
        guide = ~unconditional & (t >= self.cfg_times[0]) & (t <= self.cfg_times[1])
        if (self.omega, self.kappa) != (1.0, 0.0):
            training = net.training
            net.eval()  # (no dropout: the field is a target)
            with torch.autocast(z_t.device.type, enabled=False):
                u_c, u_n = (self.flow_map.network(net, z_t, t, t, **{**cond, "y": labels}) for labels in (y, null))
            net.train(training)
            guided = self.omega * v + self.kappa * u_c.to(v.dtype) + (1 - self.omega - self.kappa) * u_n.to(v.dtype)
            v = torch.where(append_dims(guide, v.ndim), guided, v)
        return v, {**cond, "y": torch.where(unconditional, null, y)}

    def losses(self, model, micro, cond, rows, step):
        e, t, r = rows["noise"], rows["t"].to(micro.dtype), rows["r"].to(micro.dtype)
        z_t = interpolate(micro, e, t)
        v = e - micro
        net = getattr(model, "module", model)  # the stop-gradient JVP needs no DDP
        if self.null_class is not None:
            v, cond = self.guided_velocity(net, z_t, t, v, cond, rows["unconditional"])

        def u(z, s):  # r held fixed: the JVP along (v, 1) in (z, t) is MeanFlow's along (v, 0, 1) in (z, r, t)
            return self.flow_map.network(net, z, r, s, **cond)

        dropout_state = rng_states(micro.device)
        _, du_dt = network_jvp(u, z_t, t, v, self.jvp, self.jvp_eps, value=False)  # (the target needs no u itself)
        target = v - append_dims(t - r, v.ndim) * du_dt
        set_rng_states(micro.device, dropout_state)  # the trained pass draws the JVP's dropout mask
        u_theta = self.flow_map.network(model, z_t, r, t, **cond).to(target.dtype)
        error = ((u_theta - target) ** 2).flatten(1).sum(1)
        weight = (error.detach() + self.norm_c) ** -self.norm_p
        return {"loss": weight * error, "error": error}
