"""The ``sdpa_mask`` engine: SDPA with the pattern materialised as a boolean mask, the fallback that fits memory.

Where FlexAttention cannot compile a pattern on CUDA, the next engine by rank used to be the tiled engine, whose
Python loop over tile steps runs hundreds of times slower than a fused kernel there. Up to the length where the
``[batch | 1, heads | 1, q_len, kv_len]`` mask fits a memory budget, PyTorch's fused SDPA kernels with that
mask are the fastest correct path (quadratic work, but fused); beyond it, the tiled engine runs.

Rows the pattern masks completely get zeros (attnkit's convention; SDPA alone would give NaN): they attend to
every key inside the kernel and their output is zeroed, so no NaN reaches the forward or the backward. Masks are
cached per (pattern structure, shape, device).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["mask_budget_bytes", "sdpa_mask_reasons", "sdpa_mask_run", "MASK_CACHE_SIZE"]

MASK_CACHE_SIZE = 4
_MASKS: OrderedDict = OrderedDict()


def mask_budget_bytes() -> int:
    """Bytes the materialised mask (and the additive bias SDPA makes of it) may take: ``ATTNKIT_MASK_BUDGET``
    (bytes) or 1 GiB."""
    return int(os.environ.get("ATTNKIT_MASK_BUDGET", 1 << 30))


def _mask_bytes(c: Mapping[str, Any]) -> int:
    p = c["pattern"]
    nb = c["batch"] if p is not None and p.batch_dependent else 1
    nh = c["heads"] if p is not None and p.head_dependent else 1
    # the bool mask, plus the additive bias in the input dtype that the fused kernels build from it
    return nb * nh * c["q_len"] * c["kv_len"] * (1 + c["dtype"].itemsize)


def sdpa_mask_reasons(c: Mapping[str, Any]) -> list[str]:
    why = []
    if c["norm"].name != "softmax":
        why.append(f"normalization {c['norm'].name!r} (sdpa computes softmax only)")
    if c["score_mod"] is not None:
        why.append("score_mod given (sdpa takes no score modifier)")
    need, budget = _mask_bytes(c), mask_budget_bytes()
    if need > budget:
        why.append(f"the materialised mask needs {need / 2**20:.0f} MiB > the budget {budget / 2**20:.0f} MiB "
                   f"(ATTNKIT_MASK_BUDGET)")
    return why


def _mask(pattern, q_len, kv_len, batch, heads, device) -> torch.Tensor:
    from attnkit.backends.keys import structure_key

    holders: list = []
    key = (structure_key(pattern, holders), q_len, kv_len, batch, heads, device)
    hit = _MASKS.get(key)
    if hit is not None:
        _MASKS.move_to_end(key)
        return hit[1]
    if pattern is None:
        m = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    else:
        m = pattern.materialize(q_len, kv_len, batch=batch, heads=heads, device=device)
    empty = ~m.any(-1, keepdim=True)
    m = (m | empty).contiguous()  # an empty row attends everywhere in the kernel; its output is zeroed below
    entry = (holders, m, empty if bool(empty.any()) else None)
    _MASKS[key] = entry
    while len(_MASKS) > MASK_CACHE_SIZE:
        _MASKS.popitem(last=False)
    return entry[1]


def sdpa_mask_run(c: Mapping[str, Any]):
    q, k, v, pattern = c["q"], c["k"], c["v"], c["pattern"]
    b, h, q_len, _ = q.shape
    kv_len = k.shape[2]
    m = _mask(pattern, q_len, kv_len, b, h, q.device)
    empty = next(e[2] for e in reversed(_MASKS.values()) if e[1] is m)
    if k.shape[1] != h:
        from attnkit._checks import repeat_kv

        k, v = repeat_kv(k, h), repeat_kv(v, h)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=c["scale"])
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    if c["return_lse"]:
        from attnkit.ops.exact.weights import attention_lse

        return out, attention_lse(c["q"], c["k"], pattern=pattern, scale=c["scale"])
    return out
