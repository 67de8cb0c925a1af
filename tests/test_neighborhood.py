"""Neighborhood attention (NA, dilated NA, causal NA, strided GNA) against NATTEN's written window rules.

The specification here is independent of ``attnkit.patterns.windows``: ``window_1d`` below is a plain
loop over NATTEN's rules (dilation groups, stride-tile leaders, clamped windows, causal windows), the
explicit boolean mask over flattened tokens is built from it with ``itertools.product``, and dense softmax
attention under that mask (float64) is the reference every engine is compared with.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
import attnkit.nn
import attnkit.ops.neighborhood.engine as engine_mod
from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit.errors import NotSupportedError
from attnkit.functional.neighborhood import neighborhood, neighborhood_bias
from attnkit.ops.neighborhood import (
    neighborhood_pattern,
    neighborhood_reference,
    neighborhood_speed_of_light,
)
from attnkit.ops.neighborhood.engine import box_fraction, choose_tiles
from attnkit.patterns import _classify_by_evaluation
from attnkit.patterns.spatial import allowed_pairs
from attnkit.patterns.windows import allowed_axis, make_spec
from attnkit.testing import assert_close, tolerance

# ---------------------------------------------------------------------------------------------------------
# The specification, written plainly
# ---------------------------------------------------------------------------------------------------------


def window_1d(x: int, length: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False) -> list[int]:
    """Keys (full coordinates) that the query at ``x`` attends on one axis, by NATTEN's rules.

    Dilation: the query sees only its group ``{p : p % dilation == x % dilation}``, indexed ``0..L_g-1``.
    Stride: group positions form tiles of ``stride``; a tile shares the window of its leader, the centre
    ``tile_start + stride // 2`` (causal: the last, ``tile_start + stride - 1``), capped at ``L_g - 1``.
    Non-causal window: ``kernel`` consecutive group positions starting at
    ``clamp(leader - kernel // 2, 0, L_g - kernel)``. Causal: group positions ``t <= x_g`` with
    ``leader - t < kernel``.
    """
    group = [p for p in range(length) if p % dilation == x % dilation]
    lg, xg = len(group), group.index(x)
    if causal:
        leader = min((xg // stride) * stride + stride - 1, lg - 1)
        ts = [t for t in range(lg) if t <= xg and leader - t < kernel]
    else:
        leader = min((xg // stride) * stride + stride // 2, lg - 1)
        start = min(max(leader - kernel // 2, 0), lg - kernel)
        ts = list(range(start, start + kernel))
    return [group[t] for t in ts]


def _per_axis(value, nd):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd


def explicit_mask(shape, kernel, dilation=1, stride=1, causal=False) -> torch.Tensor:
    """``[n, n]`` boolean mask over row-major flattened tokens, from ``window_1d`` on every axis."""
    nd = len(shape)
    ks, ds, ss, cs = (_per_axis(x, nd) for x in (kernel, dilation, stride, causal))
    windows = [[set(window_1d(x, n, k, d, s, c)) for x in range(n)] for n, k, d, s, c in zip(shape, ks, ds, ss, cs)]
    coords = list(itertools.product(*(range(n) for n in shape)))
    mask = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            mask[i, j] = all(y in windows[a][x] for a, (x, y) in enumerate(zip(qc, kc)))
    return mask


def masked_attention(q, k, v, mask, bias=None, scale=None):
    """Dense softmax attention of ``[b, h, *spatial, d]`` inputs under an ``[n, n]`` mask, in float64."""
    b, h = q.shape[:2]
    spatial = q.shape[2:-1]
    n = math.prod(spatial)
    qf = q.reshape(b, h, n, -1).double()
    kf = k.reshape(b, k.shape[1], n, -1).double().repeat_interleave(h // k.shape[1], dim=1)
    vf = v.reshape(b, v.shape[1], n, -1).double().repeat_interleave(h // v.shape[1], dim=1)
    s = qf @ kf.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vf).reshape(b, h, *spatial, v.shape[-1])


def rand(b, h, shape, d, *, hkv=None, dv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv
    dv = d if dv is None else dv
    q = torch.randn(b, h, *shape, d, generator=g)
    k = torch.randn(b, hkv, *shape, d, generator=g)
    v = torch.randn(b, hkv, *shape, dv, generator=g)
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]


# (spatial shape, kernel, dilation, stride, causal): 1-D/2-D/3-D, odd and even sizes, clamped borders,
# dilation groups of unequal lengths, dilation * kernel == size, strides with partial last tiles, causal axes.
CASES = [
    ((9,), 3, 1, 1, False),
    ((10,), 5, 1, 1, False),
    ((10,), 3, 3, 1, False),
    ((12,), 3, 4, 1, False),  # dilation * kernel == size
    ((11,), 5, 1, 3, False),
    ((11,), 5, 2, 2, False),
    ((10,), 5, 1, 5, False),  # blocked
    ((13,), 5, 1, 1, True),
    ((13,), 5, 2, 3, True),
    ((7, 8), (3, 5), 1, 1, False),
    ((8, 9), 3, (2, 3), 1, False),
    ((9, 6), (5, 3), (1, 2), (2, 3), False),
    ((7, 8), (3, 5), (2, 1), (1, 2), (True, False)),
    ((6, 7), 3, 1, (3, 1), (False, True)),
    ((4, 5, 6), 3, 1, 1, False),
    ((5, 6, 7), 3, (1, 2, 2), (3, 1, 2), (False, True, False)),
    ((4, 6, 5), (3, 3, 5), (1, 2, 1), 1, (True, True, True)),
    # even kernels (NATTEN >= 0.17.5): 2r keys, r before the leader and r - 1 after, clamped at the borders
    ((9,), 4, 1, 1, False),
    ((12,), 2, 3, 1, False),
    ((11,), 4, 2, 3, False),
    ((10,), 6, 1, 6, False),  # blocked
    ((13,), 4, 2, 3, True),
    ((7, 8), (4, 3), 1, (2, 1), False),
    ((8, 9), (2, 6), (2, 1), (1, 4), (False, True)),
    ((4, 6, 5), (2, 4, 3), (1, 1, 1), (1, 2, 3), False),
]


def case_id(case):
    shape, k, d, s, c = case
    return f"S{'x'.join(map(str, shape))}-k{k}-d{d}-s{s}-c{c}".replace(" ", "")


# ---------------------------------------------------------------------------------------------------------
# Window rules
# ---------------------------------------------------------------------------------------------------------


def _axis_configs(max_len=13):
    for n in range(1, max_len + 1):
        for k in range(1, n + 1):  # odd and even kernels
            for d in range(1, n // k + 1):
                for s in range(1, k + 1):
                    for c in (False, True):
                        yield n, k, d, s, c


def test_axis_windows_match_natten_rules():
    for n, k, d, s, c in _axis_configs():
        spec = make_spec((n,), k, d, s, c).axes[0]
        got = allowed_axis(torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1), spec)
        want = torch.zeros(n, n, dtype=torch.bool)
        for x in range(n):
            want[x, window_1d(x, n, k, d, s, c)] = True
        assert torch.equal(got, want), (n, k, d, s, c)


def test_window_invariants():
    for n, k, d, s, c in _axis_configs():
        for x in range(n):
            keys = window_1d(x, n, k, d, s, c)
            assert all(y % d == x % d for y in keys)  # own dilation group
            if c:
                assert x in keys and max(keys) == x and 1 <= len(keys) <= k
            else:
                assert len(keys) == k and x in keys  # exactly k keys (clamped, not truncated)
                lead = min((x // d // s) * s + s // 2, len(range(x % d, n, d)) - 1)  # group coordinates
                ts = [y // d for y in keys]
                if k // 2 <= lead <= len(range(x % d, n, d)) - k + k // 2:  # away from the borders
                    assert lead - min(ts) == k // 2 and max(ts) - lead == k - 1 - k // 2


def test_docstring_picture():
    # L = 9, k = 3 (attnkit.patterns.windows)
    def row(keys):
        return "".join("#" if i in keys else "." for i in range(9))

    assert [row(window_1d(x, 9, 3)) for x in (0, 4, 5, 8)] == ["###......", "...###...", "....###..", "......###"]
    assert [row(window_1d(x, 9, 3, stride=3)) for x in (0, 4, 5, 8)] == ["###......", "...###...", "...###...",
                                                                        "......###"]
    assert [row(window_1d(x, 9, 3, dilation=2)) for x in (0, 4, 5, 8)] == ["#.#.#....", "..#.#.#..", "...#.#.#.",
                                                                          "....#.#.#"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pattern_equals_explicit_mask(case):
    shape, k, d, s, c = case
    n = math.prod(shape)
    pattern = neighborhood_pattern(shape, k, dilation=d, stride=s, is_causal=c)
    mask = explicit_mask(shape, k, d, s, c)
    assert torch.equal(pattern.materialize(n, n)[0, 0], mask)
    assert allowed_pairs(pattern.spec) == int(mask.sum())
    assert pattern.density(n) == pytest.approx(mask.float().mean().item())
    # Analytic tile classes are exact: equal to classifying by evaluating the predicate.
    for bq, bk in ((4, 4), (3, 7), (16, 8), (n, 1)):
        got = pattern.tile_classes(n, n, bq, bk)
        want = _classify_by_evaluation(pattern, n, n, bq, bk, 1, 1, None).to(torch.int8)
        assert torch.equal(got, want), (bq, bk)


def test_patterns_module_alias_and_composition():
    p = P.neighborhood((6, 7), 3, dilation=(1, 2))
    assert p == neighborhood_pattern((6, 7), 3, dilation=(1, 2))
    n = 42
    both = (p & P.causal()).materialize(n, n)[0, 0]
    assert torch.equal(both, explicit_mask((6, 7), 3, (1, 2)) & torch.ones(n, n, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="q_len == kv_len == 42"):
        p.materialize(40, 40)


# ---------------------------------------------------------------------------------------------------------
# Engines against the explicit-mask reference
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["fused", "general"])
def fused(request, monkeypatch):
    """Runs a test with the CPU engine's fused flash-attention path on (where it applies: softmax without a
    score modifier, ``d == d_v``) and off (gathered boxes, matmuls and softmax: the CUDA / score-mod path)."""
    monkeypatch.setattr(engine_mod, "USE_FUSED_CPU_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_engines_match_explicit_reference(case, fused):
    shape, k, d, s, c = case
    q, kk, v = rand(2, 4, shape, 6, hkv=2, dv=6 if fused else 5, seed=1)
    want = masked_attention(q, kk, v, explicit_mask(shape, k, d, s, c))
    kw = dict(dilation=d, stride=s, is_causal=c)
    assert_close(neighborhood_reference(q, kk, v, k, **kw), want)
    assert_close(neighborhood(q, kk, v, k, **kw), want)
    assert_close(neighborhood(q, kk, v, k, engine="reference", **kw), want)
    # The same pattern on the generic exact engine, over flattened tokens.
    n = math.prod(shape)
    flat = [t.reshape(*t.shape[:2], n, t.shape[-1]) for t in (q, kk, v)]
    pattern = neighborhood_pattern(shape, k, **kw)
    assert_close(attnkit.attention(*flat, pattern=pattern).reshape(want.shape), want)


@pytest.mark.parametrize("tiles", [(1,), (2,), (4,), (5,), (64,)])
def test_engine_any_tile_size_1d(tiles, fused):
    q, k, v = rand(1, 2, (23,), 4, seed=2)
    for d, s, c in ((1, 1, False), (3, 2, False), (2, 3, True)):
        want = masked_attention(q, k, v, explicit_mask((23,), 5, d, s, c))
        assert_close(neighborhood(q, k, v, 5, dilation=d, stride=s, is_causal=c, tiles=tiles), want)


@pytest.mark.parametrize("tiles", [(1, 1, 1), (2, 3, 1), (4, 4, 4), (8, 1, 3)])
def test_engine_any_tile_shape_3d(tiles, fused):
    shape = (5, 6, 7)
    q, k, v = rand(1, 2, shape, 4, seed=3)
    want = masked_attention(q, k, v, explicit_mask(shape, 3, (1, 2, 2), (1, 3, 2), (False, False, True)))
    got = neighborhood(q, k, v, 3, dilation=(1, 2, 2), stride=(1, 3, 2), is_causal=(False, False, True), tiles=tiles)
    assert_close(got, want)


@pytest.mark.parametrize("tiles", [(1, 2), (3, 4), (8, 8)])
def test_engine_backward_any_tiles_small_chunks(tiles, monkeypatch, fused):
    # Chunks of one tile (many chunks per mask class) and padded tiles: forward and every gradient still exact.
    monkeypatch.setattr(engine_mod, "_CHUNK_ELEMENTS", 1)
    shape, kw = (7, 10), dict(dilation=(1, 2), stride=(2, 1), is_causal=(False, True))
    q, k, v = rand(1, 4, shape, 4, hkv=2, seed=18, grad=True)
    g = torch.randn(1, 4, *shape, 4, dtype=torch.float64)
    out = neighborhood(q, k, v, 3, tiles=tiles, **kw)
    got = torch.autograd.grad(out, [q, k, v], g)
    want_out = masked_attention(q, k, v, explicit_mask(shape, 3, (1, 2), (2, 1), (False, True)))
    want = torch.autograd.grad(want_out, [q, k, v], g)
    assert_close(out, want_out)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("tiles", [None, 1, 3])
def test_fused_plan_boxes_are_the_windows(case, tiles):
    # Every tile is computed by exactly one kernel call, and the strided view of its strip rows, under its
    # class mask, holds exactly the window of each of its queries (duplicate slots masked out).
    shape, k, d, s, c = case
    spec = make_spec(shape, k, d, s, c)
    tiles = choose_tiles(spec) if tiles is None else (tiles,) * len(shape)
    plan = engine_mod.make_fused_plan(spec, tiles, "cpu")
    mask = explicit_mask(shape, k, d, s, c)
    strips = plan.strip_index.view(plan.n_inner, plan.strip_rows, plan.inner_box)
    seen = torch.zeros(plan.num_tiles, dtype=torch.long)
    for j, i0, i1, row, step, cls in plan.calls:
        allowed = plan.bias[cls] == 0
        assert plan.masked[cls] == bool((~allowed).any())
        for i in range(i0, i1):
            t = j * plan.n_outer + i
            seen[t] += 1
            r = row + step * (i - i0)
            box = strips[j, r: r + plan.box0].reshape(-1)
            assert box.numel() == plan.box_k
            for a, qi in enumerate(plan.q_index[t].tolist()):
                keys = box[allowed[a]]
                assert keys.unique().numel() == keys.numel()
                assert torch.equal(keys.sort().values, mask[qi].nonzero().view(-1))
    assert torch.equal(seen, torch.ones_like(seen))
    valid = plan.q_index[plan.q_valid]
    assert torch.equal(valid.sort().values, torch.arange(math.prod(shape)))


@pytest.mark.parametrize("per_head_max", [0, 64])
def test_row_gathers_per_head_or_batched(per_head_max, monkeypatch, fused):
    # Row gathers / scatters loop over (batch, head) on CPU up to _PER_HEAD_MAX of them, else one batched call.
    monkeypatch.setattr(engine_mod, "_PER_HEAD_MAX", per_head_max)
    shape, kw = (7, 9), dict(dilation=(2, 1), stride=(1, 2))
    q, k, v = rand(2, 3, shape, 4, seed=21, grad=True)
    g = torch.randn(2, 3, *shape, 4, dtype=torch.float64)
    out = neighborhood(q, k, v, 3, **kw)
    want = masked_attention(q, k, v, explicit_mask(shape, 3, (2, 1), (1, 2)))
    assert_close(out, want)
    for a, b in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(want, [q, k, v], g)):
        assert_close(a, b)


def test_fused_kernel_is_used_where_it_applies(monkeypatch):
    calls = []
    kernel = engine_mod._FLASH_CPU

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "_FLASH_CPU", counting)
    q, k, v = rand(1, 2, (9, 10), 4, seed=20)
    neighborhood(q, k, v, 3)
    assert calls  # softmax, no score modifier, d == d_v, CPU
    calls.clear()
    neighborhood(q, k, v[..., :3], 3)  # d != d_v
    neighborhood(q, k, v, 3, score_mod=S.softcap(5.0))
    monkeypatch.setattr(engine_mod, "USE_FUSED_CPU_KERNEL", False)
    neighborhood(q, k, v, 3)
    assert not calls


def test_plan_mask_classes():
    # Blocked attention with sizes divisible by the kernel needs no mask at all: one class, unmasked.
    plan = engine_mod.make_plan(make_spec((12, 12), 3, 1, 3), (3, 3), "cpu")
    assert plan.masked == (False,) and plan.runs == ((0, plan.num_tiles, 0),)
    # Plain NA: interior tiles share one mask, so there are far fewer classes than tiles.
    plan = engine_mod.make_plan(make_spec((64, 64), 7), (8, 8), "cpu")
    assert len(plan.runs) < plan.num_tiles // 4 and all(plan.masked)
    assert sum(t1 - t0 for t0, t1, _ in plan.runs) == plan.num_tiles
    # every query appears exactly once among the tiles' valid slots
    valid = plan.q_index[plan.q_valid]
    assert torch.equal(valid.sort().values, torch.arange(64 * 64))


@pytest.mark.parametrize("shape,kernel", [((7,), 7), ((8,), 7), ((5, 6), (5, 5)), ((3, 4, 5), (3, 3, 5))])
def test_kernel_equal_to_input_is_full_attention(shape, kernel):
    # An axis with kernel == length gives full attention along it; kernel 7 on 8 positions does not.
    q, k, v = rand(2, 2, shape, 8, seed=4)
    out = neighborhood(q, k, v, kernel)
    kernel_t = _per_axis(kernel, len(shape))
    if all(kk == n for kk, n in zip(kernel_t, shape)):
        n = math.prod(shape)
        flat = [t.reshape(2, 2, n, 8) for t in (q, k, v)]
        want = F.scaled_dot_product_attention(*flat).reshape(out.shape)
        assert_close(out, want)
        # any stride gives full attention too: every window is the whole axis
        assert_close(neighborhood(q, k, v, kernel, stride=kernel), want)
    else:
        assert not explicit_mask(shape, kernel).all()


@pytest.mark.parametrize("shape,kernel", [((12,), 3), ((15,), 5), ((9, 10), (3, 5)), ((4, 6, 6), (1, 3, 3))])
def test_stride_equal_to_kernel_is_blocked_attention(shape, kernel):
    kernel_t = _per_axis(kernel, len(shape))
    coords = torch.tensor(list(itertools.product(*(range(n) for n in shape))))
    blocks = coords // torch.tensor(kernel_t)
    block = (blocks[:, None, :] == blocks[None, :, :]).all(-1)  # same block on every axis
    q, k, v = rand(1, 2, shape, 4, seed=5)
    out = neighborhood(q, k, v, kernel, stride=kernel)
    n = len(coords)
    assert torch.equal(explicit_mask(shape, kernel, 1, kernel), block)
    if len(shape) == 1:
        assert torch.equal(P.block_local(kernel).materialize(n, n)[0, 0], block)
    assert_close(out, masked_attention(q, k, v, block))


def test_stride_blocks_with_partial_last_tile():
    # L = 10, k = s = 3: tiles {0,1,2} {3,4,5} {6,7,8} {9}; the last tile's leader 9 is clamped to [7, 9].
    rows = [window_1d(x, 10, 3, stride=3) for x in range(10)]
    assert rows[0] == rows[2] == [0, 1, 2] and rows[6] == rows[8] == [6, 7, 8] and rows[9] == [7, 8, 9]


@pytest.mark.parametrize("n,k,d", [(12, 3, 4), (10, 5, 2), (9, 3, 3), (7, 1, 7)])
def test_dilation_times_kernel_equals_size_attends_whole_group(n, k, d):
    # Every group holds at least k positions; when d * k == n exactly k, so each query sees its whole group.
    mask = explicit_mask((n,), k, d)
    x = torch.arange(n)
    same_group = (x.view(-1, 1) % d) == (x.view(1, -1) % d)
    assert torch.equal(mask, same_group)
    q, kk, v = rand(1, 2, (n,), 4, seed=6)
    assert_close(neighborhood(q, kk, v, k, dilation=d), masked_attention(q, kk, v, same_group))


def test_causal_axis_is_a_causal_sliding_window():
    # 1-D causal NA with stride 1: keys j with i - k < j <= i (attnkit's causal sliding window).
    n, k = 17, 5
    mask = explicit_mask((n,), k, causal=True)
    assert torch.equal(mask, P.sliding_window(k - 1, 0).materialize(n, n)[0, 0])
    # 2-D, causal on the first axis only: never a key from a later row.
    shape = (6, 5)
    m2 = explicit_mask(shape, 3, 1, 1, (True, False))
    rows = torch.arange(30) // 5
    assert not (m2 & (rows.view(1, -1) > rows.view(-1, 1))).any()
    q, kk, v = rand(1, 2, shape, 4, seed=7)
    assert_close(neighborhood(q, kk, v, 3, is_causal=(True, False)), masked_attention(q, kk, v, m2))


def test_gqa_equals_repeated_heads(fused):
    q, k, v = rand(2, 6, (5, 7), 4, hkv=2, seed=8)
    kw = dict(dilation=(1, 2), stride=(2, 1), is_causal=(False, True))
    out = neighborhood(q, k, v, 3, **kw)
    rep = neighborhood(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), 3, **kw)
    assert_close(out, rep)


def test_empty_batch_and_single_token():
    q = torch.randn(0, 2, 5, 4)
    assert neighborhood(q, q, q, 3).shape == (0, 2, 5, 4)
    q, k, v = rand(2, 2, (1, 1), 4)
    assert_close(neighborhood(q, k, v, 1), v)  # one token attends itself


def test_scale_argument():
    q, k, v = rand(1, 2, (9,), 4, seed=9)
    assert_close(neighborhood(q, k, v, 3, scale=0.3), masked_attention(q, k, v, explicit_mask((9,), 3), scale=0.3))


# ---------------------------------------------------------------------------------------------------------
# Relative positional bias (NAT's rpb) and other score modifiers
# ---------------------------------------------------------------------------------------------------------


def explicit_rpb(table, shape, kernel, dilation=1):
    """``[h, n, n]`` bias: ``table[h, y_g - x_g + k - 1, ...]`` with offsets in dilation-group units."""
    nd = len(shape)
    ks, ds = _per_axis(kernel, nd), _per_axis(dilation, nd)
    coords = list(itertools.product(*(range(n) for n in shape)))
    n = len(coords)
    bias = torch.zeros(table.shape[0], n, n, dtype=table.dtype)
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            off = tuple(y // d - x // d + k - 1 for x, y, k, d in zip(a, b, ks, ds))
            if all(0 <= o <= 2 * k - 2 for o, k in zip(off, ks)):
                bias[:, i, j] = table[(slice(None), *off)]
    return bias


@pytest.mark.parametrize("shape,kernel,dilation,stride,causal", [
    ((11,), 5, 2, 1, False), ((6, 7), (3, 5), (2, 1), 1, False), ((6, 7), 3, 1, (1, 2), (True, False)),
    ((4, 5, 6), 3, (1, 1, 2), 1, False), ((6, 9), (4, 2), (1, 2), (2, 1), False)])
def test_rpb_matches_explicit_bias(shape, kernel, dilation, stride, causal):
    h = 3
    bias_mod = neighborhood_bias(h, shape, kernel, dilation).double()
    with torch.no_grad():
        bias_mod.table.mul_(30)  # large enough to matter
    table = bias_mod.table.detach()
    q, k, v = rand(2, h, shape, 4, seed=10)
    want = masked_attention(q, k, v, explicit_mask(shape, kernel, dilation, stride, causal),
                            bias=explicit_rpb(table, shape, kernel, dilation))
    kw = dict(dilation=dilation, stride=stride, is_causal=causal, score_mod=bias_mod)
    assert_close(neighborhood(q, k, v, kernel, **kw), want)
    assert_close(neighborhood(q, k, v, kernel, engine="reference", **kw), want)


def test_rpb_table_gradient_and_gqa():
    shape, kernel = (5, 6), 3
    torch.manual_seed(0)
    mod_a = neighborhood_bias(4, shape, kernel, (1, 2)).double()
    mod_b = neighborhood_bias(4, shape, kernel, (1, 2), table=mod_a.table.detach()).double()
    q, k, v = rand(1, 4, shape, 4, hkv=2, seed=11, grad=True)
    g = torch.randn(1, 4, *shape, 4, dtype=torch.float64)
    kw = dict(dilation=(1, 2), is_causal=(False, True))
    out_a = neighborhood(q, k, v, kernel, score_mod=mod_a, **kw)
    grads_a = torch.autograd.grad(out_a, [q, k, v, mod_a.table], g)
    out_b = neighborhood(q, k, v, kernel, score_mod=mod_b, engine="reference", **kw)
    grads_b = torch.autograd.grad(out_b, [q, k, v, mod_b.table], g)
    assert_close(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert_close(a, b)


def test_nonlinear_score_mod_gradients():
    # softcap has no parameters but a non-trivial derivative; a custom modifier declares its tensor.
    w = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    mods = [S.softcap(0.7), S.custom(lambda s, b, h, qi, ki: s * (1 + w[h]) + 0.01 * (qi - ki), params=[w])]
    for mod in mods:
        q, k, v = rand(1, 2, (4, 5), 4, seed=12, grad=True)
        g = torch.randn(1, 2, 4, 5, 4, dtype=torch.float64)
        leaves = [q, k, v] + list(mod.grad_tensors())
        out_t = neighborhood(q, k, v, 3, stride=(1, 2), score_mod=mod)
        got = torch.autograd.grad(out_t, leaves, g)
        out_r = neighborhood(q, k, v, 3, stride=(1, 2), score_mod=mod, engine="reference")
        want = torch.autograd.grad(out_r, leaves, g)
        assert_close(out_t, out_r)
        for a, b in zip(got, want):
            assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# Gradients and dtypes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,kernel,dilation,stride,causal", [
    ((5,), 3, 1, 1, False), ((7,), 3, 2, 2, True), ((3, 4), (3, 3), 1, (1, 3), (False, True)),
    ((2, 3, 4), (1, 3, 3), (1, 1, 1), 1, False)])
def test_gradcheck_float64(shape, kernel, dilation, stride, causal, fused):
    q, k, v = rand(1, 2, shape, 3, hkv=1, seed=13, grad=True)
    kw = dict(dilation=dilation, stride=stride, is_causal=causal)
    assert torch.autograd.gradcheck(lambda q, k, v: neighborhood(q, k, v, kernel, **kw), (q, k, v), fast_mode=True)
    mod = neighborhood_bias(2, shape, kernel, dilation).double()

    def with_bias(q, k, v, table):  # `table` is mod.table itself: gradcheck perturbs it in place
        return neighborhood(q, k, v, kernel, score_mod=mod, **kw)

    assert torch.autograd.gradcheck(with_bias, (q, k, v, mod.table), fast_mode=True)


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 5, 8, 11, 12, 15, 16)], ids=case_id)
def test_backward_matches_reference_backward(case, fused):
    shape, kernel, d, s, c = case
    kw = dict(dilation=d, stride=s, is_causal=c)
    dv = 5 if fused else 3
    q, k, v = rand(2, 4, shape, 5, hkv=2, dv=dv, dtype=torch.float32, seed=14, grad=True)
    g = torch.randn(2, 4, *shape, dv)
    got = torch.autograd.grad(neighborhood(q, k, v, kernel, **kw), [q, k, v], g)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = torch.autograd.grad(masked_attention(qd, kd, vd, explicit_mask(shape, kernel, d, s, c)), [qd, kd, vd],
                               g.double())
    for a, b in zip(got, want):
        assert_close(a, b, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 10, 15)], ids=case_id)
def test_dtypes_forward_and_backward(dtype, case, fused):
    shape, kernel, d, s, c = case
    kw = dict(dilation=d, stride=s, is_causal=c)
    q, k, v = rand(2, 2, shape, 8, dtype=dtype, seed=15, grad=True)
    out = neighborhood(q, k, v, kernel, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    # reference on the same (rounded) inputs, in float64
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = masked_attention(qd, kd, vd, explicit_mask(shape, kernel, d, s, c))
    assert_close(out, want)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = torch.autograd.grad(out, [q, k, v], g)
    ref = torch.autograd.grad(want, [qd, kd, vd], g.double())
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        assert_close(a, b, scale=4.0)  # gradients sum over a window: a few roundings more than the output


def test_tolerances_come_from_attnkit_testing():
    assert tolerance(torch.bfloat16)["atol"] > tolerance(torch.float16)["atol"] > tolerance(torch.float32)["atol"]


def test_noncontiguous_inputs_and_device_of_output():
    q, k, v = rand(1, 3, (6, 5), 4, seed=16)
    qt, kt, vt = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    qs = torch.randn(1, 6, 5, 3, 4, dtype=torch.float64).permute(0, 3, 1, 2, 4)  # [b, h, *spatial, d] view
    assert not qs.is_contiguous()
    assert_close(neighborhood(qt, kt, vt, 3), neighborhood(q, k, v, 3))
    assert_close(neighborhood(qs, k, v, 3), neighborhood(qs.contiguous(), k, v, 3))


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def test_errors_are_clear():
    q, k, v = rand(1, 2, (6, 7), 4)
    with pytest.raises(ValueError, match="kernel_size 9 on axis 0 is larger than the input"):
        neighborhood(q, k, v, 9)
    with pytest.raises(ValueError, match="kernel_size on axis 1 is 0: neighborhood attention needs a kernel size"):
        neighborhood(q, k, v, (3, 0))
    with pytest.raises(ValueError, match=r"dilation \* kernel_size = 3 \* 3 = 9 on axis 1 exceeds the input size 7"):
        neighborhood(q, k, v, 3, dilation=(2, 3))
    with pytest.raises(ValueError, match="dilation on axis 0 must be >= 1"):
        neighborhood(q, k, v, 3, dilation=0)
    with pytest.raises(ValueError, match="stride on axis 1 is 5"):
        neighborhood(q, k, v, 3, stride=(1, 5))
    with pytest.raises(ValueError, match="kernel_size has 3 entries but the input has 2 spatial axes"):
        neighborhood(q, k, v, (3, 3, 3))
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        neighborhood(q, k, v, 3.0)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        neighborhood(q, k, v, 3, is_causal=(True, 2))
    with pytest.raises(ValueError, match="1, 2 or 3 spatial axes"):
        neighborhood(q[:, :, 0, 0], k[:, :, 0, 0], v[:, :, 0, 0], 1)  # 3-D tensor: no spatial axis
    big = torch.zeros(1, 1, 3, 3, 3, 3, 2)
    with pytest.raises(ValueError, match="1, 2 or 3 spatial axes"):
        neighborhood(big, big, big, 3)
    with pytest.raises(ValueError, match="k has spatial shape"):
        neighborhood(q, k[:, :, :5], v, 3)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        neighborhood(q.numpy(), k, v, 3)
    with pytest.raises(TypeError, match="share a dtype"):
        neighborhood(q, k.float(), v, 3)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        neighborhood(q, torch.cat([k] * 3, 1), torch.cat([v] * 3, 1), 3)
    with pytest.raises(NotSupportedError, match="choose one of"):
        neighborhood(q, k, v, 3, engine="cudnn")
    with pytest.raises(TypeError, match="score_mod must be an attnkit.score_mods.ScoreMod"):
        neighborhood(q, k, v, 3, score_mod=lambda s, *a: s)
    with pytest.raises(ValueError, match="NeighborhoodBias has 3 heads, the input has 2"):
        neighborhood(q, k, v, 3, score_mod=neighborhood_bias(3, (6, 7), 3))
    with pytest.raises(ValueError, match="tiles"):
        neighborhood(q, k, v, 3, tiles=(4,))
    with pytest.raises(ValueError, match="tiles"):
        neighborhood(q, k, v, 3, tiles=(4, 0))
    with pytest.raises(ValueError, match="must have shape"):
        neighborhood_bias(2, (6, 7), 3, table=torch.zeros(2, 5, 4))


# ---------------------------------------------------------------------------------------------------------
# Speed-of-light model
# ---------------------------------------------------------------------------------------------------------


def brute_force_tiles(shape, kernel, dilation, stride, causal, tq, tk):
    """Counts by hand: tokens go to multi-dimensional tiles in dilation-group coordinates (NATTEN's token
    permutation); a tile pair is computed if any pair in it is allowed, full if every pair is."""
    nd = len(shape)
    ds = _per_axis(dilation, nd)
    mask = explicit_mask(shape, kernel, dilation, stride, causal)
    coords = list(itertools.product(*(range(n) for n in shape)))

    def tile_of(c, t):
        return tuple((x % d, (x // d) // tt) for x, d, tt in zip(c, ds, t))

    qt = [tile_of(c, tq) for c in coords]
    kt = [tile_of(c, tk) for c in coords]
    qtiles, ktiles = sorted(set(qt)), sorted(set(kt))
    pairs = {}
    for i, a in enumerate(qt):
        for j, b in enumerate(kt):
            pairs.setdefault((a, b), []).append(bool(mask[i, j]))
    computed = sum(any(p) for p in pairs.values())
    full = sum(all(p) for p in pairs.values())
    return len(qtiles) * len(ktiles), computed, full, mask


@pytest.mark.parametrize("shape,kernel,dilation,stride,causal,tq,tk", [
    ((16,), 5, 1, 1, False, (4,), (4,)),
    ((13,), 3, 2, 3, False, (2,), (3,)),
    ((10, 12), (3, 5), (1, 2), (1, 1), (False, True), (4, 2), (2, 3)),
    ((6, 8), 3, 1, 3, False, (3, 4), (3, 4)),
    ((4, 6, 6), (3, 3, 3), (1, 2, 1), 1, (True, False, False), (2, 2, 3), (2, 3, 3)),
])
def test_speed_of_light_counts_tiles(shape, kernel, dilation, stride, causal, tq, tk):
    total, computed, full, mask = brute_force_tiles(shape, kernel, dilation, stride, causal, tq, tk)
    sol = neighborhood_speed_of_light(shape, kernel, dilation=dilation, stride=stride, is_causal=causal,
                                      tile_shape=tq, kv_tile_shape=tk)
    assert sol["tile_fraction"] == pytest.approx(computed / total)
    assert sol["full_fraction"] == pytest.approx(full / total)
    assert sol["max_speedup_tiled"] == pytest.approx(total / computed)
    assert sol["density"] == pytest.approx(mask.float().mean().item())
    assert sol["max_speedup_exact"] == pytest.approx(1 / sol["density"])
    assert sol["max_speedup_tiled"] <= sol["max_speedup_exact"] + 1e-9
    assert sol["density"] <= sol["engine_work_fraction"]


def test_speed_of_light_natten_example_and_engine_work():
    # 128 x 128 tokens, 13 x 13 kernel: density 169 / 16384 (up to border effects: exactly 169 keys per query).
    sol = neighborhood_speed_of_light((128, 128), 13, tile_shape=(8, 8))
    assert sol["density"] == pytest.approx(169 / 16384)
    # an 8x8 query tile needs (8 + 12) / 8 -> 3 or 4 key tiles per axis
    assert 1 / sol["tile_fraction"] == pytest.approx(sol["max_speedup_tiled"])
    assert 16384 / 169 / 16 < sol["max_speedup_tiled"] < 16384 / 169
    spec = make_spec((128, 128), 13)
    tiles = choose_tiles(spec)
    assert sol["engine_tiles"] == tiles
    frac = box_fraction(spec, tiles)
    assert sol["engine_work_fraction"] == pytest.approx(frac)
    assert 169 / 16384 <= frac < 3 * 169 / 16384  # the engine computes a small multiple of the exact work
    with pytest.raises(ValueError, match="tile shapes must have 2 positive entries"):
        neighborhood_speed_of_light((16, 16), 3, tile_shape=(4, 4, 4))
    assert P.speed_of_light(neighborhood_pattern((16,), 5), 16, block_q=4, block_kv=4)["max_speedup_tiled"] == \
        pytest.approx(neighborhood_speed_of_light((16,), 5, tile_shape=4)["max_speedup_tiled"])


# ---------------------------------------------------------------------------------------------------------
# Registry records and the benchmark
# ---------------------------------------------------------------------------------------------------------


def test_grid_shape():
    from attnkit.records.neighborhood import grid_shape

    assert grid_shape(16384, 2) == (128, 128) and grid_shape(512, 2) == (16, 32)
    assert grid_shape(16384, 3) == (16, 32, 32) and grid_shape(256, 3) == (4, 8, 8)
    assert grid_shape(13, 2) == (1, 13) and grid_shape(7, 1) == (7,)
    for n in range(1, 200):
        for nd in (1, 2, 3):
            g = grid_shape(n, nd)
            assert len(g) == nd and math.prod(g) == n and list(g) == sorted(g)


@pytest.mark.parametrize("name,seq,params", [
    ("neighborhood_1d", 40, {"kernel_size": 9}), ("neighborhood_2d", 48, {"kernel_size": 5}),
    ("dilated_neighborhood_2d", 196, {}), ("neighborhood_3d", 96, {"kernel_size": 3, "stride": (1, 2, 3)}),
    ("neighborhood_2d", 48, {"kernel_size": (3, 5), "spatial_shape": (4, 12)})])
@pytest.mark.parametrize("causal", [False, True])
def test_registry_records(name, seq, params, causal):
    info = attnkit.mechanism_info(name)
    assert info.family == "neighborhood" and info.exact and info.causal
    nd = info.extras["ndim"]
    grid = info.extras["spatial_shape"](seq, params.get("spatial_shape"))
    assert len(grid) == nd and math.prod(grid) == seq
    fn = attnkit.get(name, causal=causal, **params)
    q, k, v = rand(2, 4, (seq,), 8, hkv=2, seed=17)
    out = fn(q, k, v)
    kw = {**dict(info.bench_params), **params}
    kernel, d, s = kw["kernel_size"], kw.get("dilation", 1), kw.get("stride", 1)
    spatial = [t.reshape(*t.shape[:2], *grid, t.shape[-1]) for t in (q, k, v)]
    want = masked_attention(*spatial, explicit_mask(grid, kernel, d, s, causal)).reshape(out.shape)
    assert_close(out, want)
    pattern = info.extras["pattern"](seq, causal=causal, **params)
    assert torch.equal(pattern.materialize(seq, seq)[0, 0], explicit_mask(grid, kernel, d, s, causal))
    flops = info.flops(batch=2, heads=4, q_len=seq, kv_len=seq, head_dim=8, causal=causal, **params)
    assert flops == 4 * 2 * 4 * 8 * int(explicit_mask(grid, kernel, d, s, causal).sum())
    sol = info.extras["speed_of_light"](seq, causal=causal, **params)
    assert sol["density"] == pytest.approx(pattern.density(seq))


def test_registry_errors():
    fn = attnkit.get("neighborhood_2d", kernel_size=5)
    q = torch.randn(1, 2, 16, 4)  # 4 x 4 grid: kernel 5 does not fit
    with pytest.raises(ValueError, match="larger than the input"):
        fn(q, q, q)
    with pytest.raises(ValueError, match="product is the sequence length"):
        attnkit.get("neighborhood_2d", kernel_size=3, spatial_shape=(4, 5))(q, q, q)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, dim\]"):
        fn(q[0], q[0], q[0])


def test_bench_runs_neighborhood_2d():
    from attnkit.bench import BenchConfig, run_benchmark

    cfg = BenchConfig(mechanisms=["neighborhood_2d"], seq_lens=[256], heads=2, head_dim=8, repeats=1,
                      cell_budget_s=0.05, time_budget_s=60, flex=False, memory=False, error_rows=16,
                      params={"neighborhood_2d": {"kernel_size": 5}})
    doc = run_benchmark(cfg, progress=False)
    cell = next(c for c in doc["results"] if c["mechanism"] == "neighborhood_2d")
    assert cell["status"] == "ok", cell["message"]
    assert cell["exact_check"] == "ok"
    assert cell["density"] == pytest.approx(25 / 256, rel=0.2)
    assert cell["flops"] == 4 * 2 * 8 * allowed_pairs(make_spec((16, 16), 5))
    assert cell["speed_of_light_ratio"] is not None


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------


def manual_layer(layer, x):
    """The layer's computation written out: fused qkv, heads, explicit-mask attention (+ bias), projection."""
    b, *spatial, c = x.shape
    h, hd = layer.num_heads, layer.head_dim
    qkv = layer.qkv(x).reshape(b, *spatial, 3, h, hd)
    q, k, v = (qkv[..., i, :, :].movedim(-2, 1) for i in range(3))  # [b, h, *spatial, hd]
    mask = explicit_mask(tuple(spatial), layer.kernel_size, layer.dilation, layer.stride, layer.is_causal)
    bias = None if layer.rpb is None else explicit_rpb(layer.rpb, tuple(spatial), layer.kernel_size, layer.dilation)
    out = masked_attention(q, k, v, mask, bias=bias, scale=layer.scale).to(x.dtype)
    return layer.proj(out.movedim(1, -2).reshape(b, *spatial, c))


