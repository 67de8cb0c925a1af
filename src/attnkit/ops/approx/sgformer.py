"""SG-Former: significance-guided reallocation of keys and values; queries keep full resolution.

Ren et al., "SG-Former: Self-guided Transformer with Evolving Token Reallocation", ICCV 2023. The keys are cut
into regions of ``region_size`` tokens. A significance map says how much attention each region receives; here
it is estimated by a coarse (hybrid-scale) attention of every query to the regions' mean keys,
``sig_r = mean_i softmax_r(q_i . kbar_r s + log |r|)`` (the paper learns it and lets it evolve in training).
Regions are ranked by significance and split into levels, one per aggregation rate in ``rates`` (most
significant regions first; ``fractions`` of the regions per level, default equal): a region at rate rho is pooled
into ``ceil(|r| / rho)`` tokens, each the mean of ``rho`` consecutive keys (values alike). Every query attends
to the reallocated set, with a ``log(count)`` bias on each pooled token (an attnkit choice: a pooled token stands
for ``count`` keys, so a region of equal keys is exact)::

    out_i = sum_t softmax_t(q_i . kbar_t s + log c_t) vbar_t

Equivalently, every key is replaced by its pooled token's mean key and one softmax runs over all n_k keys (that
is the reference). Rate 1 everywhere is full attention; the number of KV tokens is
``sum_r ceil(|r| / rate(r))``. Cost O(n n' d) with ``n' ~ n_k sum_l fraction_l / rate_l``, plus O(n (n_k /
region_size) d) for the significance.
"""

from __future__ import annotations

import math

import torch

from attnkit.ops.approx._common import (
    check_positive_int,
    masked_attention_lse,
    prepare,
    refuse_causal,
    upcast,
)

__all__ = ["sgformer_attention", "sgformer_reference", "sgformer_levels", "sgformer_significance"]


def _check(q, k, v, region_size, rates, fractions, scale, causal):
    refuse_causal("sgformer", causal, "the significance map and the pooled regions use the whole sequence")
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("region_size", region_size)
    rates = tuple(rates)
    if not rates:
        raise ValueError("rates must hold at least one aggregation rate, e.g. (1, 4)")
    for r in rates:
        check_positive_int("rates entry", r)
    if fractions is None:
        fractions = (1.0 / len(rates),) * len(rates)
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(rates) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be {len(rates)} non-negative numbers summing to 1 (one per rate), "
                         f"got {fractions}")
    return k, v, scale, rates, fractions


def _num_regions(nk: int, region_size: int) -> int:
    return math.ceil(nk / region_size)


def sgformer_significance(q: torch.Tensor, k: torch.Tensor, region_size: int, scale: float) -> torch.Tensor:
    """Significance ``[b, h, R]`` of the ``R = ceil(n_k / region_size)`` key regions: the coarse attention mass
    each receives, averaged over the queries."""
    nk = k.shape[2]
    R = _num_regions(nk, region_size)
    region = torch.arange(nk, device=k.device) // region_size
    sums = torch.zeros(*k.shape[:2], R, k.shape[-1], dtype=upcast(k).dtype, device=k.device)
    sums = sums.index_add(2, region, upcast(k.detach()))
    counts = torch.bincount(region, minlength=R).to(sums.dtype)
    means = sums / counts[:, None]
    s = upcast(q.detach()) @ means.transpose(-1, -2) * scale + counts.log()
    return torch.softmax(s, dim=-1).mean(dim=2)


def sgformer_levels(significance: torch.Tensor, fractions: tuple[float, ...]) -> torch.Tensor:
    """Level (index into ``rates``) of each region ``[b, h, R]``: the most significant ``round(f_0 R)`` regions
    get level 0, the next ``round(f_1 R)`` level 1, ... (the last level takes the rest)."""
    R = significance.shape[-1]
    bounds = torch.tensor([round(sum(fractions[:i + 1]) * R) for i in range(len(fractions) - 1)],
                          device=significance.device)
    rank = torch.empty_like(significance, dtype=torch.long).scatter_(
        -1, significance.argsort(dim=-1, descending=True, stable=True),
        torch.arange(R, device=significance.device).expand_as(significance).contiguous())
    return torch.bucketize(rank, bounds, right=True)


def _pool_ids(nk: int, region_size: int, rates: tuple[int, ...], levels: torch.Tensor) -> torch.Tensor:
    """Pooled-token id ``[b, h, n_k]`` of every key: region r at rate rho has tokens ``(j - r B) // rho``; ids are
    made unique across regions by an offset of ``B`` per region (the id space has gaps)."""
    j = torch.arange(nk, device=levels.device)
    region = j // region_size
    rate = torch.tensor(rates, device=levels.device)[levels]  # [b, h, R]
    rho = rate.gather(-1, region.expand(*levels.shape[:2], -1))  # [b, h, n_k]
    return region * region_size + (j - region * region_size) // rho


