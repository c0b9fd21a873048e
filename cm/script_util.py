"""Defaults, model construction and argparse helpers, under the published names."""

import argparse

from .denoiser import KarrasDenoiser
from .schedule import create_ema_and_scales_fn
from .unet import UNetModel

NUM_CLASSES = 1000

__all__ = [
    "NUM_CLASSES",
    "cm_train_defaults",
    "model_and_diffusion_defaults",
    "create_model_and_diffusion",
    "create_model",
    "create_ema_and_scales_fn",
    "add_dict_to_argparser",
    "args_to_dict",
    "str2bool",
]

# Channel multipliers per resolution level when --channel_mult is empty. 512..64 as published;
# 32 and 16 (CIFAR-like data, the digits demo) are this project's additions.
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
}


def cm_train_defaults():
    return dict(
        teacher_model_path="",  # EDM teacher checkpoint (consistency distillation)
        teacher_dropout=0.1,  # dropout of the teacher network
        training_mode="consistency_distillation",  # consistency_distillation | consistency_training | progdist | improved_consistency_training | easy_consistency_tuning
        target_ema_mode="fixed",  # fixed | adaptive: target-network EMA mu(k)
        scale_mode="fixed",  # fixed | progressive | progdist | exponential (iCT): discretisation N(k)
        total_training_steps=600000,  # stop after this many steps
        start_ema=0.0,  # mu0, the target EMA rate at step 0
        start_scales=40,  # s0, N at step 0
        end_scales=40,  # s1, N at the end of the progressive curriculum
        distill_steps_per_iter=50000,  # steps per halving in progressive distillation
        loss_norm="lpips",  # l1 | l2 | l2-32 | lpips | pseudo-huber
        huber_c=-1.0,  # pseudo-Huber c; negative: iCT's 0.00054 sqrt(d), d the numbers per image
        p_mean=-1.1,  # lognormal noise levels of iCT (on the grid) and ECT: ln sigma ~ N(p_mean, p_std^2)
        p_std=2.0,
        ect_q=2.0,  # ECT's r(t) = t (1 - n(t) / q^(stage + 1)): q
        ect_k=8.0,  # ECT's n(t) = 1 + k sigmoid(-b t): k (0: the constant mapping)
        ect_b=1.0,  # ... and b
        ect_stage_steps=25000,  # d: ECT's stage lasts this many steps (published CIFAR-10: 25k at batch 128)
    )


# Flag values a training mode brings when neither the command line nor the --config preset sets them
# (cm.config.parse_args_with_config); the resolved values are printed and saved with the run.
TRAINING_MODE_DEFAULTS = {
    # Song & Dhariwal 2023, Table 1: no target EMA, pseudo-Huber, exponential curriculum s0 = 10, s1 = 1280,
    # weighting 1 / (sigma_{i+1} - sigma_i) (the lognormal noise levels come with the mode itself)
    "improved_consistency_training": dict(
        target_ema_mode="fixed", start_ema=0.0, scale_mode="exponential", start_scales=10, end_scales=1280,
        loss_norm="pseudo-huber", weight_schedule="inverse-step",
    ),
    # Geng et al. 2024, the published CIFAR-10 code: target = the online network without gradient,
    # ||.||_2 (pseudo-Huber with c = 0) weighted by 1 / (t - r)
    "easy_consistency_tuning": dict(
        target_ema_mode="fixed", start_ema=0.0, loss_norm="pseudo-huber", huber_c=0.0, weight_schedule="inverse-step",
    ),
}


def model_and_diffusion_defaults():
    return dict(
        sigma_min=0.002,  # smallest noise level (the boundary-condition epsilon)
        sigma_max=80.0,  # largest noise level T
        image_size=64,  # image side in pixels
        num_channels=128,  # base channel count of the U-Net
        num_res_blocks=2,  # residual blocks per resolution level
        num_heads=4,  # attention heads (when num_head_channels is -1)
        num_heads_upsample=-1,  # heads in the decoder (-1: as num_heads)
        num_head_channels=-1,  # fixed channels per head (overrides num_heads)
        attention_resolutions="32,16,8",  # resolutions (pixels) with attention
        channel_mult="",  # comma-separated multipliers; empty: by image size
        dropout=0.0,  # dropout in the residual blocks
        class_cond=False,  # class-conditional model
        num_classes=NUM_CLASSES,  # number of classes when class_cond
        use_checkpoint=False,  # gradient checkpointing (less memory, more compute)
        use_scale_shift_norm=True,  # FiLM conditioning in the residual blocks
        resblock_updown=False,  # residual blocks for up/downsampling
        use_fp16=False,  # float16 torso with float32 master weights
        use_bf16=False,  # bfloat16 torso (no loss scaling needed)
        use_new_attention_order=False,  # accepted for compatibility; the layout is fixed by the checkpoints
        learn_sigma=False,  # 6 output channels (unused by Karras models)
        weight_schedule="karras",  # loss weighting lambda(sigma): snr | snr+1 | karras | truncated-snr | uniform | inverse-step
        time_embed="positional",  # noise-level embedding: positional (published) | fourier (iCT's option)
        fourier_scale=0.02,  # std of the Fourier frequencies (iCT: 0.02; NCSN++: 16)
    )


