"""Samplers against the exact solution for Gaussian data, plus shape, range and determinism."""

import pytest
import torch

from cm.karras_diffusion import karras_sample
from cm.nn import append_dims
from cm.random_util import get_generator
from cm.samplers import SAMPLERS, get_ancestral_step, stochastic_iterative_sampler
from cm.schedule import get_sigmas_karras

S = 0.5  # data ~ N(0, S^2) per pixel: the ideal denoiser and consistency function are known


def gaussian_denoiser(x, sigma):
    """E[x0 | x_sigma] = S^2 / (S^2 + sigma^2) x."""
    return x * append_dims(S**2 / (S**2 + sigma**2), x.ndim)


def gaussian_consistency_fn(x, sigma):
    """The PF-ODE solution to sigma = 0: x(sigma) grows as sqrt(S^2 + sigma^2), so f = x S / sqrt(S^2 + sigma^2)."""
    return x * append_dims(S / torch.sqrt(S**2 + sigma**2), x.ndim)


def exact_solution(x_T, sigma_max):
    return x_T * S / (S**2 + sigma_max**2) ** 0.5


def _ode_error(name, steps):
    x_T = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    n = steps + 1 if name == "progdist" else steps
    sigmas = get_sigmas_karras(n, 0.002, 80.0).double()
    out = SAMPLERS[name](gaussian_denoiser, x_T, sigmas, get_generator("dummy"))
    if name == "progdist":  # stops at sigma_min instead of 0: the exact solution there
        want = x_T * ((S**2 + 0.002**2) / (S**2 + 80.0**2)) ** 0.5
    else:
        want = exact_solution(x_T, 80.0)
    return ((out - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name,order", [("heun", 2), ("dpm", 2), ("euler", 1), ("progdist", 1)])
def test_ode_samplers_converge_to_the_exact_solution_at_their_order(name, order):
    coarse, fine = _ode_error(name, 40), _ode_error(name, 80)
    assert fine < 0.04
    # doubling the steps divides the error by about 2^order
    assert 2**order * 0.8 < coarse / fine < 2**order * 1.25


def test_onestep_is_exact_with_the_exact_consistency_function():
    x_T = torch.randn(8, 3, 4, 4) * 80.0
    out = SAMPLERS["onestep"](gaussian_consistency_fn, x_T, get_sigmas_karras(40, 0.002, 80.0), None)
    torch.testing.assert_close(out, exact_solution(x_T, 80.0))


def test_multistep_keeps_the_data_distribution():
    # with the exact f, each step re-noises to N(0, S^2 + t^2 - t_min^2) and maps back to N(0, S^2)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(64, 3, 16, 16, generator=gen) * 80.0
    out = stochastic_iterative_sampler(
        gaussian_consistency_fn, x_T, None, get_generator("dummy"), ts=(0, 10, 22, 39), steps=40
    )
    assert out.std().item() == pytest.approx(S, rel=0.03)


def test_ancestral_keeps_the_data_distribution():
    torch.manual_seed(0)
    x_T = torch.randn(64, 3, 16, 16) * 80.0
    out = SAMPLERS["ancestral"](gaussian_denoiser, x_T, get_sigmas_karras(1000, 0.002, 80.0), get_generator("dummy"))
    assert out.std().item() == pytest.approx(S, rel=0.02)


def test_ancestral_step_splits_the_variance():
    down, up = get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0))
    assert (down**2 + up**2).item() == pytest.approx(1.0)
    assert up.item() == pytest.approx((1.0 * 3.0 / 4.0) ** 0.5)


