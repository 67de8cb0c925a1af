"""The log-sum-exp of attention rows, materialised: the reference for ``attention(..., return_lse=True)``."""

from __future__ import annotations

import torch

from attnkit._checks import repeat_kv
from attnkit.patterns import Pattern
from attnkit.score_mods import ScoreMod

__all__ = ["reference_lse"]


def reference_lse(q: torch.Tensor, k: torch.Tensor, *, pattern: Pattern | None, score_mod: ScoreMod | None,
                  scale: float) -> torch.Tensor:
    """``log sum_j exp(s_ij)`` over the allowed keys of each row, ``s = score_mod(q k^T * scale)``:
    ``[batch, heads, q_len]`` in float32 (float64 for float64 inputs); ``-inf`` where a row has no allowed key."""
    b_, h_, q_len, _ = q.shape
    kv_len = k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(compute), repeat_kv(k, h_).to(compute).transpose(-1, -2)) * scale
    dev = q.device
    if score_mod is not None:
        s = score_mod(s, torch.arange(b_, device=dev).view(-1, 1, 1, 1), torch.arange(h_, device=dev).view(1, -1, 1, 1),
                      torch.arange(q_len, device=dev).view(1, 1, -1, 1),
                      torch.arange(kv_len, device=dev).view(1, 1, 1, -1), q_len, kv_len)
    if pattern is not None:
        s = s.masked_fill(~pattern.materialize(q_len, kv_len, batch=b_, heads=h_, device=dev), float("-inf"))
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    # Fill empty rows before the reduction so its backward stays finite (exp(-inf - -inf) would be NaN).
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1)
    return lse.masked_fill(empty[..., 0], float("-inf"))
