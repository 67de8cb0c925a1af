"""S2-Attention (Lin et al., "Efficient LLM Training and Serving with Heterogeneous Context Sharding among
Attention Heads", 2024), Sec. 3: each head attends to a strided *shard* of the context with its own offset,
``{j <= i : (j + o_h) mod S = 0}``, plus a shared dense local window; with offsets covering every residue the
heads together see the whole context, while each head stores about ``1/S`` of the keys."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnkit import patterns as P

__all__ = ["s2_pattern", "s2_kv_fraction"]


def _offsets(num_heads: int, stride: int, offsets: Sequence[int] | None) -> torch.Tensor:
    if offsets is None:
        return torch.arange(num_heads) % stride  # heads cycle through the residues: their union covers all j
    off = torch.as_tensor(list(offsets), dtype=torch.long)
    if off.numel() != num_heads:
        raise ValueError(f"offsets must give one offset per head ({num_heads}), got {off.numel()}")
    return off % stride


def s2_pattern(num_heads: int, stride: int, window: int = 0, *, offsets: Sequence[int] | None = None,
               causal: bool = True) -> P.Pattern:
    """Head ``h`` sees keys ``j`` with ``(j + offsets[h]) % stride == 0`` or within ``window`` tokens before the
    query (``i - window < j <= i``), causally. ``offsets`` default ``h % stride``."""
    for name, val, low in (("num_heads", num_heads, 1), ("stride", stride, 1), ("window", window, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
    off = _offsets(num_heads, stride, offsets)
    copies: dict = {}

    def fn(b, h, qi, ki):
        dev = ki.device
        if dev not in copies:
            copies[dev] = off.to(dev)
        o = copies[dev]
        h = torch.as_tensor(h, device=dev)
        shard = ((ki + o[h]) % stride) == 0
        local = (ki > qi - window) & (ki <= qi)
        ok = shard | local
        return ok & (ki <= qi) if causal else ok

    return P.custom(fn, batch_dependent=False, head_dependent=True)


def s2_kv_fraction(seq_len: int, num_heads: int, stride: int, window: int = 0, *,
                   offsets: Sequence[int] | None = None) -> float:
    """Fraction of the dense KV cache that S2 keeps when decoding at position ``seq_len``: per head its shard
    plus the last ``window`` tokens (about ``1 / stride`` for a long context)."""
    off = _offsets(num_heads, stride, offsets)
    j = torch.arange(seq_len)
    kept = 0
    for h in range(num_heads):
        keep = (((j + off[h]) % stride) == 0) | (j >= seq_len - window)
        kept += int(keep.sum())
    return kept / (num_heads * seq_len)
