"""``neighborhood``: neighborhood attention in 1, 2 or 3 spatial dimensions, and NAT's relative positional bias."""

from __future__ import annotations

import torch
from torch import nn

from attnkit._checks import FLOAT_DTYPES, check_qkv, default_scale
from attnkit.errors import NotSupportedError
from attnkit.ops.neighborhood.engine import neighborhood_tiled
from attnkit.ops.neighborhood.reference import neighborhood_reference
from attnkit.patterns.windows import decode, make_spec
from attnkit.score_mods import ScoreMod

__all__ = ["neighborhood", "NeighborhoodBias", "neighborhood_bias"]

ENGINES = ("auto", "tiled", "reference", "natten", "flex")


def _split(x: torch.Tensor, name: str) -> tuple[int, ...]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not 4 <= x.dim() <= 6:
        raise ValueError(f"{name} must be [batch, heads, *spatial, dim] with 1, 2 or 3 spatial axes (4 to 6 "
                         f"dimensions), got shape {tuple(x.shape)}")
    return tuple(x.shape[2:-1])


_SPECS: dict = {}
_DISPATCH: list = []


def _nb_call(q, k, v, spec, score_mod, scale):
    from attnkit.backends.catalog import neighborhood_call

    return neighborhood_call(q, k, v, spec, score_mod=score_mod, scale=scale)


def _valid_fast(q, k, v) -> bool:
    """Whether q, k, v certainly pass the checks of ``neighborhood`` (same grid of 1-3 axes, float dtype, device,
    batch, head dims; query heads a multiple of kv heads); False sends them through the checks that explain."""
    if not (type(q) is type(k) is type(v) is torch.Tensor):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    return (len(qs) == len(ks) == len(vs) and 4 <= len(qs) <= 6 and q.dtype in FLOAT_DTYPES
            and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device and qs[0] == ks[0] == vs[0]
            and ks[1] == vs[1] and qs[1] > 0 and ks[1] > 0 and qs[1] % ks[1] == 0 and qs[-1] == ks[-1]
            and qs[2:-1] == ks[2:-1] == vs[2:-1] and min(qs[2:-1]) > 0)


def _spec(spatial, kernel_size, dilation, stride, is_causal):
    # make_spec validates and builds a frozen spec: remembered per arguments (a few microseconds per call)
    try:
        if (type(kernel_size) is int and type(dilation) is int and type(stride) is int
                and type(is_causal) is bool):
            key = (spatial, kernel_size, dilation, stride, is_causal)  # the common case: plain ints
        else:  # with the types, so that 5.0 or True is validated (and refused) rather than matched to 5 or 1
            key = tuple((a, type(a), tuple(map(type, a)) if isinstance(a, tuple | list) else None)
                        for a in (spatial, kernel_size, dilation, stride, is_causal))
        hit = _SPECS.get(key)
    except TypeError:  # unhashable arguments (lists): validate every time
        return make_spec(spatial, kernel_size, dilation, stride, is_causal)
    if hit is None:
        hit = make_spec(spatial, kernel_size, dilation, stride, is_causal)
        if len(_SPECS) >= 256:
            _SPECS.clear()
        _SPECS[key] = hit
    return hit


