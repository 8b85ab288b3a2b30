"""Small Vision Transformer, from "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale" (Dosovitskiy et al., ICLR 2021), pre-norm blocks as in timm.

``attention`` picks one of three common ways to write self-attention: ``"mha"`` uses
``nn.MultiheadAttention``; ``"sdpa"`` a fused qkv Linear and ``F.scaled_dot_product_attention``;
``"manual"`` the same qkv layout with an explicit softmax(q k^T / sqrt(d)) v.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class Attention(nn.Module):
    """timm-style attention on a fused qkv projection, laid out as [B, T, 3, H, D]."""

    def __init__(self, dim: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, T, D]
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, T, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "mha") -> None:
        super().__init__()
        self.attention = attention
        self.norm1 = nn.LayerNorm(dim)
        if attention == "mha":
            self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        elif attention in ("sdpa", "manual"):
            self.attn = Attention(dim, num_heads, fused=attention == "sdpa")
        else:
            raise ValueError(f"attention must be 'mha', 'sdpa' or 'manual', got {attention!r}")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        if self.attention == "mha":
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
        else:
            x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 8, in_chans: int = 3, num_classes: int = 10,
                 embed_dim: int = 48, depth: int = 2, num_heads: int = 3, mlp_ratio: float = 4.0,
                 attention: str = "mha") -> None:
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, num_patches, C]
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def build(num_classes: int = 10, width: float = 1.0, attention: str = "mha", depth: int = 2,
          num_heads: int = 3, patch_size: int = 8, img_size: int = 32) -> nn.Module:
    """Build a small ViT; ``width`` scales the per-head dim (16 at 1.0) so heads stay whole."""
    embed_dim = num_heads * max(1, int(round(16 * width)))
    return VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, attention=attention)


def example_inputs(batch: int = 2) -> tuple[Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)
