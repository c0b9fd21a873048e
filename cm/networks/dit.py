"""dit: the Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023), read from
facebookresearch/DiT models.py and written anew, with its parameter names (x_embedder, t_embedder, y_embedder, blocks,
final_layer) so its checkpoints' state dicts load: patches of the input embedded linearly with fixed 2-D sine-cosine
positions, transformer blocks conditioned by adaLN-Zero (a shift, scale and gate per sublayer from the time and class
embedding, the gates and the output layer zero at start, so the network starts as the zero function), the tokens
projected back to patches.

Called as every network here, net(x, timesteps, y): timesteps [N] (or [N x 2], a flow map's (t, t - r), the second
embedded by its own embedder and added: MeanFlow's DiT); y the class labels, y = num_classes the learned null class
when --null_class (classifier-free guidance). Attention is PyTorch's scaled_dot_product_attention: its fused kernels
where they run, its math backend inside a forward-mode JVP (cm/jvp.py selects it), which has the forward-mode rule.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FLAGS = {
    "dit_depth": (12, "DiT: transformer blocks (S, B: 12; L: 24; XL: 28)"),
    "dit_hidden_size": (768, "DiT: token width (S 384, B 768, L 1024, XL 1152)"),
    "dit_num_heads": (12, "DiT: attention heads (S 6, B 12, L 16, XL 16)"),
    "dit_patch_size": (2, "DiT: patch side (2, 4 or 8)"),
    "dit_mlp_ratio": (4.0, "DiT: MLP width over token width"),
}
# the flags dit shares with the other networks (same meaning)
SHARED = ("image_size", "image_channels", "class_cond", "num_classes", "null_class", "time_inputs", "use_fp16", "use_bf16")
# facebookresearch/DiT models.py DiT_models: (depth, hidden size, heads) by size; each with patch 2, 4 or 8
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
CONFIGS = {f"DiT-{size}/{patch}": dict(dit_depth=d, dit_hidden_size=h, dit_num_heads=n, dit_patch_size=patch)
           for size, (d, h, n) in SIZES.items() for patch in (2, 4, 8)}


def config_flags(name):
    """The network flags of DiT configuration `name` (DiT-S/2 ... DiT-XL/8)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown DiT configuration {name!r}; choose one of {', '.join(CONFIGS)}")
    return dict(CONFIGS[name])


def sincos_2d(dim, grid):
    """The fixed 2-D sine-cosine position embedding of a grid x grid of tokens [grid^2 x dim] (MAE's, as DiT uses):
    half the channels encode the row, half the column, each as [sin, cos] of position x 10000^(-i / (dim / 4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def encode(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([encode(rows), encode(cols)], axis=1)  # (meshgrid's first output varies along columns)


def timestep_frequencies(t, dim, max_period=10000):
    """[cos(t f), sin(t f)], f = max_period^(-i / (dim / 2)): the transformer's sinusoidal embedding of a time."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # (float64: the tests' derivatives)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t[:, None].to(dtype) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens by one strided convolution (timm's PatchEmbed: `proj`)."""

    def __init__(self, patch, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """A time to a token-wide vector: sinusoidal features (256) through a two-layer MLP."""

    def __init__(self, dim, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_frequencies(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A class label to a token-wide vector (a table; with a null class, one more row: DiT's classifier-free guidance)."""

    def __init__(self, num_labels, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_labels, dim)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention (timm's layout: a fused qkv projection and an output projection, both with bias)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """x + gate * attention(modulate(norm(x))), then x + gate * MLP(modulate(norm(x))): adaLN-Zero (DiT, Sec. 3.2)."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, image_size, image_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio=4.0,
                 num_classes=0, null_class=False, time_inputs=1):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"--image_size {image_size} is not a multiple of --dit_patch_size {patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"--dit_hidden_size {hidden_size} must divide by --dit_num_heads {num_heads} and by 4")
        self.image_channels, self.patch_size, self.num_classes = image_channels, patch_size, num_classes
        self.dtype = torch.float32
        self.x_embedder = PatchEmbed(patch_size, image_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if time_inputs == 2:
            self.r_embedder = TimestepEmbedder(hidden_size)  # the second time, t - r
        self.time_inputs = time_inputs
        self.y_embedder = LabelEmbedder(num_classes + int(null_class), hidden_size) if num_classes else None
        grid = image_size // patch_size
        # fixed, not trained (DiT keeps it as a frozen parameter; a buffer here, under the same name)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(hidden_size, grid)).float()[None])
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, image_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: Xavier-uniform linear layers with zero biases, the patch embedding as a linear layer,
        the label and time embedders N(0, 0.02^2), and every adaLN modulation and the output layer zero (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, getattr(self, "r_embedder", None)):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for block in [*self.blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """[N x T x p^2 C] tokens back to [N x C x H x W] images."""
        n, tokens, _ = x.shape
        p, c, grid = self.patch_size, self.image_channels, int(math.isqrt(x.shape[1]))
        x = x.reshape(n, grid, grid, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, grid * p, grid * p)

    def forward(self, x, timesteps, y=None):
        if (y is None) != (self.y_embedder is None):
            raise ValueError("labels y must be given if and only if the network is class-conditional")
        dtype = torch.float64 if x.dtype == torch.float64 else self.dtype
        h = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)
        if self.time_inputs == 2:
            c = self.t_embedder(timesteps[:, 0]) + self.r_embedder(timesteps[:, 1])
        else:
            c = self.t_embedder(timesteps)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        c = c.to(dtype)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c)).to(x.dtype)

    def convert_to_fp16(self):
        """Run the blocks in float16 (embeddings, norms and the output layer included: a transformer has no float32
        head to keep); the scripts' loss scaling keeps float32 master weights."""
        self.to(torch.float16)
        self.dtype = torch.float16

    def convert_to_bf16(self):
        self.to(torch.bfloat16)
        self.dtype = torch.bfloat16

    def convert_to_fp32(self):
        self.to(torch.float32)
        self.dtype = torch.float32


def build(image_size, image_channels, class_cond, num_classes, null_class, time_inputs, use_fp16, use_bf16, dit_depth,
          dit_hidden_size, dit_num_heads, dit_patch_size, dit_mlp_ratio):
    if time_inputs not in (1, 2):
        raise ValueError(f"--network dit takes one or two time inputs (--time_inputs), got {time_inputs}")
    model = DiT(image_size, image_channels, dit_patch_size, dit_hidden_size, dit_depth, dit_num_heads, dit_mlp_ratio,
                num_classes=num_classes if class_cond else 0, null_class=null_class, time_inputs=time_inputs)
    if use_fp16:
        model.convert_to_fp16()
    elif use_bf16:
        model.convert_to_bf16()
    return model
