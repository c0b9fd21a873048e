"""Two-way conversion between this project's U-Net and diffusers' ConsistencyModelPipeline.

The published architecture (residual up/downsampling, attention with a fixed head width) is a
diffusers `UNet2DModel` with resnet up/downsamplers: levels with attention are AttnDownBlock2D /
AttnUpBlock2D, the others ResnetDownsampleBlock2D / ResnetUpsampleBlock2D, FiLM conditioning is
`resnet_time_scale_shift="scale_shift"`. One table of parameter-name pairs (`parameter_pairs`)
serves both directions; the only reshaping is the attention's fused q|k|v 1x1 convolution, split
into three linear layers (our channel layout is [q of all heads | k | v], so a plain 3-way chunk),
and the 1x1 output convolution, stored as a linear layer. Both are exact, so a round trip is
bit-identical.

Both sides compute the same function: the network's time input is 250 ln(sigma) (`network_time`),
the input scaling c_in = 1/sqrt(sigma^2 + sigma_data^2), the boundary-condition scalings of CM
paper Appendix C with epsilon = sigma_min. The pipeline's `timesteps` argument is a list of indices
into the same Karras grid as our `--ts`, with `num_train_timesteps` points (our `--steps`), given
in descending order and ending implicitly at sigma_min:
  diffusers timesteps=[106, 0] (num_train_timesteps=201)  ==  --ts 0,106,200 --steps 201
  diffusers num_inference_steps=k                          ==  --ts 0,N//k,...,(k-1)*(N//k),N-1
"""

import json
import os
from collections import OrderedDict

import torch

from .checkpoints import MODEL_FILE, newest_weight_files, read_model_state
from .dist_util import read_weight_file
from .edm2_published import is_edm2_pickle, read_edm2_pickle
from .networks.adm import parse_attention_resolutions, parse_channel_mult
from .script_util import model_and_diffusion_defaults

# our ResBlock / AttentionBlock sub-module names -> diffusers' ResnetBlock2D / Attention names
RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
ATTENTION_NAMES = {"norm": "group_norm", "proj_out": "to_out.0"}
TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb": "class_embedding",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# our extra file in a converted folder: the flags diffusers' configs cannot hold (round trips exact)
FLAGS_FILE = "cm_flags.json"


def _levels(flags):
    """(channel multipliers, set of levels with attention) of a model's flags."""
    mult = parse_channel_mult(flags["channel_mult"], flags["image_size"])
    attention_ds = parse_attention_resolutions(flags["attention_resolutions"], flags["image_size"])
    return mult, {level for level in range(len(mult)) if 2**level in attention_ds}


def check_convertible(flags):
    """Raise one clear error for the architectures diffusers' UNet2DModel cannot express."""
    if flags.get("network", "adm") != "adm":
        raise ValueError(f"only --network adm converts (diffusers' UNet2DModel is that U-Net), not {flags['network']}")
    if flags.get("time_inputs", 1) != 1:
        raise ValueError("--time_inputs above 1 has no diffusers equivalent (UNet2DModel takes one time)")
    if not flags["resblock_updown"]:
        raise ValueError("diffusers conversion needs --resblock_updown True (as every published checkpoint)")
    if flags["num_head_channels"] == -1:
        raise ValueError(
            "diffusers' UNet2DModel has one head width for all levels: convert models built with "
            "--num_head_channels N (as every published checkpoint), not --num_heads"
        )
    if flags.get("time_embed", "positional") != "positional":
        raise ValueError("only the positional time embedding converts (diffusers' Fourier projection differs)")
    if flags.get("use_new_attention_order"):
        raise ValueError("--use_new_attention_order True has no diffusers equivalent")
    if flags.get("c_noise", "published") != "published":
        raise ValueError("only --c_noise published converts (diffusers' scheduler feeds the network 250 ln(sigma))")
    if flags.get("double_norm"):
        raise ValueError("--double_norm True (sCM's adaptive double normalisation) has no diffusers equivalent")
    mult, _ = _levels(flags)
    if any(float(m) * flags["num_channels"] != int(float(m) * flags["num_channels"]) for m in mult):
        raise ValueError(f"channel_mult {mult} gives fractional channel counts")


