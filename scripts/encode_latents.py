"""Encode an image folder to SD-VAE latents for training in latent space (EDM2's dataset_tool.py convert + encode): each
image center-cropped and resized to --resolution as ADM, EDM2 (center-crop-dhariwal) and DiT preprocess ImageNet,
encoded by diffusers' AutoencoderKL (cm/latents.py), the mean and standard deviation of its latent Gaussian stored in
float32 shards. Training draws a new latent from each image's Gaussian every epoch and scales it as EDM2 does.

  python scripts/encode_latents.py --source /data/imagenet/train --dest /data/imagenet512_latents --resolution 512
  python scripts/cm_train.py --config scd_edm2_img512_s --data_dir /data/imagenet512_latents ...

Labels: class folders (ImageNet's layout, train/n01440764/*.JPEG: the sorted folder names are classes 0..K-1), else
file names CLASS_rest.ext, else none (-1). The output folder holds latents-NNNNN.npy ([n x 2C x h x w]) and
labels-NNNNN.npy per shard, and dataset.json describing them; each shard is written whole, so a rerun of the same
command resumes after the last complete shard (other settings are refused in one line).
"""

import argparse
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from cm.atomic import atomic_write, atomic_write_text
from cm.cli import run_cli
from cm.image_datasets import (IMAGE_EXTENSIONS, LATENTS_INFO, LATENTS_KIND, center_crop_arr, labels_from_file_names,
                               list_image_files, read_image, to_rgb8)
from cm.latents import DEFAULT_VAE, LatentCodec, load_vae


def folder_labels(paths, root):
    """Labels of ImageNet's layout (every image in a class folder right under `root`: sorted folder names), else of
    CLASS_rest file names, else -1 each."""
    parents = [os.path.relpath(os.path.dirname(p), root) for p in paths]
    if all(parent != "." and os.sep not in parent for parent in parents):
        classes = {name: k for k, name in enumerate(sorted(set(parents)))}
        return np.array([classes[parent] for parent in parents], dtype=np.int64)
    try:
        return np.asarray(labels_from_file_names(paths), dtype=np.int64)
    except ValueError:
        return np.full(len(paths), -1, dtype=np.int64)


def read_square(path, resolution):
    image = read_image(path)
    if not hasattr(image, "mode"):
        raise ValueError(image.message)
    return center_crop_arr(to_rgb8(image), resolution)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help=f"an image folder ({', '.join(IMAGE_EXTENSIONS)}), searched recursively")
    parser.add_argument("--dest", required=True, help="the output folder of latent shards")
    parser.add_argument("--resolution", type=int, default=512, help="the images' side after the center crop")
    parser.add_argument("--latent_vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: a Hub name or a local folder")
    parser.add_argument("--batch_size", type=int, default=16, help="images per VAE forward pass")
    parser.add_argument("--shard_size", type=int, default=1000, help="images per shard")
    parser.add_argument("--max_images", type=int, default=0, help="encode only the first N images (0: all)")
    parser.add_argument("--device", default="", help="cpu | cuda | cuda:N; empty: a GPU if there is one")
    args = parser.parse_args(argv)
    if min(args.resolution, args.batch_size, args.shard_size) < 1 or args.max_images < 0:
        raise ValueError("--resolution, --batch_size and --shard_size must be at least 1, --max_images 0 or more")
    paths = list_image_files(args.source)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {args.source}")
    paths = paths[: args.max_images or None]
    labels = folder_labels(paths, args.source)
    settings = {"kind": LATENTS_KIND, "vae": args.latent_vae, "resolution": args.resolution, "shard_size": args.shard_size,
                "source": os.path.abspath(args.source), "images": len(paths)}
    os.makedirs(args.dest, exist_ok=True)
    info_path = os.path.join(args.dest, LATENTS_INFO)
    info = dict(settings, shards=[], count=0)
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        changed = sorted(k for k in settings if info.get(k) != settings[k])
        if changed:
            raise ValueError(f"{args.dest} holds latents made with other settings ({', '.join(changed)}: "
                             f"{', '.join(str(info.get(k)) for k in changed)}); pass another --dest or the same settings")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codec = LatentCodec(load_vae(args.latent_vae, device))
    done = len(info["shards"])
    bar = tqdm(total=len(paths), initial=done * args.shard_size, desc="encoding", unit="img")
    for shard, start in enumerate(range(done * args.shard_size, len(paths), args.shard_size), start=done):
        rows = range(start, min(start + args.shard_size, len(paths)))
        parts = []
        for batch_start in range(rows.start, rows.stop, args.batch_size):
            ends = range(batch_start, min(batch_start + args.batch_size, rows.stop))
            batch = [read_square(paths[i], args.resolution) for i in ends]
            parts.append(codec.encode_pixels(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)).numpy())
            bar.update(len(batch))
        latents = np.concatenate(parts).astype(np.float32)
        names = (f"latents-{shard:05d}.npy", f"labels-{shard:05d}.npy")
        for name, array in zip(names, (latents, labels[rows.start:rows.stop])):
            atomic_write(os.path.join(args.dest, name), lambda f, a=array: np.save(f, a))
        info["shards"].append([*names, len(rows)])
        info.update(count=sum(n for _, _, n in info["shards"]), channels=latents.shape[1] // 2, size=latents.shape[-1],
                    labels=bool((labels >= 0).all()))
        atomic_write_text(info_path, json.dumps(info, indent=1))  # (the shard is complete once listed here)
    bar.close()
    print(f"{info['count']} images encoded in {args.dest}: latents {info.get('channels')} x {info.get('size')} x "
          f"{info.get('size')} (train with --data_dir {args.dest} --latent_vae {args.latent_vae} --image_channels "
          f"{info.get('channels')} --image_size {info.get('size')})")


if __name__ == "__main__":
    run_cli(main)
