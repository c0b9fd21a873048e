"""scripts/benchmark.py (--quick, its FLOP counts) and the fast paths it measures: each switch computes
what the default path computes."""

import argparse
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm import logger, losses
from cm.ema import update_ema, update_emas
from cm.fast_paths import apply_fast_paths, check_compile_available
from cm.precision import detect_hardware
from cm.methods import ConsistencyTraining
from cm.script_util import cm_train_defaults, create_model_and_diffusion
from cm.train_util import LoopSettings, TrainLoop
from cm.unet import QKVAttention

from conftest import randomize, tiny_config
from test_scripts import ROOT, load_script

benchmark = load_script("benchmark")


def tiny_inputs(batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    return x, torch.rand(batch, generator=gen) * 100, torch.randint(0, 10, (batch,), generator=gen)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "benchmark.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "targets" in result.stdout or "img/s" in result.stdout
    with open(out) as f:
        return json.load(f)


def test_quick_benchmark_writes_sane_json(quick_result):
    rows = quick_result["rows"]
    assert {"device", "torch", "threads"} <= set(quick_result["machine"])
    expected = ["ceiling/fp32", "ceiling/bf16", "flops/tiny", "train/tiny/ct/fp32", "train/tiny/ct/bf16",
                "train/tiny/cd/fp32", "train/tiny/ct/bf16+cl", "sample/tiny/cm/onestep/fp32",
                "sample/tiny/cm/twostep/bf16+cl", "sample/tiny/cm/onestep/fp32+math_attention", "ema/tiny/fused",
                "ema/tiny/per_average", "param_update/tiny", "target_forward/tiny/inference_mode", "data/digits"]
    assert {"cpu", "cpu_capability", "cpu_bf16"} <= set(quick_result["machine"])
    native_bf16 = detect_hardware("cpu").cpu_native_bf16
    for name in expected:
        assert name in rows, name
        if "bf16" in name and not native_bf16:  # emulated bf16 is skipped, and says so
            assert rows[name]["error"].startswith("skipped: this CPU emulates bf16"), (name, rows[name])
        else:
            assert "error" not in rows[name], (name, rows.get(name))
    for name, row in rows.items():
        if "error" in row:
            assert row["error"].startswith(("skipped: diffusers", "skipped: this CPU emulates bf16")), (name, row["error"])
            continue
        assert row["peak_mem_mb"] >= 0
        for key in ("images_per_s", "flops_per_s", "update_s"):
            if key in row:
                assert row[key] > 0, (name, key)
    forward = rows["flops/tiny"]["flops_per_image"]
    model, _ = create_model_and_diffusion(**benchmark.config_flags("tiny")[0])
    assert forward == benchmark.forward_flops_per_image(model.eval(), benchmark.config_flags("tiny")[0], "cpu")
    assert rows["flops/tiny"]["parameters"] == sum(p.numel() for p in model.parameters())
    # a CT step: online forward and backward (< 2 forwards: no input gradient) and the target's forward;
    # CD adds the teacher's two Heun evaluations
    for mode, low, high in (("ct", 3, 4), ("cd", 5, 6)):
        row = rows[f"train/tiny/{mode}/fp32"]
        assert low * forward * row["batch"] < row["flops_per_step"] <= high * forward * row["batch"]
    # a JVP method puts the forward-mode JVP in place of CT's target evaluation: value and tangent, two forwards'
    # FLOPs (PyTorch's own convolution rule would add a third, convolving with the weights' zero tangent)
    for mode in ("sct", "meanflow"):
        row = rows[f"train/tiny/{mode}/fp32"]
        assert 5 * forward * row["batch"] < row["flops_per_step"] <= 5.5 * forward * row["batch"], mode
    two = rows["sample/tiny/cm/twostep/bf16+cl" if native_bf16 else "sample/tiny/cm/twostep/fp32"]
    assert two["flops_per_batch"] == 2 * forward * two["batch"]
    assert quick_result["targets"] == []  # set for the demo and ImageNet-64 configurations only


def test_targets_compare_rows_side_by_side():
    rows = {
        "ceiling/fp32": {"dtype": "fp32", "flops_per_s": 100.0},
        "sample/imagenet64/cm/onestep/fp32": {"images_per_s": 2.0, "flops_per_s": 70.0},
        "sample/imagenet64/cm/onestep/bf16+cl": {"images_per_s": 6.0, "flops_per_s": 210.0},
        "sample/imagenet64/diffusers/onestep/fp32": {"images_per_s": 1.0},
        "sample/imagenet64/diffusers/onestep/bf16+cl": {"images_per_s": 5.0},
        "train/imagenet64/ct/fp32": {"precision": "fp32", "images_per_s": 1.0, "step_s": 10.0},
        "train/imagenet64/ct/bf16": {"precision": "bf16", "images_per_s": 1.5, "step_s": 6.0},
        "train/imagenet64/ct/bf16+cl": {"precision": "bf16", "images_per_s": 2.5, "step_s": 4.0},
        "param_update/imagenet64": {"update_s": 2.0},
    }
    found = {t["target"]: t for t in benchmark.targets(rows)}
    best = found["one-step sampling (imagenet64): ours (best) / diffusers pipeline (fp32) images/s"]
    assert best["value"] == 6.0 and best["met"] and best["rows"][0].endswith("bf16+cl")
    assert found["float32 forward (imagenet64): achieved FLOP/s / float32 matmul ceiling"]["value"] == 0.7
    bf16 = found["bf16 training / float32 training images/s (imagenet64/ct)"]
    assert bf16["value"] == 2.5 and bf16["met"]
    assert found["  the same, each step less the parameter update (2 s)"]["value"] == (10 - 2) / (4 - 2)


def test_flop_count_of_a_conv_model_matches_the_formula():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5))
    x = torch.randn(2, 3, 4, 4)
    conv = 2 * 8 * 3 * 9 * 4 * 4  # 2 FLOPs per multiply-add, per output pixel and channel
    linear = 2 * 8 * 16 * 5
    assert benchmark.count_flops(lambda: model(x)) == 2 * (conv + linear)
    # backward: the weight gradients of both layers and the input gradient of the linear layer
    # (the convolution's input needs none)
    assert benchmark.count_flops(lambda: model(x).sum().backward()) == 2 * (2 * conv + 3 * linear)