def module_pairs(flags):
    """[(our module prefix, diffusers module prefix, kind)] for every module holding parameters;
    kind is "resnet", "attention" or "plain"."""
    mult, attention_levels = _levels(flags)
    num_levels, blocks = len(mult), flags["num_res_blocks"]
    pairs = [(ours, theirs, "plain") for ours, theirs in TOP_LEVEL.items()]
    n = 1
    for level in range(num_levels):
        for j in range(blocks):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if level in attention_levels:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            n += 1
        if level != num_levels - 1:
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", "resnet"))
            n += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "resnet"),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", "resnet"),
    ]
    n = 0
    for level in reversed(range(num_levels)):
        up = num_levels - 1 - level
        for j in range(blocks + 1):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}", "resnet"))
            upsampler = 1
            if level in attention_levels:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}", "attention"))
                upsampler = 2
            if level != 0 and j == blocks:
                pairs.append((f"output_blocks.{n}.{upsampler}", f"up_blocks.{up}.upsamplers.0", "resnet"))
            n += 1
    return pairs


def _locate(key, pairs, hint):
    """(other side's module prefix, kind, parameter suffix) of `key`, by its longest module prefix
    in `pairs` (prefix -> (other prefix, kind)); a key of no module is an error ending in `hint`."""
    for prefix in sorted(pairs, key=len, reverse=True):
        if key.startswith(prefix + "."):
            return (*pairs[prefix], key[len(prefix) + 1 :])
    raise ValueError(f"parameter {key} {hint}")


def _rename(suffix, names):
    for ours, theirs in names.items():
        if suffix.startswith(ours + "."):
            return theirs + suffix[len(ours) :]
    return suffix


def state_dict_to_diffusers(state_dict, flags):
    """Our U-Net state dict -> UNet2DModel state dict (same tensors, renamed; q|k|v split)."""
    check_convertible(flags)
    pairs = {ours: (theirs, kind) for ours, theirs, kind in module_pairs(flags)}
    out = {}
    for key, value in state_dict.items():
        theirs, kind, suffix = _locate(key, pairs, "has no diffusers counterpart; are the flags those of the checkpoint?")
        if kind == "attention" and suffix.startswith("qkv."):
            param = suffix[len("qkv.") :]
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{theirs}.{name}.{param}"] = part.flatten(1).clone() if part.ndim > 1 else part.clone()
            continue
        if kind == "attention" and suffix == "proj_out.weight":
            value = value.flatten(1)
        names = RESNET_NAMES if kind == "resnet" else ATTENTION_NAMES if kind == "attention" else {}
        out[f"{theirs}.{_rename(suffix, names)}"] = value.clone()
    return out


def state_dict_from_diffusers(state_dict, flags):
    """UNet2DModel state dict -> our U-Net state dict (the inverse of state_dict_to_diffusers),
    in diffusers' order with the fused q|k|v weights last."""
    check_convertible(flags)
    pairs = {theirs: (ours, kind) for ours, theirs, kind in module_pairs(flags)}
    inverse = {
        "resnet": {v: k for k, v in RESNET_NAMES.items()},
        "attention": {v: k for k, v in ATTENTION_NAMES.items()},
        "plain": {},
    }
    out, qkv = OrderedDict(), {}
    for key, value in state_dict.items():
        ours, kind, suffix = _locate(key, pairs, "of the diffusers model has no counterpart in this architecture")
        if kind == "attention" and suffix.split(".")[0] in ("to_q", "to_k", "to_v"):
            name, param = suffix.split(".", 1)
            qkv.setdefault(f"{ours}.qkv.{param}", {})[name] = value
            continue
        if kind == "attention" and suffix == "to_out.0.weight":
            value = value.reshape(*value.shape, 1, 1)
        out[f"{ours}.{_rename(suffix, inverse[kind])}"] = value.clone()
    for key, parts in qkv.items():
        if set(parts) != {"to_q", "to_k", "to_v"}:
            raise ValueError(f"{key}: diffusers checkpoint lacks one of to_q/to_k/to_v")
        fused = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], dim=0)
        out[key] = fused.reshape(*fused.shape, 1, 1) if fused.ndim == 2 else fused
    return out


