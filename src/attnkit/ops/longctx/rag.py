"""Block-Attention for RAG (Sun et al., "Block-Attention for Efficient RAG", 2024), Sec. 3.2: a retrieved
passage's keys are computed once with positions starting at 0 and cached; when the passage lands at offset
``delta`` of a new prompt, its cached RoPE keys are re-rotated instead of recomputed, because rotary embeddings
compose: ``RoPE(k, p + delta) = R(delta) RoPE(k, p)``."""

from __future__ import annotations

import torch

from attnkit.ops.exact.variants import rerotate
from attnkit.rotary import RotaryEmbedding

__all__ = ["rerotate_keys"]


def rerotate_keys(k: torch.Tensor, delta: int, rotary: RotaryEmbedding) -> torch.Tensor:
    """Keys ``[batch, kv_heads, seq, dim]`` rotated at positions ``p`` -> the same keys rotated at ``p + delta``
    (``delta`` may be negative). Angles are computed in float64, so re-rotation matches rotating in place to the
    precision of ``k``'s dtype."""
    if k.dim() != 4:
        raise ValueError(f"k must be [batch, kv_heads, seq, dim], got shape {tuple(k.shape)}")
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise TypeError(f"delta must be an int (a position offset), got {delta!r}")
    return rerotate(k, delta, rotary)
