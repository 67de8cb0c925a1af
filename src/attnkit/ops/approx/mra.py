"""MRA: multi-resolution approximation of the attention matrix (two levels, MRA-2).

Zeng et al., "Multi Resolution Analysis (MRA) for Approximate Self-Attention", ICML 2022. Cut queries and
keys into blocks of ``block_size``. At the coarse level every block pair (I, J) gets the logit
``c_IJ = mean(q_I) . mean(k_J) s``, so ``exp(q_i . k_j s)`` is approximated by ``exp(c_IJ)`` for every
``i in I, j in J``. For each query block, the ``num_refined`` key blocks with the largest coarse mass
``|J| exp(c_IJ)`` are refined to resolution 1 (exact logits). Rows are then normalised::

    out_i = (sum_{J refined} sum_{j in J} e^{s_ij} v_j + sum_{J coarse} e^{c_IJ} sum_{j in J} v_j) / (same, v = 1)

``num_refined >= number of key blocks`` is exact softmax; ``num_refined = 0`` is the block-averaged attention.
The causal variant (an attnkit extension; the paper targets encoders) always refines the diagonal block
with the token-level mask, uses coarse summaries of past blocks only, and never touches future blocks.
Memory: O(n num_refined block_size) for the refined part plus O((n / block_size)^2) coarse logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.ops.approx._common import check_positive_int, masked_attention_lse, merge_lse, prepare

__all__ = ["mra_attention", "mra_reference"]


def _blocks(x: torch.Tensor, b: int):
    """Zero-pad ``x [.., n, d]`` to whole blocks: ``[.., nb, b, d]``, plus per-block counts ``[nb]``."""
    n = x.shape[-2]
    nb = math.ceil(n / b)
    xp = F.pad(x, (0, 0, 0, nb * b - n)).unflatten(-2, (nb, b))
    counts = torch.full((nb,), b, device=x.device)
    counts[-1] = n - (nb - 1) * b
    return xp, counts


def _coarse(q, k, b, num_refined, causal, scale):
    """Coarse logits ``[.., nbq, nbk]``, counts, and the refined key blocks ``[.., nbq, r]`` (with a
    validity flag: causal rows near the start have fewer past blocks)."""
    qb, cq = _blocks(q, b)
    kb, ck = _blocks(k, b)
    q_mean = qb.sum(-2) / cq[:, None].to(q.dtype)
    k_mean = kb.sum(-2) / ck[:, None].to(k.dtype)
    coarse = q_mean @ k_mean.transpose(-1, -2) * scale  # [.., nbq, nbk]
    mass = coarse.float() + torch.log(ck.float())
    nbq, nbk = coarse.shape[-2:]
    bi = torch.arange(nbq, device=q.device)[:, None]
    bj = torch.arange(nbk, device=q.device)[None, :]
    r = min(num_refined + (1 if causal else 0), nbk)
    if causal:
        mass = mass.masked_fill(bj > bi, float("-inf")).masked_fill(bj == bi, float("inf"))
    sel = mass.topk(r, dim=-1) if r > 0 else None
    return qb, kb, cq, ck, coarse, sel, (bi, bj)


def _check(block_size: int, num_refined: int) -> None:
    check_positive_int("block_size", block_size)
    check_positive_int("num_refined", num_refined, minimum=0)


def mra_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 32,
                  num_refined: int = 4, causal: bool = False, scale: float | None = None,
                  return_attention: bool = False):
    """Plain reference: the full ``[n, n_k]`` matrix of exact (refined) and block-constant (coarse) logits,
    causal-masked, softmax in float64."""
    _check(block_size, num_refined)
    k, v, scale = prepare(q, k, v, scale)
    qd, kd, vd = q.double(), k.double(), v.double()
    n, nk = q.shape[2], k.shape[2]
    _, _, _, _, coarse, sel, (bi, bj) = _coarse(qd, kd, block_size, num_refined, causal, scale)
    refined = torch.zeros(coarse.shape, dtype=torch.bool, device=q.device)
    if sel is not None:
        refined.scatter_(-1, sel.indices, torch.isfinite(sel.values) | (sel.values > 0))
    iq = torch.arange(n, device=q.device) // block_size
    jk = torch.arange(nk, device=q.device) // block_size
    ref_tok = refined[..., iq, :][..., :, jk]  # [.., n, nk]
    logits = torch.where(ref_tok, qd @ kd.transpose(-1, -2) * scale, coarse[..., iq, :][..., :, jk])
    if causal:
        token_causal = torch.arange(nk, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None]
        visible = (bj < bi)[iq][:, jk] | (ref_tok & token_causal)
        logits = logits.masked_fill(~visible, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out = (p @ vd).to(q.dtype)
    return (out, p) if return_attention else out


def mra_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 32,
                  num_refined: int = 4, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """MRA-2 attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``.

    ``block_size``: coarse block length; ``num_refined``: key blocks refined per query block (plus the
    diagonal block when causal).
    """
    _check(block_size, num_refined)
    k, v, scale = prepare(q, k, v, scale)
    n, nk, d, dv = q.shape[2], k.shape[2], q.shape[-1], v.shape[-1]
    bsz = block_size
    qb, kb, cq, ck, coarse, sel, (bi, bj) = _coarse(q, k, bsz, num_refined, causal, scale)
    vb, _ = _blocks(v, bsz)
    nbq, nbk = coarse.shape[-2:]
    lead = coarse.shape[:-2]
    # Coarse part: one "super key" per key block, logit c_IJ + log |J|, value mean(v_J).
    coarse_mask = torch.ones(coarse.shape, dtype=torch.bool, device=q.device)
    if sel is not None:
        coarse_mask = coarse_mask.scatter(-1, sel.indices, False)
    if causal:
        coarse_mask = coarse_mask & (bj < bi)
    v_mean = vb.sum(-2) / ck[:, None].to(v.dtype)
    o2, lse2 = masked_attention_lse(coarse + torch.log(ck.to(coarse.dtype)), v_mean, coarse_mask)
    if sel is None:
        out = o2[..., :, None, :].expand(*lead, nbq, bsz, dv)
        return out.flatten(-3, -2)[..., :n, :]
    # Refined part: gather the selected key blocks for each query block.
    idx = sel.indices  # [.., nbq, r]
    r = idx.shape[-1]
    flat = idx.flatten(-2)  # [.., nbq * r]
    kr = kb.gather(-3, flat[..., None, None].expand(*lead, nbq * r, bsz, d)).unflatten(-3, (nbq, r))
    vr = vb.gather(-3, flat[..., None, None].expand(*lead, nbq * r, bsz, dv)).unflatten(-3, (nbq, r))
    kr, vr = kr.flatten(-3, -2), vr.flatten(-3, -2)  # [.., nbq, r * bsz, d]
    kpos = (idx[..., None] * bsz + torch.arange(bsz, device=q.device)).flatten(-2)  # [.., nbq, r * bsz]
    ok = (kpos < nk) & (torch.isfinite(sel.values) | (sel.values > 0)).repeat_interleave(bsz, dim=-1)
    mask = ok[..., None, :]  # [.., nbq, 1, r * bsz]
    if causal:
        qpos = torch.arange(nbq * bsz, device=q.device).view(nbq, bsz)
        mask = mask & (kpos[..., None, :] <= qpos[..., :, None])
    o1, lse1 = masked_attention_lse(qb @ kr.transpose(-1, -2) * scale, vr, mask)  # [.., nbq, bsz, dv]
    out, _ = merge_lse(o1, lse1, o2[..., :, None, :].expand_as(o1), lse2[..., :, None].expand_as(lse1))
    return out.flatten(-3, -2)[..., :n, :]
