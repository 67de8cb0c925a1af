"""Transformer-VQ, Combiner and SPARSEK (issue 5, "where they fit the same interface"): fast paths against
their references (shapes, GQA, causal, dtypes, gradients), each method's defining invariants, causality,
the registry, modules and argument errors."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
import attnkit.nn
from attnkit.ops.approx import (
    approximation_error,
    combiner_attention,
    combiner_reference,
    sparsek_attention,
    sparsek_mask,
    sparsek_reference,
    sparsek_threshold,
    vq_attention,
    vq_codebook,
    vq_commitment_loss,
    vq_quantize,
    vq_reference,
)
from attnkit.testing import assert_close, random_qkv, relative_error


def _codebook(h, d, s=6, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, s, d, generator=g, dtype=torch.float64).to(dtype)


def _weight(h, d, seed=4, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(h, d, generator=g, dtype=torch.float64) * scale).to(dtype)


# name -> (fast path, reference, params(heads, dim, dtype))
CASES = {
    "transformer_vq": (vq_attention, vq_reference,
                       lambda h, d, dt: dict(codebook=_codebook(h, d, dtype=dt), block_size=8)),
    "combiner": (combiner_attention, combiner_reference,
                 lambda h, d, dt: dict(block_size=8, region_weight=_weight(h, d, dtype=dt))),
    "combiner_mean": (combiner_attention, combiner_reference, lambda h, d, dt: dict(block_size=5)),
    "sparsek": (sparsek_attention, sparsek_reference,
                lambda h, d, dt: dict(top_k=5, score_weight=_weight(h, d, dtype=dt), chunk_size=16)),
    "sparsek_window": (sparsek_attention, sparsek_reference,
                       lambda h, d, dt: dict(top_k=4, window=3, score_weight=_weight(h, d, dtype=dt),
                                             chunk_size=8)),
}
NAMES = list(CASES)
NON_CAUSAL = [name for name in NAMES if name != "sparsek_window"]  # the window is causal


def _run(name, q, k, v, causal=False, **extra):
    fast, ref, params = CASES[name]
    p = params(q.shape[1], q.shape[-1], q.dtype) | extra
    return fast(q, k, v, causal=causal, **p), ref(q, k, v, causal=causal, **p)


# ---- fast path == reference -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 33, 65])
@pytest.mark.parametrize("name", NON_CAUSAL)
def test_fast_matches_reference(name, n):
    q, k, v = random_qkv(2, 4, n, dim=24, kv_heads=2, dim_v=16, dtype=torch.float64, seed=n)
    out, ref = _run(name, q, k, v)
    assert out.shape == (2, 4, n, 16)
    assert_close(out, ref, msg=f"{name} n={n}")


@pytest.mark.parametrize("n", [1, 33, 65])
@pytest.mark.parametrize("name", NAMES)
def test_causal_fast_matches_reference(name, n):
    q, k, v = random_qkv(2, 2, n, dim=24, dtype=torch.float64, seed=n)
    out, ref = _run(name, q, k, v, causal=True)
    assert_close(out, ref, msg=f"{name} causal n={n}")


@pytest.mark.parametrize("lens", [(20, 45), (45, 20)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_unequal_lengths(name, causal, lens):
    if name == "sparsek_window" and not causal:
        pytest.skip("the window is causal")
    q, k, v = random_qkv(1, 2, lens[0], lens[1], dim=8, dtype=torch.float64, seed=1)
    out, ref = _run(name, q, k, v, causal=causal)
    assert out.shape == (1, 2, lens[0], 8)
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_against_float64_reference(name, dtype):
    # Same low-precision inputs for both, so discrete choices (codes, selections) agree.
    q, k, v = random_qkv(1, 2, 40, dim=16, dtype=dtype, seed=3)
    causal = name == "sparsek_window"
    fast, ref, params = CASES[name]
    p = params(2, 16, dtype)
    out = fast(q, k, v, causal=causal, **p)
    p64 = {key: (val.double() if isinstance(val, torch.Tensor) else val) for key, val in p.items()}
    expected = ref(q, k, v, causal=causal, **p64)
    assert out.dtype == dtype
    assert_close(out, expected, dtype=dtype, scale=2.0, msg=f"{name} {dtype}")


@pytest.mark.parametrize("name", NON_CAUSAL)
def test_gqa_equals_repeated_heads(name):
    q, k, v = random_qkv(1, 4, 20, dim=8, kv_heads=2, dtype=torch.float64, seed=5)
    out, _ = _run(name, q, k, v)
    expected, _ = _run(name, q, *(t.repeat_interleave(2, dim=1) for t in (k, v)))
    assert_close(out, expected)


def _learned(name, p):
    """The learned tensor of a case (codebook / region scorer / key scorer) as a leaf requiring grad."""
    key = {"transformer_vq": "codebook", "combiner": "region_weight", "sparsek": "score_weight",
           "sparsek_window": "score_weight"}.get(name)
    if key is not None:
        p[key] = p[key].clone().requires_grad_()
    return key


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_backward_matches_reference(name, causal):
    if name == "sparsek_window" and not causal:
        pytest.skip("the window is causal")
    q, k, v = random_qkv(2, 2, 33, dim=8, dtype=torch.float64, seed=9, requires_grad=True)
    fast, ref, params = CASES[name]
    p = params(2, 8, torch.float64)
    key = _learned(name, p)
    inputs = (q, k, v) + ((p[key],) if key else ())
    out, expected = fast(q, k, v, causal=causal, **p), ref(q, k, v, causal=causal, **p)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    grads_ref = torch.autograd.grad((expected * g).sum(), inputs)
    for a, b in zip(grads, grads_ref, strict=True):
        assert_close(a, b)
    for t in grads:
        assert t.abs().sum() > 0  # gradients reach q, k, v and the learned tensor


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["transformer_vq", "combiner", "sparsek"])
def test_gradcheck(name, causal):
    q, k, v = random_qkv(1, 2, 9, dim=4, dtype=torch.float64, seed=7, requires_grad=True)
    fast, _, params = CASES[name]
    p = params(2, 4, torch.float64) | ({"block_size": 4} if name != "sparsek" else {"top_k": 3})
    if name == "transformer_vq":
        # The key gradient is straight-through (not the derivative of the piecewise-constant quantiser), so
        # check q, v and the codebook.
        cb = p.pop("codebook").requires_grad_()
        assert torch.autograd.gradcheck(lambda q, v, cb: fast(q, k, v, codebook=cb, causal=causal, **p),
                                        (q, v, cb), eps=1e-6, atol=1e-5)
        return
    assert torch.autograd.gradcheck(lambda q, k, v: fast(q, k, v, causal=causal, **p), (q, k, v),
                                    eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_causal_never_looks_ahead(name):
    n, t = 40, 23
    q, k, v = random_qkv(1, 2, n, dim=8, dtype=torch.float64, seed=11)
    fast, _, params = CASES[name]
    p = params(2, 8, torch.float64)
    out = fast(q, k, v, causal=True, **p)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
    out2 = fast(q2, k2, v2, causal=True, **p)
    assert_close(out2[:, :, :t], out[:, :, :t])
    assert not torch.allclose(out2[:, :, t:], out[:, :, t:])


# ---- Transformer-VQ ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 3, 8, 40, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_vq_codebook_holding_every_key_is_exact(causal, block_size):
    q, k, v = random_qkv(1, 2, 40, dim=8, dtype=torch.float64, seed=2)
    out = vq_attention(q, k, v, codebook=k[0], block_size=block_size, causal=causal)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("block_size", [1, 2, 7, 16, 64])
def test_vq_block_algorithm_equals_quadratic_softmax_over_quantised_keys(block_size):
    q, k, v = random_qkv(2, 2, 37, dim=8, dtype=torch.float64, seed=3)
    cb = _codebook(2, 8, s=5)
    khat, idx = vq_quantize(k, cb)
    assert idx.shape == (2, 2, 37) and int(idx.max()) < 5
    for causal in (False, True):
        out = vq_attention(q, k, v, codebook=cb, block_size=block_size, causal=causal)
        assert_close(out, F.scaled_dot_product_attention(q, khat, v, is_causal=causal))


def test_vq_straight_through_and_codebook_gradients():
    q, k, v = random_qkv(1, 2, 16, dim=8, dtype=torch.float64, seed=4, requires_grad=True)
    cb = _codebook(2, 8, s=4).requires_grad_()
    out = vq_attention(q, k, v, codebook=cb, block_size=4, causal=True)
    gk, gc = torch.autograd.grad(out.square().sum(), (k, cb))
    assert gk.abs().sum() > 0 and gc.abs().sum() > 0
    # One block: every pair is inside it, so dL/dk is exactly dL/dk^ of softmax over the quantised keys.
    k1 = k.detach().requires_grad_()
    khat, _ = vq_quantize(k1, cb.detach())
    khat = khat.detach().requires_grad_()
    out = vq_attention(q, k1, v, codebook=cb.detach(), block_size=16, causal=True)
    exact = F.scaled_dot_product_attention(q, khat, v, is_causal=True)
    (g1,) = torch.autograd.grad(out.square().sum(), k1)
    (g2,) = torch.autograd.grad(exact.square().sum(), khat)
    assert_close(g1, g2)


def test_vq_commitment_loss_and_kmeans_codebook():
    q, k, v = random_qkv(1, 2, 64, dim=8, dtype=torch.float64, seed=5)
    cb = vq_codebook(k, 64, iterations=3)  # as many codes as keys: every key is its own code
    assert cb.shape == (2, 64, 8)
    assert float(vq_commitment_loss(k, cb)) < 1e-20
    assert_close(vq_attention(q, k, v, codebook=cb), F.scaled_dot_product_attention(q, k, v))
    # More codes (fitted on calibration keys from the same distribution) quantise better.
    _, calib, _ = random_qkv(4, 2, 64, dim=8, dtype=torch.float64, seed=6)
    errors = [relative_error(vq_attention(q, k, v, codebook=vq_codebook(calib, s, iterations=5)),
                             F.scaled_dot_product_attention(q, k, v)) for s in (2, 16, 128)]
    assert errors[0] > errors[1] > errors[2]


def test_vq_module_learns_codebook_by_ema_after_forward():
    m = attnkit.nn.TransformerVQAttention(2, 8, codebook_size=4, block_size=8, causal=True, decay=0.5)
    q, k, v = random_qkv(1, 2, 16, dim=8, seed=7)
    before = m.codebook.clone()
    out = m(q, k, v)
    assert_close(out, vq_attention(q, k, v, codebook=before, block_size=8, causal=True))  # old codebook used
    assert not torch.equal(m.codebook, before)
    m.eval()
    frozen = m.codebook.clone()
    m(q, k, v)
    assert torch.equal(m.codebook, frozen)
    m.fit(k)
    assert float(m.commitment_loss(k)) < float(vq_commitment_loss(k, before))
    assert_close(m.reference(q, k, v), m(q, k, v), scale=2.0)


# ---- Combiner -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_combiner_full_support_rows_sum_to_one(causal, weighted):
    q, k, v = random_qkv(1, 2, 30, dim=8, dtype=torch.float64, seed=8)
    w = _weight(2, 8) if weighted else None
    fn = attnkit.get("combiner", block_size=4, causal=causal, region_weight=w)
    a = fn.attention_matrix(q, k, v)
    assert_close(a.sum(-1), torch.ones(1, 2, 30, dtype=torch.float64))
    visible = torch.ones(30, 30, dtype=torch.bool).tril() if causal else torch.ones(30, 30, dtype=torch.bool)
    assert bool((a[..., visible] > 0).all())  # every visible key has a positive weight
    assert bool((a[..., ~visible] == 0).all())
    assert_close(fn(q, k, v), a @ v)


@pytest.mark.parametrize("causal", [False, True])
def test_combiner_singleton_regions_and_constant_blocks_are_exact(causal):
    q, k, v = random_qkv(1, 2, 24, dim=8, dtype=torch.float64, seed=9)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(combiner_attention(q, k, v, block_size=1, causal=causal), exact)
    # Blocks of identical keys: a region's summary carries exactly the mass of its tokens.
    kc = k[:, :, ::4].repeat_interleave(4, dim=2)
    exact = F.scaled_dot_product_attention(q, kc, v, is_causal=causal)
    assert_close(combiner_attention(q, kc, v, block_size=4, causal=causal), exact)


def test_combiner_error_falls_as_blocks_grow():
    q, k, v = random_qkv(1, 2, 64, dim=8, seed=10)
    errors = [approximation_error("combiner", q, k, v, block_size=b).output_relative for b in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5  # one block is exact attention


def test_combiner_module_learns_region_scorer():
    m = attnkit.nn.CombinerAttention(2, 8, block_size=4, causal=True)
    q, k, v = random_qkv(1, 2, 16, dim=8, seed=11)
    m(q, k, v).square().sum().backward()
    assert m.region_weight.grad is not None and m.region_weight.grad.abs().sum() > 0
    assert_close(m(q, k, v), m.reference(q, k, v))


# ---- SPARSEK --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 3, 10, 36, 37, 50])
def test_sparsek_mask_is_a_capped_simplex_projection(top_k):
    g = torch.Generator().manual_seed(12)
    u = torch.randn(6, 37, generator=g, dtype=torch.float64) * 2
    m = sparsek_mask(u, top_k)
    assert bool((m >= 0).all() and (m <= 1).all())
    assert_close(m.sum(-1), torch.full((6,), float(min(top_k, 37)), dtype=torch.float64))
    # It is the Euclidean projection: no feasible point (e.g. the hard top-k) is closer to u.
    hard = torch.zeros_like(u).scatter_(-1, u.topk(min(top_k, 37)).indices, 1.0)
    assert bool(((m - u).norm(dim=-1) <= (hard - u).norm(dim=-1) + 1e-12).all())


def test_sparsek_threshold_cases():
    u = torch.tensor([[5.0, 3.0, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0], [0.3, float("-inf"), 0.2, float("-inf")]],
                     dtype=torch.float64)
    tau = sparsek_threshold(u, 2)
    assert float(tau[0]) == pytest.approx(1.25)  # separated scores: the hard top-2, threshold mid-gap
    m = sparsek_mask(u, 2)
    assert_close(m[0], torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert_close(m[1], torch.full((4,), 0.5, dtype=torch.float64))  # ties share the budget
    assert float(tau[2]) == float("-inf") and m[2].tolist() == [1.0, 0.0, 1.0, 0.0]  # <= k present: all kept


def test_sparsek_mask_gradient_is_the_projection_jacobian():
    u = torch.tensor([3.0, 1.2, 0.9, 0.5, -2.0], dtype=torch.float64, requires_grad=True)
    m = sparsek_mask(u, 2)
    frac = (m > 0) & (m < 1)
    assert int(frac.sum()) >= 2
    jac = torch.autograd.functional.jacobian(lambda x: sparsek_mask(x, 2), u.detach())
    f = frac.double()
    expected = torch.diag(f) - f[:, None] * f[None, :] / f.sum()
    assert_close(jac, expected)
    assert jac[frac][:, frac].abs().sum() > 0  # non-zero for unsaturated entries


@pytest.mark.parametrize("causal", [False, True])
def test_sparsek_k_at_least_visible_keys_is_exact(causal):
    q, k, v = random_qkv(1, 2, 30, dim=8, dtype=torch.float64, seed=13)
    out = sparsek_attention(q, k, v, top_k=30, score_weight=_weight(2, 8), causal=causal)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    # Causal: query i sees i + 1 keys, so top_k = 8 is exact on the first 8 rows.
    out = sparsek_attention(q, k, v, top_k=8, score_weight=_weight(2, 8), causal=True)
    assert_close(out[:, :, :8], F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, :8])


def test_sparsek_incremental_selection_equals_recomputed():
    """A decode step (query i over the cached prefix k_0..k_i, selection recomputed on the prefix) gives row i of
    the full causal pass."""
    q, k, v = random_qkv(1, 2, 24, dim=8, dtype=torch.float64, seed=14)
    w = _weight(2, 8)
    full = sparsek_attention(q, k, v, top_k=4, score_weight=w, causal=True)
    for i in (0, 3, 4, 5, 17, 23):
        step = sparsek_attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], top_k=4, score_weight=w)
        assert_close(step[:, :, 0], full[:, :, i])


def test_sparsek_error_falls_as_k_grows():
    q, k, v = random_qkv(1, 2, 64, dim=8, seed=15)
    w = _weight(2, 8, dtype=torch.float32)
    errors = [approximation_error(functools.partial(sparsek_attention, top_k=t, score_weight=w, causal=True),
                                  q, k, v, causal=True).output_relative for t in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_sparsek_module_trains_scorer():
    m = attnkit.nn.SparseKAttention(2, 8, top_k=4, causal=True)
    q, k, v = random_qkv(1, 2, 20, dim=8, seed=16)
    m(q, k, v).square().sum().backward()
    assert m.score_weight.grad is not None and m.score_weight.grad.abs().sum() > 0
    assert m.score_bias.grad is not None
    assert_close(m(q, k, v), m.reference(q, k, v))


# ---- registry, approximation_error, MultiheadAttention ----------------------------------------------------

SMALL = {"transformer_vq": dict(codebook_size=8, block_size=8), "combiner": dict(block_size=8),
         "sparsek": dict(top_k=6)}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(SMALL))
def test_registry_builds_runs_and_measures(name, causal):
    m = attnkit.mechanism_info(name)
    assert m.causal and not m.exact and m.family == "approx"
    shapes = {"num_heads": 2, "head_dim": 8, "seq_len": 32}
    fn = attnkit.get(name, causal=causal, **{key: shapes[key] for key in m.needs}, **SMALL[name])
    q, k, v = random_qkv(1, 2, 32, dim=8, seed=2)
    out = fn(q, k, v)
    assert out.shape == v.shape and torch.isfinite(out).all()
    assert_close(fn.reference(q, k, v), out, scale=2.0)
    err = approximation_error(name, q, k, v, causal=causal, **SMALL[name])
    assert 0 < err.output_relative < 10 and err.attention_relative is not None
    f = m.flops(batch=1, heads=8, q_len=16384, kv_len=16384, head_dim=64, causal=causal, **m.bench_params)
    assert 0 < f < 4 * 8 * 16384 ** 2 * 64


@pytest.mark.parametrize("name", list(SMALL))
def test_multihead_attention_runs_mechanism(name):
    layer = attnkit.nn.MultiheadAttention(32, 4, kv_heads=2, mechanism=name, causal=True,
                                          mechanism_kwargs=SMALL[name])
    x = torch.randn(2, 20, 32, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()


# ---- errors ---------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    q, k, v = random_qkv(1, 2, 16, dim=8)
    with pytest.raises(ValueError, match="codebook="):
        vq_attention(q, k, v)
    with pytest.raises(ValueError, match="codebook must be"):
        vq_attention(q, k, v, codebook=torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="codebook must be"):
        vq_attention(q, k, v, codebook=torch.randn(5, 7))
    with pytest.raises(ValueError, match="block_size"):
        vq_attention(q, k, v, codebook=torch.randn(5, 8), block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        combiner_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="region_weight"):
        combiner_attention(q, k, v, region_weight=torch.randn(3, 8))
    with pytest.raises(ValueError, match="score_weight="):
        sparsek_attention(q, k, v)
    with pytest.raises(ValueError, match="top_k"):
        sparsek_attention(q, k, v, top_k=0, score_weight=torch.randn(2, 8))
    with pytest.raises(ValueError, match="window"):
        sparsek_attention(q, k, v, window=4, score_weight=torch.randn(2, 8))
    with pytest.raises(ValueError, match="scores must be"):
        sparsek_attention(q, k, v, scores=torch.randn(1, 2, 15))
    with pytest.raises(ValueError, match="either scores= or score_weight="):
        sparsek_attention(q, k, v, scores=torch.randn(1, 2, 16), score_weight=torch.randn(2, 8))
    with pytest.raises(TypeError, match="unknown parameters"):
        attnkit.get("combiner", blocksize=4)
    with pytest.raises(ValueError, match="decay"):
        attnkit.nn.TransformerVQAttention(2, 8, decay=1.0)
    assert math.isfinite(float(sparsek_threshold(torch.randn(5, dtype=torch.float64), 2)))


def test_sparsek_full_row_fallback_matches_reference():
    """The per-row selection the causal fast path falls back to if rounding ever breaks the monotone threshold."""
    from attnkit.ops.approx.sparsek import _chunk_full_rows, sparsek_scores

    q, k, v = random_qkv(1, 2, 40, dim=8, dtype=torch.float64, seed=17)
    w = _weight(2, 8)
    for window in (0, 3):
        out = _chunk_full_rows(q, k, v, sparsek_scores(k, w), 5, window, 8, 40, 8 ** -0.5)
        ref = sparsek_reference(q, k, v, top_k=5, score_weight=w, causal=True, window=window)
        assert_close(out, ref[:, :, 8:])


# ---- YOSO's LSH backward for q and k --------------------------------------------------------------------

def _yoso_surrogate(q, k, v, tau):
    """Closed form of what YOSO's LSH backward estimates: the expectation ``p @ v`` with ``dp/dS`` replaced by
    ``(tau/2) p`` (``S = q^ k^T``), in float64."""
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    s = qn @ kn.transpose(-1, -2)
    p = (1 - torch.arccos(s.detach().clamp(-1, 1)) / math.pi) ** tau
    return (p + (tau / 2) * p * (s - s.detach())) @ v


def test_yoso_lsh_backward_converges_to_its_expectation():
    from attnkit.ops.approx import yoso_attention, yoso_expectation

    q, k, v = random_qkv(1, 2, 12, dim=6, dtype=torch.float64, seed=3, requires_grad=True)
    tau = 4
    g = torch.randn(1, 2, 12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    surrogate = torch.autograd.grad((_yoso_surrogate(q, k, v, tau) * g).sum(), (q, k, v))
    exact = torch.autograd.grad((yoso_expectation(q, k, v, tau=tau) * g).sum(), (q, k, v))
    errors = []
    for hashes in (16, 256, 4096):
        out = yoso_attention(q, k, v, tau=tau, num_hashes=hashes, chunk_size=8)
        grads = torch.autograd.grad((out * g).sum(), (q, k, v))
        errors.append([relative_error(a, b) for a, b in zip(grads, surrogate, strict=True)])
    for i in range(3):  # q, k, v: the Monte-Carlo error falls with the number of hashes (~ 1/sqrt(m))
        assert errors[0][i] > errors[1][i] > errors[2][i]
    assert max(errors[2]) < 0.06
    # v's gradient is unbiased for the true one; q's and k's estimate the surrogate, which points the way of
    # the true gradient of the expectation with a smaller norm (dp/dx = 4/pi (tau/2) p at x = 0).
    assert relative_error(grads[2], exact[2]) < 0.06
    for a, b in zip(grads[:2], exact[:2], strict=True):
        cosine = float((a * b).sum() / (a.norm() * b.norm()))
        assert cosine > 0.97 and 0.7 < float(a.norm() / b.norm()) < 1.0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_yoso_lsh_backward_matches_reference(causal, normalize):
    from attnkit.ops.approx import yoso_attention, yoso_reference

    q, k, v = random_qkv(2, 4, 33, 29, dim=8, kv_heads=2, dim_v=5, dtype=torch.float64, seed=1, requires_grad=True)
    p = dict(tau=3, num_hashes=5, normalize=normalize, causal=causal, chunk_size=8)
    out, ref = yoso_attention(q, k, v, **p), yoso_reference(q, k, v, **p)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref, strict=True):
        assert a.abs().sum() > 0
        assert_close(a, b)
    # Only v needing a gradient skips the q/k tables and still gives v's exact gradient.
    v2 = v.detach().requires_grad_()
    (gv,) = torch.autograd.grad((yoso_attention(q.detach(), k.detach(), v2, **p) * g).sum(), v2)
    assert_close(gv, grads_ref[2])
    # lsh_backward=False: no gradient to q and k.
    out = yoso_attention(q, k, v, lsh_backward=False, **p)
    gq, gk = torch.autograd.grad(out.sum(), (q, k), allow_unused=True)
    assert gq is None and gk is None
