"""YOSO: attention weights replaced by LSH collision probabilities, estimated by Bernoulli sampling.

Zeng et al., "You Only Sample (Almost) Once: Linear Cost Self-Attention Via Bernoulli Sampling", ICML 2021.
Queries and keys are unit-normalised. With ``tau`` concatenated SimHash hyperplanes, q and k collide with
probability ``p(q, k) = (1 - arccos(q.k) / pi)^tau``, and YOSO's output is the expectation

    YOSO-E(q_i) = sum_j p(q_i, k_j) v_j,

estimated by ``num_hashes`` independent hashes: hash every key into one of ``2^tau`` buckets, add V per
bucket, and read each query's bucket; average the hashes. O(n num_hashes (tau d + dv)) time, O(2^tau dv)
per table. ``normalize=True`` (an attnkit option) divides by the same estimate of ``sum_j p(q_i, k_j)``,
giving a normalised kernel attention that is comparable with softmax. ``causal=True`` (an attnkit
extension) counts only keys j <= i by prefix sums over keys sorted by (bucket, position).

It approximates its own kernel ``p``, not softmax: compare with :func:`yoso_expectation`.

Gradients. ``v`` gets the exact gradient of the estimate. The hash codes are piecewise constant, so the
estimate itself has zero derivative in ``q`` and ``k``; with ``lsh_backward=True`` (default) they get the
paper's backward (sec. 3.3; the ``lsh_weighted_cumulation`` backward of the authors' code): the derivative of
``p(x) = (1 - arccos(x)/pi)^tau`` is replaced by ``(tau / 2) p(x)`` and estimated with the *same* collisions,

    dL/dq^_i = (tau/2) sum_j C_ij (g_i . v_j) k^_j,   dL/dk^_j = (tau/2) sum_i C_ij (g_i . v_j) q^_i

(``C``: collision frequencies, ``q^, k^``: unit vectors; autograd carries on through the normalisation). The
true derivative is ``tau p^((tau-1)/tau) / (pi sqrt(1 - x^2))``, which no bucket table can estimate (its
``1/sin(theta)`` factor is pairwise); near ``x = 0``, where random high-dimensional pairs sit, it is
``4/pi`` times the surrogate, so the surrogate points the same way with a smaller norm (the tests measure
both: the LSH estimate converges to the surrogate's closed form as hashes grow, and its cosine to the exact
gradient of the expectation). The backward visits, per hash, every colliding pair once (queries and keys
sorted by bucket, matmuls over each bucket's run; with ``j <= i`` when causal): O(num_hashes n^2 / 2^tau
(d + dv)) for balanced buckets, O(chunk x run) memory.
``lsh_backward=False`` gives ``q`` and ``k`` no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit._checks import check_qkv
from attnkit.ops.approx._common import (
    causal_mask,
    check_positive_int,
    finite_rows,
    prepare,
    propagate_nonfinite,
    randn,
    sort_by,
    unsort,
)

__all__ = ["yoso_attention", "yoso_reference", "yoso_expectation"]


def _codes(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """SimHash codes ``[b, h, m, n]`` of ``x [b, h, n, d]`` under ``planes [m, h, d, tau]``."""
    bits = torch.einsum("bhnd,mhdt->bhmnt", x, planes.to(x.dtype)) > 0
    return (bits.long() << torch.arange(bits.shape[-1], device=x.device)).sum(-1)


def _setup(q, k, v, tau, num_hashes, seed):
    check_positive_int("tau", tau)
    check_positive_int("num_hashes", num_hashes)
    if tau > 20:
        raise ValueError(f"tau={tau} gives 2^{tau} buckets per hash table; use tau <= 20")
    k, v, _ = prepare(q, k, v, None)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    planes = randn((num_hashes, q.shape[1], q.shape[-1], tau), seed, q)
    return k, v, qn, kn, _codes(qn.detach(), planes), _codes(kn.detach(), planes)


def _finish(num, den, normalize, dtype):
    if not normalize:
        return num.to(dtype)
    # No collision at all in any hash: the estimate of sum_j p is 0; the output is 0 there.
    return (num / den.clamp_min(1e-30)[..., None] * (den > 0)[..., None]).to(dtype)


def _estimate(v1: torch.Tensor, cq: torch.Tensor, ck: torch.Tensor, tau: int, causal: bool) -> torch.Tensor:
    """``mean_m sum_j [h_m(q_i) = h_m(k_j)] (j <= i if causal) v1_j``: ``v1 [b, h, n_k, e]``, codes ``cq [b, h,
    m, n]``, ``ck [b, h, m, n_k]`` -> ``[b, h, n, e]`` (differentiable in ``v1``)."""
    b, h, num_hashes, n = cq.shape
    nk, e = v1.shape[2], v1.shape[-1]
    total = torch.zeros(b, h, n, e, dtype=v1.dtype, device=v1.device)
    buckets = 1 << tau
    for m in range(num_hashes):
        qc, kc = cq[:, :, m], ck[:, :, m]
        if not causal:
            table = torch.zeros(b, h, buckets, e, dtype=v1.dtype, device=v1.device)
            table = table.scatter_add(2, kc[..., None].expand(-1, -1, -1, e), v1)
            total = total + table.gather(2, qc[..., None].expand(-1, -1, -1, e))
            continue
        # Keys sorted by (bucket, position); query i sums the run of its bucket up to position i.
        key = kc * nk + torch.arange(nk, device=v1.device)
        key_sorted, order = key.sort(dim=-1)
        csum = F.pad(v1.gather(2, order[..., None].expand(-1, -1, -1, e)).cumsum(2), (0, 0, 1, 0))
        pos = torch.arange(n, device=v1.device).clamp_max(nk - 1)
        hi = torch.searchsorted(key_sorted, (qc * nk + pos).contiguous(), right=True)
        lo = torch.searchsorted(key_sorted, (qc * nk).contiguous(), right=False)
        total = total + (csum.gather(2, hi[..., None].expand(-1, -1, -1, e))
                         - csum.gather(2, lo[..., None].expand(-1, -1, -1, e)))
    return total / num_hashes


def _grouped_pair_sums(a: torch.Tensor | None, ga: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor,
                       gb: torch.Tensor, *, chunk: int, rpos: torch.Tensor | None = None,
                       cpos: torch.Tensor | None = None, cols_before: bool = True) -> torch.Tensor:
    """``out_r = sum_{c: gb_c = ga_r} w_rc x_c`` with ``w_rc = a_r . b_c`` (1 when ``a`` is None), over rows
    sorted by group ``ga [B, H, R]`` and columns sorted by group ``gb [B, H, C]`` (``a [B, H, R, e]``, ``b [B, H,
    C, e]``, ``x [B, H, C, d]``). With positions ``rpos``, ``cpos``: only columns with ``cpos <= rpos``
    (``cols_before``) or ``cpos >= rpos``. Each chunk of sorted rows reads the contiguous run of sorted columns
    of its groups, so the work is matmuls over runs, memory O(chunk x run)."""
    rows, cols, d = ga.shape[-1], gb.shape[-1], x.shape[-1]
    gb = gb.contiguous()
    out = []
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        g = ga[..., start:stop]
        lo = torch.searchsorted(gb, g[..., :1].contiguous(), right=False)
        hi = torch.searchsorted(gb, g[..., -1:].contiguous(), right=True)
        width = max(int((hi - lo).max()), 1)
        idx = lo + torch.arange(width, device=gb.device)
        valid = idx < hi
        idx = idx.clamp_max(cols - 1)
        mask = valid[..., None, :] & (g[..., :, None] == gb.gather(-1, idx)[..., None, :])
        if rpos is not None:
            cp, rp = cpos.gather(-1, idx)[..., None, :], rpos[..., start:stop, None]
            mask = mask & ((cp <= rp) if cols_before else (cp >= rp))
        xc = x.gather(2, idx[..., None].expand(-1, -1, -1, d))
        if a is None:
            w = mask.to(x.dtype)
        else:
            bc = b.gather(2, idx[..., None].expand(-1, -1, -1, b.shape[-1]))
            w = (a[:, :, start:stop] @ bc.transpose(-1, -2)) * mask
        out.append(w @ xc)
    return torch.cat(out, dim=2)


def _lsh_backward(qn, kn, v1, g, cq, ck, tau, causal, chunk, need_qk=True):
    """The paper's LSH backward: gradients of ``YOSO-E(q^, k^, v1)`` for upstream ``g [b, h, n, e]`` (see the
    module docstring): exact in ``v1``, the ``(tau/2) p`` surrogate in ``q^`` and ``k^`` (zeros, and no work,
    when ``need_qk`` is False). Per hash, queries and keys are sorted by (bucket, position) and every pair of a
    bucket is visited once, by matmuls over the sorted runs (O(n^2 / 2^tau (d + dv)) per hash for balanced
    buckets)."""
    b, h, num_hashes, n = cq.shape
    nk, e, d = kn.shape[2], v1.shape[-1], qn.shape[-1]
    gq, gk, gv = torch.zeros_like(qn), torch.zeros_like(kn), torch.zeros_like(v1)
    buckets = 1 << tau
    # Sorted rows per step: a few buckets' worth (a chunk's run of columns covers the buckets it spans, so a
    # chunk much longer than a bucket computes mostly masked pairs).
    chunk = max(16, min(chunk, 4 * math.ceil(max(n, nk) / buckets)))
    # Hashes in groups folded into the head axis (fewer, larger ops); a group's copies stay under ~2^25 values.
    group = max(1, min(num_hashes, (1 << 25) // max(1, b * h * max(n, nk) * (e + d))))

    def fold(x, count):  # [b, h, L, f] -> [b, h * count, L, f], the same rows for every hash of the group
        return x[:, :, None].expand(b, h, count, *x.shape[2:]).reshape(b, h * count, *x.shape[2:])

    def unfold_sum(x, count):  # [b, h * count, L, f] -> [b, h, L, f], summed over the group's hashes
        return x.view(b, h, count, *x.shape[2:]).sum(2)

    for m0 in range(0, num_hashes, group):
        cnt = min(group, num_hashes - m0)
        qc = cq[:, :, m0:m0 + cnt].reshape(b, h * cnt, n)
        kc = ck[:, :, m0:m0 + cnt].reshape(b, h * cnt, nk)
        q_order = torch.argsort(qc * n + torch.arange(n, device=qc.device), dim=-1)
        k_order = torch.argsort(kc * nk + torch.arange(nk, device=kc.device), dim=-1)
        qc_s, kc_s = qc.gather(-1, q_order), kc.gather(-1, k_order)
        pos = dict(rpos=q_order, cpos=k_order) if causal else {}
        kpos_ = dict(rpos=k_order, cpos=q_order, cols_before=False) if causal else {}
        g_s, v1_s = sort_by(fold(g, cnt), q_order), sort_by(fold(v1, cnt), k_order)
        if causal:
            gv += unfold_sum(unsort(_grouped_pair_sums(None, kc_s, None, g_s, qc_s, chunk=chunk, **kpos_),
                                    k_order), cnt)
        else:
            table = torch.zeros(b, h * cnt, buckets, e, dtype=g.dtype, device=g.device)
            table = table.scatter_add_(2, qc[..., None].expand(-1, -1, -1, e), fold(g, cnt))
            gv += unfold_sum(table.gather(2, kc[..., None].expand(-1, -1, -1, e)), cnt)
        if need_qk:
            kn_s, qn_s = sort_by(fold(kn, cnt), k_order), sort_by(fold(qn, cnt), q_order)
            gq += unfold_sum(unsort(_grouped_pair_sums(g_s, qc_s, v1_s, kn_s, kc_s, chunk=chunk, **pos), q_order),
                             cnt)
            gk += unfold_sum(unsort(_grouped_pair_sums(v1_s, kc_s, g_s, qn_s, qc_s, chunk=chunk, **kpos_),
                                    k_order), cnt)
    half_tau = tau / 2
    return gq * (half_tau / num_hashes), gk * (half_tau / num_hashes), gv / num_hashes


class _YosoLSH(torch.autograd.Function):
    """YOSO-E estimate with the paper's LSH backward for q^ and k^ (exact backward for v1)."""

    @staticmethod
    def forward(ctx, qn, kn, v1, cq, ck, tau, causal, chunk):
        ctx.save_for_backward(qn, kn, v1, cq, ck)
        ctx.tau, ctx.causal, ctx.chunk = tau, causal, chunk
        return _estimate(v1, cq, ck, tau, causal)

    @staticmethod
    def backward(ctx, g):
        qn, kn, v1, cq, ck = ctx.saved_tensors
        need_qk = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        gq, gk, gv = _lsh_backward(qn, kn, v1, g.contiguous(), cq, ck, ctx.tau, ctx.causal, ctx.chunk, need_qk)
        return (gq if ctx.needs_input_grad[0] else None, gk if ctx.needs_input_grad[1] else None, gv,
                None, None, None, None, None)


