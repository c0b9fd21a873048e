"""Convert a diffusers ConsistencyModelPipeline (or UNet2DModel) folder into a checkpoint of this
project: OUTPUT.pt (a plain state dict of our U-Net, its flags stored inside) and OUTPUT.json (a
preset holding the model flags, usable with --config by image_sample.py, image_edit.py, cm_train.py).

    python scripts/convert_from_diffusers.py --diffusers_path ct_imagenet64_diffusers --output ct64.pt
    python scripts/image_sample.py --config ct64.json --model_path ct64.pt --training_mode consistency_training \\
        --sampler onestep --steps 201

--diffusers_path may also name a Hugging Face Hub repository (openai/diffusers-ct_imagenet64), which
needs a connection; offline, download it elsewhere and pass the folder.
"""

import argparse
import json
import os
import re

from cm import logger
from cm.atomic import atomic_write_text
from cm.checkpoints import atomic_save, load_model_weights, with_config
from cm.cli import run_cli
from cm.diffusers_convert import load_folder
from cm.script_util import create_model_and_diffusion


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name; ./x, /x, ~/x and a/b/c are paths


def local_folder(path):
    """`path` if it is a folder, else a Hub repository id downloaded to the local cache."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not HUB_ID.fullmatch(path):
        raise FileNotFoundError(f"--diffusers_path {path}: no such folder (expected a diffusers pipeline or UNet2DModel "
                                "folder, or a Hub repository id owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:  # offline, unknown repository, missing package: one line either way
        raise FileNotFoundError(
            f"--diffusers_path {path} is no local folder, and cannot be fetched from the Hugging Face Hub "
            f"({type(err).__name__}); on a connected machine run "
            f"`huggingface-cli download {path} --local-dir DIR` and pass --diffusers_path DIR"
        ) from None


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if not args.output.endswith(".pt"):
        raise ValueError(f"--output {args.output} should end in .pt (the preset is written beside it as .json)")
    state, flags, steps, extra = load_folder(local_folder(args.diffusers_path))
    model, _ = create_model_and_diffusion(**flags)
    model.load_state_dict(state, strict=True)
    config = dict(flags, steps=steps, converted_from=args.diffusers_path, **extra)
    atomic_save(with_config(state, config), args.output)
    load_model_weights(model, args.output)  # read back: the written file loads as every checkpoint does
    preset = {
        "description": f"model flags of {os.path.basename(args.output)}, converted from {args.diffusers_path}",
        "flags": flags,
    }
    preset_path = args.output[: -len(".pt")] + ".json"
    atomic_write_text(preset_path, json.dumps(preset, indent=2, sort_keys=True))
    params = sum(p.numel() for p in model.parameters())
    logger.log(f"wrote {args.output} ({params / 1e6:.1f}M parameters) and {preset_path}")
    mode = extra.get("training_mode", "consistency_training")
    logger.log(
        f"sample: python scripts/image_sample.py --config {preset_path} --model_path {args.output} "
        f"--training_mode {mode} --sampler onestep --steps {steps}"
    )


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers_path", required=True, help="diffusers pipeline or UNet2DModel folder, or Hub id")
    parser.add_argument("--output", required=True, help="checkpoint file to write (.pt); OUTPUT.json gets the flags")
    return parser


if __name__ == "__main__":
    run_cli(main)
