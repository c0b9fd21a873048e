"""What every training script does first: processes, run folder, seed, resolved config, batch size, data."""

import json
import os
from dataclasses import fields

import torch

from . import dist_util, logger
from .atomic import atomic_write_text
from .checkpoints import MODEL_FILE
from .image_datasets import latent_dataset_info, load_data
from .log_backends import open_backends, parse_backends
from .cli import FRACTION, NON_NEGATIVE, POSITIVE, check_numbers
from .networks import NETWORKS, network_ranges
from .phema import std_to_exp
from .precision import resolve_precision_args
from .run_folder import lock_run_folder, remove_stale_temporaries
from .script_util import create_model_and_diffusion, network_defining_flags
from .train_util import LoopSettings


def check_training_flags(args, method_cls, model_kwargs):
    """Every flag checked before the run folder is touched (start_run, once the precision and the processes are
    known): the numbers, the network and denoiser built on the meta device (no memory, no weights) from
    `model_kwargs`, the method's flags, the batch, the averages and the optimizer's."""
    check_numbers(args, {**NUMBER_RANGES, **network_ranges(), **method_cls.flag_ranges})
    check_latent_data(args)
    with torch.device("meta"):
        create_model_and_diffusion(**model_kwargs)
    method_cls.check_flags(args)
    per_process_batch(args)
    ema_rates(args)
    optimizer_flags(args)
    phema_flags(args)
    parse_backends(args.log_backends)


def check_latent_data(args):
    """Latent data (scripts/encode_latents.py) with the flags that say so, and --latent_vae only with latent data."""
    info = latent_dataset_info(args.data_dir) if args.data_dir else None
    if info is None:
        if args.latent_vae:
            raise ValueError(f"--latent_vae {args.latent_vae} trains in latent space: pass --data_dir a folder of "
                             "scripts/encode_latents.py, or drop --latent_vae")
        return
    wanted = {"latent_vae": info["vae"], "image_channels": info.get("channels"), "image_size": info.get("size")}
    wrong = {k: v for k, v in wanted.items() if getattr(args, k) != v}
    if "image_channels" not in NETWORKS[args.network].flags:
        takers = ", ".join(name for name, net in NETWORKS.items() if "image_channels" in net.flags)
        raise ValueError(f"--data_dir {args.data_dir} holds latents; --network {args.network} sees RGB images only: "
                         f"train one that takes --image_channels ({takers})")
    if wrong:
        raise ValueError(f"--data_dir {args.data_dir} holds SD-VAE latents: pass "
                         + " ".join(f"--{k} {v}" for k, v in wanted.items()) + " (got "
                         + ", ".join(f"--{k} {getattr(args, k)!r}" for k in wrong) + ")")


# the ranges of the loop's and the scripts' number flags that are not checked where they are used (sigma_min/max by
# the denoiser, start_ema by the curriculum, the optimizer's in optimizer_flags, the lists by their parsers, the
# evaluation's by evaluations/during_training.py); a method's and a network's own flags have theirs beside them
NUMBER_RANGES = {
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "lr_anneal_steps": NON_NEGATIVE, "log_interval": POSITIVE,
    "fp16_scale_growth": NON_NEGATIVE, "teacher_dropout": FRACTION, "lr_warmup_steps": NON_NEGATIVE,
}


def run_defining_flags():
    """The flags whose change makes a resumed run a different run: the batch, the seed, the method and its time
    input, the network (every registered network's)."""
    return ("global_batch", "global_batch_size", "batch_size", "seed", "training_mode", "time_input") + network_defining_flags()

# flags that say where and how a run is watched, not what it computes: changed without a word
UNREPORTED_FLAGS = ("log_dir", "progress", "resume_checkpoint", "allow_config_change", "precision_reason", "device")
# config entries that are not flags: what they are called in messages
CONFIG_NAMES = {"global_batch": "the global batch (processes x per-process batch)"}


def previous_config(folder):
    """The config.json of a run that has checkpoints in `folder` (one it will resume), or None."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path) or not any(MODEL_FILE.match(f) for f in os.listdir(folder)):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_config_change(previous, config, allowed):
    """Compare a resumed run's flags with those it was started with: a change of run_defining_flags() is refused
    in one line unless `allowed` (--allow_config_change); returns the lines for the run's log, one per change."""
    changed = {k: f"{CONFIG_NAMES.get(k, '--' + k)} {previous[k]} -> {v}" for k, v in config.items()
               if k in previous and k not in UNREPORTED_FLAGS and str(previous[k]) != str(v)}
    defining = [text for k, text in changed.items() if k in run_defining_flags()]
    stds = [{float(v) for v in str(c.get("phema_std", "")).split(",") if v.strip()} for c in (previous, config)]
    if stds[1] - stds[0]:
        # a power-function EMA is an average from step 0; one begun now is another profile, and scripts/reconstruct_ema.py
        # would fit its snapshots as if it were not
        raise ValueError(f"--phema_std {','.join(map(str, sorted(stds[1] - stds[0])))} is new to the run in this --log_dir, "
                         "whose post-hoc EMA averages began at step 0; drop it (removing one is fine), or start another "
                         "--log_dir")
    if defining and not allowed:
        raise ValueError(f"the run in this --log_dir was started with other flags ({', '.join(defining)}), which would "
                         "make the resumed run a different one; pass them as before, another --log_dir, or "
                         "--allow_config_change True")
    return [f"config change on resume: {text}" for text in changed.values()]


