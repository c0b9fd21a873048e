"""edm2: EDM2's magnitude-preserving U-Net (Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving
the Training Dynamics of Diffusion Models", CVPR 2024, Fig. 21 and App. B), with its preconditioning's uncertainty
head. Read from NVlabs/edm2 training/networks_edm2.py and written anew; the parameter and buffer names are NVlabs'
Precond's (unet.*, logvar_fourier.*, logvar_linear.*), so their weights load strictly.

Every layer keeps unit magnitude: weights normalised to unit norm per output channel (forced weight normalisation:
the stored weights are renormalised in place at each training forward, eq. 66, and normalised again where used,
eq. 47), SiLU divided by its output magnitude (eq. 81), residual sums and skip concatenations weighted to preserve
magnitude (eqs. 88, 103), Fourier features of the noise level (eq. 75), a learned output gain starting at 0.

Called as every network here, net(x, timesteps, y): timesteps are EDM2's c_noise = ln(sigma) / 4 (--c_noise edm),
y the class labels (one-hot inside, as NVlabs' label input; y = num_classes, with --null_class, the zero vector: no
class, as NVlabs' unconditional input). It keeps float32 weights and runs its torso in the dtype convert_to_fp16 /
convert_to_bf16 choose, casting weights where used (as NVlabs' use_fp16): it is its own master copy.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adm import parse_attention_resolutions, parse_channel_mult

FLAGS = {
    "image_channels": (3, "channels of the data the network sees (SD-VAE latents: 4)"),
    "edm2_label_balance": (0.5, "EDM2: balance of the noise (0) and class (1) embeddings"),
    "edm2_concat_balance": (0.5, "EDM2: balance of the skip connections (0) and the main path (1)"),
    "edm2_res_balance": (0.3, "EDM2: balance of a block's main (0) and residual (1) branches"),
    "edm2_attn_balance": (0.3, "EDM2: balance of a block's main branch (0) and self-attention (1)"),
    "edm2_channels_per_head": (64, "EDM2: channels per attention head"),
    "edm2_logvar_channels": (128, "EDM2: Fourier features of the uncertainty head u(sigma)"),
    "edm2_time_embedding": ("fourier", "EDM2: the time embedding: fourier (NVlabs') | positional (sCM's, FastGen's)"),
    "edm2_fourier_bandwidth": (1.0, "EDM2: the Fourier embedding's frequency scale (NVlabs: 1)"),
    "edm2_dropout_resolutions": ("", "EDM2: resolutions whose blocks apply dropout; empty: all (FastGen's sCM XL: 16,8)"),
}
# the flags edm2 shares with adm (same meaning); EDM2's own values come with its presets (configs/base/edm2_*.json)
SHARED = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "dropout",
          "class_cond", "num_classes", "null_class", "use_fp16", "use_bf16", "double_norm", "time_inputs")
TIME_EMBEDDINGS = ("fourier", "positional")
DEFAULT_CHANNEL_MULT = (1, 2, 3, 4)  # UNet's channel_mult; its num_blocks 3, attn_resolutions (16, 8)

# NVlabs/edm2 train_edm2.py config_presets (channels, dropout) at 64x64: img512 on SD-VAE latents (4 channels),
# img64 on pixels (3)
CONFIGS = {
    **{f"img512-{size}": dict(image_channels=4, num_channels=channels, dropout=dropout) for size, channels, dropout in (
        ("xs", 128, 0.0), ("s", 192, 0.0), ("m", 256, 0.1), ("l", 320, 0.1), ("xl", 384, 0.1), ("xxl", 448, 0.1))},
    **{f"img64-{size}": dict(image_channels=3, num_channels=channels, dropout=dropout) for size, channels, dropout in (
        ("s", 192, 0.0), ("m", 256, 0.1), ("l", 320, 0.1), ("xl", 384, 0.1))},
}


def config_flags(name):
    """The network flags of published configuration `name` (img512-xs ... img64-xl), class-conditional on ImageNet."""
    if name not in CONFIGS:
        raise ValueError(f"unknown EDM2 configuration {name!r}; choose one of {', '.join(CONFIGS)}")
    return dict(image_size=64, channel_mult="1,2,3,4", num_res_blocks=3, attention_resolutions="16,8", class_cond=True,
                num_classes=1000, **CONFIGS[name])


def normalize(x, dim=None, eps=1e-4):
    """x scaled to unit magnitude (root mean square 1) over `dim` (all but the first by default), eq. 47's norm."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x):
    """Magnitude-preserving SiLU (eq. 81): SiLU of a unit normal has magnitude 0.596."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving weighted sum (eq. 88): (1 - t) a + t b, rescaled for uncorrelated unit inputs."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation (eq. 103): the parts weighted (1 - t) and t, per channel."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([scale / math.sqrt(na) * (1 - t) * a, scale / math.sqrt(nb) * t * b], dim=dim)


def resample(x, mode):
    """2x box-filter down- or upsampling per channel ([1, 1] filter), or x as it is."""
    if mode == "keep":
        return x
    c = x.shape[1]
    box = torch.full((c, 1, 2, 2), 0.25, dtype=x.dtype, device=x.device)
    if mode == "down":
        return F.conv2d(x, box, groups=c, stride=2)
    return F.conv_transpose2d(x, box * 4, groups=c, stride=2)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(2 pi (f x + phi)) (eq. 75), f ~ N(0, bandwidth^2) fixed."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class PositionalEmbedding(nn.Module):
    """[cos(x f), sin(x f)] with f = (1 / 10000)^(i / (C/2 - endpoint)), i < C/2: the transformer's embedding of the
    time input, which sCM puts in place of EDM2's Fourier features (Lu & Song 2025, Sec. 4.1; FastGen's EDM2 option)."""

    def __init__(self, num_channels, endpoint=False):
        super().__init__()
        self.num_channels, self.endpoint = num_channels, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint)))
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def time_embedding(kind, num_channels, bandwidth, endpoint=False):
    return MPFourier(num_channels, bandwidth) if kind == "fourier" else PositionalEmbedding(num_channels, endpoint)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or linear layer (kernel []) (eq. 47), with forced weight
    normalisation (eq. 66): the stored weights are renormalised at the first forward that trains (grad enabled,
    training mode) after they changed (an optimizer step), so the optimizer never sees their norm grow; a second use in
    the same step (the uncertainty head, a method's second pass) finds them normalised and leaves them be."""

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._normalized_version = None  # the weight's version counter when last renormalised here

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training and torch.is_grad_enabled() and self.weight._version != self._normalized_version:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
            self._normalized_version = self.weight._version
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """An encoder ("enc") or decoder ("dec") block (Fig. 21): optional resampling, a residual branch modulated by the
    embedding, magnitude-preserving sum, optional self-attention with pixel-normalised q, k, v, activations clipped."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep", attention=False,
                 channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256, double_norm=False):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.double_norm = double_norm
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels * (2 if double_norm else 1), kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        if self.double_norm:  # sCM's adaptive double normalisation (ours for EDM2): pnorm(scale) y + pnorm(shift)
            scale, shift = (normalize(c, dim=1)[:, :, None, None].to(y.dtype) for c in self.emb_linear(emb).chunk(2, dim=1))
            y = mp_silu(y * scale + shift)
        else:
            c = self.emb_linear(emb, gain=self.emb_gain) + 1
            y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm, then split
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = self.attn_proj(torch.einsum("nhqk,nhck->nhcq", w, v).reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)
        return x.clip(-self.clip_act, self.clip_act) if self.clip_act is not None else x


class UNet(nn.Module):
    """EDM2's U-Net (Fig. 21): an encoder of Blocks per resolution, a decoder with magnitude-preserving skip
    concatenation, the noise and class embeddings summed magnitude-preservingly, a constant input channel."""

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=DEFAULT_CHANNEL_MULT,
                 num_blocks=3, attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5, time_embedding_kind="fourier",
                 fourier_bandwidth=1.0, time_inputs=1, dropout=0.0, dropout_resolutions=None, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = time_embedding(time_embedding_kind, cnoise, fourier_bandwidth)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        if time_inputs == 2:  # a flow map's second time (t - r): its own embedding, summed (FastGen's r_timestep)
            self.emb_fourier_r = time_embedding(time_embedding_kind, cnoise, fourier_bandwidth)
            self.emb_noise_r = MPConv(cnoise, cemb, kernel=[])
        self.time_inputs = time_inputs
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        def block(res, *args, **kwargs):
            drop = dropout if dropout_resolutions is None or res in dropout_resolutions else 0.0
            return Block(*args, dropout=drop, **kwargs, **block_kwargs)

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = block(res, cout, cout, cemb, flavor="enc", resample_mode="down")
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = block(res, cin, cout, cemb, flavor="enc", attention=res in attn_resolutions)
        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = block(res, cout, cout, cemb, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(res, cout, cout, cemb, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(res, cout, cout, cemb, flavor="dec", resample_mode="up")
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = block(res, cin, cout, cemb, flavor="dec", attention=res in attn_resolutions)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        if self.time_inputs == 2:  # (t, t - r)
            emb = mp_sum(self.emb_noise(self.emb_fourier(noise_labels[:, 0])),
                         self.emb_noise_r(self.emb_fourier_r(noise_labels[:, 1])), t=0.5)
        else:
            emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2(nn.Module):
    """The network of NVlabs' Precond without its preconditioning (cm.denoiser applies the same c_skip, c_out, c_in,
    c_noise with --c_noise edm): the U-Net, and the uncertainty head logvar(timesteps) (eq. 21's u(sigma))."""

    float32_weights = True  # (cm.train_util.Precision: no float32 master copy needed under fp16)

    def __init__(self, image_size, image_channels, num_classes, class_cond, null_class, logvar_channels=128, **unet_kwargs):
        super().__init__()
        self.num_classes = num_classes if class_cond else 0
        self.null_class = null_class
        self.dtype = torch.float32
        self.unet = UNet(img_resolution=image_size, img_channels=image_channels, label_dim=self.num_classes, **unet_kwargs)
        self.logvar_fourier = time_embedding(unet_kwargs.get("time_embedding_kind", "fourier"), logvar_channels,
                                             unet_kwargs.get("fourier_bandwidth", 1.0), endpoint=True)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, timesteps, y=None):
        if (y is None) != (self.num_classes == 0):
            raise ValueError("labels y must be given if and only if the network is class-conditional")
        dtype = torch.float64 if x.dtype == torch.float64 else self.dtype  # (float64: the tests' derivatives)
        labels = None
        if y is not None:  # float32 as NVlabs' (float64 in float64 tests)
            labels = F.one_hot(y.long(), self.num_classes + int(self.null_class))[:, : self.num_classes]
            labels = labels.to(x.device, torch.float64 if dtype == torch.float64 else torch.float32)
        out = self.unet(x.to(dtype), timesteps, labels).to(x.dtype)
        if self.training and torch.is_grad_enabled():  # the uncertainty head takes part with weight 0: data-parallel
            out = out + 0 * self.logvar(timesteps).sum()  # training finds every weight used, read by the loss or not
        return out

    def logvar(self, timesteps):
        """The uncertainty u(sigma) per sample (EDM2's loss weighting: e^-u ||D - x||^2 + u), of the first time input."""
        return self.logvar_linear(self.logvar_fourier(timesteps if timesteps.ndim == 1 else timesteps[:, 0])).reshape(-1)

    def convert_to_fp16(self):
        """Run the torso in float16, its weights kept in float32 and cast where used (NVlabs' use_fp16)."""
        self.dtype = torch.float16

    def convert_to_bf16(self):
        self.dtype = torch.bfloat16

    def convert_to_fp32(self):
        self.dtype = torch.float32