def test_fused_attention_is_counted_as_the_math_path():
    model, _ = create_model_and_diffusion(**tiny_config())
    x, t, y = tiny_inputs()

    def step():
        model(x, t, y).square().sum().backward()

    fused = benchmark.count_flops(step)
    with sdpa_kernel(SDPBackend.MATH):
        math = benchmark.count_flops(step)
    assert fused == math > 0


def test_attention_hands_fused_kernels_unit_stride_channels():
    attention = QKVAttention(2)
    qkv = torch.randn(2, 3 * 2 * 8, 20)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # "no available kernel" if q/k/v had strided channels
        fused = attention(qkv)
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(fused, attention(qkv), rtol=1e-5, atol=1e-5)


def test_cpu_half_precision_attention_gradients_match_float32():
    attention = QKVAttention(2)
    qkv = torch.randn(2, 3 * 2 * 16, 64)
    half = qkv.bfloat16().requires_grad_()
    full = half.detach().float().requires_grad_()
    out = attention(half)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    attention(full).square().sum().backward()
    torch.testing.assert_close(half.grad.float(), full.grad, rtol=0.05, atol=0.05)


def test_channels_last_forward_and_gradients_match_the_default():
    model = randomize(create_model_and_diffusion(**tiny_config())[0])
    fast = apply_fast_paths([copy.deepcopy(model)], channels_last=True)[0]
    assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x, t, y = tiny_inputs()
    out, out_fast = model(x, t, y), fast(x, t, y)
    torch.testing.assert_close(out_fast, out, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def ct_loop(channels_last, precision, log_dir):
    logger.configure(str(log_dir))  # an empty run folder: nothing to resume from
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_config(), distillation=True, loss_norm="l2")
    randomize(model)
    flags = argparse.Namespace(**dict(
        cm_train_defaults(), training_mode="consistency_training", target_ema_mode="fixed", start_ema=0.9,
        scale_mode="fixed", start_scales=10, end_scales=10, total_training_steps=100, teacher_solver="heun",
        use_fp16=precision == "fp16",
    ))
    method = ConsistencyTraining(flags, diffusion)
    method.build_networks(model)
    return TrainLoop(method=method, model=model, data=None, settings=LoopSettings(
        batch_size=4, lr=1e-3, ema_rate="0.9,0.99", total_training_steps=100, log_interval=100, save_interval=0,
        precision=precision, progress=False, channels_last=channels_last))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_channels_last_training_steps_match_the_default(precision, tmp_path):
    x, _, y = tiny_inputs(batch=4)
    default, fast = ct_loop(False, precision, tmp_path / "default"), ct_loop(True, precision, tmp_path / "fast")
    for _ in range(2):
        default.run_step(x, {"y": y})
        fast.run_step(x, {"y": y})
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=0.02, atol=2e-3)
    for name, a, b in zip(dict(default.model.named_parameters()), default.precision.master_params,
                          fast.precision.master_params):
        torch.testing.assert_close(b, a, **tol, msg=name)
    for a, b in zip(default.method.target_master + default.ema.params[0], fast.method.target_master + fast.ema.params[0]):
        torch.testing.assert_close(b, a, **tol)
    saved = fast.params_state_dict(fast.precision.master_params)
    assert all(v.is_contiguous() for v in saved.values())  # checkpoints do not depend on the switch


