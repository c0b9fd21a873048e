"""Zero-shot image editing with a consistency model (CM paper, Section 6 and Algorithm 4).

Each edit is the multistep consistency sampler where, after every clean estimate x0, the part
of the image that the degraded input fixes is put back: x0 <- A(y) + (I - A)(x0), with A a
linear projection (luminance for colorization, patch means for super-resolution, known pixels
for inpainting). Images are in [-1, 1], NCHW. Every function returns (result, degraded input).
"""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .samplers import multistep_consistency_loop

# Luminance weights (ITU-R 601) of the grayscale the published colorization projects onto.
LUMA = (0.2989, 0.5870, 0.1140)


def _edit(distiller, x, ts, t_min, t_max, rho, steps, generator, replace):
    """The shared loop: clamp each clean estimate to [-1, 1], then restore the known part."""
    return multistep_consistency_loop(
        distiller,
        x,
        ts,
        generator,
        t_min=t_min,
        t_max=t_max,
        rho=rho,
        steps=steps,
        project=lambda x0: replace(torch.clamp(x0, -1.0, 1.0)),
    )


def luminance_replace(known, estimate):
    """Component of `known` along the unit luminance direction v, the rest from `estimate`:
    estimate + v v^T (known - estimate), per pixel. (The published code does the same through an
    orthogonal basis whose first column is v.)"""
    v = torch.tensor(LUMA, dtype=estimate.dtype, device=estimate.device)
    v = (v / v.norm()).view(1, 3, 1, 1)
    return estimate + v * (v * (known - estimate)).sum(dim=1, keepdim=True)


def _patch_mean(x, patch_size):
    """Mean over non-overlapping patch_size x patch_size patches, broadcast back to full size."""
    n, c, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the super-resolution patch size {patch_size}")
    means = torch.nn.functional.avg_pool2d(x, patch_size)
    return torch.repeat_interleave(torch.repeat_interleave(means, patch_size, dim=2), patch_size, dim=3)


def patch_mean_replace(known, estimate, patch_size=8):
    """Patch means from `known`, detail within each patch from `estimate` (projection onto the
    constant vector of each patch)."""
    return estimate - _patch_mean(estimate, patch_size) + _patch_mean(known, patch_size)


@torch.no_grad()
def iterative_colorization(distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None):
    """Colour grayscale `images` (their luminance is kept; `x` is the start noise sigma_max * z)."""
    gray = luminance_replace(images, torch.zeros_like(images))
    out = _edit(distiller, x, ts, t_min, t_max, rho, steps, generator, lambda x0: luminance_replace(gray, x0))
    return out, gray


@torch.no_grad()
def iterative_superres(
    distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None, patch_size=8
):
    """Super-resolve `images` whose patch_size x patch_size patches are averaged (the low-resolution input)."""
    low = _patch_mean(images, patch_size)
    out = _edit(
        distiller, x, ts, t_min, t_max, rho, steps, generator, lambda x0: patch_mean_replace(low, x0, patch_size)
    )
    return out, low


@torch.no_grad()
def iterative_inpainting(
    distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None, mask=None
):
    """Fill in the pixels of `images` where `mask` is 0 (1 marks known pixels). `mask` is a
    tensor broadcastable to the images ([H, W], [N, 1, H, W], ...) or None for the built-in "letter" mask."""
    if mask is None:
        mask = builtin_mask("letter", images.shape[-1])
    mask = mask.to(device=images.device, dtype=images.dtype)
    degraded = images * mask - (1 - mask)  # unknown pixels shown black
    out = _edit(distiller, x, ts, t_min, t_max, rho, steps, generator, lambda x0: degraded * mask + x0 * (1 - mask))
    return out, degraded


BUILTIN_MASKS = ("letter", "box", "half")


def builtin_mask(name, image_size):
    """An [H, W] float mask, 1 = known pixel: "letter" hides a large letter S (drawn with Pillow's
    own font, no font file needed), "box" the central square of half the side, "half" the right half."""
    mask = np.ones((image_size, image_size), dtype=np.float32)
    if name == "box":
        lo, hi = image_size // 4, image_size - image_size // 4
        mask[lo:hi, lo:hi] = 0
    elif name == "half":
        mask[:, image_size // 2 :] = 0
    elif name == "letter":
        canvas = Image.new("L", (32, 32), color=255)
        font = ImageFont.load_default(size=40)
        ImageDraw.Draw(canvas).text((16, 16), "S", font=font, fill=0, anchor="mm")
        letter = canvas.resize((image_size, image_size), Image.NEAREST)
        mask = (np.asarray(letter) > 127).astype(np.float32)
    else:
        raise ValueError(f"unknown built-in mask {name!r}; choose one of {', '.join(BUILTIN_MASKS)}")
    return torch.from_numpy(mask)


def load_mask(path, image_size):
    """An [H, W] mask from an image file: white (>= 128) = known pixel, black = to fill in."""
    try:
        img = Image.open(path).convert("L")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read mask image {path}: {err}") from err
    img = img.resize((image_size, image_size), Image.NEAREST)
    return torch.from_numpy((np.asarray(img) >= 128).astype(np.float32))


def slerp(z0, z1, alpha):
    """Spherical linear interpolation between noise tensors (per sample), alpha in [0, 1]."""
    a = z0.flatten(1)
    b = z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(torch.clamp(cos, -1.0, 1.0))
    theta = theta.view(-1, *([1] * (z0.ndim - 1)))
    sin = torch.sin(theta)
    spherical = (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / sin.clamp(min=1e-12)
    return torch.where(sin > 1e-6, spherical, (1 - alpha) * z0 + alpha * z1)  # parallel noises: straight line


@torch.no_grad()
def interpolation(
    distiller, z0, z1, num_points, ts=None, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None
):
    """Samples along the spherical path between two standard-normal noises z0 and z1 ([1, C, H, W] each):
    returns num_points images, endpoints included (CM paper, Figure 6 interpolation).
    `ts` defaults to one step, (0, steps - 1)."""
    ts = (0, steps - 1) if ts is None else ts
    alphas = torch.linspace(0, 1, num_points, dtype=z0.dtype, device=z0.device)
    path = torch.cat([slerp(z0, z1, a) for a in alphas.tolist()], dim=0)
    return multistep_consistency_loop(distiller, path * t_max, ts, generator, t_min, t_max, rho, steps)
