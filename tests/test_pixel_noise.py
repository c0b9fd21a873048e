"""The high-frequency energy that the demo reports beside FID: zero for flat images, (8/9) s^2 for
independent pixel noise of standard deviation s, and the ratio of two batches read from .npz files."""

import numpy as np
import pytest

from cm.image_io import save_npz
from evaluations.pixel_noise import high_frequency_energy, high_frequency_energy_batch, high_frequency_ratio


def noisy_gray(std, n=4, size=96, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.round(128 + std * rng.standard_normal((n, size, size, 3))), 0, 255).astype(np.uint8)


def test_flat_and_smooth_images_have_none():
    assert np.all(high_frequency_energy_batch(np.full((2, 16, 16, 3), 77, np.uint8)) == 0)
    ramp = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, None, :, None] * 8, (1, 32, 32, 3))
    inner = high_frequency_energy_batch(ramp)  # a linear ramp equals its box blur except at the replicated edges
    assert 0 < inner[0] < 1e-3


@pytest.mark.parametrize("std", [5.0, 20.0])
def test_independent_noise_adds_eight_ninths_of_its_variance(std):
    energy = high_frequency_energy_batch(noisy_gray(std)).mean()
    # x - mean of its 3x3 neighbourhood: variance s^2 (1 - 2/9 + 1/9); rounding adds its own 1/12 (in 1/255 units)
    expected = 8 / 9 * (std**2 + 1 / 12) / 255**2
    assert energy == pytest.approx(expected, rel=0.05)


def test_ratio_of_two_npz_batches(tmp_path):
    clean, noisy = tmp_path / "clean.npz", tmp_path / "noisy.npz"
    save_npz(str(clean), noisy_gray(5.0, seed=1))
    save_npz(str(noisy), noisy_gray(20.0, seed=2))
    assert high_frequency_energy(str(noisy), batch_size=3) == pytest.approx(high_frequency_energy_batch(noisy_gray(20.0, seed=2)).mean())
    assert high_frequency_ratio(str(clean), str(noisy)) == pytest.approx((400 + 1 / 12) / (25 + 1 / 12), rel=0.08)


def test_ratio_takes_a_computed_reference_energy_and_refuses_a_flat_reference(tmp_path):
    sample, flat = tmp_path / "sample.npz", tmp_path / "flat.npz"
    save_npz(str(sample), noisy_gray(20.0, seed=3))
    save_npz(str(flat), np.full((2, 16, 16, 3), 40, np.uint8))
    energy = high_frequency_energy(str(sample))
    assert high_frequency_ratio(energy / 2, str(sample)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no high-frequency energy"):
        high_frequency_ratio(str(flat), str(sample))
