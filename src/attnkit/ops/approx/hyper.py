"""HyperAttention: sorted-LSH block-diagonal exact part plus a uniformly sampled residual.

Han et al., "HyperAttention: Long-context Attention in Near-Linear Time", ICLR 2024.

1. sortLSH: hash queries and keys with ``num_bits`` random hyperplanes (angular LSH), order the buckets so
   neighbours differ in one bit (Gray code), and sort queries and keys by bucket. Cut both sorted lists into
   blocks of about ``block_size``; each query joins the block where its bucket rank falls among the sorted
   keys, and attends exactly to the keys of that block. (The paper cuts sorted queries into equal blocks;
   placing each query by its own rank gives the same blocks when queries and keys hash alike, and keeps a
   query's block independent of other queries, which the causal recursion needs.)
2. The rest of row i is estimated from ``sample_size`` keys drawn uniformly (with replacement), those in
   i's block excluded, each weighted ``n_k / sample_size`` (an unbiased estimate of the remaining mass).
3. Both parts are combined by their log-sum-exp and normalised.

Equivalently ``out = softmax(S + log W) V`` with ``W_ij = 1`` in i's block and ``(n_k / s) count_j``
elsewhere: this is what :func:`hyper_reference` materialises. ``block_size >= n_k`` is exact attention.

Causal (paper, sec. 3.3): split in halves; the two diagonal halves are causal problems of half size
(recursively, exact below ``min_seq_len``) and the lower-left rectangle is a non-causal HyperAttention;
the pieces merge by log-sum-exp. With exact sub-solvers the recursion is exact causal attention.
Memory O(n (block_size + sample_size)); random draws are fixed by ``seed``.
"""

from __future__ import annotations

import math

import torch

from attnkit.errors import NotSupportedError
from attnkit.ops.approx._common import (
    check_positive_int,
    chunked_attention_lse,
    grouped_attention_lse,
    masked_attention_lse,
    merge_lse,
    prepare,
    randint,
    randn,
    sort_by,
    unsort,
)

__all__ = ["hyper_attention", "hyper_reference", "sort_lsh_rank"]


