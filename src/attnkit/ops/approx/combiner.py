"""Combiner: full-support attention at sparse cost, by factorising attention over blocked regions.

Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost", NeurIPS 2021. Attention is
read as the conditional expectation ``E_{p(j|i)}[v_j]``. attnkit implements Combiner-Fixed (blocked
factorisation): the keys are cut into blocks of ``block_size``; query i (in block t = i // block_size)

- attends *directly* to the keys of its own block (``j <= i`` when causal), with softmax weight ``p(j|i)``;
- reaches every other block r (``r < t`` when causal) through the block's *abstraction*: a query-independent
  distribution ``q(j|r)`` inside the block (uniform, or ``softmax_j(k_j . w)`` with a learned ``w``:
  ``region_weight``), the region key ``k_r = sum_j q(j|r) k_j`` and value ``v_r = sum_j q(j|r) v_j``, and
  one weight ``p(r|i)``.

One softmax over the direct logits ``q_i.k_j s`` and the region logits ``q_i.k_r s + log |r|`` gives the
weights, so

    out_i = sum_{j direct} p(j|i) v_j + sum_r p(r|i) v_r,   A_ij = p(r(j)|i) q(j|r(j)) off the own block.

Every visible key gets a positive weight (full support) and each row sums to 1. ``log |r|`` (an attnkit
choice) gives a block of equal keys the mass of its tokens, so a region of identical keys is exact; with
``block_size = 1`` every region is one token and the result is exact softmax. A causal region is a complete
earlier block, so no summary contains a future token. Time and memory O(n (block_size + n / block_size) d):
O(n^1.5 d) at ``block_size ~ sqrt(n)``. Combiner-Logsparse, -Axial and -Mixture:
:mod:`attnkit.ops.approx.combiner_bases`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.ops.approx._common import causal_mask, check_positive_int, masked_attention_lse, prepare, upcast

__all__ = ["combiner_attention", "combiner_reference"]


def _setup(q, k, v, block_size, region_weight, scale):
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("block_size", block_size)
    if region_weight is not None:
        if not isinstance(region_weight, torch.Tensor):
            raise TypeError(f"region_weight must be a torch.Tensor or None, got {type(region_weight).__name__}")
        if region_weight.dim() == 1:
            region_weight = region_weight[None]
        if region_weight.dim() != 2 or region_weight.shape[0] not in (1, q.shape[1]) \
                or region_weight.shape[1] != q.shape[-1]:
            raise ValueError(f"region_weight must be [{q.shape[-1]}] or [{q.shape[1]}, {q.shape[-1]}] (one scoring "
                             f"vector per head), got {tuple(region_weight.shape)}")
    return k, v, scale, region_weight


def _within_region_logits(k: torch.Tensor, region_weight: torch.Tensor | None) -> torch.Tensor:
    """Logits ``[b, h, n_k]`` of ``q(j|r)`` (zeros: uniform), in at least float32."""
    if region_weight is None:
        return torch.zeros(k.shape[:3], dtype=upcast(k).dtype, device=k.device)
    return upcast(torch.einsum("bhnd,hd->bhn", k, region_weight.to(k.dtype).expand(k.shape[1], -1)))


def combiner_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 128,
                       region_weight: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                       return_attention: bool = False):
    """Plain reference: the ``[b, h, n, n_k]`` Combiner matrix materialised in float64, times V."""
    k, v, scale, w = _setup(q, k, v, block_size, region_weight, scale)
    n, nk = q.shape[2], k.shape[2]
    dev = q.device
    qb = torch.arange(n, device=dev) // block_size  # block of each query
    kb = torch.arange(nk, device=dev) // block_size  # block (region) of each key
    num_regions = int(kb[-1]) + 1
    member = kb[None, :] == torch.arange(num_regions, device=dev)[:, None]  # [R, n_k]
    # q(j|r) as a [b, h, R, n_k] matrix: softmax of the within-region logits over each block.
    lw = _within_region_logits(k, w).double()
    qjr = torch.softmax(lw[..., None, :].masked_fill(~member, float("-inf")), dim=-1)
    k64, v64 = k.double(), v.double()
    region_k = qjr @ k64
    size = member.sum(-1).double()
    direct = qb[:, None] == kb[None, :]
    regions = qb[:, None] != torch.arange(num_regions, device=dev)[None, :]  # [n, R]
    if causal:
        direct = direct & causal_mask(n, nk, dev)
        regions = regions & (torch.arange(num_regions, device=dev)[None, :] < qb[:, None])
    q64 = q.double()
    s_direct = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(~direct, float("-inf"))
    s_region = (q64 @ region_k.transpose(-1, -2) * scale + size.log()).masked_fill(~regions, float("-inf"))
    p = torch.softmax(torch.cat([s_direct, s_region], dim=-1), dim=-1).nan_to_num(0.0)
    attn = p[..., :nk] + p[..., nk:] @ qjr  # region weight spread by q(j|r)
    out = (attn @ v64).to(q.dtype)
    return (out, attn) if return_attention else out


def combiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 128,
                       region_weight: torch.Tensor | None = None, causal: bool = False,
                       scale: float | None = None) -> torch.Tensor:
    """Combiner-Fixed attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` ->
    ``[b, h, n, dv]``. ``region_weight [h, d]`` (or ``[d]``): within-region scorer; None: uniform (mean)."""
    k, v, scale, w = _setup(q, k, v, block_size, region_weight, scale)
    b, h, n, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    B = block_size
    nq_blocks, num_regions = math.ceil(n / B), math.ceil(nk / B)
    dev = q.device
    # Keys, values and the within-region logits in [b, h, R, B, .] blocks (padding masked out).
    pad_k = num_regions * B - nk
    valid = torch.arange(num_regions * B, device=dev).view(num_regions, B) < nk  # [R, B]
    kr = F.pad(k, (0, 0, 0, pad_k)).view(b, h, num_regions, B, d)
    vr = F.pad(v, (0, 0, 0, pad_k)).view(b, h, num_regions, B, dv)
    lw = F.pad(_within_region_logits(k, w), (0, pad_k)).view(b, h, num_regions, B)
    qjr = torch.softmax(lw.masked_fill(~valid, float("-inf")), dim=-1)  # [b, h, R, B]
    region_k = torch.einsum("bhrj,bhrjd->bhrd", qjr.to(k.dtype), kr)  # [b, h, R, d]
    region_v = torch.einsum("bhrj,bhrjd->bhrd", qjr.to(v.dtype), vr)  # [b, h, R, dv]
    log_size = valid.sum(-1).to(qjr.dtype).log()  # [R]
    # Queries in [b, h, T, B, d] blocks; query block t's own key block is region t (when it exists).
    qq = F.pad(q, (0, 0, 0, nq_blocks * B - n)).view(b, h, nq_blocks, B, d)
    own = torch.arange(nq_blocks, device=dev).clamp_max(num_regions - 1)
    has_own = torch.arange(nq_blocks, device=dev) < num_regions  # [T]
    if nq_blocks <= num_regions:  # every query block has its own key block: a view, no gather
        k_own, v_own = kr[:, :, :nq_blocks], vr[:, :, :nq_blocks]
    else:
        k_own, v_own = kr[:, :, own], vr[:, :, own]  # [b, h, T, B, .]
    qpos = torch.arange(nq_blocks * B, device=dev).view(nq_blocks, B)
    kpos = own[:, None] * B + torch.arange(B, device=dev)  # [T, B]
    direct = has_own[:, None, None] & valid[own][:, None, :]  # [T, 1, B]
    if causal:
        direct = direct & (kpos[:, None, :] <= qpos[:, :, None])  # [T, B, B]
    t_idx = torch.arange(nq_blocks, device=dev)[:, None]
    r_idx = torch.arange(num_regions, device=dev)[None, :]
    allowed = (r_idx < t_idx) if causal else (r_idx != t_idx)  # [T, R]
    s_direct = qq @ k_own.transpose(-1, -2) * scale  # [b, h, T, B, B]
    s_region = upcast(torch.einsum("bhtqd,bhrd->bhtqr", qq, region_k) * scale) + log_size
    scores = torch.cat([upcast(s_direct), s_region], dim=-1)
    mask = torch.cat([direct.expand(nq_blocks, B, B), allowed[:, None, :].expand(nq_blocks, B, num_regions)],
                     dim=-1)
    values = torch.cat([v_own, region_v[:, :, None].expand(b, h, nq_blocks, num_regions, dv)], dim=-2)
    out, _ = masked_attention_lse(scores, values, mask)
    return out.reshape(b, h, nq_blocks * B, dv)[:, :, :n]
