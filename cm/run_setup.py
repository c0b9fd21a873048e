"""What every training script does first: processes, run folder, seed, resolved config, batch size, data."""

import json
import os

import torch

from . import dist_util, logger
from .atomic import atomic_write_text
from .checkpoints import MODEL_FILE
from .image_datasets import load_data
from .phema import std_to_exp
from .precision import resolve_precision_args
from .run_folder import lock_run_folder, remove_stale_temporaries
from .script_util import create_model_and_diffusion


def check_training_flags(args, method_cls, model_kwargs):
    """Every flag checked before the run folder is touched: the network and denoiser built on the meta device
    (no memory, no weights) from `model_kwargs`, the method's flags, the averages and the optimizer's."""
    with torch.device("meta"):
        create_model_and_diffusion(**model_kwargs)
    method_cls.check_flags(args)
    ema_rates(args)
    optimizer_flags(args)
    phema_flags(args)


# flags whose change makes a resumed run a different run: the batch, the seed, the method, the network
RUN_DEFINING_FLAGS = (
    "global_batch_size", "batch_size", "seed", "training_mode", "image_size", "num_channels", "num_res_blocks",
    "channel_mult", "attention_resolutions", "num_heads", "num_heads_upsample", "num_head_channels", "class_cond",
    "num_classes", "use_scale_shift_norm", "resblock_updown", "learn_sigma", "time_embed", "fourier_scale",
    "double_norm", "c_noise", "time_input",
)
# flags that say where and how a run is watched, not what it computes: changed without a word
UNREPORTED_FLAGS = ("log_dir", "progress", "resume_checkpoint", "allow_config_change", "precision_reason", "device")


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
    """Compare a resumed run's flags with those it was started with: a change of RUN_DEFINING_FLAGS is refused
    in one line unless `allowed` (--allow_config_change); every change is written to the run's log."""
    changed = {k: (previous[k], v) for k, v in config.items()
               if k in previous and k not in UNREPORTED_FLAGS and str(previous[k]) != str(v)}
    defining = [k for k in changed if k in RUN_DEFINING_FLAGS]
    if defining and not allowed:
        what = ", ".join(f"--{k} {changed[k][0]} -> {changed[k][1]}" for k in defining)
        raise ValueError(f"the run in this --log_dir was started with other flags ({what}), which would make the resumed "
                         "run a different one; pass them as before, another --log_dir, or --allow_config_change True")
    for key, (old, new) in changed.items():
        logger.log(f"config change on resume: --{key} {old} -> {new}")


def start_run(args):
    """Join the process group, open the run folder, choose the precision (cm.precision), seed every
    rank alike (identical initial weights), print the resolved config and save it as config.json
    (a resumed run's changes checked and logged first); returns the config dict."""
    dist_util.setup_dist(device=args.device or None, gpus_per_node=args.gpus_per_node or None)
    folder = logger.run_dir(args.log_dir or None)
    lock_run_folder(folder)  # before anything is written there
    previous = previous_config(folder)  # (read by every rank before rank 0 writes the new one below)
    logger.configure(folder)
    for name in remove_stale_temporaries(folder):
        logger.log(f"removed {name}, left by a save that did not finish")
    resolve_precision_args(args, dist_util.dev(), log=logger.log)
    torch.manual_seed(args.seed)
    config = dict(vars(args))
    if previous is not None:
        check_config_change(previous, config, args.allow_config_change)
    logger.log("config: " + json.dumps(config, sort_keys=True, default=str))
    if dist_util.get_rank() == 0:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        atomic_write_text(os.path.join(logger.get_dir(), "config.json"), text)
    return config


def per_process_batch(args):
    """--batch_size, or --global_batch_size shared out over the processes."""
    if args.batch_size > 0:
        return args.batch_size
    world = dist_util.get_world_size()
    if args.global_batch_size % world:
        logger.log(f"warning: global batch {args.global_batch_size} is not divisible by {world} processes; "
                   f"using {world * (args.global_batch_size // world)}")
    batch = args.global_batch_size // world
    if batch < 1:
        raise ValueError(f"--global_batch_size {args.global_batch_size} is smaller than the {world} processes")
    return batch


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


def loop_kwargs(args, model, data, batch_size, config):
    """The TrainLoop arguments both training scripts pass, from their flags."""
    return dict(
        model=model,
        data=data,
        batch_size=batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=ema_rates(args),
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        use_bf16=args.use_bf16,
        fp16_scale_growth=args.fp16_scale_growth,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        total_training_steps=args.total_training_steps,
        seed=args.seed,
        config=config,
        progress=args.progress,
        channels_last=args.channels_last,
        compile=args.compile,
        **optimizer_flags(args),
        **phema_flags(args),
    )


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
