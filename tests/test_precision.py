"""--precision auto|fp32|bf16|fp16: the choice by hardware (detection stubbed), the flags that override it,
and the chosen precision reaching the model, the autocast context and the saved config."""

import argparse
import json
import shlex
import warnings

import pytest
import torch

from cm import precision as precision_module
from cm import sample_util, train_util
from cm.precision import Hardware, PrecisionWarning, choose_precision, detect_hardware, resolve_precision_args
from cm.checkpoints import checkpoint_config

from test_scripts import TINY_FLAGS, load_script

CUDA_BF16 = Hardware("cuda", cuda_bf16=True, name="A100")
CUDA_NO_BF16 = Hardware("cuda", cuda_bf16=False, name="V100")
CPU_AMX = Hardware("cpu", cpu_amx=True, cpu_avx512_bf16=True, name="Xeon")
CPU_AVX512_BF16 = Hardware("cpu", cpu_avx512_bf16=True, name="EPYC Zen 4")
CPU_PLAIN = Hardware("cpu", name="EPYC Zen 3")
AUTO_FLAGS = TINY_FLAGS.replace("--precision fp32", "")


@pytest.mark.parametrize("hardware, expected", [
    (CUDA_BF16, "bf16"), (CUDA_NO_BF16, "fp16"), (CPU_AMX, "bf16"), (CPU_AVX512_BF16, "bf16"), (CPU_PLAIN, "fp32"),
])
def test_auto_follows_the_hardware(hardware, expected):
    mode, reason = choose_precision("auto", hardware=hardware)
    assert mode == expected and reason.startswith("auto:")
    if hardware is CPU_PLAIN:
        assert "no native bf16" in reason and "slower" in reason


@pytest.mark.parametrize("hardware", [CUDA_BF16, CUDA_NO_BF16, CPU_AMX, CPU_PLAIN])
def test_explicit_flags_override_auto(hardware):
    for mode in ("fp32", "bf16", "fp16"):
        assert choose_precision(mode, hardware=hardware)[0] == mode
    # the published flags win over --precision
    assert choose_precision("fp32", use_fp16=True, hardware=hardware) == ("fp16", "--use_fp16 True")
    assert choose_precision("fp16", use_bf16=True, hardware=hardware) == ("bf16", "--use_bf16 True")
    with pytest.raises(ValueError, match="exclude each other"):
        choose_precision("auto", use_fp16=True, use_bf16=True, hardware=hardware)
    with pytest.raises(ValueError, match="is not one of"):
        choose_precision("float32", hardware=hardware)


def test_forcing_bf16_on_a_cpu_without_it_warns_once(monkeypatch):
    monkeypatch.setattr(precision_module, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for flags in ({"precision": "bf16", "use_bf16": False}, {"precision": "auto", "use_bf16": True}):
            args = argparse.Namespace(use_fp16=False, **flags)
            assert resolve_precision_args(args, "cpu", hardware=CPU_PLAIN) == "bf16"
        for hardware in (CPU_AMX, CPU_AVX512_BF16, CUDA_NO_BF16):  # native (or a GPU): no warning
            resolve_precision_args(argparse.Namespace(precision="bf16", use_fp16=False, use_bf16=False), "cpu",
                                   hardware=hardware)
    warned = [w for w in caught if issubclass(w.category, PrecisionWarning)]
    assert len(warned) == 1 and "emulated" in str(warned[0].message)


def test_resolution_is_written_back_into_the_flags():
    args = argparse.Namespace(precision="auto", use_fp16=False, use_bf16=False)
    logged = []
    resolve_precision_args(args, "cuda", hardware=CUDA_NO_BF16, log=logged.append)
    assert (args.precision, args.use_fp16, args.use_bf16) == ("fp16", True, False)
    assert logged == [f"precision: fp16 ({args.precision_reason})"] and "loss scaling" in logged[0]


def test_capped_kernels_are_not_native_bf16(monkeypatch):
    """bf16 is native only if the kernels this process runs may use it: oneDNN capped at AVX2 emulates it."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not detect_hardware("cpu").cpu_native_bf16
    assert choose_precision("auto", hardware=detect_hardware("cpu"))[0] == "fp32"


def test_detection_agrees_with_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    flags = precision_module._cpuinfo_flags()
    if not flags or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("no /proc/cpuinfo flags, or PyTorch's kernels run below AVX-512 here")
    hardware = detect_hardware("cpu")
    assert hardware.cpu_avx512_bf16 == ("avx512_bf16" in flags)
    assert hardware.cpu_amx == ("amx_bf16" in flags)


@pytest.fixture
def stub_hardware(monkeypatch):
    def use(hardware):
        monkeypatch.setattr(precision_module, "detect_hardware", lambda device: hardware)
        monkeypatch.setattr(precision_module, "_warned", {"bf16"})
    return use


@pytest.mark.parametrize("hardware, expected", [(CPU_AMX, "bf16"), (CPU_PLAIN, "fp32")])
def test_training_autocasts_and_saves_the_chosen_precision(hardware, expected, stub_hardware, monkeypatch, tmp_path):
    stub_hardware(hardware)
    seen = []
    autocast = train_util.Precision.autocast

    def spy(self, device):
        context = autocast(self, device)
        seen.append(getattr(context, "fast_dtype", None))
        return context

    monkeypatch.setattr(train_util.Precision, "autocast", spy)
    flags = (AUTO_FLAGS + " --data_dir digits --global_batch_size 4 --progress False --training_mode consistency_training"
             " --loss_norm l2 --start_scales 4 --end_scales 4 --scale_mode fixed --total_training_steps 1 --save_interval 1")
    load_script("cm_train").main(shlex.split(flags) + ["--log_dir", str(tmp_path)])
    # the step, and the check of the weights before the checkpoint is saved
    assert seen == [torch.bfloat16 if expected == "bf16" else None] * 2
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["precision"] == expected
    saved = checkpoint_config(torch.load(tmp_path / "model000001.pt", weights_only=True))
    assert saved["precision"] == expected and saved["use_bf16"] == (expected == "bf16")
    assert saved["precision_reason"].startswith("auto:")


@pytest.mark.parametrize("hardware, dtype", [(CPU_AMX, torch.bfloat16), (CPU_PLAIN, torch.float32),
                                             (CUDA_NO_BF16, torch.float16)])
def test_sampling_model_runs_in_the_chosen_precision(hardware, dtype, stub_hardware):
    stub_hardware(hardware)
    args = sample_util.sampling_argparser("").parse_args(shlex.split(AUTO_FLAGS))
    assert args.precision == "auto"
    model, _ = sample_util.load_sampling_model(args)
    assert model.dtype == dtype and args.precision == {torch.bfloat16: "bf16", torch.float32: "fp32",
                                                       torch.float16: "fp16"}[dtype]
    assert "precision" in sample_util.SAMPLE_SETTINGS  # a resumed sampling run must agree on it
