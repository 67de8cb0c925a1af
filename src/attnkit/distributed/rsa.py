"""Ring Self-Attention (RSA): Li, Xue, Baranwal, Li & You, "Sequence Parallelism: Long Sequence Training from
System Perspective" (2021/ACL 2023), Section 3 (Ring Self-Attention).

The sequence is split into ``P`` chunks, one per rank. RSA computes exact softmax attention in two ring passes,
with no online softmax:

1. keys circulate: after ``P - 1`` hops every rank has computed its full score rows ``S_p = Q_p K^T / sqrt(d)``
   ``[n/P, n]`` (one ``[n/P, n/P]`` block per hop) and applies the (masked) softmax to whole rows, ``A_p``;
2. values circulate: after ``P - 1`` more hops every rank has accumulated ``O_p = sum_j A_{p,j} V_j``.

Each rank therefore materialises ``(n/P) x n`` probabilities per head (memory ``O(n^2 / P)``, kept for the
backward), where :func:`attnkit.distributed.ring_attention` (the online-softmax ring of Ring Attention, Liu et al.
2023) keeps one block and a log-sum-exp. The bytes sent are the same (each key and each value crosses every link
once per pass); RSA sends them in twice as many messages, and its two passes cannot merge keys and values into one
message. :func:`sequence_parallel_traffic` states both exactly; the distributed tests check it against the bytes
each rank actually sends.

The backward mirrors the forward, as in the paper: values circulate again with a travelling ``dV`` accumulator
(``dA_p = dO_p V^T``, ``dV_j += A_{p,j}^T dO_p``), the softmax backward is local to the rank's rows
(``dS = A * (dA - rowsum(dA * A))``), then keys circulate with a travelling ``dK`` accumulator
(``dQ_p += dS_{p,j} K_j``, ``dK_j += dS_{p,j}^T Q_p``). After ``P`` hops each accumulator is back with its owner.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit import patterns as P
from attnkit._checks import repeat_kv

from ._comm import group_info
from .ring import _check_call, _circulate, _circulate_with_accumulator, _Masks, _work_dtype

__all__ = ["ring_self_attention", "sequence_parallel_traffic"]


def _sum_groups(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[b, h, n, d] -> [b, hkv, n, d]``: sum the query heads that share one key/value head (GQA)."""
    b, h = x.shape[:2]
    return x if h == hkv else x.view(b, hkv, h // hkv, *x.shape[2:]).sum(2)


class _RingSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, pattern, layout, scale):
        rank, world = group_info(group, "ring_self_attention")
        work = _work_dtype(q.dtype)
        masks = _Masks(pattern, q, rank, world, layout)
        b, h, n, _ = q.shape
        qw = q.to(work)
        # pass 1: keys circulate; scores [b, h, n_local, world, n_local], block j = keys that started on rank j
        s = qw.new_empty(b, h, n, world, n)

        def scores(src, kb):
            blk = torch.matmul(qw, repeat_kv(kb, h).to(work).transpose(-1, -2)) * scale
            m = masks(src)
            s[:, :, :, src] = blk if m is None else blk.masked_fill(~m(0, n), float("-inf"))

        _circulate(k, rank, world, group, 0, "ring_self_attention (forward, keys)", scores)
        # softmax over whole rows (all P blocks); a row with no allowed key gets zeros, not NaN
        flat = s.view(b, h, n, world * n)
        mx = flat.amax(-1, keepdim=True)
        mx = mx.masked_fill(torch.isneginf(mx), 0.0)
        e = torch.exp(flat - mx)
        den = e.sum(-1, keepdim=True)
        a = (e / den.clamp_min(torch.finfo(work).tiny)).view(b, h, n, world, n)
        # pass 2: values circulate; out = sum_j A_{:, j} V_j
        out = qw.new_zeros(b, h, n, v.shape[-1])

        def accumulate(src, vb):
            out.add_(torch.matmul(a[:, :, :, src], repeat_kv(vb, h).to(work)))

        _circulate(v, rank, world, group, world, "ring_self_attention (forward, values)", accumulate)
        ctx.save_for_backward(q, k, v, a)
        ctx.group, ctx.scale = group, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, a = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        rank, world = group_info(group, "ring_self_attention")
        work = a.dtype
        acc_dtype = torch.float32 if work != torch.float64 else torch.float64
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        qw, do = q.to(work), grad_out.to(work)
        # pass 1: values circulate with their dV accumulator; dA_{:, j} = dO V_j^T
        da = torch.empty_like(a)

        def values(src, vb, dv):
            da[:, :, :, src] = torch.matmul(do, repeat_kv(vb, h).to(work).transpose(-1, -2))
            dv.add_(_sum_groups(torch.matmul(a[:, :, :, src].transpose(-1, -2), do), hkv).to(dv.dtype))

        dv = _circulate_with_accumulator(v, torch.zeros(*v.shape, dtype=acc_dtype, device=v.device), rank, world,
                                         group, 0, "ring_self_attention (backward, values)", values)
        # softmax backward on this rank's whole rows
        flat_a, flat_da = a.view(b, h, n, -1), da.view(b, h, n, -1)
        ds = (flat_a * (flat_da - (flat_da * flat_a).sum(-1, keepdim=True))).view_as(a) * scale
        # pass 2: keys circulate with their dK accumulator; dQ += dS_{:, j} K_j, dK_j += dS_{:, j}^T Q
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)

        def keys(src, kb, dk):
            dq.add_(torch.matmul(ds[:, :, :, src], repeat_kv(kb, h).to(work)).to(acc_dtype))
            dk.add_(_sum_groups(torch.matmul(ds[:, :, :, src].transpose(-1, -2), qw), hkv).to(dk.dtype))

        dk = _circulate_with_accumulator(k, torch.zeros(*k.shape, dtype=acc_dtype, device=k.device), rank, world,
                                         group, 2 * world, "ring_self_attention (backward, keys)", keys)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None,
                        causal: bool = False, pattern: P.Pattern | None = None, *, layout: str = "contiguous",
                        scale: float | None = None) -> torch.Tensor:
    """Exact softmax attention over a sequence sharded across ``group`` by Ring Self-Attention (two ring passes:
    keys, then values; see the module docstring), with backward.

    Args and returns as :func:`attnkit.distributed.ring_attention`: ``q [batch, heads, n_local, dim]``,
    ``k, v [batch, kv_heads, n_local, dim | dim_v]`` (this rank's shard, GQA allowed), ``causal`` and ``pattern``
    over global positions, ``layout`` ``"contiguous"`` (the paper's) or ``"striped"``; returns this rank's rows
    ``[batch, heads, n_local, dim_v]`` in ``q``'s dtype (half precisions compute in float32).

    Memory: ``batch * heads * n_local * n`` probabilities per rank (the paper's ``O(n^2 / P)``), kept for the
    backward; prefer :func:`ring_attention` when that does not fit.
    """
    scale, eff = _check_call("ring_self_attention", q, k, v, group, causal, pattern, layout, scale)
    return _RingSelfAttention.apply(q, k, v, group, eff, layout, scale)