def neighborhood(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size, *, dilation=1, stride=1,
                 is_causal=False, score_mod: ScoreMod | None = None, scale: float | None = None,
                 engine: str = "auto", tiles=None) -> torch.Tensor:
    """Neighborhood attention ("Neighborhood Attention Transformer", Hassani et al. 2023), with dilation
    ("Dilated Neighborhood Attention Transformer"), causal axes ("Faster Neighborhood Attention") and
    stride ("Generalized Neighborhood Attention"), with NATTEN's exact semantics.

    Args:
        q: ``[batch, heads, *spatial, dim]`` with 1, 2 or 3 spatial axes.
        k, v: ``[batch, kv_heads, *spatial, dim]`` / ``[..., dim_v]`` on the same grid (``heads`` a multiple of
            ``kv_heads``: grouped-query attention).
        kernel_size: window size, one int or one per axis (``<=`` the axis length); an even size ``2r`` sees
            ``r`` keys before the query and ``r - 1`` after (NATTEN's rule), an odd one is centred.
        dilation: per-axis dilation; the window is taken inside the query's residue class ``x % dilation``
            (needs ``dilation * kernel_size <= length``).
        stride: per-axis stride ``1 <= stride <= kernel_size``; queries in a tile of ``stride`` positions share
            the window of the tile's centre query. ``stride == kernel_size`` is blocked attention.
        is_causal: per-axis flag: keys at or before the query on that axis (up to ``kernel_size`` of them).
        score_mod: an ``attnkit.score_mods.ScoreMod`` applied to the scaled scores on *flattened* (row-major)
            token indices, e.g. NAT's relative positional bias ``neighborhood_bias``.
        scale: score scale (default ``dim ** -0.5``).
        engine: ``"auto"`` (NATTEN when installed on CUDA, then FlexAttention on CUDA, else the tiled engine;
            see ``attnkit backends``), ``"tiled"`` (attnkit's fast path, linear memory, with backward),
            ``"natten"`` (NATTEN's fused kernels, ``attnkit[natten]``; no score_mod), ``"flex"`` (torch
            FlexAttention with the neighborhood BlockMask) or ``"reference"`` (dense masked, quadratic memory; tests).
        tiles: query tile size per axis for the tiled engine (default: chosen by a cost model).

    Returns ``[batch, heads, *spatial, dim_v]``. Every query attends exactly ``prod(kernel_size)`` keys unless
    an axis is causal; see ``attnkit.patterns.windows`` for the rules and a picture.
    """
    if _valid_fast(q, k, v):  # every check below passes (one combined test: a few microseconds per call)
        spatial = tuple(q.shape[2:-1])
    else:
        spatial = _split(q, "q")
        for name, t in (("k", k), ("v", v)):
            if _split(t, name) != spatial:
                raise ValueError(f"{name} has spatial shape {tuple(t.shape[2:-1])} but q has {spatial}; "
                                 f"neighborhood attention is self-attention over one grid: they must match")
        n = 1
        for s in spatial:
            n *= s
        check_qkv(q.reshape(*q.shape[:2], n, q.shape[-1]), k.reshape(*k.shape[:2], n, k.shape[-1]),
                  v.reshape(*v.shape[:2], n, v.shape[-1]))
    spec = _spec(spatial, kernel_size, dilation, stride, is_causal)
    sc = default_scale(q, scale)
    if score_mod is not None:
        if not isinstance(score_mod, nn.Module):
            raise TypeError("score_mod must be an attnkit.score_mods.ScoreMod (wrap functions with "
                            "attnkit.score_mods.custom)")
        if hasattr(score_mod, "check"):
            score_mod.check(q.shape[1])
    if tiles is not None:
        tiles = (tiles,) * spec.ndim if isinstance(tiles, int) and not isinstance(tiles, bool) else tiles
        if (not isinstance(tiles, (tuple, list)) or len(tiles) != spec.ndim
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tiles)):
            raise ValueError(f"tiles must be a positive int or a tuple of {spec.ndim} positive ints (query tile "
                             f"size per spatial axis), got {tiles!r}; leave it None to let the engine choose")
        tiles = tuple(tiles)
    if engine not in ENGINES:
        raise NotSupportedError(f"neighborhood(engine={engine!r}): choose one of {ENGINES}")
    if q.shape[0] == 0:  # an empty batch: nothing to attend (SDPA returns the empty output too)
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    if engine != "reference" and (engine != "tiled" or tiles is None):
        if not _DISPATCH:  # imported on first use (an import statement costs ~10 us a call)
            from attnkit.backends import dispatch

            _DISPATCH.append(dispatch)
        d = _DISPATCH[0]
        holders: list = [spec]  # the decision is remembered by the call's structure (attnkit.backends.dispatch)
        key = (q.shape, k.shape, v.shape, q.dtype, q.device, d.needs_grad((q, k, v), score_mod), id(spec),
               d.structure_key(score_mod, holders))
        name = d.cached_select("neighborhood", engine if tiles is None else "tiled", key,
                               lambda: _nb_call(q, k, v, spec, score_mod, sc), holders)
        if name not in ("tiled", "reference"):
            from attnkit.backends import get_backend
            from attnkit.backends.catalog import neighborhood_call
            from attnkit.backends.flex import FlexCompileError

            try:
                return get_backend("neighborhood", name).run(neighborhood_call(q, k, v, spec, score_mod=score_mod,
                                                                              scale=sc))
            except FlexCompileError as exc:  # remembered: flex refuses this spec from now on
                if engine != "auto":
                    raise
                import warnings

                warnings.warn(f"{exc}; engine='auto' runs 'tiled' for it from now on", RuntimeWarning, stacklevel=2)
                name = "tiled"
        engine = name
    if engine == "tiled":
        return neighborhood_tiled(q, k, v, spec, scale=sc, score_mod=score_mod, tiles=tiles)
    if engine == "reference":
        return neighborhood_reference(q, k, v, kernel_size, dilation=dilation, stride=stride, is_causal=is_causal,
                                      score_mod=score_mod, scale=sc)
    raise NotSupportedError(f"neighborhood(engine={engine!r}): choose one of {ENGINES}")


