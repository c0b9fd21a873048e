"""The training loop of every method (cm/methods/): the loop does precision, DDP, microbatches, the
optimizer, the sampling EMAs, logging and checkpoint cadence, and asks the method for the rest.

RAdam with weight decay and optional linear learning-rate annealing; microbatches
(weighted by size, so a split batch takes the same step as the whole); several EMA rates; float32,
bf16 autocast, or fp16 with float32 master weights and dynamic loss scaling (steps with inf/NaN
gradients skipped, as published); DistributedDataParallel when there are several processes.

Randomness per step (noise, noise levels) is drawn for the whole global batch from a generator
seeded by (seed, step), and each process keeps its own rows: K processes with batch b and one
process with batch K*b take the same step, and a resumed run continues exactly.
Checkpoints use the published file names, are written atomically, model file last; a run resumes
by itself from the newest complete checkpoint in its folder.
"""

import contextlib
from dataclasses import dataclass
import json
import math
import time
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import Adam, RAdam
from tqdm.auto import tqdm

from . import dist_util, logger
from .checkpoints import CheckpointIO, Saved, load_model_weights, parse_resume_step_from_filename, with_config
from .cli import NonFiniteLossError
from .ema import EMASet
from .phema import power_beta, std_to_exp
from .plots import ema_label
from .run_folder import release_run_folder
from .fast_paths import apply_fast_paths
from .methods import MethodContext

INITIAL_LOG_LOSS_SCALE = 20.0  # published: lg_loss_scale climbs to 20-21 within ~1K ImageNet steps


class StepRandom:
    """Random numbers of one optimisation step, drawn for the whole global batch (world_size x batch)
    from a generator seeded by (seed, step); this process keeps rows [rank*batch, (rank+1)*batch)."""

    def __init__(self, seed, step, rank, world_size, batch_size, device):
        self.gen = torch.Generator(device).manual_seed((seed << 32) + step)
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.global_batch = world_size * batch_size
        self.device = device

    def randn(self, *per_sample_shape):
        return torch.randn(self.global_batch, *per_sample_shape, generator=self.gen, device=self.device)[self.rows]

    def randint(self, low, high):
        return torch.randint(low, high, (self.global_batch,), generator=self.gen, device=self.device)[self.rows]

    def rand(self):
        """One uniform number in [0, 1) per sample."""
        return torch.rand(self.global_batch, generator=self.gen, device=self.device)[self.rows]


class Precision:
    """float32, bf16 autocast, or fp16 (torso in float16, float32 master weights, loss scaling).

    `extra_params`: float32 weights trained beside the model's (a method's declared trainables): stepped, loss-scaled,
    clipped and counted in the gradient norm with the master weights, but no part of the model (its averages, its
    checkpoint)."""

    def __init__(self, model, mode="fp32", fp16_scale_growth=1e-3, initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
                 extra_params=()):
        if mode not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"unknown precision {mode!r}; choose fp32, fp16 or bf16")
        self.mode = mode
        self.model = model
        self.fp16_scale_growth = fp16_scale_growth
        self.lg_loss_scale = initial_lg_loss_scale
        self.model_params = list(model.parameters())
        if mode == "fp16" and getattr(model, "float32_weights", False):  # (EDM2: float32 weights cast where used)
            self.master_params = self.model_params
            model.convert_to_fp16()
        elif mode == "fp16":
            self.master_params = [p.detach().float().clone().requires_grad_(True) for p in self.model_params]
            model.convert_to_fp16()
        else:
            self.master_params = self.model_params
        self.extra_params = list(extra_params)
        if any(p.dtype != torch.float32 for p in self.extra_params):
            raise ValueError("a method's trainable modules must hold float32 weights (they are their own master weights)")
        self.trained_params = self.master_params + self.extra_params  # what the optimizer steps

    def autocast(self, device):
        if self.mode == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def zero_grad(self):
        for p in self.model_params + self.trained_params:
            p.grad = None

    def backward(self, loss):
        (loss * 2**self.lg_loss_scale if self.mode == "fp16" else loss).backward()

    def grad_norm(self):
        """The gradient norm of the trained weights, as a device tensor (no sync)."""
        grads = [p.grad for p in self.trained_params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())

    def param_norm(self):
        """The norm of the master weights, as a device tensor (read when logging only: a pass over
        every weight costs as much as an EMA update)."""
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in self.master_params])))

    def optimize(self, opt, clip=0.0):
        """Take the optimiser step; returns (took_step, grad_norm), the norm before clipping to `clip`
        (0: no clipping). fp16 skips a step whose gradients overflowed and halves the loss scale (its
        one host-device synchronisation per step, as published); otherwise the scale grows slowly."""
        if self.mode != "fp16":
            grad_norm = self.grad_norm()
            self.clip_gradients(grad_norm, clip)
            opt.step()
            return True, grad_norm
        scale = 2**self.lg_loss_scale
        for master, p in zip(self.master_params, self.model_params):
            master.grad = p.grad.float() if p.grad is not None else torch.zeros_like(master)
        grad_norm = self.grad_norm() / scale
        if not torch.isfinite(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"found inf/NaN gradients, skipped the step; lg_loss_scale now {self.lg_loss_scale}")
            self.zero_grad()
            return False, grad_norm
        torch._foreach_mul_([p.grad for p in self.trained_params if p.grad is not None], 1.0 / scale)
        self.clip_gradients(grad_norm, clip)
        opt.step()
        self.master_to_model()
        self.lg_loss_scale += self.fp16_scale_growth
        return True, grad_norm

    @torch.no_grad()
    def clip_gradients(self, grad_norm, clip):
        """Scale the gradients to norm at most `clip` (no host-device synchronisation)."""
        grads = [p.grad for p in self.trained_params if p.grad is not None]
        if clip > 0 and grads:
            torch._foreach_mul_(grads, torch.clamp(clip / (grad_norm + 1e-6), max=1.0))

    @torch.no_grad()
    def master_to_model(self):
        if self.master_params is not self.model_params:
            for p, master in zip(self.model_params, self.master_params):
                p.copy_(master)


