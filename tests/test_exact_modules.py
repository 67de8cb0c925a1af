"""Score modifiers, normalisations and modules of issue 16 (catalogue C3-C21, B11, B12): the papers' invariants."""

import math

import pytest
import torch

import attnkit
from attnkit import nn as ann
from attnkit import normalizations as N
from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit.ops.exact.reference import attention_weights
from attnkit.ops.exact.tiled import tiled_attention
from attnkit.testing import assert_close, random_qkv


def _entropy(w):
    return -(w * torch.log(w.clamp_min(1e-300))).sum(-1)


# -- C3 softplus with length scale and re-weighting ----------------------------------------------------------

def test_lssa_rows_sum_to_one_and_reduce_to_plain_softplus():
    q, k, _ = random_qkv(1, 2, 12, 12, 8, dtype=torch.float64)
    w = attention_weights(q, k, pattern=P.causal(), score_mod=S.length_scale(16.0), normalization=N.softplus(2.0),
                          scale=8 ** -0.5)
    assert_close(w.sum(-1), torch.ones(1, 2, 12, dtype=torch.float64))
    plain = attention_weights(q, k, pattern=None, score_mod=None, normalization=N.softplus(), scale=8 ** -0.5)
    # lambda = 1 at n = base (per_row=False, base = kv_len) and no re-weighting: plain softplus attention
    same = attention_weights(q, k, pattern=None, score_mod=S.length_scale(12.0, per_row=False),
                             normalization=N.softplus(1.0), scale=8 ** -0.5)
    assert_close(same, plain)


def test_lssar_re_weighting_keeps_the_argmax_and_never_raises_entropy():
    q, k, _ = random_qkv(2, 2, 10, 10, 8, dtype=torch.float64)
    base = attention_weights(q, k, pattern=None, score_mod=None, normalization=N.softplus(), scale=0.5)
    for p in (1.5, 2.0, 4.0):
        sharp = attention_weights(q, k, pattern=None, score_mod=None, normalization=N.softplus(p), scale=0.5)
        assert torch.equal(sharp.argmax(-1), base.argmax(-1))
        assert (_entropy(sharp) <= _entropy(base) + 1e-12).all()
        base = sharp
    with pytest.raises(ValueError, match="power"):
        N.softplus(0.5)


def _lssar_from_the_paper(q, k, v, base, power, causal):
    """LSSA(R) written from the paper (Gao & Spratling, 2025, Sec. 3): logits ``lambda_i * q_i.k_j / sqrt(d)`` with
    ``lambda_i = log(n_i) / log(base)``, ``n_i`` the number of keys row i attends; ``softplus`` then l1
    normalisation over those keys; re-weighting ``w^p / sum w^p``. Float64, one row at a time."""
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for i in range(n):
        keys = (m - n + i + 1) if causal else m
        lam = math.log(keys) / math.log(base)
        s = (q[..., i:i + 1, :] @ k[..., :keys, :].transpose(-1, -2)) * d ** -0.5
        w = torch.nn.functional.softplus(lam * s)
        w = w / w.sum(-1, keepdim=True)
        w = w ** power / (w ** power).sum(-1, keepdim=True)
        out[..., i:i + 1, :] = w @ v[..., :keys, :]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_lssar_record_matches_the_paper_with_the_length_of_each_row(causal):
    # Issue 25, defect 1: the non-causal record scaled row i by log(i + 1) although every row sees all n keys
    # (row 0 got lambda = 0, uniform weights). The reference here is written from the paper, not from the score mod.
    q, k, v = random_qkv(1, 2, 20, 20, 8, dtype=torch.float64, seed=3)
    q, k = q * 3, k * 3
    got = attnkit.get("lssar", causal=causal, base=16.0, power=2.0)(q, k, v)
    assert_close(got, _lssar_from_the_paper(q, k, v, 16.0, 2.0, causal))


