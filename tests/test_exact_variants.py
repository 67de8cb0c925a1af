"""Exact-attention variants (issue 16): the papers' invariants for grid, per-head, hierarchical and packed
patterns, and exact tile classes (never evaluated, never contradicting the predicate)."""

import math

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.functional import variants as FV
from attnkit.nn import MultiheadAttention, RotaryEmbedding, apply_rotary
from attnkit.ops.exact import variants as V
from attnkit.patterns import _classify_by_evaluation
from attnkit.testing import assert_close, random_qkv

GRID_PATTERNS = [
    P.axial((3, 5), 0), P.axial((3, 5), 1, causal=True), P.axial((2, 3, 4), 1), P.axial((2, 3, 4), 1, causal=True),
    P.axial((4, 4), 0, causal=True), P.axial((1, 7), -1), P.halo((6, 5), 2, 1), P.halo((15,), 4, 2),
    P.halo((3, 4, 2), (2, 2, 1), (1, 0, 1)),
]


@pytest.mark.parametrize("bq,bk", [(1, 1), (2, 3), (4, 4), (5, 7), (16, 16)])
@pytest.mark.parametrize("pattern", GRID_PATTERNS, ids=repr)
def test_grid_tile_classes_are_exact(pattern, bq, bk):
    n = math.prod(pattern.shape)
    for lq in ([n] if isinstance(pattern, P._Halo) else [n, max(1, n - 4)]):
        got = pattern.tile_classes(lq, n, bq, bk)
        assert torch.equal(got, _classify_by_evaluation(pattern, lq, n, bq, bk, 1, 1, None)), (lq, bq, bk)


@pytest.mark.parametrize("bq,bk", [(1, 1), (3, 4), (8, 8)])
def test_per_head_and_hierarchical_tile_classes_are_exact(bq, bk):
    levels, gids, _ = V.hdt_layout([[3, 2], [4]])
    n = levels.numel()
    for pattern in [P.per_head_window([1, None, 3]), P.per_head_window([1, 2, 0], causal=True), P.head_strides(2),
                    P.head_strides(4), P.block_attention([4, 5, 3, 3]), P.hierarchical(levels, gids)]:
        for lq in (n, n - 3):
            if isinstance(pattern, P._Hierarchical) and lq != n:
                continue
            got = pattern.tile_classes(lq, n, bq, bk, heads=3)
            exact = _classify_by_evaluation(pattern, lq, n, bq, bk, 1, 3, None)
            got = got.expand_as(exact)
            if isinstance(pattern, P._Hierarchical):  # range-based per level: never wrong, PARTIAL when unsure
                assert not ((got == P.EMPTY) & (exact != P.EMPTY)).any()
                assert not ((got == P.FULL) & (exact != P.FULL)).any()
                assert (got == exact).float().mean() > 0.5
            else:
                assert torch.equal(got, exact), (pattern, lq)


def _rows_as_batch(x, shape, axis):
    """[B, H, n, D] grid tokens -> every line along `axis` as a batch element [B * lines, H, len, D]."""
    b, h, _, d = x.shape
    g = x.reshape(b, h, *shape, d).movedim(2 + axis, -2)
    return g.reshape(b, h, -1, shape[axis], d).permute(0, 2, 1, 3, 4).reshape(-1, h, shape[axis], d), g.shape


