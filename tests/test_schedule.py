"""Karras noise levels and the target-EMA / discretisation curricula."""

import math

import pytest
import torch

from cm.schedule import create_ema_and_scales_fn, get_sigmas_karras, index_to_sigma


@pytest.mark.parametrize("n", [1, 2, 18, 40, 201])
def test_karras_sigmas_endpoints_and_monotonic(n):
    sigmas = get_sigmas_karras(n, 0.002, 80.0, 7.0)
    assert sigmas.shape == (n + 1,)
    assert sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-6)
    if n > 1:
        assert sigmas[-2].item() == pytest.approx(0.002, rel=1e-5)
        assert (sigmas[1:] < sigmas[:-1]).all()


def test_karras_sigmas_against_direct_formula():
    n, lo, hi, rho = 10, 0.002, 80.0, 7.0
    sigmas = get_sigmas_karras(n, lo, hi, rho)
    for i in range(n):
        want = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        assert sigmas[i].item() == pytest.approx(want, rel=1e-5)


def test_index_to_sigma_on_tensors_and_floats():
    assert index_to_sigma(0, 40, 0.002, 80.0) == pytest.approx(80.0)
    assert index_to_sigma(39, 40, 0.002, 80.0) == pytest.approx(0.002)
    idx = torch.arange(40)
    torch.testing.assert_close(index_to_sigma(idx, 40, 0.002, 80.0), get_sigmas_karras(40, 0.002, 80.0)[:-1])


def _ct_scales(step, total, s0, s1):
    """CM paper Appendix C: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1."""
    return max(math.ceil(math.sqrt(step / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1), 1) + 1


@pytest.mark.parametrize("s0,s1,total", [(2, 200, 800000), (2, 150, 1000000), (10, 1280, 4000)])
def test_adaptive_progressive_matches_paper(s0, s1, total):
    fn = create_ema_and_scales_fn("adaptive", 0.95, "progressive", s0, s1, total, 50000)
    for step in list(range(0, total, max(total // 997, 1))) + [total]:
        n = _ct_scales(step, total, s0, s1)
        ema, scales = fn(step)
        assert scales == n, step
        # the published code divides by N(k) - 1 where the paper (Appendix C) writes N(k);
        # we keep the published values, with which the checkpoints were trained
        assert ema == pytest.approx(math.exp(s0 * math.log(0.95) / (n - 1)), rel=1e-12), step
    assert fn(total)[1] == s1 + 1


def test_fixed_modes():
    assert create_ema_and_scales_fn("fixed", 0.95, "fixed", 40, 40, 600000, 50000)(12345) == (0.95, 40)
    fn = create_ema_and_scales_fn("fixed", 0.9, "progressive", 2, 200, 1000, 50000)
    assert [fn(k) for k in (0, 500, 1000)] == [(0.9, _ct_scales(k, 1000, 2, 200)) for k in (0, 500, 1000)]


def test_progdist_halves_then_reaches_one_step():
    fn = create_ema_and_scales_fn("fixed", 0.0, "progdist", 8, 8, 100, 10)
    # 8 for a stage, 4 for a stage, then 2 for two stages, then 1 (worked out by hand)
    want = [8] * 10 + [4] * 10 + [2] * 20 + [1] * 30
    assert [fn(k)[1] for k in range(70)] == want
    assert all(fn(k)[0] == 1.0 for k in range(70))


def test_unsupported_mode_pair_is_refused():
    with pytest.raises(ValueError, match="adaptive/fixed"):
        create_ema_and_scales_fn("adaptive", 0.95, "fixed", 40, 40, 100, 10)