def test_heun_churn_adds_noise_only_inside_the_window():
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 80.0
    sigmas = get_sigmas_karras(10, 0.002, 80.0)
    plain = SAMPLERS["heun"](gaussian_denoiser, x_T, sigmas, get_generator("dummy"))
    outside = SAMPLERS["heun"](gaussian_denoiser, x_T, sigmas, get_generator("dummy"), s_churn=5.0, s_tmin=100.0)
    torch.testing.assert_close(outside, plain)
    churned = SAMPLERS["heun"](gaussian_denoiser, x_T, sigmas, get_generator("dummy"), s_churn=5.0)
    assert not torch.allclose(churned, plain)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_karras_sample_shape_range_and_determinism(tiny_model_and_diffusion, sampler):
    model, diffusion = tiny_model_and_diffusion
    outs = []
    for _ in range(2):
        gen = get_generator("determ", 3, seed=7)
        outs.append(
            karras_sample(
                diffusion,
                model,
                (3, 3, 16, 16),
                steps=4,
                model_kwargs={"y": torch.tensor([0, 5, 9])},
                sampler=sampler,
                generator=gen,
                ts=(0, 2, 3),
                s_churn=1.0,
            )
        )
    assert outs[0].shape == (3, 3, 16, 16)
    assert outs[0].min() >= -1 and outs[0].max() <= 1
    assert torch.equal(outs[0], outs[1])


def test_callback_and_progress(tiny_model_and_diffusion):
    model, diffusion = tiny_model_and_diffusion
    seen = []
    karras_sample(
        diffusion,
        model,
        (2, 3, 16, 16),
        steps=5,
        model_kwargs={"y": torch.tensor([1, 2])},
        sampler="euler",
        progress=True,
        callback=lambda info: seen.append((info["i"], float(info["sigma"]))),
    )
    assert [i for i, _ in seen] == list(range(5))
    assert seen[0][1] == pytest.approx(80.0)


def test_multistep_without_ts_is_a_clear_error(tiny_model_and_diffusion):
    model, diffusion = tiny_model_and_diffusion
    with pytest.raises(ValueError, match="--ts"):
        karras_sample(diffusion, model, (1, 3, 16, 16), steps=40, model_kwargs={"y": torch.tensor([0])}, sampler="multistep")
    with pytest.raises(ValueError, match="0..39"):
        karras_sample(
            diffusion, model, (1, 3, 16, 16), steps=40, model_kwargs={"y": torch.tensor([0])}, sampler="multistep", ts=(0, 40)
        )
    with pytest.raises(ValueError, match="unknown sampler"):
        karras_sample(diffusion, model, (1, 3, 16, 16), steps=4, sampler="bogus")


def test_consistency_multistep_through_noise_levels_equals_the_grid_indices_at_them(tiny_model_and_diffusion):
    """--t_mid for consistency models (TCM's two steps go through a noise level): the levels of --ts 0,2,3 on the
    4-point grid, given as numbers, sample the same images (to rounding: the grid's ends are sigma_max and sigma_min
    only to it); the flags are checked in one line each."""
    from argparse import Namespace

    from cm.parameterizations import CONSISTENCY
    from cm.schedule import index_to_sigma

    model, diffusion = tiny_model_and_diffusion
    middle = index_to_sigma(2, 4, diffusion.sigma_min, diffusion.sigma_max, diffusion.rho)

    def sample(ts, t_mid):
        args = Namespace(sampler="multistep", ts=ts, t_mid=t_mid, steps=4, sigma_max=diffusion.sigma_max)
        steps = CONSISTENCY.sampler_steps(args)
        return CONSISTENCY.sample(diffusion, model, (2, 3, 16, 16), get_generator("determ", 2, seed=5), sampler="multistep",
                                  steps=4, model_kwargs={"y": torch.tensor([1, 4])}, device="cpu", clip_denoised=True,
                                  **steps)

    by_index = sample("0,2,3", "")
    assert torch.allclose(sample("", repr(middle)), by_index, atol=1e-5)
    assert not torch.allclose(sample("", repr(middle * 2)), by_index, atol=1e-2)
    for ts, t_mid, words in (("0,2,3", "1.0", "not both"), ("", "100", "sigma_max"), ("", "1,2", "decreasing")):
        with pytest.raises(ValueError, match=words):
            sample(ts, t_mid)