@pytest.mark.parametrize("shape,axis", [((3, 5), 1), ((3, 5), 0), ((2, 3, 4), 1), ((4, 2, 3), 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_axial_equals_attention_on_each_line(shape, axis, causal):
    n = math.prod(shape)
    q, k, v = random_qkv(2, 2, n, n, 8, dtype=torch.float64)
    out = attnkit.attention(q, k, v, pattern=P.axial(shape, axis, causal=causal), engine="tiled", block_q=4,
                            block_kv=4)
    (qr, moved), (kr, _), (vr, _) = (_rows_as_batch(t, shape, axis) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
    b, h = q.shape[:2]
    ref = ref.reshape(b, -1, h, shape[axis], 8).permute(0, 2, 1, 3, 4).reshape(moved)
    ref = ref.movedim(-2, 2 + axis).reshape(b, h, n, 8)
    assert_close(out, ref)


def test_axial_on_a_single_row_is_full_attention():
    q, k, v = random_qkv(1, 2, 9, 9, 8, dtype=torch.float64)
    assert_close(attnkit.attention(q, k, v, pattern=P.axial((1, 9), 1), engine="tiled"),
                 attnkit.attention(q, k, v))


def test_axial_transformer_shifts_make_raster_order_autoregressive():
    """Outer context (shift down, masked column attention) + inner (shift right, masked row attention): every
    output depends on inputs strictly before it in raster order only, and on all of them (no structural zero)."""
    shape = (3, 4)
    n = 12
    x = torch.randn(1, 1, n, 4, dtype=torch.float64)

    def layer(x):
        ctx = V.axial_shift(x, shape, 0)
        ctx = attnkit.attention(ctx, ctx, ctx, pattern=P.axial(shape, 1))  # unmasked row attention
        ctx = attnkit.attention(ctx, ctx, ctx, pattern=P.axial(shape, 0, causal=True))
        h = V.axial_shift(x + ctx, shape, 1)
        return attnkit.attention(h, h, h, pattern=P.axial(shape, 1, causal=True)) + ctx

    jac = torch.autograd.functional.jacobian(layer, x).reshape(n, 4, n, 4).abs().sum((1, 3))
    nonzero = jac > 0
    assert not torch.triu(nonzero).any()  # nothing at or after the output's own position
    assert nonzero.tril(-1).sum() == n * (n - 1) // 2  # every earlier pixel reaches it


def test_axial_shift_is_a_zero_filled_shift():
    x = torch.arange(12.0).view(1, 12, 1)
    down = V.axial_shift(x, (3, 4), 0).view(3, 4)
    assert torch.equal(down, torch.tensor([[0.0] * 4, [0, 1, 2, 3], [4, 5, 6, 7]]))
    right = V.axial_shift(x, (3, 4), 1).view(3, 4)
    assert torch.equal(right[:, 0], torch.zeros(3)) and torch.equal(right[0, 1:], torch.tensor([0.0, 1, 2]))


def test_halo_covering_the_image_is_full_and_halo_zero_is_window_attention():
    q, k, v = random_qkv(1, 2, 30, 30, 8, dtype=torch.float64)
    assert_close(attnkit.attention(q, k, v, pattern=P.halo((5, 6), 2, 6), engine="tiled"), attnkit.attention(q, k, v))
    assert torch.equal(P.halo((30,), 6, 0).materialize(30, 30), P.block_local(6).materialize(30, 30))
    m = P.halo((8, 8), 4, 1).materialize(64, 64)[0, 0]
    # interior block of an 8 x 8 image with b = 4, h = 1: (4 + 1) x (4 + 1) keys (one border side cut)
    assert int(m[0].sum()) == 25 and int(m[0].sum()) == int(m[4 * 8 + 4 - 4].sum() if False else 25)
    assert int(m[9].sum()) == 25  # every query of a block shares the block's region


@pytest.mark.parametrize("causal", [False, True])
def test_per_head_windows_equal_one_window_per_head_run_separately(causal):
    windows = [1, 3, None]
    q, k, v = random_qkv(2, 3, 21, 21, 8, dtype=torch.float64, requires_grad=True)
    out = attnkit.attention(q, k, v, pattern=P.per_head_window(windows, causal=causal), engine="tiled",
                            block_q=4, block_kv=4)
    for h, w in enumerate(windows):
        p = P.full() if w is None else P.sliding_window(w, 0 if causal else w)
        p = P.causal() & p if causal else p
        sl = slice(h, h + 1)
        assert_close(out[:, sl], attnkit.attention(q[:, sl], k[:, sl], v[:, sl], pattern=p))
    rows = P.per_head_window([2], causal=False).materialize(21, 21, heads=1)[0, 0].sum(-1)
    assert int(rows[10]) == 5 and int(rows[0]) == 3  # min(2w + 1, n) away from the borders
    assert_close(attnkit.attention(q, k, v, pattern=P.per_head_window([None] * 3), engine="tiled"),
                 attnkit.attention(q, k, v))


def test_hepos_heads_cover_every_key_and_stride_one_is_full():
    s = 3
    m = P.head_strides(s).materialize(5, 20, heads=6)[0]
    assert m.any(0).all()  # the union over heads covers every source position
    assert (m.sum(-1)[:, 0] == torch.tensor([7, 7, 6, 7, 7, 6])).all()
    q, k, v = random_qkv(1, 6, 5, 20, 8, dtype=torch.float64)
    out = attnkit.attention(q, k, v, pattern=P.head_strides(s), engine="tiled", block_q=2, block_kv=4)
    for h in range(6):
        r = h % s
        assert_close(out[:, h], attnkit.attention(q[:, h:h + 1], k[:, h:h + 1, r::s], v[:, h:h + 1, r::s])[:, 0])
    assert_close(attnkit.attention(q, k, v, pattern=P.head_strides(1), engine="tiled"), attnkit.attention(q, k, v))


def test_hdt_mask_is_symmetric_connected_and_flat_is_full():
    levels, gids, is_token = V.hdt_layout([[3, 2], [4, 1, 2], [2]])
    n = levels.numel()
    m = P.hierarchical(levels, gids).materialize(n, n)[0, 0]
    assert torch.equal(m, m.T)
    reach = m.double()
    for _ in range(2 * 3 - 1):
        reach = (reach @ m.double()).clamp(max=1)
    assert reach.all()  # any two tokens within 2 * depth hops
    first_sentence = torch.nonzero(gids[0] == 0).view(-1)  # [SENT] + its 3 tokens
    assert m[first_sentence][:, first_sentence].all() and int(m[first_sentence[1]].sum()) == 4
    flat = P.hierarchical(torch.zeros(7, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))
    assert flat.materialize(7, 7).all()
    q, k, v = random_qkv(2, 2, n, n, 8, dtype=torch.float64)
    assert_close(attnkit.attention(q, k, v, pattern=P.hierarchical(levels, gids), engine="tiled", block_q=4,
                                   block_kv=4),
                 attnkit.attention(q, k, v, pattern=P.hierarchical(levels, gids), engine="reference"))


def test_block_attention_passages_alone_final_block_global_single_block_causal():
    lengths = [5, 7, 4]
    n = sum(lengths)
    q, k, v = random_qkv(1, 2, n, n, 8, dtype=torch.float64)
    out = attnkit.attention(q, k, v, pattern=P.block_attention(lengths), engine="tiled", block_q=4, block_kv=4)
    start = 0
    for length in lengths[:-1]:
        sl = slice(start, start + length)
        assert_close(out[:, :, sl], attnkit.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], pattern=P.causal()))
        start += length
    full = attnkit.attention(q, k, v, pattern=P.causal())
    assert_close(out[:, :, start:], full[:, :, start:])
    assert_close(attnkit.attention(q, k, v, pattern=P.block_attention([n]), engine="tiled"), full)


def test_rerotated_cached_keys_equal_keys_rotated_in_place():
    rope = RotaryEmbedding(8).double()
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    cached = rope(k)  # passage encoded at positions 0..5
    assert_close(V.rerotate(cached, 11, rope), rope(k, offset=11))


def _packed_docs(lengths, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g, dtype=torch.float64) for n in lengths]


@pytest.mark.parametrize("causal", [False, True])
def test_packed_varlen_equals_each_document_alone_with_rope_positions(causal):
    lengths = [5, 1, 9, 6]
    docs = _packed_docs(lengths)
    torch.manual_seed(0)
    mha = MultiheadAttention(16, 2, causal=causal, rotary=True).double()
    x, cu = V.pack(docs)
    x = x[None].requires_grad_(True)
    out = mha(x, cu_seqlens=cu)
    out.square().sum().backward()
    packed_grads = [p.grad.clone() for p in mha.parameters()]
    mha.zero_grad()
    alone = [mha(d[None]) for d in docs]
    for a, b in zip(V.unpack(out[0], cu), alone):
        assert_close(a, b[0])
    sum(t.square().sum() for t in alone).backward()
    for a, p in zip(packed_grads, mha.parameters()):
        assert_close(a, p.grad)  # gradients equal too


def test_varlen_weights_never_cross_documents_and_skip_their_tiles():
    cu = V.cu_seqlens_from_lengths([40, 24, 64])
    q, k, v = random_qkv(1, 2, 128, 128, 8, dtype=torch.float64, requires_grad=True)
    out = attnkit.attention(q, k, v, cu_seqlens=cu, engine="tiled", block_q=16, block_kv=16)
    # outputs of document 0 do not depend on the other documents' keys at all
    grad_k = torch.autograd.grad(out[:, :, :40].sum(), k)[0]
    assert (grad_k[:, :, 40:] == 0).all()
    pattern = V.varlen_pattern(cu)
    cls = pattern.tile_classes(128, 128, 16, 16)
    assert int((cls != P.EMPTY).sum()) == 3 * 3 + 2 * 2 + 4 * 4 - 1  # block 2 holds the end of doc 0 and doc 1
    assert torch.equal(V.position_ids(cu)[38:42], torch.tensor([38, 39, 0, 1]))


def test_cu_seqlens_errors_name_the_argument():
    q, k, v = random_qkv(1, 2, 10, 10, 8)
    for bad in [torch.tensor([0, 4, 9]), torch.tensor([1, 10]), torch.tensor([0.0, 10.0]), torch.tensor([0, 6, 4, 10])]:
        with pytest.raises(ValueError, match="cu_seqlens"):
            attnkit.attention(q, k, v, cu_seqlens=bad)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attnkit.attention(q, k[:, :, :6], v[:, :, :6], cu_seqlens=torch.tensor([0, 6]))


@pytest.mark.parametrize("algorithm", ["spfhp", "nnlshp"])
def test_packing_algorithms_pack_every_sequence_once_within_limits(algorithm):
    if algorithm == "nnlshp":
        pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 21, (300,), generator=g).tolist()
    fn = V.pack_spfhp if algorithm == "spfhp" else V.pack_nnlshp
    packs = fn(lengths, 40, 3)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 40 and len(p) <= 3 for p in packs)
    lower = max(math.ceil(sum(lengths) / 40), math.ceil(len(lengths) / 3))
    assert len(packs) <= 1.15 * lower  # near-optimal on a uniform histogram (the paper: a few % padding)
    # a histogram that pairs perfectly: 8 + 24 = 32, packed without padding
    perfect = [8] * 10 + [24] * 10
    assert all(sum(perfect[i] for i in p) == 32 for p in fn(perfect, 32, 2))


