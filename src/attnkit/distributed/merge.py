"""Partial softmax attention over one key block, returning ``(out, lse)``, and the associative merge of partials.

Every exact sequence-parallel scheme (ring, striped, tree, Star Attention's phase 2) rests on one identity: for
disjoint key sets ``A`` and ``B``, with ``lse_X = log sum_{j in X} exp(s_j)`` and ``out_X`` the softmax average
over ``X``,

    lse = log(exp(lse_A) + exp(lse_B)),    out = out_A exp(lse_A - lse) + out_B exp(lse_B - lse).

The merge is associative and commutative, so blocks may arrive in any order. A row with no allowed key has
``lse = -inf`` and ``out = 0``, and merging it is the identity (no NaN).
"""

from __future__ import annotations

import torch

from attnkit._checks import repeat_kv

__all__ = ["block_attention", "merge_partials", "block_attention_backward"]


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [b, h, nq, d]`` over one block ``k [b, h_kv, nk, d]``, ``v [b, h_kv, nk, d_v]``.

    ``mask``: bool, broadcastable to ``[b, h, nq, nk]`` (True = may attend) or None. Computes in ``q``'s dtype.
    Returns ``out [b, h, nq, d_v]`` (softmax-normalised within the block) and ``lse [b, h, nq]``.
    """
    h = q.shape[1]
    kk, vv = repeat_kv(k, h).to(q.dtype), repeat_kv(v, h).to(q.dtype)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite(lse)[..., None])
    return torch.matmul(p, vv), lse


def block_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             scale: float, grad_out: torch.Tensor, lse: torch.Tensor,
                             delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block's contribution to the *global* softmax attention (FlashAttention's backward):
    with the global ``lse [b, h, nq]`` and ``delta = rowsum(grad_out * out) [b, h, nq]``,
    ``p = exp(s - lse)``, ``dv = p^T do``, ``ds = p (do v^T - delta)``, ``dq = ds k scale``, ``dk = ds^T q scale``.
    Returns ``dq [b, h, nq, d]``, ``dk [b, h_kv, nk, d]``, ``dv [b, h_kv, nk, d_v]`` (grouped heads summed)."""
    b, h, nq, _ = q.shape
    hkv = k.shape[1]
    kk, vv = repeat_kv(k, h).to(q.dtype), repeat_kv(v, h).to(q.dtype)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - _finite(lse)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), grad_out)
    ds = p * (torch.matmul(grad_out, vv.transpose(-1, -2)) - delta[..., None])
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    if hkv != h:
        dk = dk.view(b, hkv, h // hkv, *dk.shape[2:]).sum(2)
        dv = dv.view(b, hkv, h // hkv, *dv.shape[2:]).sum(2)
    return dq, dk, dv


def merge_partials(out_a: torch.Tensor | None, lse_a: torch.Tensor | None, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results ``(out [..., n, d_v], lse [..., n])`` over disjoint key sets into the result over
    their union (``out_a=None``: nothing yet, returns ``b``)."""
    if out_a is None:
        return out_b, lse_b
    lse = torch.logaddexp(lse_a, lse_b)
    ref = _finite(lse)
    wa, wb = torch.exp(lse_a - ref)[..., None], torch.exp(lse_b - ref)[..., None]
    return out_a * wa + out_b * wb, lse
