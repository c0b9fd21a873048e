"""Checkpoint files: atomic writes, and loading a state dict into a model with a clear mismatch error."""

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


def load_model_weights(model, path):
    """Load the plain state dict at `path` into `model` (strict); a checkpoint that does not fit
    raises one error naming the differing keys and shapes and the likely fix."""
    try:
        state_dict = dist_util.load_state_dict(path, map_location="cpu")
    except (RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path} (truncated or not a PyTorch state dict): {err}") from err
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise ValueError(
            f"checkpoint {path} does not fit the model built from these flags ({'; '.join(problems)}); "
            "check the architecture flags (image_size, num_channels, num_res_blocks, class_cond, "
            "attention_resolutions, num_head_channels, resblock_updown, use_scale_shift_norm)"
        )
    model.load_state_dict(state_dict, strict=True)
    return model
