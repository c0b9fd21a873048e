"""Training losses against independent float64 computations; distances; weightings; EMA arithmetic."""

import copy
import math

import pytest
import torch

from cm.ema import EMASet, update_ema
from cm.losses import distance, pseudo_huber_c
from cm.script_util import create_model_and_diffusion

from conftest import randomize, tiny_config


def make(distillation=True, seed=0, **kw):
    model, diffusion = create_model_and_diffusion(**tiny_config(**kw), distillation=distillation)
    return randomize(model, seed=seed).double().eval(), diffusion


def f_explicit(model, x, sigma, y, sigma_min=0.002, boundary=True, sd=0.5):
    """Preconditioned output written out: c_skip x + c_out F(c_in x, 250 ln sigma) (CM App. C / EDM Table 1)."""
    s = sigma.view(-1, 1, 1, 1)
    shift = sigma_min if boundary else 0.0
    c_skip = sd**2 / ((s - shift) ** 2 + sd**2)
    c_out = (s - shift) * sd / torch.sqrt(s**2 + sd**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    return c_skip * x + c_out * model(c_in * x, 250 * torch.log(sigma), y)


def test_ct_loss_with_two_scales(batch):
    # N = 2: the only pair is (t_0, t_1) = (sigma_max, sigma_min); CT's Euler step with x itself
    # lands on x + sigma_min z, and the boundary condition makes the target exactly that point.
    x, z, y = batch
    model, diffusion = make(loss_norm="l2", weight_schedule="snr")
    target = make(loss_norm="l2", seed=1)[0]
    got = diffusion.consistency_losses(model, x, 2, model_kwargs={"y": y}, target_model=target, noise=z)["loss"]
    t = torch.full((3,), 80.0, dtype=torch.float64)
    online = f_explicit(model, x + 80.0 * z, t, y)
    x_t2 = x + 0.002 * z
    want = ((online - x_t2) ** 2).mean(dim=(1, 2, 3)) * 80.0**-2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cd_loss_with_two_scales_heun_and_euler(batch):
    x, z, y = batch
    model, diffusion = make(loss_norm="l1", weight_schedule="uniform")
    target = make(loss_norm="l1", seed=1)[0]
    teacher, teacher_diffusion = make(distillation=False, seed=2)
    t, t2 = 80.0, 0.002
    tt, tt2 = torch.full((3,), t, dtype=torch.float64), torch.full((3,), t2, dtype=torch.float64)
    x_t = x + t * z
    with torch.no_grad():
        d = (x_t - f_explicit(teacher, x_t, tt, y, boundary=False)) / t
        x_euler = x_t + d * (t2 - t)
        d2 = (x_euler - f_explicit(teacher, x_euler, tt2, y, boundary=False)) / t2
        x_heun = x_t + (d + d2) / 2 * (t2 - t)
        online = f_explicit(model, x_t, tt, y)
    for solver, x_next in (("heun", x_heun), ("euler", x_euler)):
        got = diffusion.consistency_losses(
            model, x, 2, model_kwargs={"y": y}, target_model=target, teacher_model=teacher,
            teacher_diffusion=teacher_diffusion, noise=z, teacher_solver=solver,
        )["loss"]
        with torch.no_grad():
            want = (online - f_explicit(target, x_next, tt2, y)).abs().mean(dim=(1, 2, 3))
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


def test_consistency_loss_at_given_indices_uses_the_karras_grid(batch):
    x, z, y = batch
    model, diffusion = make(loss_norm="l2", weight_schedule="uniform")
    idx = torch.tensor([0, 5, 8])
    got = diffusion.consistency_losses(model, x, 10, model_kwargs={"y": y}, target_model=model, noise=z, indices=idx)["loss"]
    rho, lo, hi = 7.0, 0.002, 80.0
    sig = lambda i: (hi ** (1 / rho) + i / 9 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    t = torch.tensor([sig(i) for i in (0, 5, 8)], dtype=torch.float64)
    t2 = torch.tensor([sig(i + 1) for i in (0, 5, 8)], dtype=torch.float64)
    with torch.no_grad():
        want = ((f_explicit(model, x + t.view(-1, 1, 1, 1) * z, t, y) - f_explicit(model, x + t2.view(-1, 1, 1, 1) * z, t2, y)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)


def test_edm_loss(batch):
    x, z, y = batch
    model, diffusion = make(distillation=False, weight_schedule="karras")
    sigmas = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    got = diffusion.training_losses(model, x, sigmas, model_kwargs={"y": y}, noise=z)
    with torch.no_grad():
        err = ((f_explicit(model, x + sigmas.view(-1, 1, 1, 1) * z, sigmas, y, boundary=False) - x) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got["xs_mse"], err)
    torch.testing.assert_close(got["loss"], err * (sigmas**2 + 0.25) / (sigmas * 0.5) ** 2)


def test_progdist_loss(batch):
    x, z, y = batch
    model, diffusion = make(distillation=False, loss_norm="l2", weight_schedule="uniform")
    teacher, teacher_diffusion = make(distillation=False, seed=3)
    idx = torch.tensor([0, 1, 2])
    got = diffusion.progdist_losses(model, x, 4, model_kwargs={"y": y}, teacher_model=teacher,
                                    teacher_diffusion=teacher_diffusion, noise=z, indices=idx)["loss"]
    rho, lo, hi = 7.0, 0.002, 80.0
    sig = lambda u: torch.tensor([(hi ** (1 / rho) + v / 4 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for v in u], dtype=torch.float64)
    t, t2, t3 = sig([0, 1, 2]), sig([0.5, 1.5, 2.5]), sig([1, 2, 3])
    b = lambda v: v.view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = x + b(t) * z
        x_t2 = x_t + (x_t - f_explicit(teacher, x_t, t, y, boundary=False)) / b(t) * b(t2 - t)
        x_t3 = x_t2 + (x_t2 - f_explicit(teacher, x_t2, t2, y, boundary=False)) / b(t2) * b(t3 - t2)
        target = x_t - b(t) * (x_t3 - x_t) / b(t3 - t)
        want = ((f_explicit(model, x_t, t, y, boundary=False) - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)


class DropoutProbe(torch.nn.Module):
    """Multiplies its input by a fresh dropout mask and records the masks it drew."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, y=None):
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
        self.masks.append(mask)
        return x * mask * self.w


def test_online_and_target_share_the_dropout_state(batch):
    x, z, _ = batch
    masks = []
    _, diffusion = make(loss_norm="l2")
    diffusion.consistency_losses(DropoutProbe(masks), x.float(), 5, target_model=DropoutProbe(masks), noise=z.float())
    online, target = masks
    assert torch.equal(online, target) and not torch.equal(online, torch.ones_like(online))


def test_distances():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    torch.testing.assert_close(distance(a, b, "l1"), (a - b).abs().flatten(1).mean(1))
    torch.testing.assert_close(distance(a, b, "l2"), ((a - b) ** 2).flatten(1).mean(1))
    a32, b32 = (torch.nn.functional.interpolate(v, size=32, mode="bilinear") for v in (a, b))
    torch.testing.assert_close(distance(a, b, "l2-32"), ((a32 - b32) ** 2).flatten(1).mean(1))
    with pytest.raises(ValueError, match="pseudo-huber"):
        distance(a, b, "l3")


def test_pseudo_huber_value_and_gradient():
    a = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    assert pseudo_huber_c(a) == pytest.approx(c)
    d = distance(a, b, "pseudo-huber")
    norm2 = ((a - b) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(d, torch.sqrt(norm2 + c * c) - c)
    d.sum().backward()
    # d/da sqrt(|a-b|^2 + c^2) = (a - b) / sqrt(|a-b|^2 + c^2)
    want = (a - b).detach() / torch.sqrt(norm2 + c * c).view(-1, 1, 1, 1).detach()
    torch.testing.assert_close(a.grad, want)
    # near zero it is quadratic (|x|^2 / 2c), far away linear
    tiny = distance(b + 1e-6, b, "pseudo-huber")
    assert tiny[0].item() == pytest.approx((1e-6) ** 2 * 192 / (2 * c), rel=1e-3)


def test_lpips_distance_upsamples_and_maps_to_unit_range():
    seen = []

    def fake_lpips(x, y):
        seen.append((x, y))
        return (x - y).abs().flatten(1).mean(1)

    a, b = torch.full((1, 3, 16, 16), -1.0), torch.full((1, 3, 16, 16), 1.0)
    d = distance(a, b, "lpips", lpips_fn=fake_lpips)
    x, y = seen[0]
    # (bilinear weights sum to 1 up to rounding: -5.96e-8 on one thread)
    assert x.shape == (1, 3, 224, 224) and abs(x.min()) < 1e-6 and abs(y.max() - 1) < 1e-6
    assert d.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="LPIPS"):
        distance(a, b, "lpips")


def test_update_ema_arithmetic():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    source = [torch.tensor([3.0, 6.0]), torch.tensor([[-1.0]])]
    update_ema(target, source, rate=0.75)
    torch.testing.assert_close(target[0], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6]))
    torch.testing.assert_close(target[1], torch.tensor([[0.75 * 3 - 0.25]]))
    odd = [torch.tensor([1e8, -3.3e-7])]
    update_ema(odd, [torch.tensor([0.1, 7.7])], rate=0.0)
    assert odd[0].tolist() == torch.tensor([0.1, 7.7]).tolist()  # rate 0: exactly the source
    with pytest.raises(ValueError, match="tensors"):
        update_ema(target, source[:1])


def test_ema_set_tracks_several_rates():
    params = [torch.zeros(3)]
    ema = EMASet([0.5, 0.9], params)
    ema.update([torch.ones(3)])
    ema.update([torch.ones(3)])
    torch.testing.assert_close(ema.params[0][0], torch.full((3,), 1 - 0.5**2))
    torch.testing.assert_close(ema.params[1][0], torch.full((3,), 1 - 0.9**2))


def test_lpips_consistency_loss_backpropagates(batch):
    from cm.lpips import LPIPS

    x, z, y = batch
    model, diffusion = make(loss_norm="lpips", weight_schedule="uniform")
    model.float()
    diffusion.lpips_loss = LPIPS(pretrained=False)  # random backbone: no download in tests
    target = copy.deepcopy(model)
    loss = diffusion.consistency_losses(model, x.float(), 5, model_kwargs={"y": y}, target_model=target, noise=z.float())["loss"]
    assert loss.shape == (3,) and (loss > 0).all()
    loss.mean().backward()
    assert model.out[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())
