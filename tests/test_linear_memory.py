"""Test-time-training layers (TTT-Linear / TTT-MLP) and retention: forms agree, the papers' invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.ops.linear.gated import delta_rule_attention
from attnkit.ops.linear.ttt import ttt, ttt_reference
from attnkit.testing import assert_close, random_qkv

F64 = torch.float64


def _qkv_eta(n=21, seed=0, heads=3):
    q, k, v = (t * 0.5 for t in random_qkv(2, heads, n, dim=8, dim_v=6, dtype=F64, seed=seed))
    eta = 0.1 * torch.rand(2, heads, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return q, k, v, eta


@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("mini_batch", [1, 4, 16, 40])
def test_ttt_dual_and_primal_equal_the_autograd_inner_loop(model, mini_batch):
    q, k, v, eta = _qkv_eta()
    ref = ttt_reference(q, k, v, eta, model=model, mini_batch=mini_batch)
    for form in ("dual", "primal"):
        assert_close(ttt(q, k, v, eta, model=model, mini_batch=mini_batch, form=form), ref, msg=form)


@pytest.mark.parametrize("mini_batch", [1, 5, 30])
def test_ttt_linear_with_layer_norm_dual_and_primal_equal_autograd(mini_batch):
    """The paper's TTT-Linear f(x) = x + LN(x W): the analytic LN gradient in the dual and primal forms equals
    autograd's, from a non-zero W_0 and with learned LN parameters."""
    q, k, v, eta = _qkv_eta(seed=8)
    v = v[..., :4].repeat(1, 1, 1, 2)  # d_v = d_k for the residual
    g = torch.Generator().manual_seed(9)
    ln = (torch.rand(3, 8, generator=g, dtype=F64) + 0.5, 0.1 * torch.randn(3, 8, generator=g, dtype=F64))
    w0 = (0.3 * torch.randn(2, 3, 8, 8, generator=g, dtype=F64),)
    ref = ttt_reference(q, k, v, eta, model="linear_ln", mini_batch=mini_batch, ln=ln, initial_state=w0)
    for form in ("dual", "primal"):
        out = ttt(q, k, v, eta, model="linear_ln", mini_batch=mini_batch, form=form, ln=ln, initial_state=w0)
        assert_close(out, ref, msg=form)
    with pytest.raises(ValueError, match="d_v must equal d_k"):
        ttt(q, k, v[..., :6], eta, model="linear_ln")


def test_ttt_linear_online_is_the_delta_rule():
    """Mini-batch 1: W_t = W_{t-1} - 2 eta k (k^T W - v)^T is the delta rule with beta = 2 eta."""
    q, k, v, eta = _qkv_eta(seed=2)
    assert_close(ttt(q, k, v, eta, mini_batch=1), delta_rule_attention(q, k, v, 2 * eta))


def test_ttt_linear_full_batch_one_step_is_linear_attention():
    """D23 test 1: a linear inner model, one full-batch step from W_0 = 0, is 2 eta (Q K^T) V."""
    q, k, v, _ = _qkv_eta(seed=3)
    assert_close(ttt(q, k, v, 0.3, causal=False), 0.6 * (q @ k.transpose(-1, -2)) @ v)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_ttt_state_carries_across_calls_at_mini_batch_boundaries(model):
    q, k, v, eta = _qkv_eta(n=24, seed=4)
    full, w_full = ttt(q, k, v, eta, model=model, mini_batch=8, return_state=True)
    a, w = ttt(q[:, :, :16], k[:, :, :16], v[:, :, :16], eta[:, :, :16], model=model, mini_batch=8,
               return_state=True)
    b, w2 = ttt(q[:, :, 16:], k[:, :, 16:], v[:, :, 16:], eta[:, :, 16:], model=model, mini_batch=8,
                initial_state=w, return_state=True)
    assert_close(torch.cat([a, b], dim=2), full)
    for x, y in zip(w2, w_full):
        assert_close(x, y)


def test_ttt_gradients_and_bad_input():
    q, k, v, eta = (t[:1, :1].detach().requires_grad_(True) for t in _qkv_eta(n=6, seed=5))
    assert torch.autograd.gradcheck(lambda q, k, v, e: ttt(q, k, v, e, model="mlp", mini_batch=4, hidden=3),
                                    (q, k, v, eta))
    with pytest.raises(ValueError, match="model"):
        ttt(q, k, v, eta, model="rnn")
    with pytest.raises(ValueError, match="eta"):
        ttt(q, k, v, eta[..., :2])
    with pytest.raises(ValueError, match="mini_batch"):
        ttt(q, k, v, eta, mini_batch=0)


