"""Star Attention (Acharya et al., "Star Attention: Efficient LLM Inference over Long Sequences", 2024), Sec. 2.

Phase 1 (context encoding): the context is cut into blocks ``c_1 .. c_B`` (one per host); every block is
processed prefixed by the *anchor block* ``c_1``: tokens of ``c_i`` attend causally to ``c_1 ∪ c_i``
(:func:`star_pattern`); the anchor's keys and values are then dropped, each host keeps its own block's.
Phase 2 (query and response): query tokens attend to the whole cache; each host computes its local softmax
partial with its log-sum-exp and the partials combine exactly (Sec. 2.2, "global attention"): phase 2 is exact
attention over the cached keys, phase 1 is an approximation of full causal attention (exact when one block
covers the context).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit import patterns as P
from attnkit._checks import check_qkv, default_scale
from attnkit.functional.exact import attention
from attnkit.ops.exact.weights import attention_lse

__all__ = ["star_pattern", "star_attention", "star_attention_distributed"]


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def star_pattern(block_size: int, anchor_size: int | None = None, *, causal: bool = True) -> P.Pattern:
    """Phase 1's mask: ``(same block ∨ key in the anchor) ∧ causal``; the anchor is the first ``anchor_size``
    tokens (default ``block_size``, as in the paper). ``causal=False`` drops the causal term (an encoder's
    analogue, not in the paper)."""
    block_size = _positive("block_size", block_size)
    anchor_size = block_size if anchor_size is None else _positive("anchor_size", anchor_size)
    local = P.block_local(block_size) | P._KeyBelow(anchor_size, f"anchor({anchor_size})")
    return P.causal() & local if causal else local


def star_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
                   anchor_size: int | None = None, num_query: int = 0, causal: bool = True,
                   scale: float | None = None) -> torch.Tensor:
    """Both phases on one host: the first ``seq - num_query`` tokens are the context (phase 1, :func:`star_pattern`),
    the last ``num_query`` tokens (all of them when the sequence is shorter) the query (phase 2: causal attention
    over everything). ``q, k, v``
    ``[batch, heads, seq, dim]`` (``k``/``v`` may have fewer heads); returns ``[batch, heads, seq, dim_v]``."""
    check_qkv(q, k, v)
    n = q.shape[2]
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"star_attention is self-attention: q has {q.shape[2]} tokens, k {k.shape[2]}")
    if isinstance(num_query, bool) or not isinstance(num_query, int) or num_query < 0:
        raise ValueError(f"num_query must be a non-negative int, got {num_query!r}")
    num_query = min(num_query, n)
    ctx = n - num_query
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    if ctx:
        out[:, :, :ctx] = attention(q[:, :, :ctx], k[:, :, :ctx], v[:, :, :ctx],
                                    pattern=star_pattern(block_size, anchor_size, causal=causal), scale=scale)
    if num_query:
        out[:, :, ctx:] = attention(q[:, :, ctx:], k, v, pattern=P.causal() if causal else None, scale=scale)
    return out


def star_attention_distributed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query: tuple | None = None,
                               group: dist.ProcessGroup | None = None, *, anchor_size: int | None = None,
                               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Star Attention over the ranks of ``group`` (inference; no gradient).

    Args:
        q, k, v: this rank's context block ``[batch, heads, block, dim]`` (rank ``r`` holds block ``r``; blocks may
            differ in length). Rank 0's first ``anchor_size`` tokens (default its whole block) are the anchor,
            broadcast to every rank for phase 1.
        query: ``(q_query, k_query, v_query)``, the query tokens ``[batch, heads, n_q, dim]``, identical on every
            rank; their own keys and values are held by the last rank (they attend to each other causally).
        scale: score scale, default ``1/sqrt(dim)``.

    Returns:
        ``(context_out [batch, heads, block, dim_v], query_out [batch, heads, n_q, dim_v] or None)``: phase 1 for
        this rank's block; phase 2, identical on every rank, equal to causal attention of the query tokens over
        every block and themselves.
    """
    check_qkv(q, k, v)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    scale = default_scale(q, scale)
    with torch.no_grad():
        # every rank must agree on the shapes before exchanging, or a rank would read a partly filled buffer
        meta = torch.tensor([q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3],
                             -1 if query is None else query[0].shape[2]], dtype=torch.long)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        if any(not torch.equal(m, metas[0]) for m in metas):
            raise ValueError(f"star_attention_distributed: ranks disagree on [batch, heads, kv_heads, dim, dim_v, "
                             f"n_query]: {[m.tolist() for m in metas]}")
        # phase 1: the anchor (rank 0's first tokens) is broadcast; block r attends causally to anchor ∪ itself
        anchor_len = torch.tensor([k.shape[2] if anchor_size is None else min(anchor_size, k.shape[2])])
        dist.broadcast(anchor_len, src=0, group=group)
        a = int(anchor_len)
        ka = k[:, :, :a].contiguous() if rank == 0 else k.new_empty(k.shape[0], k.shape[1], a, k.shape[3])
        va = v[:, :, :a].contiguous() if rank == 0 else v.new_empty(v.shape[0], v.shape[1], a, v.shape[3])
        dist.broadcast(ka, src=0, group=group)
        dist.broadcast(va, src=0, group=group)
        if rank == 0:
            ctx = attention(q, k, v, pattern=P.causal(), scale=scale)
        else:
            kk, vv = torch.cat([ka, k], dim=2), torch.cat([va, v], dim=2)
            # queries are the last block-length positions of [anchor; block]: bottom-right causal alignment
            ctx = attention(q, kk, vv, pattern=P.causal(), scale=scale)
        if query is None:
            return ctx, None
        # phase 2: local softmax partial and log-sum-exp per host, combined exactly across hosts
        qq, kq, vq = query
        keys, values, pat = k, v, None
        if rank == world - 1:
            keys, values = torch.cat([k, kq], dim=2), torch.cat([v, vq], dim=2)
            pat = P.causal()  # the query tokens are the last positions of this rank's keys
        out = attention(qq, keys, values, pattern=pat, scale=scale).to(torch.float64)
        lse = attention_lse(qq, keys, pattern=pat, scale=scale).to(torch.float64)
        g = lse.clone()
        dist.all_reduce(g, op=dist.ReduceOp.MAX, group=group)
        w = torch.exp(lse - g).nan_to_num(0.0)  # 0 for a rank whose keys are all masked
        packed = torch.cat([out * w[..., None], w[..., None]], dim=-1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return ctx, (packed[..., :-1] / packed[..., -1:]).to(q.dtype)