def sort_lsh_rank(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Bucket rank of each row of ``x [b, h, n, d]`` under hyperplanes ``planes [h, d, bits]``: the SimHash
    code read as a Gray code, so sorting by rank puts buckets that differ in one bit next to each other."""
    bits = (x @ planes.to(x.dtype)) > 0  # [b, h, n, bits]
    code = (bits.long() << torch.arange(bits.shape[-1], device=x.device)).sum(-1)
    shift = 1
    while shift < bits.shape[-1]:
        code = code ^ (code >> shift)  # inverse Gray code: rank of the bucket along the Gray sequence
        shift *= 2
    return code


def _check(block_size, sample_size, num_bits, min_seq_len):
    check_positive_int("block_size", block_size)
    check_positive_int("sample_size", sample_size, minimum=0)
    check_positive_int("num_bits", num_bits)
    check_positive_int("min_seq_len", min_seq_len)
    if num_bits > 30:
        raise ValueError(f"num_bits={num_bits} is too many (at most 30)")


def _layout(q, k, block_size, num_bits, seed):
    """sortLSH blocks. Keys sorted by bucket rank are cut into ``nb`` blocks of ``bk``; each query joins the
    block where its own rank falls among the sorted keys (so a query's block depends on that query and the
    keys only, never on other queries: the causal recursion stays causal). Returns the key order and the
    block of every query and key (original positions)."""
    nk = k.shape[2]
    # Hash in float64: cheap next to attention, and every dtype sees the same buckets.
    planes = randn((q.shape[1], q.shape[-1], num_bits), seed, q, torch.float64)
    rank_q, rank_k = sort_lsh_rank(q.double(), planes), sort_lsh_rank(k.double(), planes)
    nb = math.ceil(nk / block_size)
    bk = math.ceil(nk / nb)
    pos_k = torch.arange(nk, device=q.device)
    order_k = torch.argsort(rank_k * nk + pos_k, dim=-1)
    blk_k = torch.empty_like(order_k).scatter_(-1, order_k, (pos_k // bk).expand_as(order_k))
    first = torch.searchsorted(rank_k.gather(-1, order_k), rank_q, right=False)
    blk_q = (first // bk).clamp_max(nb - 1)
    return order_k, blk_q, blk_k


def _samples(q, k, sample_size, seed):
    return randint(k.shape[2], (q.shape[0], q.shape[1], sample_size), seed + 1, q.device)


def _hyper_reference_rect(q, k, v, scale, block_size, sample_size, num_bits, seed):
    """Materialised non-causal HyperAttention in float64: (out, lse, logits ``S + log W``)."""
    nk = k.shape[2]
    _, blk_q, blk_k = _layout(q, k, block_size, num_bits, seed)
    in_block = blk_q[..., :, None] == blk_k[..., None, :]
    w = in_block.double()
    if sample_size > 0:
        idx = _samples(q, k, sample_size, seed)
        counts = torch.zeros(*idx.shape[:2], nk, dtype=torch.float64, device=q.device)
        counts.scatter_add_(-1, idx, torch.ones_like(idx, dtype=torch.float64))
        w = torch.where(in_block, w, counts[..., None, :] * (nk / sample_size))
    logits = q.double() @ k.double().transpose(-1, -2) * scale + torch.log(w)
    out, lse = masked_attention_lse(logits, v.double())
    return out, lse, logits


def _hyper_rect(q, k, v, scale, block_size, sample_size, num_bits, seed, chunk_size=256):
    """Non-causal HyperAttention on matched heads: (out, lse)."""
    nq, nk = q.shape[2], k.shape[2]
    if nk <= block_size:
        return chunked_attention_lse(q, k, v, scale=scale)
    order_k, blk_q, blk_k = _layout(q, k, block_size, num_bits, seed)
    # Block-diagonal exact part: queries sorted by block attend the keys of their block.
    order_q = torch.argsort(blk_q * nq + torch.arange(nq, device=q.device), dim=-1)
    q_s = sort_by(q, order_q)
    o1, lse1 = grouped_attention_lse(q_s, blk_q.gather(-1, order_q), sort_by(k, order_k), sort_by(v, order_k),
                                     blk_k.gather(-1, order_k), scale=scale, chunk_size=chunk_size)
    if sample_size > 0:
        # Sampled residual: keys outside the query's block, weighted n_k / s.
        idx = _samples(q, k, sample_size, seed)  # [b, h, s]
        ks, vs = sort_by(k, idx), sort_by(v, idx)
        mask = blk_q.gather(-1, order_q)[..., :, None] != blk_k.gather(-1, idx)[..., None, :]
        o2, lse2 = masked_attention_lse(q_s @ ks.transpose(-1, -2) * scale, vs, mask)
        o1, lse1 = merge_lse(o1, lse1, o2, lse2 + math.log(nk / sample_size))
    return unsort(o1, order_q), unsort(lse1, order_q)


def _causal(q, k, v, scale, params, seed, offset, rect, base):
    """The paper's causal recursion: two half-size causal problems plus one rectangle, merged by lse."""
    n = q.shape[2]
    if n <= params["min_seq_len"]:
        return base(q, k, v, scale)
    half = n // 2
    o_top, l_top = _causal(q[:, :, :half], k[:, :, :half], v[:, :, :half], scale, params, seed, offset,
                           rect, base)
    o_diag, l_diag = _causal(q[:, :, half:], k[:, :, half:], v[:, :, half:], scale, params, seed,
                             offset + half, rect, base)
    o_rect, l_rect = rect(q[:, :, half:], k[:, :, :half], v[:, :, :half], scale, params["block_size"],
                          params["sample_size"], params["num_bits"], seed * 1_000_003 + offset + half)
    o_bot, l_bot = merge_lse(o_diag, l_diag, o_rect.to(o_diag.dtype), l_rect.to(l_diag.dtype))
    return torch.cat([o_top, o_bot], dim=2), torch.cat([l_top, l_bot], dim=2)


def _validate(q, k, v, causal, block_size, sample_size, num_bits, min_seq_len, scale):
    _check(block_size, sample_size, num_bits, min_seq_len)
    k, v, scale = prepare(q, k, v, scale)
    if causal and q.shape[2] != k.shape[2]:
        raise NotSupportedError(f"causal HyperAttention needs q_len == kv_len (its recursion splits both in "
                                f"halves), got {q.shape[2]} and {k.shape[2]}")
    return k, v, scale


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 256,
                    sample_size: int = 256, num_bits: int = 7, min_seq_len: int = 4096, causal: bool = False,
                    seed: int = 0, scale: float | None = None) -> torch.Tensor:
    """HyperAttention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``.

    ``block_size``: keys per sorted-LSH block; ``sample_size``: sampled residual keys per head; ``num_bits``:
    hyperplanes; ``min_seq_len``: causal pieces this short are computed exactly; ``seed`` fixes the draws.
    """
    k, v, scale = _validate(q, k, v, causal, block_size, sample_size, num_bits, min_seq_len, scale)
    if not causal:
        return _hyper_rect(q, k, v, scale, block_size, sample_size, num_bits, seed)[0]
    params = dict(block_size=block_size, sample_size=sample_size, num_bits=num_bits, min_seq_len=min_seq_len)

    def base(q, k, v, scale):
        return chunked_attention_lse(q, k, v, scale=scale, causal=True)

    return _causal(q, k, v, scale, params, seed, 0, _hyper_rect, base)[0]


