"""adm: the U-Net of the published checkpoints (cm/unet.py; ADM, Dhariwal & Nichol 2021), built from the
published flags, with the same meaning (and cm.script_util.create_model's)."""

from ..cli import FRACTION, POSITIVE
from ..unet import UNetModel

NUM_CLASSES = 1000  # ImageNet's

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

FLAGS = {
    "image_size": (64, "image side in pixels"),
    "num_channels": (128, "base channel count of the U-Net"),
    "num_res_blocks": (2, "residual blocks per resolution level"),
    "num_heads": (4, "attention heads (when num_head_channels is -1)"),
    "num_heads_upsample": (-1, "heads in the decoder (-1: as num_heads)"),
    "num_head_channels": (-1, "fixed channels per head (overrides num_heads)"),
    "attention_resolutions": ("32,16,8", "resolutions (pixels) with attention"),
    "channel_mult": ("", "comma-separated multipliers; empty: by image size"),
    "dropout": (0.0, "dropout in the residual blocks"),
    "class_cond": (False, "class-conditional model"),
    "num_classes": (NUM_CLASSES, "number of classes when class_cond"),
    "null_class": (False, "one more class, y = num_classes, meaning no class (classifier-free guidance)"),
    "use_checkpoint": (False, "gradient checkpointing (less memory, more compute)"),
    "use_scale_shift_norm": (True, "FiLM conditioning in the residual blocks"),
    "resblock_updown": (False, "residual blocks for up/downsampling"),
    "use_fp16": (False, "float16 torso with float32 master weights"),
    "use_bf16": (False, "bfloat16 torso (no loss scaling needed)"),
    "use_new_attention_order": (False, "accepted for compatibility; the layout is fixed by the checkpoints"),
    "learn_sigma": (False, "6 output channels (unused by Karras models)"),
    "time_embed": ("positional", "noise-level embedding: positional (published) | fourier (iCT's option)"),
    "fourier_scale": (0.02, "std of the Fourier frequencies (iCT: 0.02; NCSN++: 16)"),
    "double_norm": (False, "sCM's adaptive double normalisation of the scale-shift conditioning"),
    "time_inputs": (1, "times the network is conditioned on (a flow map's (t, t - r): 2); timesteps [N x K] when K > 1"),
}
RANGES = {"dropout": FRACTION, "fourier_scale": POSITIVE, "time_inputs": POSITIVE}  # (edm2 and dit share them)


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


def build(image_size, num_channels, num_res_blocks, channel_mult, learn_sigma, class_cond, use_checkpoint,
          attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm, dropout,
          resblock_updown, use_fp16, use_new_attention_order, num_classes, use_bf16, time_embed, fourier_scale,
          double_norm, time_inputs, null_class):
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
        channel_mult=mult,
        num_classes=num_classes + int(null_class) if class_cond else None,
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
        time_inputs=time_inputs,
    )
