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
gradient of the expectation). The backward costs O(n num_hashes dv d) time and 2^tau (dv + 1) d table
entries per head; ``causal=True`` is handled block by block (running tables plus an in-block quadratic part).
``lsh_backward=False`` gives ``q`` and ``k`` no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.ops.approx._common import causal_mask, check_positive_int, prepare, randn

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


def _outer_table(codes: torch.Tensor, a: torch.Tensor, x: torch.Tensor, buckets: int, chunk: int) -> torch.Tensor:
    """``T[s] = sum_{r: codes_r = s} a_r x_r^T``: ``codes [b, h, L]``, ``a [b, h, L, e]``, ``x [b, h, L, d]`` ->
    ``[b, h, buckets, e * d]``, accumulated ``chunk`` rows at a time (never ``L e d`` at once)."""
    b, h, rows, e = a.shape
    d = x.shape[-1]
    table = torch.zeros(b, h, buckets, e * d, dtype=a.dtype, device=a.device)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        outer = (a[:, :, start:stop, :, None] * x[:, :, start:stop, None, :]).flatten(-2)
        table.scatter_add_(2, codes[:, :, start:stop, None].expand(-1, -1, -1, e * d), outer)
    return table


def _contract(table: torch.Tensor, codes: torch.Tensor, a: torch.Tensor, chunk: int) -> torch.Tensor:
    """``out_r = a_r^T T[codes_r]`` for ``table [b, h, S, e * d]``, ``codes [b, h, L]``, ``a [b, h, L, e]`` ->
    ``[b, h, L, d]``."""
    b, h, rows, e = a.shape
    d = table.shape[-1] // e
    out = torch.empty(b, h, rows, d, dtype=a.dtype, device=a.device)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        t = table.gather(2, codes[:, :, start:stop, None].expand(-1, -1, -1, e * d)).unflatten(-1, (e, d))
        out[:, :, start:stop] = torch.einsum("bhce,bhced->bhcd", a[:, :, start:stop], t)
    return out


def _bucket_sums(codes: torch.Tensor, a: torch.Tensor, buckets: int) -> torch.Tensor:
    e = a.shape[-1]
    table = torch.zeros(*a.shape[:2], buckets, e, dtype=a.dtype, device=a.device)
    return table.scatter_add_(2, codes[..., None].expand(-1, -1, -1, e), a)


def _read(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return table.gather(2, codes[..., None].expand(-1, -1, -1, table.shape[-1]))


def _lsh_backward(qn, kn, v1, g, cq, ck, tau, causal, chunk, need_qk=True):
    """The paper's LSH backward: gradients of ``YOSO-E(q^, k^, v1)`` for upstream ``g [b, h, n, e]`` (see the
    module docstring): exact in ``v1``, the ``(tau/2) p`` surrogate in ``q^`` and ``k^`` (zeros, and no table
    work, when ``need_qk`` is False)."""
    num_hashes = cq.shape[2]
    n, nk = qn.shape[2], kn.shape[2]
    buckets = 1 << tau
    gq, gk, gv = torch.zeros_like(qn), torch.zeros_like(kn), torch.zeros_like(v1)
    for m in range(num_hashes):
        qc, kc = cq[:, :, m].contiguous(), ck[:, :, m].contiguous()
        if not causal:
            gv += _read(_bucket_sums(qc, g, buckets), kc)
            if need_qk:
                gq += _contract(_outer_table(kc, v1, kn, buckets, chunk), qc, g, chunk)
                gk += _contract(_outer_table(qc, g, qn, buckets, chunk), kc, v1, chunk)
            continue
        # Causal (j <= i): blocks of positions; earlier (later) blocks through running tables, the block
        # itself by its masked collision matrix.
        num_blocks = math.ceil(max(n, nk) / chunk)

        def spans(t):
            t0, t1 = t * chunk, (t + 1) * chunk
            return slice(min(t0, n), min(t1, n)), slice(min(t0, nk), min(t1, nk))

        def collisions(qs, ks, qc=qc, kc=kc):
            same = qc[:, :, qs, None] == kc[:, :, None, ks]
            i = torch.arange(qs.start, qs.stop, device=qn.device)[:, None]
            j = torch.arange(ks.start, ks.stop, device=qn.device)[None, :]
            return (same & (j <= i)).to(g.dtype)

        keys_table = torch.zeros(*qn.shape[:2], buckets, v1.shape[-1] * kn.shape[-1], dtype=g.dtype,
                                 device=g.device)
        for t in range(num_blocks if need_qk else 0):
            qs, ks = spans(t)
            if qs.stop > qs.start:
                gq[:, :, qs] += _contract(keys_table, qc[:, :, qs], g[:, :, qs], chunk)
                if ks.stop > ks.start:
                    w = (g[:, :, qs] @ v1[:, :, ks].transpose(-1, -2)) * collisions(qs, ks)
                    gq[:, :, qs] += w @ kn[:, :, ks]
            if ks.stop > ks.start:
                keys_table += _outer_table(kc[:, :, ks], v1[:, :, ks], kn[:, :, ks], buckets, chunk)
        query_table = torch.zeros_like(keys_table)
        query_sums = torch.zeros(*qn.shape[:2], buckets, g.shape[-1], dtype=g.dtype, device=g.device)
        for t in reversed(range(num_blocks)):
            qs, ks = spans(t)
            if ks.stop > ks.start:
                gv[:, :, ks] += _read(query_sums, kc[:, :, ks])
                if need_qk:
                    gk[:, :, ks] += _contract(query_table, kc[:, :, ks], v1[:, :, ks], chunk)
                if qs.stop > qs.start:
                    c = collisions(qs, ks).transpose(-1, -2)  # [b, h, keys, queries]
                    gv[:, :, ks] += c @ g[:, :, qs]
                    if need_qk:
                        w = (v1[:, :, ks] @ g[:, :, qs].transpose(-1, -2)) * c
                        gk[:, :, ks] += w @ qn[:, :, qs]
            if qs.stop > qs.start:
                if need_qk:
                    query_table += _outer_table(qc[:, :, qs], g[:, :, qs], qn[:, :, qs], buckets, chunk)
                query_sums += _bucket_sums(qc[:, :, qs], g[:, :, qs], buckets)
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
    k, v, qn, kn, cq, ck = _setup(q, k, v, tau, num_hashes, seed)
    b, h, _, _ = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    acc = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    # An extra column of ones in V counts the collisions (the denominator for normalize=True).
    v1 = torch.cat([v.to(acc), torch.ones(b, h, nk, 1, dtype=acc, device=v.device)], dim=-1)
    if lsh_backward and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        total = _YosoLSH.apply(qn.to(acc), kn.to(acc), v1, cq, ck, tau, causal, chunk_size)
    else:
        total = _estimate(v1, cq, ck, tau, causal)
    return _finish(total[..., :dv], total[..., dv], normalize, v.dtype)


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