def inverse_sqrt_decay(step, ref_steps):
    """EDM2's inverse-square-root learning-rate decay 1 / sqrt(max(step / t_ref, 1)) (Karras et al. 2024,
    Section 3; 1 when t_ref is 0)."""
    return 1.0 / math.sqrt(max(step / ref_steps, 1.0)) if ref_steps > 0 else 1.0


def linear_warmup(step, warmup_steps):
    """EDM2's learning-rate ramp-up min(step / warmup_steps, 1) (its rampup_Mimg in steps; 1 when warmup_steps is 0)."""
    return min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


class DeviceMeans:
    """Running sums of logged values kept on the device, read (one sync) only when logged."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, key, value):
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self):
        """The means since the last pop, averaged over all processes."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        values = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        values = dist_util.all_reduce_mean(values)
        self.sums, self.counts = {}, {}
        return dict(zip(keys, values.tolist()))


@dataclass(frozen=True)
class LoopSettings:
    """Everything the training loop is set with, one object (cm.run_setup.loop_settings makes it from the flags)."""

    batch_size: int  # per process
    lr: float
    ema_rate: str = "0.9999"  # comma-separated sampling EMA rates
    microbatch: int = -1  # -1: the whole batch at once
    log_interval: int = 10
    save_interval: int = 10000  # 0: a checkpoint at the end only
    resume_checkpoint: str = ""  # empty: the folder's newest complete checkpoint
    precision: str = "fp32"  # the torso's: fp32 | bf16 | fp16 (resolved: cm.precision)
    fp16_scale_growth: float = 1e-3
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0
    total_training_steps: int = 0
    seed: int = 0
    progress: bool = True
    channels_last: bool = False
    compile: bool = False
    optimizer: str = "radam"
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_ref_steps: int = 0
    lr_warmup_steps: int = 0
    grad_clip: float = 0.0
    phema_std: tuple = ()
    phema_snapshot_interval: int = 0


