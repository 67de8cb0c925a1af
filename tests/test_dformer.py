"""B9 D-Former ("D-Former: A U-shaped Dilated Transformer for 3D Medical Image Segmentation"): local windows and
dilated global groups on a 3-D grid, against a materialised-mask reference, NA/GNA, and the paper's invariants."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.nn import DFormerAttention3d, DFormerStage3d
from attnkit.ops.neighborhood.dformer import dformer_attention, dformer_group_ids, dformer_reference
from attnkit.testing import assert_close


def _rand(shape, *, h=4, hkv=None, d=8, dv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    hkv, dv = hkv or h, dv or d
    q = torch.randn(2, h, *shape, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, *shape, d, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, *shape, dv, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v)]


def test_group_rule_is_the_papers():
    # local: windows of G consecutive tokens; global: interval S/G, a group = tokens spaced S/G apart
    assert dformer_group_ids((6,), 3, "local").tolist() == [0, 0, 0, 1, 1, 1]
    assert dformer_group_ids((6,), 3, "global").tolist() == [0, 1, 0, 1, 0, 1]
    assert dformer_group_ids((8,), 2, "global").tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # padded: S=5, G=2 -> S'=6, interval 3: groups {0, 3}, {1, 4}, {2, (5 = padding)}
    assert dformer_group_ids((5,), 2, "global").tolist() == [0, 1, 2, 0, 1]
    ids = dformer_group_ids((4, 4, 4), 2, "global").view(4, 4, 4)
    assert ids[0, 0, 0] == ids[2, 2, 2] == ids[0, 2, 0] and ids[0, 0, 0] != ids[1, 0, 0]
    assert torch.bincount(ids.flatten()).tolist() == [8] * 8  # 2 x 2 x 2 tokens in each of 8 groups


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("shape,group", [((4, 8, 8), (2, 4, 4)), ((3, 5, 7), 2), ((2, 3, 4), (4, 8, 8)),
                                         ((6,), 4), ((5, 3), (2, 8)), ((1, 1, 1), 2)])
def test_fast_path_equals_materialised_reference(scope, shape, group):
    q, k, v = _rand(shape, hkv=2, dv=5, grad=True)
    out = dformer_attention(q, k, v, group, scope=scope)
    ref_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = dformer_reference(*ref_in, group, scope=scope)
    assert_close(out, ref)
    do = torch.randn_like(out)
    out.backward(do)
    ref.backward(do)
    for a, b in zip((q, k, v), ref_in):
        assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_and_single_precision(dtype):
    q, k, v = _rand((3, 4, 6), seed=3)
    ref = dformer_reference(q, k, v, (2, 2, 4), scope="global")
    out = dformer_attention(*(t.to(dtype) for t in (q, k, v)), (2, 2, 4), scope="global")
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype)


def test_divisible_scopes_are_gna_blocks_and_dilated_na():
    # catalogue test 2: a dilated group is NA with dilation S/G and a kernel covering the residue class;
    # the local window is GNA with stride = kernel = G (non-overlapping windows)
    shape, group = (4, 6, 8), (2, 3, 4)
    q, k, v = _rand(shape, seed=5)
    loc = dformer_attention(q, k, v, group, scope="local")
    glo = dformer_attention(q, k, v, group, scope="global")
    assert_close(loc, attnkit.neighborhood(q, k, v, group, stride=group, engine="reference"))
    dil = tuple(s // g for s, g in zip(shape, group))
    assert_close(glo, attnkit.neighborhood(q, k, v, group, dilation=dil, engine="reference"))
    assert (loc - glo).abs().amax() > 0.1  # the two scopes differ


def _two_layer_reach(shape, group):
    masks = []
    for scope in ("local", "global"):
        ids = dformer_group_ids(shape, group, scope)
        masks.append((ids[:, None] == ids[None, :]).double())
    return masks


@pytest.mark.parametrize("shape,group", [((4, 8, 8), (2, 4, 4)), ((6, 6, 6), (2, 3, 6)), ((8,), (4,)), ((9,), (3,)),
                                         ((16, 8), (4, 2)), ((32, 8, 8), (2, 8, 8))])
def test_local_then_global_connects_every_pair_iff_groups_cover_the_intervals(shape, group):
    """Catalogue test 1, made precise: one local then one global layer reach every token from every token iff on
    every axis a window covers every residue, G >= S / G (G^2 >= S). The authors' first stage, (2, 8, 8) groups
    on a 32 x 32 x 32 map, does not meet it on depth (2 < 16). Neither layer alone connects all pairs."""
    local, glob = _two_layer_reach(shape, group)
    assert not bool((local > 0).all()) and not bool((glob > 0).all())
    covers = all(g * g >= s for s, g in zip(shape, group))
    assert bool(((local @ glob) > 0).all()) == covers
    assert covers == ((shape, group) not in (((6, 6, 6), (2, 3, 6)), ((16, 8), (4, 2)), ((32, 8, 8), (2, 8, 8))))


def test_padding_breaks_two_layer_connectivity():
    """With padding (side 3, group 2: windows {0, 1}, {2}; dilated groups {0, 2}, {1}) token 2 never reaches
    token 1 in local -> global: the padded scheme (the authors' too) needs sides divisible by G for the
    two-layer reach the paper describes."""
    local, glob = _two_layer_reach((3,), 2)
    reach = (local @ glob) > 0
    assert not bool(reach[2, 1]) and bool(reach[1, 2])


def test_registry_record_and_errors():
    m = attnkit.mechanism_info("dformer_3d")
    assert not m.causal and m.exact
    q, k, v = (t.reshape(2, 4, 96, 8) for t in _rand((4, 4, 6)))
    fn = attnkit.get("dformer_3d", group_size=(2, 2, 3), scope="local", spatial_shape=(4, 4, 6))
    assert_close(fn(q, k, v), m.reference(fn, q, k, v, group_size=(2, 2, 3), scope="local", spatial_shape=(4, 4, 6)))
    with pytest.raises(ValueError, match="scope must be"):
        attnkit.get("dformer_3d", scope="dilated")
    with pytest.raises(ValueError, match="group_size must be"):
        attnkit.get("dformer_3d", group_size=(2, 2))
    with pytest.raises(attnkit.NotSupportedError):
        attnkit.get("dformer_3d", causal=True)
    with pytest.raises(ValueError, match="one grid"):
        dformer_attention(q.reshape(2, 4, 4, 4, 6, 8), k.reshape(2, 4, 4, 6, 4, 8), v.reshape(2, 4, 4, 6, 4, 8), 2)


def test_stage_alternates_scopes_and_trains():
    torch.manual_seed(0)
    stage = DFormerStage3d(16, 2, depth=3, group_size=(2, 2, 2))
    assert [a.scope for a in stage.attn] == ["local", "global", "local"]
    x = torch.randn(2, 4, 4, 6, 16, requires_grad=True)
    y = stage(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert stage.pos.weight.grad is not None and stage.pos.weight.grad.abs().sum() > 0
    layer = DFormerAttention3d(16, 2, (2, 2, 2), "global")
    with pytest.raises(ValueError, match="channels-last"):
        layer(torch.randn(2, 4, 16))