def test_length_scale_grows_with_the_row_length():
    mod = S.length_scale(4.0)
    s = torch.ones(1, 1, 16, 16)
    qi, kj = torch.arange(16).view(1, 1, -1, 1), torch.arange(16).view(1, 1, 1, -1)
    out = mod(s, None, None, qi, kj, 16, 16)[0, 0, :, 0]
    assert out[3] == pytest.approx(1.0) and out[15] == pytest.approx(2.0)  # n = 4 -> 1, n = 16 -> log_4 16 = 2


# -- C4 standardised attention --------------------------------------------------------------------------------

def test_standardized_weights_have_zero_mean_unit_variance_over_visible_keys():
    q, k, _ = random_qkv(1, 2, 9, 9, 8, dtype=torch.float64)
    w = attention_weights(q, k, pattern=P.causal(), score_mod=None, normalization=N.standardize(eps=1e-12),
                          scale=8 ** -0.5)
    vis = P.causal().materialize(9, 9)[0, 0]
    for i in range(1, 9):
        row = w[0, :, i][:, vis[i]]
        assert_close(row.mean(-1), torch.zeros(2, dtype=torch.float64), scale=1e4)
        assert_close(row.square().mean(-1), torch.ones(2, dtype=torch.float64), scale=1e4)
        assert (w[0, :, i][:, ~vis[i]] == 0).all()


def test_standardized_is_invariant_to_row_shifts_and_positive_scaling():
    q, k, v = random_qkv(1, 2, 11, 11, 8, dtype=torch.float64)
    norm = N.standardize(eps=1e-12)
    out = attnkit.attention(q, k, v, normalization=norm)
    shift = S.custom(lambda s, b, h, qi, kj: 3.0 * s + qi.to(s.dtype) * 0.7 - 5.0)  # per-row affine map
    assert_close(attnkit.attention(q, k, v, normalization=norm, score_mod=shift), out, scale=1e4)


@pytest.mark.parametrize("pattern", [None, P.causal(), P.sliding_window(4), ~P.causal()], ids=repr)
def test_two_pass_tiled_statistics_equal_the_dense_reference_with_many_steps_per_row(pattern):
    """Small tiles force every row across many steps: the streaming statistics must still be exact."""
    q, k, v = random_qkv(2, 2, 45, 45, 8, dtype=torch.float64, requires_grad=True)
    norm = N.standardize(gain=1.3)
    out = tiled_attention(q, k, v, pattern=pattern, score_mod=S.kerple_log(2).double(), normalization=norm,
                          scale=8 ** -0.5, block_q=8, block_kv=8, tile_elements=2 * 2 * 8 * 8 * 2)
    ref = attnkit.attention(q, k, v, pattern=pattern, score_mod=S.kerple_log(2).double(), normalization=norm,
                            engine="reference")
    assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b)


def test_standardized_gradcheck_and_half_precision():
    q, k, v = random_qkv(1, 1, 6, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: attnkit.attention(a, b, c, normalization="standardize", pattern=P.causal(), block_q=4,
                                          block_kv=4), (q, k, v))
    for dt in (torch.float16, torch.bfloat16):
        qh, kh, vh = (t.detach().to(dt) for t in (q, k, v))
        out = attnkit.attention(qh, kh, vh, normalization="standardize")
        assert out.dtype == dt
        assert_close(out, attnkit.attention(q, k, v, normalization="standardize", engine="reference"), dtype=dt,
                     scale=4)


# -- C6 selective attention -----------------------------------------------------------------------------------

def test_selective_attention_starts_as_plain_attention_and_sharpens_with_position():
    q, k, v = random_qkv(1, 2, 16, 16, 8, dtype=torch.float64)
    m = ann.SelectiveAttention(2, 8, causal=True).double()
    assert_close(m(q, k, v), attnkit.attention(q, k, v, pattern=P.causal()))
    with torch.no_grad():
        m.alpha.fill_(0.5)
    tau, _ = m.temperatures(q, v, 16)
    assert (tau[..., 1:] > tau[..., :-1]).all()  # position part grows with the query position
    # the score-modifier form s * (1 + alpha log(1 + p)) is the same operator
    mod = S.position_temperature(2, 0.5).double()
    w_mod = attention_weights(q, k, pattern=P.causal(), score_mod=mod, normalization=N.softmax(), scale=8 ** -0.5)
    w0 = attention_weights(q, k, pattern=P.causal(), score_mod=None, normalization=N.softmax(), scale=8 ** -0.5)
    assert torch.equal(w_mod.argmax(-1), w0.argmax(-1)) and (_entropy(w_mod) <= _entropy(w0) + 1e-12).all()
    assert_close(m(q, k, v), m.reference(q, k, v))


