"""The approx family against its references: shapes, odd lengths, GQA, dtypes, gradients, causality, the
registry records and ``approximation_error``. Per-method invariants live in test_approx_invariants.py."""

import math

import pytest
import torch

import attnkit
from attnkit.errors import NotSupportedError
from attnkit.ops.approx import (
    ApproximationError,
    approximation_error,
    hyper_attention,
    hyper_reference,
    linformer_attention,
    linformer_reference,
    loki_attention,
    loki_reference,
    mra_attention,
    mra_reference,
    nystrom_attention,
    nystrom_reference,
    routing_attention,
    routing_reference,
    soft_attention,
    soft_reference,
    yoso_attention,
    yoso_reference,
)
from attnkit.testing import assert_close, random_qkv, relative_error


def _linformer_params(n, heads):
    g = torch.Generator().manual_seed(1)
    e = torch.randn(heads, 5, n + 3, generator=g, dtype=torch.float64) / math.sqrt(5)
    f = torch.randn(5, n + 3, generator=g, dtype=torch.float64) / math.sqrt(5)
    return dict(e=e, f=f)


# name -> (fast path, reference, params(n, heads), has a causal form)
CASES = {
    "linformer": (linformer_attention, linformer_reference, _linformer_params, False),
    "nystrom": (nystrom_attention, nystrom_reference, lambda n, h: dict(num_landmarks=min(8, n)), False),
    "soft": (soft_attention, soft_reference, lambda n, h: dict(num_landmarks=min(8, n)), False),
    "yoso": (yoso_attention, yoso_reference, lambda n, h: dict(tau=4, num_hashes=8, normalize=True), True),
    "hyper": (hyper_attention, hyper_reference,
              lambda n, h: dict(block_size=8, sample_size=8, num_bits=3, min_seq_len=8), True),
    "routing": (routing_attention, routing_reference, lambda n, h: dict(num_clusters=3, chunk_size=8), True),
    "mra": (mra_attention, mra_reference, lambda n, h: dict(block_size=4, num_refined=2), False),
    "loki": (loki_attention, loki_reference, lambda n, h: dict(top_k=5, chunk_size=8), True),
}
NAMES = list(CASES)
CAUSAL = [name for name in NAMES if CASES[name][3]]


def _run(name, q, k, v, causal=False, **extra):
    fast, ref, params, _ = CASES[name]
    p = params(k.shape[2], q.shape[1]) | extra
    return fast(q, k, v, causal=causal, **p), ref(q, k, v, causal=causal, **p)


@pytest.mark.parametrize("n", [1, 7, 63, 65])
@pytest.mark.parametrize("name", NAMES)
def test_fast_matches_reference(name, n):
    q, k, v = random_qkv(2, 4, n, dim=24, kv_heads=2, dim_v=16, dtype=torch.float64, seed=n)
    out, ref = _run(name, q, k, v)
    assert out.shape == (2, 4, n, 16)
    assert_close(out, ref, msg=f"{name} n={n}")


@pytest.mark.parametrize("n", [1, 33, 65])
@pytest.mark.parametrize("name", CAUSAL)
def test_causal_fast_matches_reference(name, n):
    q, k, v = random_qkv(2, 2, n, dim=24, dtype=torch.float64, seed=n)
    out, ref = _run(name, q, k, v, causal=True)
    assert_close(out, ref, msg=f"{name} causal n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_against_float64_reference(name, dtype):
    # Same low-precision inputs for both, so discrete choices (hashes, clusters, top-k) agree.
    q, k, v = random_qkv(1, 2, 40, dim=24, dtype=dtype, seed=3)
    out, ref = _run(name, q, k, v)
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype, scale=2.0, msg=f"{name} {dtype}")