@pytest.mark.parametrize("causal", [True, False])
def test_retention_parallel_recurrent_chunked_agree(causal):
    """RetNet's dual form: the parallel, recurrent and chunked forms of one layer are the same function."""
    from attnkit.nn import RetentionLayer
    from attnkit.nn.linear import retention_reference

    x = torch.randn(2, 37, 32, dtype=F64, generator=torch.Generator().manual_seed(6))
    outs = []
    for mode in ("parallel", "chunked", "recurrent"):
        torch.manual_seed(0)
        layer = RetentionLayer(32, 4, mode=mode, causal=causal, chunk_size=8).double()
        outs.append(layer(x))
    for o in outs[1:]:
        assert_close(o, outs[0])
    assert_close(outs[0], retention_reference(layer, x))


def _retnet_from_the_paper(layer, x):
    """RetNet eq. 3-5 with complex numbers: ``Q = (X W_Q) Theta``, ``K = (X W_K) conj(Theta)``, ``Theta_n =
    e^(i n theta)``, ``theta_c = 10000^(-2c/d)``; retention ``Re(Q K^dagger) / sqrt(d) * D`` (causal), then
    GroupNorm, swish gate, output projection. Channel pair ``(c, c + d/2)`` is one complex component."""
    q, k, v = (layer._heads(t) for t in layer.qkv(x).chunk(3, dim=-1))
    n, d = x.shape[1], layer.head_dim
    h = d // 2
    theta = 10000.0 ** (-2 * torch.arange(h, dtype=F64) / d)
    rot = torch.exp(1j * torch.arange(n, dtype=F64)[:, None] * theta[None])  # [n, d/2]
    zq = torch.complex(q[..., :h], q[..., h:]) * rot
    zk = torch.complex(k[..., :h], k[..., h:]) * rot
    scores = (zq @ zk.conj().transpose(-1, -2)).real * d ** -0.5
    i = torch.arange(n, dtype=F64)
    rel = i[:, None] - i[None, :]
    gam = layer.decays.to(F64)[:, None, None]
    dmat = torch.where(rel >= 0, gam ** rel.clamp_min(0), torch.zeros((), dtype=F64))
    ret = (scores * dmat) @ v
    y = layer.norm(ret.transpose(1, 2).reshape(-1, layer.dim)).view(x.shape[0], n, layer.dim)
    return layer.out_proj(torch.nn.functional.silu(layer.gate(x)) * y)


