"""DINOv2 ViT-L/14 (Oquab et al. 2023), built here so that FD_DINOv2 needs no code from the Hub: the network of
facebookresearch/dinov2's `dinov2_vitl14` (the one dgm-eval and EDM2 load through torch.hub), with the parameter
names and shapes of its checkpoint `dinov2_vitl14_pretrain.pth`, so that file loads strictly.

Architecture (dinov2 hub settings for vitl14): 14x14 patches, width 1024, 24 blocks of 16 heads, MLP 4096 with exact
GELU, qkv and projection biases, LayerScale on both branches, LayerNorm eps 1e-6, no register tokens; position
embeddings stored for a 37x37 grid (518 px) and resampled to the input's grid as dinov2 does (bicubic, no antialias,
scale factor (n + 0.1) / 37); the output is the class token after the final norm.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

VITL14 = dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, patch_size=14, stored_grid=37)
INTERPOLATE_OFFSET = 0.1  # dinov2's interpolate_offset for the models without registers


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    def __init__(self, embed_dim, depth, num_heads, mlp_ratio, patch_size, stored_grid):
        super().__init__()
        self.patch_size, self.stored_grid = patch_size, stored_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, stored_grid * stored_grid + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # (training only; in the checkpoint)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolated_pos_embed(self, grid):
        """The stored position embeddings resampled to a grid x grid input, as dinov2's interpolate_pos_encoding."""
        pos = self.pos_embed.float()
        if grid == self.stored_grid:
            return pos
        dim, m = pos.shape[-1], self.stored_grid
        patches = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        scale = (grid + INTERPOLATE_OFFSET) / m
        patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
        return torch.cat([pos[:, :1], patches], dim=1)

    def forward(self, x):
        """Normalised images NCHW (sides a multiple of 14, square) -> the final-norm class token [N, dim]."""
        grid = x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolated_pos_embed(grid).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]