def unet_config(flags):
    """The UNet2DModel config of our model flags."""
    check_convertible(flags)
    mult, attention_levels = _levels(flags)
    levels = range(len(mult))
    return dict(
        sample_size=flags["image_size"],
        in_channels=3,
        out_channels=6 if flags["learn_sigma"] else 3,
        layers_per_block=flags["num_res_blocks"],
        block_out_channels=[int(float(m) * flags["num_channels"]) for m in mult],
        down_block_types=["AttnDownBlock2D" if i in attention_levels else "ResnetDownsampleBlock2D" for i in levels],
        up_block_types=[
            "AttnUpBlock2D" if i in attention_levels else "ResnetUpsampleBlock2D" for i in reversed(levels)
        ],
        downsample_type="resnet",
        upsample_type="resnet",
        attention_head_dim=flags["num_head_channels"],
        # GroupNorm(32) before every attention, the middle one included (diffusers drops it there
        # under scale_shift unless told)
        norm_num_groups=32,
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if flags["use_scale_shift_norm"] else "default",
        num_class_embeds=flags["num_classes"] if flags["class_cond"] else None,
        dropout=flags["dropout"],
        time_embedding_type="positional",
        flip_sin_to_cos=True,  # [cos | sin], as our timestep_embedding
        freq_shift=0,
    )


