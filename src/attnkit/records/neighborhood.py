"""Registry records of the neighborhood family: NA in 1, 2 and 3 spatial dimensions, and dilated 2-D NA.

The registry's calling convention is ``[batch, heads, seq, dim]``; a neighborhood mechanism lays the ``seq``
tokens out row-major on a grid, ``spatial_shape`` when given (its product must equal ``seq``) or else the
most balanced factorisation of ``seq`` into 1, 2 or 3 sides (``grid_shape``: 16384 -> 128 x 128 in 2-D,
16 x 32 x 32 in 3-D). The same grid is used by the mechanism, by its pattern (``extras["pattern"]``, which
the benchmark uses for FlexAttention peers, densities and speed of light), by its FLOP count and by
``extras["speed_of_light"]`` (GNA's tile model, ``neighborhood_speed_of_light``).

Example: ``attnkit.get("neighborhood_2d", kernel_size=7)(q, k, v)`` with ``q [b, h, 32 * 32, d]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnkit.functional.neighborhood import neighborhood
from attnkit.ops.neighborhood.speed import neighborhood_speed_of_light
from attnkit.patterns.spatial import NeighborhoodPattern, allowed_pairs, neighborhood_pattern
from attnkit.patterns.windows import make_spec
from attnkit.registry import Mechanism, register

__all__ = ["grid_shape"]

PAPERS = "Neighborhood Attention Transformer (NATTEN semantics; Faster NA, Generalized NA)"


@functools.lru_cache(maxsize=256)
def grid_shape(seq_len: int, ndim: int) -> tuple[int, ...]:
    """The most balanced row-major grid of ``ndim`` sides whose product is ``seq_len`` (sides ascending):
    ``grid_shape(16384, 2) == (128, 128)``, ``grid_shape(512, 2) == (16, 32)``, ``grid_shape(16384, 3) ==
    (16, 32, 32)``."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if ndim == 1:
        return (seq_len,)
    # the largest divisor not above the ndim-th root is one side; the rest is balanced recursively
    root = int(round(seq_len ** (1.0 / ndim)))  # then fix float rounding: root = floor(seq_len ** (1 / ndim))
    while root ** ndim > seq_len:
        root -= 1
    while (root + 1) ** ndim <= seq_len:
        root += 1
    first = max(d for d in range(1, root + 1) if seq_len % d == 0)
    return tuple(sorted((first, *grid_shape(seq_len // first, ndim - 1))))


def _grid(seq_len: int, ndim: int, spatial_shape: Sequence[int] | None) -> tuple[int, ...]:
    if spatial_shape is None:
        return grid_shape(int(seq_len), ndim)
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != ndim or math.prod(shape) != seq_len:
        raise ValueError(f"spatial_shape {shape} must have {ndim} sides whose product is the sequence length "
                         f"{seq_len}; leave it None to use the balanced grid {grid_shape(int(seq_len), ndim)}")
    return shape


def _neighborhood_mechanism(name: str, ndim: int, summary: str, defaults: dict[str, Any],
                            in_default_bench: bool = False, max_bench_len: int | None = None,
                            paper: str = PAPERS, source: str = "") -> Mechanism:

    def params_of(causal: bool, kernel_size=None, dilation=None, stride=None) -> dict[str, Any]:
        return dict(kernel_size=defaults["kernel_size"] if kernel_size is None else kernel_size,
                    dilation=defaults.get("dilation", 1) if dilation is None else dilation,
                    stride=1 if stride is None else stride, is_causal=bool(causal))

    def pattern_for(seq_len: int, causal: bool = False, kernel_size=None, dilation=None, stride=None,
                    spatial_shape: Sequence[int] | None = None, **_: Any) -> NeighborhoodPattern:
        return neighborhood_pattern(_grid(seq_len, ndim, spatial_shape),
                                    **params_of(causal, kernel_size, dilation, stride))

    def factory(causal: bool = False, kernel_size=None, dilation=None, stride=None,
                spatial_shape: Sequence[int] | None = None) -> Callable[..., torch.Tensor]:
        params = params_of(causal, kernel_size, dilation, stride)
        if spatial_shape is not None:  # validate now, not at the first call
            make_spec(spatial_shape, params["kernel_size"], params["dilation"], params["stride"], causal)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if q.dim() != 4:
                raise ValueError(f"{name} takes [batch, heads, seq, dim] tensors (seq laid out on a {ndim}-D grid), "
                                 f"got q of shape {tuple(q.shape)}; call attnkit.neighborhood for spatial inputs")
            if k.dim() != 4 or v.dim() != 4 or k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
                raise ValueError(f"{name} is self-attention on one grid: q, k and v must be [batch, heads, seq, dim] "
                                 f"with the same seq, got q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                                 f"{tuple(v.shape)} (decoding with fewer queries than keys is not supported)")
            n = q.shape[2]
            grid = _grid(n, ndim, spatial_shape)
            kw = dict(params)
            out = neighborhood(q.reshape(*q.shape[:2], *grid, q.shape[-1]), k.reshape(*k.shape[:2], *grid, k.shape[-1]),
                               v.reshape(*v.shape[:2], *grid, v.shape[-1]), kw.pop("kernel_size"), **kw)
            return out.reshape(*q.shape[:2], n, v.shape[-1])

        run.pattern_for = pattern_for  # type: ignore[attr-defined]
        return run

    def reference(built: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  kernel_size=None, dilation=None, stride=None, spatial_shape=None, **_: Any) -> torch.Tensor:
        from attnkit.ops.neighborhood.reference import neighborhood_reference

        n = q.shape[2]
        grid = _grid(n, ndim, spatial_shape)
        kw = params_of(causal, kernel_size, dilation, stride)
        out = neighborhood_reference(*(t.reshape(*t.shape[:2], *grid, t.shape[-1]) for t in (q, k, v)),
                                     kw.pop("kernel_size"), **kw)
        return out.reshape(*q.shape[:2], n, v.shape[-1])

    def flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
              kernel_size=None, dilation=None, stride=None, spatial_shape=None, **_: Any) -> float:
        # QK^T and PV over the allowed pairs only: 2 multiply-adds per (query, key, channel) each.
        spec = pattern_for(q_len, causal, kernel_size, dilation, stride, spatial_shape).spec
        return 4.0 * batch * heads * allowed_pairs(spec) * head_dim

    def speed_of_light(seq_len: int, causal: bool = False, kernel_size=None, dilation=None, stride=None,
                       spatial_shape=None, tile_shape=8, **_: Any) -> dict:
        p = params_of(causal, kernel_size, dilation, stride)
        return neighborhood_speed_of_light(_grid(seq_len, ndim, spatial_shape), p["kernel_size"],
                                           dilation=p["dilation"], stride=p["stride"], is_causal=p["is_causal"],
                                           tile_shape=tile_shape)

    k = defaults["kernel_size"]
    return Mechanism(
        name=name, family="neighborhood", paper=paper, exact=True,
        complexity=f"O(n * k^{ndim} * d)" if ndim > 1 else "O(n * k * d)", causal=True, factory=factory,
        summary=summary, bench_params=dict(defaults), in_default_bench=in_default_bench,
        max_bench_len=max_bench_len, flops=flops, small_params={**defaults, "kernel_size": 3}, reference=reference,
        extras={"pattern": pattern_for, "speed_of_light": speed_of_light, "ndim": ndim,
                "spatial_shape": lambda seq_len, spatial_shape=None: _grid(seq_len, ndim, spatial_shape),
                "default_kernel_size": k},
        source=source,
    )


register(_neighborhood_mechanism(
    "neighborhood_1d", 1, "1-D neighborhood attention: each token attends its k nearest (clamped window)",
    {"kernel_size": 129}, source="paper"))
register(_neighborhood_mechanism(
    "neighborhood_2d", 2, "2-D neighborhood attention on the balanced grid of seq (128 x 128 for 16384), "
    "k x k clamped windows; tiled engine with spatial tiles; GNA speed of light in extras['speed_of_light']",
    {"kernel_size": 13}, in_default_bench=True,
    max_bench_len=16384, source="paper"))
register(_neighborhood_mechanism(
    "dilated_neighborhood_2d", 2, "DiNAT's dilated 2-D neighborhood attention: k x k window inside the query's "
    "dilation group", {"kernel_size": 7, "dilation": 2}, paper="Dilated Neighborhood Attention Transformer",
    source="paper"))
register(_neighborhood_mechanism(
    "neighborhood_3d", 3, "3-D (video) neighborhood attention on the balanced grid of seq (16 x 32 x 32 for "
    "16384), 3 x 7 x 7 windows", {"kernel_size": (3, 7, 7)}, source="paper"))


# -- B9 D-Former: local 3-D windows and dilated global groups -----------------------------------------------------

def _dformer_record() -> Mechanism:
    from attnkit.ops.neighborhood.dformer import dformer_attention, dformer_layout, dformer_reference

    default_group = (2, 8, 8)  # the authors' first-stage group size (depth, height, width)

    def on_grid(fn, q, k, v, group_size, scope, spatial_shape):
        n = q.shape[2]
        grid = _grid(n, 3, spatial_shape)
        out = fn(*(t.reshape(*t.shape[:2], *grid, t.shape[-1]) for t in (q, k, v)), group_size, scope=scope)
        return out.reshape(*q.shape[:2], n, v.shape[-1])

    def factory(causal: bool = False, group_size=default_group, scope: str = "global",
                spatial_shape: Sequence[int] | None = None) -> Callable[..., torch.Tensor]:
        dformer_layout((1, 1, 1), group_size)  # validate now, not at the first call
        if scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global' (D-Former's two modules), got {scope!r}")

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[2] != q.shape[2]:
                raise ValueError(f"dformer_3d takes q, k, v [batch, heads, seq, dim] with one seq (laid out on a "
                                 f"3-D grid), got q {tuple(q.shape)}, k {tuple(k.shape)}; call "
                                 f"attnkit.ops.neighborhood.dformer.dformer_attention for spatial inputs")
            return on_grid(dformer_attention, q, k, v, group_size, scope, spatial_shape)

        return run

    def reference(built: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group_size=default_group,
                  scope: str = "global", spatial_shape=None, **_: Any) -> torch.Tensor:
        return on_grid(dformer_reference, q, k, v, group_size, scope, spatial_shape)

    def flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, group_size=default_group,
              spatial_shape=None, **_: Any) -> float:
        _, groups, padded, _ = dformer_layout(_grid(q_len, 3, spatial_shape), group_size)
        return 4.0 * batch * heads * math.prod(padded) * math.prod(groups) * head_dim

    return Mechanism(
        name="dformer_3d", family="neighborhood",
        paper="D-Former: A U-shaped Dilated Transformer for 3D Medical Image Segmentation", exact=True,
        complexity="O(n * g * d), g = prod(group_size)", causal=False, factory=factory,
        summary="D-Former's scopes on the balanced 3-D grid of seq: scope='local' (non-overlapping G windows) or "
                "'global' (dilated groups: same coordinate mod S/G); layers alternate them (nn.DFormerStage3d)",
        bench_params={"group_size": default_group, "scope": "global"}, flops=flops,
        small_params={"group_size": 2, "scope": "global"}, reference=reference,
        source="paper",  # and the authors' code for the group rule, padding and alternation
        extras={"ndim": 3, "spatial_shape": lambda seq_len, spatial_shape=None: _grid(seq_len, 3, spatial_shape)},
    )


register(_dformer_record())
