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


class _S2(P.Pattern):
    """Head ``h`` allows key ``j`` when ``(j + offsets[h]) % stride == 0`` or ``pos - window < j <= pos`` (causal:
    and ``j <= pos``), with ``pos`` the query's absolute position (bottom-right alignment, as every pattern)."""

    head_dependent = True

    def __init__(self, offsets: torch.Tensor, stride: int, window: int, causal: bool):
        self.offsets, self.stride, self.window, self.causal = offsets, stride, window, causal
        self._copies: dict = {}

    def _off(self, device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = self.offsets.to(device)
        return self._copies[device]

    def check(self, q_len, kv_len, batch, heads):
        if heads != self.offsets.numel():
            raise ValueError(f"s2_pattern was built for {self.offsets.numel()} heads, the call has {heads}")

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        pos = q_idx + (kv_len - q_len)
        off = self._off(kv_idx.device)
        h = torch.as_tensor(h, device=kv_idx.device)
        shard = ((kv_idx + off[h]) % self.stride) == 0
        ok = shard | ((kv_idx > pos - self.window) & (kv_idx <= pos))
        return ok & (kv_idx <= pos) if self.causal else ok

    def __repr__(self):
        return f"s2(stride={self.stride}, window={self.window}, causal={self.causal})"


def s2_pattern(num_heads: int, stride: int, window: int = 0, *, offsets: Sequence[int] | None = None,
               causal: bool = True) -> P.Pattern:
    """Head ``h`` sees keys ``j`` with ``(j + offsets[h]) % stride == 0`` or within ``window`` tokens before the
    query (``i - window < j <= i``), causally; ``offsets`` default ``h % stride``. Every key tile holds shard keys,
    so the tiled engine skips only what causality skips: the mask is exact, the work is that of causal attention
    (the paper's 1/S saving needs its per-head gather kernel, DKernel, which attnkit does not have)."""
    for name, val, low in (("num_heads", num_heads, 1), ("stride", stride, 1), ("window", window, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
    return _S2(_offsets(num_heads, stride, offsets), stride, window, causal)


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
