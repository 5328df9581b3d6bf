"""Transformer pieces shared by the UniTok and DualToken tokenizers: a GeGLU MLP, a pre-norm ViT block, and
UniTok's attention projection (the layer that changes width around a quantizer).

Tokens are ``[B, N, C]`` throughout. Attention runs through ``F.scaled_dot_product_attention`` so every
backend (flash / memory-efficient / math) is available; nothing here keeps a position embedding (UniTok's
ViT has none: position comes from its conv stem).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MlpNorm = Literal["hidden", "input"]
"""Where :class:`GeGLU` puts its LayerNorm: ``"hidden"`` on the gated hidden (``[..., hidden]``, this
project's original layout), ``"input"`` on the MLP's input (``[..., dim]``, the published UniTok / DualToken
``GeGluMlp``)."""

MLP_NORMS: tuple[str, ...] = ("hidden", "input")


class GeGLU(nn.Module):
    """ViTamin's GeGLU MLP with ``[a, b] = fc1(x)`` split in halves (value, gate); ``hidden`` is the width after
    gating (``fc1`` produces twice that).

    ``norm="hidden"``: ``fc2(norm(a * gelu_tanh(b)))`` (``norm`` over ``hidden`` channels);
    ``norm="input"``: ``fc2(a' * gelu_tanh(b'))`` with ``[a', b'] = fc1(norm(x))`` (``norm`` over ``dim``
    channels), the published ``GeGluMlp`` whose ``w1`` / ``w0`` are ``fc1``'s value / gate halves.
    """

    def __init__(self, dim: int, hidden: int, *, norm: MlpNorm = "hidden", eps: float = 1e-5) -> None:
        super().__init__()
        if norm not in MLP_NORMS:
            raise ValueError(f"GeGLU norm must be one of {MLP_NORMS}, got {norm!r}")
        self.norm_input = norm == "input"
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.norm = nn.LayerNorm(dim if self.norm_input else hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_input:
            value, gate = self.fc1(self.norm(x)).chunk(2, dim=-1)
            return self.fc2(value * F.gelu(gate, approximate="tanh"))
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.norm(value * F.gelu(gate, approximate="tanh")))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads  # explicit: an empty batch cannot infer it
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + GeGLU(norm2(x))``; ``eps`` is every
    LayerNorm's epsilon (norm1, norm2 and the GeGLU's; timm's ViT uses 1e-6), ``mlp_norm`` see :class:`GeGLU`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 2.0,
        *,
        causal: bool = False,
        mlp_norm: MlpNorm = "hidden",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads, causal=causal)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = GeGLU(dim, int(dim * mlp_ratio), norm=mlp_norm, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ProjectionAttention(nn.Module):
    """Attention that maps ``in_dim`` tokens to ``out_dim`` tokens (UniTok's factorised projection).

    Narrowing (``in_dim > out_dim``): heads of ``in_dim / num_heads`` channels are *averaged* (then pooled to
    ``out_dim`` if they are wider); widening: heads of ``out_dim / num_heads`` channels are concatenated. The
    key bias is fixed at zero (it cancels in the softmax; UniTok keeps only query and value biases).
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, *, causal: bool = False) -> None:
        super().__init__()
        self.narrowing = in_dim > out_dim
        inner = in_dim if self.narrowing else out_dim
        if inner % num_heads:
            raise ValueError(f"projection width {inner} is not divisible by {num_heads} heads")
        self.num_heads, self.out_dim, self.causal = num_heads, out_dim, causal
        self.head_dim = inner // num_heads
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, heads, N, head_dim]
        if self.narrowing:
            out = out.mean(dim=1)
            if self.head_dim != self.out_dim:
                out = F.adaptive_avg_pool1d(out, self.out_dim)
        else:
            out = out.transpose(1, 2).reshape(batch, length, self.out_dim)
        return self.proj(out)


class AttnProjection(nn.Module):
    """UniTok's width-changing block before and after the quantizer:
    ``y = proj(norm3(x)) + attn(norm1(x))`` (a linear shortcut plus :class:`ProjectionAttention`), then
    ``y + GeGLU(norm2(y))`` with a GeGLU twice as wide as ``out_dim``. ``causal`` gives the variant of UniTok's
    first checkpoint and of its MLLM side (each position sees only the ones before it). ``mlp_norm`` and
    ``mlp_eps`` shape the GeGLU (:class:`GeGLU`); norm1/2/3 keep torch's default epsilon (1e-5), as published."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        mlp_norm: MlpNorm = "hidden",
        mlp_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = ProjectionAttention(in_dim, out_dim, num_heads, causal=causal)
        self.norm3 = nn.LayerNorm(in_dim)
        self.shortcut = nn.Linear(in_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGLU(out_dim, 2 * out_dim, norm=mlp_norm, eps=mlp_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shortcut(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_transformer_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear weights, zero biases, unit layer norms (the ViT / UniTok initialisation)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
