"""The library's layering (docs/library.md): every `cm` module imports only modules of its own layer
or lower ones, anywhere in the file (function-level imports included), and each imports on its own."""

import ast
import os
import subprocess
import sys

from test_scripts import ROOT

# lowest first; a module may import modules of its own layer or of layers before it
LAYERS = [
    ("foundation", {"atomic", "cli", "config", "dist_util", "logger", "nn", "random_util", "precision", "fast_paths", "image_io",
                    "plots", "run_folder", "safe_pickle", "latents", "log_backends"}),
    ("networks and numerics", {"unet", "networks", "schedule", "denoiser", "trigflow", "flowmap", "jvp", "ema", "phema", "checkpoints", "image_datasets",
                                "edm2_published"}),
    ("losses and samplers", {"lpips", "losses", "samplers", "editing", "parameterizations"}),
    ("training methods", {"methods"}),
    ("loop, compatibility layer, script helpers", {"train_util", "karras_diffusion", "script_util", "diffusers_convert",
                                                   "run_setup", "sample_util", "published"}),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def cm_modules():
    """(dotted name, path) of every module of the package."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "cm")):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                found.append((rel[: -len(".__init__")] if rel.endswith(".__init__") else rel, os.path.join(folder, f)))
    return found


def imported_cm_modules(name, path):
    """The top-level cm modules (`losses`, `methods`, ...) that the file imports, wherever it does."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] if base == "cm" else [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out |= {t.split(".")[1] for t in targets if t.startswith("cm.")}
    return out


def layer(module):
    top = module.split(".")[1] if module.count(".") else None
    return LAYER_OF[top] if top else None


def test_every_module_has_a_layer():
    tops = {name.split(".")[1] for name, _ in cm_modules() if name != "cm"}
    assert tops == set(LAYER_OF), (tops ^ set(LAYER_OF))


def test_no_module_imports_a_higher_layer():
    wrong = []
    for name, path in cm_modules():
        own = layer(name)
        if own is None:
            continue
        for other in imported_cm_modules(name, path):
            if other != name.split(".")[1] and LAYER_OF[other] > own:
                wrong.append(f"{name} ({LAYERS[own][0]}) imports cm.{other} ({LAYERS[LAYER_OF[other]][0]})")
    assert not wrong, "\n".join(wrong)


def test_the_lowest_layers_know_nothing_of_losses_loops_or_converters():
    # preconditioning only: the denoiser knows no loss or distance
    assert imported_cm_modules("cm.denoiser", os.path.join(ROOT, "cm", "denoiser.py")) == {"nn"}
    assert "checkpoints" not in imported_cm_modules("cm.losses", os.path.join(ROOT, "cm", "losses.py"))


def test_each_module_imports_on_its_own():
    # one interpreter; before each import every cm module is forgotten, so each is the first one imported
    names = [name for name, _ in cm_modules()]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'cm' or m.startswith('cm.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_methods_use_only_what_they_are_handed():
    """Duck typing the layering test above cannot see: every attribute a method module reads of the denoiser it is
    handed (`self.diffusion.X`, `self.teacher_diffusion.X`) is a Denoiser's (layer 2) or LossSettings' (layer 3), and
    every one it reads of its context (`ctx.X`) a MethodContext field: never a KarrasDenoiser's or the loop's."""
    from dataclasses import fields

    from cm.denoiser import Denoiser
    from cm.losses import LossSettings
    from cm.methods import MethodContext

    handed = set(dir(Denoiser)) | set(vars(Denoiser())) | set(dir(LossSettings)) | set(vars(LossSettings()))
    context = {f.name for f in fields(MethodContext)}
    for name, path in cm_modules():
        if not name.startswith("cm.methods"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "self" \
                    and owner.attr in ("diffusion", "teacher_diffusion"):
                assert node.attr in handed, f"{path}: self.{owner.attr}.{node.attr} is not a Denoiser's or LossSettings'"
            if isinstance(owner, ast.Name) and owner.id == "ctx":
                assert node.attr in context, f"{path}: ctx.{node.attr} is not a MethodContext field"
