"""GNA's analytical speed-of-light model for neighborhood attention with multi-dimensional tiles.

"Generalized Neighborhood Attention" (Hassani et al., 2025) bounds the speed-up of a tiled sparse kernel
over dense attention by ``dense tiles / computed tiles``, where tiles are laid out over the spatial grid
(query tile ``tile_shape``, key tile ``kv_tile_shape``, in dilation-group coordinates after NATTEN's token
permutation). Because the pattern is separable, a multi-dimensional tile pair is computed iff every axis's
1-D tile pair is, so the counts are products of per-axis counts: exact and O(tiles per axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnkit.ops.neighborhood.engine import box_fraction, choose_tiles
from attnkit.patterns.spatial import allowed_pairs
from attnkit.patterns.windows import AxisSpec, group_bounds, make_spec

__all__ = ["neighborhood_speed_of_light", "axis_tile_counts"]


def axis_tile_counts(axis: AxisSpec, tile_q: int, tile_kv: int) -> tuple[int, int, int, int]:
    """On one axis: ``(query tiles, key tiles, computed tile pairs, full tile pairs)`` summed over dilation
    groups (tiles never straddle groups, as after NATTEN's token permutation)."""
    nq = nk = computed = full = 0
    for g in range(axis.dilation):
        length = axis.group_length(g)
        tq, tk = min(tile_q, length), min(tile_kv, length)
        qt, kt = -(-length // tq), -(-length // tk)
        nq, nk = nq + qt, nk + kt
        x = (torch.arange(qt).view(-1, 1) * tq + torch.arange(tq)).clamp(max=length - 1)
        lo, hi = group_bounds(x, length, axis.kernel, axis.stride, axis.causal)
        ks = torch.arange(kt) * tk
        ke = torch.clamp(ks + tk - 1, max=length - 1)
        # The union of a query tile's windows is one interval (consecutive windows overlap or touch).
        union_lo, union_hi = lo.amin(1, keepdim=True), hi.amax(1, keepdim=True)
        computed += int(((ks <= union_hi) & (ke >= union_lo)).sum())
        cover = (lo[:, :, None] <= ks) & (hi[:, :, None] >= ke)  # [qt, tq, kt]
        full += int(cover.all(1).sum())
    return nq, nk, computed, full


def neighborhood_speed_of_light(spatial_shape: Sequence[int], kernel_size, *, dilation=1, stride=1,
                                is_causal=False, tile_shape: Sequence[int] | int = 8,
                                kv_tile_shape: Sequence[int] | int | None = None) -> dict:
    """The speed-of-light of neighborhood attention on a grid, for multi-dimensional tiles.

    Returns a dict with ``density`` (allowed pairs / n^2), ``tile_fraction`` (computed tile pairs / all),
    ``full_fraction`` (tile pairs computed without a mask / all), ``max_speedup_tiled`` (1 /
    tile_fraction, GNA's bound for these tiles), ``max_speedup_exact`` (1 / density, an element-sparse
    kernel's bound), the tile shapes, and for attnkit's CPU engine its tile shape (``engine_tiles``) and the
    fraction of dense work it computes (``engine_work_fraction``: query tiles times key boxes).

    Example: ``neighborhood_speed_of_light((128, 128), 13, tile_shape=(8, 8))["max_speedup_tiled"]``.
    """
    spec = make_spec(spatial_shape, kernel_size, dilation, stride, is_causal)
    nd = spec.ndim
    tq = (tile_shape,) * nd if isinstance(tile_shape, int) else tuple(tile_shape)
    tk = tq if kv_tile_shape is None else ((kv_tile_shape,) * nd if isinstance(kv_tile_shape, int)
                                             else tuple(kv_tile_shape))
    if len(tq) != nd or len(tk) != nd or any(t < 1 for t in (*tq, *tk)):
        raise ValueError(f"tile shapes must have {nd} positive entries, got {tq} and {tk}")
    counts = [axis_tile_counts(a, q, k) for a, q, k in zip(spec.axes, tq, tk)]
    total = math.prod(c[0] * c[1] for c in counts)
    computed = math.prod(c[2] for c in counts)
    full = math.prod(c[3] for c in counts)
    n = spec.num_tokens
    density = allowed_pairs(spec) / n ** 2
    engine_tiles = choose_tiles(spec)
    return {
        "density": density,
        "tile_fraction": computed / total,
        "full_fraction": full / total,
        "max_speedup_tiled": total / max(computed, 1),
        "max_speedup_exact": 1 / density,
        "tile_shape": tq,
        "kv_tile_shape": tk,
        "engine_tiles": engine_tiles,
        "engine_work_fraction": box_fraction(spec, engine_tiles),
    }