@pytest.mark.parametrize("cls,shape,kw", [
    ("NeighborhoodAttention1d", (11,), dict(kernel_size=5, dilation=2)),
    ("NeighborhoodAttention2d", (6, 7), dict(kernel_size=3, rel_pos_bias=True)),
    ("NeighborhoodAttention2d", (7, 8), dict(kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2),
                                              is_causal=(True, False), rel_pos_bias=True)),
    ("NeighborhoodAttention3d", (3, 4, 5), dict(kernel_size=3, is_causal=(True, False, False))),
])
def test_modules_match_manual_computation(cls, shape, kw):
    torch.manual_seed(0)
    layer = getattr(attnkit.nn, cls)(12, 3, **kw).double()
    if layer.rpb is not None:
        with torch.no_grad():
            layer.rpb.normal_()
    x = torch.randn(2, *shape, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    want = manual_layer(layer, x)
    assert_close(out, want)
    g = torch.randn_like(out)
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(out, [x, *params], g)
    ref = torch.autograd.grad(want, [x, *params], g)
    for a, b in zip(got, ref):
        assert_close(a, b)
    if layer.rpb is not None:
        i = next(i for i, p in enumerate(params) if p is layer.rpb)
        assert got[1 + i].abs().sum() > 0  # the bias table receives a gradient


def test_module_rpb_trains_and_other_grid_sizes():
    layer = attnkit.nn.NeighborhoodAttention2d(8, 2, 3, rel_pos_bias=True)
    assert layer.rpb.shape == (2, 5, 5)
    for shape in ((5, 5), (4, 9)):  # one table serves every input size
        x = torch.randn(1, *shape, 8)
        layer.zero_grad()
        layer(x).square().sum().backward()
        assert layer.rpb.grad is not None and layer.rpb.grad.abs().sum() > 0
    assert "kernel_size=(3, 3)" in repr(layer)
    out = attnkit.nn.NeighborhoodAttention1d(8, 2, 3).to(torch.bfloat16)(torch.randn(2, 9, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 9, 8)


def test_module_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        attnkit.nn.NeighborhoodAttention2d(10, 3, 3)
    with pytest.raises(ValueError, match="kernel_size must be positive ints"):
        attnkit.nn.NeighborhoodAttention2d(8, 2, 0)
    assert attnkit.nn.NeighborhoodAttention2d(8, 2, 4)(torch.randn(1, 5, 6, 8)).shape == (1, 5, 6, 8)  # even: NATTEN
    with pytest.raises(ValueError, match="kernel_size has 3 entries, the layer has 2"):
        attnkit.nn.NeighborhoodAttention2d(8, 2, (3, 3, 3))
    layer = attnkit.nn.NeighborhoodAttention2d(8, 2, 3)
    with pytest.raises(ValueError, match=r"channels-last x \[batch, \*spatial, 8\]"):
        layer(torch.randn(1, 8, 5, 5))  # channels-first: 5 channels
    with pytest.raises(ValueError, match="with 2 spatial axes"):
        layer(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="larger than the input"):
        layer(torch.randn(1, 2, 5, 8))


def test_memory_is_linear_in_tokens():
    # 96 x 96 tokens, 2 heads: dense scores alone would take 9216^2 * 2 * 4 B = 648 MiB; the engine allocates
    # the tiled copies of q / out (~1 MiB each here) and a few chunk buffers of at most ~2 MiB.
    from attnkit.bench.measure import peak_memory

    q, k, v = rand(1, 2, (96, 96), 16, dtype=torch.float32, seed=19, grad=True)

    def step():
        neighborhood(q, k, v, 7).sum().backward()

    _, peak = peak_memory(step, torch.device("cpu"))
    if peak is not None:
        assert peak < 48 * 2**20, peak
