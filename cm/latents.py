"""SD-VAE latent space, as EDM2 uses it (NVlabs/edm2 training/encoders.py StabilityVAEEncoder, dataset_tool.py encode):
diffusers' AutoencoderKL (stabilityai/sd-vae-ft-mse by default) encodes pixels in [0, 1] to a Gaussian per image, whose
mean and standard deviation are stored (8 channels); each time an image is read for training a latent is drawn from it
and scaled channel by channel to mean 0, standard deviation 0.5 (EDM2's raw statistics of the VAE's latents); samples
are unscaled and decoded back to pixels.

The VAE is read with diffusers' from_pretrained (a Hugging Face name, found in its cache or downloaded, or a local
folder); offline and not cached, one line names what to download and where.
"""

import numpy as np
import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# EDM2's assumed statistics of the VAE's raw latents, and the statistics the scaled latents get
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN, FINAL_STD = 0.0, 0.5


def latent_scaling():
    """(scale, bias) per channel, float32 as EDM2 computes them: final = raw * scale + bias."""
    scale = np.float32(FINAL_STD) / np.asarray(RAW_STD, dtype=np.float32)
    return scale, np.float32(FINAL_MEAN) - np.asarray(RAW_MEAN, dtype=np.float32) * scale


def draw_latent(mean_std, noise):
    """A float32 latent drawn from a stored Gaussian [..., 2C, h, w] (mean, then std) with `noise` ~ N(0, I)
    [..., C, h, w], scaled as EDM2 scales them: (mean + std noise) scale + bias, per channel."""
    mean, std = np.split(np.asarray(mean_std, dtype=np.float32), 2, axis=-3)
    scale, bias = latent_scaling()
    return ((mean + std * noise) * scale[:, None, None] + bias[:, None, None]).astype(np.float32)


def load_vae(name, device="cpu"):
    """diffusers' AutoencoderKL `name` (a Hub name or a folder), eval mode, no gradient; one clear line offline."""
    from diffusers import AutoencoderKL

    try:
        try:
            vae = AutoencoderKL.from_pretrained(name, local_files_only=True)
        except OSError:
            vae = AutoencoderKL.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load the VAE {name!r} ({str(err).splitlines()[0][:160]}); on a connected machine run "
            f"`huggingface-cli download {name}` (it lands in the Hugging Face cache, $HF_HOME, by default "
            "~/.cache/huggingface/hub), or pass --latent_vae a local folder holding the VAE's config.json and weights"
        ) from None
    return vae.eval().requires_grad_(False).to(device)


class LatentCodec:
    """Pixels to stored latent statistics (encode_pixels), sampled latents to pixels (decode)."""

    def __init__(self, vae):
        self.vae = vae
        scale, bias = latent_scaling()
        self.scale, self.bias = torch.from_numpy(scale), torch.from_numpy(bias)

    @torch.no_grad()
    def encode_pixels(self, images):
        """uint8 NCHW images -> the VAE's per-image Gaussian, [N x 2C x h x w] (mean, then standard deviation)."""
        x = images.to(torch.float32) / 255  # (EDM2 encodes pixels in [0, 1])
        dist = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float().cpu()

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents [N x C x h x w] -> uint8 NHWC pixels (the VAE's output in [0, 1], EDM2's convention)."""
        shape = (1, -1, 1, 1)
        raw = (latents.float() - self.bias.view(shape).to(latents.device)) / self.scale.view(shape).to(latents.device)
        pixels = self.vae.decode(raw.to(self.vae.device, self.vae.dtype)).sample.float()
        return (pixels.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (truncated, as EDM2)