class NeighborhoodBias(ScoreMod):
    """NAT's relative positional bias: a learnable table ``[heads, 2k-1(, 2k-1(, 2k-1))]``; the score of a
    query at coordinates ``x`` and a key at ``y`` gets ``table[h, y_1 - x_1 + k_1 - 1, ...]``, offsets in
    dilation-group units (as NATTEN). Works on flattened token indices, so every engine can run it.

    ``table``: initial values (copied), or an ``nn.Parameter`` to share (e.g. one owned by a module).
    """

    head_dependent = True

    def __init__(self, num_heads: int, spatial_shape, kernel_size, dilation=1, table: torch.Tensor | None = None):
        super().__init__()
        spec = make_spec(spatial_shape, kernel_size, dilation)
        self.spatial_shape = spec.shape
        self.kernel_size = spec.kernel_size
        self.dilation = tuple(a.dilation for a in spec.axes)
        shape = (num_heads, *(2 * k - 1 for k in self.kernel_size))
        if table is None:
            table = torch.zeros(shape)
            nn.init.trunc_normal_(table, std=0.02, a=-2.0, b=2.0)  # NAT's initialisation
        elif tuple(table.shape) != shape:
            raise ValueError(f"NeighborhoodBias(table) must have shape {shape}, got {tuple(table.shape)}")
        # An nn.Parameter is shared (a module owning the table builds one bias per input shape); any other
        # tensor is copied into a new Parameter.
        self.table = table if isinstance(table, nn.Parameter) else nn.Parameter(table.detach().clone())

    @property
    def num_heads(self) -> int:
        return self.table.shape[0]

    def check(self, heads: int) -> None:
        if heads != self.num_heads:
            raise ValueError(f"NeighborhoodBias has {self.num_heads} heads, the input has {heads}")

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        if h is None:
            raise ValueError("NeighborhoodBias depends on the head index; the engine must pass h")
        qc, kc = decode(q_idx, self.spatial_shape), decode(kv_idx, self.spatial_shape)
        idx = [h]
        for xq, xk, k, d in zip(qc, kc, self.kernel_size, self.dilation):
            off = torch.div(xk, d, rounding_mode="floor") - torch.div(xq, d, rounding_mode="floor") + (k - 1)
            idx.append(off.clamp(0, 2 * k - 2))  # pairs outside the window are masked anyway
        return score + self.table.to(score.dtype)[tuple(idx)]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, spatial_shape={self.spatial_shape}, kernel_size={self.kernel_size}"


def neighborhood_bias(num_heads: int, spatial_shape, kernel_size, dilation=1,
                      table: torch.Tensor | None = None) -> NeighborhoodBias:
    """NAT's relative positional bias as a score modifier (see ``NeighborhoodBias``)."""
    return NeighborhoodBias(num_heads, spatial_shape, kernel_size, dilation, table)
