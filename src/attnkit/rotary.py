"""Rotary position embeddings ("RoFormer: Enhanced Transformer with Rotary Position Embedding", Su et al.)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x[..., :d/2], x[..., d/2:])`` of ``x [batch, heads, seq, dim]`` by the angles
    whose ``cos``/``sin`` are ``[seq, dim/2]`` (the "rotate half" layout of GPT-NeoX / Llama)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half: 2 * half]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half:]], dim=-1) if x.shape[-1] % 2 else rotated


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``[batch, heads, seq, dim]`` tensors at positions ``offset .. offset + seq - 1``."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"RotaryEmbedding(dim) must be >= 2, got {dim}")
        inv_freq = base ** (-torch.arange(0, dim // 2, dtype=torch.float32) / (dim // 2))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 angles: float32 loses the low bits of large positions (and of float64 inputs)
        freqs = positions.to(torch.float64)[:, None] * self.inv_freq.to(torch.float64)[None]
        return freqs.cos(), freqs.sin()

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device)
        cos, sin = self.angles(positions)
        return apply_rotary(x, cos, sin)
