"""Neighborhood attention as an ``attnkit.patterns.Pattern`` over flattened (row-major) tokens."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from attnkit.patterns.base import EMPTY, FULL, PARTIAL, Pattern
from attnkit.patterns.windows import NASpec, axis_bounds, count_below, decode, make_spec, member

__all__ = ["NeighborhoodPattern", "neighborhood_pattern", "allowed_pairs"]


class NeighborhoodPattern(Pattern):
    """Query token ``i`` may attend key token ``j`` (both flattened row-major over ``spec.shape``) iff on
    every axis the key's coordinate is in the query's window (``attnkit.patterns.windows``).

    Tiles of the flattened sequence are classified *exactly* (not just conservatively) and analytically:
    the number of allowed keys of a query below a flat index is a lexicographic count over the separable
    per-axis windows, O(1) per (query, tile boundary) instead of O(tile) predicate evaluations.
    """

    def __init__(self, spec: NASpec):
        self.spec = spec

    def __repr__(self) -> str:
        a = self.spec.axes
        return (f"neighborhood(spatial_shape={self.spec.shape}, kernel_size={tuple(x.kernel for x in a)}, "
                f"dilation={tuple(x.dilation for x in a)}, stride={tuple(x.stride for x in a)}, "
                f"is_causal={tuple(x.causal for x in a)})")

    def __eq__(self, other) -> bool:
        return isinstance(other, NeighborhoodPattern) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def check(self, q_len: int, kv_len: int, batch: int, heads: int) -> None:
        n = self.spec.num_tokens
        if q_len != n or kv_len != n:
            raise ValueError(f"neighborhood pattern over spatial shape {self.spec.shape} needs q_len == kv_len == "
                             f"{n} (flattened tokens), got q_len={q_len}, kv_len={kv_len}")

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        shape = self.spec.shape
        qc, kc = decode(q_idx, shape), decode(kv_idx, shape)
        out = None
        for axis, xq, xk in zip(self.spec.axes, qc, kc):
            g, lo, hi = axis_bounds(xq, axis)
            m = member(g, lo, hi, xk, axis.dilation)
            out = m if out is None else out & m
        return out

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        counts = tile_counts(self.spec, block_q, block_kv, device)
        n = self.spec.num_tokens
        nq, nk = counts.shape
        qsize = torch.clamp(n - torch.arange(nq, device=device) * block_q, max=block_q)
        ksize = torch.clamp(n - torch.arange(nk, device=device) * block_kv, max=block_kv)
        cls = torch.full((nq, nk), PARTIAL, dtype=torch.int8, device=device)
        cls[counts == 0] = EMPTY
        cls[counts == qsize.view(-1, 1) * ksize.view(1, -1)] = FULL
        return cls[None, None]


def _keys_below(spec: NASpec, bounds, e: torch.Tensor) -> torch.Tensor:
    """Allowed keys with flat index ``< e`` for each query (``bounds``: per-axis ``(g, lo, hi)`` shaped
    ``[nq, 1]``; ``e``: ``[1, ne]``), by lexicographic counting over the axes."""
    n = spec.num_tokens
    full = e >= n
    coords = decode(torch.clamp(e, max=n - 1), spec.shape)
    # Per-axis window sizes: keys with a smaller leading coordinate count every later-axis combination.
    sizes = [count_below(g, lo, hi, torch.full_like(lo, axis.length), axis.dilation)
             for axis, (g, lo, hi) in zip(spec.axes, bounds)]
    total = None
    prefix_member = None  # whether the key's leading coordinates are all window members
    for i, (axis, (g, lo, hi), c) in enumerate(zip(spec.axes, bounds, coords)):
        term = count_below(g, lo, hi, c, axis.dilation)
        for size in sizes[i + 1:]:
            term = term * size
        total = term if prefix_member is None else total + prefix_member * term
        m = member(g, lo, hi, c, axis.dilation).long()
        prefix_member = m if prefix_member is None else prefix_member * m
    everything = sizes[0]
    for size in sizes[1:]:
        everything = everything * size
    return torch.where(full, everything.expand_as(total), total)


def tile_counts(spec: NASpec, block_q: int, block_kv: int, device=None, chunk: int = 4096) -> torch.Tensor:
    """Allowed (query, key) pairs in every tile of the flattened sequence: ``[ceil(n / block_q),
    ceil(n / block_kv)]`` (int64), computed in query chunks (memory O(chunk * tiles))."""
    n = spec.num_tokens
    nq, nk = -(-n // block_q), -(-n // block_kv)
    edges = (torch.arange(nk + 1, device=device) * block_kv).clamp(max=n).view(1, -1)
    out = torch.zeros(nq, nk, dtype=torch.long, device=device)
    chunk = max(block_q, chunk // block_q * block_q)
    for start in range(0, n, chunk):
        qi = torch.arange(start, min(start + chunk, n), device=device)
        bounds = [tuple(t.view(-1, 1) for t in axis_bounds(x, axis))
                  for axis, x in zip(spec.axes, decode(qi, spec.shape))]
        below = _keys_below(spec, bounds, edges)  # [chunk, nk + 1]
        per_tile = below[:, 1:] - below[:, :-1]
        rows = torch.div(qi, block_q, rounding_mode="floor")
        out.index_add_(0, rows, per_tile)
    return out


def allowed_pairs(spec: NASpec) -> int:
    """Exact number of allowed (query, key) pairs: the product over axes of each axis's pair count."""
    total = 1
    for axis in spec.axes:
        x = torch.arange(axis.length)
        g, lo, hi = axis_bounds(x, axis)
        total *= int((hi - lo + 1).sum())
    return total


@functools.lru_cache(maxsize=64)
def _cached_pattern(spec: NASpec) -> NeighborhoodPattern:
    return NeighborhoodPattern(spec)


def neighborhood_pattern(spatial_shape: Sequence[int], kernel_size, *, dilation=1, stride=1,
                         is_causal=False) -> NeighborhoodPattern:
    """The neighborhood-attention pattern over the row-major flattening of a ``spatial_shape`` grid
    (1 to 3 axes); parameters as in ``attnkit.neighborhood`` (one value or one per axis).

    Use it with the generic engine on flattened tokens ``[batch, heads, prod(spatial_shape), dim]``::

        attnkit.attention(q, k, v, pattern=neighborhood_pattern((32, 32), 7))
    """
    return _cached_pattern(make_spec(spatial_shape, kernel_size, dilation, stride, is_causal))


def _density(spec: NASpec) -> float:
    return allowed_pairs(spec) / math.prod(spec.shape) ** 2


def neighborhood(spatial_shape, kernel_size, dilation=1, stride=1, is_causal=False) -> Pattern:
    """Neighborhood attention over a flattened 1/2/3-D grid (see ``attnkit.neighborhood``)."""
    return neighborhood_pattern(spatial_shape, kernel_size, dilation=dilation, stride=stride,
                                is_causal=is_causal)