def test_fused_ema_equals_one_update_per_average():
    gen = torch.Generator().manual_seed(0)
    source = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    rates = [0.9, 0.999, 0.0, 0.95]
    start = [[torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)] for _ in rates]
    fused = [[p.clone() for p in params] for params in start]
    update_emas(list(zip(fused, rates)), source)
    for params, rate, expected in zip(start, rates, fused):
        update_ema(params, source, rate)
        assert all(torch.equal(a, b) for a, b in zip(params, expected))
    assert all(torch.equal(a, b) for a, b in zip(fused[2], source))  # rate 0: the source exactly


@pytest.mark.parametrize("loss_norm", ["l1", "l2", "l2-32", "pseudo-huber", "lpips"])
def test_targets_under_inference_mode_still_give_gradients(loss_norm, tiny_model_and_diffusion):
    model, diffusion = tiny_model_and_diffusion
    diffusion = copy.copy(diffusion)
    diffusion.loss_norm = loss_norm
    if loss_norm == "lpips":
        from cm.lpips import LPIPS

        diffusion.lpips_loss = LPIPS(pretrained=False)
    x, _, y = tiny_inputs(batch=2)
    model.requires_grad_(True)
    for teacher in (None, model):
        out = diffusion.consistency_losses(
            model, x.clamp(-1, 1), 10, model_kwargs={"y": y}, target_model=model, teacher_model=teacher,
            teacher_diffusion=diffusion,
        )["loss"].sum()
        out.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
    assert losses.ode_step(x, torch.ones(2), torch.ones(2) / 2, lambda a, s: a * 0).is_inference()


def test_sampling_with_channels_last_matches_the_default(tmp_path):
    from test_scripts import _sample

    default, _ = _sample(tmp_path, "default", ["--batch_size", "4"])
    fast, _ = _sample(tmp_path, "cl", ["--batch_size", "4", "--channels_last", "True"])
    diff = (default["arr_0"].astype(int) - fast["arr_0"].astype(int)).__abs__()
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_compile_needs_a_compiler_and_says_so(monkeypatch):
    import cm.fast_paths

    monkeypatch.setattr(cm.fast_paths.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        check_compile_available("cpu")
    model = create_model_and_diffusion(**tiny_config())[0]
    with pytest.raises(ValueError, match="--compile"):
        apply_fast_paths([model], compile=True)


@pytest.mark.skipif(not os.environ.get("CM_TEST_COMPILE"), reason="compiling on a CPU takes minutes; set CM_TEST_COMPILE=1")
def test_compiled_forward_matches_eager():
    model = randomize(create_model_and_diffusion(**tiny_config())[0]).eval()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        expected = model(x, t, y)
        apply_fast_paths([model], compile=True)
        torch.testing.assert_close(model(x, t, y), expected, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == list(create_model_and_diffusion(**tiny_config())[0].state_dict())
