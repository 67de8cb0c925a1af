"""Ring Attention (Liu et al., "Ring Attention with Blockwise Transformers for Near-Infinite Context", 2023) and
Striped Attention (Brandon et al., "Striped Attention: Faster Ring Attention for Causal Transformers", 2023).

Each of ``P`` ranks holds one shard of the queries, keys and values. For ``P`` steps a rank attends its queries to
the key/value block it holds, merges the partial result by log-sum-exp (exact online softmax), and passes the
block to the next rank while receiving the previous rank's: the send/receive is posted before the block's compute
and awaited after it, so communication overlaps computation. Blocks the mask leaves empty are skipped (the causal
imbalance of the contiguous layout; the striped layout balances it).

The backward is a second ring: blocks travel again with their gradient accumulators ``dk, dv``; each rank adds its
queries' contribution (recomputing scores from the saved log-sum-exp, as FlashAttention does), and after ``P``
hops every accumulator is back with the rank that owns the block. Exact: the same sums as one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit import patterns as P
from attnkit._checks import check_qkv, default_scale

from ._comm import Exchange, check_agreement, group_info
from .layout import shard_positions
from .merge import block_attention, block_attention_backward, merge_partials

__all__ = ["ring_attention", "striped_attention"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Masks:
    """Block masks from global positions: ``None`` (no pattern: all allowed) or a function of a query-row range
    returning the bool mask of those rows, so no ``n_local x n_local`` tensor is ever built; the block kernels
    skip the key span (and whole chunks) the mask leaves empty."""

    def __init__(self, pattern: P.Pattern | None, q: torch.Tensor, rank: int, world: int, layout: str):
        self.pattern, self.world, self.layout = pattern, world, layout
        b, h, n, _ = q.shape
        self.total = n * world
        self.device = q.device
        self.qpos = shard_positions(self.total, rank, world, layout, device=q.device)
        self.b = torch.arange(b, device=q.device).view(-1, 1, 1, 1)
        self.h = torch.arange(h, device=q.device).view(1, -1, 1, 1)

    def __call__(self, src: int):
        if self.pattern is None:
            return None
        kpos = shard_positions(self.total, src, self.world, self.layout, device=self.device).view(1, 1, 1, -1)

        def rows(r0: int, r1: int) -> torch.Tensor:
            return self.pattern.allowed(self.b, self.h, self.qpos[r0:r1].view(1, 1, -1, 1), kpos, self.total,
                                        self.total)

        return rows


def _circulate(block: torch.Tensor, rank: int, world: int, group, tag0: int, what: str, visit) -> None:
    """Pass ``block`` around the ring; ``visit(src, block)`` runs on the block that started at rank ``src``,
    overlapped with the next hop."""
    cur = block.contiguous()
    for step in range(world):
        src = (rank - step) % world
        ex = None
        if step < world - 1:
            ex = Exchange(cur, (rank + 1) % world, torch.empty_like(cur), (rank - 1) % world, group, tag0 + step,
                          what)
        visit(src, cur)
        if ex is not None:
            cur = ex.wait()


def _circulate_with_accumulator(block: torch.Tensor, acc: torch.Tensor, rank: int, world: int, group, tag0: int,
                                what: str, visit) -> torch.Tensor:
    """Like :func:`_circulate`, with an accumulator that travels with its block: ``visit(src, block, acc)`` adds
    this rank's contribution in place; after ``P`` hops the accumulator of this rank's block is returned."""
    cur = block.contiguous()
    for step in range(world):
        src = (rank - step) % world
        ex = None
        if step < world - 1:
            ex = Exchange(cur, (rank + 1) % world, torch.empty_like(cur), (rank - 1) % world, group,
                          tag0 + 2 * step, what)
        visit(src, cur, acc)
        if world > 1:
            acc = Exchange(acc, (rank + 1) % world, torch.empty_like(acc), (rank - 1) % world, group,
                           tag0 + 2 * step + 1, what).wait()
        if ex is not None:
            cur = ex.wait()
    return acc


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, pattern, layout, scale):
        rank, world = group_info(group, "ring_attention")
        work = _work_dtype(q.dtype)
        masks = _Masks(pattern, q, rank, world, layout)
        qw = q.to(work)
        dk = k.shape[-1]
        out = lse = None

        def visit(src, kv):
            nonlocal out, lse
            o, l = block_attention(qw, kv[..., :dk], kv[..., dk:], masks(src), scale)
            out, lse = merge_partials(out, lse, o, l)

        # one message per hop; the next hop is posted before computing on this block
        _circulate(torch.cat([k, v], dim=-1), rank, world, group, 0, "ring_attention (forward)", visit)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.pattern, ctx.layout, ctx.scale = group, pattern, layout, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        rank, world = group_info(group, "ring_attention")
        work = _work_dtype(q.dtype)
        acc = torch.float32 if work != torch.float64 else torch.float64
        masks = _Masks(ctx.pattern, q, rank, world, ctx.layout)
        qw, do = q.to(work), grad_out.to(work)
        delta = (do * out).sum(-1)
        d, dvd = k.shape[-1], v.shape[-1]
        dkv = torch.zeros(*k.shape[:3], d + dvd, dtype=acc, device=k.device)  # travels with its block
        dq = torch.zeros_like(qw, dtype=acc)

        def visit(src, kv, dkv):
            gq, gk, gv = block_attention_backward(qw, kv[..., :d], kv[..., d:], masks(src), scale, do, lse, delta)
            dq.add_(gq)
            dkv[..., :d] += gk
            dkv[..., d:] += gv

        # the accumulator follows its block; after P hops it is home
        dkv = _circulate_with_accumulator(torch.cat([k, v], dim=-1), dkv, rank, world, group, 0,
                                          "ring_attention (backward)", visit)
        return (dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype), None, None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None,
                   causal: bool = False, pattern: P.Pattern | None = None, *, layout: str = "contiguous",
                   scale: float | None = None) -> torch.Tensor:
    """Exact softmax attention over a sequence sharded across the ranks of ``group``, with backward.

    Args:
        q: this rank's queries ``[batch, heads, n_local, dim]``; k, v: this rank's keys/values
            ``[batch, kv_heads, n_local, dim | dim_v]`` (GQA allowed). Every rank holds ``n_local`` tokens; the
            full sequence has ``n_local * world_size`` (see :func:`attnkit.distributed.shard`).
        group: the process group (default: the world).
        causal: autoregressive mask over *global* positions (combined with ``pattern`` by ``&``).
        pattern: any ``attnkit.patterns`` pattern over global positions (self-attention, ``q_len == kv_len``).
        layout: ``"contiguous"`` (Ring Attention) or ``"striped"`` (Striped Attention): which global positions
            each rank holds (:func:`attnkit.distributed.shard_positions`).
        scale: score scale, default ``1/sqrt(dim)``.

    Returns:
        ``[batch, heads, n_local, dim_v]``: this rank's rows of the full attention output, in ``q``'s dtype
        (half precisions compute in float32). Gradients flow to ``q, k, v`` through a second ring.
    """
    scale, eff = _check_call("ring_attention", q, k, v, group, causal, pattern, layout, scale)
    return _RingAttention.apply(q, k, v, group, eff, layout, scale)


def _check_call(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, causal: bool,
                pattern: P.Pattern | None, layout: str, scale: float | None):
    """The checks shared by the sequence-parallel self-attentions (``name``: the public function, for messages):
    inputs, equal shards, pattern type, layout and the ranks' agreement (collective). Returns ``(scale, eff)``:
    the score scale and the pattern over global positions (``causal`` combined in; None for full attention)."""
    check_qkv(q, k, v)
    rank, world = group_info(group, name)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{name} is self-attention over equal shards: q has {q.shape[2]} local tokens and "
                         f"k/v {k.shape[2]}; shard q, k and v with the same attnkit.distributed.shard")
    if pattern is not None and not isinstance(pattern, P.Pattern):
        raise TypeError(f"pattern must be an attnkit.patterns.Pattern, got {type(pattern).__name__}")
    total = q.shape[2] * world
    shard_positions(total, rank, world, layout)  # validates the layout
    scale = default_scale(q, scale)
    check_agreement(group, f"{name} (forward)", _meta(q, k, v, causal=bool(causal), layout=layout, scale=scale),
                    q.device)
    eff = (P.causal() & pattern if pattern is not None else P.causal()) if causal else pattern
    if eff is not None:
        eff.check(total, total, q.shape[0], q.shape[1])
    return scale, eff


def _meta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> dict:
    """What every rank of a sequence-parallel call must agree on: dtype, shapes and options."""
    b, h, n, d = q.shape
    return {"dtype": q.dtype, "batch": b, "heads": h, "kv_heads": k.shape[1], "local length": n, "dim": d,
            "dim_v": v.shape[-1], **options}


def striped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None,
                      causal: bool = True, pattern: P.Pattern | None = None, *,
                      scale: float | None = None) -> torch.Tensor:
    """:func:`ring_attention` with ``layout="striped"`` (causal by default, its purpose): shard inputs with
    ``attnkit.distributed.shard(x, rank, world, layout="striped")`` and rotate with ``shard_positions``."""
    return ring_attention(q, k, v, group, causal=causal, pattern=pattern, layout="striped", scale=scale)
