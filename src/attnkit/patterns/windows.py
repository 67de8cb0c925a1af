"""The semantics of neighborhood attention, one spatial axis at a time.

Neighborhood attention (NA, "Neighborhood Attention Transformer", Hassani et al. 2023) and its extensions
(dilated NA, "Dilated Neighborhood Attention Transformer"; causal NA, "Faster Neighborhood Attention";
strided NA, "Generalized Neighborhood Attention") are *separable*: a query may attend to a key iff, on every
spatial axis, the key's coordinate lies in the query's window on that axis. On one axis of length ``L``
with kernel ``k``, dilation ``d``, stride ``s`` and a causal flag, exactly as NATTEN defines it:

1. **Dilation groups.** Coordinate ``x`` belongs to group ``g = x % d`` and sits at ``x // d`` inside it.
   Queries only see keys of their own group; the group holds ``L_g = ceil((L - g) / d)`` positions and the
   window is built in group coordinates, then mapped back (``key = g + d * t``).
2. **Stride tiles.** Queries are grouped in tiles of ``s`` consecutive (group) positions that share one
   window, the window of the tile's *leader*: the centre query ``(x // s) * s + s // 2`` (the last one,
   ``(x // s) * s + s - 1``, when causal), capped at ``L_g - 1``. ``s = 1`` is plain NA.
3. **Window.** Non-causal: the window starts ``k // 2`` before the leader and is *clamped* (shifted inwards,
   not truncated) so that it stays inside the axis: ``start = clamp(leader - k // 2, 0, L_g - k)``, window
   ``[start, start + k - 1]``: always exactly ``k`` keys. An odd ``k`` centres the leader; an even ``k = 2r``
   gives ``r`` keys before it and ``r - 1`` after (NATTEN's rule for even kernels, since 0.17.5). Causal:
   keys ``t <= x`` (the query itself, not the leader) with ``leader - t < k``: up to ``k`` keys at or before
   the query.

A 1-D picture, ``L = 9``, ``k = 3``; each row is one query (``q``) and the keys it attends to (``#``)::

    query   stride 1     stride 3 (= k: blocked)   dilation 2 (groups: even / odd positions)
      0     ###......    ###......                 #.#.#....   (clamped: shifted right)
      4     ...###...    ...###...                 ..#.#.#..
      5     ....###..    ...###...  (leader 4)     ...#.#.#.   (odd group 1, 3, 5, 7: centred on 5)
      8     ......###    ......###                 ....#.#.#   (clamped: shifted left)

Requirements (NATTEN's): ``k >= 1``, ``k * d <= L`` (so every group holds a whole window), ``1 <= s <= k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["AxisSpec", "NASpec", "make_spec", "axis_bounds", "group_bounds", "allowed_axis", "count_below",
           "member", "decode"]


@dataclass(frozen=True)
class AxisSpec:
    """One spatial axis: its length and neighborhood parameters."""

    length: int
    kernel: int
    dilation: int = 1
    stride: int = 1
    causal: bool = False

    def group_length(self, g: int) -> int:
        """Number of positions of dilation group ``g`` on this axis."""
        return -(-(self.length - g) // self.dilation)


@dataclass(frozen=True)
class NASpec:
    """A validated neighborhood-attention problem: one ``AxisSpec`` per spatial axis (row-major order)."""

    axes: tuple[AxisSpec, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.length for a in self.axes)

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(a.kernel for a in self.axes)


def _per_axis(name: str, value, ndim: int, kind: type) -> tuple:
    if isinstance(value, (list, tuple)):
        vals = tuple(value)
        if len(vals) != ndim:
            raise ValueError(f"{name} has {len(vals)} entries but the input has {ndim} spatial axes; "
                             f"give one value or a tuple of {ndim}")
    else:
        vals = (value,) * ndim
    for v in vals:
        if kind is bool:
            if not isinstance(v, (bool, int)) or isinstance(v, int) and v not in (0, 1):
                raise TypeError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {value!r}")
    return tuple(kind(v) for v in vals)


def make_spec(spatial_shape: Sequence[int], kernel_size, dilation=1, stride=1, is_causal=False) -> NASpec:
    """Validate neighborhood parameters against ``spatial_shape`` (1 to 3 axes) and return an ``NASpec``.

    Each of ``kernel_size``, ``dilation``, ``stride``, ``is_causal`` is one value for every axis or a tuple
    with one per axis. Raises ``ValueError`` naming the argument and the fix.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"neighborhood attention takes 1, 2 or 3 spatial axes, got spatial shape {shape}; "
                         f"q, k, v must be [batch, heads, *spatial, dim]")
    if any(s < 1 for s in shape):
        raise ValueError(f"spatial shape must be positive, got {shape}")
    nd = len(shape)
    ks = _per_axis("kernel_size", kernel_size, nd, int)
    ds = _per_axis("dilation", dilation, nd, int)
    ss = _per_axis("stride", stride, nd, int)
    cs = _per_axis("is_causal", is_causal, nd, bool)
    axes = []
    for i, (n, k, d, s, c) in enumerate(zip(shape, ks, ds, ss, cs)):
        if k < 1:
            raise ValueError(f"kernel_size on axis {i} is {k}: neighborhood attention needs a kernel size >= 1")
        if k > n:
            raise ValueError(f"kernel_size {k} on axis {i} is larger than the input ({n}); use a kernel <= {n} "
                             f"(kernel == input size is full attention along that axis)")
        if d < 1:
            raise ValueError(f"dilation on axis {i} must be >= 1, got {d}")
        if k * d > n:
            raise ValueError(f"dilation * kernel_size = {d} * {k} = {d * k} on axis {i} exceeds the input size "
                             f"{n}; every dilation group must hold a whole window: use dilation <= {n // k}")
        if not 1 <= s <= k:
            raise ValueError(f"stride on axis {i} is {s}: it must satisfy 1 <= stride <= kernel_size ({k}); "
                             f"stride == kernel_size is blocked (window) attention")
        axes.append(AxisSpec(n, k, d, s, c))
    return NASpec(tuple(axes))