@pytest.mark.parametrize("name", NAMES)
def test_gqa_equals_repeated_heads(name):
    q, k, v = random_qkv(1, 4, 20, dim=8, kv_heads=2, dtype=torch.float64, seed=5)
    out, _ = _run(name, q, k, v)
    rep = [t.repeat_interleave(2, dim=1) for t in (k, v)]
    expected, _ = _run(name, q, *rep)
    assert_close(out, expected)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    q, k, v = random_qkv(1, 2, 9, dim=4, dtype=torch.float64, seed=7, requires_grad=True)
    fast, _, params, _ = CASES[name]
    p = params(9, 2)
    if name == "hyper":
        p = p | dict(block_size=4, sample_size=4)  # exercise blocks and samples, not the exact shortcut
    if name == "yoso":
        p = p | dict(lsh_backward=False)  # its q/k backward is the paper's surrogate: test_approx_extra.py
    assert torch.autograd.gradcheck(lambda q, k, v: fast(q, k, v, **p), (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_backward_matches_reference(name):
    q, k, v = random_qkv(2, 2, 33, dim=8, dtype=torch.float64, seed=9, requires_grad=True)
    out, ref = _run(name, q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v), allow_unused=True)
    grads_ref = torch.autograd.grad((ref * g).sum(), (q, k, v), allow_unused=True)
    for a, b in zip(grads, grads_ref, strict=True):
        if a is None or b is None:
            assert a is None or bool((a == 0).all())
            assert b is None or bool((b == 0).all())
        else:
            assert_close(a, b)
    assert grads[2] is not None and grads[2].abs().sum() > 0  # gradients reach v in every method


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_never_looks_ahead(name):
    n, t = 40, 23
    q, k, v = random_qkv(1, 2, n, dim=8, dtype=torch.float64, seed=11)
    fast, _, params, _ = CASES[name]
    p = params(n, 2)
    out = fast(q, k, v, causal=True, **p)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    # Perturb every future token: its key, its value and its query.
    for x in (q2, k2, v2):
        x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
    out2 = fast(q2, k2, v2, causal=True, **p)
    assert_close(out2[:, :, :t], out[:, :, :t])
    assert not torch.allclose(out2[:, :, t:], out[:, :, t:])  # the perturbation is visible at all


# ---- registry -------------------------------------------------------------------------------------------

SMALL = {"linformer": dict(proj_len=8), "nystrom": dict(num_landmarks=8), "soft": dict(num_landmarks=8),
         "yoso": dict(tau=4, num_hashes=4), "hyper": dict(block_size=8, sample_size=8, min_seq_len=8),
         "routing": dict(num_clusters=3), "mra": dict(block_size=4, num_refined=2),
         "loki": dict(top_k=6, rank=4)}


# Registered too, tested in test_approx_extra.py and test_approx_retrieval.py / test_approx_structured.py
# (name: has a causal form).
EXTRA = {"transformer_vq": True, "combiner": True, "sparsek": True, "iceformer": True, "retrieval_attention": True,
         "sea": True, "boat": False, "sgformer": False, "select_pack": False, "combiner_logsparse": True,
         "combiner_axial": True, "combiner_mixture": True}


def test_registry_records():
    records = {m.name: m for m in attnkit.list_mechanisms("approx")}
    assert set(records) == set(NAMES) | set(EXTRA)
    assert sum(m.in_default_bench for m in records.values()) == 3
    for m in records.values():
        assert not m.exact and m.flops is not None and m.bench_params
        assert m.causal == (CASES[m.name][3] if m.name in CASES else EXTRA[m.name])
        f = m.flops(batch=1, heads=8, q_len=16384, kv_len=16384, head_dim=64, causal=False, **m.bench_params)
        # Every one is cheaper than dense attention at 16k.
        assert 0 < f < 4 * 8 * 16384 ** 2 * 64, m.name


@pytest.mark.parametrize("name", NAMES)
def test_registry_builds_and_runs(name):
    m = attnkit.mechanism_info(name)
    q, k, v = random_qkv(1, 2, 32, dim=8, seed=2)
    shapes = {"num_heads": 2, "head_dim": 8, "seq_len": 32}
    fn = attnkit.get(name, **{key: shapes[key] for key in m.needs}, **SMALL[name])
    out = fn(q, k, v)
    assert out.shape == v.shape and torch.isfinite(out).all()
    if not m.causal:
        with pytest.raises(NotSupportedError, match="causal"):
            attnkit.get(name, causal=True, **{key: shapes[key] for key in m.needs}, **SMALL[name])


def test_registry_rejects_unknown_parameter():
    with pytest.raises(TypeError, match="num_landmark"):
        attnkit.get("nystrom", num_landmark=8)


def test_registry_callable_exposes_reference_and_matrix():
    fn = attnkit.get("mra", block_size=4, num_refined=1)
    q, k, v = random_qkv(1, 2, 16, dim=8, dtype=torch.float64)
    a = fn.attention_matrix(q, k, v)
    assert a.shape == (1, 2, 16, 16)
    assert_close(fn(q, k, v), a @ v)
    assert_close(fn.reference(q, k, v), fn(q, k, v))


# ---- approximation_error --------------------------------------------------------------------------------

def test_approximation_error_zero_for_exact_settings():
    q, k, v = random_qkv(1, 2, 32, dim=8)
    err = approximation_error("routing", q, k, v, num_clusters=1)
    assert isinstance(err, ApproximationError)
    assert err.output_relative < 1e-5 and err.output_max < 1e-5
    assert err.attention_relative is not None and err.attention_relative < 1e-5
    err = approximation_error("hyper", q, k, v, causal=True, block_size=64, min_seq_len=8)
    assert err.output_relative < 1e-5 and err.attention_max < 1e-5


def test_approximation_error_matches_direct_computation():
    q, k, v = random_qkv(1, 2, 32, dim=8, seed=4)
    err = approximation_error("nystrom", q, k, v, num_landmarks=4)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = nystrom_attention(q, k, v, num_landmarks=4)
    assert err.output_relative == pytest.approx(relative_error(out, exact), rel=1e-6)
    assert err.output_max == pytest.approx(float((out.double() - exact).abs().max()), rel=1e-6)
    assert err.output_relative > 0.05  # 4 landmarks for 32 random tokens is visibly approximate
    assert set(err.as_dict()) == {"output_relative", "output_max", "attention_relative", "attention_max"}


def test_approximation_error_with_callable_and_target():
    from attnkit.ops.approx.soft import gaussian_kernel_attention

    q, k, v = random_qkv(1, 2, 16, dim=8, dtype=torch.float64)
    err = approximation_error(soft_attention, q, k, v, num_landmarks=16, pinv="exact",
                              target=gaussian_kernel_attention)
    assert err.output_relative < 1e-8 and err.attention_relative is None  # a bare function has no matrix
    with pytest.raises(ValueError, match="attention_matrix"):
        approximation_error(soft_attention, q, k, v, attention=True, num_landmarks=4)
    with pytest.raises(TypeError, match="registry name or a callable"):
        approximation_error(3, q, k, v)


def test_approximation_error_fills_shape_needs():
    q, k, v = random_qkv(1, 2, 24, dim=8)
    err = approximation_error("linformer", q, k, v, proj_len=8)
    assert err.output_relative > 0 and err.attention_relative is not None


@pytest.mark.parametrize("scale", [5.0, 10.0])
def test_soft_does_not_collapse_at_large_scale(scale):
    """q, k x 5 or x 10 (d = 64): every Gaussian-kernel entry exp(-|q - k|^2 / (2 sqrt(d))) underflows in float32
    (and at x 10 in float64). Each kernel is computed up to one factor per (batch, head), which cancels in the
    normalised form (pinv(e^g W) = e^-g pinv(W)): normalised SOFT stays O(1) in float32 and equals its float64
    reference (before: all zeros)."""
    q, k, v = random_qkv(1, 2, 24, dim=64, dtype=torch.float64, seed=3)
    q, k = q * scale, k * scale
    for m in (8, 24):
        ref = soft_reference(q, k, v, num_landmarks=m, normalize=True)
        assert torch.isfinite(ref).all() and ref.abs().amax() > 0.1
        out = soft_attention(q.float(), k.float(), v.float(), num_landmarks=m, normalize=True)
        assert out.abs().amax() > 0.1
        torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)
    # unnormalised: the kernel's own (tiny) scale, equal to the float64 reference where float64 holds it; where
    # the dtype cannot hold it the output is 0 and a warning says why
    plain64 = soft_attention(q, k, v, num_landmarks=8)
    if scale == 5.0:
        want = soft_reference(q, k, v, num_landmarks=8)
        assert want.abs().amax() > 0
        torch.testing.assert_close(plain64, want, rtol=1e-6, atol=0)
    with pytest.warns(RuntimeWarning, match="underflows to 0"):
        soft_attention(q.float(), k.float(), v.float(), num_landmarks=8)


