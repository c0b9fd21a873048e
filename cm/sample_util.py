"""Drawing large sample batches: rounds over all processes, samples in global order, resumable shards.

Sample i has the same label and random numbers whatever the batch size and number of processes
(and so the same image up to float rounding: kernels round differently at other batch sizes):
round r covers global samples [done, done + world * b), row j of rank k is global sample
done + k + j * world, and the generator is moved to `done` before each round (cm.random_util).
After each round rank 0 writes the round's images as a shard file; a killed run started again with
the same settings continues after its last complete shard, and the final batch equals an
uninterrupted run's.
"""

import argparse
import json
import math
import os
import re
import shutil
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dist_util, logger
from .atomic import atomic_write_text
from .checkpoints import UNSEEN_FLAGS, check_stored_flags, flag_text, load_model_weights, stored_flag_changes
from .cli import add_dict_to_argparser, args_to_dict
from .diffusers_convert import read_weights
from .fast_paths import apply_fast_paths
from .image_io import save_npz, to_uint8_nhwc
from .precision import resolve_precision_args
from .random_util import get_generator
from .samplers import karras_sample
from .methods import CONSISTENCY_SAMPLERS, KINDS, model_kind, parameterization, samples_with_boundary_condition, trained_kind
from .script_util import create_model_and_diffusion, model_and_diffusion_defaults
from .trigflow import TrigFlowDenoiser, sample_trigflow

