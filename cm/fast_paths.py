"""Optional fast paths for the networks a script runs: channels_last memory format and torch.compile.

Both are switches (`--channels_last True`, `--compile True`), off by default; neither changes what is
computed, only how (checked against the default path in tests/test_benchmark.py). The other fast paths
need no switch: fused attention (cm/unet.py), fused EMA updates (cm/ema.py), inference mode for the
target and teacher networks (cm/losses.py) and a training step without host-device synchronisation
(cm/train_util.py); bf16 and fp16 are the precision flags. scripts/benchmark.py measures each.
"""

import importlib.util
import shutil

import torch


def check_compile_available(device):
    """One clear error when torch.compile cannot work here (inductor needs a C++ compiler on the CPU
    and Triton on GPUs)."""
    device = torch.device(device)
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise ValueError("--compile True on the CPU needs a C++ compiler (g++ or clang++); install one or drop --compile")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ValueError("--compile True on a GPU needs Triton (pip install triton); install it or drop --compile")


def apply_fast_paths(models, channels_last=False, compile=False):
    """Switch each network in `models` (None entries are skipped) to the channels_last memory format
    (4-D weights stored NHWC, so every convolution, and the activations after it, run NHWC) and/or
    compile it in place with torch.compile (nn.Module.compile: parameter names and state dicts stay
    as they are). Compilation happens on the first call, once per grad mode and input shape."""
    models = [m for m in models if m is not None]
    if compile and models:
        check_compile_available(next(models[0].parameters()).device)
    for model in models:
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if compile:
            model.compile()
    return models
