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
from .checkpoints import checkpoint_config, flag_text, load_model_weights
from .cli import args_to_dict
from .diffusers_convert import read_weights
from .fast_paths import apply_fast_paths
from .image_io import save_npz, to_uint8_nhwc
from .precision import resolve_precision_args
from .random_util import get_generator
from .latents import LatentCodec, load_vae
from .methods import parameterization, trained_parameterization
from .parameterizations import parse_int_list
from .script_util import add_flags_by_owner, create_model_and_diffusion, model_and_diffusion_defaults, network_defining_flags

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
        latent_vae="",  # a latent model's VAE (its checkpoint says): samples are decoded to pixels with it
        t_mid="",  # multistep of sCM and flow maps: the intermediate times, decreasing; empty: TrigFlow 1.1 (sCM's
        # ImageNet-64 two-step), flow map 0.5; of consistency models: noise levels in place of --ts (TCM's 1.0)
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(script_defaults)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags_by_owner(parser, defaults)
    return parser


# the flags that decide what the samples are (a resumed run must agree on them)
SAMPLE_SETTINGS = (
    "training_mode", "generator", "clip_denoised", "num_samples", "sampler", "s_churn", "s_tmin", "s_tmax",
    "s_noise", "steps", "model_path", "seed", "ts", "class_labels", "sigma_min", "sigma_max", "precision",
    "time_input", "t_mid", "c_noise", "double_norm", "latent_vae",
)


def sampling_seeds(args):
    """The seeds of --seeds (distinct), or None: one batch at --seed."""
    seeds = parse_int_list(args.seeds, "seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {args.seeds!r}")
    return seeds or None


def check_sampling_args(args):
    """The flag combinations that cannot work, as one-line errors; returns (the sampler's steps: {"ts", "t_mid"},
    class_labels)."""
    kind = parameterization(args.training_mode)
    kind.check_sampler(args.sampler, args.training_mode)
    steps = kind.sampler_steps(args)
    class_labels = parse_int_list(args.class_labels, "class_labels") if args.class_labels else ()
    if class_labels and not args.class_cond:
        raise ValueError("--class_labels needs a class-conditional model (--class_cond True)")
    if any(not 0 <= c < args.num_classes for c in class_labels):
        raise ValueError(f"--class_labels must lie in 0..{args.num_classes - 1}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num_samples and --batch_size must be at least 1")
    return steps, class_labels


def stored_model_flags():
    """The flags a checkpoint's stored config decides (besides --training_mode and its parameterization's
    stored_flags): the network's (of every network registered by now), the noise range and the latent space."""
    return ("sigma_min", "sigma_max", "latent_vae") + network_defining_flags()


def read_sampling_weights(args, given=None):
    """The weights of --model_path (None without one), read before the output folder is touched; its stored config
    (a checkpoint of this project) decides what the flags do not say. The model flags (stored_model_flags(), the
    parameterization's stored_flags) and --training_mode that are not in `given` (the flags set on the command line
    or by the --config preset; None: all) take the stored values, and an absent --sampler the model's first one.
    A given flag that contradicts the file is one line naming the flags to pass (a --training_mode agrees when it
    samples the same parameterization). A file without a stored config (a published one) is not checked."""
    if not args.model_path:
        return None
    state = read_weights(args.model_path)
    trained = trained_parameterization(state)
    config = checkpoint_config(state) or {}
    if trained is None and not config:
        return state
    given = set(vars(args)) if given is None else given
    kind = trained[1] if trained else parameterization(args.training_mode)
    stored = {k: config[k] for k in stored_model_flags() + kind.stored_flags if k in config and hasattr(args, k)}
    if trained:
        stored["training_mode"] = trained[0]
    wanted = {}
    for key, value in stored.items():
        if key not in given:
            setattr(args, key, value)
            continue
        agrees = parameterization(args.training_mode) is kind if key == "training_mode" else str(value) == str(getattr(args, key))
        if not agrees:
            wanted[key] = value
    if args.sampler not in kind.samplers:
        if "sampler" in given:
            wanted["sampler"] = kind.samplers[0]
        else:
            args.sampler = kind.samplers[0]
    if wanted:
        what = f"as --training_mode {trained[0]}, {kind.description}" if trained else f"with {flag_text(stored)}"
        raise ValueError(f"{args.model_path} was trained {what}; pass {flag_text(wanted)} or leave them out "
                         f"(got {flag_text({k: getattr(args, k) for k in wanted})})")
    return state


def load_sampling_model(args, state=None):
    """The model and its denoiser from the flags, weights loaded (`state`, read by read_sampling_weights, or read
    here), on this rank's device, in eval mode, its torso in the precision chosen for this device (cm.precision;
    resolved into the flags)."""
    resolve_precision_args(args, dist_util.dev(), log=logger.log)
    if args.model_path:
        logger.log(f"loading {args.model_path}")
        state = read_sampling_weights(args) if state is None else state
    else:
        logger.log("no --model_path: sampling from a randomly initialised model (pipeline smoke test)")
    return build_sampling_model(args, state, args.model_path)