def sampling_argparser(description, **script_defaults):
    """The parser of a sampling script: the published image_sample.py flags, this project's additions,
    the model's flags, then the script's own (which may override a default)."""
    defaults = dict(
        training_mode="edm",  # edm, or a consistency mode (boundary-condition scalings)
        generator="determ",  # dummy | determ | determ-indiv | torch (diffusers' order)
        clip_denoised=True,  # clamp each denoised estimate to [-1, 1]
        num_samples=10000,  # samples to draw in all
        batch_size=16,  # samples per process per round
        sampler="heun",  # heun | euler | dpm | ancestral | onestep | multistep | progdist
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        steps=40,  # sampler steps (multistep: points of the Karras grid that --ts indexes)
        model_path="",  # checkpoint; empty: a randomly initialised model
        seed=42,
        seeds="",  # comma-separated seeds: one batch per seed, in LOG_DIR/seed_S/ (repeated evaluations)
        ts="",  # multistep grid indices, e.g. 0,22,39
        class_labels="",  # fixed labels, cycled over the samples; empty: uniform over num_classes
        device="",  # cpu | cuda | cuda:N; empty: this rank's GPU if any, else the CPU
        log_dir="",  # output folder; empty: $OPENAI_LOGDIR, else runs/<time>
        channels_last=False,  # fast path: run the network in the channels_last (NHWC) memory format
        compile=False,  # fast path: torch.compile the network (compiles on the first batch)
        precision="auto",  # auto | fp32 | bf16 | fp16 of the torso; auto: bf16 where the device runs it natively
        time_input="edm",  # sCM models' time input: edm (the EDM network's c_noise(sigma_d tan t)) | identity (t; sCT)
        t_mid="1.1",  # sCM multistep: the intermediate TrigFlow times, decreasing (the paper's ImageNet-64 two-step: 1.1)
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(script_defaults)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    return parser


# the flags that decide what the samples are (a resumed run must agree on them)
SAMPLE_SETTINGS = (
    "training_mode", "generator", "clip_denoised", "num_samples", "sampler", "s_churn", "s_tmin", "s_tmax",
    "s_noise", "steps", "model_path", "seed", "ts", "class_labels", "sigma_min", "sigma_max", "precision",
    "time_input", "t_mid", "c_noise", "double_norm",
)


def parse_int_list(text, flag):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated integers, got {text!r}") from None


def check_grid_indices(ts, steps):
    """--ts: at least two strictly increasing indices of the --steps-point Karras grid."""
    if len(ts) < 2 or any(not 0 <= t < steps for t in ts) or list(ts) != sorted(set(ts)):
        raise ValueError(f"--ts must be two or more increasing grid indices in 0..{steps - 1} (--steps {steps}), "
                         f"e.g. 0,{steps // 2},{steps - 1}; got {','.join(map(str, ts)) or 'none'}")


def sampling_seeds(args):
    """The seeds of --seeds (distinct), or None: one batch at --seed."""
    seeds = parse_int_list(args.seeds, "seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {args.seeds!r}")
    return seeds or None


def check_sampling_args(args):
    """The flag combinations that cannot work, as one-line errors; returns (ts, class_labels)."""
    trigflow = parameterization(args.training_mode) == "trigflow"
    if trigflow and args.sampler not in ("onestep", "multistep"):
        raise ValueError(f"--training_mode {args.training_mode} samples with --sampler onestep, or multistep at --t_mid")
    ts = parse_int_list(args.ts, "ts") if args.sampler == "multistep" and not trigflow else None
    if ts is not None:
        check_grid_indices(ts, args.steps)
    class_labels = parse_int_list(args.class_labels, "class_labels") if args.class_labels else ()
    if class_labels and not args.class_cond:
        raise ValueError("--class_labels needs a class-conditional model (--class_cond True)")
    if any(not 0 <= c < args.num_classes for c in class_labels):
        raise ValueError(f"--class_labels must lie in 0..{args.num_classes - 1}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num_samples and --batch_size must be at least 1")
    return ts, class_labels


def trigflow_t_mid(args):
    """sCM's intermediate times of --sampler multistep (--t_mid, decreasing, in (0, pi/2)); () for one step."""
    if args.sampler != "multistep" or parameterization(args.training_mode) != "trigflow":
        return ()
    try:
        times = tuple(float(v) for v in args.t_mid.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--t_mid must be comma-separated numbers, got {args.t_mid!r}") from None
    if not times or any(not 0 < t < math.pi / 2 for t in times) or list(times) != sorted(times, reverse=True):
        raise ValueError(f"--t_mid must be decreasing times in (0, pi/2), e.g. 1.1; got {args.t_mid!r}")
    return times


def read_sampling_weights(args, sampler=None):
    """The weights of --model_path (None without one), checked against the flags before the output folder is touched:
    a file trained as another kind of model (cm.methods.KINDS, from its stored --training_mode; its time input and
    UNSEEN_FLAGS likewise) or, given `sampler`, one its kind is not sampled with, is one line naming the flags to pass.
    A file without a stored --training_mode (a published one) is checked on those flags it stores only."""
    if not args.model_path:
        return None
    state = read_weights(args.model_path)
    trained = trained_kind(state)
    kind = trained[1] if trained else model_kind(args.training_mode)
    keys = UNSEEN_FLAGS + (("time_input",) if kind == "trigflow" else ())
    if trained is None:
        check_stored_flags(state, vars(args), args.model_path, keys)
        return state
    wanted = stored_flag_changes(state, vars(args), keys)
    if kind != model_kind(args.training_mode):
        wanted = {"training_mode": trained[0], **wanted}
    if sampler is not None and (sampler in CONSISTENCY_SAMPLERS) != (kind != "denoiser"):
        wanted["sampler"] = "heun" if kind == "denoiser" else "onestep"
    if wanted:
        raise ValueError(f"{args.model_path} was trained as --training_mode {trained[0]}, {KINDS[kind]}; pass "
                         f"{flag_text(wanted)} (got {flag_text({k: getattr(args, k) for k in wanted})})")
    return state


def load_sampling_model(args, state=None):
    """The model and its denoiser from the flags, weights loaded (`state`, read by read_sampling_weights, or read
    here), on this rank's device, in eval mode, its torso in the precision chosen for this device (cm.precision;
    resolved into the flags)."""
    resolve_precision_args(args, dist_util.dev(), log=logger.log)
    # every consistency model uses the boundary-condition scalings; EDM models do not
    distillation = samples_with_boundary_condition(args.training_mode)
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, model_and_diffusion_defaults().keys()), distillation=distillation
    )
    if parameterization(args.training_mode) == "trigflow":  # sCM models: time t, f = cos(t) x - sin(t) sigma_d F
        diffusion = TrigFlowDenoiser(diffusion.sigma_data, args.time_input, diffusion.sigma_max, diffusion.c_noise)
    if args.model_path:
        logger.log(f"loading {args.model_path}")
        load_model_weights(model, args.model_path, read_sampling_weights(args) if state is None else state)
    else:
        logger.log("no --model_path: sampling from a randomly initialised model (pipeline smoke test)")
    model.to(dist_util.dev())
    if args.use_fp16:
        model.convert_to_fp16()
    elif args.use_bf16:
        model.convert_to_bf16()
    apply_fast_paths([model], channels_last=args.channels_last, compile=args.compile)
    return model.eval(), diffusion