def test_registers_are_inserted_and_stripped():
    x = torch.randn(2, 5, 4)
    reg = torch.randn(3, 4)
    y = V.add_registers(x, reg, after=1)
    assert y.shape == (2, 8, 4) and torch.equal(y[:, 1:4], reg.expand(2, 3, 4))
    assert torch.equal(V.strip_registers(y, 3, after=1), x)


def test_sub_sampled_attention_ratio_one_is_full_and_pools_windows():
    q, k, v = random_qkv(1, 2, 24, 24, 8, dtype=torch.float64)
    assert_close(FV.sub_sampled_attention(q, k, v, 1), attnkit.attention(q, k, v))
    assert_close(FV.sub_sampled_attention(q, k, v, 3, (4, 6)), FV.sub_sampled_attention_reference(q, k, v, 3, (4, 6)))


def test_multihead_attention_head_dim_is_independent_of_num_heads():
    """Bhojanapalli et al.: head_dim >= n lets a head's logit matrix reach rank n even with a narrow model."""
    torch.manual_seed(0)
    mha = MultiheadAttention(8, 4, head_dim=32).double()
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    assert mha(x).shape == (2, 20, 8) and mha.q_proj.weight.shape == (128, 8)
    q = mha._split(mha.q_proj(x), 4)
    kk = mha._split(mha.k_proj(x), 4)
    assert int(torch.linalg.matrix_rank((q @ kk.transpose(-1, -2))[0, 0].double())) <= 8  # rank <= embed_dim
    with pytest.raises(ValueError, match="head_dim"):
        MultiheadAttention(8, 4, head_dim=0)
    wide = MultiheadAttention(32, 4, head_dim=20).double()
    y = torch.randn(1, 20, 32, dtype=torch.float64)
    logits = wide._split(wide.q_proj(y), 4) @ wide._split(wide.k_proj(y), 4).transpose(-1, -2)
    assert int(torch.linalg.matrix_rank(logits[0, 0].double())) == 20


