"""The ``flex`` engine: attnkit patterns and score modifiers on PyTorch's FlexAttention.

``torch.nn.attention.flex_attention`` ("FlexAttention: A Programming Model for Generating Optimized Attention
Kernels", Dong et al., 2024) takes a ``mask_mod(b, h, q_idx, kv_idx)`` saying which logits exist, a
``score_mod(score, b, h, q_idx, kv_idx)`` editing one logit, and a ``BlockMask`` recording which tiles are
empty (skipped), full (no mask) or partial (``mask_mod`` evaluated). attnkit's patterns already carry all three:

* the predicate ``Pattern.allowed`` becomes the ``mask_mod`` (tensors a pattern holds, e.g. segment ids or
  global-token flags, are moved to the device once, outside the kernel);
* the ``BlockMask`` is built from the pattern's own tile classes (``Pattern.tile_classes``), which structured
  patterns compute analytically in O(tiles): no O(q_len * kv_len) mask evaluation (FlexAttention's
  ``create_block_mask`` evaluates the predicate on every element);
* a score modifier ``mod(score, b, h, q_idx, kv_idx, q_len, kv_len)`` becomes the ``score_mod``.

Compiled kernels and block masks are cached per (pattern, modifier, shape, device). torch 2.13 compiles
FlexAttention on CPU for inference only (no backward, no log-sum-exp); the engine declares that, so
``engine="auto"`` never picks it there for a training call.
"""

from __future__ import annotations

import functools
import shutil
from collections import OrderedDict
from collections.abc import Callable

import torch

from attnkit.errors import NotSupportedError
from attnkit.ops.neighborhood.tiling import tile_candidates, tile_classes, tile_permutation  # noqa: F401 (re-export)
from attnkit.patterns import FULL, PARTIAL, Pattern
from attnkit.score_mods import ScoreMod

__all__ = ["FlexCompileError", "flex_available", "lower_pattern", "lower_score_mod", "block_mask_from_tiles",
           "flex_attention_call", "flex_reasons", "neighborhood_flex_call", "tile_shape_for", "BLOCK_SIZE"]

# FlexAttention's sparse block size (its default): the tile of the BlockMask, in queries and keys.
BLOCK_SIZE = 128
# Below this many queries auto leaves a call to the other engines (decoding steps change kv_len every call).
DECODE_Q_LEN = 16
# Below this many query-key pairs, auto leaves a softmax call without modifier on CUDA to sdpa_mask: no compile
# (a MultiheadAttention with sliding_window(16) at 100 tokens failed to compile on an H200: NoValidChoicesError).
FLEX_MIN_PAIRS = 128 * 256
# Distinct (pattern, modifier, shape) entries kept; each holds one BlockMask (int32, O(tiles)).
CACHE_SIZE = 32
# Every new shape or closure compiles anew; torch's default limit of 8 recompiles per function is exhausted by a
# handful of patterns, after which dynamo would silently run the unfused (quadratic) eager path.
RECOMPILE_LIMIT = 256


class FlexCompileError(NotSupportedError):
    """FlexAttention could not trace or compile a pattern's ``mask_mod`` or a modifier's ``score_mod``."""


# Patterns / modifiers that failed to compile (by structure key, holding the objects whose identities the key
# names): flex refuses them.
_FAILED: dict = {}


def _failed_reason(obj) -> str | None:
    if not _FAILED:
        return None
    from attnkit.backends.keys import structure_key

    hit = _FAILED.get(structure_key(obj))
    return None if hit is None else hit[1]


def _mark_failed(obj, msg: str) -> None:
    from attnkit.backends.keys import invalidate, structure_key

    holders: list = []
    _FAILED[structure_key(obj, holders)] = (holders, msg)
    while len(_FAILED) > CACHE_SIZE:
        _FAILED.pop(next(iter(_FAILED)))
    invalidate()  # flex refuses it from now on: cached decisions that chose flex are stale


@functools.cache
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return hasattr(BlockMask, "from_kv_blocks")


@functools.cache
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


def _has_compiler() -> bool:
    # Inductor's CPU backend writes C++ and needs a compiler; CUDA kernels are Triton.
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


