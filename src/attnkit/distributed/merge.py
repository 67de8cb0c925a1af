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

__all__ = ["block_attention", "merge_partials", "block_attention_backward", "CHUNK_ELEMENTS"]


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(torch.isneginf(lse), 0.0)


# Scores per row chunk (all batch elements and heads together): bounds the temporary memory of a block.
CHUNK_ELEMENTS = 1 << 18


def _row_chunks(q: torch.Tensor, nk: int, mask: torch.Tensor | None):
    """Yield ``(r0, r1, k0, k1, sub_mask)``: query rows ``r0:r1`` need only keys ``k0:k1`` (the span their mask
    allows), so a triangular block costs half a square one and memory stays ``O(chunk * nk)``. Rows whose mask
    allows nothing are not yielded. ``mask``: None, a bool tensor broadcastable to ``[b, h, nq, nk]``, or a
    function ``(r0, r1) -> bool [b | 1, h | 1, r1 - r0, nk]`` evaluated per chunk (never the whole block)."""
    b, h, nq, _ = q.shape
    rows = max(1, CHUNK_ELEMENTS // max(1, b * h * nk))
    if mask is not None:
        rows = min(rows, max(16, -(-nq // 8)))  # several chunks, so the mask's shape can save work
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        if mask is None:
            yield r0, r1, 0, nk, None
            continue
        if callable(mask):
            m = mask(r0, r1)
        else:
            m = mask[..., r0:r1, :] if mask.shape[-2] != 1 else mask
        cols = m.reshape(-1, m.shape[-1]).any(0).nonzero()
        if cols.numel() == 0:
            continue
        k0, k1 = int(cols[0]), int(cols[-1]) + 1
        sub = m[..., k0:k1]
        yield r0, r1, k0, k1, (None if bool(sub.all()) else sub)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [b, h, nq, d]`` over one block ``k [b, h_kv, nk, d]``, ``v [b, h_kv, nk, d_v]``.

    ``mask``: bool, broadcastable to ``[b, h, nq, nk]`` (True = may attend), a function of a row range returning
    that (see ``_row_chunks``), or None. Computes in ``q``'s dtype,
    by chunks of query rows over the key span each chunk's mask allows.
    Returns ``out [b, h, nq, d_v]`` (softmax-normalised within the block) and ``lse [b, h, nq]``.
    """
    b, h, nq, _ = q.shape
    kk, vv = repeat_kv(k, h).to(q.dtype), repeat_kv(v, h).to(q.dtype)
    out = q.new_zeros(b, h, nq, v.shape[-1])
    lse = q.new_full((b, h, nq), float("-inf"))
    for r0, r1, k0, k1, m in _row_chunks(q, k.shape[2], mask):
        s = torch.matmul(q[:, :, r0:r1], kk[:, :, k0:k1].transpose(-1, -2)) * scale
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        l = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _finite(l)[..., None])
        out[:, :, r0:r1] = torch.matmul(p, vv[:, :, k0:k1])
        lse[:, :, r0:r1] = l
    return out, lse


def block_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             scale: float, grad_out: torch.Tensor, lse: torch.Tensor,
                             delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block's contribution to the *global* softmax attention (FlashAttention's backward):
    with the global ``lse [b, h, nq]`` and ``delta = rowsum(grad_out * out) [b, h, nq]``,
    ``p = exp(s - lse)``, ``dv = p^T do``, ``ds = p (do v^T - delta)``, ``dq = ds k scale``, ``dk = ds^T q scale``.
    Returns ``dq [b, h, nq, d]``, ``dk [b, h_kv, nk, d]``, ``dv [b, h_kv, nk, d_v]`` (grouped heads summed)."""
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kk, vv = repeat_kv(k, h).to(q.dtype), repeat_kv(v, h).to(q.dtype)
    dq = torch.zeros_like(q)
    dk = q.new_zeros(b, h, nk, k.shape[-1])
    dv = q.new_zeros(b, h, nk, v.shape[-1])
    for r0, r1, k0, k1, m in _row_chunks(q, nk, mask):
        qc, do = q[:, :, r0:r1], grad_out[:, :, r0:r1]
        s = torch.matmul(qc, kk[:, :, k0:k1].transpose(-1, -2)) * scale
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        p = torch.exp(s - _finite(lse[:, :, r0:r1])[..., None])
        dv[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, vv[:, :, k0:k1].transpose(-1, -2)) - delta[:, :, r0:r1, None])
        dq[:, :, r0:r1] = torch.matmul(ds, kk[:, :, k0:k1]) * scale
        dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qc) * scale
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
