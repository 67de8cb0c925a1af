"""Tree Attention decoding (Shyam et al., "Tree Attention: Topology-aware Decoding for Long-Context Attention on
GPU clusters", 2024).

Attention is the gradient of the energy ``F(zeta) = log sum_j exp(q . k_j * scale + zeta . v_j)`` at
``zeta = 0``, and its reduction over the sequence is associative. So for one decoding query over a KV cache
sharded across ranks, each rank computes local statistics over its shard, ``m_p = max_j s_j``,
``s_p = sum_j exp(s_j - m_p)``, ``n_p = sum_j exp(s_j - m_p) v_j``, and two all-reduces combine them: a max of
``m``, then a sum of the rescaled ``(n, s)``. An all-reduce is a tree (or ring/halving-doubling) reduction in the
backend: ``O(log P)`` latency instead of the ``P - 1`` hops of a ring, and ``O(d)`` bytes per query.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit._checks import default_scale, repeat_kv

from ._comm import check_agreement, group_info

__all__ = ["tree_decode", "local_decode_stats", "attention_energy"]


def local_decode_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m [b, h, nq], s [b, h, nq], n [b, h, nq, d_v])`` over one shard (float32 or float64; an empty shard
    gives ``m = -inf``, ``s = 0``, ``n = 0``)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, nq, _ = q.shape
    if k.shape[2] == 0:
        return (q.new_full((b, h, nq), float("-inf"), dtype=work), q.new_zeros(b, h, nq, dtype=work),
                q.new_zeros(b, h, nq, v.shape[-1], dtype=work))
    kk, vv = repeat_kv(k, h).to(work), repeat_kv(v, h).to(work)
    sc = torch.matmul(q.to(work), kk.transpose(-1, -2)) * scale
    m = sc.amax(-1)
    p = torch.exp(sc - m[..., None])
    return m, p.sum(-1), torch.matmul(p, vv)


def tree_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                scale: float | None = None) -> torch.Tensor:
    """Decode queries against a KV cache sharded across the ranks of ``group`` (no gradient: inference).

    Args:
        q: the new queries ``[batch, heads, n_q, dim]`` (usually ``n_q = 1``), the same on every rank.
        k, v: this rank's shard of the cache ``[batch, kv_heads, n_local, dim | dim_v]``; shards may have different
            lengths (even 0) and together hold every key the queries attend to (no mask is applied).
        scale: score scale, default ``1/sqrt(dim)``.

    Returns:
        ``[batch, heads, n_q, dim_v]`` on every rank, equal to attention over the concatenated cache.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (need the "
                         f"same batch, k and v the same heads and length, q heads a multiple of k heads)")
    rank, _ = group_info(group, "tree_decode")
    scale = default_scale(q, scale)
    # shards may differ in length, nothing else may
    check_agreement(group, "tree_decode", {"dtype": q.dtype, "batch": q.shape[0], "heads": q.shape[1],
                                           "kv_heads": k.shape[1], "queries": q.shape[2], "dim": q.shape[3],
                                           "dim_v": v.shape[-1], "scale": scale}, q.device)
    with torch.no_grad():
        m, s, n = local_decode_stats(q, k, v, scale)
        try:
            g = m.clone()
            dist.all_reduce(g, op=dist.ReduceOp.MAX, group=group)
            if bool(torch.isneginf(g).any()):
                raise ValueError("tree_decode: no rank holds any key (every shard is empty)")
            w = torch.exp(m - g)  # 0 on empty shards
            packed = torch.cat([n * w[..., None], (s * w)[..., None]], dim=-1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        except RuntimeError as e:
            raise RuntimeError(f"tree_decode: rank {rank} failed in an all-reduce: {e}. A peer process died, timed "
                               f"out, or did not call tree_decode with the same query shape") from e
        out = packed[..., :-1] / packed[..., -1:]
    return out.to(q.dtype)


def attention_energy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, zeta: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """The energy ``F(zeta) = sum_{b,h,i} log sum_j exp(q_i . k_j * scale + zeta_{b,h,i} . v_j)`` whose gradient at
    ``zeta = 0`` is the attention output (Tree Attention, eq. of the energy view). ``zeta [b, h, n_q, d_v]``."""
    h = q.shape[1]
    kk, vv = repeat_kv(k, h), repeat_kv(v, h)
    s = torch.matmul(q, kk.transpose(-1, -2)) * default_scale(q, scale)
    s = s + torch.matmul(zeta, vv.transpose(-1, -2))
    return torch.logsumexp(s, dim=-1).sum()
