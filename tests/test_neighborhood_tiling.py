"""Spatial tilings for block-sparse neighborhood attention (issue 23): the permutation, the analytic tile classes
(dilation grouping, stride, causal axes, 1-D to 3-D) against the dense mask, the BlockMask the flex engine builds
run by a plain block-sparse executor against the reference (no compile), and the tile limit / speed of light."""

import math

import pytest
import torch

import attnkit
from attnkit.ops.neighborhood import neighborhood_reference
from attnkit.ops.neighborhood.tiling import choose_tiling, tiling_classes, tiling_stats, token_permutation
from attnkit.patterns.spatial import _cached_pattern
from attnkit.patterns.windows import make_spec
from attnkit.testing import assert_close

CASES = [
    ((32, 128), dict(kernel_size=13)),
    ((32, 64), dict(kernel_size=(5, 7), dilation=(2, 4), is_causal=(True, False))),
    ((32, 48), dict(kernel_size=(5, 7), dilation=(2, 3), stride=(1, 3), is_causal=(True, False))),
    ((8, 16, 32), dict(kernel_size=(3, 5, 7), is_causal=(False, True, False))),
    ((16, 16, 16), dict(kernel_size=(3, 5, 4), dilation=(2, 1, 4), stride=(1, 2, 1))),
    ((1024,), dict(kernel_size=65, is_causal=True)),
    ((48, 32), dict(kernel_size=(6, 16), stride=(6, 16))),  # GNA blocked: stride == kernel
    ((30, 64), dict(kernel_size=7, dilation=(4, 1))),  # 30 % 4 != 0: that axis is not grouped
]


def _spec(shape, kw):
    return make_spec(shape, kw["kernel_size"], kw.get("dilation", 1), kw.get("stride", 1), kw.get("is_causal", False))


@pytest.mark.parametrize(("shape", "kw"), CASES)
def test_tile_classes_equal_the_dense_mask_blocks(shape, kw):
    spec = _spec(shape, kw)
    tiling = choose_tiling(spec)
    assert tiling is not None and math.prod(tiling.tile) == 128
    n = spec.num_tokens
    perm = token_permutation(spec, tiling)
    assert torch.equal(perm.sort().values, torch.arange(n))
    dense = _cached_pattern(spec).materialize(n, n)[0, 0][perm][:, perm].view(n // 128, 128, n // 128, 128)
    cls = tiling_classes(spec, tiling)[0, 0]
    assert torch.equal(cls != 0, dense.any(dim=(1, 3)))
    assert torch.equal(cls == 2, dense.all(dim=(1, 3)))
    assert int((cls != 0).sum()) == tiling.computed and int((cls == 2).sum()) == tiling.full


def _run_block_mask(bm, q, k, v, scale):
    """FlexAttention's semantics of a BlockMask, in plain torch: per query block, its partial key blocks with the
    mask_mod and its full key blocks unmasked; every other block skipped."""
    n = q.shape[2]
    bq, bk = bm.BLOCK_SIZE
    out = torch.zeros_like(q)
    for r in range(n // bq):
        rows = torch.arange(r * bq, (r + 1) * bq)
        cols, masks = [], []
        for num, idx, full in ((bm.kv_num_blocks, bm.kv_indices, False),
                               (bm.full_kv_num_blocks, bm.full_kv_indices, True)):
            for j in idx[0, 0, r, : int(num[0, 0, r])].tolist():
                c = torch.arange(j * bk, (j + 1) * bk)
                cols.append(c)
                masks.append(torch.ones(bq, bk, dtype=torch.bool) if full else
                             bm.mask_mod(0, 0, rows.view(-1, 1), c.view(1, -1)))
        if not cols:
            continue
        c, m = torch.cat(cols), torch.cat(masks, dim=1)
        s = (q[:, :, rows] @ k[:, :, c].transpose(-1, -2)) * scale
        w = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1).nan_to_num(0.0)
        out[:, :, rows] = w @ v[:, :, c]
    return out


@pytest.mark.parametrize(("shape", "kw"), CASES[1:3] + CASES[4:5] + CASES[6:7])
def test_flex_block_mask_of_the_layout_runs_exactly(shape, kw):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from attnkit.backends.flex import neighborhood_layout

    spec = _spec(shape, kw)
    perm, inv, bm, _ = neighborhood_layout(spec, None, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, *shape, 8, generator=g, dtype=torch.float64) for _ in range(3))
    flat = [t.reshape(1, 1, -1, 8) for t in (q, k, v)]
    out = _run_block_mask(bm, *(t[:, :, perm] for t in flat), scale=8 ** -0.5)[:, :, inv].reshape(q.shape)
    ref = neighborhood_reference(q, k, v, kw["kernel_size"], dilation=kw.get("dilation", 1),
                                 stride=kw.get("stride", 1), is_causal=kw.get("is_causal", False))
    assert_close(out, ref, dtype=torch.float64)


def test_tiling_stats_tile_limit_and_speed_of_light():
    st = tiling_stats(make_spec((128, 128), 13))
    assert st["tile"] == (8, 16) and st["tile_limit"] == 1012 * 128 * 128 < st["row_major_limit"] == 1664 * 128 ** 2
    assert st["in_window"] == pytest.approx(st["speed_of_light"] * 128 ** 4) and st["speed_of_light"] < 0.0104
    # dilation grouping keeps tiles inside one group: fewer tiles than the ungrouped layout (1,672 before)
    assert tiling_stats(make_spec((128, 128), 13, dilation=2))["tile_limit"] == 880 * 128 * 128
    # GNA with stride == kernel aligned to the tile: perfectly block-sparse, the tile limit is the speed of light
    blocked = tiling_stats(make_spec((128, 128), (8, 16), stride=(8, 16)))
    assert blocked["tile_limit"] == blocked["in_window"]


@pytest.mark.slow  # one FlexAttention compile on CPU
def test_flex_neighborhood_dilated_causal_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 64, 16, generator=g) for _ in range(3))
    kw = dict(dilation=(2, 4), is_causal=(True, False))
    with torch.no_grad():
        out = attnkit.neighborhood(q, k, v, (5, 7), engine="flex", **kw)
    ref = neighborhood_reference(q.double(), k.double(), v.double(), (5, 7), **kw)
    assert_close(out, ref, dtype=torch.float32)
