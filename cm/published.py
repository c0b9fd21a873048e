"""The twelve published checkpoints (openai/consistency_models) by name.

Each entry names the file on the published blob store, the experiment that trained it, and the
presets in configs/ that hold its architecture flags and sampler settings (taken from the published
launch.sh): `scripts/image_sample.py --config <sampling preset> --model_path NAME.pt` needs nothing
more. The architecture lives only in the presets; `published_flags(name)` reads it from there.
"""

from .config import load_preset
from .script_util import model_and_diffusion_defaults

BLOB_URL = "https://openaipublic.blob.core.windows.net/consistency/{name}.pt"
# diffusers' conversions of the consistency checkpoints (the EDM teachers were not converted)
HUB_URL = "https://huggingface.co/openai/diffusers-{name}"

# name -> (experiment preset, training mode, one-step or Heun preset, two-step preset or None,
#          paper FID one-step / two-step where the paper reports it)
PUBLISHED = {
    "edm_imagenet64_ema": ("edm_imagenet64", "edm", "sample_edm_imagenet64_heun", None, None),
    "cd_imagenet64_l2": ("cd_l2_imagenet64", "consistency_distillation", "sample_cd_l2_imagenet64_onestep", "sample_cd_l2_imagenet64_multistep", None),
    "cd_imagenet64_lpips": ("cd_lpips_imagenet64", "consistency_distillation", "sample_cd_lpips_imagenet64_onestep", "sample_cd_lpips_imagenet64_multistep", ("6.20", "4.70")),
    "ct_imagenet64": ("ct_imagenet64", "consistency_training", "sample_ct_imagenet64_onestep", "sample_ct_imagenet64_multistep", ("13.0", "11.1")),
    "edm_bedroom256_ema": ("edm_bedroom256", "edm", "sample_edm_bedroom256_heun", None, None),
    "cd_bedroom256_l2": ("cd_l2_bedroom256", "consistency_distillation", "sample_cd_l2_bedroom256_onestep", "sample_cd_l2_bedroom256_multistep", None),
    "cd_bedroom256_lpips": ("cd_lpips_bedroom256", "consistency_distillation", "sample_cd_lpips_bedroom256_onestep", "sample_cd_lpips_bedroom256_multistep", ("7.80", "5.22")),
    "ct_bedroom256": ("ct_bedroom256", "consistency_training", "sample_ct_bedroom256_onestep", "sample_ct_bedroom256_multistep", ("16.0", "7.85")),
    "edm_cat256_ema": ("edm_cat256", "edm", "sample_edm_cat256_heun", None, None),
    "cd_cat256_l2": ("cd_l2_cat256", "consistency_distillation", "sample_cd_l2_cat256_onestep", "sample_cd_l2_cat256_multistep", None),
    "cd_cat256_lpips": ("cd_lpips_cat256", "consistency_distillation", "sample_cd_lpips_cat256_onestep", "sample_cd_lpips_cat256_multistep", ("11.0", "8.84")),
    "ct_cat256": ("ct_cat256", "consistency_training", "sample_ct_cat256_onestep", "sample_ct_cat256_multistep", ("20.7", "11.7")),
}

ARCHITECTURE_FLAGS = (
    "image_size", "num_channels", "num_res_blocks", "attention_resolutions", "num_head_channels",
    "class_cond", "use_scale_shift_norm", "resblock_updown", "dropout",
)


def published_flags(name):
    """The model flags of published checkpoint `name` (the defaults, then its sampling preset's)."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published checkpoint {name!r}; choose one of {', '.join(PUBLISHED)}")
    flags = model_and_diffusion_defaults()
    preset = load_preset(PUBLISHED[name][2])["flags"]
    flags.update({k: v for k, v in preset.items() if k in flags})
    return flags


def sampler_settings(preset_name):
    """'onestep, steps 201' style summary of a sampling preset."""
    if preset_name is None:
        return ""
    flags = load_preset(preset_name)["flags"]
    text = f"{flags['sampler']}, steps {flags['steps']}"
    return text + (f", ts {flags['ts']}" if flags.get("ts") else "")


def published_table():
    """The table of docs/published.md, as markdown."""
    lines = [
        "| checkpoint | trained by (preset) | mode | architecture | sampling presets: one-step / two-step | paper FID |",
        "|---|---|---|---|---|---|",
    ]
    for name, (train, mode, first, second, fid) in PUBLISHED.items():
        f = published_flags(name)
        arch = (
            f"{f['image_size']}px, {f['num_channels']} ch, {f['num_res_blocks']} res, attn {f['attention_resolutions']}, "
            f"{'class-cond' if f['class_cond'] else 'uncond'}, {'scale-shift' if f['use_scale_shift_norm'] else 'no scale-shift'}"
        )
        sampling = f"`{first}` ({sampler_settings(first)})"
        if second:
            sampling += f" / `{second}` ({sampler_settings(second)})"
        lines.append(
            f"| `{name}` | `{train}` | {mode} | {arch} | {sampling} | {'' if fid is None else f'{fid[0]} / {fid[1]}'} |"
        )
    return "\n".join(lines)