@pytest.mark.parametrize("mode", ["parallel", "chunked", "recurrent"])
def test_retention_applies_retnet_theta_rotation_by_default(mode):
    # Issue 25, defect 6: RetentionLayer omitted the xPos / Theta rotation of RetNet's Q and K. On by default;
    # every form, and a state carried across calls, must equal the paper's complex-valued parallel form.
    from attnkit.nn import RetentionLayer

    x = torch.randn(2, 29, 32, dtype=F64, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    layer = RetentionLayer(32, 4, mode=mode, chunk_size=8).double()
    ref = _retnet_from_the_paper(layer, x)
    assert_close(layer(x), ref)
    a, s = layer(x[:, :17], return_state=True)
    b = layer(x[:, 17:], state=s)
    assert_close(torch.cat([a, b], dim=1), ref)
    plain = RetentionLayer(32, 4, mode=mode, chunk_size=8, xpos=False).double()
    plain.load_state_dict(layer.state_dict())
    assert (plain(x) - ref).abs().max() > 1e-3  # the rotation changes the output
    with pytest.raises(ValueError, match="theta_base"):
        RetentionLayer(32, 4, theta_base=1.0)


def test_retention_state_carry_and_unit_decay():
    from attnkit.nn import RetentionLayer

    x = torch.randn(1, 30, 16, dtype=F64, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    layer = RetentionLayer(16, 2, chunk_size=8).double()
    full = layer(x)
    a, s = layer(x[:, :20], return_state=True)
    b, _ = layer(x[:, 20:], state=s, return_state=True)
    assert_close(torch.cat([a, b], dim=1), full)
    # D20 test 2: gamma = 1 is unnormalised causal linear attention (identity map)
    from attnkit import linear_attention

    layer1 = RetentionLayer(16, 2, decays=[1.0, 1.0]).double()
    q, k, v = (layer1._heads(t) for t in layer1.qkv(x).chunk(3, dim=-1))
    assert_close(layer1.retention(q, k, v), linear_attention(q, k * 8**-0.5, v, causal=True,
                                                             feature_map="identity", normalize="none"))


# -- Titans --------------------------------------------------------------------------------------------------


def _titans_case(n=21, seed=10):
    q, k, v = (t * 0.5 for t in random_qkv(2, 3, n, dim=8, dtype=F64, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    theta, eta, alpha = (torch.rand(2, 3, n, generator=g, dtype=F64) * s for s in (0.2, 1.0, 0.3))
    return q, k, v, theta, eta, alpha


@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("chunk", [1, 4, 16, 30])
def test_titans_chunk_parallel_equals_sequential_updates(model, chunk):
    """D24 test 1: the parallel (matrix) form over chunks equals the token-by-token updates with gradients taken
    at the chunk-start memory (chunk 1: the exact sequential rule)."""
    from attnkit.ops.linear.titans import titans_memory, titans_memory_reference

    args = _titans_case()
    ref, (m_ref, s_ref) = titans_memory_reference(*args, model=model, chunk_size=chunk, return_state=True)
    out, (m, s) = titans_memory(*args, model=model, chunk_size=chunk, return_state=True)
    assert_close(out, ref)
    for a, b in zip(m + s, m_ref + s_ref):
        assert_close(a, b)


def test_titans_linear_memory_without_momentum_or_forgetting_is_the_delta_rule():
    """D24 test 2: a linear memory with eta = alpha = 0 takes delta-rule steps M <- M - 2 theta (M k - v) k^T."""
    from attnkit.ops.linear.titans import titans_memory

    q, k, v, theta, _, _ = _titans_case(seed=12)
    out = titans_memory(q, k, v, theta, 0.0, 0.0, model="linear", chunk_size=1)
    assert_close(out, delta_rule_attention(q, k, v, 2 * theta))


def test_titans_state_carries_and_forgetting_erases():
    from attnkit.ops.linear.titans import titans_memory

    q, k, v, theta, eta, alpha = _titans_case(n=24, seed=13)
    full, st_full = titans_memory(q, k, v, theta, eta, alpha, chunk_size=8, return_state=True)
    a, st = titans_memory(*(t[:, :, :16] for t in (q, k, v, theta, eta, alpha)), chunk_size=8, return_state=True)
    b = titans_memory(*(t[:, :, 16:] for t in (q, k, v, theta, eta, alpha)), chunk_size=8, initial_state=st)
    assert_close(torch.cat([a, b], dim=2), full)
    # alpha = 1 forgets the past memory at every step and eta = 0 keeps no momentum: with every gradient taken
    # at M_0 = 0 (one chunk), token t reads only its own step -theta_t grad l(0; k_t, v_t) = 2 theta_t k_t v_t^T
    ones = torch.ones_like(alpha)
    zeros = torch.zeros_like(eta)
    out = titans_memory(q, k, v, theta, zeros, ones, model="linear", chunk_size=24)
    expect = -2 * theta[..., None] * (q * k).sum(-1, keepdim=True) * (0 - v)  # M_t = S_t = -theta grad at 0
    assert_close(out, expect)


def test_titans_gradients_and_bad_input():
    from attnkit.ops.linear.titans import titans_memory

    args = [t[:1, :1].detach().requires_grad_(True) for t in _titans_case(n=5, seed=14)]
    assert torch.autograd.gradcheck(lambda *a: titans_memory(*a, chunk_size=2, hidden=3), tuple(args))
    with pytest.raises(ValueError, match="theta must lie in"):
        titans_memory(*args[:3], 1.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="model"):
        titans_memory(*args, model="rnn")


@pytest.mark.parametrize("arrangement", ["mac", "mag", "mal"])
def test_titans_layer_decodes_segment_by_segment_causally(arrangement):
    """The layer's output for a prefix equals the prefix of the output (causal arrangements, MAC's segments
    included), and every parameter gets a gradient."""
    from attnkit.nn import TitansLayer

    torch.manual_seed(0)
    layer = TitansLayer(32, 2, arrangement=arrangement, window=8, chunk_size=4).double()
    x = torch.randn(2, 29, 32, dtype=F64)
    out = layer(x)
    assert_close(layer(x[:, :13]), out[:, :13])
    out.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    with pytest.raises(ValueError, match="arrangement"):
        TitansLayer(32, 2, arrangement="mam")


# -- variants: Galerkin / Fourier, ESSA, LLN + block-diagonal softmax, FLatten's DWC ------------------------


def test_galerkin_is_invariant_to_duplicating_every_token():
    """D22 test 2: the 1/n factor makes the non-causal output invariant to duplicating every token."""
    import attnkit

    fn = attnkit.get("galerkin", head_dim=8).double()
    q, k, v = random_qkv(1, 2, 15, dim=8, dtype=F64, seed=20)
    dup = [t.repeat_interleave(2, dim=2) for t in (k, v)]
    assert_close(fn(q, *dup), fn(q, k, v))


def test_essa_shift_and_scale_invariance():
    """D13 test 1: the SCC kernel ignores adding a constant to all channels of a query or key and positive
    rescaling."""
    import attnkit

    fn = attnkit.get("essa")
    q, k, v = random_qkv(1, 2, 20, dim=8, dtype=F64, seed=21)
    out = fn(q, k, v)
    assert_close(fn(q * 3.0 + 1.5, k * 0.2 - 4.0, v), out)


def test_lln_diag_halves():
    import attnkit
    from attnkit import attention
    from attnkit import patterns as P

    fn = attnkit.get("lln_diag", causal=True)
    q, k, v = random_qkv(1, 2, 40, dim=8, dtype=F64, seed=22)
    lln = attnkit.linear_attention(q, k, v, feature_map="lln", causal=True)
    diag = attention(q, k, v, pattern=P.block_local(8) & P.causal())
    assert_close(fn(q, k, v), 0.5 * (lln + diag))
    assert lln.shape == diag.shape


def test_focused_dwc_reduces_to_relu_linear_attention():
    """D7 tests 1-2: ||phi_p(x)|| = ||relu(x)||; with p = 1 and a zero convolution it is ReLU linear attention."""
    import attnkit
    from attnkit import feature_maps as fmaps

    x = torch.randn(3, 5, 8, dtype=F64)
    phi = fmaps.FocusedFeatureMap(p=3.0, eps=0.0).phi(x, is_query=True)
    assert_close(phi.norm(dim=-1), F.relu(x).norm(dim=-1))
    fn = attnkit.get("focused_dwc", head_dim=8, num_heads=2, p=1.0).double()
    torch.nn.init.zeros_(fn.dwc.weight)
    torch.nn.init.zeros_(fn.dwc.bias)
    fn.feature_map.eps = 0.0
    q, k, v = random_qkv(1, 2, 20, dim=8, dtype=F64, seed=23)
    assert_close(fn(q, k, v), attnkit.linear_attention(q, k, v, feature_map="relu"))


# -- TransNormer / TransNormerLLM ----------------------------------------------------------------------------


def test_norm_attention_gradients_stay_bounded_when_q_and_k_grow():
    """D16 test 3: without the denominator (NormAttention) the gradient w.r.t. v does not blow up as q and k are
    scaled x100; with an RMS norm after, the output is invariant to scaling v."""
    from attnkit import linear_attention
    from attnkit.nn.linear import srms_norm

    q, k, v = random_qkv(1, 2, 30, dim=8, dtype=F64, seed=30)
    norms = []
    for scale in (1.0, 100.0):
        vv = v.clone().requires_grad_(True)
        out = srms_norm(linear_attention(q * scale, k * scale, vv, causal=True, normalize="none"))
        (out * torch.linspace(-1, 1, 8, dtype=F64)).sum().backward()
        norms.append(vv.grad.norm())
    assert norms[1] < 10 * norms[0]
    out = srms_norm(linear_attention(q, k, v, causal=True, normalize="none"))
    assert_close(srms_norm(linear_attention(q, k, 7.0 * v, causal=True, normalize="none")), out)


def test_transnormer_llm_lrpe_depends_on_relative_position_only():
    """D17 test 2: after the LRPE rotation, q_s . k_t depends on s - t only (shifting both positions by c keeps
    every logit)."""
    from attnkit.rotary import RotaryEmbedding

    rot = RotaryEmbedding(8).double()
    q, k = (t[:, :, :1].expand(1, 2, 12, 8) for t in random_qkv(1, 2, 1, dim=8, dtype=F64, seed=31)[:2])
    a = rot(q) @ rot(k).transpose(-1, -2)
    b = rot(q, offset=17) @ rot(k, offset=17).transpose(-1, -2)
    assert_close(a, b)
    for d in range(-5, 6):
        diag = torch.diagonal(a, offset=d, dim1=-2, dim2=-1)
        assert_close(diag, diag[..., :1].expand_as(diag))


def test_transnormer_llm_decays_are_learnable_and_sglu_has_no_activation():
    from attnkit.nn import SGLU, TransNormerLLMLayer

    torch.manual_seed(0)
    layer = TransNormerLLMLayer(32, 4).double()
    layer(torch.randn(2, 20, 32, dtype=F64)).square().sum().backward()
    assert layer.decay_logit.grad is not None and layer.decay_logit.grad.abs().sum() > 0
    sglu = SGLU(16).double()
    x = torch.randn(3, 16, dtype=F64)
    assert_close(sglu(2 * x), 4 * sglu(x))  # bilinear: no activation between the branches


# -- Fastmax --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_fastmax_equals_explicit_polynomial_normalisation(order, causal):
    """D10 tests 1-3: the factorised output equals f(q.k) normalised over keys, f > 0, and adding a constant to
    every feature of every query changes nothing (mean-centring)."""
    import attnkit
    from attnkit.ops.linear.fastmax import FastmaxFeatureMap

    q, k, v = random_qkv(1, 2, 30, dim=6, dtype=F64, seed=40)
    fn = attnkit.get("fastmax", order=order, temperature=2.0, causal=causal)
    out = fn(q, k, v)
    fm = FastmaxFeatureMap(order=order, temperature=2.0, causal=causal)
    x = (fm.normalise(q) @ fm.normalise(k).transpose(-1, -2)) / 2.0
    f = 1 + x + (x * x / 2 if order == 2 else 0)
    assert (f > 0).all()
    if causal:
        f = f * torch.ones(30, 30, dtype=torch.bool).tril()
    assert_close(out, (f @ v) / f.sum(-1, keepdim=True))
    assert_close(fn(q + 3.0, k, v), out)


def test_efficientvit_multiscale_all_negative_queries_stay_finite():
    """D6 test 2: where relu(q) is all zero the eps-guarded denominator keeps the output finite (zero)."""
    from attnkit.nn import MultiScaleLinearAttention
    from attnkit.nn.linear import multiscale_reference

    torch.manual_seed(0)
    layer = MultiScaleLinearAttention(16, 2, scales=(3, 5)).double()
    x = torch.randn(2, 23, 16, dtype=F64)
    assert_close(layer(x), multiscale_reference(layer, x))
    with torch.no_grad():
        layer.qkv.weight[:16].zero_()  # q = 0 at every scale but the aggregated ones: relu(q) = 0 at scale 1
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("n", [32, 37])
@pytest.mark.parametrize("causal", [False, True])
def test_toeplitz_rpe_fft_equals_explicit_form(n, causal):
    """D21 tests 1-3: the FFT path equals the O(n^2) form (power-of-two and other lengths), and b = 0 is the
    plain kernelised attention with the same feature map."""
    import attnkit
    from attnkit.ops.linear.toeplitz import toeplitz_reference

    fn = attnkit.get("kernel_rpe_fft", num_heads=2, seq_len=40, num_features=16, causal=causal).double()
    q, k, v = random_qkv(1, 2, n, dim=8, dtype=F64, seed=50)
    assert_close(fn(q, k, v), attnkit.linear_attention(q, k, v, feature_map=fn.feature_map, causal=causal))
    with torch.no_grad():
        fn.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(51))
    assert_close(fn(q, k, v), toeplitz_reference(fn, q, k, v))
    with pytest.raises(ValueError, match="max_len"):
        fn(*random_qkv(1, 2, 41, dim=8, dtype=F64))


def test_gmm_rks_one_standard_component_estimates_the_gaussian_kernel():
    """D3 test 1: a one-component standard-normal spectral mixture gives exp(-||q - k||^2 / 2) as m grows."""
    from attnkit.ops.linear.learned_maps import SpectralFeatureMap

    fm = SpectralFeatureMap(4, num_features=8192, components=1).double()
    with torch.no_grad():
        fm.log_sigma.zero_()
    x = torch.randn(1, 1, 6, 4, dtype=F64, generator=torch.Generator().manual_seed(60)) * 0.5
    pq, pk = fm(x, x)
    est = pq @ pk.transpose(-1, -2)
    exact = torch.exp(-0.5 * torch.cdist(x[0, 0], x[0, 0]).square())
    assert (est[0, 0] - exact).abs().max() < 0.05


def test_ecoformer_codes_hamming_identity_and_straight_through_gradient():
    """D14 tests 1 and 3: with +-1 codes h(q) . h(k) = b - 2 Hamming(h(q), h(k)); gradients pass the sign."""
    from attnkit.ops.linear.learned_maps import EcoHashFeatureMap

    fm = EcoHashFeatureMap(8, bits=16).double()
    x = torch.randn(2, 1, 10, 8, dtype=F64, requires_grad=True)
    codes = fm.phi(x, is_query=True)
    assert set(codes.detach().unique().tolist()) <= {0.0, 1.0}
    pm = 2 * codes.detach() - 1
    dots = pm @ pm.transpose(-1, -2)
    hamming = (codes.detach()[..., :, None, :] != codes.detach()[..., None, :, :]).sum(-1)
    assert torch.equal(dots, 16 - 2 * hamming.to(dots.dtype))
    codes.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and fm.proj.grad.abs().sum() > 0


def _eco_topics(seed, b=2, n=64, d=16):
    bank = torch.randn(6, d, generator=torch.Generator().manual_seed(12345)) * 1.5
    g = torch.Generator().manual_seed(seed)
    k = bank[torch.randint(0, 6, (b, 1, n), generator=g)] + 0.5 * torch.randn(b, 1, n, d, generator=g)
    q = bank[torch.randint(0, 6, (b, 1, n), generator=g)] + 0.5 * torch.randn(b, 1, n, d, generator=g)
    return q, k


def test_ecoformer_hash_learned_from_the_attention_map_beats_the_untrained_hash():
    """Issue 25 (D14): EcoFormer learns its kernelised hash functions self-supervised from the attention map
    (each query's most / least attended keys as similar / dissimilar pairs). After a few
    ecoformer_hash_step calls on a synthetic task, on held-out inputs: the hashing objective falls, and the keys
    whose codes agree most with a query's code hold more of the teacher's attention."""
    from attnkit.ops.linear.learned_maps import (
        EcoHashFeatureMap,
        ecoformer_hash_loss,
        ecoformer_hash_step,
        ecoformer_similarity_labels,
    )

    q, k = _eco_topics(1000)
    qa, ka = _eco_topics(999)
    fm = EcoHashFeatureMap(16, bits=16, anchors=32).set_anchors(torch.cat([qa, ka], 2))
    labels = ecoformer_similarity_labels(q, k, num_similar=8, num_dissimilar=8)
    assert (labels == 1).sum(-1).eq(8).all() and (labels == -1).sum(-1).eq(8).all()
    teacher = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)

    def scores():
        with torch.no_grad():
            loss = float(ecoformer_hash_loss(fm, q, k, labels))
            agree = fm.phi(q, is_query=True) @ fm.phi(k, is_query=False).transpose(-1, -2)
            mass = float((teacher * (agree == agree.amax(-1, keepdim=True))).sum(-1).mean())
        return loss, mass

    loss0, mass0 = scores()
    opt = torch.optim.Adam([fm.proj], lr=0.02)
    for step in range(60):
        ecoformer_hash_step(fm, opt, *_eco_topics(step), num_similar=8, num_dissimilar=8)
    loss1, mass1 = scores()
    assert loss1 < 0.5 * loss0 and mass1 > mass0 + 0.1
    causal = ecoformer_similarity_labels(q, k, num_similar=2, num_dissimilar=2, causal=True)
    assert (causal.triu(1) == 0).all() and causal[..., 0, :].abs().sum(-1).eq(1).all()  # row 0: one key


def test_weighted_dijiang_starts_as_dijiang_and_learns_its_weights():
    """D15: with equal weights the weighted map is DiJiang's; the weights receive gradients; the DCT is
    orthonormal (D15 test 2)."""
    import attnkit
    from attnkit import feature_maps as fmaps

    fn = attnkit.get("dijiang_weighted", head_dim=8, num_features=32).double()
    q, k, v = random_qkv(1, 2, 20, dim=8, dtype=F64, seed=70)
    out = fn(q, k, v)
    assert_close(out, attnkit.linear_attention(q, k, v, feature_map=fmaps.DiJiangFeatureMap(8, 32)))
    out.square().sum().backward()
    assert fn.feature_map.log_weight.grad.abs().sum() > 0
    c = fmaps._dct_matrix(8)
    assert_close(c @ c.T, torch.eye(8, dtype=F64))


def test_fastfood_frequencies_are_structured_gaussian_like_rows():
    """FastFood-RKS at initialisation: Hadamard H H^T = d' I, and the structured rows S H G Pi H B have the entry
    variance of the Gaussian rows they replace (d^-1/2 here), with gradients reaching the learned diagonals."""
    from attnkit.ops.linear.learned_maps import SpectralFeatureMap, _hadamard

    h = _hadamard(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16))
    fm = SpectralFeatureMap(8, num_features=2048, spectral="fastfood").double()
    w = fm.frequencies()
    assert abs(float(w.detach().pow(2).mean()) - 8**-0.5) < 0.05 * 8**-0.5
    w.square().sum().backward()
    assert all(p.grad is not None for p in (fm.s_diag, fm.g_diag, fm.b_diag))


@pytest.mark.parametrize("arrangement", ["mag", "mal", "mac"])
def test_titans_divergence_at_large_input_scale_is_a_clear_error(arrangement):
    """Issue 28: titans_* returned NaN without a word at 5-10x unit-scale inputs (the step gates saturate and the
    chunk's summed gradient steps overshoot, so the memory grows until it overflows). Now a ValueError naming
    the cause and the remedies; unit-scale inputs still run, and a NaN input still propagates."""
    torch.manual_seed(0)
    from attnkit.nn.linear import TitansLayer

    layer = TitansLayer(32, 2, arrangement=arrangement, window=8, chunk_size=8)
    x = torch.randn(2, 36, 32)
    assert torch.isfinite(layer(x)).all()
    for scale in (5.0, 10.0, 100.0):  # finite, or the clear error: never a silent NaN
        try:
            assert torch.isfinite(layer(x * scale)).all()
        except ValueError as exc:
            assert "online gradient steps diverged" in str(exc)
    if arrangement != "mac":  # MAC's memory learns from the attention output, bounded by the values
        with pytest.raises(ValueError, match="titans memory: the memory's online gradient steps diverged.*normal"):
            layer(x * 100)
    x_nan = x.clone()
    x_nan[0, 5, 3] = float("nan")
    assert torch.isnan(layer(x_nan)).any()


def test_ttt_divergence_is_a_clear_error():
    q, k, v = random_qkv(1, 2, 32, dim=8, seed=3)
    assert torch.isfinite(ttt(q, k, v, 0.01, model="mlp", mini_batch=8)).all()
    with pytest.raises(ValueError, match="ttt: the memory's online gradient steps diverged.*eta"):
        ttt(q * 30, k * 30, v * 30, 1.0, model="mlp", mini_batch=8)
    k_nan = k.clone()
    k_nan[0, 0, 4, 0] = float("nan")
    assert torch.isnan(ttt(q, k_nan, v, 0.01, model="mlp", mini_batch=8)).any()


def test_states_on_another_device_or_of_integer_dtype_are_our_errors():
    """Issue 28: a carried state on another device reached torch ("Cannot copy out of meta tensor", "not on the
    expected device"); now errors that name the argument."""
    from attnkit import linear_attention
    from attnkit.ops.linear.titans import titans_memory

    q, k, v = random_qkv(1, 2, 8, dim=8, seed=4)
    _, s = linear_attention(q, k, v, causal=True, return_state=True)
    with pytest.raises(ValueError, match="state must be on the device of q"):
        linear_attention(q, k, v, causal=True, state=(s.S.to("meta"), s.z.to("meta")))
    with pytest.raises(TypeError, match="state must be floating-point"):
        linear_attention(q, k, v, causal=True, state=(s.S.long(), s.z.long()))
    _, w = ttt(q, k, v, 0.1, return_state=True)
    with pytest.raises(ValueError, match="initial_state must be on the device of q"):
        ttt(q, k, v, 0.1, initial_state=tuple(t.to("meta") for t in w))
    _, st = titans_memory(q, k, v, 0.1, 0.5, 0.1, return_state=True)
    with pytest.raises(ValueError, match="initial_state must be on the device of q"):
        titans_memory(q, k, v, 0.1, 0.5, 0.1, initial_state=tuple(tuple(t.to("meta") for t in p) for p in st))
    assert torch.isfinite(titans_memory(q, k, v, 0.1, 0.5, 0.1, initial_state=st)).all()
