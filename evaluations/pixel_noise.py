"""High-frequency energy of images: a measure that sees pixel noise, which classifier features ignore.

A classifier's features (the digits extractor, Inception) are built to be invariant to pixel-level
speckle, so a batch of recognisable digits covered in coloured noise still scores a good FID. The
high-frequency energy is the mean squared difference between an image and its 3x3 box blur (each
channel separately, values in [0, 1], edges replicated): uncorrelated noise of standard deviation s
adds about (8/9) s^2 to it, while the smooth real digits have little. Reported as the ratio of a
sample batch's energy to the reference batch's: about 1 for samples as smooth as the data, above 1
for noisy ones (grainy or coloured speckle), below 1 for over-smoothed ones.
"""

import numpy as np
import torch
import torch.nn.functional as F

from evaluations.evaluator import NpzImageReader


def high_frequency_energy_batch(images):
    """Per-image high-frequency energy of uint8 NHWC images, as a float64 numpy array."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255.0
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel_size=3, stride=1)
    return ((x - blurred) ** 2).mean(dim=(1, 2, 3)).numpy()


def high_frequency_energy(npz_path, batch_size=1000):
    """The mean high-frequency energy of the images (arr_0) of an .npz batch, read in batches."""
    total, count = 0.0, 0
    with NpzImageReader(npz_path) as reader:
        for batch in reader.read_batches(batch_size):
            total += float(high_frequency_energy_batch(batch).sum())
            count += len(batch)
    return total / count


def high_frequency_ratio(ref, sample_npz):
    """The sample batch's high-frequency energy over the reference batch's (`ref`: its .npz, or its
    energy already computed, so several sample batches need not re-read it)."""
    ref_energy = ref if isinstance(ref, float) else high_frequency_energy(ref)
    if ref_energy == 0:
        raise ValueError(f"the reference batch {ref} has no high-frequency energy (flat images); no ratio to it")
    return high_frequency_energy(sample_npz) / ref_energy