# -- C8 query-key-position interaction -----------------------------------------------------------------------

def test_qk_position_zero_table_is_standard_and_tiled_gradients_match_reference():
    q, k, v = random_qkv(1, 2, 13, 13, 8, dtype=torch.float64, requires_grad=True)
    m = ann.QueryKeyPositionAttention(2, 8, max_distance=3, causal=True).double()
    with torch.no_grad():
        saved = m.table.clone()
        m.table.zero_()
    assert_close(m(q, k, v), attnkit.attention(q, k, v, pattern=P.causal()))
    with torch.no_grad():
        m.table.copy_(saved)
    out, ref = m(q, k, v), m.reference(q, k, v)
    g = torch.randn_like(out)
    params = (q, k, v, m.table)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert_close(a, b)


def test_qk_position_depends_on_relative_positions_only():
    m = ann.QueryKeyPositionAttention(1, 4, max_distance=2).double()
    q, k, v = random_qkv(1, 1, 5, 5, 4, dtype=torch.float64)
    out = m(q, k, v)
    # prepend unrelated tokens as keys only after the queries are decoded at the end: relative offsets unchanged
    k2 = torch.cat([torch.randn(1, 1, 3, 4, dtype=torch.float64), k], 2)
    v2 = torch.cat([torch.zeros(1, 1, 3, 4, dtype=torch.float64), v], 2)
    pattern_free = m(q, k2[:, :, 3:], v2[:, :, 3:])
    assert_close(pattern_free, out)


# -- C9 CoCA --------------------------------------------------------------------------------------------------

def test_coca_factored_form_equals_naive_and_single_plane_is_monotone():
    q, k, v = random_qkv(2, 2, 9, 9, 8, dtype=torch.float64, requires_grad=True)
    out = ann.coca_attention(q, k, v, causal=True)
    ref = ann.coca_reference(q, k, v, causal=True)
    assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b)
    # one plane (dim 2, theta = 1 rad), t_j = 1: s_3j = ||q||^2 cos(3 - j) / sqrt(2) rises as the key nears the
    # query, so with v = identity the weights (one query at position 3) are increasing in j
    w = ann.coca_attention(torch.ones(1, 1, 1, 2, dtype=torch.float64), torch.ones(1, 1, 4, 2, dtype=torch.float64),
                           torch.eye(4, dtype=torch.float64).view(1, 1, 4, 4))[0, 0, 0]
    assert (w[1:] > w[:-1]).all()


# -- C10 GPSA -------------------------------------------------------------------------------------------------

