"""Fourier KArAt, the paper's modular (low-rank) learnable attention: Maity, Hitsman, Li & Dutta, "Kolmogorov-Arnold
Attention: Is Learnable Attention Better For Vision Transformers?" (arXiv 2503.10632v3), Sec. 3-4, Eq. 1-2,
Algorithm 1 (projection onto the simplex) and Algorithm 2 (Fourier KArAt in a ViT block).

Per head, with logits ``A = Q K^T / sqrt(d)`` ``[N, N]``, the softmax of each row ``A_k`` is replaced by a learned
operator. The full operator (Eq. 1) is a KAN layer ``R^N -> R^N`` with ``N^2`` learnable units; the paper's
modular version (Sec. 4, configuration (i) of App. C.5.1) is rank ``r``:

    Phi(A_k)_p = sum_{q=1..N} phi_pq(A_kq),   phi_pq(x) = sum_{m=1..G} a_pqm cos(m x) + b_pqm sin(m x)   (Eq. 2)
    sigma(A_k) = W Phi(A_k),   Phi: R^N -> R^r,  W in R^{N x r},   out = sigma(A) V.

Each unit ``phi_pq`` depends on the output index ``p`` and the key position ``q``, so the operator mixes the whole
row (not an elementwise activation) and needs a fixed ``N``: the paper notes it cannot run on varying lengths.
Optionally ``Phi(A_k)`` is projected onto the probability simplex first (Algorithm 1; App. C.4.5 finds it
degrades accuracy, so it is off by default). The paper's defaults: ``G = 3``, ``r = 12``, no base activation
(``b(x) = 0``). Cost ``O(N^2 r G)`` per head; not efficiency-oriented (the paper says so).
"""

from __future__ import annotations

import torch

from attnkit._checks import check_qkv, repeat_kv

__all__ = ["simplex_projection", "fourier_karat", "fourier_karat_reference"]


def simplex_projection(y: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``y`` onto the probability simplex along ``dim`` (Algorithm 1 of the paper; App. B):
    sort ``u_(1) >= .. >= u_(m)``, ``rho = max{i : u_(i) - (sum_{j<=i} u_(j) - 1) / i > 0}``,
    ``lambda = (sum_{j<=rho} u_(j) - 1) / rho``, ``x = max(y - lambda, 0)``."""
    y = y.movedim(dim, -1)
    u = torch.sort(y, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    i = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    rho = ((u - css / i) > 0).sum(-1, keepdim=True)  # the condition holds exactly for i <= rho
    lam = css.gather(-1, rho - 1) / rho.to(y.dtype)
    return (y - lam).clamp_min(0).movedim(-1, dim)


def _check(q, k, v, coef_cos, coef_sin, proj):
    check_qkv(q, k, v)
    h, n = q.shape[1], q.shape[2]
    if k.shape[2] != n:
        raise ValueError(f"Fourier KArAt is self-attention over one fixed length: q has {n} tokens, k {k.shape[2]}")
    if coef_cos.dim() != 4 or coef_cos.shape != coef_sin.shape or coef_cos.shape[0] != h or coef_cos.shape[2] != n:
        raise ValueError(f"coef_cos and coef_sin must be [heads={h}, rank, N={n}, grid], got {tuple(coef_cos.shape)} "
                         f"and {tuple(coef_sin.shape)}; the operator is built for one sequence length N")
    if proj.shape != (h, n, coef_cos.shape[1]):
        raise ValueError(f"proj must be [heads, N, rank] = {(h, n, coef_cos.shape[1])}, got {tuple(proj.shape)}")


def fourier_karat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coef_cos: torch.Tensor, coef_sin: torch.Tensor,
                  proj: torch.Tensor, *, l1_projection: bool = False, chunk: int = 64) -> torch.Tensor:
    """Fourier KArAt (module docstring) on ``q, k [batch, heads | kv_heads, N, d]``, ``v [.., N, d_v]`` with
    ``coef_cos = a``, ``coef_sin = b`` ``[heads, r, N, G]`` and ``proj = W`` ``[heads, N, r]``. Query rows are
    processed ``chunk`` at a time (features ``[batch, heads, chunk, N, G]``). Returns ``[batch, heads, N, d_v]``."""
    _check(q, k, v, coef_cos, coef_sin, proj)
    h, d = q.shape[1], q.shape[-1]
    kk, vv = repeat_kv(k, h), repeat_kv(v, h)
    dt = q.dtype
    a, b, w = coef_cos.to(dt), coef_sin.to(dt), proj.to(dt)
    m = torch.arange(1, a.shape[-1] + 1, device=q.device, dtype=dt)
    outs = []
    for s in range(0, q.shape[2], chunk):
        logits = q[:, :, s:s + chunk] @ kk.transpose(-1, -2) * d ** -0.5  # [b, h, c, N]
        x = logits[..., None] * m  # [b, h, c, N, G]
        phi = torch.einsum("bhcqm,hpqm->bhcp", torch.cos(x), a) + torch.einsum("bhcqm,hpqm->bhcp", torch.sin(x), b)
        if l1_projection:
            phi = simplex_projection(phi)
        sigma = torch.einsum("bhcp,hnp->bhcn", phi, w)  # [b, h, c, N]
        outs.append(sigma @ vv)
    return torch.cat(outs, dim=2)


def fourier_karat_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coef_cos: torch.Tensor,
                            coef_sin: torch.Tensor, proj: torch.Tensor, *, l1_projection: bool = False) -> torch.Tensor:
    """The same, term by term: for every learnable unit ``(p, q)`` and grid point ``m``, add
    ``a_pqm cos(m A_kq) + b_pqm sin(m A_kq)`` to ``Phi_p``; then ``sigma = W Phi``, ``out = sigma V``."""
    _check(q, k, v, coef_cos, coef_sin, proj)
    h, d = q.shape[1], q.shape[-1]
    logits = q @ repeat_kv(k, h).transpose(-1, -2) / d ** 0.5  # [b, h, N, N]
    r, grid = coef_cos.shape[1], coef_cos.shape[-1]
    a, b = coef_cos.to(q.dtype), coef_sin.to(q.dtype)
    phi = []
    for p in range(r):
        acc = torch.zeros_like(logits[..., 0])
        for mm in range(1, grid + 1):
            unit = a[None, :, p, :, mm - 1, None].transpose(-1, -2) * torch.cos(mm * logits)
            unit = unit + b[None, :, p, :, mm - 1, None].transpose(-1, -2) * torch.sin(mm * logits)
            acc = acc + unit.sum(-1)  # sum over key positions q
        phi.append(acc)
    phi = torch.stack(phi, dim=-1)  # [b, h, N, r]
    if l1_projection:
        phi = simplex_projection(phi)
    sigma = phi @ proj.to(q.dtype).transpose(-1, -2)[None]  # [b, h, N, N]
    return sigma @ repeat_kv(v, h)