def flags_from_unet_config(config):
    """Our model flags from a UNet2DModel config (the architectures unet_config produces)."""
    channels = list(config["block_out_channels"])
    base = channels[0]
    down = list(config["down_block_types"])
    expected_up = ["AttnUpBlock2D" if t == "AttnDownBlock2D" else "ResnetUpsampleBlock2D" for t in reversed(down)]
    problems = []
    if any(t not in ("AttnDownBlock2D", "ResnetDownsampleBlock2D") for t in down):
        problems.append(f"down_block_types {down}")
    if list(config["up_block_types"]) != expected_up:
        problems.append(f"up_block_types {config['up_block_types']}")
    if "AttnDownBlock2D" in down and config.get("downsample_type", "conv") != "resnet":
        problems.append(f"downsample_type {config.get('downsample_type', 'conv')}")
    if config.get("time_embedding_type", "positional") != "positional" or not config.get("flip_sin_to_cos", True):
        problems.append("time embedding other than positional [cos | sin]")
    if config.get("class_embed_type") is not None or config.get("in_channels", 3) != 3:
        problems.append("class_embed_type / in_channels")
    if any(c % base for c in channels):
        problems.append(f"block_out_channels {channels} not multiples of the first")
    if problems:
        raise ValueError(
            "this diffusers UNet2DModel is not a consistency-models U-Net (" + "; ".join(problems) + "); "
            "expected Resnet/Attn down and up blocks with resnet up/downsampling, as diffusers' converted checkpoints"
        )
    size = config["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=size,
        num_channels=base,
        num_res_blocks=config["layers_per_block"],
        channel_mult=",".join(str(c // base) for c in channels),
        attention_resolutions=",".join(str(size // 2**i) for i, t in enumerate(down) if t == "AttnDownBlock2D"),
        num_head_channels=config["attention_head_dim"],
        class_cond=config.get("num_class_embeds") is not None,
        num_classes=config.get("num_class_embeds") or model_and_diffusion_defaults()["num_classes"],
        use_scale_shift_norm=config.get("resnet_time_scale_shift", "default") == "scale_shift",
        resblock_updown=True,
        dropout=config.get("dropout", 0.0),
        learn_sigma=config.get("out_channels", 3) == 6,
    )
    return flags


def scheduler_config(flags, steps):
    """CMStochasticIterativeScheduler config: the Karras grid of `steps` points (our --steps)."""
    return dict(
        num_train_timesteps=int(steps),
        sigma_min=float(flags["sigma_min"]),
        sigma_max=float(flags["sigma_max"]),
        sigma_data=0.5,
        rho=7.0,
        s_noise=1.0,
        clip_denoised=True,
    )


def diffusers_timesteps(ts, steps):
    """The pipeline's `timesteps` argument for our --ts over a `steps`-point grid."""
    ts = [int(t) for t in ts]
    if len(ts) < 2 or ts[-1] != steps - 1 or sorted(set(ts)) != ts:
        raise ValueError(
            f"--ts {ts} has no diffusers equivalent: it must increase and end at steps-1={steps - 1} "
            "(the pipeline always finishes at sigma_min)"
        )
    return ts[-2::-1]


def ts_from_diffusers(timesteps, num_train_timesteps):
    """Our --ts for the pipeline's `timesteps` argument (indices in descending order)."""
    return sorted(int(t) for t in timesteps) + [int(num_train_timesteps) - 1]


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("diffusers conversion needs the diffusers package: pip install diffusers safetensors") from None
    return diffusers


def unet_to_diffusers(model, flags):
    """A diffusers UNet2DModel with `model`'s weights (float32, on the CPU)."""
    diffusers = _require_diffusers()
    unet = diffusers.UNet2DModel(**unet_config(flags))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    unet.load_state_dict(state_dict_to_diffusers(state, flags), strict=True)
    return unet.eval()


def pipeline_from_model(model, flags, steps):
    """A ConsistencyModelPipeline of `model` whose scheduler has our `steps`-point grid."""
    diffusers = _require_diffusers()
    scheduler = diffusers.CMStochasticIterativeScheduler(**scheduler_config(flags, steps))
    return diffusers.ConsistencyModelPipeline(unet=unet_to_diffusers(model, flags), scheduler=scheduler)


def save_pipeline(model, flags, steps, folder, extra=None):
    """Write `folder` as diffusers' from_pretrained expects (safetensors weights), plus FLAGS_FILE
    holding our flags (and `extra`: training mode, sampler settings) for an exact way back. The
    folder is written under a temporary name and renamed when complete; it must not exist yet."""
    import shutil

    folder = folder.rstrip("/")
    if os.path.exists(folder):
        raise FileExistsError(f"{folder} already exists; choose another --output_dir or delete it")
    tmp = f"{folder}.tmp{os.getpid()}"
    try:
        pipeline_from_model(model, flags, steps).save_pretrained(tmp, safe_serialization=True)
        record = {"flags": flags, "steps": int(steps), **(extra or {})}
        with open(os.path.join(tmp, FLAGS_FILE), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def load_folder(folder):
    """(our state dict, our flags, steps, extra) from a diffusers ConsistencyModelPipeline folder
    (or a bare UNet2DModel folder). Our flags come from FLAGS_FILE when the folder was written here,
    else from the diffusers configs."""
    from safetensors.torch import load_file

    unet_dir = os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder
    config_path = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(config_path):
        weights = newest_weight_files(folder)
        if not weights:
            raise FileNotFoundError(f"{folder} is a folder with no checkpoints (modelNNNNNN.pt, ema_RATE_NNNNNN.pt) and "
                                    "no diffusers pipeline (unet/config.json); pass a .pt model file or a diffusers folder")
        model, emas = (weights[0], weights[1:]) if MODEL_FILE.match(os.path.basename(weights[0])) else (None, weights)
        choices = ([f"its newest model file {model}"] if model else []) + ([f"an EMA ({', '.join(emas)})"] if emas else [])
        raise IsADirectoryError(f"{folder} is a run folder, not a model file; pass {' or '.join(choices)}")
    with open(config_path) as f:
        config = json.load(f)
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    weights = [n for n in names if os.path.isfile(os.path.join(unet_dir, n))]
    if not weights:
        raise FileNotFoundError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (or .bin) weights")
    path = os.path.join(unet_dir, weights[0])
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = read_weight_file(path, what="diffusers weights")
    record_path = os.path.join(folder, FLAGS_FILE)
    extra = {}
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        flags, steps = record.pop("flags"), record.pop("steps")
        extra = record
    else:
        flags = flags_from_unet_config(config)
        steps = None
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_path):
        with open(scheduler_path) as f:
            scheduler = json.load(f)
        flags.update({k: scheduler.get(k, flags[k]) for k in ("sigma_min", "sigma_max")})
        steps = steps or scheduler.get("num_train_timesteps")
    return state_dict_from_diffusers(state, flags), flags, steps, extra


def read_weights(path):
    """Our model state dict from `path`: a checkpoint file (cm.checkpoints.read_model_state), the U-Net of a
    diffusers ConsistencyModelPipeline / UNet2DModel folder, or an EDM2 network pickle of NVlabs (a .pkl file, or a
    published name such as edm2-img64-s-fid: cm.edm2_published, which never runs the pickle's code)."""
    if is_edm2_pickle(path):
        return read_edm2_pickle(path)
    if os.path.isdir(path):
        return load_folder(path)[0]
    return read_model_state(path)
