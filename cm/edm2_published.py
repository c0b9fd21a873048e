"""EDM2's published checkpoints (NVlabs/edm2, generate_images.py's presets) by name, and NVlabs' network pickles read
into this project's edm2 network (cm/networks/edm2.py) without running their embedded code (cm.safe_pickle).

A pickle's Precond (under "ema", as NVlabs' training loop saves it, or alone) becomes a state dict of float32 tensors
with NVlabs' names, its constructor's keyword arguments become our network flags, and the config a checkpoint of this
project stores is attached: an EDM2 model, trained as --training_mode edm, with EDM2's c_noise = ln(sigma) / 4.
"""

import collections
import os

import torch

from .checkpoints import weights_file, with_config
from .networks.edm2 import DEFAULT_CHANNEL_MULT
from .safe_pickle import Record, module_state, safe_load

MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
# name -> file, from NVlabs/edm2 generate_images.py (the EMA length of each is the one its metric is best at)
PUBLISHED = {
    "edm2-img512-xs-fid": "edm2-img512-xs-2147483-0.135.pkl", "edm2-img512-xs-dino": "edm2-img512-xs-2147483-0.200.pkl",
    "edm2-img512-s-fid": "edm2-img512-s-2147483-0.130.pkl", "edm2-img512-s-dino": "edm2-img512-s-2147483-0.190.pkl",
    "edm2-img512-m-fid": "edm2-img512-m-2147483-0.100.pkl", "edm2-img512-m-dino": "edm2-img512-m-2147483-0.155.pkl",
    "edm2-img512-l-fid": "edm2-img512-l-1879048-0.085.pkl", "edm2-img512-l-dino": "edm2-img512-l-1879048-0.155.pkl",
    "edm2-img512-xl-fid": "edm2-img512-xl-1342177-0.085.pkl", "edm2-img512-xl-dino": "edm2-img512-xl-1342177-0.155.pkl",
    "edm2-img512-xxl-fid": "edm2-img512-xxl-0939524-0.070.pkl", "edm2-img512-xxl-dino": "edm2-img512-xxl-0939524-0.150.pkl",
    "edm2-img64-s-fid": "edm2-img64-s-1073741-0.075.pkl", "edm2-img64-m-fid": "edm2-img64-m-2147483-0.060.pkl",
    "edm2-img64-l-fid": "edm2-img64-l-1073741-0.040.pkl", "edm2-img64-xl-fid": "edm2-img64-xl-0671088-0.040.pkl",
}

# NVlabs' Precond / UNet / Block keyword -> our flag (and how its value reads); the ones not here are refused unless
# they hold NVlabs' default, which our network has built in
KWARG_FLAGS = {
    "img_resolution": ("image_size", int),
    "img_channels": ("image_channels", int),
    "model_channels": ("num_channels", int),
    "channel_mult": ("channel_mult", lambda v: ",".join(str(int(m)) for m in v)),
    "num_blocks": ("num_res_blocks", int),
    "attn_resolutions": ("attention_resolutions", lambda v: ",".join(str(int(r)) for r in v)),
    "dropout": ("dropout", float),
    "label_balance": ("edm2_label_balance", float),
    "concat_balance": ("edm2_concat_balance", float),
    "res_balance": ("edm2_res_balance", float),
    "attn_balance": ("edm2_attn_balance", float),
    "channels_per_head": ("edm2_channels_per_head", int),
    "logvar_channels": ("edm2_logvar_channels", int),
}
BUILT_IN = {"sigma_data": 0.5, "clip_act": 256, "resample_filter": [1, 1], "channel_mult_noise": None, "channel_mult_emb": None}
IGNORED = ("use_fp16",)  # (the precision is ours to choose)
DEFAULTS = dict(channel_mult=",".join(map(str, DEFAULT_CHANNEL_MULT)), num_res_blocks=3, attention_resolutions="16,8")


def is_edm2_pickle(path):
    return path in PUBLISHED or str(path).endswith(".pkl")


def edm2_path(name_or_path, flag="--model_path"):
    """The file of a published name (the torch hub cache, else downloaded there; offline, one line naming the file and
    where to put it), or the path itself."""
    if name_or_path not in PUBLISHED:
        return name_or_path
    file_name = PUBLISHED[name_or_path]
    return weights_file(f"EDM2 checkpoint {name_or_path}", "", flag, [file_name], [f"{MODEL_ROOT}/{file_name}"])


def network_flags(kwargs, path):
    """Our edm2 network flags from a Precond's constructor keywords; one line for what our network does not build."""
    flags = dict(network="edm2", **DEFAULTS)
    for key, value in kwargs.items():
        if key in KWARG_FLAGS:
            flag, read = KWARG_FLAGS[key]
            flags[flag] = read(value)
        elif key == "label_dim":
            flags.update(class_cond=bool(value), num_classes=int(value) or 1000)
        elif key in BUILT_IN and value == BUILT_IN[key] or key in IGNORED:
            continue
        else:
            raise ValueError(f"{path}: the network sets {key}={value!r}, which cm/networks/edm2.py does not build "
                             f"(it builds {', '.join(f'{k}={v!r}' for k, v in BUILT_IN.items())})")
    return flags


def read_edm2_pickle(path):
    """The state dict (float32, NVlabs' names) of the EDM2 network pickled in `path` (a published name, or a file),
    its config attached (cm.checkpoints.with_config)."""
    path = edm2_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no EDM2 network pickle at {path}; pass a file, or one of {', '.join(PUBLISHED)}")
    data = safe_load(path)
    net = data.get("ema", data.get("net")) if isinstance(data, dict) else data
    if not (isinstance(net, Record) and net.class_name == "Precond"):
        raise ValueError(f"{path} holds no EDM2 network (NVlabs' Precond under 'ema', or alone)")
    flags = network_flags(net.state.get("_init_kwargs") or {}, path)
    state = {k: v.to(torch.float32) for k, v in module_state(net).items()}
    config = dict(flags, training_mode="edm", c_noise="edm", sigma_min=0.002, sigma_max=80.0, source=os.path.basename(path))
    return with_config(collections.OrderedDict(state), config)