def test_rotary_helper_is_the_one_used():
    assert callable(apply_rotary)


def test_issue16_records_train_through_multihead_attention_and_factories():
    """Attention-kind records through nn.MultiheadAttention (what `attnkit quality` builds), mixers through their
    factory with dim= and causal=; forward and backward at a length that is no multiple of any block."""
    names = ["axial", "halo", "multi_scale_heads", "hepos", "hdt", "block_attention", "varlen", "gsa",
             "standardized_attention", "lssar", "selective_attention", "qk_position", "coca", "gpsa",
             "neural_attention", "karat", "carrier_tokens", "registers", "relational_attention", "gem",
             "multi_head_embedding", "optimised_attention", "efficient_attention", "super_attention"]
    x = torch.randn(2, 36, 32, requires_grad=True)
    for name in names:
        info = attnkit.mechanism_info(name)
        params = dict(info.small_params)
        for causal in ([False, True] if info.causal else [False]):
            if info.kind == "attention":
                layer = MultiheadAttention(32, 2, mechanism=name, causal=causal, max_seq_len=36,
                                           mechanism_kwargs=params or None)
            else:
                layer = info.build(dim=32, causal=causal, **params)
            out = layer(x)
            assert out.shape == x.shape, name
            out.square().mean().backward()
            assert torch.isfinite(x.grad).all(), name
            x.grad = None


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_per_head_patterns_run_head_groups_on_their_own_tiles(kv_heads):
    """Heads with different windows run as separate tiled calls (their own tiles, not the union), GQA included."""
    from attnkit.ops.exact.tiled import _head_groups

    pattern = P.per_head_window([2, 2, 9, None])
    groups = _head_groups(pattern, None, 40, 40, 8, 8, 1, 4)
    assert [g for g, _ in groups] == [[0, 1], [2], [3]]
    q, k, v = random_qkv(2, 4, 40, 40, 8, kv_heads=kv_heads, dtype=torch.float64, requires_grad=True)
    out = attnkit.attention(q, k, v, pattern=pattern, engine="tiled", block_q=8, block_kv=8)
    ref = attnkit.attention(q, k, v, pattern=pattern, engine="reference")
    assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b)