def sample_kwargs(args):
    """karras_sample's settings from the flags."""
    return dict(
        clip_denoised=args.clip_denoised, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax, s_noise=args.s_noise,
    )


SHARD = re.compile(r"^shard_(\d{9})_(\d{9})\.npz$")


def round_sizes(num_samples, batch_size, world_size, done=0):
    """Per-process batch of each round from `done` on; the last round takes only what is left."""
    while done < num_samples:
        per_rank = min(batch_size, math.ceil((num_samples - done) / world_size))
        yield done, per_rank
        done += per_rank * world_size


def in_global_order(gathered):
    """[world x batch x ...] rank-major gathers -> batch-major rows (global sample order), numpy."""
    stacked = torch.stack([g.cpu() for g in gathered])
    return stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:]).numpy()


def read_shards(shard_dir, settings):
    """(images, labels) of the contiguous shards from sample 0 in `shard_dir`, made with `settings`;
    a folder made with other settings is an error (its samples would not belong to this batch)."""
    settings_path = os.path.join(shard_dir, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            saved = json.load(f)
        if saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise ValueError(f"{shard_dir} holds partial samples made with other settings ({', '.join(changed)} "
                             "differ: another model file or flags); delete it or use another --log_dir")
    images, labels, done = [], [], 0
    names = sorted(n for n in os.listdir(shard_dir) if SHARD.match(n)) if os.path.isdir(shard_dir) else []
    for name in names:
        start, count = map(int, SHARD.match(name).groups())
        if start != done:
            break
        with np.load(os.path.join(shard_dir, name)) as data:
            images.append(data["arr_0"])
            labels.append(data["arr_1"] if "arr_1" in data else None)
        done += count
    return images, labels, done


def check_finite_samples(sample):
    """One clear error, on every rank, when any rank's samples hold inf/NaN (as uint8 they would be black)."""
    bad = dist_util.all_reduce_mean((~torch.isfinite(sample)).any().float().reshape(1))
    if bad.item() > 0:
        raise ValueError("the model gives non-finite samples (inf/NaN), so nothing is saved: its weights are broken "
                         "(a diverged run?) or its flags do not match it (--training_mode, --c_noise, --time_input)")


def generate_samples(
    diffusion,
    model,
    *,
    num_samples,
    batch_size,
    image_size,
    sampler="heun",
    steps=40,
    ts=None,
    generator="determ",
    seed=42,
    class_cond=False,
    num_classes=1000,
    class_labels=(),
    shard_dir=None,
    settings=None,
    progress=True,
    t_mid=(),
    **sample_kwargs,
):
    """Draw `num_samples` images (uint8 NHWC) and their labels (or None) from all processes, returned
    on rank 0 (None elsewhere). Labels: `class_labels` cycled over the samples, else uniform over
    num_classes from the generator. With `shard_dir`, each round is kept there and a rerun resumes.
    `sample_kwargs` go to karras_sample (clip_denoised, sigma_min, sigma_max, s_churn, ...); a TrigFlow
    `diffusion` (sCM) samples in one step, then once more at each time of `t_mid`."""
    device = dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    images, labels, done = [], [], 0
    if shard_dir is not None:
        if rank == 0:
            images, labels, done = read_shards(shard_dir, settings)
            if done:
                logger.log(f"resuming after {done} samples in {shard_dir}")

        def write_settings():
            os.makedirs(shard_dir, exist_ok=True)
            atomic_write_text(os.path.join(shard_dir, "settings.json"), json.dumps(settings, sort_keys=True))

        write_on_rank0(shard_dir, write_settings)
    done = int(dist_util.broadcast_from_rank0(torch.tensor(done, device=device)).item())

    gen = get_generator(generator, num_samples, seed)
    bar = tqdm(total=num_samples, initial=done, desc="sampling", unit="img", disable=not progress or rank != 0)
    start_time, start_done = time.time(), done
    for round_start, per_rank in round_sizes(num_samples, batch_size, world, done):
        gen.set_done_samples(round_start)
        model_kwargs = {}
        if class_cond:
            if class_labels:
                index = torch.arange(round_start + rank, round_start + world * per_rank, world)
                model_kwargs["y"] = torch.tensor(class_labels)[index % len(class_labels)].to(device)
            else:
                model_kwargs["y"] = gen.randint(0, num_classes, (per_rank,), device=device)
        shape = (per_rank, 3, image_size, image_size)
        if isinstance(diffusion, TrigFlowDenoiser):
            sample = sample_trigflow(diffusion, model, shape, gen, ts=t_mid, model_kwargs=model_kwargs, device=device,
                                     clip_denoised=sample_kwargs["clip_denoised"])
        else:
            sample = karras_sample(diffusion, model, shape, steps=steps, model_kwargs=model_kwargs, device=device,
                                   sampler=sampler, generator=gen, ts=ts, **sample_kwargs)
        check_finite_samples(sample)
        round_images = in_global_order(dist_util.all_gather(torch.from_numpy(to_uint8_nhwc(sample)).to(device)))
        round_labels = in_global_order(dist_util.all_gather(model_kwargs["y"])) if class_cond else None
        count = min(per_rank * world, num_samples - round_start)
        if rank == 0:
            images.append(round_images[:count])
            labels.append(None if round_labels is None else round_labels[:count])
        if shard_dir is not None:
            shard = os.path.join(shard_dir, f"shard_{round_start:09d}_{count:09d}.npz")
            write_on_rank0(shard, lambda: save_npz(shard, images[-1], *([labels[-1]] if class_cond else [])))
        bar.update(count)
        bar.set_postfix(img_per_s=f"{(bar.n - start_done) / max(time.time() - start_time, 1e-9):.2f}")
    bar.close()
    if rank != 0:
        return None, None
    return np.concatenate(images), (np.concatenate(labels) if class_cond else None)


def write_on_rank0(where, write):
    """write() on rank 0; an OSError there (a full disk, a folder made read-only) stops every rank with one line
    naming `where` (the writes are atomic, cm.atomic: nothing half-written is left; finished rounds are kept)."""
    failure = ""
    if dist_util.get_rank() == 0:
        try:
            write()
        except OSError as err:
            failure = f"could not write {where} ({err.strerror or err})"
    if dist_util.broadcast_from_rank0(torch.tensor([float(bool(failure))], device=dist_util.dev())).item():
        raise ValueError(f"{failure or 'rank 0 could not write ' + where}; make room and run the same command again: "
                         "it continues after its last finished round")


def finish_shards(shard_dir):
    """Remove the shard folder once the final batch is written."""
    if shard_dir is not None and os.path.isdir(shard_dir):
        shutil.rmtree(shard_dir)
