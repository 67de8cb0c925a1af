"""Grid, per-head and hierarchical patterns: axial and halo (blocked local) attention over a 2/3-D grid,
per-head windows and strides (multi-scale heads, Hepos), hierarchical (HDT) and Block-Attention patterns.

Part of :mod:`attnkit.patterns` (the ``Pattern`` protocol is in :mod:`attnkit.patterns.base`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnkit.patterns.base import (
    _INF,
    EMPTY,
    FULL,
    PARTIAL,
    Pattern,
    _band_classes,
    _check_int,
    _positions,
    _tile_bounds,
    causal,
    document,
)

__all__ = [
    "axial", "halo", "per_head_window", "head_strides", "hierarchical", "block_attention", "query_from",
]


# ---------------------------------------------------------------------------------------------------------
# Grid, per-head and hierarchical patterns (axial, halo, multi-scale heads, Hepos, HDT, Block-Attention)
# ---------------------------------------------------------------------------------------------------------

def _check_shape(name: str, shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name}: shape must be a tuple of positive ints (the grid, row-major), got {shape!r}")
    return shape


class _Axial(Pattern):
    """Tokens of one line of a row-major grid along ``axis``: ``i // period == j // period`` and
    ``i % stride == j % stride`` (every other coordinate equal), optionally ``j <= i`` (then the line is causal,
    since along one line flat order is axis order)."""

    def __init__(self, shape: tuple[int, ...], axis: int, causal: bool):
        self.shape, self.axis, self.causal = shape, axis, causal
        self._stride = math.prod(shape[axis + 1:])
        self._period = self._stride * shape[axis]

    def check(self, q_len, kv_len, batch, heads):
        n = math.prod(self.shape)
        if kv_len != n or q_len > kv_len:
            raise ValueError(f"axial(shape={self.shape}) needs kv_len == {n} (the flattened grid) and q_len <= "
                             f"kv_len, got q_len={q_len}, kv_len={kv_len}")

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        p = _positions(q_idx, q_len, kv_len)
        per, s = self._period, self._stride
        m = (torch.div(p, per, rounding_mode="floor") == torch.div(kv_idx, per, rounding_mode="floor")) & \
            (torch.remainder(p, s) == torch.remainder(kv_idx, s))
        return m & (kv_idx <= p) if self.causal else m

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        # Exact and O(tiles): within one line-group (same i // period) a pair exists iff some difference
        # j - i in [k_lo - q_hi, k_hi - q_lo] (capped at 0 when causal) is a multiple of the stride; groups
        # strictly inside both ranges always hold the pair (i, i).
        per, s = self._period, self._stride
        qs, qe = _tile_bounds(q_len, block_q, device)
        ks, ke = _tile_bounds(kv_len, block_kv, device)
        off = kv_len - q_len
        qs, qe = (qs + off).view(-1, 1), (qe + off).view(-1, 1)
        ks, ke = ks.view(1, -1), ke.view(1, -1)
        lo = torch.maximum(qs // per, ks // per)
        hi = torch.minimum(qe // per, ke // per)

        def pair_in(o):
            a1, a2 = torch.maximum(qs, o * per), torch.minimum(qe, o * per + per - 1)
            b1, b2 = torch.maximum(ks, o * per), torch.minimum(ke, o * per + per - 1)
            dlo, dhi = b1 - a2, b2 - a1
            if self.causal:
                dhi = torch.clamp(dhi, max=0)
            return torch.div(dhi, s, rounding_mode="floor") * s >= dlo

        nonempty = (lo <= hi) & (pair_in(lo) | pair_in(hi) | (hi - lo >= 2))
        one_group = (qs // per == qe // per) & (ks // per == ke // per) & (qs // per == ks // per)
        full = nonempty & one_group & ((s == 1) | ((qs == qe) & (ks == ke)))
        if self.causal:
            full = full & (ke <= qs)
        cls = torch.full(nonempty.shape, PARTIAL, dtype=torch.int8, device=device)
        cls[~nonempty] = EMPTY
        cls[full] = FULL
        return cls[None, None]


def _decode(idx: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    coords = []
    for n in reversed(shape):
        coords.append(torch.remainder(idx, n))
        idx = torch.div(idx, n, rounding_mode="floor")
    return coords[::-1]


def _box_tile_counts(shape: tuple[int, ...], bounds, block_q: int, block_kv: int, device, chunk: int = 4096):
    """Allowed pairs per tile when every query's keys are a box ``lo_a <= x_a <= hi_a`` on each grid axis
    (``bounds(coords) -> [(lo, hi) per axis]``): keys below each tile edge are counted lexicographically, O(1)
    per (query, edge), so no predicate is evaluated per element."""
    n = math.prod(shape)
    nq, nk = -(-n // block_q), -(-n // block_kv)
    edges = (torch.arange(nk + 1, device=device) * block_kv).clamp(max=n).view(1, -1)
    ecoords = _decode(edges.clamp(max=n - 1), shape)
    out = torch.zeros(nq, nk, dtype=torch.long, device=device)
    chunk = max(block_q, chunk // block_q * block_q)
    for start in range(0, n, chunk):
        qi = torch.arange(start, min(start + chunk, n), device=device)
        box = [(lo.view(-1, 1), hi.view(-1, 1)) for lo, hi in bounds(_decode(qi, shape))]
        sizes = [hi - lo + 1 for lo, hi in box]
        total, prefix = 0, 1
        for a, ((lo, hi), c) in enumerate(zip(box, ecoords)):
            term = torch.clamp(torch.minimum(c, hi + 1) - lo, min=0)
            for size in sizes[a + 1:]:
                term = term * size
            total = total + prefix * term
            prefix = prefix * ((c >= lo) & (c <= hi)).long()
        everything = math.prod(sizes) if len(sizes) > 1 else sizes[0]
        below = torch.where(edges >= n, everything, total)
        out.index_add_(0, torch.div(qi, block_q, rounding_mode="floor"), below[:, 1:] - below[:, :-1])
    qsize = torch.clamp(n - torch.arange(nq, device=device) * block_q, max=block_q)
    ksize = torch.clamp(n - torch.arange(nk, device=device) * block_kv, max=block_kv)
    cls = torch.full((nq, nk), PARTIAL, dtype=torch.int8, device=device)
    cls[out == 0] = EMPTY
    cls[out == qsize.view(-1, 1) * ksize.view(1, -1)] = FULL
    return cls[None, None]


class _Halo(Pattern):
    """HaloNet's blocked local attention: queries in ``block``-sized grid blocks share one key region, the
    block grown by ``halo`` on every side and cut at the grid's borders (padding keys do not exist)."""

    def __init__(self, shape: tuple[int, ...], block: tuple[int, ...], halo: tuple[int, ...]):
        self.shape, self.block, self.halo = shape, block, halo

    def check(self, q_len, kv_len, batch, heads):
        n = math.prod(self.shape)
        if q_len != n or kv_len != n:
            raise ValueError(f"halo(shape={self.shape}) needs q_len == kv_len == {n} (the flattened grid), got "
                             f"q_len={q_len}, kv_len={kv_len}")

    def _bounds(self, coords):
        out = []
        for x, n, b, h in zip(coords, self.shape, self.block, self.halo):
            start = torch.div(x, b, rounding_mode="floor") * b
            out.append(((start - h).clamp(min=0), (start + b - 1 + h).clamp(max=n - 1)))
        return out

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        m = None
        for (lo, hi), y in zip(self._bounds(_decode(q_idx, self.shape)), _decode(kv_idx, self.shape)):
            a = (y >= lo) & (y <= hi)
            m = a if m is None else m & a
        return m

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        return _box_tile_counts(self.shape, self._bounds, block_q, block_kv, device)


