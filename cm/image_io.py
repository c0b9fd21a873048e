"""Writing results: sample batches as .npz and image grids as PNG, atomically."""

import math

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write


def to_uint8_nhwc(images):
    """[-1, 1] NCHW tensor -> uint8 NHWC numpy array, rounding as the published sampler does."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_npz(path, *arrays):
    """np.savez(path, arr_0, arr_1, ...) through a temporary file and a rename."""

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, *arrays)

    atomic_write(path, write)


def save_grid(images, path, nrow=None, pad=2, min_size=64):
    """Tile uint8 NHWC images into one PNG, nrow per row (default: a square), `pad` black pixels apart;
    images smaller than `min_size` pixels are enlarged (nearest neighbour) by a whole factor to be seen. Returns the
    grid (uint8 HWC)."""
    factor = max(1, -(-min_size // max(images.shape[1:3])))
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    atomic_write(path, Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save)
    return grid