def group_bounds(x: torch.Tensor, length, kernel: int, stride: int, causal: bool):
    """Window ``[lo, hi]`` (inclusive, group coordinates) of queries at group coordinate ``x`` on an axis (or
    dilation group) of ``length`` positions. ``length`` may be a tensor broadcasting with ``x``."""
    length = torch.as_tensor(length, device=x.device)
    if causal:
        leader = torch.minimum(torch.div(x, stride, rounding_mode="floor") * stride + (stride - 1), length - 1)
        return (leader - (kernel - 1)).clamp_min(0), x
    leader = torch.minimum(torch.div(x, stride, rounding_mode="floor") * stride + stride // 2, length - 1)
    # kernel // 2 keys before the leader (odd: centred; even 2r: r before, r - 1 after), shifted inwards
    start = torch.minimum((leader - kernel // 2).clamp_min(0), length - kernel)
    return start, start + (kernel - 1)


def axis_bounds(x: torch.Tensor, axis: AxisSpec):
    """For queries at (full) coordinate ``x`` on ``axis``: ``(group, lo, hi)``, the dilation group and the
    inclusive window in group coordinates; keys allowed are ``group + dilation * t`` for ``lo <= t <= hi``."""
    d = axis.dilation
    g = torch.remainder(x, d)
    xg = torch.div(x, d, rounding_mode="floor")
    length = torch.div(axis.length - g + d - 1, d, rounding_mode="floor")
    lo, hi = group_bounds(xg, length, axis.kernel, axis.stride, axis.causal)
    return g, lo, hi


def allowed_axis(xq: torch.Tensor, xk: torch.Tensor, axis: AxisSpec) -> torch.Tensor:
    """Whether a key at coordinate ``xk`` is in the window of a query at ``xq`` along ``axis``."""
    g, lo, hi = axis_bounds(xq, axis)
    t = torch.div(xk, axis.dilation, rounding_mode="floor")
    return (torch.remainder(xk, axis.dilation) == g) & (t >= lo) & (t <= hi)


def count_below(g, lo, hi, c, dilation: int) -> torch.Tensor:
    """Number of window keys ``g + d * t`` (``lo <= t <= hi``) with coordinate ``< c``."""
    tmax = torch.div(c - g - 1, dilation, rounding_mode="floor")
    return (torch.minimum(hi, tmax) - lo + 1).clamp_min(0)


def member(g, lo, hi, c, dilation: int) -> torch.Tensor:
    """Whether coordinate ``c`` is a window key."""
    t = torch.div(c, dilation, rounding_mode="floor")
    return (torch.remainder(c, dilation) == g) & (t >= lo) & (t <= hi)


def decode(idx: torch.Tensor, shape: Sequence[int]) -> list[torch.Tensor]:
    """Row-major coordinates of flattened indices ``idx`` in a grid of ``shape`` (last axis fastest)."""
    coords = []
    rest = idx
    for n in reversed(shape[1:]):
        coords.append(torch.remainder(rest, n))
        rest = torch.div(rest, n, rounding_mode="floor")
    coords.append(rest)
    return coords[::-1]
