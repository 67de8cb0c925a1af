"""LASP: Linear Attention Sequence Parallelism (Sun et al., 2024).

Causal linear attention carries a ``d x d`` state: ``S_t = decay^c S_{t-1} + sum_{j in chunk t} phi(k_j) v_j^T``
(with the denominator ``z`` as an extra value column). Rank ``t`` of ``P`` holds chunk ``t``: it receives
``S_{t-1}`` from rank ``t - 1`` (point-to-point), computes its outputs with that initial state
(``attnkit.linear_attention(..., state=...)``: intra-chunk part + ``phi(q) S_{t-1}``) and sends ``S_t`` on. The
backward runs the mirror recurrence: rank ``t`` receives ``dS_t`` from rank ``t + 1``, back-propagates through its
chunk (recomputing it), and sends ``dS_{t-1}`` to rank ``t - 1``. Communication per rank is ``O(m d_v)``,
independent of the sequence length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit._checks import check_qkv
from attnkit.errors import NotSupportedError
from attnkit.feature_maps import FeatureMap
from attnkit.feature_maps import get as get_feature_map
from attnkit.functional.linear import linear_attention
from attnkit.ops.linear.state import LinearAttentionState

from ._comm import Exchange, check_agreement, group_info

__all__ = ["lasp"]


def _run(q, k, v, s_ext, offset, kw, key_shift):
    state = LinearAttentionState(s_ext[..., :-1], s_ext[..., -1], offset, key_shift)
    out, st = linear_attention(q, k, v, causal=True, state=state, return_state=True, **kw)
    return out, torch.cat([st.S, st.z[..., None]], dim=-1)


def _global_key_shift(q, k, fm, group, work) -> torch.Tensor | None:
    """Stabilised maps (FAVOR+): one key shift for the whole sequence, the maximum over the ranks, so every
    rank's state is summed on one scale (``[b, heads]``, as a state carries it)."""
    c = getattr(fm, "key_shift", lambda _: None)(k.to(work))
    if c is None:
        return None
    c = c.contiguous()
    dist.all_reduce(c, op=dist.ReduceOp.MAX, group=group)
    b, hk, h = k.shape[0], k.shape[1], q.shape[1]
    return c.view(b, hk, 1).expand(b, hk, h // hk).reshape(b, h)


class _LASP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, kw, state_shape, work):
        rank, world = group_info(group, "lasp")
        offset = rank * q.shape[2]
        s_prev = torch.zeros(state_shape, dtype=work, device=q.device)
        shift = _global_key_shift(q, k, kw["feature_map"], group, work)  # every rank, before the chain
        if rank > 0:
            s_prev = Exchange(None, None, s_prev, rank - 1, group, 0, "lasp (forward)").wait()
        out, s_next = _run(q, k, v, s_prev, offset, kw, shift)
        if rank < world - 1:
            Exchange(s_next.contiguous(), rank + 1, None, None, group, 0, "lasp (forward)").wait()
        ctx.save_for_backward(q, k, v, s_prev)
        ctx.group, ctx.kw, ctx.offset, ctx.shift = group, kw, offset, shift
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, s_prev = ctx.saved_tensors
        rank, world = group_info(ctx.group, "lasp")
        d_next = torch.zeros_like(s_prev)
        if rank < world - 1:
            d_next = Exchange(None, None, d_next, rank + 1, ctx.group, 1, "lasp (backward)").wait()
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v, s_prev)]
            out, s_next = _run(*leaves, ctx.offset, ctx.kw, ctx.shift)
            grads = torch.autograd.grad([out, s_next], leaves, [grad_out, d_next], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        if rank > 0:
            Exchange(grads[3].contiguous(), rank - 1, None, None, ctx.group, 1, "lasp (backward)").wait()
        return grads[0], grads[1], grads[2], None, None, None, None


def lasp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None, *,
         feature_map: str | FeatureMap = "elu", decay: float | torch.Tensor | None = None,
         normalize: str = "denominator", chunk_size: int = 64) -> torch.Tensor:
    """Causal linear attention over a sequence split contiguously across the ranks of ``group``, with backward.

    Args:
        q: this rank's chunk ``[batch, heads, n_local, dim]``; k, v: ``[batch, kv_heads, n_local, dim | dim_v]``.
            Rank ``r`` holds positions ``r * n_local .. (r + 1) * n_local - 1`` (``shard(x, r, P)``).
        feature_map, decay, normalize, chunk_size: as :func:`attnkit.linear_attention` (causal). Feature maps must
            be token-local; learnable feature-map parameters get no gradient here (refused while training).

    Returns:
        ``[batch, heads, n_local, dim_v]``: this rank's rows of single-process causal linear attention.
    """
    check_qkv(q, k, v)
    group_info(group, "lasp")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"lasp needs q, k, v chunks of one length, got {q.shape[2]} and {k.shape[2]}")
    fm = get_feature_map(feature_map)
    if not fm.token_local:
        raise NotSupportedError(f"feature map {fm.name!r} is not token-local, so no state can be passed between "
                                f"ranks; use a token-local map (elu, relu, favor, taylor, ...)")
    if torch.is_grad_enabled() and any(p.requires_grad for p in fm.parameters()):
        raise NotSupportedError("lasp does not propagate gradients to feature-map parameters; freeze them "
                                "(requires_grad_(False)) or use a parameter-free feature map")
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    b, h, n, d = q.shape
    m = fm.feature_dim(d)
    decay_code = None if decay is None else tuple(torch.as_tensor(decay, dtype=torch.float64).reshape(-1).tolist())
    check_agreement(group, "lasp", {"dtype": q.dtype, "batch": b, "heads": h, "kv_heads": k.shape[1],
                                    "local length": n, "dim": d, "dim_v": v.shape[-1], "feature map": fm.name,
                                    "stabilised": bool(getattr(fm, "stabilize", False)),
                                    "features": m, "decay": decay_code, "normalize": normalize}, q.device)
    kw = dict(feature_map=fm, decay=decay, normalize=normalize, chunk_size=chunk_size)
    return _LASP.apply(q, k, v, group, kw, (b, h, m, v.shape[-1] + 1), work)