def hyper_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 256,
                    sample_size: int = 256, num_bits: int = 7, min_seq_len: int = 4096, causal: bool = False,
                    seed: int = 0, scale: float | None = None, return_attention: bool = False):
    """Plain reference (float64): materialises ``softmax(S + log W)`` for every rectangle; the causal form
    runs the same recursion with materialised pieces. ``return_attention`` also gives the implied
    ``[b, h, n, n_k]`` matrix."""
    k, v, scale = _validate(q, k, v, causal, block_size, sample_size, num_bits, min_seq_len, scale)
    qd, kd, vd = q.double(), k.double(), v.double()
    if not causal:
        out, _, logits = _hyper_reference_rect(qd, kd, vd, scale, block_size, sample_size, num_bits, seed)
        out = out.to(q.dtype)
        return (out, torch.softmax(logits, dim=-1)) if return_attention else out
    params = dict(block_size=block_size, sample_size=sample_size, num_bits=num_bits, min_seq_len=min_seq_len)
    n = q.shape[2]
    # Record every piece's logits in one n x n matrix so the implied attention can be returned.
    full = torch.full((*q.shape[:2], n, n), float("-inf"), dtype=torch.float64, device=q.device)

    def base(q_, k_, v_, scale_):
        s = q_ @ k_.transpose(-1, -2) * scale_
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        return masked_attention_lse(s, v_, mask)

    def rect(q_, k_, v_, scale_, bs, ss, nb, sd):
        out, lse, _ = _hyper_reference_rect(q_, k_, v_, scale_, bs, ss, nb, sd)
        return out, lse

    out, lse = _causal(qd, kd, vd, scale, params, seed, 0, rect, base)
    if not return_attention:
        return out.to(q.dtype)
    _fill_causal_logits(full, qd, kd, scale, params, seed, 0)
    return out.to(q.dtype), torch.softmax(full, dim=-1)


def _fill_causal_logits(full, q, k, scale, params, seed, offset):
    """Write the logits the causal recursion uses (exact causal diagonals, HyperAttention rectangles)
    into ``full`` at rows/cols ``offset ..``."""
    n = q.shape[2]
    if n <= params["min_seq_len"]:
        s = q @ k.transpose(-1, -2) * scale
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        full[..., offset:offset + n, offset:offset + n] = s.masked_fill(~mask, float("-inf"))
        return
    half = n // 2
    _fill_causal_logits(full, q[:, :, :half], k[:, :, :half], scale, params, seed, offset)
    _fill_causal_logits(full, q[:, :, half:], k[:, :, half:], scale, params, seed, offset + half)
    _, _, logits = _hyper_reference_rect(q[:, :, half:], k[:, :, :half], k[:, :, :half], scale,
                                         params["block_size"], params["sample_size"], params["num_bits"],
                                         seed * 1_000_003 + offset + half)
    full[..., offset + half:offset + n, offset:offset + half] = logits