# ------------------------------------------------------------------------------------------------------------
# Lowering attnkit's vocabulary
# ------------------------------------------------------------------------------------------------------------

def lower_pattern(pattern: Pattern, q_len: int, kv_len: int, device: torch.device) -> Callable:
    """A ``mask_mod(b, h, q_idx, kv_idx)`` equal to ``pattern.allowed(..., q_len, kv_len)``, with the tensors
    the pattern reads prepared on ``device`` once (they are constants inside the compiled kernel)."""
    from attnkit import patterns as P
    from attnkit.patterns import grid as PG

    if isinstance(pattern, P._And | P._Or):
        fa, fb = lower_pattern(pattern.a, q_len, kv_len, device), lower_pattern(pattern.b, q_len, kv_len, device)
        if isinstance(pattern, P._Or):
            return lambda b, h, qi, ki: fa(b, h, qi, ki) | fb(b, h, qi, ki)
        return lambda b, h, qi, ki: fa(b, h, qi, ki) & fb(b, h, qi, ki)
    if isinstance(pattern, P._Not):
        f = lower_pattern(pattern.a, q_len, kv_len, device)
        return lambda b, h, qi, ki: ~f(b, h, qi, ki)
    off = kv_len - q_len
    if isinstance(pattern, P._GlobalTokens):
        flags = pattern._flags(kv_len, device)
        return lambda b, h, qi, ki: flags[ki] | flags[qi + off]
    if isinstance(pattern, P._KeyBelow):
        lim = pattern._limits(device)
        if lim.numel() == 1:
            return lambda b, h, qi, ki: ki < lim[0]
        return lambda b, h, qi, ki: ki < lim[b]
    if isinstance(pattern, P._Document):
        ids = pattern._ids(device)
        if ids.shape[0] == 1:
            ids1 = ids[0]
            return lambda b, h, qi, ki: ids1[qi + off] == ids1[ki]
        return lambda b, h, qi, ki: ids[b, qi + off] == ids[b, ki]
    if isinstance(pattern, PG._PerHeadBand):
        # The predicate builds its per-head bounds with torch.tensor(...) on every call, which inductor cannot
        # lower inside a mask ("'Tensor' object has no attribute 'get_dtype'"): integer bounds made once here
        # (an infinite side becomes q_len + kv_len, beyond any distance), indexed by the head.
        big = q_len + kv_len + 1
        left = torch.tensor([int(min(x, big)) for x in pattern.left], dtype=torch.int64, device=device)
        right = torch.tensor([int(min(x, big)) for x in pattern.right], dtype=torch.int64, device=device)

        def per_head(b, h, qi, ki):
            d = ki - (qi + off)
            return (d >= -left[h]) & (d <= right[h])

        return per_head
    if isinstance(pattern, PG._Hierarchical):
        # HDT: the predicate compares level memberships computed from whole tensors on every call ("Buffers
        # cannot be created while lowering a pointwise subgraph" on CUDA): one code per level and token made
        # here, the group id for members and a sentinel (different for queries and keys) for the others.
        lv, gid = pattern.levels.to(device), pattern.group_ids.to(device)
        codes = []
        for lvl in range(gid.shape[1]):
            member = (lv == lvl) | (lv == lvl + 1)
            sentinel = gid.min() - 2
            cq = torch.where(member, gid[:, lvl], sentinel).contiguous()
            ck = torch.where(member, gid[:, lvl], sentinel - 1).contiguous()
            codes.append((cq, ck) if cq.shape[0] > 1 else (cq[0], ck[0]))
        batched = pattern.levels.shape[0] > 1

        def hierarchical(b, h, qi, ki):
            out = None
            for cq, ck in codes:
                m = (cq[b, qi] == ck[b, ki]) if batched else (cq[qi] == ck[ki])
                out = m if out is None else out | m
            return out

        return hierarchical
    return lambda b, h, qi, ki: pattern.allowed(b, h, qi, ki, q_len, kv_len)


