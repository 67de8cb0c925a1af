"""Loki: pick each query's top-k keys by scores in a low-rank PCA key space, then attend exactly to them.

Singhania et al., "Loki: Low-Rank Keys for Efficient Sparse Attention", NeurIPS 2024. With an orthogonal
basis ``P [d, d]`` whose columns are the principal directions of the keys (descending variance)::

    s~_ij = (q_i P_r) . (k_j P_r)        (r = rank leading directions)
    S_i   = top_k_j s~_ij               (j <= i when causal)
    out_i = softmax_{j in S_i}(q_i . k_j s) v_j

Because ``P`` is orthogonal, ``(qP).(kP) = q.k``: with ``rank = d`` the selection is the true top-k, and
with ``top_k >= n`` the result is exact attention. The basis is either given (calibrated offline, as in
the paper: :func:`pca_basis` of calibration keys) or, non-causal only, computed per call from the keys'
uncentred second moment ``K^T K`` (its leading eigenvectors give the best rank-r approximation of the dot
products); the causal form needs a given basis unless ``rank = d``. The fast path works on chunks of queries:
memory O(chunk x n) for the low-rank scores plus O(chunk x top_k x d) for the gathered keys.
"""

from __future__ import annotations

import torch

from attnkit.ops.approx._common import (
    causal_mask,
    check_positive_int,
    exact_attention,
    masked_attention_lse,
    prepare,
    upcast,
)
from attnkit.ops.approx.retrieval import attend_selected

__all__ = ["loki_attention", "loki_reference", "pca_basis"]


def pca_basis(k: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``[b, h, d, d]`` basis of the keys ``k [b, h, n, d]``: eigenvectors of ``K^T K``, columns
    in descending eigenvalue order."""
    kk = upcast(k).transpose(-1, -2) @ upcast(k)
    _, vecs = torch.linalg.eigh(kk)  # ascending
    return vecs.flip(-1).to(k.dtype)


def _setup(q, k, v, top_k, rank, basis, scale, causal):
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("top_k", top_k)
    d = q.shape[-1]
    rank = d if rank is None else rank
    check_positive_int("rank", rank)
    if rank > d:
        raise ValueError(f"rank={rank} is more than the head dim {d}; use rank <= {d} (rank = d is exact)")
    if basis is None and causal and rank < d:
        raise ValueError(
            "causal Loki with rank < head dim needs a basis calibrated beforehand (a PCA of the keys of this "
            "very sequence would let future keys steer past queries' selection): pass "
            "basis=pca_basis(calibration_keys), or rank=None (full rank, where the basis does not matter)"
        )
    if basis is None:
        basis = pca_basis(k) if rank < d else torch.eye(d, dtype=q.dtype, device=q.device)
    basis = basis.to(q.dtype)
    if basis.shape[-2:] != (d, d):
        raise ValueError(f"basis must be [heads, {d}, {d}] or [batch, heads, {d}, {d}], got {tuple(basis.shape)}")
    p = basis[..., :rank]
    # Low-rank scores in at least float32, so the fast path and the reference select alike.
    return k, v, scale, upcast(q @ p), upcast(k @ p)


def loki_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int = 64,
                   rank: int | None = None, basis: torch.Tensor | None = None, causal: bool = False,
                   chunk_size: int = 128, scale: float | None = None, return_attention: bool = False):
    """Plain reference: full ``[n, n_k]`` low-rank scores, a top-k selection mask, masked softmax (float64)."""
    k, v, scale, qr, kr = _setup(q, k, v, top_k, rank, basis, scale, causal)
    approx = qr @ kr.transpose(-1, -2)
    allowed = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    if allowed is not None:
        approx = approx.masked_fill(~allowed, float("-inf"))
    idx = approx.topk(min(top_k, k.shape[2]), dim=-1).indices
    mask = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, idx, True)
    if allowed is not None:
        mask = mask & allowed
    s = q.double() @ k.double().transpose(-1, -2) * scale
    out, _ = masked_attention_lse(s, v.double(), mask)
    if not return_attention:
        return out.to(q.dtype)
    return out.to(q.dtype), torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)


def loki_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int = 64,
                   rank: int | None = None, basis: torch.Tensor | None = None, causal: bool = False,
                   chunk_size: int = 128, scale: float | None = None) -> torch.Tensor:
    """Loki attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``.

    ``top_k`` keys per query, chosen in ``rank`` (default d) PCA dimensions of ``basis`` (``[h, d, d]`` or
    ``[b, h, d, d]``, orthogonal, columns by importance; default: computed from ``k``).
    """
    check_positive_int("chunk_size", chunk_size)
    if top_k >= k.shape[2] and isinstance(top_k, int) and top_k > 0:
        # Every key is selected: exact attention (still validate the other arguments).
        _setup(q, k, v, top_k, rank, basis, scale, causal)
        return exact_attention(q, k, v, causal=causal, scale=scale)
    k, v, scale, qr, kr = _setup(q, k, v, top_k, rank, basis, scale, causal)
    b, h, n, d = q.shape
    nk = k.shape[2]
    out = torch.empty(b, h, n, v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        approx = qr[:, :, start:stop] @ kr.transpose(-1, -2)  # [b, h, c, n_k]
        if causal:
            approx = approx.masked_fill(~causal_mask(n, nk, q.device)[start:stop], float("-inf"))
        sel = approx.topk(top_k, dim=-1)
        # Early causal rows have fewer than top_k visible keys: the extra picks carry -inf. The last step is the
        # one IceFormer, RetrievalAttention and SEA share (attend each query's selected keys).
        o, _ = attend_selected(q[:, :, start:stop], k, v, sel.indices, torch.isfinite(sel.values), scale)
        out[:, :, start:stop] = o
    return out
