"""Small layers and tensor helpers shared by the U-Net, the denoiser, the losses and the samplers."""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 precision whatever the input dtype, returned in the input's.
    On the CPU, PyTorch's kernel takes bf16/fp16 input with float32 weights and accumulates in float32
    itself: for bf16 bit for bit the result of casting around it, without the two casts (3x faster,
    measured), so there the input goes in as it is, autocast or not."""

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == torch.float32:
            with torch.autocast("cpu", enabled=False):
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


def normalization(channels):
    """The normalisation layer of every block: 32 groups."""
    return GroupNorm32(32, channels)


class _ConvWithInputTangent(torch.autograd.Function):
    """A convolution whose forward-mode tangent is conv(dx, W) alone: its weights are constants of the JVP, where
    PyTorch's rule also convolves x with their (zero) tangent, a third convolution of the same size."""

    @staticmethod
    def forward(x, weight, bias, layer):
        return layer._conv_forward(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight, ctx.layer = inputs[1], inputs[3]

    @staticmethod
    def jvp(ctx, dx, *_):
        return ctx.layer._conv_forward(dx, ctx.weight, None)


class _InputTangentOnly:
    """Whether the network is being differentiated along its inputs only (cm.jvp's forward mode: no autograd, the
    weights constant): its convolutions then take the cheaper tangent."""

    active = False


def input_tangents_only_active():
    """Whether the network runs inside input_tangents_only() (its layers may take their cheaper tangent)."""
    return _InputTangentOnly.active


@contextlib.contextmanager
def input_tangents_only():
    """Within: convolutions built by conv_nd compute their forward-mode tangent as conv(dx, W) only (cm.jvp)."""
    before, _InputTangentOnly.active = _InputTangentOnly.active, True
    try:
        yield
    finally:
        _InputTangentOnly.active = before


class _Conv:
    def forward(self, x):
        if _InputTangentOnly.active:
            return _ConvWithInputTangent.apply(x, self.weight, self.bias, self)
        return super().forward(x)


class Conv1d(_Conv, nn.Conv1d):
    pass


class Conv2d(_Conv, nn.Conv2d):
    pass


class Conv3d(_Conv, nn.Conv3d):
    pass


def conv_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D convolution (nn.ConvNd, with the cheaper tangent of input_tangents_only())."""
    layers = {1: Conv1d, 2: Conv2d, 3: Conv3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims} (use 1, 2 or 3)")
    return layers[dims](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D average pooling."""
    layers = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims} (use 1, 2 or 3)")
    return layers[dims](*args, **kwargs)


def linear(*args, **kwargs):
    return nn.Linear(*args, **kwargs)


def zero_module(module):
    """Zero the parameters of `module` (output convolutions start as the identity residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def convert_module_to_dtype(module, dtype):
    """Cast the weights of convolutions only, as the published mixed-precision recipe does:
    norms, linear layers and embeddings stay float32."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin] over geometric frequencies.

    :param timesteps: a 1-D tensor of N values.
    :return: an [N x dim] float32 tensor.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    embedding = sinusoidal_features(timesteps, freqs)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sinusoidal_features(x, freqs):
    """[cos(x f) | sin(x f)] of a 1-D batch x over frequencies f: an [N x 2F] float32 tensor (float64 for
    float64 x, so a float64 network stays float64 throughout)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    args = x[:, None].to(dtype) * freqs[None].to(dtype)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi f x) | sin(2 pi f x)] of the time input, f ~ N(0, scale^2) drawn
    once and kept as a buffer (saved with the weights): NCSN++'s noise embedding, which iCT uses with
    scale 0.02 instead of 16 to make the network less sensitive to the noise level (Song & Dhariwal 2023,
    Sec. 3.1). It takes the same input as the positional embedding, 250 ln sigma: our reading of iCT's
    remark that Fourier features of scale 0.02 are about as sensitive as the positional ones."""

    def __init__(self, dim, scale):
        super().__init__()
        if dim % 2:
            raise ValueError(f"Fourier time embedding needs an even width, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, x):
        return sinusoidal_features(x, 2 * math.pi * self.freqs)


def checkpoint(func, inputs, enabled):
    """Run func(*inputs), recomputing its activations in the backward pass when `enabled`
    (and gradients are being recorded) instead of storing them."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def mean_flat(tensor):
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def append_dims(x, target_dims):
    """Append trailing singleton dimensions to `x` until it has `target_dims` dimensions."""
    extra = target_dims - x.ndim
    if extra < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * extra]


def append_zero(x):
    """Append a trailing 0 to a 1-D tensor (the last sigma of a sampling schedule)."""
    return torch.cat([x, x.new_zeros([1])])
