"""Checkpoint files: atomic writes; the files of a training checkpoint in a run folder (CheckpointIO:
save a step's files, find the newest complete checkpoint, read a companion file back); loading a
state dict into a model with a clear mismatch error; the run's config stored inside every file.

Reading a model file needs nothing but PyTorch: a diffusers folder is the caller's to convert
(cm.diffusers_convert.read_weights).
"""

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from . import dist_util, logger
from .atomic import atomic_write

MODEL_FILE = re.compile(r"^model(\d{6,})\.pt$")
STEP_FILE = re.compile(r"^(?!.*\.tmp\d)(\w[\w.]*\D)?(\d{6,})\.pt$")  # any file of a checkpoint: NAMENNNNNN.pt (not a temporary)


def file_sha256(path):
    """The SHA-256 of a file's bytes, or of a folder's files (names and bytes, in sorted order: a diffusers folder)."""
    digest = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    for p in paths:
        if p != path:
            digest.update(os.path.relpath(p, path).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def atomic_save(obj, path):
    """torch.save through a temporary file and a rename: a reader never sees half a checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def parse_resume_step_from_filename(filename):
    """NNNNNN of path/to/modelNNNNNN.pt (0 when the name has no step); the published name."""
    match = MODEL_FILE.match(os.path.basename(filename))
    return int(match.group(1)) if match else 0


def with_config(state_dict, config):
    """Attach the run's resolved config to a state dict (in its metadata, which load_state_dict ignores),
    so every checkpoint says how it was made."""
    if config is not None:
        state_dict._metadata = getattr(state_dict, "_metadata", {})
        state_dict._metadata["cm_config"] = {"json": json.dumps(config, sort_keys=True, default=str)}
    return state_dict


def checkpoint_config(state_dict):
    """The config stored by with_config, or None."""
    meta = getattr(state_dict, "_metadata", {}).get("cm_config")
    return json.loads(meta["json"]) if meta else None


# flags that no shape check finds (clearly): the network's name (cm.networks), and those that change what a network
# computes but not its parameters' shapes
UNSEEN_FLAGS = ("network", "c_noise", "double_norm")


def stored_flag_changes(state_dict, flags, keys=UNSEEN_FLAGS):
    """{key: stored value} of the `keys` on which `flags` (a dict) differ from the config stored in the checkpoint
    (checkpoints without a stored config, or without the key, are not checked)."""
    config = checkpoint_config(state_dict) or {}
    return {k: config[k] for k in keys if k in config and k in flags and str(config[k]) != str(flags[k])}


def flag_text(values):
    return " ".join(f"--{k} {v}" for k, v in values.items())


def check_stored_flags(state_dict, flags, path, keys=UNSEEN_FLAGS):
    """One clear error where `flags` (a dict) differ from the config stored in the checkpoint at `path`
    on one of `keys` (stored_flag_changes)."""
    wanted = stored_flag_changes(state_dict, flags, keys)
    if wanted:
        got = flag_text({k: flags[k] for k in wanted}) if len(wanted) > 1 else flags[next(iter(wanted))]
        raise ValueError(f"{path} was trained with {flag_text(wanted)}; pass {flag_text(wanted)} (got {got})")


def stored_training_mode(state_dict):
    """The --training_mode a checkpoint of this project was trained with, from its stored config; None when it does
    not say (published files, converted ones)."""
    config = checkpoint_config(state_dict) or {}
    if "training_mode" in config:
        return config["training_mode"]
    # a training run's config without a method is scripts/edm_train.py's (cm_train.py always stores one)
    return "edm" if "data_dir" in config else None


def stored_network(state_dict):
    """The --network a checkpoint was trained with: from its stored config, else adm (published and converted files,
    and this project's from before networks had names)."""
    return (checkpoint_config(state_dict) or {}).get("network", "adm")


WEIGHT_FILE = re.compile(r"^(model|p?ema_.+_)(\d{6,})\.pt$")  # a run's model and (post-hoc) EMA files


def newest_weight_files(folder):
    """The weight files of a run folder's newest step as paths, its modelNNNNNN.pt (if any) first, then its EMAs."""
    found = sorted((int(m.group(2)), m.group(1) != "model", n) for n in os.listdir(folder) if (m := WEIGHT_FILE.match(n)))
    return [os.path.join(folder, n) for step, _, n in found if step == found[-1][0]]


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
    """The model state dict in file `path` (a plain state dict, or one under "model"); an unreadable
    file raises one error saying so."""
    state_dict = dist_util.load_state_dict(path, map_location="cpu")
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return state_dict


def load_model_weights(model, path, state_dict=None, what="checkpoint"):
    """Load the model state in file `path` (or `state_dict`, already read from `path`) into `model`
    (strict); `what` names it in errors ("target checkpoint", ...). A state that does not fit raises
    one error naming the differing keys and shapes and the likely fix."""
    if state_dict is None:
        state_dict = read_model_state(path)
    trained, network = stored_network(state_dict), getattr(model, "network_name", None)
    if network not in (None, trained):
        raise ValueError(f"{what} {path} was trained with --network {trained}; pass --network {trained} (got {network})")
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise ValueError(
            f"{what} {path} does not fit the model built from these flags ({'; '.join(problems)}); "
            "check the architecture flags (image_size, num_channels, num_res_blocks, class_cond, "
            "attention_resolutions, num_head_channels, resblock_updown, use_scale_shift_norm)"
        )
    model.load_state_dict(state_dict, strict=True)
    return model


@dataclass(frozen=True)
class Saved:
    """One file of a training checkpoint, declared once under its name NAME (the file NAMENNNNNN.pt): `state()`
    is what is written; `load(path)` restores it from a resumed checkpoint's file; `missing(model_path)` runs when
    that checkpoint has no such file (an average new to the run, a bare model file resumed)."""

    state: Callable
    load: Callable = None  # None: restored elsewhere (the model file, read before anything else is built)
    missing: Callable = None


class CheckpointIO:
    """The checkpoints of one training run in `folder`, under the published file names: each file a Saved object
    declared once by name (`files`: {NAME: Saved} in writing order; the model last), from which the file names,
    saving and restoring follow. The model file (modelNNNNNN.pt) is written last, so a model file present means its
    checkpoint is complete, whatever files today's flags add (the role of EDM2's CheckpointIO, with one file per
    network as published)."""

    def __init__(self, folder):
        self.folder = folder

    def newest(self):
        """The model file of the newest complete checkpoint in the folder, or None. A file of its step cut short
        (no zip directory at its end: torch.save's files are zip archives) passes it over, with a line in the log;
        a file it lacks is one that today's flags add (a new EMA rate): the loop starts that from the resumed
        state, so that the run is never restarted from step 0 over its checkpoints."""
        steps = sorted((parse_resume_step_from_filename(f) for f in self._model_files()), reverse=True)
        for step in steps:
            paths = sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder)
                           if (m := STEP_FILE.match(n)) and int(m.group(2)) == step)
            broken = [p for p in paths if not zipfile.is_zipfile(p)]
            if broken:
                logger.log(f"passing over checkpoint {step:06d}: {broken[0]} is truncated or not a checkpoint")
                continue
            return os.path.join(self.folder, f"model{step:06d}.pt")
        return None

    def restore(self, model_path, step, files):
        """Each Saved of `files` ({NAME: Saved}) from its file beside `model_path` at `step`, in order; missing()
        for those the checkpoint lacks."""
        for name, saved in files.items():
            path = self.companion(model_path, f"{name}{step:06d}.pt")
            if path and saved.load is not None:
                saved.load(path)
            elif not path and saved.missing is not None:
                saved.missing(model_path)

    def save_files(self, step, files):
        """Write the state of each Saved of `files` ({NAME: Saved}, the model last) as the checkpoint at `step`."""
        self.save(step, {f"{name}{step:06d}.pt": saved.state() for name, saved in files.items()})

    def resume_path(self, given=""):
        """`given` (--resume_checkpoint) if set, else the newest complete checkpoint (None: a fresh run)."""
        if given:
            if not os.path.exists(given):
                raise FileNotFoundError(f"--resume_checkpoint {given} does not exist")
            # a modelNNNNNN.pt resumes at step NNNNNN; any other weight file (a published checkpoint, an EMA) starts
            # a new run at step 0 from its weights: either way no checkpoint of another history may be overwritten
            step = parse_resume_step_from_filename(given)
            newer = [f for f in self._model_files() if parse_resume_step_from_filename(f) > step]
            if newer:
                what = f"is at step {step}" if MODEL_FILE.match(os.path.basename(given)) else "starts a new run at step 0"
                raise ValueError(
                    f"--resume_checkpoint {given} {what}, but {self.folder} holds later checkpoints (newest: "
                    f"{max(newer)}) that it would overwrite; pass another --log_dir, or move them away"
                )
            return given
        return self.newest()

    def _model_files(self):
        if not self.folder or not os.path.isdir(self.folder):
            return []
        return [f for f in os.listdir(self.folder) if MODEL_FILE.match(f)]

    @staticmethod
    def companion(model_path, name):
        """A file of the same checkpoint as model file `model_path` (None when absent)."""
        other = os.path.join(os.path.dirname(model_path), name)
        return other if os.path.exists(other) else None

    @staticmethod
    def load(path, map_location="cpu"):
        return dist_util.load_state_dict(path, map_location=map_location)

    def save(self, step, files):
        """Write {file name: object} on rank 0, each atomically and in order (the model file last); a failed write
        stops every rank in one line, and the checkpoint, its model file not there, is passed over."""
        paths = {name: os.path.join(self.folder, name) for name in files}
        writes = [(paths[name], partial(atomic_save, obj, paths[name])) for name, obj in files.items()]
        dist_util.write_on_rank0(writes, f"so checkpoint {step:06d} is incomplete and will be passed over; make room and "
                                         "rerun: the run resumes from its last complete checkpoint")
        if dist_util.get_rank() == 0:
            logger.log(f"saved checkpoint {step:06d} in {self.folder}")


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
