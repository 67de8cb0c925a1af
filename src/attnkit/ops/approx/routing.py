"""Routing Transformer attention: k-means clustering of queries and keys, softmax within each cluster.

Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers", TACL 2021. Queries and keys
are unit-normalised and assigned to the nearest of C centroids; query i attends exactly (softmax) to the
keys j of its own cluster (and j <= i when causal). C = 1 is exact attention.

Centroids either come from the caller (``centroids=``, e.g. :class:`attnkit.nn.RoutingAttention`, which
learns them by the paper's online EMA k-means) or are fitted per call by ``kmeans_iterations`` Lloyd steps
(default 2) started from seeded random tokens. Fitting on the sequence itself would let future tokens move
past tokens' clusters, so the causal form uses given centroids or, with ``kmeans_iterations=0`` (its
default), seeded random unit directions. A query whose cluster holds no (visible) key gets a zero output.
Clusters fitted per call number ``min(num_clusters, sqrt(n_k))`` once ``num_clusters >= n_k`` (see
:func:`effective_clusters`): more clusters than keys would leave (almost) every query alone.

The fast path sorts queries and keys by cluster and, for each chunk of sorted queries, attends to the
contiguous run of sorted keys whose clusters the chunk spans: memory O(chunk x run), O(n^1.5 d) time for
balanced clusters of size sqrt(n), and the same numbers as the masked reference.
"""

from __future__ import annotations

import torch

from attnkit.ops.approx._common import (
    causal_mask,
    check_positive_int,
    grouped_attention_lse,
    masked_attention_lse,
    prepare,
    randn,
    sort_by,
    unsort,
)

