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

It approximates its own kernel ``p``, not softmax: compare with :func:`yoso_expectation`. Gradients flow to
``v``; the hash codes are piecewise constant, so ``q`` and ``k`` get no gradient from the estimator (the
paper's LSH-estimated backward for q and k is not implemented).
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
    return k, v, _codes(qn, planes), _codes(kn, planes)


def _finish(num, den, normalize, dtype):
    if not normalize:
        return num.to(dtype)
    # No collision at all in any hash: the estimate of sum_j p is 0; the output is 0 there.
    return (num / den.clamp_min(1e-30)[..., None] * (den > 0)[..., None]).to(dtype)


def yoso_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tau: int = 8, num_hashes: int = 32,
                   normalize: bool = False, causal: bool = False, seed: int = 0,
                   scale: float | None = None) -> torch.Tensor:
    """YOSO attention (LSH estimate). ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` ->
    ``[b, h, n, dv]``. ``scale`` is accepted for interface parity and unused (the kernel is angular)."""
    k, v, cq, ck = _setup(q, k, v, tau, num_hashes, seed)
    b, h, n, _ = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    acc = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    # An extra column of ones in V counts the collisions (the denominator for normalize=True).
    v1 = torch.cat([v.to(acc), torch.ones(b, h, nk, 1, dtype=acc, device=v.device)], dim=-1)
    total = torch.zeros(b, h, n, dv + 1, dtype=acc, device=v.device)
    buckets = 1 << tau
    for m in range(num_hashes):
        qc, kc = cq[:, :, m], ck[:, :, m]
        if not causal:
            table = torch.zeros(b, h, buckets, dv + 1, dtype=acc, device=v.device)
            table.scatter_add_(2, kc[..., None].expand(-1, -1, -1, dv + 1), v1)
            total += table.gather(2, qc[..., None].expand(-1, -1, -1, dv + 1))
            continue
        # Keys sorted by (bucket, position); query i sums the run of its bucket up to position i.
        key = kc * nk + torch.arange(nk, device=v.device)
        key_sorted, order = key.sort(dim=-1)
        csum = F.pad(v1.gather(2, order[..., None].expand(-1, -1, -1, dv + 1)).cumsum(2), (0, 0, 1, 0))
        pos = torch.arange(n, device=v.device).clamp_max(nk - 1) if n > 0 else None
        hi = torch.searchsorted(key_sorted, (qc * nk + pos).contiguous(), right=True)
        lo = torch.searchsorted(key_sorted, (qc * nk).contiguous(), right=False)
        total += (csum.gather(2, hi[..., None].expand(-1, -1, -1, dv + 1))
                  - csum.gather(2, lo[..., None].expand(-1, -1, -1, dv + 1)))
    total = total / num_hashes
    return _finish(total[..., :dv], total[..., dv], normalize, v.dtype)


def yoso_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tau: int = 8, num_hashes: int = 32,
                   normalize: bool = False, causal: bool = False, seed: int = 0, scale: float | None = None,
                   return_attention: bool = False):
    """Plain reference: the collision-frequency matrix ``C_ij = mean_m [h_m(q_i) = h_m(k_j)]``
    (``[b, h, n, n_k]``, float64) times V, with the same hyperplanes as :func:`yoso_attention`."""
    k, v, cq, ck = _setup(q, k, v, tau, num_hashes, seed)
    c = (cq[..., :, None] == ck[..., None, :]).double().mean(dim=2)
    if causal:
        c = c * causal_mask(q.shape[2], k.shape[2], q.device)
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