class TrainLoop:
    """Trains `model` by `method` (a cm.methods.TrainingMethod, its extra networks already built) on `data` with
    `settings` (LoopSettings); `config` (the run's resolved flags) is stored in every checkpoint. `evaluation` (e.g.
    evaluations.during_training.TrainingEvaluation, or None) measures the sampling networks when due(step, last):
    run(step, {label: () -> state dict}) returns the {column: value} logged at that step."""

    def __init__(self, *, model, method, data, settings, config=None, evaluation=None):
        s = settings
        self.model = model
        self.method = method
        self.data = data
        self.batch_size = s.batch_size
        self.microbatch = s.microbatch if s.microbatch > 0 else s.batch_size
        self.lr = s.lr
        self.ema_rate = [float(x) for x in str(s.ema_rate).split(",") if x]
        self.log_interval = s.log_interval
        self.save_interval = s.save_interval
        self.weight_decay = s.weight_decay
        self.lr_anneal_steps = s.lr_anneal_steps
        self.optimizer, self.adam_betas, self.adam_eps = s.optimizer, tuple(s.adam_betas), s.adam_eps
        self.lr_ref_steps, self.lr_warmup_steps, self.grad_clip = s.lr_ref_steps, s.lr_warmup_steps, s.grad_clip
        self.phema_std, self.phema_interval = list(s.phema_std), s.phema_snapshot_interval
        self.phema_gamma = [std_to_exp(std) for std in self.phema_std]
        self.total_training_steps = s.total_training_steps
        self.seed = s.seed
        self.config = config
        self.progress = s.progress
        self.fast_paths = dict(channels_last=s.channels_last, compile=s.compile)  # cm.fast_paths switches
        self.device = dist_util.dev()
        self.rank, self.world_size = dist_util.get_rank(), dist_util.get_world_size()
        self.global_batch = s.batch_size * self.world_size
        self.step = 0
        self.batches_consumed = 0
        self.first_bad_step = None  # device tensor: the first step whose loss was not finite
        self.last_inputs = None  # the last step's first microbatch: what a checkpoint's weights are checked on
        self.means = DeviceMeans()
        self.checkpoints = CheckpointIO(logger.get_dir())

        resume_path = self.checkpoints.resume_path(s.resume_checkpoint)
        self.resumed_step = None
        if resume_path:
            logger.log(f"resuming from {resume_path}")
            load_model_weights(model, resume_path, what="model checkpoint")
            self.step = self.resumed_step = parse_resume_step_from_filename(resume_path)
        logger.continue_progress(self.step)
        dist_util.sync_params(model.parameters())  # every rank starts from rank 0's weights
        apply_fast_paths([model], **self.fast_paths)  # before any copy of the weights is made
        self.trainables = method.trainables()  # {name: module}: trained beside the model by this loop's machinery
        extra_params = [p for module in self.trainables.values() for p in module.parameters()]
        # (fp16 converts the model before DDP sees it)
        self.precision = Precision(model, s.precision, s.fp16_scale_growth, extra_params=extra_params)
        self.ddp_model = self._wrap_ddp(model)
        self.opt = self._new_optimizer()
        self.ema = EMASet(self.ema_rate, self.precision.master_params)
        self.phema = EMASet(self.phema_std, self.precision.master_params)  # power-function EMAs (cm.phema)
        if resume_path:  # the method's files first, then the loop's (the model was read above)
            self.checkpoints.restore(resume_path, self.step, method.saved(self.method_context()))
        method.setup(self.method_context(), bool(resume_path))
        if resume_path:
            self.checkpoints.restore(resume_path, self.step, self._loop_files())
        self.evaluation = evaluation
        if evaluation is not None:
            with self.forked_rng():  # (building its networks draws random weights)
                evaluation.prepare(self.batch_size)

    # ---- construction and resume ------------------------------------------------------------

    def _wrap_ddp(self, model):
        if self.world_size == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, output_device=ids and ids[0], broadcast_buffers=False,
                   bucket_cap_mb=128, find_unused_parameters=False)

    def method_context(self):
        """What the method is handed of the run (cm.methods.MethodContext), never the loop itself."""
        return MethodContext(step=self.step, device=self.device, world_size=self.world_size, precision=self.precision.mode,
                             fast_paths=self.fast_paths, config=self.config, model=self.model,
                             master_params=self.precision.master_params, state_dict_of=self.params_state_dict,
                             restart_optimization=self.restart_optimization)

    def saved_files(self):
        """{NAME: cm.checkpoints.Saved}: every file of a checkpoint (NAMENNNNNN.pt) declared once, the method's
        first, the model last (written last: a model file present means its checkpoint is complete)."""
        return {**self.method.saved(self.method_context()), **self._loop_files()}

    def _loop_files(self):
        """The loop's own files of a checkpoint: the averages, the optimizer, the training state, the model last."""
        files = {}
        for rate, params in zip(self.ema_rate, self.ema.params):
            files[f"ema_{rate}_"] = self._saved_average(f"ema_{rate}_", params, partial(self.params_state_dict, params))
        for std, params in zip(self.phema_std, self.phema.params):
            files[f"phema_{std}_"] = self._saved_average(f"phema_{std}_", params, partial(self.phema_state, std, params))
        files["opt"] = Saved(
            state=lambda: self.opt.state_dict(),
            load=self._load_optimizer,
            missing=lambda path: logger.log(f"no opt{self.step:06d}.pt beside {path}: the optimizer starts afresh"))
        files["train_state"] = Saved(state=self.training_state, load=self._load_training_state)
        files["model"] = Saved(state=lambda: self.params_state_dict(self.precision.master_params))  # (read in __init__)
        return files

    def _saved_average(self, name, params, state):
        def load(path):
            saved = self.checkpoints.load(path, map_location=self.device)
            for p, (key, _) in zip(params, self.model.named_parameters()):
                p.copy_(saved[key])

        # a rate or std new to this run (or a bare model file resumed): it starts from the resumed weights
        return Saved(state=state, load=load, missing=lambda path: logger.log(
            f"no {name}{self.step:06d}.pt beside {path}: that average starts from the resumed model weights"))

    def _load_training_state(self, path):
        state = self.checkpoints.load(path, map_location="cpu")
        self.batches_consumed = int(state["batches_consumed"])
        self.precision.lg_loss_scale = float(state["lg_loss_scale"])
        self.method.load_state(state)
        # skip first: starting the data stream may draw from the global RNG, which is restored after
        self._skip_consumed_batches()
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)

    def _skip_consumed_batches(self):
        """Move the data stream to where the checkpointed run stopped."""
        skip = getattr(self.data, "skip", None)
        if skip is not None:
            skip(self.batches_consumed)
        else:
            for _ in range(self.batches_consumed):
                next(self.data)

    def _new_optimizer(self):
        """RAdam (as published) or Adam over the model's master weights, and the method's trainables as a second
        parameter group (absent when it declares none, so the optimizer's file keeps the published layout)."""
        cls = RAdam if self.optimizer == "radam" else Adam
        groups = [{"params": self.precision.master_params}]
        if self.precision.extra_params:
            groups.append({"params": self.precision.extra_params})
        return cls(groups, lr=self.lr, betas=self.adam_betas, eps=self.adam_eps, weight_decay=self.weight_decay)

    def _load_optimizer(self, path):
        saved = self.checkpoints.load(path, map_location=self.device)
        have, want = len(saved["param_groups"]), len(self.opt.param_groups)
        if have != want:  # the method's trainables (the second group) are new to the run, or gone from it
            logger.log(f"{path} has no optimizer state for the method's trainables ({', '.join(self.trainables)}): "
                       "theirs starts afresh" if have < want else
                       f"{path} has optimizer state for trainables this run does not train: it is left unused")
            gone = {i for group in saved["param_groups"][want:] for i in group["params"]}
            saved = {"state": {i: v for i, v in saved["state"].items() if i not in gone},
                     "param_groups": saved["param_groups"][:want] + self.opt.state_dict()["param_groups"][have:]}
        self.opt.load_state_dict(saved)

    def _average_extra_gradients(self):
        """DDP averages the model's gradients over the processes; the trainables' are averaged here, in one reduce."""
        extra = self.precision.extra_params
        if self.world_size == 1 or not extra:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in extra]
        flat = dist_util.all_reduce_mean(torch.cat([g.flatten() for g in grads]))
        for p, g in zip(extra, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def restart_optimization(self):
        """A fresh optimizer and sampling EMAs at the current weights (progressive distillation's new stage)."""
        self.opt = self._new_optimizer()
        self.ema.reset(self.precision.master_params)

    # ---- the loop ---------------------------------------------------------------------------

    def done(self):
        return self.method.done(self.step, self.total_training_steps, self.lr_anneal_steps)

    def run_loop(self):
        try:
            self._run_loop()
        finally:
            logger.close_backends()
            release_run_folder(logger.get_dir())  # (a run started by run_setup.start_run holds it)

    def _run_loop(self):
        last_saved = self.resumed_step
        bar = tqdm(
            total=self.total_training_steps or self.lr_anneal_steps or None,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not self.progress or self.rank != 0,
        )
        start, start_step = time.time(), self.step
        while not self.done():
            batch, cond = next(self.data)
            self.batches_consumed += 1
            took = self.run_step(batch, cond)
            bar.update(int(took))
            # (before the checkpoint of this step: a run killed while evaluating resumes before it, and evaluates again)
            evaluated = took and self.evaluate_if_due()
            if took and self.step % self.log_interval == 0:
                self._check_finite()
                rate = (self.step - start_step) * self.global_batch / max(time.time() - start, 1e-9)
                row = self.log_step(rate)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", img_per_s=f"{rate:.1f}")
            elif evaluated:  # a row of its own: the step and the metrics
                logger.logkv("step", self.step)
                logger.logkv("samples", self.step * self.global_batch)
                logger.dumpkvs(echo=not self.progress)
            if took and self.save_interval > 0 and self.step % self.save_interval == 0:
                self.save()
                last_saved = self.step
            elif took and self._phema_snapshot_due():
                self._check_before_saving()
                # (a snapshot between checkpoints: the power-function EMA files alone)
                self.checkpoints.save_files(self.step, {n: f for n, f in self._loop_files().items() if n.startswith("phema_")})
        bar.close()
        if last_saved != self.step:
            self.save()

    def run_step(self, batch, cond):
        """One optimisation step on this process's batch; returns whether the step was taken."""
        batch = batch.to(self.device, non_blocking=True)
        cond = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        rand = StepRandom(self.seed, self.step, self.rank, self.world_size, batch.shape[0], self.device)
        random_rows = self.method.draw(rand, batch, self.step)
        self.precision.zero_grad()
        n = batch.shape[0]
        first = slice(0, min(self.microbatch, n))
        self.last_inputs = (batch[first], {k: v[first] for k, v in cond.items()}, {k: v[first] for k, v in random_rows.items()})
        for i in range(0, n, self.microbatch):
            j = min(i + self.microbatch, n)
            micro_cond = {k: v[i:j] for k, v in cond.items()}
            micro_random = {k: v[i:j] for k, v in random_rows.items()}
            sync = j >= n or self.ddp_model is self.model
            with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                with self.precision.autocast(self.device):
                    losses = self.method.losses(self.ddp_model, batch[i:j], micro_cond, micro_random, self.step)
                loss = losses["loss"].float().mean()
                self._track_finite(loss)
                # weight each microbatch by its share, so a split batch takes the same step as the whole
                self.precision.backward(loss * ((j - i) / n))
            for key, value in losses.items():
                self.means.add(key, value.float().mean())
        self._average_extra_gradients()
        took, grad_norm = self.precision.optimize(self.opt, self.grad_clip)
        self.means.add("grad_norm", grad_norm)
        if took:
            # the sampling EMAs and the method's averages (the target network) in one fused update
            images = (self.step + 1) * self.global_batch  # the time of the power-function profiles, in images
            phema = [(p, power_beta(g, images, self.global_batch)) for g, p in zip(self.phema_gamma, self.phema.params)]
            self.ema.update(self.precision.master_params, also=list(self.method.averages(self.step)) + phema)
            self.method.after_step(self.method_context())
            self.step += 1
        self._anneal_lr()
        return took

    def evaluate_if_due(self):
        """Run the evaluation when due at this step, its metrics logged with the step's row; returns whether it ran.
        It sees copies of the weights and runs with the random streams forked: the run is the same without it."""
        if self.evaluation is None or not self.evaluation.due(self.step, self.done()):
            return False
        self._check_finite()  # (a diverged run stops here, not in its samples)
        weights = {ema_label(rate): partial(self.params_state_dict, params)
                   for rate, params in zip(self.ema_rate, self.ema.params)}
        weights["model"] = partial(self.params_state_dict, self.precision.master_params)
        with self.forked_rng(), torch.no_grad():
            metrics = self.evaluation.run(self.step, weights)
        for key, value in metrics.items():
            logger.logkv(key, value)
        return True

    def forked_rng(self):
        """A context in which the global random streams (CPU, this process's GPU) may be drawn from: they are restored
        after it."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _track_finite(self, loss):
        if self.precision.mode == "fp16":
            return  # fp16 skips the steps whose gradients overflow instead
        # scalars, not torch.tensor(..., device=...): a host-to-device copy would synchronise the GPU
        bad = torch.where(torch.isfinite(loss), 2**62, self.step)
        self.first_bad_step = bad if self.first_bad_step is None else torch.minimum(self.first_bad_step, bad)

    def _check_finite(self):
        if self.first_bad_step is not None and self.first_bad_step.item() < 2**62:
            raise NonFiniteLossError(
                f"loss became inf/NaN at step {self.first_bad_step.item()}; lower --lr, or try --use_fp16 "
                "(which skips such steps); the last checkpoint is from before it"
            )

    def _check_before_saving(self):
        """Refuse to save weights that break the model. A finite loss at the last step says nothing of the
        update taken after it, which can carry the weights to where the forward pass is inf/NaN: so the
        weights about to be saved are run once more (no gradient, the RNG forked so the run's random stream
        is untouched) on the last step's first microbatch, with the same noise and the same step's settings (a
        draw of step k fits step k's loss only: progressive distillation halves its grid between steps)."""
        self._check_finite()
        if self.precision.mode == "fp16" or self.last_inputs is None:
            return  # fp16 skips the steps whose gradients overflow instead
        batch, cond, random_rows = self.last_inputs
        with self.forked_rng():
            with torch.no_grad(), self.precision.autocast(self.device):
                loss = self.method.losses(self.model, batch, cond, random_rows, self.step - 1)["loss"].float().mean()
        if dist_util.all_reduce_mean((~torch.isfinite(loss)).float()).item() > 0:  # every rank stops, or none
            raise NonFiniteLossError(
                f"the update of step {self.step} made the loss inf/NaN, so its checkpoint was not saved and the "
                "last checkpoint is from before it; lower --lr, or try --use_fp16 (which skips such steps)"
            )

    def current_lr(self):
        return (self.method.lr(self.lr, self.step, self.lr_anneal_steps) * inverse_sqrt_decay(self.step, self.lr_ref_steps)
                * linear_warmup(self.step, self.lr_warmup_steps))

    def _anneal_lr(self):
        for group in self.opt.param_groups:
            group["lr"] = self.current_lr()

    def log_step(self, images_per_second):
        for key, value in self.means.pop().items():
            logger.logkv(key, value)
        logger.logkv("param_norm", self.precision.param_norm().item())  # at this step (equal on every rank)
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        logger.logkv("lr", self.current_lr())
        logger.logkv("images_per_s", images_per_second)
        if self.precision.mode == "fp16":
            logger.logkv("lg_loss_scale", self.precision.lg_loss_scale)
        for key, value in self.method.log_values(self.step).items():
            logger.logkv(key, value)
        return logger.dumpkvs(echo=not self.progress)

    # ---- checkpoints ------------------------------------------------------------------------

    def params_state_dict(self, params, model=None):
        """`model`'s state dict (default: the trained model) with float32 copies of `params`
        (master, EMA or target tensors) in place of its parameters, and the run's config attached.
        Saved in the default memory format whatever the run's (--channels_last)."""
        model = model or self.model
        state = model.state_dict()
        for (name, _), p in zip(model.named_parameters(), params):
            state[name] = p.detach().float().clone(memory_format=torch.contiguous_format)
        return with_config(state, self.config)

    def _phema_snapshot_due(self):
        """Whether this step crossed a multiple of --phema_snapshot_interval images."""
        if not self.phema_std or self.phema_interval <= 0:
            return False
        images = self.step * self.global_batch
        return images // self.phema_interval > (images - self.global_batch) // self.phema_interval

    def phema_state(self, std, params):
        """The power-function EMA of `std` at this step as a model file, its profile in its config (cm.phema)."""
        profile = {"std": std, "step": self.step, "images": self.step * self.global_batch, "batch": self.global_batch}
        return with_config(self.params_state_dict(params), {**(self.config or {}), "phema": profile})

    def training_state(self):
        return {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "lg_loss_scale": self.precision.lg_loss_scale,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "config": json.dumps(self.config, sort_keys=True, default=str),
            **self.method.state(),
        }

    def save(self):
        """Write every file of the checkpoint at this step, each atomically, the model file last:
        a model file present means its checkpoint is complete."""
        self._check_before_saving()
        self.checkpoints.save_files(self.step, self.saved_files())