def build_sampling_model(args, state, source):
    """load_sampling_model's model and denoiser, its precision already resolved in `args`, with the weights `state`
    (None: as initialised) from `source` (named in errors)."""
    kind = parameterization(args.training_mode)
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, model_and_diffusion_defaults().keys()), distillation=kind.boundary_condition
    )
    diffusion = kind.sampling_denoiser(diffusion, args)
    if state is not None:
        load_model_weights(model, source, state)
    model.to(dist_util.dev())
    if args.use_fp16:
        model.convert_to_fp16()
    elif args.use_bf16:
        model.convert_to_bf16()
    apply_fast_paths([model], channels_last=args.channels_last, compile=args.compile)
    return model.eval(), diffusion


def sample_kwargs(args):
    """karras_sample's settings from the flags (a latent model's denoised estimates are not images in [-1, 1], so
    never clipped: EDM2 does not clip its latents)."""
    return dict(
        clip_denoised=args.clip_denoised and not getattr(args, "latent_vae", ""), sigma_min=args.sigma_min,
        sigma_max=args.sigma_max, s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax, s_noise=args.s_noise,
    )


def latent_decoding(args):
    """generate_samples' {"channels", "to_images"} for a latent model (--latent_vae, from its checkpoint: the VAE decodes
    its samples to pixels, cm.latents), {} for a pixel model."""
    if not getattr(args, "latent_vae", ""):
        return {}
    return {"channels": args.image_channels, "to_images": LatentCodec(load_vae(args.latent_vae, dist_util.dev())).decode}


# what a failed write of a sampling run advises (its rounds are kept: cm.dist_util.write_on_rank0)
RERUN = "make room and run the same command again: it continues after its last finished round"
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


class NonFiniteSamples(ValueError):
    """A model's samples hold inf/NaN."""


def check_finite_samples(sample):
    """One clear error, on every rank, when any rank's samples hold inf/NaN (as uint8 they would be black)."""
    bad = dist_util.all_reduce_mean((~torch.isfinite(sample)).any().float().reshape(1))
    if bad.item() > 0:
        raise NonFiniteSamples("the model gives non-finite samples (inf/NaN), so nothing is saved: its weights are broken "
                         "(a diverged run?) or its flags do not match it (--training_mode, --c_noise, --time_input)")


def generate_samples(
    diffusion,
    model,
    *,
    kind,
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
    channels=3,
    to_images=None,
    **sample_kwargs,
):
    """Draw `num_samples` images (uint8 NHWC) and their labels (or None) from all processes, returned
    on rank 0 (None elsewhere). Labels: `class_labels` cycled over the samples, else uniform over
    num_classes from the generator. With `shard_dir`, each round is kept there and a rerun resumes.
    `kind` (the model's parameterization, cm.parameterizations) samples each round from `diffusion`, its sampling denoiser: Karras
    sigma with --sampler at `steps` (`ts`: multistep's grid indices) and `sample_kwargs` (clip_denoised, sigma_min,
    sigma_max, s_churn, ...), TrigFlow and flow maps in one step and once more at each time of `t_mid`. Samples have
    `channels` channels; `to_images` makes uint8 NHWC pixels of them (default: [-1, 1] images; a latent model's decoder)."""
    to_images = to_images or to_uint8_nhwc
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

        dist_util.write_on_rank0([(shard_dir, write_settings)], RERUN)
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
        shape = (per_rank, channels, image_size, image_size)
        sample = kind.sample(diffusion, model, shape, gen, sampler=sampler, steps=steps, ts=ts, t_mid=t_mid,
                             model_kwargs=model_kwargs, device=device, **sample_kwargs)
        check_finite_samples(sample)
        round_images = in_global_order(dist_util.all_gather(torch.from_numpy(to_images(sample)).to(device)))
        round_labels = in_global_order(dist_util.all_gather(model_kwargs["y"])) if class_cond else None
        count = min(per_rank * world, num_samples - round_start)
        if rank == 0:
            images.append(round_images[:count])
            labels.append(None if round_labels is None else round_labels[:count])
        if shard_dir is not None:
            shard = os.path.join(shard_dir, f"shard_{round_start:09d}_{count:09d}.npz")
            dist_util.write_on_rank0([(shard, lambda: save_npz(shard, images[-1], *([labels[-1]] if class_cond else [])))], RERUN)
        bar.update(count)
        bar.set_postfix(img_per_s=f"{(bar.n - start_done) / max(time.time() - start_time, 1e-9):.2f}")
    bar.close()
    if rank != 0:
        return None, None
    return np.concatenate(images), (np.concatenate(labels) if class_cond else None)


def finish_shards(shard_dir):
    """Remove the shard folder once the final batch is written."""
    if shard_dir is not None and os.path.isdir(shard_dir):
        shutil.rmtree(shard_dir)
