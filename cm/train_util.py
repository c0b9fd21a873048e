"""Training loops: EDM (TrainLoop) and consistency models (CMTrainLoop: CD, CT, progressive distillation).

What they share: RAdam with weight decay and optional linear learning-rate annealing; microbatches
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
import json
import os
import re
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import RAdam
from tqdm.auto import tqdm

from . import dist_util, logger
from .checkpoints import atomic_save, state_dict_mismatch
from .ema import EMASet
from .fast_paths import apply_fast_paths
from .schedule import (
    ect_r,
    ect_stage,
    index_to_sigma,
    inverse_cdf_indices,
    lognormal_index_probabilities,
    lognormal_sigmas,
)

INITIAL_LOG_LOSS_SCALE = 20.0  # published: lg_loss_scale climbs to 20-21 within ~1K ImageNet steps


class NonFiniteLossError(RuntimeError):
    """A float32/bf16 run met an inf/NaN loss (fp16 runs skip such steps instead)."""


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


def sample_edm_sigmas(schedule_sampler, rand, diffusion):
    """Training noise levels of the EDM loss.
    lognormal: ln sigma ~ N(-1.2, 1.2^2) (the published LogNormalSampler);
    uniform: a uniform index of the diffusion's num_timesteps-point Karras grid (the published
    sampler handed the integer index itself to the loss as sigma; we use the grid's sigma)."""
    if schedule_sampler == "lognormal":
        return lognormal_sigmas(rand.randn(), -1.2, 1.2)
    if schedule_sampler == "uniform":
        n = diffusion.num_timesteps
        return index_to_sigma(rand.randint(0, n).float(), n, diffusion.sigma_min, diffusion.sigma_max, diffusion.rho)
    raise ValueError(f"unknown schedule_sampler {schedule_sampler!r} for EDM training; choose lognormal or uniform")


class Precision:
    """float32, bf16 autocast, or fp16 (torso in float16, float32 master weights, loss scaling)."""

    def __init__(self, model, mode="fp32", fp16_scale_growth=1e-3, initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE):
        if mode not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"unknown precision {mode!r}; choose fp32, fp16 or bf16")
        self.mode = mode
        self.model = model
        self.fp16_scale_growth = fp16_scale_growth
        self.lg_loss_scale = initial_lg_loss_scale
        self.model_params = list(model.parameters())
        if mode == "fp16":
            self.master_params = [p.detach().float().clone().requires_grad_(True) for p in self.model_params]
            model.convert_to_fp16()
        else:
            self.master_params = self.model_params

    def autocast(self, device):
        if self.mode == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def zero_grad(self):
        for p in self.model_params + self.master_params:
            p.grad = None

    def backward(self, loss):
        (loss * 2**self.lg_loss_scale if self.mode == "fp16" else loss).backward()

    def grad_norm(self):
        """The gradient norm of the master weights, as a device tensor (no sync)."""
        grads = [p.grad for p in self.master_params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())

    def param_norm(self):
        """The norm of the master weights, as a device tensor (read when logging only: a pass over
        every weight costs as much as an EMA update)."""
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in self.master_params])))

    def optimize(self, opt):
        """Take the optimiser step; returns (took_step, grad_norm). fp16 skips a step whose gradients
        overflowed and halves the loss scale (its one host-device synchronisation per step, as
        published); otherwise the scale grows slowly."""
        if self.mode != "fp16":
            grad_norm = self.grad_norm()
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
        torch._foreach_mul_([p.grad for p in self.master_params], 1.0 / scale)
        opt.step()
        self.master_to_model()
        self.lg_loss_scale += self.fp16_scale_growth
        return True, grad_norm

    @torch.no_grad()
    def master_to_model(self):
        if self.master_params is not self.model_params:
            for p, master in zip(self.model_params, self.master_params):
                p.copy_(master)


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


