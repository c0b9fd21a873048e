"""Preconditioning: scalings, boundary condition, time input, loss weightings."""

import math

import pytest
import torch

from cm.denoiser import network_time
from cm.karras_diffusion import KarrasDenoiser
from cm.losses import get_weightings


def test_consistency_boundary_condition_is_exact(tiny_model_and_diffusion):
    model, diffusion = tiny_model_and_diffusion
    x = torch.randn(4, 3, 16, 16)
    sigma = torch.full((4,), diffusion.sigma_min)
    with torch.no_grad():
        out, denoised = diffusion.denoise(model, x, sigma, y=torch.arange(4))
    assert out.abs().max() > 0.01  # the network itself does not vanish at sigma_min ...
    torch.testing.assert_close(denoised, x, rtol=0, atol=1e-6)  # ... the scalings make f(x, eps) = x


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 2.0, 80.0])
def test_scalings_against_formulas(sigma):
    d = KarrasDenoiser(sigma_data=0.5, sigma_min=0.002)
    s = torch.tensor([sigma], dtype=torch.float64)
    c_skip, c_out, c_in = d.get_scalings(s)
    assert c_skip.item() == pytest.approx(0.25 / (sigma**2 + 0.25))
    assert c_out.item() == pytest.approx(sigma * 0.5 / math.sqrt(sigma**2 + 0.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + 0.25))
    b_skip, b_out, b_in = d.get_scalings_for_boundary_condition(s)
    assert b_skip.item() == pytest.approx(0.25 / ((sigma - 0.002) ** 2 + 0.25))
    assert b_out.item() == pytest.approx((sigma - 0.002) * 0.5 / math.sqrt(sigma**2 + 0.25), abs=1e-15)
    assert b_in.item() == pytest.approx(c_in.item())
    # EDM's scalings keep the target's variance at one: c_skip^2 * (sigma_d^2 + sigma^2) ... (EDM eq. 8 check)
    assert (c_skip**2 * (0.25 + sigma**2) - 2 * c_skip * 0.25 + 0.25).item() == pytest.approx(c_out.item() ** 2)


def test_network_time_is_250_log_sigma():
    s = torch.tensor([0.002, 1.0, 80.0])
    torch.testing.assert_close(network_time(s), 250 * torch.log(s))


def test_denoise_feeds_scaled_input_and_time():
    seen = {}

    def model(x, t, **kw):
        seen["x"], seen["t"] = x, t
        return torch.ones_like(x)

    d = KarrasDenoiser(distillation=False)
    x = torch.full((2, 3, 4, 4), 2.0)
    sigma = torch.tensor([1.0, 3.0])
    _, denoised = d.denoise(model, x, sigma)
    c_in = 1 / torch.sqrt(sigma**2 + 0.25)
    torch.testing.assert_close(seen["x"][:, 0, 0, 0], 2.0 * c_in)
    torch.testing.assert_close(seen["t"], 250 * torch.log(sigma))
    c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / torch.sqrt(sigma**2 + 0.25)
    torch.testing.assert_close(denoised[:, 0, 0, 0], 2.0 * c_skip + c_out)


def test_weightings():
    sigma = torch.tensor([0.5, 1.0, 2.0])
    snr = sigma**-2
    torch.testing.assert_close(get_weightings("snr", snr, 0.5), 1 / sigma**2)
    torch.testing.assert_close(get_weightings("snr+1", snr, 0.5), 1 / sigma**2 + 1)
    # EDM: (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2
    torch.testing.assert_close(get_weightings("karras", snr, 0.5), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
    torch.testing.assert_close(get_weightings("truncated-snr", snr, 0.5), torch.tensor([4.0, 1.0, 1.0]))
    torch.testing.assert_close(get_weightings("uniform", snr, 0.5), torch.ones(3))
    with pytest.raises(ValueError, match="weight_schedule"):
        get_weightings("bogus", snr, 0.5)
    with pytest.raises(ValueError, match="weight_schedule"):
        KarrasDenoiser(weight_schedule="bogus")