def yoso_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tau: int = 8, num_hashes: int = 32,
                   normalize: bool = False, causal: bool = False, seed: int = 0, lsh_backward: bool = True,
                   chunk_size: int = 256, scale: float | None = None) -> torch.Tensor:
    """YOSO attention (LSH estimate). ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` ->
    ``[b, h, n, dv]``. ``lsh_backward``: the paper's LSH-estimated gradient for q and k (else none);
    ``chunk_size``: rows per step of that backward. ``scale`` is accepted for interface parity and unused (the
    kernel is angular)."""
    check_positive_int("chunk_size", chunk_size)
    check_qkv(q, k, v)
    k0, v0 = k, v  # non-finite rows hash and sum as zeros; propagate_nonfinite puts NaN where dense attention has it
    k, v, qn, kn, cq, ck = _setup(q, finite_rows(k), finite_rows(v), tau, num_hashes, seed)
    b, h, _, _ = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    acc = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    # An extra column of ones in V counts the collisions (the denominator for normalize=True).
    v1 = torch.cat([v.to(acc), torch.ones(b, h, nk, 1, dtype=acc, device=v.device)], dim=-1)
    if lsh_backward and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        total = _YosoLSH.apply(qn.to(acc), kn.to(acc), v1, cq, ck, tau, causal, chunk_size)
    else:
        total = _estimate(v1, cq, ck, tau, causal)
    # a NaN key or value would hash to some bucket and vanish from the estimate: NaN rows, as dense attention
    return propagate_nonfinite(_finish(total[..., :dv], total[..., dv], normalize, v.dtype), q, k0, v0, causal)