class _HaloBlockMajor(Pattern):
    """A halo pattern over tokens reordered block-major (each ``block`` of the grid contiguous, blocks in
    row-major order): what the tiled engine runs, so that a tile of ``prod(block)`` queries is one image block
    sharing one key region. Needs a grid divisible by the block. Tiles that are whole numbers of image blocks are
    classified exactly from the blocks' regions; other tilings fall back to evaluation."""

    def __init__(self, halo: _Halo):
        self.halo = halo
        self.grid = tuple(n // b for n, b in zip(halo.shape, halo.block))
        self.area = math.prod(halo.block)

    def _raster(self, idx: torch.Tensor) -> torch.Tensor:
        """Raster (row-major) index of block-major token ``idx``."""
        blk, inner = torch.div(idx, self.area, rounding_mode="floor"), torch.remainder(idx, self.area)
        bc, ic = _decode(blk, self.grid), _decode(inner, self.halo.block)
        flat = 0
        for g, i, b, n in zip(bc, ic, self.halo.block, self.halo.shape):
            flat = flat * n + g * b + i
        return flat

    def check(self, q_len, kv_len, batch, heads):
        self.halo.check(q_len, kv_len, batch, heads)

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return self.halo.allowed(b, h, self._raster(q_idx), self._raster(kv_idx), q_len, kv_len)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        a = self.area
        if block_q % a or block_kv % a:
            return None
        nb = math.prod(self.grid)
        blocks = torch.arange(nb, device=device)
        qc, kc = _decode(blocks.view(-1, 1), self.grid), _decode(blocks.view(1, -1), self.grid)
        nonempty = full = torch.ones(nb, nb, dtype=torch.bool, device=device)
        for qa, ka, b_, h_, n in zip(qc, kc, self.halo.block, self.halo.halo, self.halo.shape):
            lo, hi = (qa * b_ - h_).clamp(min=0), (qa * b_ + b_ - 1 + h_).clamp(max=n - 1)
            k0, k1 = ka * b_, ka * b_ + b_ - 1
            nonempty = nonempty & (k0 <= hi) & (k1 >= lo)
            full = full & (k0 >= lo) & (k1 <= hi)
        cls = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)
        rq, rk = block_q // a, block_kv // a
        nq, nk = -(-nb // rq), -(-nb // rk)
        padded = torch.nn.functional.pad(cls, (0, nk * rk - nb, 0, nq * rq - nb), value=-1).view(nq, rq, nk, rk)
        lo_ = torch.where(padded < 0, torch.full_like(padded, FULL), padded).amin(dim=(1, 3))
        hi_ = padded.amax(dim=(1, 3))
        out = torch.where(hi_ == EMPTY, EMPTY, torch.where(lo_ == FULL, FULL, PARTIAL)).to(torch.int8)
        return out[None, None]


class _PerHeadBand(Pattern):
    """Head ``h`` sees keys ``p - left[h] <= j <= p + right[h]`` (infinite entries: unbounded)."""

    head_dependent = True

    def __init__(self, left: tuple[float, ...], right: tuple[float, ...], name: str):
        self.left, self.right, self._name = left, right, name

    def check(self, q_len, kv_len, batch, heads):
        if heads != len(self.left):
            raise ValueError(f"{self._name} has {len(self.left)} per-head entries but the input has {heads} query "
                             f"heads; give one per head")

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if h is None:
            raise ValueError(f"{self._name} depends on the head index; pass h")
        dev = kv_idx.device
        left = torch.tensor(self.left, dtype=torch.float64, device=dev)[h]
        right = torch.tensor(self.right, dtype=torch.float64, device=dev)[h]
        d = (kv_idx - _positions(q_idx, q_len, kv_len)).to(torch.float64)
        return (d >= -left) & (d <= right)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        return torch.cat([_band_classes(-lo, hi, q_len, kv_len, block_q, block_kv, device)
                          for lo, hi in zip(self.left, self.right)], dim=1)

    def __repr__(self):
        return self._name


class _HeadStrides(Pattern):
    """Hepos: head ``h`` sees keys ``j`` with ``j % stride == h % stride``."""

    head_dependent = True

    def __init__(self, stride: int):
        self.stride = stride

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if h is None:
            raise ValueError("head_strides depends on the head index; pass h")
        return torch.remainder(kv_idx, self.stride) == torch.remainder(h, self.stride)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        s = self.stride
        ks, ke = _tile_bounds(kv_len, block_kv, device)
        r = torch.remainder(torch.arange(heads, device=device), s).view(-1, 1)
        first = ks.view(1, -1) + torch.remainder(r - ks.view(1, -1), s)  # first key of residue r in the tile
        nonempty = first <= ke.view(1, -1)
        full = nonempty & ((s == 1) | (ks == ke).view(1, -1))
        cls = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)
        return cls[None, :, None, :].expand(1, heads, -(-q_len // block_q), ks.numel())


def _id_ranges(ids: torch.Tensor, member: torch.Tensor, block: int):
    """Per block of the last axis: min and max of ``ids`` over members, member count and block size."""
    n = ids.shape[-1]
    nb = -(-n // block)
    pad = nb * block - n
    big = torch.iinfo(torch.long).max
    lo = torch.nn.functional.pad(torch.where(member, ids, big), (0, pad), value=big).view(*ids.shape[:-1], nb, block)
    hi = torch.nn.functional.pad(torch.where(member, ids, -big), (0, pad), value=-big).view(*ids.shape[:-1], nb, block)
    count = torch.nn.functional.pad(member.long(), (0, pad)).view(*ids.shape[:-1], nb, block).sum(-1)
    size = torch.clamp(n - torch.arange(nb, device=ids.device) * block, max=block)
    return lo.amin(-1), hi.amax(-1), count, size


class _Hierarchical(Pattern):
    """HDT: level-``L`` group ``g`` holds the tokens at levels ``L`` and ``L + 1`` whose level-``L + 1`` unit
    is ``g``; two tokens may attend iff they share a group at some level."""

    def __init__(self, levels: torch.Tensor, group_ids: torch.Tensor):
        self.levels, self.group_ids = levels, group_ids  # [B|1, n], [B|1, depth, n]
        self.batch_dependent = levels.shape[0] > 1

    def check(self, q_len, kv_len, batch, heads):
        n = self.levels.shape[-1]
        if q_len != n or kv_len != n:
            raise ValueError(f"hierarchical(levels) describes {n} tokens; q_len and kv_len must both be {n}, got "
                             f"{q_len}, {kv_len}")
        if self.levels.shape[0] not in (1, batch):
            raise ValueError(f"hierarchical(levels) has {self.levels.shape[0]} rows for a batch of {batch}")

    def _terms(self, device):
        lv, gid = self.levels.to(device), self.group_ids.to(device)
        for lvl in range(gid.shape[1]):
            yield (lv == lvl) | (lv == lvl + 1), gid[:, lvl]

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if self.levels.shape[0] == 1:
            b = torch.zeros((), dtype=torch.long, device=kv_idx.device)
        elif b is None:
            raise ValueError("hierarchical(levels) with per-batch structure depends on the batch index; pass b")
        out = None
        for member, ids in self._terms(kv_idx.device):
            m = member[b, q_idx] & member[b, kv_idx] & (ids[b, q_idx] == ids[b, kv_idx])
            out = m if out is None else out | m
        return out

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        # Per level, a document mask restricted to the level's members: tiles are EMPTY when the members' id
        # ranges are disjoint, FULL when every token is a member and all ids are one; levels combine by OR.
        out = None
        for member, ids in self._terms(device):
            qlo, qhi, qn, qsize = _id_ranges(ids, member, block_q)
            klo, khi, kn, ksize = _id_ranges(ids, member, block_kv)
            qlo, qhi, qn = qlo[:, :, None], qhi[:, :, None], qn[:, :, None]
            klo, khi, kn = klo[:, None], khi[:, None], kn[:, None]
            empty = (qn == 0) | (kn == 0) | (qhi < klo) | (khi < qlo)
            full = (qn == qsize.view(-1, 1)) & (kn == ksize.view(1, -1)) & (qlo == qhi) & (klo == khi) & (qlo == klo)
            cls = torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)
            out = cls if out is None else torch.maximum(out, cls)
        return out[:, None]


class _QueryFrom(Pattern):
    """Queries at positions ``p >= start`` see every key (Block-Attention's final block)."""

    def __init__(self, start: int):
        self.start = start

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return (_positions(q_idx, q_len, kv_len) >= self.start) & (kv_idx >= 0)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        qs, qe = _tile_bounds(q_len, block_q, device)
        off = kv_len - q_len
        row = torch.where(qs + off >= self.start, FULL, torch.where(qe + off < self.start, EMPTY, PARTIAL))
        return row.to(torch.int8).view(1, 1, -1, 1).expand(1, 1, -1, -(-kv_len // block_kv))

    def __repr__(self):
        return f"query_from({self.start})"


def axial(shape: Sequence[int], axis: int, *, causal: bool = False) -> Pattern:
    """Axial attention ("Axial Attention in Multidimensional Transformers", Ho et al., 2019, Sec. 3): over the
    row-major flattening of a grid of ``shape`` (any number of axes, any lengths), a token attends to the
    tokens that differ from it only in coordinate ``axis`` (its row, column, ...). ``causal=True`` is the masked
    axial attention of the Axial Transformer (keys at or before the query along the axis). Tiles are classified
    exactly and analytically, so the tiled engine runs it block-sparse; the Transformer's shifts are
    ``attnkit.ops.exact.variants.axial_shift``."""
    shape = _check_shape("axial", shape)
    if isinstance(axis, bool) or not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
        raise ValueError(f"axial(axis) must be an int in [{-len(shape)}, {len(shape)}), got {axis!r}")
    return _Axial(shape, axis % len(shape), bool(causal))


def halo(shape: Sequence[int], block: int | Sequence[int], halo: int | Sequence[int]) -> Pattern:
    """HaloNet's blocked local attention with halo ("Scaling Local Self-Attention for Parameter Efficient Visual
    Backbones", Vaswani et al., 2021, Sec. 3.1): the grid ``shape`` (row-major flattened) is cut in
    non-overlapping ``block`` blocks; every query of a block attends to the ``(block + 2 * halo)`` region around
    it, truncated at the borders (the paper's zero padding is masked: padded keys do not exist)."""
    shape = _check_shape("halo", shape)
    nd = len(shape)
    block = (block,) * nd if isinstance(block, int) else tuple(block)
    size = (halo,) * nd if isinstance(halo, int) else tuple(halo)
    if len(block) != nd or len(size) != nd:
        raise ValueError(f"halo(block, halo) need one value or one per axis ({nd}), got {block!r}, {size!r}")
    for b_ in block:
        _check_int("halo(block)", b_, 1)
    for h_ in size:
        _check_int("halo(halo)", h_, 0)
    return _Halo(shape, block, size)


def per_head_window(windows: Sequence[int | None], *, causal: bool = False) -> Pattern:
    """Multi-scale heads ("Multi-Scale Self-Attention for Text Classification", Guo et al., 2020, Sec. 3):
    head ``h`` attends to keys with ``|p - j| <= windows[h]`` (``None``: the whole sequence); ``causal=True``
    keeps ``p - windows[h] <= j <= p``. Tile classes are exact per head (one band per head)."""
    windows = list(windows)
    if not windows:
        raise ValueError("per_head_window(windows) needs one window per head")
    left = tuple(_INF if w is None else float(_check_int("per_head_window(windows[h])", w, 0)) for w in windows)
    right = tuple(0.0 for _ in left) if causal else left
    return _PerHeadBand(left, right, f"per_head_window({windows}, causal={causal})")


def head_strides(stride: int) -> Pattern:
    """Hepos, head-wise positional strides ("Efficient Attentions for Long Document Summarization", Huang et
    al., 2021, Sec. 3.2): head ``h`` attends to source positions ``j`` with ``j % stride == h % stride``, so the
    heads together cover every source token. Exact analytic tile classes per head."""
    return _HeadStrides(_check_int("head_strides(stride)", stride, 1))


def hierarchical(levels: torch.Tensor, group_ids: torch.Tensor) -> Pattern:
    """HDT's hierarchical anchor mask ("HDT: Hierarchical Document Transformer", He et al., 2024, Sec. 3.2).

    ``levels [n]`` (or ``[batch, n]``): 0 for ordinary tokens, ``l >= 1`` for an anchor of level ``l``
    ([SENT] = 1, [SEC] = 2, [DOC] = 3). ``group_ids [depth, n]`` (or ``[batch, depth, n]``): ``group_ids[l, i]``
    is the id of the level-``l + 1`` unit holding token ``i`` (for an anchor of level ``l + 1``, its own unit).
    Tokens attend within their sentence and its anchor, sentence anchors within their section and its anchor,
    and so on: the mask is symmetric and joins any two tokens within ``2 * depth`` hops. Build ``levels`` and
    ``group_ids`` from sentence lengths with ``attnkit.ops.exact.variants.hdt_layout``."""
    levels, group_ids = torch.as_tensor(levels), torch.as_tensor(group_ids)
    if levels.dtype.is_floating_point or group_ids.dtype.is_floating_point or levels.dim() not in (1, 2) \
            or group_ids.dim() != levels.dim() + 1 or group_ids.shape[-1] != levels.shape[-1]:
        raise ValueError(f"hierarchical(levels, group_ids): integer levels [n] or [batch, n] and group_ids "
                         f"[depth, n] or [batch, depth, n], got {tuple(levels.shape)} and {tuple(group_ids.shape)}")
    if levels.dim() == 1:
        levels, group_ids = levels[None], group_ids[None]
    if (levels < 0).any() or (levels > group_ids.shape[1]).any():
        raise ValueError(f"hierarchical(levels): levels must lie in [0, depth={group_ids.shape[1]}]")
    return _Hierarchical(levels.long(), group_ids.long())


def query_from(start: int) -> Pattern:
    """Queries at positions ``>= start`` attend to every key (combine with ``causal()``)."""
    return _QueryFrom(_check_int("query_from(start)", start, 0))


def block_attention(block_lengths: Sequence[int]) -> Pattern:
    """Block-Attention ("Block-Attention for Efficient RAG", Sun et al., 2024, Sec. 2): the sequence is the
    blocks of ``block_lengths`` in order; every block but the last (retrieved passages) attends causally within
    itself, the last block (question and answer) attends causally to everything. ``causal() & (document(ids) |
    query_from(start of the last block))``, so tiles stay analytic."""
    lengths = [_check_int("block_attention(block_lengths[i])", n, 1) for n in block_lengths]
    if not lengths:
        raise ValueError("block_attention(block_lengths) needs at least one block")
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return causal() & (document(ids) | query_from(sum(lengths[:-1])))
