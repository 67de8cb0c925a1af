"""Token permutations into spatial tiles for block-sparse kernels, with analytic tile classes.

A block-sparse kernel (FlexAttention's ``BlockMask``, 128 x 128 tiles) computes every (query tile, key tile) pair
holding at least one allowed pair. Flattened row-major, a tile of a 2-D grid is a strip of rows, and a query
strip's windows touch many key strips; permuted so that each tile is a spatial box, a box's neighbours form a
small box of tiles ("Generalized Neighborhood Attention", Hassani et al. 2025, Sec. 3: tile-level sparsity and
its speed of light; NATTEN's token permutation). Two per-axis permutations compose here:

* dilation grouping: with dilation ``d`` dividing the axis, positions ``x`` are reordered to ``(x % d, x // d)``,
  so a window (which stays inside its group ``x % d``) is contiguous and tiles never mix groups;
* tiling: the grid is cut into boxes of ``tile`` positions per axis (``prod(tile) == block``), listed box by box.

Neighborhoods are a product over axes of 1-D windows, so a tile pair is empty iff on some axis no query-key
pair of the two 1-D tiles is allowed, and full iff on every axis all are: the classes are an outer product of
per-axis tables (exact, O(axis length^2) per axis). The tile shape is chosen to minimise the computed tiles
(then the partial ones) among all boxes of ``block`` positions whose sides divide the axes.

``tile limit``: the query-key pairs the tiling computes (non-empty tiles x block^2); ``speed of light``: the
pairs in the windows. Their ratio bounds what any kernel on this tiling can gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit.patterns.windows import AxisSpec, NASpec, axis_bounds, group_bounds, member

__all__ = ["Tiling", "choose_tiling", "tile_candidates", "axis_order", "token_permutation", "tile_permutation",
           "tiling_classes", "tile_classes", "tiling_stats", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class Tiling:
    """A spatial tiling: ``tile`` positions per axis (``prod == block``) after per-axis ``grouped`` dilation
    grouping; ``computed`` / ``full`` tile pairs (exact counts)."""

    tile: tuple[int, ...]
    grouped: tuple[bool, ...]
    block: int
    computed: int
    full: int


def axis_order(axis: AxisSpec, grouped: bool, device=None) -> torch.Tensor:
    """Positions of the axis in their new order (``order[new] = old``): by dilation group, then position."""
    x = torch.arange(axis.length, device=device)
    if not grouped:
        return x
    d = axis.dilation
    return x.view(axis.length // d, d).t().reshape(-1)


def _axis_tables(axis: AxisSpec, t: int, grouped: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(some, every)`` ``[n / t, n / t]``: whether some / every query-key pair of two 1-D tiles is allowed."""
    n = axis.length
    d = axis.dilation
    if d == 1 or (grouped and (n // d) % t == 0):
        # Tiles inside one dilation group (in group coordinates, length L): a query's window is an interval
        # [lo, hi] and the windows of a tile's queries overlap or touch, so O(tiles^2 * t) interval tests.
        L = n // d
        nt = L // t
        xg = torch.arange(L, device=device).view(nt, t)
        lo, hi = group_bounds(xg, L, axis.kernel, axis.stride, axis.causal)  # [nt, t]
        ks = torch.arange(nt, device=device) * t
        ke = ks + (t - 1)
        some = (ks.view(1, -1) <= hi.amax(1, keepdim=True)) & (ke.view(1, -1) >= lo.amin(1, keepdim=True))
        every = (lo.amax(1, keepdim=True) <= ks.view(1, -1)) & (hi.amin(1, keepdim=True) >= ke.view(1, -1))
        if d > 1:  # groups are diagonal blocks (equal lengths): no pair across groups
            eye = torch.eye(d, dtype=torch.bool, device=device)
            some = torch.kron(eye, some)
            every = torch.kron(eye, every)
        return some, every
    x = axis_order(axis, grouped, device)
    g, lo, hi = axis_bounds(x.view(-1, 1), axis)
    m = member(g, lo, hi, x.view(1, -1), axis.dilation).view(n // t, t, n // t, t)
    return m.any(dim=(1, 3)), m.all(dim=(1, 3))


def tile_candidates(shape: tuple[int, ...], block: int) -> list[tuple[int, ...]]:
    """Every tile shape of powers of two with ``prod == block`` whose sides divide the axes ``shape`` (axis by
    axis, smaller sides first; empty when none divides)."""
    out = []

    def rec(prefix, left):
        axis = len(prefix)
        if axis == len(shape) - 1:
            if shape[axis] % left == 0:
                out.append(prefix + (left,))
            return
        x = 1
        while x <= left:
            if left % x == 0 and shape[axis] % x == 0:
                rec(prefix + (x,), left // x)
            x *= 2

    rec((), block)
    return out


def choose_tiling(spec: NASpec, block: int = 128) -> Tiling | None:
    """The spatial tiling with the fewest computed tile pairs (then the fewest partial ones), or None when no box
    of ``block`` positions divides the grid. Counts are products of per-axis counts (exact)."""
    if spec.num_tokens % block:
        return None
    grouped = tuple(a.dilation > 1 and a.length % a.dilation == 0 for a in spec.axes)
    best = None
    cache: dict = {}
    for tile in tile_candidates(spec.shape, block):
        computed = full = 1
        for axis, t, gr in zip(spec.axes, tile, grouped):
            key = (axis, t, gr)
            if key not in cache:
                some, every = _axis_tables(axis, t, gr)
                cache[key] = (int(some.sum()), int(every.sum()))
            computed *= cache[key][0]
            full *= cache[key][1]
        rank = (computed, computed - full, max(tile) / min(tile))
        if best is None or rank < best[0]:
            best = (rank, Tiling(tile, grouped, block, computed, full))
    return None if best is None else best[1]


def _tiles_first(idx: torch.Tensor, tile: tuple[int, ...]) -> torch.Tensor:
    """``idx`` (any tensor of the grid's shape) flattened tile by tile: tiles row-major, row-major inside a tile."""
    nd = idx.dim()
    split = []
    for s, t in zip(idx.shape, tile):
        split += [s // t, t]
    order = [2 * a for a in range(nd)] + [2 * a + 1 for a in range(nd)]
    return idx.reshape(*split).permute(*order).reshape(-1)


def tile_permutation(shape: tuple[int, ...], tile: tuple[int, ...], device=None) -> torch.Tensor:
    """``perm [n]`` with ``perm[new] = old``: flat row-major indices of the grid ``shape`` listed tile by tile
    (tiles row-major, tokens row-major inside each tile); no dilation grouping."""
    return _tiles_first(torch.arange(math.prod(shape), device=device).view(*shape), tile)


def token_permutation(spec: NASpec, tiling: Tiling, device=None) -> torch.Tensor:
    """``perm [n]`` with ``perm[new] = old`` (flat row-major indices): dilation grouping per axis, then the
    tokens listed tile by tile (tiles row-major, tokens row-major inside a tile)."""
    idx = torch.arange(spec.num_tokens, device=device).view(*spec.shape)
    for a, (axis, gr) in enumerate(zip(spec.axes, tiling.grouped)):
        if gr:
            idx = idx.index_select(a, axis_order(axis, True, device))
    return _tiles_first(idx, tiling.tile)


def tile_classes(spec: NASpec, tile: tuple[int, ...], grouped: tuple[bool, ...] | None = None,
                 device=None) -> torch.Tensor:
    """Tile classes ``[1, 1, T, T]`` (int8: EMPTY / PARTIAL / FULL) of the token order that lists tiles of shape
    ``tile`` (each axis grouped by dilation where ``grouped`` says; default none). Neighborhoods are a product
    over axes of 1-D windows, so a (query tile, key tile) pair is empty if on some axis no query-key pair of the
    two tiles is allowed, and full if on every axis all are: per-axis ``any`` / ``all`` tables, then an outer
    product."""
    if grouped is None:
        grouped = (False,) * len(tile)
    some = every = None
    for axis, t, gr in zip(spec.axes, tile, grouped):
        s_a, e_a = _axis_tables(axis, t, gr, device)
        if some is None:
            some, every = s_a, e_a
            continue
        a, b = some.shape
        c, d = s_a.shape
        some = (some.view(a, 1, b, 1) & s_a.view(1, c, 1, d)).reshape(a * c, b * d)
        every = (every.view(a, 1, b, 1) & e_a.view(1, c, 1, d)).reshape(a * c, b * d)
    cls = torch.full(some.shape, PARTIAL, dtype=torch.int8, device=device)
    cls[~some] = EMPTY
    cls[every] = FULL
    return cls[None, None]


def tiling_classes(spec: NASpec, tiling: Tiling, device=None) -> torch.Tensor:
    """Tile classes ``[1, 1, T, T]`` (int8: EMPTY / PARTIAL / FULL) of the permuted token order
    (:func:`token_permutation`)."""
    return tile_classes(spec, tiling.tile, tiling.grouped, device)


def _row_major_box(shape: tuple[int, ...], block: int) -> tuple[int, ...] | None:
    """The box that blocks of ``block`` row-major tokens form, if they do (e.g. (1, 4, 32) for a 16 x 32 x 32
    grid), else None."""
    tile, rem = [], block
    for n in reversed(shape):
        if rem >= n:
            if rem % n:
                return None
            tile.append(n)
            rem //= n
        else:
            if n % rem:
                return None
            tile.append(rem)
            rem = 1
    return tuple(reversed(tile)) if rem == 1 else None


def tiling_stats(spec: NASpec, tiling: Tiling | None = None, block: int = 128) -> dict:
    """``pairs``: all query-key pairs (n^2); ``in_window`` (speed of light) and ``tile_limit`` (pairs the tiling
    computes: non-empty tiles x block^2), with their fractions of ``pairs``; ``row_major_limit``: the same for
    the plain row-major order (FlexAttention's plain neighborhood mask)."""
    from attnkit.patterns.spatial import _cached_pattern, allowed_pairs

    tiling = choose_tiling(spec, block) if tiling is None else tiling
    n = spec.num_tokens
    pairs = n * n
    in_window = allowed_pairs(spec)
    rm_tile = _row_major_box(spec.shape, block)
    if rm_tile is not None:  # row-major blocks are boxes: analytic
        row_major = math.prod(int(_axis_tables(a, t, False)[0].sum()) for a, t in zip(spec.axes, rm_tile))
    else:
        rm = _cached_pattern(spec).tile_classes(n, n, block, block)
        row_major = int((rm != EMPTY).sum())
    row_major *= block * block
    limit = row_major if tiling is None else tiling.computed * block * block
    return {"tokens": n, "pairs": pairs, "in_window": in_window, "speed_of_light": in_window / pairs,
            "tile": None if tiling is None else tiling.tile, "tile_limit": limit, "tile_fraction": limit / pairs,
            "row_major_limit": row_major, "row_major_fraction": row_major / pairs,
            "full_tiles": None if tiling is None else tiling.full, "block": block,
            "window_share_of_tile_limit": in_window / max(limit, 1), "tiles_per_query_tile":
            (limit / block / block) / max(1, math.ceil(n / block))}