def lower_score_mod(mod: ScoreMod, q_len: int, kv_len: int) -> Callable:
    """A ``score_mod(score, b, h, q_idx, kv_idx)`` equal to ``mod(score, b, h, q_idx, kv_idx, q_len, kv_len)``."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return mod(score, b, h, q_idx, kv_idx, q_len, kv_len)

    return score_mod


def block_mask_from_tiles(pattern: Pattern, q_len: int, kv_len: int, *, batch: int, heads: int,
                          device: torch.device, block_size: int = BLOCK_SIZE, mask_mod: Callable | None = None):
    """FlexAttention's ``BlockMask`` from ``pattern.tile_classes`` (analytic for structured patterns), with
    ``mask_mod`` (default: the lowered predicate) evaluated on partial tiles only.

    Tiles that hold padding (the last row or column when a length is not a multiple of ``block_size``) are
    demoted from full to partial, so the kernel masks the padded positions whatever its boundary handling."""
    from torch.nn.attention.flex_attention import BlockMask

    bq = bk = block_size
    cls = pattern.tile_classes(q_len, kv_len, bq, bk, batch=batch, heads=heads, device=device).clone()
    if kv_len % bk:
        last = cls[..., -1]
        last[last == FULL] = PARTIAL
    if q_len % bq:
        last = cls[..., -1, :]
        last[last == FULL] = PARTIAL
    partial, full = cls == PARTIAL, cls == FULL

    def ordered(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Selected key blocks first, in order: FlexAttention reads the first num_blocks indices of each row.
        idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True)
        return sel.sum(-1).to(torch.int32), idx.to(torch.int32)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    if mask_mod is None:
        mask_mod = lower_pattern(pattern, q_len, kv_len, device)
    return BlockMask.from_kv_blocks(kv_num.contiguous(), kv_idx.contiguous(), full_num.contiguous(),
                                    full_idx.contiguous(), BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


# ------------------------------------------------------------------------------------------------------------
# Capabilities and the call
# ------------------------------------------------------------------------------------------------------------

def flex_reasons(call) -> list[str]:
    """Why the flex engine cannot run ``call`` (the attention call dict of ``attnkit.backends.catalog``)."""
    why = []
    if not flex_available():
        return [f"torch {torch.__version__} has no torch.nn.attention.flex_attention with BlockMask.from_kv_blocks "
                f"(needs torch >= 2.5)"]
    dev = call["device"].type
    if call["norm"].name != "softmax":
        why.append(f"normalization {call['norm'].name!r} (FlexAttention normalises with softmax only)")
    if dev == "cpu":
        if call["needs_grad"]:
            why.append("gradients requested: torch compiles FlexAttention on CPU for inference only "
                       "(call under torch.no_grad() or use engine='tiled')")
        if call["return_lse"]:
            why.append("return_lse on CPU: torch's compiled CPU FlexAttention returns no log-sum-exp")
        if not _has_compiler():
            why.append("no C++ compiler found: torch.compile's CPU backend needs one")
    elif dev == "cuda" and call["head_dim"] < 16:
        why.append(f"head dim {call['head_dim']} < 16 (FlexAttention's CUDA kernels need >= 16)")
    if (call.get("auto") and dev == "cuda" and call["q_len"] * call["kv_len"] < FLEX_MIN_PAIRS
            and call["score_mod"] is None and call["norm"].name == "softmax"):
        # a compile per shape costs seconds; at this size SDPA with the materialised mask (sdpa_mask) needs none
        why.append(f"q_len * kv_len = {call['q_len'] * call['kv_len']} < {FLEX_MIN_PAIRS} under auto (SDPA with "
                   f"the materialised mask runs it without a compile; name engine='flex' to force it)")
    if call.get("auto") and call["q_len"] < DECODE_Q_LEN:
        # Decoding grows kv_len by one per call, and every new length compiles anew (seconds each).
        why.append(f"q_len {call['q_len']} < {DECODE_Q_LEN} under auto (decoding: one compile per cache length; "
                   f"name engine='flex' to force it)")
    for obj in (call["pattern"], call["score_mod"]):
        failed = None if obj is None else _failed_reason(obj)
        if failed:
            why.append(f"FlexAttention could not compile {obj!r} before: {failed}")
    mod = call["score_mod"]
    if mod is not None and call["needs_grad"] and mod.grad_tensors():
        why.append("the score modifier has learnable tensors: this adapter passes no gradients to them "
                   "(use engine='tiled', whose backward does)")
    return why


_CACHE: OrderedDict = OrderedDict()


def _entry(pattern: Pattern | None, mod: ScoreMod | None, q_len: int, kv_len: int, batch: int, heads: int,
           device: torch.device):
    from attnkit.backends.keys import structure_key

    holders: list = []
    key = (structure_key(pattern, holders), structure_key(mod, holders), q_len, kv_len, batch, heads, device)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    block_mask = None if pattern is None else block_mask_from_tiles(pattern, q_len, kv_len, batch=batch,
                                                                     heads=heads, device=device)
    score_fn = None if mod is None else lower_score_mod(mod, q_len, kv_len)
    # The objects the key names by identity are kept alive by the entry, so their ids cannot be reused while it
    # is cached; two patterns with equal parameters share one BlockMask (and one compiled kernel).
    entry = (holders, mod, block_mask, score_fn)
    _CACHE[key] = entry
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return entry


def flex_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None,
                        score_mod: ScoreMod | None, scale: float, return_lse: bool = False):
    """Run FlexAttention (compiled) on attnkit's ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``,
    ``v [B, Hkv, Lk, Dv]``; returns ``out [B, H, Lq, Dv]`` and, with ``return_lse``, the natural-log
    log-sum-exp ``[B, H, Lq]`` in float32 (``-inf`` for a row with no allowed key, whose output is zero)."""
    b, h, q_len, _ = q.shape
    kv_len = k.shape[2]
    _, _, block_mask, score_fn = _entry(pattern, score_mod, q_len, kv_len, b, h, q.device)
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()  # torch refuses CPU inputs that require grad
    kw = dict(score_mod=score_fn, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != h)
    fn = _compiled()
    try:
        if not return_lse:
            return fn(q, k, v, **kw)
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kw)
        return out, aux.lse
    except Exception as exc:
        if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        msg = f"{type(exc).__name__}: {first}"
        for obj in (pattern, score_mod):
            if obj is not None:
                _mark_failed(obj, msg)
        raise FlexCompileError(f"FlexAttention could not compile pattern {pattern!r} / score_mod {score_mod!r}: "
                               f"{msg}") from exc


# ------------------------------------------------------------------------------------------------------------
# Neighborhoods: tokens permuted into spatial tiles where that skips more
# ------------------------------------------------------------------------------------------------------------
# Flattened row-major, a block of 128 tokens of a 2-D grid is a strip; permuted so that each block is a spatial
# tile (8 x 16 in 2-D), a tile's neighbours form a small box of tiles ("Generalized Neighborhood Attention",
# Hassani et al. 2025; NATTEN's token permutation for its flex backend). Which layout computes fewer tiles depends
# on the kernel: 128 x 128 with 13 x 13 windows needs 1,012 tiles permuted against 1,664 row-major, 7 x 7 windows
# 1,012 against 896, and 16 x 32 x 32 with 3 x 7 x 7 2,200 against 1,056. Both counts are analytic, so the engine
# takes the layout with fewer non-empty tiles.

def tile_shape_for(shape: tuple[int, ...], block: int = BLOCK_SIZE) -> tuple[int, ...] | None:
    """The most cubic tile of ``block`` tokens whose sides divide ``shape`` (None for 1-D or when none divides)."""
    if len(shape) == 1:
        return None
    return min(tile_candidates(shape, block), key=lambda t: max(t) / min(t), default=None)  # first of the most cubic


def neighborhood_tile_classes(spec, tile: tuple[int, ...], device) -> torch.Tensor:
    """Tile classes ``[1, 1, n_tiles, n_tiles]`` of the permuted layout. Neighborhoods are a product over axes of
    1-D windows, so a (query tile, key tile) pair is empty if on some axis no query-key pair of the two tiles is
    allowed, and full if on every axis all are: per-axis ``any`` / ``all`` tables, then an outer product."""
    return tile_classes(spec, tile, device=device)


def _ordered_blocks(cls: torch.Tensor):
    def ordered(sel):
        idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True)
        return sel.sum(-1).to(torch.int32).contiguous(), idx.to(torch.int32).contiguous()

    return (*ordered(cls == PARTIAL), *ordered(cls == FULL))


_NB_CACHE: OrderedDict = OrderedDict()


def neighborhood_layout(spec, score_mod: ScoreMod | None, device):
    """The permuted token layout of a neighborhood call on ``device``, cached per (spec, modifier, device):
    ``(perm, inv, block_mask, score_fn)`` (``perm[new] = old``, ``inv`` its inverse, the BlockMask over permuted
    tokens with the mask_mod and score_mod reading original indices), or None when no spatial tiling divides the
    grid (the row-major pattern then runs)."""
    from torch.nn.attention.flex_attention import BlockMask

    from attnkit.ops.neighborhood.tiling import choose_tiling, tiling_classes, token_permutation
    from attnkit.patterns.spatial import _cached_pattern

    key = (spec, id(score_mod), str(device))
    hit = _NB_CACHE.get(key)
    if hit is not None and hit[0] is score_mod:
        return hit[1]
    n = spec.num_tokens
    pattern = _cached_pattern(spec)
    # the box of 128 tokens (after dilation grouping) with the fewest computed tiles; row-major strips are
    # among the candidates whenever they are boxes, so the choice is never worse than the plain order
    tiling = choose_tiling(spec, BLOCK_SIZE)
    layout = None
    if tiling is not None:
        cls = tiling_classes(spec, tiling, device)
        perm = token_permutation(spec, tiling, device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n, device=device)

        def mask_mod(b, h, qi, ki):
            return pattern.allowed(b, h, perm[qi], perm[ki], n, n)

        bm = BlockMask.from_kv_blocks(*_ordered_blocks(cls), BLOCK_SIZE=(BLOCK_SIZE, BLOCK_SIZE),
                                      mask_mod=mask_mod, seq_lengths=(n, n))
        score_fn = None
        if score_mod is not None:
            def score_fn(score, b, h, qi, ki):
                return score_mod(score, b, h, perm[qi], perm[ki], n, n)
        layout = (perm, inv, bm, score_fn)
    _NB_CACHE[key] = (score_mod, layout)  # holds the modifier: its id stays its own while cached
    while len(_NB_CACHE) > CACHE_SIZE:
        _NB_CACHE.popitem(last=False)
    return layout


def neighborhood_flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec, *, score_mod: ScoreMod | None,
                           scale: float) -> torch.Tensor:
    """Neighborhood attention through FlexAttention on ``[B, H, *spatial, D]`` tensors, tokens permuted into the
    spatial tiling (``attnkit.ops.neighborhood.tiling``: dilation grouping, boxes of 128 tokens) that computes the
    fewest tiles; ``score_mod`` sees the original flat token indices."""

    from attnkit.patterns.spatial import _cached_pattern

    n = spec.num_tokens
    flat = [t.reshape(*t.shape[:2], n, t.shape[-1]) for t in (q, k, v)]
    pattern = _cached_pattern(spec)
    hit = (None, neighborhood_layout(spec, score_mod, q.device))
    if hit[1] is None:
        out = flex_attention_call(*flat, pattern=pattern, score_mod=score_mod, scale=scale)
        return out.reshape(*q.shape[:-1], v.shape[-1])
    perm, inv, bm, score_fn = hit[1]
    qp, kp, vp = (t[:, :, perm] for t in flat)
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        qp, kp, vp = qp.detach(), kp.detach(), vp.detach()
    try:
        out = _compiled()(qp, kp, vp, score_mod=score_fn, block_mask=bm, scale=scale,
                          enable_gqa=k.shape[1] != q.shape[1])
    except Exception as exc:
        if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        _mark_failed(pattern, f"{type(exc).__name__}: {first}")
        raise FlexCompileError(f"FlexAttention could not compile {pattern!r}: {type(exc).__name__}: {first}") from exc
    return out[:, :, inv].reshape(*q.shape[:-1], v.shape[-1])