def with_config(state_dict, config):
    """Attach the run's resolved config to a state dict (in its metadata, which load_state_dict ignores),
    so every checkpoint says how it was made."""
    if config is not None:
        state_dict._metadata = getattr(state_dict, "_metadata", {})
        state_dict._metadata["cm_config"] = {"json": json.dumps(config, sort_keys=True, default=str)}
    return state_dict


def checkpoint_config(state_dict):
    """The config stored by with_config, or None."""
    meta = getattr(state_dict, "_metadata", {}).get("cm_config")
    return json.loads(meta["json"]) if meta else None


MODEL_FILE = re.compile(r"^model(\d{6,})\.pt$")


def parse_resume_step_from_filename(filename):
    """NNNNNN of path/to/modelNNNNNN.pt (0 when the name has no step)."""
    match = MODEL_FILE.match(os.path.basename(filename))
    return int(match.group(1)) if match else 0


class TrainLoop:
    """EDM training (denoising score matching at sigmas from the schedule sampler)."""

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler="lognormal",
        weight_decay=0.0,
        lr_anneal_steps=0,
        use_bf16=False,
        total_training_steps=0,
        seed=0,
        config=None,
        progress=True,
        channels_last=False,
        compile=False,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = [ema_rate] if isinstance(ema_rate, float) else [float(x) for x in str(ema_rate).split(",") if x]
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.schedule_sampler = schedule_sampler
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.total_training_steps = total_training_steps
        self.seed = seed
        self.config = config
        self.progress = progress
        self.fast_paths = dict(channels_last=channels_last, compile=compile)  # cm.fast_paths switches
        self.device = dist_util.dev()
        self.rank, self.world_size = dist_util.get_rank(), dist_util.get_world_size()
        self.global_batch = batch_size * self.world_size
        self.step = 0
        self.batches_consumed = 0
        self.first_bad_step = None  # device tensor: the first step whose loss was not finite
        self.means = DeviceMeans()

        resume_path = self._find_resume_checkpoint()
        self.resumed_step = None
        if resume_path:
            self._load_model(resume_path)
            self.resumed_step = self.step
        dist_util.sync_params(model.parameters())  # every rank starts from rank 0's weights
        apply_fast_paths([model], **self.fast_paths)  # before any copy of the weights is made
        mode = "fp16" if use_fp16 else "bf16" if use_bf16 else "fp32"
        self.precision = Precision(model, mode, fp16_scale_growth)  # (fp16 converts before DDP sees the model)
        self.ddp_model = self._wrap_ddp(model)
        self.opt = RAdam(self.precision.master_params, lr=lr, weight_decay=weight_decay)
        self.ema = EMASet(self.ema_rate, self.precision.master_params)
        self._setup_extra_models(resume_path)
        if resume_path:
            self._load_training_state(resume_path)

    # ---- construction and resume ------------------------------------------------------------

    def _wrap_ddp(self, model):
        if self.world_size == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, output_device=ids and ids[0], broadcast_buffers=False,
                   bucket_cap_mb=128, find_unused_parameters=False)

    def _setup_extra_models(self, resume_path):
        """Target / teacher networks (CMTrainLoop)."""

    def checkpoint_names(self, step):
        """The files one complete checkpoint consists of; the model file is written last."""
        names = [f"ema_{rate}_{step:06d}.pt" for rate in self.ema_rate]
        names += [f"opt{step:06d}.pt", f"train_state{step:06d}.pt"]
        return names + [f"model{step:06d}.pt"]

    def _find_resume_checkpoint(self):
        """--resume_checkpoint if given, else the newest complete checkpoint in the log folder."""
        if self.resume_checkpoint:
            if not os.path.exists(self.resume_checkpoint):
                raise FileNotFoundError(f"--resume_checkpoint {self.resume_checkpoint} does not exist")
            return self.resume_checkpoint
        folder = logger.get_dir()
        if not folder or not os.path.isdir(folder):
            return None
        steps = sorted((parse_resume_step_from_filename(f) for f in os.listdir(folder) if MODEL_FILE.match(f)), reverse=True)
        for step in steps:
            if all(os.path.exists(os.path.join(folder, n)) for n in self.checkpoint_names(step)):
                return os.path.join(folder, f"model{step:06d}.pt")
        return None

    def _load_into(self, model, path, what):
        state_dict = dist_util.load_state_dict(path, map_location="cpu")
        problems = state_dict_mismatch(model, state_dict)
        if problems:
            raise ValueError(f"{what} checkpoint {path} does not fit the model: {'; '.join(problems)}")
        model.load_state_dict(state_dict)

    def _load_model(self, path):
        logger.log(f"resuming from {path}")
        self._load_into(self.model, path, "model")
        self.step = parse_resume_step_from_filename(path)

    def _companion(self, path, name):
        """A file of the same checkpoint as model file `path` (None when absent)."""
        other = os.path.join(os.path.dirname(path), name)
        return other if os.path.exists(other) else None

    def _load_training_state(self, path):
        step = self.step
        opt_path = self._companion(path, f"opt{step:06d}.pt")
        if opt_path:
            self.opt.load_state_dict(dist_util.load_state_dict(opt_path, map_location=self.device))
        for rate, params in zip(self.ema_rate, self.ema.params):
            ema_path = self._companion(path, f"ema_{rate}_{step:06d}.pt")
            if ema_path:
                state = dist_util.load_state_dict(ema_path, map_location=self.device)
                for p, (name, _) in zip(params, self.model.named_parameters()):
                    p.copy_(state[name])
        state_path = self._companion(path, f"train_state{step:06d}.pt")
        if state_path:
            state = dist_util.load_state_dict(state_path, map_location="cpu")
            self.batches_consumed = int(state["batches_consumed"])
            self.precision.lg_loss_scale = float(state["lg_loss_scale"])
            self._load_extra_state(state)
            # skip first: starting the data stream may draw from the global RNG, which is restored after
            self._skip_consumed_batches()
            torch.set_rng_state(state["rng_cpu"])
            if self.device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)

    def _load_extra_state(self, state):
        pass

    def _skip_consumed_batches(self):
        """Move the data stream to where the checkpointed run stopped."""
        skip = getattr(self.data, "skip", None)
        if skip is not None:
            skip(self.batches_consumed)
        else:
            for _ in range(self.batches_consumed):
                next(self.data)

    # ---- the loop ---------------------------------------------------------------------------

    def done(self):
        limits = [n for n in (self.total_training_steps, self.lr_anneal_steps) if n]
        return bool(limits) and self.step >= min(limits)

    def run_loop(self):
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
            if took and self.step % self.log_interval == 0:
                self._check_finite()
                rate = (self.step - start_step) * self.global_batch / max(time.time() - start, 1e-9)
                row = self.log_step(rate)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", img_per_s=f"{rate:.1f}")
            if took and self.save_interval > 0 and self.step % self.save_interval == 0:
                self.save()
                last_saved = self.step
        bar.close()
        if last_saved != self.step:
            self.save()

    def compute_losses(self, micro, cond, rand_rows):
        return self.diffusion.training_losses(self.ddp_model, micro, rand_rows["sigmas"], model_kwargs=cond, noise=rand_rows["noise"])

    def draw_step_random(self, batch):
        """This step's random inputs for this process's rows of the global batch."""
        rand = StepRandom(self.seed, self.step, self.rank, self.world_size, batch.shape[0], self.device)
        return {"noise": rand.randn(*batch.shape[1:]), "sigmas": sample_edm_sigmas(self.schedule_sampler, rand, self.diffusion)}

    def run_step(self, batch, cond):
        """One optimisation step on this process's batch; returns whether the step was taken."""
        batch = batch.to(self.device, non_blocking=True)
        cond = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        random_rows = self.draw_step_random(batch)
        self.precision.zero_grad()
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            j = min(i + self.microbatch, n)
            micro_cond = {k: v[i:j] for k, v in cond.items()}
            micro_random = {k: v[i:j] for k, v in random_rows.items()}
            sync = j >= n or self.ddp_model is self.model
            with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                with self.precision.autocast(self.device):
                    losses = self.compute_losses(batch[i:j], micro_cond, micro_random)
                loss = losses["loss"].float().mean()
                self._track_finite(loss)
                # weight each microbatch by its share, so a split batch takes the same step as the whole
                self.precision.backward(loss * ((j - i) / n))
            for key, value in losses.items():
                self.means.add(key, value.float().mean())
        took, grad_norm = self.precision.optimize(self.opt)
        self.means.add("grad_norm", grad_norm)
        if took:
            self.after_optimizer_step()
            self.step += 1
        self._anneal_lr()
        return took

    def after_optimizer_step(self):
        self.ema.update(self.precision.master_params)

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

    def current_lr(self):
        if not self.lr_anneal_steps:
            return self.lr
        return self.lr * (1 - self.step / self.lr_anneal_steps)

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
        self.log_extra()
        return logger.dumpkvs(echo=not self.progress)

    def log_extra(self):
        pass

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

    def training_state(self):
        return {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "lg_loss_scale": self.precision.lg_loss_scale,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "config": json.dumps(self.config, sort_keys=True, default=str),
        }

    def extra_checkpoint_files(self, step):
        """{file name: state dict} of the networks beyond model, EMAs and optimizer (CMTrainLoop)."""
        return {}

    def save(self):
        """Write every file of the checkpoint at this step, each atomically, the model file last:
        a model file present means its checkpoint is complete."""
        self._check_finite()
        step, folder = self.step, logger.get_dir()
        files = {f"ema_{rate}_{step:06d}.pt": self.params_state_dict(p) for rate, p in zip(self.ema_rate, self.ema.params)}
        files[f"opt{step:06d}.pt"] = self.opt.state_dict()
        files.update(self.extra_checkpoint_files(step))
        files[f"train_state{step:06d}.pt"] = self.training_state()
        files[f"model{step:06d}.pt"] = self.params_state_dict(self.precision.master_params)
        if self.rank == 0:
            for name, obj in files.items():
                atomic_save(obj, os.path.join(folder, name))
            logger.log(f"saved checkpoint {step:06d} in {folder}")
        dist_util.barrier()