def build(image_size, image_channels, num_channels, num_res_blocks, channel_mult, attention_resolutions, dropout, class_cond,
          num_classes, null_class, use_fp16, use_bf16, double_norm, time_inputs, edm2_label_balance, edm2_concat_balance,
          edm2_res_balance, edm2_attn_balance, edm2_channels_per_head, edm2_logvar_channels, edm2_time_embedding,
          edm2_fourier_bandwidth, edm2_dropout_resolutions):
    if edm2_time_embedding not in TIME_EMBEDDINGS:
        raise ValueError(f"unknown --edm2_time_embedding {edm2_time_embedding!r}; choose one of {', '.join(TIME_EMBEDDINGS)}")
    if time_inputs not in (1, 2):
        raise ValueError(f"--network edm2 takes one or two time inputs (--time_inputs), got {time_inputs}")
    mult = DEFAULT_CHANNEL_MULT if channel_mult in ("", None) else parse_channel_mult(channel_mult, image_size)
    if image_size < 1 or image_size % 2 ** (len(mult) - 1):
        raise ValueError(f"--image_size {image_size} cannot be halved {len(mult) - 1} times (--channel_mult "
                         f"{','.join(map(str, mult))}); pass a multiple of {2 ** (len(mult) - 1)}")

    def resolutions(text):  # pixel resolutions, checked against the network's (adm's parser gives downsample rates)
        return tuple(image_size // rate for rate in parse_attention_resolutions(text, image_size, len(mult)))

    model = EDM2(image_size, image_channels, num_classes, class_cond, null_class, logvar_channels=edm2_logvar_channels,
                 model_channels=num_channels, channel_mult=mult, num_blocks=num_res_blocks,
                 attn_resolutions=resolutions(attention_resolutions), label_balance=edm2_label_balance,
                 concat_balance=edm2_concat_balance, channels_per_head=edm2_channels_per_head, dropout=dropout,
                 dropout_resolutions=resolutions(edm2_dropout_resolutions) if edm2_dropout_resolutions else None,
                 res_balance=edm2_res_balance, attn_balance=edm2_attn_balance, double_norm=double_norm,
                 time_embedding_kind=edm2_time_embedding, fourier_bandwidth=edm2_fourier_bandwidth, time_inputs=time_inputs)
    if use_fp16:
        model.convert_to_fp16()
    elif use_bf16:
        model.convert_to_bf16()
    return model
