"""Issue 17: BOAT (E8), SG-Former (E16) and Select-and-Pack (E17): references, the catalogue's invariants."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.errors import NotSupportedError
from attnkit.ops.approx.boat import balanced_clusters, boat_attention, boat_reference
from attnkit.ops.approx.error import exact_softmax
from attnkit.ops.approx.select_pack import gate_scores, select_pack_attention, select_pack_reference
from attnkit.ops.approx.sgformer import (
    sgformer_attention,
    sgformer_levels,
    sgformer_reference,
    sgformer_significance,
)
from attnkit.testing import assert_close


def qkv(n=36, nk=None, b=2, h=2, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h, nk, d, generator=g, dtype=dtype),
            torch.randn(b, h, nk, d, generator=g, dtype=dtype))


# ------------------------------------------------------------------------------------------------ BOAT
@pytest.mark.parametrize("n", [1, 7, 37, 64])
def test_boat_matches_reference(n):
    q, k, v = qkv(n)
    assert_close(boat_attention(q, k, v, cluster_size=8, window=6, chunk_size=5),
                 boat_reference(q, k, v, cluster_size=8, window=6))


@pytest.mark.parametrize("n,c", [(64, 8), (64, 16), (48, 3)])
def test_boat_clusters_have_equal_size(n, c):
    _, k, _ = qkv(n)
    ids = balanced_clusters(k, c)
    for row in ids.flatten(0, 1):
        sizes = torch.bincount(row)
        assert (sizes == c).all(), sizes


def test_boat_clusters_group_separated_points():
    # two far-apart blobs, cluster size = blob size: each cluster is one blob
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(1, 1, 32, 8, generator=g, dtype=torch.float64) * 0.1
    pts[..., :16, 0] += 10
    perm = torch.randperm(32, generator=g)
    ids = balanced_clusters(pts[:, :, perm], 16)[0, 0]
    blob = (perm < 16).long()
    assert len(set(zip(ids.tolist(), blob.tolist(), strict=True))) == 2


def test_boat_full_size_is_full_attention_and_permutation_equivariant():
    q, k, v = qkv(32)
    assert_close(boat_attention(q, k, v, cluster_size=32, window=32), exact_softmax(q, k, v))
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    # feature-space heads only (window = n: the image heads see everything, so they are equivariant too)
    out = boat_attention(q, k, v, cluster_size=8, window=32)
    out_p = boat_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], cluster_size=8, window=32)
    assert_close(out_p, out[:, :, perm])


def test_boat_errors():
    q, k, v = qkv(8)
    with pytest.raises(NotSupportedError):
        boat_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="q_len"):
        boat_attention(q[:, :, :4], k, v)
    with pytest.raises(ValueError, match="image_heads"):
        boat_attention(q, k, v, image_heads=5)


# ------------------------------------------------------------------------------------------- SG-Former
@pytest.mark.parametrize("n,nk", [(1, 1), (7, 7), (36, 36), (10, 37)])
@pytest.mark.parametrize("rates,fractions", [((1, 4), None), ((1, 2, 5), (0.2, 0.3, 0.5))])
def test_sgformer_matches_reference(n, nk, rates, fractions):
    q, k, v = qkv(n, nk)
    kw = dict(region_size=6, rates=rates, fractions=fractions)
    assert_close(sgformer_attention(q, k, v, chunk_size=4, **kw), sgformer_reference(q, k, v, **kw))


def test_sgformer_rate_one_is_full_attention():
    q, k, v = qkv(29)
    assert_close(sgformer_attention(q, k, v, region_size=8, rates=(1,)), exact_softmax(q, k, v))
    assert_close(sgformer_attention(q, k, v, region_size=8, rates=(1, 1), fractions=(0.5, 0.5)),
                 exact_softmax(q, k, v))


def test_sgformer_token_budget_and_salient_regions_kept():
    q, k, v = qkv(64)
    sig = sgformer_significance(q, k, 8, 16 ** -0.5)
    assert_close(sig.sum(-1), torch.ones_like(sig.sum(-1)))
    levels = sgformer_levels(sig, (0.25, 0.75))
    assert ((levels == 0).sum(-1) == 2).all()  # 8 regions: the 2 most significant keep rate 1
    top = sig.argmax(-1, keepdim=True)
    assert (levels.gather(-1, top) == 0).all()
    # budget: 2 regions x 8 tokens at rate 1 + 6 regions x 2 tokens at rate 4 = 28 distinct key rows
    w = sgformer_reference(q, k, v, region_size=8, rates=(1, 4), fractions=(0.25, 0.75), return_attention=True)[1]
    distinct = torch.unique(w[0, 0, 0].round(decimals=12)).numel()
    assert distinct == 28


def test_sgformer_errors():
    q, k, v = qkv(8)
    with pytest.raises(NotSupportedError):
        sgformer_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="fractions"):
        sgformer_attention(q, k, v, rates=(1, 4), fractions=(0.9, 0.5))
    with pytest.raises(ValueError, match="rates"):
        sgformer_attention(q, k, v, rates=())


# ------------------------------------------------------------------------------------- Select-and-Pack
@pytest.mark.parametrize("n", [1, 7, 36])
def test_select_pack_matches_per_image_reference(n):
    q, k, v = qkv(n, b=3)
    w = torch.randn(2, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_close(select_pack_attention(q, k, v, gate_weight=w, chunk_size=5),
                 select_pack_reference(q, k, v, gate_weight=w))


def test_select_pack_packed_equals_each_image_alone():
    q, k, v = qkv(20, b=3)
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[0, :5] = True
    keep[1, 3:17] = True
    keep[2, ::3] = True
    out = select_pack_attention(q, k, v, keep=keep)
    for i in range(3):
        idx = torch.nonzero(keep[i]).flatten()
        alone = exact_softmax(q[i:i + 1, :, idx], k[i:i + 1, :, idx], v[i:i + 1, :, idx])
        assert_close(out[i:i + 1, :, idx], alone)
        assert (out[i][:, ~keep[i]] == 0).all()


def test_select_pack_all_selected_is_full_attention_and_gate_learns():
    q, k, v = qkv(12)
    assert_close(select_pack_attention(q, k, v, keep=torch.ones(2, 12, dtype=torch.bool)), exact_softmax(q, k, v))
    w = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    select_pack_attention(q, k, v, gate_weight=w).square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert gate_scores(k, w).shape == (2, 12)


def test_select_pack_errors_and_module():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match="exactly one"):
        select_pack_attention(q, k, v)
    with pytest.raises(ValueError, match="keep"):
        select_pack_attention(q, k, v, keep=torch.ones(2, 8))
    with pytest.raises(NotSupportedError):
        attnkit.get("select_pack", num_heads=2, head_dim=16, causal=True)
    mod = attnkit.get("select_pack", num_heads=2, head_dim=16)
    assert mod(q.float(), k.float(), v.float()).shape == (2, 2, 8, 16)


# ------------------------------------------------------------------------- Combiner-Logsparse / -Axial
from attnkit.ops.approx.combiner_bases import (  # noqa: E402
    combiner_axial_attention,
    combiner_axial_reference,
    combiner_layout,
    combiner_logsparse_attention,
    combiner_logsparse_reference,
    combiner_mixture_attention,
    combiner_mixture_reference,
)

BASES = {"logsparse": (combiner_logsparse_attention, combiner_logsparse_reference, {}),
         "axial": (combiner_axial_attention, combiner_axial_reference, {"block_size": 6}),
         "mixture": (combiner_mixture_attention, combiner_mixture_reference, {"block_size": 6})}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,nk", [(1, 1), (7, 7), (37, 37), (5, 13), (13, 5)])
@pytest.mark.parametrize("base", list(BASES))
def test_combiner_bases_match_references(base, n, nk, causal):
    fast, ref, kw = BASES[base]
    q, _, _ = qkv(n)
    _, k, v = qkv(nk, seed=1)
    extra = {"chunk_size": 4} if base != "axial" else {}
    assert_close(fast(q, k, v, causal=causal, **kw, **extra), ref(q, k, v, causal=causal, **kw))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("base", list(BASES))
def test_combiner_bases_full_support_rows_sum_to_one(base, causal):
    _, ref, kw = BASES[base]
    q, k, v = qkv(40)
    w = ref(q, k, v, causal=causal, return_attention=True, **kw)[1]
    visible = torch.ones(40, 40, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    assert (w[..., visible] > 0).all() and (w[..., ~visible] == 0).all()
    assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_combiner_bases_exact_limits():
    q, k, v = qkv(24)
    for causal in (False, True):
        want = exact_softmax(q, k, v, causal=causal)
        # axial with one row (block = n) or one column (block = 1): everything is direct
        assert_close(combiner_axial_attention(q, k, v, block_size=24, causal=causal), want)
        assert_close(combiner_axial_attention(q, k, v, block_size=1, causal=causal), want)
        # logsparse at n <= 3: every distance is 0, 1 or 2
        assert_close(combiner_logsparse_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], causal=causal),
                     exact_softmax(q[:, :, :3], k[:, :, :3], v[:, :, :3], causal=causal))
    # a region of equal keys (and values) is exact: the log |r| bias restores its mass
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :] = k[:, :, :1]
    v2[:, :, :] = v[:, :, :1]
    assert_close(combiner_logsparse_attention(q, k2, v2), exact_softmax(q, k2, v2))


def test_combiner_layouts_follow_the_definitions():
    ids = combiner_layout("logsparse", 20, 20, causal=True)
    i = 19
    direct = torch.nonzero(ids[i] == -1).flatten().tolist()
    assert direct == [3, 11, 15, 17, 18, 19]  # distances 16, 8, 4, 2, 1, 0
    assert ids[i, 12:15].unique().numel() == 1 and ids[i, :3].unique().numel() == 1  # gaps are single regions
    assert (ids[torch.ones(20, 20, dtype=torch.bool).triu(1)] == -2).all()
    ax = combiner_layout("axial", 16, 16, causal=False, block_size=4)
    assert (ax[5][[4, 6, 7, 1, 9, 13]] == -1).all()  # row 1 and column 1 of query 5
    assert ax[5, 0] == ax[5, 8] == 0 and ax[5, 3] == 3


@pytest.mark.parametrize("base", list(BASES))
def test_combiner_bases_causal_summaries_use_no_future_key(base):
    fast, _, kw = BASES[base]
    q, k, v = qkv(30)
    out = fast(q, k, v, causal=True, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 5
    v2[:, :, 20:] -= 3
    assert_close(fast(q, k2, v2, causal=True, **kw)[:, :, :20], out[:, :, :20])


def test_combiner_mixture_splits_heads_between_fixed_and_logsparse():
    from attnkit.ops.approx import combiner_attention

    q, k, v = qkv(30, h=4)
    out = combiner_mixture_attention(q, k, v, block_size=5, causal=True)
    assert_close(out[:, :2], combiner_attention(q[:, :2], k[:, :2], v[:, :2], block_size=5, causal=True))
    assert_close(out[:, 2:], combiner_logsparse_attention(q[:, 2:], k[:, 2:], v[:, 2:], causal=True))
    with pytest.raises(ValueError, match="fixed_heads"):
        combiner_mixture_attention(q, k, v, fixed_heads=5)


NEW = ["iceformer", "retrieval_attention", "sea", "boat", "sgformer", "select_pack", "combiner_logsparse",
       "combiner_axial", "combiner_mixture"]


@pytest.mark.parametrize("name", NEW)
def test_approximation_error_on_the_bench_inputs(name):
    # measured by approximation_error on the bench's clustered inputs (as `attnkit bench` and bench_approx do),
    # with the attention matrix compared too where the record exposes one
    from attnkit.bench.workloads import make_inputs

    q, k, v = make_inputs("clustered", (1, 2, 96, 16), torch.Generator().manual_seed(0))
    m = attnkit.mechanism_info(name)
    err = attnkit.approximation_error(name, q, k, v, **dict(m.small_params))
    assert 0 < err.output_relative < 1.5
    if name != "select_pack":  # a module without attention_matrix
        assert err.attention_relative is not None and err.attention_relative >= 0


def test_select_pack_a_nan_key_is_selected_and_propagates():
    """Issue 28 (the registry robustness test): a NaN key gave a NaN gate score, which is never > threshold, so the
    token dropped out and the output was finite as if it did not exist. Now it is selected and its NaN reaches
    the selected rows of its image and head (as in dense attention over them); other images are unchanged."""
    q, k, v = qkv(12)
    w = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    clean = select_pack_attention(q, k, v, gate_weight=w)
    k_nan = k.clone()
    k_nan[0, 0, 5, 1] = float("nan")
    out = select_pack_attention(q, k_nan, v, gate_weight=w)
    assert torch.isnan(out[0, 0]).any()
    assert_close(out[1], clean[1])
