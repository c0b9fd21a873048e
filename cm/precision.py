"""Which precision a run computes in: `--precision auto|fp32|bf16|fp16`, chosen by the hardware.

`auto` picks the fastest precision that the device runs natively:
- CUDA: bf16 where the card has bf16 arithmetic (Ampere and later), else fp16 with loss scaling;
- CPU: bf16 only where the CPU has bf16 matrix instructions (AMX, or AVX512-BF16), else float32.
  Without them PyTorch emulates bf16: on an AVX2-only AMD EPYC (Zen 3, 2 threads, torch 2.14.1) a
  2048x2048 bf16 matmul ran at 0.3 GFLOP/s against 74 for float32, and the demo's CT step at 6.4
  against 81 images/s.

The published flags `--use_fp16 True` / `--use_bf16 True` win over `--precision` when given. The
resolved choice is written back into the flags (`precision`, `use_fp16`, `use_bf16`), so it reaches
the model, the autocast context, config.json and every checkpoint's config.
"""

import os
import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# measured on the AVX2-only machine above (float32 GFLOP/s / emulated-bf16 GFLOP/s, 2048^2 matmul)
EMULATED_BF16_SLOWDOWN = 74 / 0.3


class PrecisionWarning(UserWarning):
    """A precision that this hardware runs far slower than float32."""


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on (tests build these by hand)."""

    device_type: str  # "cpu" or "cuda"
    cuda_bf16: bool = False  # the CUDA device computes in bf16 natively
    cpu_amx: bool = False  # Intel AMX tiles (bf16 matrix units)
    cpu_avx512_bf16: bool = False  # AVX512-BF16 dot-product instructions
    name: str = ""  # the CPU model or GPU name, for messages

    @property
    def cpu_native_bf16(self):
        return self.cpu_amx or self.cpu_avx512_bf16

    def bf16_instructions(self):
        return ", ".join(n for n, has in (("AMX", self.cpu_amx), ("AVX512-BF16", self.cpu_avx512_bf16)) if has)


def _cpuinfo(key):
    """The value of the first `key` line of /proc/cpuinfo ("flags", "model name"), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpuinfo_flags():
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def _cpu_feature(torch_probe, cpuinfo_flag):
    """PyTorch's own CPU detection (cpuinfo) where this torch has it, else the kernel's flags."""
    probe = getattr(torch.cpu, torch_probe, None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    return cpuinfo_flag in _cpuinfo_flags()


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) below the first with bf16 dot products
ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def kernels_may_use_bf16():
    """Whether the kernels this process runs may use the CPU's bf16 instructions: PyTorch's own vector
    kernels run at the level get_cpu_capability() names (ATEN_CPU_CAPABILITY lowers it), and its
    matrix products in oneDNN up to ONEDNN_MAX_CPU_ISA. Either capped below AVX-512 means emulated
    bf16 (with both set to AVX2 a bf16 matmul ran at 0.4 GFLOP/s on an AVX512-BF16 CPU)."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return capability.startswith("AVX512") and isa not in ONEDNN_ISAS_WITHOUT_BF16


def cpu_model_name():
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def detect_hardware(device):
    """The Hardware of `device` (a torch.device or its name), detected, never assumed."""
    device = torch.device(device)
    if device.type == "cuda":
        return Hardware("cuda", cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                        name=torch.cuda.get_device_name(device))
    usable = kernels_may_use_bf16()
    return Hardware(
        "cpu",
        cpu_amx=usable and _cpu_feature("_is_amx_tile_supported", "amx_bf16"),
        cpu_avx512_bf16=usable and _cpu_feature("_is_avx512_bf16_supported", "avx512_bf16"),
        name=cpu_model_name(),
    )


def choose_precision(precision="auto", use_fp16=False, use_bf16=False, hardware=None):
    """(mode, reason): mode one of fp32, bf16, fp16, and why it was chosen, for `hardware`."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if use_fp16 and use_bf16:
        raise ValueError("--use_fp16 True and --use_bf16 True exclude each other; give one (or --precision)")
    if use_fp16 or use_bf16:
        mode = "fp16" if use_fp16 else "bf16"
        return mode, f"--use_{mode} True"
    if precision != "auto":
        return precision, f"--precision {precision}"
    if hardware.device_type == "cuda":
        if hardware.cuda_bf16:
            return "bf16", f"auto: {hardware.name or 'this GPU'} computes in bf16"
        return "fp16", f"auto: {hardware.name or 'this GPU'} has no bf16; fp16 with loss scaling"
    if hardware.cpu_native_bf16:
        return "bf16", f"auto: this CPU has native bf16 ({hardware.bf16_instructions()})"
    return "fp32", (f"auto: this CPU has no native bf16 (no AMX or AVX512-BF16); "
                    f"bf16 would be ~{EMULATED_BF16_SLOWDOWN:.0f}x slower here")


_warned = set()


def warn_if_emulated(mode, hardware):
    """Warn once per process when bf16 is forced on a CPU that emulates it."""
    if mode != "bf16" or hardware.device_type != "cpu" or hardware.cpu_native_bf16 or "bf16" in _warned:
        return
    _warned.add("bf16")
    warnings.warn(
        f"bf16 on this CPU ({hardware.name or 'unknown'}) is emulated, without AMX or AVX512-BF16: matrix products "
        f"ran ~{EMULATED_BF16_SLOWDOWN:.0f}x slower than float32 on such a CPU (0.3 against 74 GFLOP/s); "
        "use --precision auto or fp32",
        PrecisionWarning,
        stacklevel=2,
    )


def resolve_precision_args(args, device, hardware=None, log=None):
    """Resolve args.precision / use_fp16 / use_bf16 in place for `device`; log the choice once.
    Returns the mode."""
    hardware = hardware or detect_hardware(device)
    mode, reason = choose_precision(getattr(args, "precision", "auto"), args.use_fp16, args.use_bf16, hardware)
    warn_if_emulated(mode, hardware)
    args.precision, args.use_fp16, args.use_bf16 = mode, mode == "fp16", mode == "bf16"
    args.precision_reason = reason
    if log is not None:
        log(f"precision: {mode} ({reason})")
    return mode