def start_run(args, method_cls, model_kwargs):
    """Join the process group, choose the precision (cm.precision), check every flag (check_training_flags),
    open the run folder (a resumed run's changes checked before anything is written there), seed every rank
    alike (identical initial weights), print the resolved config with the global batch and save it as
    config.json; returns the config dict."""
    dist_util.setup_dist(device=args.device or None, gpus_per_node=args.gpus_per_node or None)
    notes = []  # for the log, once the folder is open
    resolve_precision_args(args, dist_util.dev(), log=notes.append)
    check_training_flags(args, method_cls, model_kwargs)
    folder = logger.run_dir(args.log_dir or None)
    lock_run_folder(folder)  # before anything is written there
    previous = previous_config(folder)  # (read by every rank before rank 0 writes the new one below)
    torch.manual_seed(args.seed)
    config = dict(vars(args), global_batch=per_process_batch(args) * dist_util.get_world_size())
    run_id = new_run_id() if previous is None else previous.get("run_id")  # (runs from before ids have none)
    if run_id:
        config["run_id"] = run_id
    if previous is not None:
        notes += check_config_change(previous, config, args.allow_config_change)
    logger.configure(folder)
    for name in remove_stale_temporaries(folder):
        logger.log(f"removed {name}, left by a save that did not finish")
    for note in notes:
        logger.log(note)
    logger.log("config: " + json.dumps(config, sort_keys=True, default=str))
    if dist_util.get_rank() == 0:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        atomic_write_text(os.path.join(logger.get_dir(), "config.json"), text)
        logger.set_backends(open_backends(parse_backends(args.log_backends), folder, config))
    return config


def new_run_id():
    """A random id, the same on every rank, made once when a run starts fresh and kept in config.json across
    resumes: every file of the run carries it, and scripts/reconstruct_ema.py averages snapshots of one run only."""
    raw = torch.tensor(list(os.urandom(6)), dtype=torch.int64, device=dist_util.dev())
    return bytes(dist_util.broadcast_from_rank0(raw).tolist()).hex()


def per_process_batch(args, world=None):
    """--batch_size, or --global_batch_size shared out evenly over the `world` processes (default: this run's);
    a global batch they cannot share evenly is refused, never rounded (the run's batch is its global batch)."""
    if args.batch_size > 0:
        return args.batch_size
    world = world or dist_util.get_world_size()
    if args.global_batch_size < 1 or args.global_batch_size % world:
        raise ValueError(f"--global_batch_size {args.global_batch_size} cannot be shared evenly by {world} "
                         f"process(es); pass a positive multiple of {world}, or a per-process --batch_size")
    return args.global_batch_size // world


def training_data(args, batch_size):
    return load_data(
        data_dir=args.data_dir,
        batch_size=batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        seed=args.seed,
        num_classes=args.num_classes,
    )


def loop_settings(args, batch_size):
    """The training loop's LoopSettings from the flags (those of its fields the flags hold, checked), the
    per-process batch and the resolved precision."""
    checked = dict(batch_size=batch_size, ema_rate=ema_rates(args), precision=args.precision, **optimizer_flags(args),
                   **phema_flags(args))
    named = {f.name: getattr(args, f.name) for f in fields(LoopSettings) if f.name not in checked and hasattr(args, f.name)}
    return LoopSettings(**named, **checked)


def phema_flags(args):
    """--phema_std (sigma_rel values of the power-function EMAs) and --phema_snapshot_interval, checked."""
    try:
        stds = [float(v) for v in str(args.phema_std).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--phema_std must be comma-separated numbers, e.g. 0.05,0.10; got {args.phema_std!r}") from None
    for std in stds:
        try:
            std_to_exp(std)
        except ValueError as err:
            raise ValueError(f"--phema_std: {err}") from None
    if len(set(stds)) != len(stds):
        raise ValueError(f"--phema_std repeats a value: {args.phema_std!r}")
    if args.phema_snapshot_interval < 0:
        raise ValueError("--phema_snapshot_interval must be 0 (snapshots at checkpoints only) or a number of images")
    return dict(phema_std=stds, phema_snapshot_interval=args.phema_snapshot_interval)


def ema_rates(args):
    """--ema_rate: comma-separated rates in [0, 1)."""
    try:
        rates = [float(v) for v in str(args.ema_rate).split(",") if v.strip()]
    except ValueError:
        rates = None
    if not rates or not all(0 <= r < 1 for r in rates):
        raise ValueError(f"--ema_rate must be comma-separated rates in [0, 1), e.g. 0.999,0.9999; got {args.ema_rate!r}")
    return ",".join(str(args.ema_rate).replace(" ", "").split(","))


def optimizer_flags(args):
    """The optimizer, its betas and eps, EDM2's inverse-square-root decay and gradient clipping, checked."""
    if args.optimizer not in ("radam", "adam"):
        raise ValueError(f"unknown --optimizer {args.optimizer!r}; choose radam (published) or adam")
    try:
        betas = tuple(float(b) for b in str(args.adam_betas).split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"--adam_betas must be two numbers in [0, 1), e.g. 0.9,0.99; got {args.adam_betas!r}")
    if not args.adam_eps > 0:
        raise ValueError(f"--adam_eps must be positive, got {args.adam_eps}")
    if args.lr_ref_steps < 0 or args.grad_clip < 0:
        raise ValueError("--lr_ref_steps and --grad_clip must be 0 (off) or positive")
    return dict(optimizer=args.optimizer, adam_betas=betas, adam_eps=args.adam_eps, lr_ref_steps=args.lr_ref_steps,
                grad_clip=args.grad_clip)
