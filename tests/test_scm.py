"""Continuous-time consistency models: TrigFlow, the JVP, the sCT/sCD tangent and loss, and short runs."""

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cm.checkpoints import check_stored_flags, with_config
from cm.denoiser import Denoiser
from cm.jvp import network_jvp
from cm.methods import ContinuousConsistencyTraining
from cm.methods.scm import AdaptiveWeight
from cm.script_util import cm_train_defaults, create_model_and_diffusion
from cm.trigflow import SigmaView, TrigFlowDenoiser, sigma_of_t, t_of_sigma

from conftest import randomize, tiny_config
from test_scripts import ROOT, TINY_FLAGS, load_script
from test_training import TRAIN, train


def random_unet(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_config(**overrides))
    return randomize(model).to(dtype).eval(), diffusion


@pytest.mark.parametrize("c_noise", ["published", "edm"])
def test_trigflow_f_is_the_edm_denoiser_at_the_matched_noise_level(c_noise):
    model, edm = random_unet(c_noise=c_noise)  # distillation False: EDM's scalings
    x0, z = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16) * 0.5
    t = torch.tensor([0.05, 0.4, 1.0, 1.5])
    x_t = torch.cos(t)[:, None, None, None] * x0 + torch.sin(t)[:, None, None, None] * z
    y = torch.arange(4)
    with torch.no_grad():
        f = TrigFlowDenoiser(0.5, "edm", c_noise=c_noise).denoise(model, x_t, t, y=y)[1]
        sigma = sigma_of_t(t, 0.5)
        expected = edm.denoise(model, x_t / torch.cos(t)[:, None, None, None], sigma, y=y)[1]  # x_sigma = x_t / cos t
    torch.testing.assert_close(f, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t_of_sigma(sigma, 0.5), t)
    x_sigma = x_t / torch.cos(t)[:, None, None, None]
    with torch.no_grad():  # the EDM-variables view the editing script uses
        view = SigmaView(TrigFlowDenoiser(0.5, "edm", c_noise=c_noise))
        torch.testing.assert_close(view.denoise(model, x_sigma, sigma, y=y)[1], expected, rtol=1e-4, atol=1e-5)
    identity = TrigFlowDenoiser(0.5, "identity")
    with torch.no_grad():
        torch.testing.assert_close(identity.denoise(model, x_t, torch.zeros(4), y=y)[1], x_t, rtol=0, atol=0)  # f(x, 0) = x
    assert identity.t_max == TrigFlowDenoiser(0.5, "edm", sigma_max=80.0).t_max == pytest.approx(math.atan(160))


def test_c_noise_is_the_time_input_the_network_sees():
    seen = []

    def network(x, timesteps, **kwargs):
        seen.append(timesteps)
        return torch.zeros_like(x)

    sigma = torch.tensor([0.01, 1.0, 40.0])
    x = torch.zeros(3, 1, 2, 2)
    Denoiser(c_noise="published").denoise(network, x, sigma)
    Denoiser(c_noise="edm").denoise(network, x, sigma)
    t = torch.tensor([0.2, 0.9, 1.5])
    TrigFlowDenoiser(0.5, "edm", c_noise="edm").network(network, x, t)
    TrigFlowDenoiser(0.5, "identity", c_noise="edm").network(network, x, t)
    expected = [250 * np.log(sigma.numpy()), 0.25 * np.log(sigma.numpy()), 0.25 * np.log(0.5 * np.tan(t.numpy())), t.numpy()]
    for got, want in zip(seen, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="--c_noise"):
        Denoiser(c_noise="ln")


