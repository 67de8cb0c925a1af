"""Combiner-Logsparse and Combiner-Axial: Combiner's full-support factorisation on two more sparse bases.

Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost", NeurIPS 2021 (Sec. 4;
Combiner-Fixed is :mod:`attnkit.ops.approx.combiner`). Attention is the expectation ``E_{p(j|i)}[v_j]``: the keys
of a direct set ``Omega_i^0`` get their own softmax weight; every other visible key belongs to one region
``Omega_i^r``, reached through the region's abstraction, the mean key ``kbar_r`` and mean value ``vbar_r``
(uniform within-region distribution ``q(j|r) = 1/|r|``)::

    out_i = sum_{j in Omega_i^0} p_ij v_j + sum_r p_ir vbar_r,   one softmax over q_i.k_j s and q_i.kbar_r s + log|r|

(the ``log |r|`` term, as in attnkit's Combiner-Fixed, makes a region of equal keys exact). Every visible key gets
positive weight and each row sums to 1.

- Logsparse (the LogSparse Transformer's base): ``Omega_i^0 = {i} u {i -/+ 2^t}``; the keys between two
  consecutive direct positions, at distances ``(2^t, 2^(t+1))``, form region t (the last one reaches the
  sequence's start or end). O(n log n d) through prefix sums of the keys and values.
- Axial (the Axial Transformer's base): positions on rows of ``block_size`` (row ``j // B``, column ``j % B``);
  ``Omega_i^0`` = the query's row and column; the rest of each other column is one region (causal: the rows
  above the query's row; the query's own row is direct). O(n (2 B + n / B) d), O(n^1.5 d) at ``B ~ sqrt(n)``.

- Mixture: the heads split between bases, the first ``fixed_heads`` (default half) on Combiner-Fixed (blocks
  of ``block_size``), the rest on Combiner-Logsparse, so a layer has both a local and a multi-scale view. (This
  per-head split is attnkit's reading of Combiner-Mixture; the catalogue does not fix how the bases mix.)

Causal forms never use a future key, inside a region summary or directly. ``block_size = 1`` (axial) and short
sequences (logsparse at n <= 3: every distance is a power of two) make every region empty: exact softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.ops.approx._common import check_positive_int, masked_attention_lse, prepare, upcast

__all__ = ["combiner_logsparse_attention", "combiner_logsparse_reference", "combiner_axial_attention",
           "combiner_axial_reference", "combiner_mixture_attention", "combiner_mixture_reference", "combiner_layout"]


def combiner_layout(base: str, n: int, nk: int, *, causal: bool, block_size: int = 8,
                    device: torch.device | None = None) -> torch.Tensor:
    """The ``[n, n_k]`` layout of a Combiner base: ``-2`` key not visible, ``-1`` direct, ``r >= 0`` the key's
    region (region ids are per query). Written from the definitions, for references and tests."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    ids = torch.full((n, nk), -2, dtype=torch.long, device=device)
    if base == "logsparse":
        dist = (i - j).abs()
        power = (dist & (dist - 1)) == 0  # 0 and powers of two
        level = torch.floor(torch.log2(dist.clamp_min(1).double())).long()
        side = (j > i).long()  # keys after the query: a second family of regions
        levels = math.ceil(math.log2(max(n, nk, 2))) + 1
        ids = torch.where(power, torch.full_like(ids, -1), level + side * levels)
    elif base == "axial":
        same = ((i // block_size) == (j // block_size)) | ((i % block_size) == (j % block_size))
        ids = torch.where(same, torch.full_like(ids, -1), (j % block_size).expand(n, nk))
    else:
        raise ValueError(f"base must be 'logsparse' or 'axial', got {base!r}")
    if causal:
        ids = ids.masked_fill(j > i, -2)
    return ids


def _dense(q, k, v, ids, scale, return_attention):
    """Combiner from a layout, materialised in float64: direct logits, region logits of mean keys + log size."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    regions = int(ids.max()) + 1 if ids.numel() and int(ids.max()) >= 0 else 0
    member = (ids[None] == torch.arange(max(regions, 1), device=q.device)[:, None, None])  # [R, n, n_k]
    member = member.transpose(0, 1).double()  # [n, R, n_k]
    size = member.sum(-1)  # [n, R]
    avg = member / size.clamp_min(1)[..., None]
    kbar = torch.einsum("nrj,bhjd->bhnrd", avg, k64)
    s_direct = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(ids != -1, float("-inf"))
    s_region = (torch.einsum("bhnd,bhnrd->bhnr", q64, kbar) * scale + size.clamp_min(1).log()).masked_fill(
        size == 0, float("-inf"))
    p = torch.softmax(torch.cat([s_direct, s_region], dim=-1), dim=-1).nan_to_num(0.0)
    nk = k.shape[2]
    attn = p[..., :nk] + torch.einsum("bhnr,nrj->bhnj", p[..., nk:], avg)
    out = (attn @ v64).to(q.dtype)
    return (out, attn) if return_attention else out


# ---------------------------------------------------------------------------------------------- Logsparse
def combiner_logsparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                                 chunk_size: int = 64, scale: float | None = None, return_attention: bool = False):
    """Plain reference: the layout of :func:`combiner_layout`, the ``[b, h, n, n_k]`` matrix in float64."""
    k, v, scale = prepare(q, k, v, scale)
    ids = combiner_layout("logsparse", q.shape[2], k.shape[2], causal=causal, device=q.device)
    return _dense(q, k, v, ids, scale, return_attention)


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """``[b, h, n + 1, d]`` prefix sums (in float64 for float32 inputs on CPU: differences of long sums)."""
    acc = torch.float64 if x.device.type == "cpu" else upcast(x).dtype
    return F.pad(x.to(acc).cumsum(2), (0, 0, 1, 0))


def combiner_logsparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                                 chunk_size: int = 64, scale: float | None = None) -> torch.Tensor:
    """Combiner-Logsparse. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``:
    direct keys at distances 0 and ``2^t``, the gaps between them summarised by their mean key and value."""
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("chunk_size", chunk_size)
    b, h, n, d = q.shape
    nk = k.shape[2]
    dev = q.device
    L = math.ceil(math.log2(max(n, nk, 2))) + 1
    pk, pv = _prefix(k), _prefix(v)
    offs = 2 ** torch.arange(L, device=dev)  # 1, 2, 4, ...
    sides = [-1] if causal else [-1, 1]
    out = []
    for start in range(0, n, chunk_size):
        i = torch.arange(start, min(start + chunk_size, n), device=dev)[:, None]  # [c, 1]
        direct = [i]
        lo_hi = []
        for sgn in sides:
            direct.append(i + sgn * offs)
            if sgn < 0:  # keys at distances (2^t, 2^(t+1)): [i - 2^(t+1) + 1, i - 2^t)
                lo, hi = i - 2 * offs + 1, i - offs
            else:  # (i + 2^t, i + 2^(t+1)): [i + 2^t + 1, i + 2^(t+1))
                lo, hi = i + offs + 1, i + 2 * offs
            lo_hi.append((lo.clamp(0, nk), hi.clamp(0, nk)))
        dj = torch.cat(direct, dim=1)  # [c, 1 + |sides| L]
        dvalid = (dj >= 0) & (dj < nk)
        if causal:
            dvalid = dvalid & (dj <= i)
        lo = torch.cat([p[0] for p in lo_hi], dim=1)
        hi = torch.cat([p[1] for p in lo_hi], dim=1)
        cnt = (hi - lo).clamp_min(0)
        rvalid = cnt > 0
        hi = torch.where(rvalid, hi, lo)

        kr, vr = _range_means(pk, lo, hi, cnt).to(k.dtype), _range_means(pv, lo, hi, cnt).to(v.dtype)
        kd, vd = k[:, :, dj.clamp(0, nk - 1)], v[:, :, dj.clamp(0, nk - 1)]  # [b, h, c, D, e]
        qc = q[:, :, start:start + chunk_size]
        s_d = torch.einsum("bhcd,bhcjd->bhcj", qc, kd) * scale
        s_r = upcast(torch.einsum("bhcd,bhcrd->bhcr", qc, kr) * scale) + cnt.clamp_min(1).to(upcast(q).dtype).log()
        scores = torch.cat([upcast(s_d), s_r], dim=-1).unsqueeze(-2)
        mask = torch.cat([dvalid, rvalid], dim=-1).expand(b, h, -1, -1).unsqueeze(-2)
        o, _ = masked_attention_lse(scores, torch.cat([vd, vr], dim=-2), mask)
        out.append(o.squeeze(-2))
    return torch.cat(out, dim=2).to(v.dtype)


def _range_means(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
    """Means of the key ranges ``[lo, hi)`` (``[c, R]``) from prefix sums ``p [b, h, n + 1, e]``:
    ``[b, h, c, R, e]``."""
    s = p[:, :, hi.flatten()] - p[:, :, lo.flatten()]
    return (s / cnt.flatten().clamp_min(1)[:, None].to(s.dtype)).unflatten(2, hi.shape)


# ------------------------------------------------------------------------------------------------ Axial
def combiner_axial_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 64,
                             causal: bool = False, scale: float | None = None, return_attention: bool = False):
    """Plain reference: the layout of :func:`combiner_layout`, the ``[b, h, n, n_k]`` matrix in float64."""
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("block_size", block_size)
    ids = combiner_layout("axial", q.shape[2], k.shape[2], causal=causal, block_size=block_size, device=q.device)
    return _dense(q, k, v, ids, scale, return_attention)


def combiner_axial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 64,
                             causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Combiner-Axial. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``:
    rows of ``block_size``; the query's row and column attended directly, each other column's remaining keys
    (causal: the rows above) through their mean."""
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("block_size", block_size)
    b, h, n, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    B = block_size
    dev = q.device
    Rq, Rk = math.ceil(n / B), math.ceil(nk / B)
    R = max(Rq, Rk)
    qg = F.pad(q, (0, 0, 0, R * B - n)).view(b, h, R, B, d)  # [b, h, row, col, d]
    kg = F.pad(k, (0, 0, 0, R * B - nk)).view(b, h, R, B, d)
    vg = F.pad(v, (0, 0, 0, R * B - nk)).view(b, h, R, B, dv)
    exists = (torch.arange(R * B, device=dev) < nk).view(R, B)  # key at (row, col)
    # direct: own row (scores [.., r, c, c']) and own column ([.., r, c, r'])
    s_row = qg @ kg.transpose(-1, -2) * scale
    m_row = exists[:, None, :].expand(R, B, B)
    s_col = torch.einsum("bhrcd,bhscd->bhrcs", qg, kg) * scale
    m_col = exists.t()[None, :, :].expand(R, B, R) & (torch.arange(R, device=dev)[None, None, :]
                                                      != torch.arange(R, device=dev)[:, None, None])
    if causal:
        m_row = m_row & (torch.arange(B, device=dev)[None, None, :] <= torch.arange(B, device=dev)[None, :, None])
        m_col = m_col & (torch.arange(R, device=dev)[None, None, :] < torch.arange(R, device=dev)[:, None, None])
    # regions: column c' without the query's row (causal: rows above it), mean by column prefix sums
    ex = exists.to(torch.float64 if dev.type == "cpu" else upcast(k).dtype)
    acc = ex.dtype
    ck = F.pad(kg.to(acc).cumsum(2), (0, 0, 0, 0, 1, 0))  # [b, h, R + 1, B, d]: rows < r
    cv = F.pad(vg.to(acc).cumsum(2), (0, 0, 0, 0, 1, 0))
    cc = F.pad(ex.cumsum(0), (0, 0, 1, 0))  # [R + 1, B]
    if causal:
        sk, sv, cnt = ck[:, :, :R], cv[:, :, :R], cc[:R]  # rows above row r
    else:
        sk = ck[:, :, R:R + 1] - kg.to(acc)  # all rows but row r
        sv = cv[:, :, R:R + 1] - vg.to(acc)
        cnt = cc[R:R + 1] - ex
    kbar = (sk / cnt.clamp_min(1)[..., None]).to(k.dtype)  # [b, h, r, c', d]
    vbar = (sv / cnt.clamp_min(1)[..., None]).to(v.dtype)
    s_reg = upcast(qg @ kbar.transpose(-1, -2) * scale) + cnt.clamp_min(1).to(upcast(q).dtype).log()[:, None, :]
    m_reg = (cnt > 0)[:, None, :] & (torch.arange(B, device=dev)[None, None, :]
                                     != torch.arange(B, device=dev)[None, :, None])  # [r, c, c']
    # One softmax over the three score blocks; the value products stay per block (memory O(n (2B + R)), never
    # the values expanded per query).
    scores = torch.cat([upcast(s_row), upcast(s_col), s_reg], dim=-1)
    mask = torch.cat([m_row, m_col, m_reg], dim=-1)
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1, keepdim=True)
    p = torch.exp(scores.masked_fill(~mask, float("-inf")) - lse).to(v.dtype)
    p_row, p_col, p_reg = p.split([B, R, B], dim=-1)
    out = p_row @ vg  # [b, h, r, c, c'] @ [b, h, r, c', dv]
    out = out + torch.einsum("bhrcs,bhscd->bhrcd", p_col, vg)
    out = out + p_reg @ vbar  # [b, h, r, c, c'] @ [b, h, r, c', dv]
    return out.reshape(b, h, R * B, dv)[:, :, :n]


# ---------------------------------------------------------------------------------------------- Mixture
def _split(q, k, v, fixed_heads):
    from attnkit.ops.approx._common import repeat_kv

    h = q.shape[1]
    f = h // 2 if fixed_heads is None else fixed_heads
    check_positive_int("fixed_heads", f, minimum=0)
    if f > h:
        raise ValueError(f"fixed_heads={f} exceeds the number of heads {h}")
    if k.dim() == 4 and k.shape[1] != h:
        k, v = repeat_kv(k, h), repeat_kv(v, h)
    return f, k, v


def combiner_mixture_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 128,
                               fixed_heads: int | None = None, causal: bool = False, chunk_size: int = 64,
                               scale: float | None = None, return_attention: bool = False):
    """Plain reference: the Fixed and Logsparse references on their heads, concatenated."""
    from attnkit.ops.approx.combiner import combiner_reference

    prepare(q, k, v, scale)
    f, k, v = _split(q, k, v, fixed_heads)
    parts = []
    if f:
        parts.append(combiner_reference(q[:, :f], k[:, :f], v[:, :f], block_size=block_size, causal=causal,
                                        scale=scale, return_attention=return_attention))
    if f < q.shape[1]:
        parts.append(combiner_logsparse_reference(q[:, f:], k[:, f:], v[:, f:], causal=causal, scale=scale,
                                                  return_attention=return_attention))
    if not return_attention:
        return torch.cat(parts, dim=1)
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def combiner_mixture_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 128,
                               fixed_heads: int | None = None, causal: bool = False, chunk_size: int = 64,
                               scale: float | None = None) -> torch.Tensor:
    """Combiner-Mixture. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``:
    heads ``< fixed_heads`` (default h // 2) on Combiner-Fixed blocks of ``block_size``, the others on
    Combiner-Logsparse."""
    from attnkit.ops.approx.combiner import combiner_attention

    prepare(q, k, v, scale)
    check_positive_int("block_size", block_size)
    f, k, v = _split(q, k, v, fixed_heads)
    parts = []
    if f:
        parts.append(combiner_attention(q[:, :f], k[:, :f], v[:, :f], block_size=block_size, causal=causal,
                                        scale=scale))
    if f < q.shape[1]:
        parts.append(combiner_logsparse_attention(q[:, f:], k[:, f:], v[:, f:], causal=causal,
                                                  chunk_size=chunk_size, scale=scale))
    return torch.cat(parts, dim=1)
