"""Linformer: learned projections of the sequence axis of keys and values.

Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020. With ``E, F in R^{k x n}``::

    out = softmax(Q (E K)^T s) (F V)

O(n k d) time and memory. The implied n x n attention matrix is ``softmax(Q (E K)^T s) F``. With
``E = F = I`` (k = n) it is exact softmax attention. Inputs shorter than the ``n`` the projections were built
for use the first columns of E and F, which equals zero-padding the sequence. No causal form: projecting the
sequence axis mixes future tokens into every projected key.
"""

from __future__ import annotations

import torch

from attnkit.ops.approx._common import prepare, refuse_causal

__all__ = ["linformer_attention", "linformer_reference"]


def _project(p: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``p [k, n_max]`` or ``[h, k, n_max]`` applied to the sequence axis of ``x [b, h, n, d]``."""
    n = x.shape[2]
    if p.dim() not in (2, 3):
        raise ValueError(f"{name} must be [proj_len, max_len] or [heads, proj_len, max_len], got {tuple(p.shape)}")
    if p.shape[-1] < n:
        raise ValueError(
            f"sequence length {n} is longer than the {p.shape[-1]} positions projection {name} was built for; "
            f"build Linformer with seq_len >= {n}"
        )
    if p.dim() == 3 and p.shape[0] != x.shape[1]:
        raise ValueError(f"{name} has {p.shape[0]} heads but the input has {x.shape[1]}")
    return p[..., :n].to(x.dtype) @ x


def _check(causal: bool) -> None:
    refuse_causal("linformer", causal, "projecting the sequence axis mixes future tokens into every key")


def linformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, e: torch.Tensor,
                        f: torch.Tensor | None = None, causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """Linformer attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]``;
    ``e``, ``f``: ``[proj_len, max_len]`` (shared by heads) or ``[h, proj_len, max_len]``; ``f=None`` shares
    ``E`` for keys and values. Returns ``[b, h, n, dv]``."""
    _check(causal)
    k, v, scale = prepare(q, k, v, scale)
    kp = _project(e, k, "e")  # [b, h, proj_len, d]
    vp = _project(e if f is None else f, v, "f")
    return torch.nn.functional.scaled_dot_product_attention(q, kp, vp, scale=scale)


def linformer_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, e: torch.Tensor,
                        f: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                        return_attention: bool = False):
    """Plain reference in float64: ``P = softmax(Q (E K)^T s)``, ``out = P (F V)``; with ``return_attention``
    also the implied ``[b, h, n, n_k]`` matrix ``P F``."""
    _check(causal)
    k, v, scale = prepare(q, k, v, scale)
    f = e if f is None else f
    ed, fd = e.double(), f.double()
    p = torch.softmax(q.double() @ _project(ed, k.double(), "e").transpose(-1, -2) * scale, dim=-1)
    out = (p @ _project(fd, v.double(), "f")).to(q.dtype)
    if not return_attention:
        return out
    n = k.shape[2]
    return out, p @ fd[..., :n]