@pytest.mark.parametrize("name", ["combiner", "loki", "routing", "transformer_vq", "sparsek", "hyper", "iceformer"])
def test_causal_approximations_refuse_decoding_calls(name):
    """Their causal masks are formed for q_len == kv_len: fewer queries than keys is refused, never silently
    misaligned."""
    from attnkit.testing import build_small, random_qkv

    m = attnkit.mechanism_info(name)
    built, _ = build_small(m, seq_len=32, causal=True)
    q, k, v = random_qkv(1, 2, 32, 32, 16)
    with pytest.raises(attnkit.NotSupportedError, match="as many queries as keys"):
        built(q[:, :, -4:], k, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_clusters", [32, 128])
def test_routing_with_more_clusters_than_keys_is_not_all_zeros(num_clusters, causal):
    """Issue 28: with num_clusters >= the number of keys (the record's default 128 clusters at 32 tokens) every
    query sat in a cluster without keys and the output was all zeros. Clusters fitted per call are now
    min(num_clusters, sqrt(n)) (the paper's balanced choice), and the fast path still equals the reference."""
    q, k, v = random_qkv(1, 2, 32, dim=8, seed=11)
    from attnkit.ops.approx.routing import effective_clusters

    assert effective_clusters(num_clusters, 32) == 5 and effective_clusters(8, 32) == 8
    assert effective_clusters(128, 3) == 1  # below 4 keys: one cluster, exact attention
    out = routing_attention(q, k, v, num_clusters=num_clusters, causal=causal)
    rows_with_output = (out.abs().sum(-1) > 0).float().mean()
    assert rows_with_output > 0.5, f"only {rows_with_output:.0%} of the rows have an output"
    assert_close(out, routing_reference(q, k, v, num_clusters=num_clusters, causal=causal), dtype=torch.float32)
    one = random_qkv(1, 2, 3, dim=8, seed=12)
    dense = torch.softmax(one[0] @ one[1].transpose(-1, -2) / math.sqrt(8), dim=-1) @ one[2]
    assert_close(routing_attention(*one, num_clusters=128), dense, dtype=torch.float32)
