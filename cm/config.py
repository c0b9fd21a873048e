"""Named presets (configs/NAME.json) for the scripts: `--config NAME` supplies flag values, and any
flag given on the command line overrides them.

A preset file: {"script": "cm_train.py", "description": "...", "base": "base/imagenet64", "flags": {...}}.
"base" (optional) names another preset whose flags come first (the preset's own override them); the
architectures of the published experiments live once each in configs/base/ (a base names no script,
so any script takes it, and `bash launch.sh list` does not list it). A name is one of those files, never a
path out of configs/ (a path ending .json is read as the user's own preset), and "script" is one of scripts/*.py.
"""

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
SCRIPT_DIR = os.path.join(ROOT, "scripts")


def _names(folder, ext):
    return sorted(f[: -len(ext)] for f in os.listdir(folder) if f.endswith(ext)) if os.path.isdir(folder) else []


def preset_names():
    return _names(CONFIG_DIR, ".json")


def script_names():
    """The scripts a preset may name: the files of scripts/*.py."""
    return [f"{name}.py" for name in _names(SCRIPT_DIR, ".py")]


def _unknown_preset(name):
    return ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")


def _read_preset(name):
    # a name is one of configs/*.json or configs/base/*.json (never a path out of configs/); a .json path is a user's own file
    if name.endswith(".json"):
        path = name
    elif name in preset_names() or name in [f"base/{n}" for n in _names(os.path.join(CONFIG_DIR, "base"), ".json")]:
        path = os.path.join(CONFIG_DIR, f"{name}.json")
    else:
        raise _unknown_preset(name)
    if not os.path.isfile(path):
        raise _unknown_preset(name)
    with open(path) as f:
        try:
            preset = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"preset {path} is not valid JSON: {err}") from err
    if not isinstance(preset.get("flags"), dict):
        raise ValueError(f"preset {path} has no \"flags\" object")
    if "script" in preset and preset["script"] not in script_names():
        raise ValueError(f"preset {path}: its script {preset['script']!r} is not one of scripts/*.py: "
                         f"{', '.join(script_names())}")
    return preset


def preset_script(name):
    """The script preset `name` runs (launch.sh): the name must be one of configs/*.json, the script one of scripts/*.py."""
    if name not in preset_names():
        raise _unknown_preset(name)
    preset = load_preset(name)
    if "script" not in preset:
        raise ValueError(f"preset {name!r} names no script; choose one of: {', '.join(preset_names())}")
    return preset["script"]


def load_preset(name):
    """The preset called `name` in configs/ (or the .json file at that path), its base presets' flags
    merged under its own."""
    chain = [name]
    preset = _read_preset(name)
    flags = dict(preset["flags"])
    base = preset.get("base")
    while base:
        if base in chain:
            raise ValueError(f"preset {name!r}: its bases form a loop ({' -> '.join(chain + [base])})")
        chain.append(base)
        parent = _read_preset(base)
        flags = {**parent["flags"], **flags}
        base = parent.get("base")
    return dict(preset, flags=flags)


def given_flags(parser, argv):
    """The flags of `parser` that `argv` or the --config preset set (after parse_args_with_config), as a set of names:
    those a default did not decide."""
    actions = [a for a in parser._actions if a.dest != "help"]
    defaults = [a.default for a in actions]
    for action in actions:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_known_args(argv)[0]))  # (a preset's flags are the parser's own defaults)
    finally:
        for action, default in zip(actions, defaults):
            action.default = default


def parse_args_with_config(parser, argv, script, also=(), mode_defaults=None):
    """Parse `argv` with `parser`, its defaults first replaced by the --config preset's flags; the
    preset must be made for `script` or one of the scripts in `also` (whose flags it shares).
    `mode_defaults` ({training_mode: {flag: value}}) gives the values a --training_mode brings: they
    replace the script's defaults, and the preset and the command line override them."""
    parser.add_argument("--config", default="", help="preset name in configs/ (any other flag overrides it)")
    known, _ = parser.parse_known_args(argv)
    preset_flags = {}
    if known.config:
        preset = load_preset(known.config)
        if preset.get("script", script) not in (script, *also):
            raise ValueError(f"preset {known.config!r} is for scripts/{preset['script']}, not scripts/{script}")
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(preset["flags"]) - dests)
        if unknown:
            raise ValueError(f"preset {known.config!r} sets flags scripts/{script} does not have: {', '.join(unknown)}")
        preset_flags = preset["flags"]
        parser.set_defaults(**preset_flags)
    if mode_defaults:
        mode = parser.parse_known_args(argv)[0].training_mode
        parser.set_defaults(**{**mode_defaults.get(mode, {}), **preset_flags})
    return parser.parse_args(argv)