def test_a_checkpoint_refuses_flags_its_network_was_not_trained_with(tmp_path):
    model, _ = random_unet(c_noise="edm")
    state = with_config(model.state_dict(), {"c_noise": "edm", "double_norm": False, "time_input": "identity"})
    check_stored_flags(state, {"c_noise": "edm", "double_norm": False}, "teacher.pt")
    with pytest.raises(ValueError, match=r"teacher.pt was trained with --c_noise edm; pass --c_noise edm \(got published\)"):
        check_stored_flags(state, {"c_noise": "published", "double_norm": False}, "teacher.pt")
    check_stored_flags(model.state_dict(), {"c_noise": "published"}, "old.pt")  # no stored config: nothing to check
    path = tmp_path / "model.pt"
    torch.save(state, path)
    sample = load_script("image_sample")
    with pytest.raises(ValueError, match="--time_input identity"):
        sample.main(shlex.split(TINY_FLAGS) + ["--c_noise", "edm", "--training_mode", "continuous_consistency_training",
                                               "--time_input", "edm", "--sampler", "onestep", "--model_path", str(path), "--log_dir", str(tmp_path / "s"),
                                               "--num_samples", "2", "--batch_size", "2"])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_jvp_agrees_with_finite_differences_and_a_float64_derivative(dropout):
    model, _ = random_unet(torch.float64, dropout=dropout)  # attention at 8x8 included
    model.train()  # dropout on: every evaluation must draw the same mask
    den = TrigFlowDenoiser(0.5, "identity")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y = torch.arange(2)

    def fn(x, s):
        return den.network(model, x, s, y=y)

    torch.manual_seed(5)
    value, forward = network_jvp(fn, x, t, dx, "forward")
    torch.manual_seed(5)
    value_fd, finite = network_jvp(fn, x, t, dx, "finite_diff", eps=1e-5)
    torch.manual_seed(5)
    # the primal under the same mask (the JVP's math attention rounds otherwise than the fused kernel)
    torch.testing.assert_close(value, fn(x, t), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(value_fd, value, rtol=1e-5, atol=1e-8)
    assert ((forward - finite).norm() / forward.norm()).item() < 1e-7
    # float32 forward mode against the float64 derivative
    model32 = model.float()
    torch.manual_seed(5)
    _, forward32 = network_jvp(lambda a, s: den.network(model32, a, s, y=y), x.float(), t.float(), dx.float(), "forward")
    assert ((forward32.double() - forward).norm() / forward.norm()).item() < 1e-4


def test_the_lean_jvp_layers_give_torchs_own_tangent(monkeypatch):
    """cm.jvp's forward mode runs convolutions without their zero weight tangent and attention written out
    (cm.nn.input_tangents_only): the same primal and tangent as PyTorch's general rules, to rounding."""
    import contextlib

    import cm.jvp

    model, _ = random_unet(torch.float32)  # attention at 8x8 included
    den = TrigFlowDenoiser(0.5, "identity")
    gen = torch.Generator().manual_seed(3)
    x, dx = (torch.randn(3, 3, 16, 16, generator=gen) for _ in range(2))
    t, y = torch.tensor([0.2, 0.9, 1.4]), torch.arange(3)
    lean = network_jvp(lambda a, s: den.network(model, a, s, y=y), x, t, dx)
    monkeypatch.setattr(cm.jvp, "input_tangents_only", contextlib.nullcontext)
    general = network_jvp(lambda a, s: den.network(model, a, s, y=y), x, t, dx)
    for a, b in zip(lean, general):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Toy(torch.nn.Module):
    """F(u, c) = a u + b c: dF/dt along (dx/dt, 1) is a (dx/dt) / sigma_d + b in closed form."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7))
        self.b = torch.nn.Parameter(torch.tensor(-0.4))

    def forward(self, u, c):
        return self.a * u + self.b * c[:, None, None, None]


def scm_flags(**overrides):
    flags = dict(cm_train_defaults(), lr=1e-4, use_fp16=False, use_checkpoint=False, time_input="identity",
                 p_mean=-1.0, p_std=1.4, tangent_warmup_steps=4, scm_weighting="prior")
    flags.update(overrides)
    return argparse.Namespace(**flags)


@pytest.mark.parametrize("jvp", ["forward", "finite_diff"])
def test_tangent_and_loss_against_the_closed_form_of_a_toy_network(jvp):
    _, diffusion = create_model_and_diffusion(**tiny_config())
    method = ContinuousConsistencyTraining(scm_flags(jvp=jvp, jvp_eps=1e-3), diffusion)
    toy = Toy()
    method.build_networks(toy)
    x0 = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    z = torch.randn(3, 3, 4, 4, dtype=torch.float64) * 0.5
    t = torch.tensor([0.2, 0.8, 1.3], dtype=torch.float64)
    step = 3  # r = 3/4 of the warmup
    loss = method.losses(toy, x0, {}, {"noise": z, "t": t}, step)
    # independently, in numpy
    a, b, sd, r = 0.7, -0.4, 0.5, 0.75
    X0, Z, T = x0.numpy(), z.numpy(), t.numpy()[:, None, None, None]
    x_t = np.cos(T) * X0 + np.sin(T) * Z
    dxdt = np.cos(T) * Z - np.sin(T) * X0
    F = a * x_t / sd + b * T
    dF = a * dxdt / sd + b
    g = -np.cos(T) ** 2 * (sd * F - dxdt) - r * np.cos(T) * np.sin(T) * (x_t + sd * dF)
    g = g / (np.sqrt((g**2).sum(axis=(1, 2, 3), keepdims=True)) + 0.1)
    mse = (g**2).mean(axis=(1, 2, 3))  # F_theta equals F^- in value
    w = np.log(sd * np.tan(t.numpy()))
    np.testing.assert_allclose(loss["loss"].detach().numpy(), np.exp(-w) * mse + w, rtol=1e-5 if jvp == "finite_diff" else 1e-10)
    # the gradient pulls F_theta towards F^- + g: d loss / d a = -2 e^{-w} mean(g * u), u = x_t / sigma_d
    loss["loss"].sum().backward()
    expected = (np.exp(-w) * (-2 * (g * x_t / sd).mean(axis=(1, 2, 3)))).sum()
    assert toy.a.grad.item() == pytest.approx(expected, rel=1e-5)


def test_the_adaptive_weight_gradient_vanishes_where_w_is_the_log_of_the_error():
    head = AdaptiveWeight()
    t = torch.tensor([0.3, 0.9])
    mse = torch.tensor([0.2, 0.05])
    with torch.no_grad():
        head.linear.bias.fill_(0.5)
    w = head(t)
    (torch.exp(-w) * mse + w).sum().backward()
    # d/dw (e^{-w} m + w) = 1 - e^{-w} m, summed over the samples through the bias
    assert head.linear.bias.grad.item() == pytest.approx((1 - math.exp(-0.5) * mse).sum().item(), rel=1e-6)
    with torch.no_grad():
        head.linear.bias.fill_(math.log(0.1))
    head.zero_grad()
    w = head(t[:1])
    (torch.exp(-w) * 0.1 + w).sum().backward()
    assert abs(head.linear.bias.grad.item()) < 1e-6


SCT = " --training_mode continuous_consistency_training --tangent_warmup_steps 4 --log_interval 2 --lr 2e-3"


def denoising_error(state, time_input="identity", **arch):
    """||f(x_t, t) - x_0||^2 of a model on 64 digits at fixed noise and times (f = cos(t) x_t at the start,
    the U-Net's output layer being zero): a deterministic measure of training progress."""
    from cm.image_datasets import load_digits_arrays

    model = create_model_and_diffusion(**tiny_config(**arch))[0]
    model.load_state_dict(state)
    images, labels = load_digits_arrays()
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    gen = torch.Generator().manual_seed(0)
    t = torch.atan(torch.exp(-1.0 + 1.4 * torch.randn(64, generator=gen)) / 0.5)
    tt = t[:, None, None, None]
    x_t = torch.cos(tt) * x + torch.sin(tt) * torch.randn(x.shape, generator=gen) * 0.5
    with torch.no_grad():
        f = TrigFlowDenoiser(0.5, time_input).denoise(model.eval(), x_t, t, y=torch.from_numpy(labels[:64]))[1]
    return ((f - x) ** 2).mean().item()


def initial_state():
    torch.manual_seed(0)  # the scripts seed before building the model
    return create_model_and_diffusion(**tiny_config())[0].state_dict()


def test_sct_run_lowers_its_error_resumes_and_samples(tmp_path):
    flags = TRAIN + SCT + " --save_interval 10"
    train("cm_train", flags + " --total_training_steps 10", tmp_path / "run")
    assert (tmp_path / "run" / "scm_weight000010.pt").exists()
    train("cm_train", flags + " --total_training_steps 20", tmp_path / "run")  # resumes from step 10
    state = torch.load(tmp_path / "run" / "train_state000020.pt", weights_only=True)
    assert state["step"] == 20
    assert "tangent_r" in (tmp_path / "run" / "progress.csv").read_text().splitlines()[0]
    model = torch.load(tmp_path / "run" / "model000020.pt", weights_only=True)
    before, after = denoising_error(initial_state(), double_norm=True), denoising_error(model, double_norm=True)
    assert after < 0.9 * before, (before, after)  # (measured: 16% lower after 20 steps)
    for sampler in ("onestep", "multistep"):
        load_script("image_sample").main(shlex.split(
            TINY_FLAGS + f" --training_mode continuous_consistency_training --time_input identity --double_norm True --sampler {sampler} "
            f"--num_samples 4 --batch_size 4 --model_path {tmp_path / 'run' / 'ema_0.9_000020.pt'} --log_dir {tmp_path / sampler}"))
        samples = np.load(tmp_path / sampler / "samples_4x16x16x3.npz")["arr_0"]
        assert samples.shape == (4, 16, 16, 3) and samples.std() > 0
    load_script("image_edit").main(shlex.split(
        TINY_FLAGS + " --training_mode continuous_consistency_training --time_input identity --double_norm True "
        f"--task inpainting --mask box --data_dir digits --num_images 2 --model_path {tmp_path / 'run' / 'model000020.pt'} "
        f"--log_dir {tmp_path / 'edit'}"))
    edited = np.load(tmp_path / "edit" / "edit_inpainting.npz")
    assert all(edited[k].shape[0] == 2 for k in edited.files)


def trajectory_inconsistency(state, teacher_state, dt=0.05):
    """||f(x_t, t) - f(x_t', t')||^2 / dt^2 for x_t' one Euler step of the teacher's ODE from x_t (t' = t - dt),
    on 64 digits at fixed noise and times: what consistency distillation drives to zero."""
    from cm.image_datasets import load_digits_arrays

    student, teacher = (create_model_and_diffusion(**tiny_config())[0] for _ in range(2))
    student.load_state_dict(state)
    teacher.load_state_dict(teacher_state)
    den = TrigFlowDenoiser(0.5, "edm")
    images, labels = load_digits_arrays()
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(labels[:64])
    gen = torch.Generator().manual_seed(0)
    t = torch.atan(torch.exp(-1.0 + 1.6 * torch.randn(64, generator=gen)) / 0.5).clamp(min=2 * dt)
    tt = t[:, None, None, None]
    x_t = torch.cos(tt) * x + torch.sin(tt) * torch.randn(x.shape, generator=gen) * 0.5
    with torch.no_grad():
        x_prev = x_t - dt * 0.5 * den.network(teacher.eval(), x_t, t, y=y)
        a = den.denoise(student.eval(), x_t, t, y=y)[1]
        b = den.denoise(student, x_prev, t - dt, y=y)[1]
    return ((a - b) ** 2).mean().item() / dt**2


def test_scd_from_an_edm_teacher_and_two_processes_take_the_same_step(tmp_path, edm_teacher):
    teacher = edm_teacher / "model000030.pt"
    scd = TRAIN + f" --training_mode continuous_consistency_distillation --teacher_model_path {teacher} --lr 3e-3 --tangent_warmup_steps 4 "
    train("cm_train", scd + "--total_training_steps 10 --save_interval 10 --log_interval 5", tmp_path / "scd")
    train("cm_train", scd + "--total_training_steps 20 --save_interval 10 --log_interval 5", tmp_path / "scd")  # resumed
    teacher_state = torch.load(teacher, weights_only=True)
    before = trajectory_inconsistency(teacher_state, teacher_state)  # the student starts as the teacher
    after = trajectory_inconsistency(torch.load(tmp_path / "scd" / "model000020.pt", weights_only=True), teacher_state)
    assert after < 0.9 * before, (before, after)  # (measured: 18% lower after 20 steps)
    load_script("image_sample").main(shlex.split(
        TINY_FLAGS + f" --training_mode continuous_consistency_distillation --sampler multistep --t_mid 1.1 "
        f"--num_samples 4 --batch_size 4 --model_path {tmp_path / 'scd' / 'model000020.pt'} --log_dir {tmp_path / 's'}"))
    assert np.load(tmp_path / "s" / "samples_4x16x16x3.npz")["arr_0"].shape == (4, 16, 16, 3)
    if shutil.which("mpiexec") is None:
        pytest.skip("mpiexec not installed")
    flags = shlex.split(scd + "--total_training_steps 2 --save_interval 2 --log_interval 1")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as run() uses; both at once (their time is mostly start-up)
    procs = [subprocess.Popen([*launcher, "scripts/cm_train.py", *flags, "--log_dir", str(tmp_path / name)], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, launcher in (("one", [sys.executable]), ("two", ["mpiexec", "-n", "2", sys.executable]))]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), errors[1][:3000] + " ... " + errors[1][-800:]
    for name in ("model000002.pt", "ema_0.9_000002.pt"):
        a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ("one", "two"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{name} {k}")
    heads = [torch.load(tmp_path / d / "scm_weight000002.pt", weights_only=True)["head"] for d in ("one", "two")]
    for k in heads[0]:
        torch.testing.assert_close(heads[1][k], heads[0][k], rtol=0, atol=1e-6)


def test_the_jvp_of_a_checkpointed_network_is_the_plain_one():
    checkpointed, _ = random_unet(use_checkpoint=True)
    plain, _ = random_unet()
    x, dx = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t, y = torch.tensor([0.3, 1.0]), torch.arange(2)
    a = network_jvp(lambda u, s: checkpointed(u, s, y), x, t, dx)
    b = network_jvp(lambda u, s: plain(u, s, y), x, t, dx)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_a_bf16_step_follows_the_float32_gradient():
    """Under bf16 autocast the residual F_theta - F^- is still exactly zero (F^- is this pass's own stop-gradient),
    so the gradient is the float32 one up to bf16 rounding of dF_theta."""
    model, diffusion = random_unet()
    method = ContinuousConsistencyTraining(scm_flags(), diffusion)
    method.build_networks(model)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    rows = {"noise": torch.randn(x0.shape, generator=gen) * 0.5, "t": torch.tensor([0.4, 1.1])}
    cond = {"y": torch.tensor([2, 5])}

    def gradient(dtype):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = method.losses(model, x0, cond, rows, step=2)["loss"]
        loss.float().sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full, half = gradient(torch.float32), gradient(torch.bfloat16)
    assert ((half - full).norm() / full.norm()).item() < 0.01


def test_truncated_noise_levels_follow_the_truncated_lognormal():
    from scipy.stats import kstest, truncnorm

    from cm.trigflow import lognormal_t

    normal = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    log_sigma = torch.log(sigma_of_t(lognormal_t(normal, -1.0, 1.6, 0.5, bounds=(0.2, 5.0)), 0.5)).numpy()
    assert log_sigma.min() >= math.log(0.2) - 1e-6 and log_sigma.max() <= math.log(5.0) + 1e-6
    a, b = (math.log(0.2) + 1.0) / 1.6, (math.log(5.0) + 1.0) / 1.6
    assert kstest(log_sigma, truncnorm(a, b, loc=-1.0, scale=1.6).cdf).pvalue > 0.01
    # the order of the draws is kept (one draw, one sigma), and without bounds nothing changes
    assert np.all(np.diff(log_sigma[np.argsort(normal.numpy())]) >= 0)
    assert torch.equal(lognormal_t(normal, -1.0, 1.6, 0.5), t_of_sigma(torch.exp(-1.0 + 1.6 * normal), 0.5))