def test_gpsa_gate_limits_and_rows_sum_to_one():
    q, k, v = random_qkv(1, 4, 16, 16, 8, dtype=torch.float64)
    m = ann.GatedPositionalAttention(4, shape=(4, 4)).double()
    assert_close(m.weights(q, k).sum(-1), torch.ones(1, 4, 16, dtype=torch.float64))
    assert_close(m(q, k, v), m.reference(q, k, v))
    with torch.no_grad():
        m.gate.fill_(-60.0)
    assert_close(m(q, k, v), attnkit.attention(q, k, v))  # sigmoid(gate) = 0: content only
    strong = ann.GatedPositionalAttention(4, shape=(4, 4), locality_strength=40.0).double()
    with torch.no_grad():
        strong.gate.fill_(60.0)
    w = strong.weights(q, k)[0]
    centres = [(h // 2 - 1, h % 2 - 1) for h in range(4)]
    i = 5  # (1, 1): every head's offset stays inside the 4 x 4 grid
    for h, (d1, d2) in enumerate(centres):
        j = (1 + d1) * 4 + (1 + d2)
        assert w[h, i, j] > 0.99  # one tap of a convolution at offset Delta_h


# -- C12 neural attention, C13 KArAt --------------------------------------------------------------------------

def test_neural_attention_bilinear_special_case_is_dot_product_attention():
    d = 8
    m = ann.NeuralAttention(d, hidden=d, chunk=5, activation="identity").double()
    with torch.no_grad():
        m.w_q.zero_()
        m.w_k.zero_()
        m.w_p.copy_(torch.eye(d))
        m.w2.fill_(d ** -0.5)
    q, k, v = random_qkv(1, 2, 13, 13, d, dtype=torch.float64)
    assert_close(m(q, k, v), attnkit.attention(q, k, v))


def test_neural_attention_chunked_equals_materialised_with_gradients():
    m = ann.NeuralAttention(8, hidden=6, chunk=4, causal=True).double()
    q, k, v = random_qkv(1, 2, 11, 11, 8, dtype=torch.float64, requires_grad=True)
    out, ref = m(q, k, v), m.reference(q, k, v)
    assert_close(out, ref)
    params = (q, k, v, *m.parameters())
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert_close(a, b)


def test_karat_at_initialisation_is_close_to_softmax():
    m = ann.KolmogorovArnoldAttention(2, grid=8, chunk=5).double()
    q, k, v = random_qkv(1, 2, 12, 12, 8, dtype=torch.float64)
    q, k = q * 0.6, k * 0.6  # logits inside the fitted range [-2, 2]
    assert float((q @ k.transpose(-1, -2) / 8 ** 0.5).abs().max()) < 2
    assert_close(m(q, k, v), attnkit.attention(q, k, v), dtype=torch.bfloat16)


# -- B11 carrier tokens, B12 registers ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [24, 37, 5])
def test_carrier_tokens_block_sparse_equals_window_loop(n):
    torch.manual_seed(0)
    m = ann.CarrierTokenAttention(16, 2, window=6, carriers=2).double()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    assert_close(m(x), m.reference(x))


def test_one_window_covering_everything_is_full_attention_over_tokens_and_carriers():
    torch.manual_seed(0)
    m = ann.CarrierTokenAttention(16, 2, window=10, carriers=2).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    ct = m.carrier_tokens(x)[:, 0]
    full = m.local_attn(torch.cat([x, ct], dim=1))[:, :10]
    assert_close(m(x), full)


def test_registers_zero_reproduce_the_base_layer_and_patches_are_equivariant():
    torch.manual_seed(0)
    m = ann.RegisterAttention(16, 2, num_registers=0).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert_close(m(x), m.attn(x))
    m4 = ann.RegisterAttention(16, 2, num_registers=4).double()
    perm = torch.randperm(9)
    assert_close(m4(x[:, perm]), m4(x)[:, perm])


# -- C14 Point Transformer ------------------------------------------------------------------------------------

def test_point_transformer_is_permutation_equivariant_and_translation_invariant():
    torch.manual_seed(0)
    m = ann.PointTransformerLayer(8, k=5).double()
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    pos = torch.rand(2, 20, 3, dtype=torch.float64)
    out = m(x, pos)
    perm = torch.randperm(20)
    assert_close(m(x[:, perm], pos[:, perm]), out[:, perm])
    assert_close(m(x, pos + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)), out)
    assert_close(out, m.reference(x, pos))


# -- C15-C19, C21 ---------------------------------------------------------------------------------------------

def test_relational_attention_without_relations_and_value_symbols_is_standard_attention():
    torch.manual_seed(0)
    m = ann.RelationalAttention(16, 2, relations=3, rel_dim=4, causal=True).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    assert_close(m(x), m.reference(x))
    with torch.no_grad():
        m.w_r.weight.zero_()
    q = m.q(x).view(2, 10, 2, 8).transpose(1, 2)
    k = m.k(x).view(2, 10, 2, 8).transpose(1, 2)
    v = m.w_s(x).view(2, 10, 2, 8).transpose(1, 2)
    want = attnkit.attention(q, k, v, pattern=P.causal()).transpose(1, 2).reshape(2, 10, 16)
    assert_close(m(x), want)


def test_gem_scores_are_symmetric_and_identical_tokens_pass_through():
    torch.manual_seed(0)
    m = ann.GEMSelfSelfAttention(16, 2, iterations=2).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    assert_close(m(x), m.reference(x))
    p = torch.nn.functional.normalize(torch.randn(7, 8, dtype=torch.float64), dim=-1)
    s = p @ p.T
    assert_close(s, s.T)
    same = x[:, :1].expand(1, 7, 16)
    out = m(same)
    v = m.qkv(same)[..., 32:]
    assert_close(out, m.out(v))  # uniform attention over equal values returns the value


def test_luke_with_four_equal_queries_is_standard_attention():
    torch.manual_seed(0)
    m = ann.EntityAwareAttention(16, 2).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    types = torch.tensor([[0, 1, 0, 0, 1, 1, 0, 0, 1]] * 2)
    assert_close(m(x, types), m.reference(x, types))
    with torch.no_grad():
        for lin in m.queries[1:]:
            lin.load_state_dict(m.queries[0].state_dict())
    mha_like = attnkit.attention(m.queries[0](x).view(2, 9, 2, 8).transpose(1, 2),
                                 m.k(x).view(2, 9, 2, 8).transpose(1, 2), m.v(x).view(2, 9, 2, 8).transpose(1, 2))
    assert_close(m(x, types), m.out(mha_like.transpose(1, 2).reshape(2, 9, 16)))


def test_multi_head_embeddings_parameter_count_and_zero_embeddings():
    d, h = 16, 4
    m = ann.MultiHeadEmbeddingAttention(d, h).double()
    attn_params = sum(p.numel() for name, p in m.named_parameters() if not name.startswith("out"))
    assert attn_params == 3 * d * d + 3 * h * d
    with torch.no_grad():
        m.emb.zero_()
    x = torch.randn(1, 6, d, dtype=torch.float64)
    q, k, v = m._project(x)
    heads = attnkit.attention(q, k, v)
    assert all(torch.equal(heads[:, 0], heads[:, i]) for i in range(h))
    assert_close(m(x), m.reference(x))


def test_optimised_attention_folds_a_block_diagonal_value_projection_exactly():
    """Optimised attention with W_O'_h = B_h W_O_h reproduces MHA whose head h reads V_h = X_h B_h."""
    torch.manual_seed(0)
    d, h = 16, 2
    dh = d // h
    opt = ann.PayBetterAttention(d, h, variant="optimised").double()
    blocks = [torch.randn(dh, dh, dtype=torch.float64) for _ in range(h)]
    x = torch.randn(2, 7, d, dtype=torch.float64)
    q = opt.w_q(x).view(2, 7, h, dh).transpose(1, 2)
    k = opt.w_k(x).view(2, 7, h, dh).transpose(1, 2)
    xh = x.view(2, 7, h, dh).transpose(1, 2)
    v = torch.stack([xh[:, i] @ blocks[i] for i in range(h)], 1)
    wo = torch.randn(d, d, dtype=torch.float64)
    mha = attnkit.attention(q, k, v).transpose(1, 2).reshape(2, 7, d) @ wo.T
    folded = torch.block_diag(*blocks) @ wo.T  # the merged map, block by block
    with torch.no_grad():
        opt.w_o.weight.copy_(folded.T)
        opt.w_o.bias.zero_()
    assert_close(opt(x), mha)
    eff = ann.PayBetterAttention(d, h, variant="efficient")
    assert sum(p.numel() for p in eff.parameters()) == 2 * d * d + d  # half of MHA's 4 d^2 (plus the bias)


def test_super_attention_is_causal_with_a_lower_triangular_mixer():
    torch.manual_seed(0)
    m = ann.PayBetterAttention(16, 2, variant="super", causal=True, seq_len=12).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    out = m(x)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(1, 4, 16, dtype=torch.float64)
    assert_close(m(x2)[:, :8], out[:, :8])
    with pytest.raises(ValueError, match="seq_len"):
        ann.PayBetterAttention(16, 2, variant="super")


@pytest.mark.parametrize("causal", [False, True])
def test_super_attention_keeps_the_key_projection_and_matches_the_papers_rule(causal):
    """Super attention (arXiv 2403.01643v2, abstract: one fewer matmul per head and 25% fewer parameters than SDPA,
    values transformed from the left): out = W^O concat_h softmax(X W^Q_h (X W^K_h)^T / sqrt(d_h)) (W^A X)_h,
    W^A shared by the heads and lower-triangular under the causal mask. Written here in float64 from the rule."""
    torch.manual_seed(0)
    d, h, n = 16, 2, 9
    dh = d // h
    m = ann.PayBetterAttention(d, h, variant="super", causal=causal, seq_len=n).double()
    # the projections: W^Q, W^K, W^O (3/4 of MHA's 4 d^2, plus W^O's bias) and the shared W^A [n, n]
    assert sum(p.numel() for p in m.parameters()) == 3 * d * d + d + n * n
    x = torch.randn(2, n, d, dtype=torch.float64)
    wa = torch.tril(m.w_a) if causal else m.w_a
    mixed = torch.einsum("ij,bjc->bic", wa, x)  # W^A X: along the sequence, from the left
    heads = []
    for i in range(h):
        sl = slice(i * dh, (i + 1) * dh)
        q = x @ m.w_q.weight[sl].T
        k = x @ m.w_k.weight[sl].T
        s = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(torch.softmax(s, -1) @ mixed[..., sl])
    want = torch.cat(heads, -1) @ m.w_o.weight.T + m.w_o.bias
    assert_close(m(x), want)
    assert_close(m.reference(x), want)


def test_low_rank_context_pooling_weights_sum_to_one_and_match_explicit_pooling():
    torch.manual_seed(0)
    m = ann.LowRankContextPooling(16, 3, rank=4).double()
    h = torch.randn(2, 11, 16, dtype=torch.float64)
    w = m.weights(h)
    assert_close(w.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert_close(m(h), torch.einsum("brn,bnd->brd", w, h))
    short = m(h, lengths=torch.tensor([11, 5]))
    assert_close(short[1], m(h[1:, :5])[0])


def test_sub_sampled_attention_ratio_one_with_identity_reduction_is_full_attention():
    torch.manual_seed(0)
    m = ann.SubSampledAttention(8, 2, ratio=1, shape=(3, 4)).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    with torch.no_grad():
        m.reduce.weight.copy_(torch.eye(8, dtype=torch.float64).view(8, 8, 1, 1))
        m.reduce.bias.zero_()
    m.norm = torch.nn.Identity()
    q = m.q(x).view(2, 12, 2, 4).transpose(1, 2)
    k, v = (t.view(2, 12, 2, 4).transpose(1, 2) for t in m.kv(x).chunk(2, dim=-1))
    want = m.out(attnkit.attention(q, k, v).transpose(1, 2).reshape(2, 12, 8))
    assert_close(m(x), want)
    m3 = ann.SubSampledAttention(8, 2, ratio=3).double()
    x = torch.randn(1, 20, 8, dtype=torch.float64)  # 4 x 5 grid, padded to 6 x 6 windows
    assert_close(m3(x), m3.reference(x))


def test_point_transformer_neighbours_break_ties_by_index():
    # Grid coordinates tie often; topk chose among equal distances differently on CUDA and CPU (issue 23: 2,521 of
    # 65,536 elements off on an H200). The k nearest by (distance, index) are the same set on every device.
    from attnkit.nn.exact import PointTransformerLayer

    g = torch.Generator().manual_seed(0)
    pos = (torch.randint(0, 8, (2, 96, 3), generator=g) / 4).float()
    layer = PointTransformerLayer(8, k=16)
    got = layer.neighbours(pos)
    d = (pos[:, :, None] - pos[:, None]).square().sum(-1)
    for b in range(2):
        for i in range(96):
            want = sorted(range(96), key=lambda j: (float(d[b, i, j]), j))[:16]
            assert got[b, i].tolist() == want