__all__ = ["routing_attention", "routing_reference", "kmeans_centroids", "assign_clusters",
           "kmeans_ema_update", "effective_clusters"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def assign_clusters(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (Euclidean) of each unit-normalised row of ``x [b, h, n, d]``; ``centroids
    [h, C, d]`` or ``[b, h, C, d]``. Returns ``[b, h, n]`` int64."""
    c = centroids.to(x.dtype)
    # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2)
    score = _unit(x) @ c.transpose(-1, -2) - 0.5 * (c * c).sum(-1).unsqueeze(-2)
    return score.argmax(dim=-1)


def _cluster_means(x: torch.Tensor, assign: torch.Tensor, c: int, dims: tuple[int, ...]):
    """Sum and count of rows of unit ``x [b, h, n, d]`` per cluster, reduced over ``dims``."""
    onehot = torch.nn.functional.one_hot(assign, c).to(x.dtype)  # [b, h, n, C]
    sums = onehot.transpose(-1, -2) @ x  # [b, h, C, d]
    counts = onehot.sum(dim=-2)  # [b, h, C]
    if dims:
        sums, counts = sums.sum(dims), counts.sum(dims)
    return sums, counts


def kmeans_centroids(q: torch.Tensor, k: torch.Tensor, num_clusters: int, *, iterations: int = 2,
                     seed: int = 0) -> torch.Tensor:
    """Centroids ``[b, h, C, d]`` of the unit-normalised queries and keys, by ``iterations`` Lloyd steps
    from C distinct tokens chosen with ``seed`` (seeded random directions when there are fewer tokens)."""
    x = _unit(torch.cat([q, k], dim=2).float())
    n = x.shape[2]
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[:num_clusters].to(x.device)
    c = x[:, :, idx]
    if num_clusters > n:
        extra = _unit(randn((x.shape[1], num_clusters - n, x.shape[-1]), seed, x))
        c = torch.cat([c, extra.expand(x.shape[0], -1, -1, -1)], dim=2)
    for _ in range(iterations):
        sums, counts = _cluster_means(x, assign_clusters(x, c), num_clusters, ())
        # An empty cluster keeps its centroid.
        c = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], c)
    return c


def kmeans_ema_update(centroids: torch.Tensor, q: torch.Tensor, k: torch.Tensor, decay: float) -> torch.Tensor:
    """One online k-means step (Roy et al., sec. 4.1): each centroid ``[h, C, d]`` moves to
    ``decay mu + (1 - decay) mean(unit q and k assigned to it)``; empty clusters stay put."""
    x = _unit(torch.cat([q, k], dim=2).detach().to(centroids.dtype))
    sums, counts = _cluster_means(x, assign_clusters(x, centroids), centroids.shape[-2], (0,))
    mean = sums / counts.clamp_min(1)[..., None]
    return torch.where(counts[..., None] > 0, decay * centroids + (1 - decay) * mean, centroids)


def effective_clusters(num_clusters: int, kv_len: int) -> int:
    """The number of clusters fitted per call: ``num_clusters``, or, when it reaches the number of keys (every
    key could sit alone: queries and keys then almost never share a cluster and the output was all zeros, issue
    28, e.g. the default 128 clusters at 32 tokens), the paper's balanced choice ``sqrt(n)`` (Roy et al. 2021,
    sec. 4: clusters of ``sqrt(n)`` tokens each; 1 cluster, exact attention, for fewer than 4 keys)."""
    if num_clusters < kv_len:
        return num_clusters
    return max(1, int(kv_len ** 0.5))


def _clusters(q, k, num_clusters, centroids, kmeans_iterations, seed, causal):
    check_positive_int("num_clusters", num_clusters)
    if centroids is None:
        num_clusters = effective_clusters(num_clusters, k.shape[2])
    if kmeans_iterations is None:
        kmeans_iterations = 0 if causal else 2
    if centroids is None and causal:
        if kmeans_iterations:
            raise ValueError(
                "causal routing cannot fit k-means on the sequence it attends over (future tokens would move "
                "the centroids of past ones): pass kmeans_iterations=0 (seeded random centroids), or learned "
                "centroids= (attnkit.nn.RoutingAttention)"
            )
        centroids = _unit(randn((q.shape[1], num_clusters, q.shape[-1]), seed, q.float()))
    elif centroids is None:
        check_positive_int("kmeans_iterations", kmeans_iterations, minimum=0)
        centroids = kmeans_centroids(q, k, num_clusters, iterations=kmeans_iterations, seed=seed)
    elif centroids.shape[-2] != num_clusters or centroids.shape[-1] != q.shape[-1]:
        raise ValueError(f"centroids must be [heads, num_clusters={num_clusters}, dim={q.shape[-1]}], "
                         f"got {tuple(centroids.shape)}")
    return assign_clusters(q.float(), centroids.float()), assign_clusters(k.float(), centroids.float())


def routing_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_clusters: int = 8,
                      centroids: torch.Tensor | None = None, kmeans_iterations: int | None = None, seed: int = 0,
                      causal: bool = False, chunk_size: int = 256, scale: float | None = None,
                      return_attention: bool = False):
    """Plain reference: the ``[b, h, n, n_k]`` same-cluster (and causal) mask, masked softmax in float64."""
    k, v, scale = prepare(q, k, v, scale)
    cq, ck = _clusters(q, k, num_clusters, centroids, kmeans_iterations, seed, causal)
    mask = cq[..., :, None] == ck[..., None, :]
    if causal:
        mask = mask & causal_mask(q.shape[2], k.shape[2], q.device)
    s = q.double() @ k.double().transpose(-1, -2) * scale
    out, _ = masked_attention_lse(s, v.double(), mask)
    if not return_attention:
        return out.to(q.dtype)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return out.to(q.dtype), p


def routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_clusters: int = 8,
                      centroids: torch.Tensor | None = None, kmeans_iterations: int | None = None, seed: int = 0,
                      causal: bool = False, chunk_size: int = 256, scale: float | None = None) -> torch.Tensor:
    """Routing attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` ->
    ``[b, h, n, dv]``. ``centroids [h, C, d]`` (or ``[b, h, C, d]``) or None to fit them per call."""
    check_positive_int("chunk_size", chunk_size)
    k, v, scale = prepare(q, k, v, scale)
    n, nk = q.shape[2], k.shape[2]
    cq, ck = _clusters(q, k, num_clusters, centroids, kmeans_iterations, seed, causal)
    # Stable sort by cluster (cluster * n + position keeps positions ordered inside a cluster).
    q_order = torch.argsort(cq * n + torch.arange(n, device=q.device), dim=-1)
    k_order = torch.argsort(ck * nk + torch.arange(nk, device=q.device), dim=-1)
    out, _ = grouped_attention_lse(sort_by(q, q_order), cq.gather(-1, q_order), sort_by(k, k_order),
                                   sort_by(v, k_order), ck.gather(-1, k_order), scale=scale,
                                   chunk_size=chunk_size, qpos=q_order if causal else None,
                                   kpos=k_order if causal else None)
    return unsort(out, q_order)
