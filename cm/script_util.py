"""Defaults, model construction and argparse helpers, under the published names (the argparse helpers
live in cm.cli, the curriculum in cm.schedule)."""

from .cli import add_dict_to_argparser, args_to_dict, str2bool
from .karras_diffusion import KarrasDenoiser
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
        training_mode="consistency_distillation",  # a name of cm.methods.METHODS (python scripts/cm_train.py -h lists them)
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
        time_input="edm",  # sCM's network time input: edm (250 ln(sigma_d tan t), an EDM network's own) | identity (t)
        tangent_warmup_steps=10000,  # sCM: r of the tangent rises linearly from 0 to 1 over this many steps
        p_truncate=False,  # sCM: the lognormal noise levels truncated to [sigma_min, sigma_max] (as FastGen draws them)
        tangent_norm_c=0.1,  # sCM: tangent normalisation g / (||g|| + c)
        jvp="forward",  # sCM's dF/dt: forward (torch.func.jvp) | finite_diff
        jvp_eps=1e-3,  # sCM: the step of --jvp finite_diff (in t; x moves by eps dx/dt)
        scm_weighting="adaptive",  # sCM's loss weighting: adaptive (learned w(t)) | prior (1 / (sigma_d tan t))
    )


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
        double_norm=False,  # sCM's adaptive double normalisation of the scale-shift conditioning
        c_noise="published",  # the network's time input: published 250 ln(sigma) | edm ln(sigma) / 4 (NVlabs EDM)
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


def parse_attention_resolutions(attention_resolutions, image_size, levels=None):
    """Pixel resolutions ("32,16,8") to the downsample rates the U-Net checks (2, 4, 8 at 64x64). Given the
    network's number of resolution `levels`, a resolution it does not have (no attention at all) is refused."""
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    if levels is not None:
        has = [image_size // 2**level for level in range(levels)]
        wrong = [str(r) for r in attention_resolutions if int(r) not in has]
        if wrong:
            raise ValueError(f"--attention_resolutions {','.join(wrong)}: a {image_size}x{image_size} network with "
                             f"{levels} levels (--channel_mult) has the resolutions {','.join(map(str, has))}; "
                             "choose among them")
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
    double_norm=False,
):
    mult = parse_channel_mult(channel_mult, image_size)
    if image_size < 1 or image_size % 2 ** (len(mult) - 1):
        raise ValueError(f"--image_size {image_size} cannot be halved {len(mult) - 1} times (--channel_mult "
                         f"{','.join(map(str, mult))}); pass a multiple of {2 ** (len(mult) - 1)}")
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size, len(mult)),
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
        double_norm=double_norm,
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
    double_norm=False,
    c_noise="published",
    rho=7.0,
    huber_c=None,
    lpips_vgg_path=None,
):
    """The U-Net and its KarrasDenoiser. Unlike the published function, `loss_norm` reaches the
    denoiser (the published one dropped it, so LPIPS was always used); `rho`, `huber_c` (None: iCT's
    0.00054 sqrt(d)) and `lpips_vgg_path` (None: the torch hub cache) are this project's."""
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
        double_norm=double_norm,
    )
    diffusion = KarrasDenoiser(
        sigma_data=0.5,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        rho=rho,
        distillation=distillation,
        weight_schedule=weight_schedule,
        loss_norm=loss_norm,
        lpips_vgg_path=lpips_vgg_path,
        huber_c=huber_c,
        c_noise=c_noise,
    )
    return model, diffusion


def train_defaults():
    """Flags shared by cm_train.py and edm_train.py: the published ones, then this project's."""
    return dict(
        data_dir="",  # image folder, .npz batch, downsampled-ImageNet .npz, or "digits"
        schedule_sampler="uniform",  # EDM noise-level sampler: lognormal | uniform
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,  # linear decay of the learning rate to 0 over this many steps (0: constant)
        lr_ref_steps=0,  # EDM2's decay: lr / sqrt(max(step / lr_ref_steps, 1)) (0: off); times the linear one
        optimizer="radam",  # radam (published) | adam
        adam_betas="0.9,0.999",  # the optimizer's betas (published: torch's defaults)
        adam_eps=1e-8,  # the optimizer's eps
        grad_clip=0.0,  # clip the gradient norm to this (0: off)
        phema_std="",  # sigma_rel of power-function EMAs tracked for post-hoc reconstruction (EDM2), e.g. 0.05,0.10
        phema_snapshot_interval=0,  # images between their snapshots phema_STD_NNNNNN.pt (0: at checkpoints only)
        global_batch_size=2048,  # split over the processes when batch_size is -1
        batch_size=-1,  # per-process batch (-1: global_batch_size / processes)
        microbatch=-1,  # split each batch into microbatches of this size (-1: no split)
        ema_rate="0.9999",  # comma-separated EMA rates of the saved averages
        log_interval=10,  # steps between log lines
        save_interval=10000,  # steps between checkpoints
        resume_checkpoint="",  # modelNNNNNN.pt to resume from (default: the newest complete one in the log folder)
        allow_config_change=False,  # resume although the batch, seed, method or network flags differ from the run's
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