def sequence_parallel_traffic(algorithm: str, *, seq_len: int, world_size: int, batch: int, heads: int,
                              kv_heads: int | None = None, dim: int, dim_v: int | None = None,
                              dtype: torch.dtype = torch.float32) -> dict:
    """What one rank sends per attention call, for ``"ring"`` (:func:`ring_attention`, online softmax) or
    ``"rsa"`` (:func:`ring_self_attention`), and what it keeps for the backward.

    Returns a dict: ``forward_bytes``, ``backward_bytes``, ``forward_messages``, ``backward_messages`` (payload
    bytes and point-to-point sends of one rank; the one metadata all-gather is not counted), and
    ``saved_score_elements`` (attention values kept per rank between forward and backward: RSA keeps its
    probabilities ``batch * heads * (n/P) * n``, the online ring a log-sum-exp ``batch * heads * n/P``).

    With ``P`` ranks, ``n/P`` tokens each, keys ``K = batch * kv_heads * n/P * dim`` and values
    ``V = batch * kv_heads * n/P * dim_v`` elements per shard:

    * ring: forward ``(P-1)`` messages of ``K + V``; backward ``(P-1)`` of ``K + V`` and ``P`` accumulators
      ``K + V`` (in float32 for half precisions), one message each when ``P > 1``;
    * RSA: forward ``(P-1)`` of ``K`` and ``(P-1)`` of ``V``; backward ``(P-1)`` of ``V`` plus ``P`` accumulators
      ``V``, then ``(P-1)`` of ``K`` plus ``P`` accumulators ``K``.

    The bytes are equal; RSA sends twice as many messages and keeps ``n`` times more for the backward.
    """
    if algorithm not in ("ring", "rsa"):
        raise ValueError(f"algorithm must be 'ring' or 'rsa', got {algorithm!r}")
    if world_size < 1 or seq_len % world_size:
        raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of world_size ({world_size})")
    kv_heads = heads if kv_heads is None else kv_heads
    dim_v = dim if dim_v is None else dim_v
    p, nl = world_size, seq_len // world_size
    item = torch.empty((), dtype=dtype).element_size()
    acc_item = torch.empty((), dtype=torch.float64 if dtype == torch.float64 else torch.float32).element_size()
    kel, vel = batch * kv_heads * nl * dim, batch * kv_heads * nl * dim_v
    hops, accs = p - 1, (p if p > 1 else 0)
    if algorithm == "ring":
        fwd_b, fwd_m = hops * (kel + vel) * item, hops
        bwd_b, bwd_m = hops * (kel + vel) * item + accs * (kel + vel) * acc_item, hops + accs
        saved = batch * heads * nl
    else:
        fwd_b, fwd_m = hops * (kel + vel) * item, 2 * hops
        bwd_b, bwd_m = hops * (kel + vel) * item + accs * (kel + vel) * acc_item, 2 * (hops + accs)
        saved = batch * heads * nl * seq_len
    return {"forward_bytes": fwd_b, "backward_bytes": bwd_b, "forward_messages": fwd_m,
            "backward_messages": bwd_m, "saved_score_elements": saved}
