"""MeanFlow: the flow path and its sampler, the target against closed forms, the JVP, the adaptive weight, sharding, and
a short run that lowers its error, resumes exactly, samples and edits with no method flags."""

import argparse
import shlex

import numpy as np
import pytest
import torch

from cm.checkpoints import checkpoint_config
from cm.flowmap import FlowMap, FlowMapSigmaView, interpolate, sample_flow_map, sigma_of_t, t_of_sigma
from cm.jvp import network_jvp
from cm.methods import MeanFlow
from cm.random_util import get_generator
from cm.script_util import cm_train_defaults, create_model_and_diffusion, model_and_diffusion_defaults
from cm.train_util import StepRandom

from conftest import randomize, tiny_config
from test_scripts import load_script
from test_training import TRAIN


class Toy(torch.nn.Module):
    """u(z, t, h) = a t sin(z) + b h^2 z + c h: along (v, 0, 1) with h = t - r, du/dt = a sin(z) + a t cos(z) v
    + 2 b h z + b h^2 v + c in closed form."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.4, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, z, times, y=None):
        t, h = (times[:, i, None, None, None] for i in range(2))
        label = 0.0 if y is None else 0.05 * y[:, None, None, None].to(z.dtype)  # (a class-conditional toy)
        return self.a * t * torch.sin(z) + self.b * h**2 * z + self.c * h + label


def meanflow_flags(**overrides):
    flags = dict(cm_train_defaults(), **model_and_diffusion_defaults())
    flags.update(time_inputs=2, use_fp16=False, meanflow_norm_c=1e-3, meanflow_norm_p=0.75, jvp="forward")
    flags.update(overrides)
    return argparse.Namespace(**flags)


def toy_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64)
    e = torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.3, 0.5], dtype=torch.float64)
    r = torch.tensor([0.2, 0.6, 0.1, 0.5], dtype=torch.float64)  # r = t in two rows: the instantaneous velocity
    return x, e, t, r


@pytest.mark.parametrize("jvp", ["forward", "finite_diff"])
def test_the_target_and_loss_against_the_closed_form_of_a_toy_network(jvp):
    method = MeanFlow(meanflow_flags(jvp=jvp, jvp_eps=1e-4), diffusion=None)
    toy = Toy()
    x, e, t, r = toy_inputs()
    out = method.losses(toy, x, {}, {"noise": e, "t": t, "r": r}, 0)
    # independently, in numpy
    a, b, c = 0.7, -0.4, 0.3
    X, E, T, R = x.numpy(), e.numpy(), t.numpy()[:, None, None, None], r.numpy()[:, None, None, None]
    z = (1 - T) * X + T * E
    v = E - X
    h = T - R
    u = a * T * np.sin(z) + b * h**2 * z + c * h
    du_dt = a * np.sin(z) + a * T * np.cos(z) * v + 2 * b * h * z + b * h**2 * v + c
    target = v - h * du_dt
    error = ((u - target) ** 2).sum(axis=(1, 2, 3))
    rtol = 1e-6 if jvp == "finite_diff" else 1e-12
    np.testing.assert_allclose(out["error"].detach().numpy(), error, rtol=rtol)
    np.testing.assert_allclose(out["loss"].detach().numpy(), error / (error + 1e-3) ** 0.75, rtol=rtol)
    # the adaptive weight is a stop-gradient: d loss / d theta = w d error / d theta, w = (error + c)^-p held fixed
    out["loss"].sum().backward()
    grads = [p.grad.item() for p in (toy.a, toy.b, toy.c)]
    weights = (error + 1e-3) ** -0.75
    d_u = {"a": T * np.sin(z), "b": h**2 * z, "c": h}  # d u / d (a, b, c); the target carries no gradient
    expected = [(weights * (2 * (u - target) * d_u[k]).sum(axis=(1, 2, 3))).sum() for k in "abc"]
    np.testing.assert_allclose(grads, expected, rtol=rtol)


def test_guidance_folded_into_training_against_a_direct_computation():
    flags = meanflow_flags(class_cond=True, num_classes=10, null_class=True, meanflow_class_dropout=0.1,
                           meanflow_cfg_omega=0.6, meanflow_cfg_kappa=0.3, meanflow_cfg_t_max=0.8)
    method = MeanFlow(flags, diffusion=None)
    toy = Toy()
    x, e, t, r = toy_inputs()  # t = 0.9 (beyond the guided interval), 0.6, 0.3, 0.5
    y = torch.tensor([3, 1, 7, 2])
    unconditional = torch.tensor([False, False, True, False])  # the third trains without its class, on v
    out = method.losses(toy, x, {"y": y}, {"noise": e, "t": t, "r": r, "unconditional": unconditional}, 0)
    a, b, c, w, k = 0.7, -0.4, 0.3, 0.6, 0.3
    X, E, T, R = x.numpy(), e.numpy(), t.numpy()[:, None, None, None], r.numpy()[:, None, None, None]
    labels = np.where(unconditional.numpy(), 10, y.numpy())[:, None, None, None]  # the null class is num_classes
    z = (1 - T) * X + T * E
    v = E - X

    def velocity(label):  # u(z_t, t, t | label): h = 0
        return a * T * np.sin(z) + 0.05 * label

    guided = w * v + k * velocity(y.numpy()[:, None, None, None]) + (1 - w - k) * velocity(10)
    guide = (~unconditional.numpy() & (t.numpy() <= 0.8))[:, None, None, None]
    v_tilde = np.where(guide, guided, v)
    h = T - R
    u = a * T * np.sin(z) + b * h**2 * z + c * h + 0.05 * labels
    du_dt = a * np.sin(z) + a * T * np.cos(z) * v_tilde + 2 * b * h * z + b * h**2 * v_tilde + c
    error = ((u - (v_tilde - h * du_dt)) ** 2).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(out["error"].detach().numpy(), error, rtol=1e-12)
    assert toy.training  # (the guidance passes run in eval mode and leave the network as they found it)
    with pytest.raises(ValueError, match="--null_class True"):
        MeanFlow.check_flags(meanflow_flags(class_cond=True, null_class=False, meanflow_cfg_omega=2.0))


def test_a_guided_run_trains_through_the_loop_and_samples_its_classes(tmp_path):
    flags = (TRAIN + " --training_mode meanflow --null_class True --meanflow_class_dropout 0.25 --meanflow_cfg_omega 1.5 "
             f"--total_training_steps 2 --save_interval 2 --microbatch 8 --log_dir {tmp_path / 'run'}")
    load_script("cm_train").main(shlex.split(flags))
    state = torch.load(tmp_path / "run" / "model000002.pt", weights_only=True)
    assert state["label_emb.weight"].shape[0] == 11 and checkpoint_config(state)["null_class"] is True
    load_script("image_sample").main(shlex.split(
        f"--precision fp32 --num_samples 4 --batch_size 4 --class_labels 0,9 --model_path {tmp_path / 'run' / 'model000002.pt'} "
        f"--log_dir {tmp_path / 'samples'}"))
    with np.load(tmp_path / "samples" / "samples_4x16x16x3.npz") as samples:
        assert samples["arr_0"].shape == (4, 16, 16, 3) and list(samples["arr_1"]) == [0, 9, 0, 9]


@pytest.mark.parametrize("equal", [False, True], ids=["r_below_t", "r_equals_t"])
def test_the_jvp_agrees_with_finite_differences_and_a_float64_derivative(equal):
    torch.manual_seed(0)
    model = randomize(create_model_and_diffusion(**tiny_config(time_inputs=2, dropout=0.3))[0]).double().train()
    flow = FlowMap()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.35, 0.8], dtype=torch.float64)
    r = t.clone() if equal else torch.tensor([0.1, 0.3], dtype=torch.float64)
    y = torch.arange(2)

    def u(zz, s, net=model):  # r held fixed
        return flow.network(net, zz, r.to(s.dtype), s, y=y)

    torch.manual_seed(5)
    _, forward = network_jvp(u, z, t, v, "forward")
    torch.manual_seed(5)
    _, finite = network_jvp(u, z, t, v, "finite_diff", eps=1e-5)
    assert ((forward - finite).norm() / forward.norm()).item() < 1e-7
    torch.manual_seed(5)  # MeanFlow's call: the derivative alone, two evaluations instead of three, the same numbers
    no_value, derivative = network_jvp(u, z, t, v, "finite_diff", eps=1e-5, value=False)
    assert no_value is None and torch.equal(derivative, finite)
    model32 = model.float()
    torch.manual_seed(5)
    _, forward32 = network_jvp(lambda zz, s: u(zz, s, model32), z.float(), t.float(), v.float(), "forward")
    assert ((forward32.double() - forward).norm() / forward.norm()).item() < 1e-4


def test_times_follow_the_papers_sampler():
    method = MeanFlow(meanflow_flags(meanflow_ratio=0.25, meanflow_p_mean=-0.4, meanflow_p_std=1.0), diffusion=None)
    batch = torch.zeros(20000, 1, 1, 1)
    rows = method.draw(StepRandom(0, 3, 0, 1, batch.shape[0], torch.device("cpu")), batch, 3)
    t, r = rows["t"], rows["r"]
    assert (r <= t).all() and ((0 < r) & (t < 1)).all()
    assert (r != t).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # t is the larger of two logit-normal draws: P(t <= s) = Phi((logit(s) - mu) / sigma)^2
    from scipy.stats import norm

    for s in (0.2, 0.4, 0.6, 0.8):
        cdf = norm.cdf((np.log(s / (1 - s)) + 0.4) / 1.0) ** 2
        assert (t <= s).float().mean().item() == pytest.approx(cdf, abs=0.01)


def test_the_method_is_the_same_on_one_process_and_two():
    """Each process keeps its rows of the global batch's draws, and the loss is per sample: two processes' mean
    gradients are the one-process gradient (what DDP averages)."""
    torch.manual_seed(0)
    model = randomize(create_model_and_diffusion(**tiny_config(time_inputs=2, dropout=0.0))[0])
    method = MeanFlow(meanflow_flags(), diffusion=None)
    gen = torch.Generator().manual_seed(2)
    batch, y = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1, torch.tensor([1, 2, 3, 4])

    def gradient(rank, world):
        rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
        draws = method.draw(StepRandom(0, 7, rank, world, 4 // world, batch.device), batch[rows], 7)
        model.zero_grad()
        method.losses(model, batch[rows], {"y": y[rows]}, draws, 7)["loss"].mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    two = (gradient(0, 2) + gradient(1, 2)) / 2
    torch.testing.assert_close(two, gradient(0, 1), rtol=1e-4, atol=1e-6)


def test_the_path_its_noise_levels_and_the_sampler_against_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(t_of_sigma(sigma_of_t(t)), t)
    x, e = torch.ones(3, 1, 1, 1, dtype=torch.float64), torch.full((3, 1, 1, 1), -2.0, dtype=torch.float64)
    # equal signal-to-noise ratio: z_t / (1 - t) is x + sigma e
    torch.testing.assert_close(interpolate(x, e, t) / (1 - t)[:, None, None, None], x + sigma_of_t(t)[:, None, None, None] * e)

    class Linear(torch.nn.Module):  # u = k z: one jump z_0 = (1 - k) e, two (through 0.5) (1 - k / 2)^2 e
        def forward(self, z, times):
            assert times.shape == (z.shape[0], 2)
            return 0.6 * z

    for ts, factor in (((), 0.4), ((0.5,), 0.7**2)):
        noise = get_generator("determ", 2, seed=3).randn(2, 1, 2, 2)
        out = sample_flow_map(FlowMap(), Linear(), (2, 1, 2, 2), get_generator("determ", 2, seed=3), ts=ts,
                              clip_denoised=False)
        torch.testing.assert_close(out, factor * noise)
    # in EDM's noise levels (editing): the jump to r = 0 from z_t = (1 - t) x_sigma
    sigma = torch.tensor([0.5, 4.0])
    x_sigma = torch.randn(2, 1, 2, 2)
    _, denoised = FlowMapSigmaView(FlowMap()).denoise(Linear(), x_sigma, sigma)
    tt = (sigma / (1 + sigma))[:, None, None, None]
    torch.testing.assert_close(denoised, (1 - tt) * x_sigma * (1 - 0.6 * tt))


def fixed_batch_error(state):
    """MeanFlow's error ||u - u_tgt||^2 of `state` (None: a fresh network, whose zero output layer gives u = 0) on 64
    digits at fixed draws."""
    from cm.image_datasets import load_digits_arrays

    images, labels = load_digits_arrays()
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    method = MeanFlow(meanflow_flags(), diffusion=None)
    rows = method.draw(StepRandom(1, 0, 0, 1, 64, x.device), x, 0)
    model = create_model_and_diffusion(**tiny_config(time_inputs=2))[0]
    if state is not None:
        model.load_state_dict(state)
    with torch.no_grad():
        return method.losses(model.eval(), x, {"y": torch.from_numpy(labels[:64])}, rows, 0)["error"].mean().item()


def test_a_meanflow_run_lowers_its_error_resumes_exactly_samples_and_edits(tmp_path):
    main = load_script("cm_train").main
    flags = TRAIN.replace("--lr 2e-4", "--lr 2e-3") + " --training_mode meanflow --dropout 0 --save_interval 5"
    main(shlex.split(flags + f" --total_training_steps 5 --log_dir {tmp_path / 'run'}"))
    main(shlex.split(flags + f" --total_training_steps 10 --log_dir {tmp_path / 'run'}"))  # resumes from step 5
    main(shlex.split(flags + f" --total_training_steps 10 --log_dir {tmp_path / 'straight'}"))
    resumed, straight = (torch.load(d / "model000010.pt", weights_only=True) for d in (tmp_path / "run", tmp_path / "straight"))
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
    assert checkpoint_config(resumed)["time_inputs"] == 2  # the method's flag value, stored
    before, after = fixed_batch_error(None), fixed_batch_error(resumed)
    assert after < 0.95 * before, (before, after)  # (measured: 13% lower after 10 steps)
    for sampler in ("onestep", "multistep"):  # no method flags: the checkpoint says what it is
        load_script("image_sample").main(shlex.split(
            f"--precision fp32 --sampler {sampler} --num_samples 4 --batch_size 4 "
            f"--model_path {tmp_path / 'run' / 'model000010.pt'} --log_dir {tmp_path / sampler}"))
        samples = np.load(tmp_path / sampler / "samples_4x16x16x3.npz")["arr_0"]
        assert samples.shape == (4, 16, 16, 3) and samples.std() > 0
    one, two = (np.load(tmp_path / s / "samples_4x16x16x3.npz")["arr_0"] for s in ("onestep", "multistep"))
    assert not np.array_equal(one, two)
    load_script("image_edit").main(shlex.split(
        f"--precision fp32 --task inpainting --mask box --data_dir digits --num_images 2 --model_path {tmp_path / 'run' / 'model000010.pt'} "
        f"--log_dir {tmp_path / 'edit'}"))
    edited = np.load(tmp_path / "edit" / "edit_inpainting.npz")
    assert all(edited[k].shape[0] == 2 for k in edited.files)
