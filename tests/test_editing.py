"""Zero-shot editing: the projections, masks, interpolation and the editing loops."""

import numpy as np
import pytest
import torch
from PIL import Image

from cm.editing import (
    builtin_mask,
    interpolation,
    iterative_colorization,
    iterative_inpainting,
    iterative_superres,
    load_mask,
    luminance_replace,
    patch_mean_replace,
    slerp,
)
from cm.random_util import get_generator


def orthogonal_basis(first):
    """An orthogonal matrix whose first column is `first` normalised (the published construction, via QR)."""
    v = np.asarray(first, dtype=np.float64)
    m = np.eye(len(v))
    m[:, 0] = v / np.linalg.norm(v)
    q = np.linalg.qr(m)[0]
    return q if q[:, 0].sum() >= 0 else -q


def test_luminance_replace_equals_the_basis_construction():
    q = torch.from_numpy(orthogonal_basis([0.2989, 0.5870, 0.1140]))
    known, est = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    a, b = torch.einsum("bchw,cd->bdhw", known, q), torch.einsum("bchw,cd->bdhw", est, q)
    mixed = torch.cat([a[:, :1], b[:, 1:]], dim=1)
    want = torch.einsum("bdhw,cd->bchw", mixed, q)
    torch.testing.assert_close(luminance_replace(known, est), want)


def test_patch_mean_replace_equals_the_basis_construction():
    p = 4
    q = torch.from_numpy(orthogonal_basis([1.0] * p * p))
    known, est = torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(1, 3, 8, 8, dtype=torch.float64)

    def patches(x):  # [1, 3, 8, 8] -> [1, 3, 4 patches, 16 pixels]
        return x.reshape(1, 3, 2, p, 2, p).permute(0, 1, 2, 4, 3, 5).reshape(1, 3, 4, p * p)

    a, b = patches(known) @ q, patches(est) @ q
    mixed = torch.cat([a[..., :1], b[..., 1:]], dim=-1) @ q.T
    want = mixed.reshape(1, 3, 2, 2, p, p).permute(0, 1, 2, 4, 3, 5).reshape(1, 3, 8, 8)
    torch.testing.assert_close(patch_mean_replace(known, est, patch_size=p), want)


def noisy_identity(x, sigma):
    """A stand-in consistency function: returns its input shrunk toward 0."""
    return x / (1 + sigma.view(-1, 1, 1, 1))


@pytest.fixture
def images():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _start(images):
    return torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * 80.0


def test_inpainting_keeps_known_pixels(images):
    mask = builtin_mask("box", 16)
    out, degraded = iterative_inpainting(noisy_identity, images, _start(images), ts=(0, 5, 9), steps=10,
                                         generator=get_generator("dummy"), mask=mask)
    known = mask.bool().expand_as(images)
    # the last index is the end of the grid: no noise is added after the final projection
    torch.testing.assert_close(out[known], images[known])
    assert (degraded[~known] == -1).all()
    assert out.shape == images.shape


def test_colorization_keeps_luminance(images):
    out, gray = iterative_colorization(noisy_identity, images, _start(images), ts=(0, 9), steps=10,
                                       generator=get_generator("dummy"))
    w = torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
    lum = lambda x: (x * w).sum(1)
    torch.testing.assert_close(lum(out), lum(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(lum(gray), lum(images), atol=1e-5, rtol=0)


def test_superres_keeps_patch_means(images):
    out, low = iterative_superres(noisy_identity, images, _start(images), ts=(0, 9), steps=10,
                                  generator=get_generator("dummy"), patch_size=4)
    pool = torch.nn.functional.avg_pool2d
    torch.testing.assert_close(pool(out, 4), pool(images, 4), atol=1e-5, rtol=0)
    # the degraded input is the low-resolution image: constant within each patch, same means
    up = pool(images, 4).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(low, up)
    with pytest.raises(ValueError, match="patch size"):
        iterative_superres(noisy_identity, images, _start(images), ts=(0, 9), steps=10, patch_size=5)


@pytest.mark.parametrize("name,hidden", [("box", 0.25), ("half", 0.5), ("letter", None)])
def test_builtin_masks(name, hidden):
    mask = builtin_mask(name, 64)
    assert mask.shape == (64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    frac = 1 - mask.mean().item()
    if hidden is None:
        assert 0.05 < frac < 0.6  # a letter hides a real part of the image, not all of it
    else:
        assert frac == pytest.approx(hidden)
    with pytest.raises(ValueError, match="letter, box, half"):
        builtin_mask("circle", 8)


def test_load_mask_from_png(tmp_path):
    img = np.zeros((32, 32), dtype=np.uint8)
    img[:, :16] = 255
    Image.fromarray(img).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", 16)
    assert mask[:, :8].eq(1).all() and mask[:, 8:].eq(0).all()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_mask(tmp_path / "bad.png", 16)


def test_slerp():
    z0, z1 = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    # for orthogonal endpoints of equal norm, the midpoint keeps that norm
    a = torch.zeros(1, 4); a[0, 0] = 2.0
    b = torch.zeros(1, 4); b[0, 1] = 2.0
    assert slerp(a, b, 0.5).norm().item() == pytest.approx(2.0)
    torch.testing.assert_close(slerp(z0, z0, 0.3), z0)


def test_interpolation_endpoints_are_the_one_step_samples():
    z0, z1 = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    out = interpolation(noisy_identity, z0, z1, num_points=5, ts=(0, 9), steps=10)
    assert out.shape == (5, 3, 8, 8)
    torch.testing.assert_close(out[0], noisy_identity(z0 * 80.0, torch.tensor([80.0]))[0])
    torch.testing.assert_close(out[-1], noisy_identity(z1 * 80.0, torch.tensor([80.0]))[0])
