"""MRA: multi-resolution approximation of the attention matrix (two levels, MRA-2).

Zeng et al., "Multi Resolution Analysis (MRA) for Approximate Self-Attention", ICML 2022. Cut queries and
keys into blocks of ``block_size``. At the coarse level every block pair (I, J) gets the logit
``c_IJ = mean(q_I) . mean(k_J) s``, so ``exp(q_i . k_j s)`` is approximated by ``exp(c_IJ)`` for every
``i in I, j in J``. For each query block, the ``num_refined`` key blocks with the largest coarse mass
``|J| exp(c_IJ)`` are refined to resolution 1 (exact logits). Rows are then normalised::

    out_i = (sum_{J refined} sum_{j in J} e^{s_ij} v_j + sum_{J coarse} e^{c_IJ} sum_{j in J} v_j) / (same, v = 1)

``num_refined >= number of key blocks`` is exact softmax; ``num_refined = 0`` is the block-averaged attention.
No causal form: the paper targets encoders, and the coarse level shares one mean query per block, so a
query would read its block's later queries. Memory: O(n num_refined block_size) for the refined part plus
O((n / block_size)^2) coarse logits (1/block_size^2 of the dense matrix: 8 MiB at n = 16k, 8 heads, b = 32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.ops.approx._common import (
    check_positive_int,
    masked_attention_lse,
    merge_lse,
    prepare,
    refuse_causal,
    upcast,
)

__all__ = ["mra_attention", "mra_reference"]


def _blocks(x: torch.Tensor, b: int):
    """Zero-pad ``x [.., n, d]`` to whole blocks: ``[.., nb, b, d]``, plus per-block counts ``[nb]``."""
    n = x.shape[-2]
    nb = math.ceil(n / b)
    xp = F.pad(x, (0, 0, 0, nb * b - n)).unflatten(-2, (nb, b))
    counts = torch.full((nb,), b, device=x.device)
    counts[-1] = n - (nb - 1) * b
    return xp, counts


def _coarse(q, k, b, scale):
    """Coarse logits ``[.., nbq, nbk]`` from block means, and the key-block counts."""
    qb, cq = _blocks(q, b)
    kb, ck = _blocks(k, b)
    q_mean = qb.sum(-2) / cq[:, None].to(q.dtype)
    k_mean = kb.sum(-2) / ck[:, None].to(k.dtype)
    return q_mean @ k_mean.transpose(-1, -2) * scale, ck


def _select(q, k, b, num_refined, scale):
    """Refined key blocks ``[.., nbq, r]`` per query block: largest coarse mass ``c_IJ + log |J|``.
    Chosen from the inputs in at least float32, so a fast path and its float64 reference pick alike."""
    coarse, ck = _coarse(upcast(q), upcast(k), b, scale)
    r = min(num_refined, coarse.shape[-1])
    if r == 0:
        return None
    return (coarse + torch.log(ck.to(coarse.dtype))).topk(r, dim=-1).indices


def _check(block_size: int, num_refined: int, causal: bool) -> None:
    refuse_causal("mra", causal, "the coarse level shares one mean query per block")
    check_positive_int("block_size", block_size)
    check_positive_int("num_refined", num_refined, minimum=0)


def mra_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 32,
                  num_refined: int = 4, causal: bool = False, scale: float | None = None,
                  return_attention: bool = False):
    """Plain reference: the full ``[n, n_k]`` matrix of exact (refined) and block-constant (coarse) logits,
    softmax in float64."""
    _check(block_size, num_refined, causal)
    k, v, scale = prepare(q, k, v, scale)
    qd, kd, vd = q.double(), k.double(), v.double()
    n, nk = q.shape[2], k.shape[2]
    coarse, _ = _coarse(qd, kd, block_size, scale)
    sel = _select(q, k, block_size, num_refined, scale)
    refined = torch.zeros(coarse.shape, dtype=torch.bool, device=q.device)
    if sel is not None:
        refined.scatter_(-1, sel, True)
    iq = torch.arange(n, device=q.device) // block_size
    jk = torch.arange(nk, device=q.device) // block_size
    ref_tok = refined[..., iq, :][..., :, jk]  # [.., n, nk]
    logits = torch.where(ref_tok, qd @ kd.transpose(-1, -2) * scale, coarse[..., iq, :][..., :, jk])
    p = torch.softmax(logits, dim=-1)
    out = (p @ vd).to(q.dtype)
    return (out, p) if return_attention else out


def mra_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 32,
                  num_refined: int = 4, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """MRA-2 attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``.

    ``block_size``: coarse block length; ``num_refined``: key blocks refined per query block.
    """
    _check(block_size, num_refined, causal)
    k, v, scale = prepare(q, k, v, scale)
    n, nk, d, dv = q.shape[2], k.shape[2], q.shape[-1], v.shape[-1]
    bsz = block_size
    qb, _ = _blocks(q, bsz)
    kb, _ = _blocks(k, bsz)
    vb, ck = _blocks(v, bsz)
    coarse, _ = _coarse(q, k, bsz, scale)
    sel = _select(q, k, bsz, num_refined, scale)
    nbq, nbk = coarse.shape[-2:]
    lead = coarse.shape[:-2]
    # Coarse part: one "super key" per unrefined key block, logit c_IJ + log |J|, value mean(v_J).
    coarse_mask = torch.ones(coarse.shape, dtype=torch.bool, device=q.device)
    if sel is not None:
        coarse_mask = coarse_mask.scatter(-1, sel, False)
    v_mean = vb.sum(-2) / ck[:, None].to(v.dtype)
    o2, lse2 = masked_attention_lse(coarse + torch.log(ck.to(coarse.dtype)), v_mean, coarse_mask)
    if sel is None:
        out = o2[..., :, None, :].expand(*lead, nbq, bsz, dv)
        return out.flatten(-3, -2)[..., :n, :]
    # Refined part: gather the selected key blocks for each query block.
    r = sel.shape[-1]
    flat = sel.flatten(-2)  # [.., nbq * r]
    kr = kb.gather(-3, flat[..., None, None].expand(*lead, nbq * r, bsz, d)).unflatten(-3, (nbq, r))
    vr = vb.gather(-3, flat[..., None, None].expand(*lead, nbq * r, bsz, dv)).unflatten(-3, (nbq, r))
    kr, vr = kr.flatten(-3, -2), vr.flatten(-3, -2)  # [.., nbq, r * bsz, d]
    kpos = (sel[..., None] * bsz + torch.arange(bsz, device=q.device)).flatten(-2)  # [.., nbq, r * bsz]
    o1, lse1 = masked_attention_lse(qb @ kr.transpose(-1, -2) * scale, vr, (kpos < nk)[..., None, :])
    out, _ = merge_lse(o1, lse1, o2[..., :, None, :].expand_as(o1), lse2[..., :, None].expand_as(lse1))
    return out.flatten(-3, -2)[..., :n, :]
