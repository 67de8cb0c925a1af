"""D-Former's two attention scopes on a 3-D (or 1-/2-D) grid: Wu, Liao, Chen, Wang, Chen, Gao & Wu, "D-Former: A
U-shaped Dilated Transformer for 3D Medical Image Segmentation" (Neural Computing and Applications, 2022),
Sec. 3 (Dilated Transformer block: Local Scope Module and Global Scope Module).

With group size ``G = (G_1, .., G_m)`` tokens per axis and an axis of length ``S_a`` padded to
``S'_a = ceil(S_a / G_a) G_a``:

* **local scope** (LSM): the grid is cut into non-overlapping windows of ``G_1 x .. x G_m`` consecutive tokens;
  token ``c`` belongs to window ``(c_a // G_a)_a`` and attends to every token of its window;
* **global scope** (GSM, dilated): with interval ``I_a = S'_a / G_a``, token ``c`` belongs to group
  ``(c_a mod I_a)_a``, the ``G_1 x .. x G_m`` tokens spaced ``I_a`` apart across the whole volume (a dilated
  "window" with dilation ``I_a``); it attends to every token of its group.

Both are block-diagonal after a permutation, so each costs ``O(n * prod(G) * d)``. Consecutive D-Former blocks
alternate local and global scopes (the authors' stages start with local); one local and one global layer connect
every pair of tokens. Padding tokens (the authors pad the volume to whole groups) are never attended to. An axis
shorter than its group size is one group on that axis (the authors fall back to full attention when the volume
is smaller than a group). The paper's dynamic position encoding, a depthwise 3x3x3 convolution added once per
stage, lives in :class:`attnkit.nn.DFormerStage3d`, not here.

When every side is a multiple of its group size, the local scope is generalized neighborhood attention with
``kernel = stride = G`` and the global scope is dilated neighborhood attention with ``kernel = G`` and
``dilation = S / G`` (tests check both against :func:`attnkit.neighborhood`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attnkit._checks import check_qkv, default_scale, repeat_kv

__all__ = ["SCOPES", "dformer_attention", "dformer_reference", "dformer_group_ids", "dformer_layout"]

SCOPES = ("local", "global")


def dformer_layout(spatial_shape: Sequence[int], group_size: int | Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """``(sizes, groups, padded, intervals)`` per axis: the grid, the group size actually used (clamped to the
    axis), the padded side ``ceil(S / G) G`` and the global scope's interval ``padded / G``."""
    sizes = tuple(int(s) for s in spatial_shape)
    if not 1 <= len(sizes) <= 3 or any(s < 1 for s in sizes):
        raise ValueError(f"spatial_shape must have 1 to 3 positive sides, got {tuple(spatial_shape)}")
    gs = (group_size,) * len(sizes) if isinstance(group_size, int) else tuple(group_size)
    if len(gs) != len(sizes) or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in gs):
        raise ValueError(f"group_size must be a positive int or one positive int per spatial axis "
                         f"({len(sizes)}), got {group_size!r}")
    groups = tuple(min(g, s) for g, s in zip(gs, sizes))
    padded = tuple(-(-s // g) * g for s, g in zip(sizes, groups))
    intervals = tuple(p // g for p, g in zip(padded, groups))
    return sizes, groups, padded, intervals


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} (D-Former's local or dilated global scope), got {scope!r}")


def dformer_group_ids(spatial_shape: Sequence[int], group_size: int | Sequence[int], scope: str,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The group of every token of the grid, row-major ``[prod(spatial_shape)]`` (long): two tokens attend to
    each other iff their ids are equal."""
    _check_scope(scope)
    sizes, groups, _, intervals = dformer_layout(spatial_shape, group_size)
    ids = torch.zeros(sizes, dtype=torch.long, device=device)
    for a, (s, g, i) in enumerate(zip(sizes, groups, intervals)):
        c = torch.arange(s, device=device)
        part, count = (c // g, i) if scope == "local" else (c % i, i)
        shape = [1] * len(sizes)
        shape[a] = s
        ids = ids * count + part.view(shape)
    return ids.reshape(-1)


def _check_grid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """Validate ``[batch, heads, *spatial, dim]`` inputs on one grid (1 to 3 spatial axes); returns the grid."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not 4 <= t.dim() <= 6:
            raise ValueError(f"{name} must be [batch, heads, *spatial, dim] with 1 to 3 spatial axes, got shape "
                             f"{tuple(t.shape)}")
    spatial = tuple(q.shape[2:-1])
    if tuple(k.shape[2:-1]) != spatial or tuple(v.shape[2:-1]) != spatial:
        raise ValueError(f"D-Former attention is self-attention on one grid: q has spatial shape {spatial}, k "
                         f"{tuple(k.shape[2:-1])}, v {tuple(v.shape[2:-1])}")
    n = math.prod(spatial)
    check_qkv(*(t.reshape(*t.shape[:2], n, t.shape[-1]) for t in (q, k, v)))
    return spatial


def dformer_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int | Sequence[int], *,
                      scope: str = "global", scale: float | None = None) -> torch.Tensor:
    """The plain computation: a materialised ``[n, n]`` mask from :func:`dformer_group_ids` and dense softmax
    attention. Shapes as :func:`dformer_attention`."""
    spatial = _check_grid(q, k, v)
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    n = math.prod(spatial)
    ids = dformer_group_ids(spatial, group_size, scope, device=q.device)
    mask = ids[:, None] == ids[None, :]
    qf = q.reshape(b, h, n, d)
    kf = repeat_kv(k.reshape(b, k.shape[1], n, d), h)
    vf = repeat_kv(v.reshape(b, v.shape[1], n, v.shape[-1]), h)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * default_scale(q, scale)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(p, vf).reshape(b, h, *spatial, v.shape[-1])


def _to_groups(x: torch.Tensor, groups, padded, intervals, scope: str) -> torch.Tensor:
    """``[b, h, *padded, c] -> [b, h, num_groups, group_tokens, c]`` (a permutation, no copy of the math)."""
    b, h, c, m = x.shape[0], x.shape[1], x.shape[-1], len(groups)
    if scope == "local":  # axis a = (window, offset) = (S'/G, G)
        split = [v for g, i in zip(groups, intervals) for v in (i, g)]
    else:  # axis a = (member, residue) = (G, I): coordinate = member * I + residue
        split = [v for g, i in zip(groups, intervals) for v in (g, i)]
    x = x.reshape(b, h, *split, c)
    outer = [2 + 2 * a for a in range(m)]
    inner = [3 + 2 * a for a in range(m)]
    group_axes, token_axes = (outer, inner) if scope == "local" else (inner, outer)
    x = x.permute(0, 1, *group_axes, *token_axes, 2 + 2 * m)
    return x.reshape(b, h, math.prod(intervals), math.prod(groups), c)


def _from_groups(x: torch.Tensor, groups, padded, intervals, scope: str) -> torch.Tensor:
    b, h, c, m = x.shape[0], x.shape[1], x.shape[-1], len(groups)
    x = x.reshape(b, h, *intervals, *groups, c)
    # position of (axis a, group part) and (axis a, token part) in the current order
    order = []
    for a in range(m):
        gpart, tpart = 2 + a, 2 + m + a
        order += [gpart, tpart] if scope == "local" else [tpart, gpart]
    x = x.permute(0, 1, *order, 2 + 2 * m)
    return x.reshape(b, h, *padded, c)


def dformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int | Sequence[int], *,
                      scope: str = "global", scale: float | None = None) -> torch.Tensor:
    """D-Former attention of one scope (see the module docstring).

    Args:
        q: ``[batch, heads, *spatial, dim]`` with 1 to 3 spatial axes (3 in the paper: depth, height, width).
        k, v: ``[batch, kv_heads, *spatial, dim | dim_v]`` on the same grid (GQA allowed).
        group_size: tokens per group on each axis, an int or one per axis (the authors' first stage: (2, 8, 8)).
        scope: ``"local"`` (non-overlapping windows) or ``"global"`` (dilated groups across the volume).
        scale: score scale, default ``1/sqrt(dim)``.

    Returns:
        ``[batch, heads, *spatial, dim_v]``. Computed group by group (pad, permute, SDPA with padded keys
        masked, un-permute): ``O(n * prod(group_size) * d)``.
    """
    spatial = _check_grid(q, k, v)
    _check_scope(scope)
    sizes, groups, padded, intervals = dformer_layout(spatial, group_size)
    b, h = q.shape[:2]
    n = math.prod(spatial)
    kk = repeat_kv(k.reshape(b, k.shape[1], n, k.shape[-1]), h).reshape(b, h, *spatial, k.shape[-1])
    vv = repeat_kv(v.reshape(b, v.shape[1], n, v.shape[-1]), h).reshape(b, h, *spatial, v.shape[-1])
    pad = [p - s for s, p in zip(sizes, padded)]

    def padded_groups(x):
        if any(pad):
            spec = [0, 0]  # channel axis, then spatial axes from the last
            for extra in reversed(pad):
                spec += [0, extra]
            x = F.pad(x, spec)
        return _to_groups(x, groups, padded, intervals, scope)

    qg, kg, vg = padded_groups(q), padded_groups(kk), padded_groups(vv)
    mask = None
    if any(pad):
        valid = torch.zeros(padded, dtype=torch.bool, device=q.device)
        valid[tuple(slice(0, s) for s in sizes)] = True
        mask = _to_groups(valid.view(1, 1, *padded, 1), groups, padded, intervals, scope)[0, 0, :, None, :, 0]
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=default_scale(q, scale))
    out = _from_groups(out, groups, padded, intervals, scope)
    return out[(slice(None), slice(None), *(slice(0, s) for s in sizes))]
