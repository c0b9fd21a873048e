"""The U-Net of the published consistency-model checkpoints (ADM / guided-diffusion architecture).

Parameter names and shapes are those of the published `edm_*`, `cd_*` and `ct_*` checkpoints, so
their state dicts load with strict=True. Attention runs through PyTorch's
scaled_dot_product_attention instead of flash-attn 0.2.8; its q/k/v channels keep the layout the
checkpoints were trained with: [q of all heads | k of all heads | v of all heads], each head's
channels contiguous inside its block.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import (
    FourierEmbedding,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    convert_module_to_dtype,
    input_tangents_only_active,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)



def pixel_norm(a, eps=1e-8):
    """a / sqrt(mean over channels of a^2 + eps) (Karras et al. 2018's pixel norm)."""
    return a * torch.rsqrt(a.float().square().mean(dim=1, keepdim=True) + eps).to(a.dtype)

class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x, emb):
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence that hands the timestep embedding to the children that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if hasattr(self, "conv"):
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 convolution, or average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, by addition or, with
    use_scale_shift_norm, by FiLM (norm(h) * (1 + scale) + shift), or with double_norm by sCM's adaptive double
    normalisation norm(h) * pnorm(scale) + pnorm(shift), pnorm the pixel norm over channels (Lu & Song 2025,
    Sec. 4.1; no parameters of its own); optionally resamples (up/down)."""

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        double_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        if double_norm and not use_scale_shift_norm:
            raise ValueError("double_norm normalises the scale and shift of use_scale_shift_norm; pass both")
        self.double_norm = double_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # resample between the activation and the convolution, on both branches
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out[(...,) + (None,) * (h.ndim - emb_out.ndim)]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            if self.double_norm:
                h = self.out_layers[0](h) * pixel_norm(scale) + pixel_norm(shift)
            else:
                h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head self-attention over a fused [N x 3*C x T] projection laid out as
    [q (heads x head_channels) | k (...) | v (...)]: the flash-attention layout of the published
    checkpoints. Runs through scaled_dot_product_attention (fused kernels accumulate the softmax
    in float32 for half-precision inputs); any head size. q, k and v are handed over with unit
    stride in the channel dimension, which every fused kernel (CPU flash, CUDA flash and
    memory-efficient) requires; otherwise SDPA silently falls back to its unfused math path."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 x {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        channels_last = qkv.stride(1) == 1  # from a convolution in the channels_last format
        # [N x T x 3C] with channels contiguous (free when channels_last)
        qkv = qkv.transpose(1, 2).contiguous()
        q, k, v = qkv.reshape(bs, length, 3, self.n_heads, ch).permute(2, 0, 3, 1, 4)
        if qkv.device.type == "cpu" and qkv.dtype != torch.float32 and qkv.requires_grad:
            # PyTorch's CPU flash-attention backward is slow in half precision (measured on 2 cores:
            # 8x float32's time at 64 tokens), so attention that will be differentiated runs in float32
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(qkv.dtype)
        elif input_tangents_only_active():
            # in cm.jvp's forward mode: softmax(q k^T / sqrt(ch)) v written out (SDPA's math path, which the fused
            # kernels leave for forward mode anyway, also tests every row for full masking: 4% of a JVP)
            out = torch.softmax(q @ (k.transpose(-1, -2) / math.sqrt(ch)), dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # [N x heads x T x ch], scale 1/sqrt(ch)
        # back to [N x C x T] in the input's layout (a channels_last input gets a view with contiguous channels)
        if channels_last:
            return out.transpose(1, 2).reshape(bs, length, self.n_heads * ch).transpose(1, 2)
        return out.permute(0, 1, 3, 2).reshape(bs, self.n_heads * ch, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: x + proj_out(attn(qkv(norm(x))))."""

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
        dims=2,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention channels {channels} are not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        # 1x1 convolutions of the image's own rank (Conv2d for images), as in the published checkpoints;
        # applied as matrix products (pointwise), which keep channels contiguous for the fused attention
        self.qkv = conv_nd(dims, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads)
        self.proj_out = zero_module(conv_nd(dims, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        qkv = pointwise(self.qkv, self.norm(x).reshape(b, c, -1))
        return x + pointwise(self.proj_out, self.attention(qkv)).reshape(b, c, *spatial)


def pointwise(conv, x):
    """A 1x1 convolution `conv` of x [N x C x T] as one matrix product over the N*T positions; the result
    is an [N x C' x T] view with contiguous channels, what the fused attention kernels take. At most one
    (transposing) copy of x: none when its channels are contiguous already (channels_last, attention output).
    Measured on the CPU: 3x faster than the convolution followed by the transpose that attention needs."""
    n, c, t = x.shape
    rows = x.transpose(1, 2).reshape(n * t, c)
    out = torch.addmm(conv.bias, rows, conv.weight.view(-1, c).t())
    return out.view(n, t, -1).transpose(1, 2)


class UNetModel(nn.Module):
    """The U-Net with timestep (and optional class) embedding.

    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which attention is used.
    :param channel_mult: channel multiplier of each resolution level.
    :param num_classes: class-conditional with this many classes when given.
    :param num_head_channels: fixed channels per head (overrides num_heads) when not -1.
    :param use_scale_shift_norm: FiLM conditioning in the residual blocks.
    :param double_norm: sCM's adaptive double normalisation of that conditioning (no parameters of its own).
    :param resblock_updown: residual blocks for up/downsampling instead of plain resampling.
    :param use_fp16, use_bf16: record that the caller will run the torso in that precision
        (convert_to_fp16 / convert_to_bf16 cast it, as published: construction stays float32).
    :param time_embed: "positional" (sinusoidal, the published checkpoints' parameter names) or
        "fourier" (random Fourier features of std `fourier_scale`, iCT's option; adds the buffer
        `time_fourier.freqs` to the state dict).
    :param time_inputs: the number K of times the network is conditioned on (timesteps [N x K] when K > 1): each
        is embedded alike and one MLP maps their features side by side, as the official Mean Flows U-Net conditions on
        (t, t - r); K = 1 is the published network.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        double_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        use_bf16=False,
        time_embed="positional",
        fourier_scale=0.02,
        time_inputs=1,
    ):
        super().__init__()
        if use_fp16 and use_bf16:
            raise ValueError("choose one of use_fp16 and use_bf16")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        if not (isinstance(time_inputs, int) and time_inputs >= 1):
            raise ValueError(f"time_inputs must be a positive integer, got {time_inputs!r}")
        self.time_inputs = time_inputs

        def res_block(ch_in, ch_out=None, **kw):
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                double_norm=double_norm,
                **kw,
            )

        def attention(ch, heads):
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
                dims=dims,
            )

        time_embed_dim = model_channels * 4
        if time_embed not in ("positional", "fourier"):
            raise ValueError(f"unknown time_embed {time_embed!r}; choose positional or fourier")
        self.time_fourier = FourierEmbedding(model_channels, fourier_scale) if time_embed == "fourier" else None
        self.time_embed = nn.Sequential(
            linear(model_channels * time_inputs, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch), attention(ch, num_heads), res_block(ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    @property
    def dtype(self):
        """The dtype the torso runs in (float32 until convert_to_fp16/convert_to_bf16)."""
        return self.input_blocks[0][0].weight.dtype

    def _convert_torso(self, dtype):
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(lambda m: convert_module_to_dtype(m, dtype))

    def convert_to_fp16(self):
        """Run the torso's convolutions in float16 (norms, embeddings and the output head stay float32)."""
        self._convert_torso(torch.float16)

    def convert_to_bf16(self):
        """As convert_to_fp16, in bfloat16."""
        self._convert_torso(torch.bfloat16)

    def convert_to_fp32(self):
        """Undo convert_to_fp16 / convert_to_bf16."""
        self._convert_torso(torch.float32)

    def time_features(self, timesteps):
        """The embedding features of the time input: [N x model_channels], or the K times' side by side."""
        if self.time_inputs == 1:
            return self.embed_time(timesteps)
        if timesteps.ndim != 2 or timesteps.shape[1] != self.time_inputs:
            raise ValueError(f"a network of time_inputs {self.time_inputs} takes timesteps of shape "
                             f"[N x {self.time_inputs}], got {tuple(timesteps.shape)}")
        return torch.cat([self.embed_time(t) for t in timesteps.unbind(1)], dim=1)

    def embed_time(self, t):
        if self.time_fourier is not None:
            return self.time_fourier(t)
        return timestep_embedding(t, self.model_channels)

    def forward(self, x, timesteps, y=None):
        """
        :param x: an [N x C x H x W] batch of inputs.
        :param timesteps: a 1-D batch of (fractional) timesteps; [N x K] with time_inputs K > 1.
        :param y: an [N] batch of labels, given if and only if the model is class-conditional.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "pass class labels y if and only if the model is class-conditional "
                f"(model num_classes={self.num_classes}, y given: {y is not None})"
            )
        emb = self.time_embed(self.time_features(timesteps).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))