def yoso_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tau: int = 8, num_hashes: int = 32,
                   normalize: bool = False, causal: bool = False, seed: int = 0, lsh_backward: bool = True,
                   chunk_size: int = 256, scale: float | None = None, return_attention: bool = False):
    """Plain reference: the collision-frequency matrix ``C_ij = mean_m [h_m(q_i) = h_m(k_j)]``
    (``[b, h, n, n_k]``, float64) times V, with the same hyperplanes as :func:`yoso_attention`. With
    ``lsh_backward`` it adds the zero-valued ``(tau/2) C * (S - sg(S))``, ``S = q^ k^T``, whose gradient is
    the paper's surrogate."""
    k, v, qn, kn, cq, ck = _setup(q, k, v, tau, num_hashes, seed)
    c = (cq[..., :, None] == ck[..., None, :]).double().mean(dim=2)
    if causal:
        c = c * causal_mask(q.shape[2], k.shape[2], q.device)
    if lsh_backward:
        sim = qn.double() @ kn.double().transpose(-1, -2)
        c = c + (tau / 2) * c * (sim - sim.detach())
    den = c.sum(-1)
    out = _finish(c @ v.double(), den, normalize, q.dtype)
    if not return_attention:
        return out
    return out, (c / den.clamp_min(1e-30)[..., None] if normalize else c)


def yoso_expectation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tau: int = 8,
                     normalize: bool = False, causal: bool = False, return_attention: bool = False, **_):
    """The closed form YOSO estimates (float64): ``sum_j (1 - arccos(q_i.k_j) / pi)^tau v_j`` over unit
    q, k (normalised by ``sum_j p`` when ``normalize``)."""
    k, v, _ = prepare(q, k, v, None)
    cos = F.normalize(q.double(), dim=-1) @ F.normalize(k.double(), dim=-1).transpose(-1, -2)
    p = (1 - torch.arccos(cos.clamp(-1, 1)) / math.pi) ** tau
    if causal:
        p = p * causal_mask(q.shape[2], k.shape[2], q.device)
    den = p.sum(-1)
    out = _finish(p @ v.double(), den, normalize, q.dtype)
    if not return_attention:
        return out
    return out, (p / den[..., None] if normalize else p)
