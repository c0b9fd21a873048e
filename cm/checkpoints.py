"""Checkpoint files: atomic writes, and loading a state dict into a model with a clear mismatch error."""

import os

import torch

from . import dist_util
from .atomic import atomic_write


def atomic_save(obj, path):
    """torch.save through a temporary file and a rename: a reader never sees half a checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def state_dict_mismatch(model, state_dict, limit=10):
    """Lines describing keys missing from, unexpected in, or shaped differently in `state_dict`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            shown = ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
            lines.append(f"{title}: {shown}")
    return lines


def read_model_state(path):
    """The model state dict at `path`: a plain state dict (or one under "model"), or the U-Net of the
    diffusers folder at `path`; an unreadable file raises one error saying so."""
    if os.path.isdir(path):  # a diffusers ConsistencyModelPipeline / UNet2DModel folder
        from .diffusers_convert import load_folder

        return load_folder(path)[0]
    try:
        state_dict = dist_util.load_state_dict(path, map_location="cpu")
    except (RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path} (truncated or not a PyTorch state dict): {err}") from err
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return state_dict


def load_model_weights(model, path, state_dict=None):
    """Load the model state at `path` (read_model_state; or `state_dict`, already read from `path`)
    into `model` (strict); a checkpoint that does not fit raises one error naming the differing keys
    and shapes and the likely fix."""
    if state_dict is None:
        state_dict = read_model_state(path)
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise ValueError(
            f"checkpoint {path} does not fit the model built from these flags ({'; '.join(problems)}); "
            "check the architecture flags (image_size, num_channels, num_res_blocks, class_cond, "
            "attention_resolutions, num_head_channels, resblock_updown, use_scale_shift_norm)"
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def weights_file(what, given, flag, file_names, urls, hash_prefix=None):
    """The path of a pretrained weight file: `given` (the value of `flag`) if set, else the first of
    `file_names` in the torch hub cache ($TORCH_HOME/hub/checkpoints), else downloaded there from the
    first reachable of `urls` (its SHA-256 prefix checked when given). Offline with none of them: one
    FileNotFoundError naming the file, the folder to put it in, where to get it, and the flag."""
    if given:
        if not os.path.isfile(given):
            raise FileNotFoundError(f"{what} weights not found at {given} ({flag}); it should be {file_names[0]}, from {urls[0]}")
        return given
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in file_names:
        if os.path.isfile(os.path.join(cache_dir, name)):
            return os.path.join(cache_dir, name)
    path = os.path.join(cache_dir, file_names[0])
    failures = []
    for url in urls:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            # torch hub writes a temporary file and renames it only once the hash matches
            torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix, progress=True)
            return path
        except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
            failures.append(f"{url}: {err}")
    raise FileNotFoundError(
        f"{what} needs the weights {file_names[0]}, which are not in {cache_dir} and could not be downloaded "
        f"({'; '.join(failures)}); on a connected machine fetch {urls[0]} and put it in {cache_dir} "
        f"(the torch hub cache, under $TORCH_HOME), or pass its path with {flag}"
    )