CM_TRAINING_MODES = (
    "consistency_distillation",
    "consistency_training",
    "progdist",
    "improved_consistency_training",
    "easy_consistency_tuning",
)
TEACHER_MODES = ("consistency_distillation", "progdist")  # their loss runs a teacher network
EDM_START_MODES = TEACHER_MODES + ("easy_consistency_tuning",)  # they need an EDM checkpoint (ECT: to start from)


def check_training_mode(training_mode, has_teacher=None):
    """One clear error for an unknown consistency training mode, or (when `has_teacher` is given) a
    mode that needs an EDM checkpoint without one."""
    if training_mode not in CM_TRAINING_MODES:
        raise ValueError(f"unknown --training_mode {training_mode}; choose one of {', '.join(CM_TRAINING_MODES)}")
    if training_mode in EDM_START_MODES and has_teacher is False:
        raise ValueError(f"--training_mode {training_mode} needs --teacher_model_path (an EDM checkpoint)")


class CMTrainLoop(TrainLoop):
    """Consistency distillation, consistency training, progressive distillation, improved consistency
    training (iCT: CT on noise levels from the discretised lognormal) and easy consistency tuning (ECT:
    continuous t ~ lognormal and r(t) from the stage schedule; the model starts as an EDM model)."""

    def __init__(
        self,
        *,
        target_model,
        teacher_model,
        teacher_diffusion,
        training_mode,
        ema_scale_fn,
        total_training_steps,
        teacher_solver="heun",
        p_mean=-1.1,
        p_std=2.0,
        ect_q=2.0,
        ect_k=8.0,
        ect_b=1.0,
        ect_stage_steps=25000,
        **kwargs,
    ):
        check_training_mode(training_mode, teacher_model is not None if training_mode in TEACHER_MODES else None)
        if training_mode == "easy_consistency_tuning" and not (ect_q > 1 and ect_stage_steps >= 1):
            raise ValueError(f"ECT needs --ect_q > 1 and --ect_stage_steps >= 1, got {ect_q} and {ect_stage_steps}")
        if p_std <= 0:
            raise ValueError(f"--p_std must be positive, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std
        self.ect_q, self.ect_k, self.ect_b, self.ect_stage_steps = ect_q, ect_k, ect_b, ect_stage_steps
        self.target_model = target_model
        self.teacher_model = teacher_model
        self.teacher_diffusion = teacher_diffusion
        self.training_mode = training_mode
        self.ema_scale_fn = ema_scale_fn
        self.teacher_solver = teacher_solver
        self.stage_start = 0  # progdist: the step its current stage began
        super().__init__(total_training_steps=total_training_steps, **kwargs)

    def _setup_extra_models(self, resume_path):
        self.target_model.requires_grad_(False)
        self.target_model.train()  # dropout as in the online network (its mask state is shared)
        target_file = resume_path and self._companion(resume_path, f"target_model{self.step:06d}.pt")
        if target_file:
            self._load_into(self.target_model, target_file, "target")
        elif resume_path:
            # fine-tuning from a bare model file (a published or converted checkpoint): the target
            # starts as the loaded network (the published loop left it at the random initialisation)
            self.target_model.load_state_dict(self.model.state_dict())
        if self.precision.mode == "fp16":
            self.target_master = [p.detach().float().clone() for p in self.target_model.parameters()]
            self.target_model.convert_to_fp16()
        else:
            self.target_master = list(self.target_model.parameters())
        if self.teacher_model is not None:
            self.teacher_model.requires_grad_(False)
            self.teacher_model.eval()
            teacher_file = resume_path and self._companion(resume_path, f"teacher_model{self.step:06d}.pt")
            if self.training_mode == "progdist" and teacher_file:
                self._load_into(self.teacher_model, teacher_file, "teacher")
        apply_fast_paths([self.target_model, self.teacher_model], **self.fast_paths)

    def checkpoint_names(self, step):
        names = super().checkpoint_names(step)
        extra = [f"target_model{step:06d}.pt"]
        if self.training_mode == "progdist":
            extra.append(f"teacher_model{step:06d}.pt")
        return extra + names

    def extra_checkpoint_files(self, step):
        files = {f"target_model{step:06d}.pt": self.params_state_dict(self.target_master, self.target_model)}
        if self.training_mode == "progdist":
            files[f"teacher_model{step:06d}.pt"] = with_config(self.teacher_model.state_dict(), self.config)
        return files

    def training_state(self):
        return dict(super().training_state(), stage_start=self.stage_start)

    def _load_extra_state(self, state):
        self.stage_start = int(state.get("stage_start", 0))

    def draw_step_random(self, batch):
        rand = StepRandom(self.seed, self.step, self.rank, self.world_size, batch.shape[0], self.device)
        noise = rand.randn(*batch.shape[1:])
        if self.training_mode == "easy_consistency_tuning":
            # ECT: t ~ lognormal(P_mean, P_std^2) in continuous time, r = r(t) at this step's stage
            t = lognormal_sigmas(rand.randn(), self.p_mean, self.p_std)
            r = ect_r(t, ect_stage(self.step, self.ect_stage_steps), self.ect_q, self.ect_k, self.ect_b)
            return {"noise": noise, "t": t, "r": r}
        _, num_scales = self.ema_scale_fn(self.step)
        if self.training_mode == "improved_consistency_training":
            # iCT: the pair (t_n, t_{n+1}) drawn from the lognormal's mass between them, by inverse CDF
            d = self.diffusion
            probs = lognormal_index_probabilities(num_scales, d.sigma_min, d.sigma_max, d.rho, self.p_mean, self.p_std)
            return {"noise": noise, "indices": inverse_cdf_indices(probs, rand.rand())}
        # CD/CT pick n in 0..N-2 (pairs t_n, t_{n+1}); progressive distillation n in 0..N-1
        high = num_scales if self.training_mode == "progdist" else num_scales - 1
        return {"noise": noise, "indices": rand.randint(0, high)}

    def compute_losses(self, micro, cond, rand_rows):
        _, num_scales = self.ema_scale_fn(self.step)
        if self.training_mode == "progdist":
            # the published loop passed keywords progdist_losses does not take; the meant teacher is
            # the teacher network, refreshed from the student at every new stage
            return self.diffusion.progdist_losses(
                self.ddp_model, micro, num_scales, model_kwargs=cond, teacher_model=self.teacher_model,
                teacher_diffusion=self.teacher_diffusion, noise=rand_rows["noise"], indices=rand_rows["indices"],
            )
        if self.training_mode == "easy_consistency_tuning":
            return self.diffusion.ect_losses(
                self.ddp_model, micro, rand_rows["t"], rand_rows["r"], model_kwargs=cond,
                target_model=self.target_model, noise=rand_rows["noise"],
            )
        teacher = self.teacher_model if self.training_mode == "consistency_distillation" else None
        return self.diffusion.consistency_losses(
            self.ddp_model, micro, num_scales, model_kwargs=cond, target_model=self.target_model,
            teacher_model=teacher, teacher_diffusion=self.teacher_diffusion, noise=rand_rows["noise"],
            indices=rand_rows["indices"], teacher_solver=self.teacher_solver,
        )

    def after_optimizer_step(self):
        target_ema, _ = self.ema_scale_fn(self.step)
        # the sampling EMAs and the target network in one fused update
        self.ema.update(self.precision.master_params, also=[(self.target_master, target_ema)])
        if self.precision.mode == "fp16":
            with torch.no_grad():
                for p, master in zip(self.target_model.parameters(), self.target_master):
                    p.copy_(master)
        if self.training_mode == "progdist":
            self._progdist_new_stage()

    def _progdist_new_stage(self):
        """At a change of N (after this step), the student becomes the teacher and training restarts:
        fresh optimizer and EMAs, learning-rate annealing from the top."""
        if self.ema_scale_fn(self.step + 1)[1] == self.ema_scale_fn(self.step)[1]:
            return
        with torch.no_grad():
            for t, p in zip(self.teacher_model.parameters(), self.precision.master_params):
                t.copy_(p)
        self.opt = RAdam(self.precision.master_params, lr=self.lr, weight_decay=self.weight_decay)
        self.ema.reset(self.precision.master_params)
        self.stage_start = self.step + 1

    def current_lr(self):
        if not self.lr_anneal_steps:
            return self.lr
        if self.training_mode == "progdist":
            # annealed within each stage; the last stages (N = 2 and 1) last twice as long, as published
            length = self.lr_anneal_steps * (2 if self.ema_scale_fn(self.step)[1] <= 2 else 1)
            return self.lr * max(1 - (self.step - self.stage_start) / length, 0.0)
        return super().current_lr()

    def done(self):
        # the published loop never ended with lr_anneal_steps=0; total_training_steps ends it
        return self.step >= self.total_training_steps

    def log_extra(self):
        target_ema, num_scales = self.ema_scale_fn(self.step)
        logger.logkv("target_ema", target_ema)
        if self.training_mode == "easy_consistency_tuning":
            logger.logkv("ect_stage", ect_stage(self.step, self.ect_stage_steps))
        else:
            logger.logkv("num_scales", num_scales)