def parse_channel_mult(channel_mult, image_size):
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {image_size}; pass --channel_mult, e.g. 1,2,2"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    return tuple(channel_mult)


def parse_attention_resolutions(attention_resolutions, image_size):
    """Pixel resolutions ("32,16,8") to the downsample rates the U-Net checks (2, 4, 8 at 64x64)."""
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    return tuple(image_size // int(r) for r in attention_resolutions)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
    use_bf16=False,
    time_embed="positional",
    fourier_scale=0.02,
):
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        use_bf16=use_bf16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        time_embed=time_embed,
        fourier_scale=fourier_scale,
    )


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    weight_schedule,
    sigma_min=0.002,
    sigma_max=80.0,
    distillation=False,
    loss_norm="lpips",
    num_classes=NUM_CLASSES,
    use_bf16=False,
    time_embed="positional",
    fourier_scale=0.02,
):
    """The U-Net and its KarrasDenoiser. Unlike the published function, `loss_norm` reaches the
    denoiser (the published one dropped it, so LPIPS was always used)."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
        use_bf16=use_bf16,
        time_embed=time_embed,
        fourier_scale=fourier_scale,
    )
    diffusion = KarrasDenoiser(
        sigma_data=0.5,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        distillation=distillation,
        weight_schedule=weight_schedule,
        loss_norm=loss_norm,
    )
    return model, diffusion


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (True/False), got {v!r}")


def add_dict_to_argparser(parser, default_dict):
    """One --flag per key, typed by its default (booleans take True/False)."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def train_defaults():
    """Flags shared by cm_train.py and edm_train.py: the published ones, then this project's."""
    return dict(
        data_dir="",  # image folder, .npz batch, downsampled-ImageNet .npz, or "digits"
        schedule_sampler="uniform",  # EDM noise-level sampler: lognormal | uniform
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,  # linear decay of the learning rate to 0 over this many steps (0: constant)
        global_batch_size=2048,  # split over the processes when batch_size is -1
        batch_size=-1,  # per-process batch (-1: global_batch_size / processes)
        microbatch=-1,  # split each batch into microbatches of this size (-1: no split)
        ema_rate="0.9999",  # comma-separated EMA rates of the saved averages
        log_interval=10,  # steps between log lines
        save_interval=10000,  # steps between checkpoints
        resume_checkpoint="",  # modelNNNNNN.pt to resume from (default: the newest complete one in the log folder)
        use_fp16=False,
        precision="auto",  # auto | fp32 | bf16 | fp16; auto: bf16 where the device runs it natively (cm.precision)
        fp16_scale_growth=1e-3,  # growth of log2(loss scale) per successful fp16 step
        seed=0,  # model initialisation, data order and training noise
        random_flip=True,  # horizontal-flip augmentation
        device="",  # cpu | cuda | cuda:N; empty: this rank's GPU if any, else the CPU
        gpus_per_node=0,  # GPUs the ranks of one node share (0: all visible)
        log_dir="",  # run folder; empty: $OPENAI_LOGDIR, else runs/<time>
        progress=True,  # progress bar (log tables then go to log.txt and progress.csv only)
        channels_last=False,  # fast path: run the networks in the channels_last (NHWC) memory format
        compile=False,  # fast path: torch.compile the networks (compiles on the first steps)
    )


def run_cli(main):
    """Run a script's main(); expected failures (bad flags, data, checkpoints, a diverged loss) end
    with one line on stderr and exit status 1 instead of a traceback."""
    import sys

    from .train_util import NonFiniteLossError

    import os

    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError, NonFiniteLossError) as err:
        if os.environ.get("CM_TRACEBACK"):
            raise
        print(f"error: {err} (set CM_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
