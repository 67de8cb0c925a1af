"""BOAT: bilateral local attention, softmax within balanced feature-space clusters beside image-space windows.

Yu et al., "BOAT: Bilateral Local Attention Vision Transformer", BMVC 2022. Tokens are grouped by balanced
hierarchical clustering in feature space (recursive balanced bisection: each group is split at the median of its
projection on its principal direction, so sibling groups differ in size by at most one, and all clusters have
exactly ``cluster_size`` tokens when ``n = cluster_size 2^L``); each token attends to the tokens of its cluster.
Beside it, image-space local attention: each token attends to its non-overlapping window of ``window`` tokens
(a 1-D sequence: flatten the image window by window). As in the paper's bilateral block, the heads are split:
the first ``image_heads`` heads use image-space windows, the others feature-space clusters.

Clusters are computed from the keys (self-attention: query i and key i are the same token, so ``q_len`` must
equal ``kv_len``). Cost O(n (cluster_size + window) d) plus the clustering, O(n d^2 log(n / cluster_size)).
With ``cluster_size >= n`` and ``window >= n`` the result is full attention.
"""

from __future__ import annotations

import math

import torch

from attnkit.ops.approx._common import (
    check_positive_int,
    grouped_attention_lse,
    masked_attention_lse,
    prepare,
    refuse_causal,
    sort_by,
    unsort,
)

__all__ = ["balanced_clusters", "boat_attention", "boat_reference"]


def balanced_clusters(x: torch.Tensor, cluster_size: int, *, power_iterations: int = 4) -> torch.Tensor:
    """Balanced cluster id ``[b, h, n]`` of each token of ``x [b, h, n, d]``: ``L = ceil(log2(n / cluster_size))``
    rounds of splitting every group at the median of its projection on its principal direction (power
    iteration from a fixed start), giving ``2^L`` clusters whose sizes differ by at most one."""
    check_positive_int("cluster_size", cluster_size)
    b, h, n, d = x.shape
    levels = max(0, math.ceil(math.log2(n / cluster_size))) if n > cluster_size else 0
    xf = x.detach().double().flatten(0, 1)  # [B, n, d]
    B = xf.shape[0]
    group = torch.zeros(B, n, dtype=torch.long, device=x.device)
    start_vec = torch.linspace(1.0, 2.0, d, dtype=torch.float64, device=x.device)
    for level in range(levels):
        G = 2 ** level
        counts = torch.zeros(B, G, dtype=torch.float64, device=x.device).scatter_add_(
            1, group, torch.ones_like(group, dtype=torch.float64))
        idx = group[..., None].expand(-1, -1, d)
        mean = torch.zeros(B, G, d, dtype=torch.float64, device=x.device).scatter_add_(1, idx, xf)
        mean = mean / counts.clamp_min(1)[..., None]
        xc = xf - mean.gather(1, idx)
        u = start_vec.expand(B, G, d)
        for _ in range(power_iterations):  # C u = sum_j xc_j (xc_j . u), without forming C
            proj = (xc * u.gather(1, idx)).sum(-1, keepdim=True)
            u = torch.zeros(B, G, d, dtype=torch.float64, device=x.device).scatter_add_(1, idx, xc * proj)
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        proj = (xc * u.gather(1, idx)).sum(-1)
        # rank within the group: sort by projection, then (stably) by group
        order = proj.argsort(dim=1, stable=True)
        order = order.gather(1, group.gather(1, order).argsort(dim=1, stable=True))
        starts = torch.nn.functional.pad(counts.long().cumsum(1), (1, 0))[:, :-1]
        rank = torch.empty_like(group).scatter_(1, order, torch.arange(n, device=x.device).expand(B, n))
        rank = rank - starts.gather(1, group)
        half = counts.long().gather(1, group) // 2
        group = 2 * group + (rank >= half).long()
    return group.view(b, h, n)


def _setup(q, k, v, cluster_size, window, image_heads, scale, causal):
    refuse_causal("boat", causal, "clusters and windows are formed from the whole sequence")
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("cluster_size", cluster_size)
    check_positive_int("window", window)
    h = q.shape[1]
    image_heads = h // 2 if image_heads is None else image_heads
    check_positive_int("image_heads", image_heads, minimum=0)
    if image_heads > h:
        raise ValueError(f"image_heads={image_heads} exceeds the number of heads {h}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"boat is self-attention over one set of tokens: q_len ({q.shape[2]}) must equal "
                         f"kv_len ({k.shape[2]})")
    return k, v, scale, image_heads


def _groups(k, cluster_size, window, image_heads):
    n = k.shape[2]
    feature = balanced_clusters(k, cluster_size)
    image = (torch.arange(n, device=k.device) // window).expand(k.shape[0], image_heads, n)
    return torch.cat([image, feature[:, image_heads:]], dim=1)


def boat_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cluster_size: int = 64, window: int = 64,
                   image_heads: int | None = None, causal: bool = False, chunk_size: int = 256,
                   scale: float | None = None, return_attention: bool = False):
    """Plain reference: dense same-group mask, masked softmax in float64."""
    k, v, scale, image_heads = _setup(q, k, v, cluster_size, window, image_heads, scale, causal)
    g = _groups(k, cluster_size, window, image_heads)
    mask = g[..., :, None] == g[..., None, :]
    s = q.double() @ k.double().transpose(-1, -2) * scale
    out, _ = masked_attention_lse(s, v.double(), mask)
    if not return_attention:
        return out.to(q.dtype)
    return out.to(q.dtype), torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)


def boat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cluster_size: int = 64, window: int = 64,
                   image_heads: int | None = None, causal: bool = False, chunk_size: int = 256,
                   scale: float | None = None) -> torch.Tensor:
    """BOAT attention. ``q, k [b, h, n, d]``, ``v [b, h, n, dv]`` -> ``[b, h, n, dv]``: heads ``< image_heads``
    (default h // 2) attend within windows of ``window`` tokens, the others within balanced feature-space
    clusters of about ``cluster_size`` tokens."""
    k, v, scale, image_heads = _setup(q, k, v, cluster_size, window, image_heads, scale, causal)
    check_positive_int("chunk_size", chunk_size)
    g = _groups(k, cluster_size, window, image_heads)
    order = g.argsort(dim=-1, stable=True)
    gs = g.gather(-1, order)
    out, _ = grouped_attention_lse(sort_by(q, order), gs, sort_by(k, order), sort_by(v, order), gs, scale=scale,
                                   chunk_size=chunk_size)
    return unsort(out, order).to(v.dtype)