def sgformer_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, region_size: int = 64,
                       rates: tuple[int, ...] = (1, 4, 16), fractions: tuple[float, ...] | None = None,
                       causal: bool = False, chunk_size: int = 256, scale: float | None = None,
                       return_attention: bool = False):
    """Plain reference: every key replaced by its pooled token's mean key, one softmax over all ``n_k`` keys with
    the original values (equal weights inside a pooled token sum to its weight times the mean value); float64."""
    k, v, scale, rates, fractions = _check(q, k, v, region_size, rates, fractions, scale, causal)
    nk = k.shape[2]
    levels = sgformer_levels(sgformer_significance(q, k, region_size, scale), fractions)
    ids = _pool_ids(nk, region_size, rates, levels)
    k64 = k.double()
    sums = torch.zeros_like(k64).scatter_add_(2, ids[..., None].expand_as(k64), k64)
    counts = torch.zeros(ids.shape, dtype=torch.float64, device=k.device).scatter_add_(
        2, ids, torch.ones_like(ids, dtype=torch.float64))
    kbar = (sums / counts.clamp_min(1)[..., None]).gather(2, ids[..., None].expand_as(k64))
    s = q.double() @ kbar.transpose(-1, -2) * scale
    out, _ = masked_attention_lse(s, v.double())
    if not return_attention:
        return out.to(q.dtype)
    return out.to(q.dtype), torch.softmax(s, dim=-1)


def sgformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, region_size: int = 64,
                       rates: tuple[int, ...] = (1, 4, 16), fractions: tuple[float, ...] | None = None,
                       causal: bool = False, chunk_size: int = 256, scale: float | None = None) -> torch.Tensor:
    """SG-Former attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``:
    key regions of ``region_size`` ranked by significance, pooled at ``rates`` (most significant first, in
    ``fractions`` of the regions), exact softmax of every query over the pooled tokens."""
    k, v, scale, rates, fractions = _check(q, k, v, region_size, rates, fractions, scale, causal)
    check_positive_int("chunk_size", chunk_size)
    b, h, n, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    B = region_size
    R = _num_regions(nk, B)
    levels = sgformer_levels(sgformer_significance(q, k, B, scale), fractions)
    kk, vv, cc = [], [], []
    for level, rho in enumerate(rates):
        count = int((levels == level).sum(-1).max())
        if count == 0:
            continue
        # this level's regions [b, h, count] (padded with region 0, masked below)
        is_level = levels == level
        regions = torch.sort(torch.where(is_level, torch.arange(R, device=q.device), R), dim=-1).values[..., :count]
        valid_region = regions < R
        regions = regions.clamp_max(R - 1)
        per = math.ceil(B / rho)  # pooled tokens per full region
        # pooled tokens of every region at rate rho: segment means of [b, h, R, per, rho] (padding masked)
        pad = R * B - nk
        kr = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, R, B, d)
        vr = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, h, R, B, dv)
        inside = (torch.arange(R * B, device=q.device) < nk).view(R, B)
        padB = per * rho - B
        kr = torch.nn.functional.pad(kr, (0, 0, 0, padB)).view(b, h, R, per, rho, d)
        vr = torch.nn.functional.pad(vr, (0, 0, 0, padB)).view(b, h, R, per, rho, dv)
        inside = torch.nn.functional.pad(inside, (0, padB)).view(R, per, rho)
        cnt = inside.sum(-1)  # [R, per]
        w = inside.to(k.dtype)[..., None]
        kbar = (kr * w).sum(-2) / cnt.clamp_min(1)[..., None].to(k.dtype)  # [b, h, R, per, d]
        vbar = (vr * w.to(v.dtype)).sum(-2) / cnt.clamp_min(1)[..., None].to(v.dtype)
        pick = regions[..., None, None]
        kk.append(kbar.gather(2, pick.expand(-1, -1, -1, per, d)).flatten(2, 3))
        vv.append(vbar.gather(2, pick.expand(-1, -1, -1, per, dv)).flatten(2, 3))
        c = cnt[regions] * valid_region[..., None]  # [b, h, count, per]; 0 = absent token
        cc.append(c.flatten(2))
    kp, vp, cp = torch.cat(kk, dim=2), torch.cat(vv, dim=2), torch.cat(cc, dim=2)
    bias = torch.where(cp > 0, cp.clamp_min(1).to(upcast(q).dtype).log(), torch.full_like(cp, float("-inf"),
                                                                                          dtype=upcast(q).dtype))
    out = []
    for start in range(0, n, chunk_size):
        s = upcast(q[:, :, start:start + chunk_size] @ kp.transpose(-1, -2) * scale) + bias[:, :, None, :]
        out.append(masked_attention_lse(s, vp, cp[:, :, None, :] > 0)[0])
    return torch.cat(out, dim=2).to(v.dtype)