@pytest.mark.parametrize("kv_heads", [6, 3])
def test_hepos_gathered_path_equals_the_head_strided_mask(kv_heads):
    q, k, v = random_qkv(2, 6, 7, 23, 8, kv_heads=kv_heads, dtype=torch.float64)
    for s in (1, 4, 30):
        assert_close(FV.head_strided_attention(q, k, v, s),
                     attnkit.attention(q, k, v, pattern=P.head_strides(s), engine="reference"))


@pytest.mark.parametrize("shape,axis", [((3, 5), 0), ((2, 3, 4), 1), ((4, 2, 3), 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_axial_and_varlen_dense_paths_equal_their_patterns(shape, axis, causal):
    n = math.prod(shape)
    q, k, v = random_qkv(2, 4, n, n, 8, kv_heads=2, dtype=torch.float64)
    assert_close(V.axial_attention(q, k, v, shape, axis, causal=causal),
                 attnkit.attention(q, k, v, pattern=P.axial(shape, axis, causal=causal), engine="reference"))
    cu = V.cu_seqlens_from_lengths([3, n - 7, 4])
    assert_close(V.varlen_attention(q, k, v, cu, causal=causal),
                 attnkit.attention(q, k, v, cu_seqlens=cu, pattern=P.causal() if causal else None,
                                   engine="reference"))


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_axial_on_a_strided_axis_moves_lines_together_with_gradients(causal):
    pattern = P.axial((4, 3, 5), 0, causal=causal)
    q, k, v = random_qkv(2, 4, 60, 60, 8, kv_heads=2, dtype=torch.float64, requires_grad=True)
    for norm in ("softmax", "softplus"):
        out = attnkit.attention(q, k, v, pattern=pattern, normalization=norm, engine="tiled", block_q=4, block_kv=4)
        ref = attnkit.attention(q, k, v, pattern=pattern, normalization=norm, engine="reference")
        assert_close(out, ref)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            assert_close(a, b)


@pytest.mark.parametrize("shape,block,size", [((8, 8), 4, 1), ((6, 9), 3, 2), ((4, 6, 2), (2, 3, 1), (1, 1, 0))])
def test_halo_runs_block_major_with_exact_block_tiles(shape, block, size):
    pattern = P.halo(shape, block, size)
    bm = P._HaloBlockMajor(pattern)
    n = math.prod(shape)
    for mult in (1, 2, 3):
        t = bm.area * mult
        assert torch.equal(bm.tile_classes(n, n, t, t), _classify_by_evaluation(bm, n, n, t, t, 1, 1, None))
    q, k, v = random_qkv(2, 4, n, n, 8, kv_heads=2, dtype=torch.float64, requires_grad=True)
    out = attnkit.attention(q, k, v, pattern=pattern, engine="tiled")
    ref = attnkit.attention(q, k, v, pattern=pattern, engine="reference")
    assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b)


def test_bad_cu_seqlens_and_lengths_are_our_errors_everywhere():
    """Issue 28: non-monotone offsets reached ``narrow()`` (unpack) and ``repeat_interleave`` (segment / position
    ids) with torch's messages; fractional lengths were truncated."""
    bad = torch.tensor([0, 6, 4, 10])
    for fn in (lambda: V.unpack(torch.randn(10, 3), bad), lambda: V.segment_ids(bad),
               lambda: V.position_ids(bad), lambda: V.unpack(torch.randn(10, 3), torch.tensor([0, 6, 12]))):
        with pytest.raises(ValueError, match="cu_seqlens must start at 0, be non-decreasing"):
            fn()
    with pytest.raises(ValueError, match="lengths must be whole numbers"):
        V.cu_seqlens_from_lengths([1.5, 2])
    assert V.cu_seqlens_from_lengths([1, 2]).tolist() == [0, 1, 3]
    assert [t.shape[0] for t in V.unpack(torch.randn(10, 3), torch.tensor([0, 4, 10]))] == [4, 6]
