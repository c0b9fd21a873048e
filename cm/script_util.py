"""Defaults, model construction and argparse helpers, under the published names (the argparse helpers
live in cm.cli, the curriculum in cm.schedule)."""

from .cli import add_dict_to_argparser, args_to_dict, str2bool
from .karras_diffusion import KarrasDenoiser
from .methods import flag_defaults as method_flag_defaults
from .methods import flag_groups as method_flag_groups
from .networks import NETWORKS, build_network
from .networks import flag_defaults as network_flag_defaults
from .networks.adm import NUM_CLASSES
from .schedule import create_ema_and_scales_fn

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
        **method_flag_defaults(),  # every registered method's own flags, declared in its file (cm/methods/)
    )


def model_and_diffusion_defaults():
    return dict(
        sigma_min=0.002,  # smallest noise level (the boundary-condition epsilon)
        sigma_max=80.0,  # largest noise level T
        network="adm",  # the network, by name (cm.networks; adm: the U-Net of the published checkpoints)
        **network_flag_defaults(),  # every registered network's own flags (adm's: cm/networks/adm.py)
        weight_schedule="karras",  # loss weighting lambda(sigma): snr | snr+1 | karras | truncated-snr | uniform | inverse-step
        c_noise="published",  # the network's time input: published 250 ln(sigma) | edm ln(sigma) / 4 (NVlabs EDM)
    )


# network flags that say how a network is trained or run, not what it computes
TRAINING_ONLY_FLAGS = ("dropout", "use_checkpoint", "use_fp16", "use_bf16", "use_new_attention_order", "weight_schedule")


def network_defining_flags():
    """The flags that decide what a network computes: --network, --c_noise and every registered network's own flags
    but those of how it is trained or run (a resume may not change them; a checkpoint's stored config decides them)."""
    return ("network", "c_noise") + tuple(k for k in network_flag_defaults() if k not in TRAINING_ONLY_FLAGS)


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
    time_inputs=1,
    network="adm",
    **network_flags,
):
    """The network --network `network` (cm.networks) from its flags: these parameters are adm's (the published
    U-Net's, with the published meaning), `network_flags` those of another network."""
    adm_flags = {k: v for k, v in locals().items() if k not in ("network", "network_flags")}
    unknown = set(network_flags) - set(network_flag_defaults())
    if unknown:
        raise TypeError(f"create_model() got unexpected keyword arguments {', '.join(sorted(unknown))} (no network's flags)")
    return build_network(network, {**adm_flags, **network_flags})


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
    time_inputs=1,
    network="adm",
    **network_flags,
):
    """The network and its KarrasDenoiser. Unlike the published function, `loss_norm` reaches the
    denoiser (the published one dropped it, so LPIPS was always used); `rho`, `huber_c` (None: iCT's
    0.00054 sqrt(d)), `lpips_vgg_path` (None: the torch hub cache) and the network by name (create_model)
    are this project's."""
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
        time_inputs=time_inputs,
        network=network,
        **network_flags,
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
        latent_vae="",  # the data are SD-VAE latents of this diffusers AutoencoderKL (scripts/encode_latents.py)
        schedule_sampler="uniform",  # EDM noise-level sampler: lognormal | uniform
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,  # linear decay of the learning rate to 0 over this many steps (0: constant)
        lr_ref_steps=0,  # EDM2's decay: lr / sqrt(max(step / lr_ref_steps, 1)) (0: off); times the linear one
        lr_warmup_steps=0,  # EDM2's ramp-up: lr x min(step / lr_warmup_steps, 1) (0: off)
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
        log_backends="csv",  # where logged values go: csv (progress.csv, always) plus tensorboard, wandb
        eval_interval=0,  # steps between evaluations during training (0: none; the last step is evaluated too)
        eval_ref="",  # their reference: an .npz batch (images or Inception statistics), an EDM2 .pkl, or digits
        eval_features="inception",  # their feature network: inception (FID) | dinov2 (FD-DINOv2) | digits | random
        eval_features_path="",  # its weight file (default: the torch hub cache, else a download)
        eval_samples=10000,  # samples per evaluation, the same seeds every time (docs/training.md: sizing it)
        eval_steps="",  # sampling steps evaluated, e.g. 1,2 (empty: 1,2 for one-step models, 18 Heun steps for EDM)
        eval_t_mid="",  # the intermediate times of multistep evaluations (empty: the parameterization's default)
        eval_ema="",  # the sampling EMAs evaluated, rates of --ema_rate and/or "model" (empty: every rate)
        eval_batch_size=0,  # samples per process per round (0: the per-process training batch)
    )


def add_flags_by_owner(parser, defaults):
    """The flags of `defaults` on `parser`: each network's and each method's own flags (cm.networks, cm.methods) in
    a group of its own with their help lines (python scripts/cm_train.py -h), the others first; a flag two owners
    share is shown with the first."""
    groups = {f"--network {name}": net.flags for name, net in NETWORKS.items()} | method_flag_groups()
    owned = {}
    for title, flags in groups.items():
        owned.update({k: title for k in flags if k in defaults and k not in owned})
    add_dict_to_argparser(parser, {k: v for k, v in defaults.items() if k not in owned})
    for title, flags in groups.items():
        mine = [k for k in flags if owned.get(k) == title]
        if mine:
            add_dict_to_argparser(parser.add_argument_group(title), {k: defaults[k] for k in mine},
                                  {k: flags[k][1] for k in mine})
    return parser
