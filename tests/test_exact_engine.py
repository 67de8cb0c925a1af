"""The tiled and sdpa engines against the reference, and the reference against SDPA with an explicit mask."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import normalizations as N
from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit._checks import repeat_kv
from attnkit.ops.exact.tiled import TILE_ELEMENTS, make_plan
from attnkit.testing import assert_close, random_qkv

PATTERNS = {
    "none": lambda L: None,
    "causal": lambda L: P.causal(),
    "window": lambda L: P.sliding_window(5, 2),
    "causal_window": lambda L: P.causal() & P.sliding_window(9),
    "dilated": lambda L: P.dilated(3, 2),
    "block_local": lambda L: P.block_local(7),
    "strided": lambda L: P.strided(5),
    "fixed": lambda L: P.fixed(8, 2),
    "global": lambda L: P.sliding_window(2) | P.global_tokens([0, 17], strict=False),
    "document": lambda L: P.document(torch.arange(L) * 3 // L),
    "prefix_lm": lambda L: P.prefix_lm(10),
    "key_padding": lambda L: P.key_padding([L // 2, L]),
    "custom": lambda L: P.custom(lambda b, h, q, k: (q + k + h) % 3 != 0),
    "not_causal": lambda L: ~P.causal(),
}
MODS = {
    "none": lambda: None,
    "alibi": lambda: S.alibi(4),
    "softcap": lambda: S.softcap(2.0),
    "kerple_log": lambda: S.kerple_log(4, 0.5, 0.7),
    "kerple_power": lambda: S.kerple_power(4, 0.5, 0.7),
    "relbias": lambda: S.relative_bias(torch.randn(16, 4, generator=torch.Generator().manual_seed(1))),
    "alibi>>softcap": lambda: S.alibi(4) >> S.softcap(3.0),
}


def _run_both(q, k, v, **kw):
    ref = attnkit.attention(q, k, v, engine="reference", **kw)
    out = attnkit.attention(q, k, v, engine="tiled", block_q=16, block_kv=8, **kw)
    return ref, out


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("norm", ["softmax", "sigmoid", "relu", "softplus"])
def test_tiled_equals_reference_every_pattern_and_norm(pattern, norm):
    for lq, lk, hkv in [(65, 65, 4), (23, 65, 2)]:
        q, k, v = random_qkv(2, 4, lq, lk, 12, kv_heads=hkv, dim_v=10, dtype=torch.float64, requires_grad=True)
        pat = PATTERNS[pattern](lk)
        ref, out = _run_both(q, k, v, pattern=pat, normalization=norm)
        assert_close(out, ref)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            assert_close(a, b)


@pytest.mark.parametrize("mod", sorted(MODS))
@pytest.mark.parametrize("pattern", ["none", "causal_window", "document"])
def test_tiled_equals_reference_score_mods_with_grads(mod, pattern):
    q, k, v = random_qkv(2, 4, 40, 40, 8, kv_heads=2, dtype=torch.float64, requires_grad=True)
    m = MODS[mod]()
    if m is not None:
        m.double()
    params = m.grad_tensors() if m is not None else []
    ref, out = _run_both(q, k, v, pattern=PATTERNS[pattern](40), score_mod=m)
    assert_close(out, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, *params), g)
    want = torch.autograd.grad(ref, (q, k, v, *params), g)
    for a, b in zip(got, want):
        assert_close(a, b)
    if mod.startswith("kerple") or mod == "relbias":
        assert all(p.abs().sum() > 0 for p in got[3:]), "learnable modifier received no gradient"


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("pattern", ["none", "causal", "window", "global"])
def test_odd_lengths_and_default_blocks(length, pattern):
    q, k, v = random_qkv(1, 2, length, length, 24, dtype=torch.float64)
    pat = PATTERNS[pattern](length)
    ref = attnkit.attention(q, k, v, pattern=pat, engine="reference")
    assert_close(attnkit.attention(q, k, v, pattern=pat, engine="tiled"), ref)


@pytest.mark.parametrize("mod", ["none", "alibi"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-kernel", "general"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_softmax_paths_equal_reference(pattern, fused, mod, monkeypatch):
    """Softmax with no score modifier or a fixed additive one (ALiBi, passed as the kernel's mask) and equal
    key/value dims runs ATen's fused CPU kernel per step; the general path (matmul + online softmax, the one CUDA
    runs) must agree too. GQA, cross-attention, grads."""
    monkeypatch.setattr(attnkit.ops.exact.tiled, "USE_FUSED_CPU_KERNEL", fused)
    for lq, lk, hkv in [(65, 65, 4), (23, 65, 2), (1, 40, 1)]:
        q, k, v = random_qkv(2, 4, lq, lk, 12, kv_heads=hkv, dtype=torch.float64, requires_grad=True)
        pat = PATTERNS[pattern](lk)
        score_mod = S.alibi(4).double() if mod == "alibi" else None
        assert attnkit.ops.exact.tiled.can_fuse(q, v, score_mod, N.softmax()) == fused
        ref, out = _run_both(q, k, v, pattern=pat, score_mod=score_mod)
        assert_close(out, ref)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            assert_close(a, b)


def test_learnable_or_non_additive_modifiers_take_the_general_path():
    q, _, v = random_qkv(1, 4, 8, 8, 8)
    assert not attnkit.ops.exact.tiled.can_fuse(q, v, S.kerple_log(4, 0.5, 0.7), N.softmax())
    assert not attnkit.ops.exact.tiled.can_fuse(q, v, S.alibi(4) >> S.softcap(2.0), N.softmax())
    assert attnkit.ops.exact.tiled.can_fuse(q, v, S.alibi(4) >> S.alibi(4), N.softmax())


def test_multi_step_rows_use_online_softmax():
    # A tiny step budget forces one row of tiles to be split across steps: the running max/sum merge runs.
    q, k, v = random_qkv(1, 2, 50, 300, 8, dtype=torch.float64, requires_grad=True)
    kw = dict(pattern=P.causal(), score_mod=S.softcap(5.0))
    ref = attnkit.attention(q, k, v, engine="reference", **kw)
    out = attnkit.ops.exact.tiled.tiled_attention(
        q, k, v, pattern=P.causal(), score_mod=S.softcap(5.0), normalization=N.softmax(), scale=8 ** -0.5,
        block_q=16, block_kv=16, tile_elements=2 * 16 * 16 * 3)
    assert_close(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b)


@pytest.mark.parametrize("pattern", ["none", "causal", "window", "block_local", "document"])
def test_reference_equals_sdpa_with_boolean_mask(pattern):
    q, k, v = random_qkv(2, 4, 33, 33, 16, kv_heads=2, dtype=torch.float64)
    pat = PATTERNS[pattern](33)
    mask = None if pat is None else pat.materialize(33, 33, batch=2, heads=4)
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask)
    assert_close(attnkit.attention(q, k, v, pattern=pat, engine="reference"), want)
    assert_close(attnkit.attention(q, k, v, pattern=pat, engine="tiled"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["causal_window", "global"])
def test_low_precision_against_float64_reference(dtype, pattern):
    q, k, v = random_qkv(1, 4, 100, 100, 32, dtype=torch.float64)
    pat = PATTERNS[pattern](100)
    ref = attnkit.attention(q, k, v, pattern=pat, engine="reference")
    lo = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = attnkit.attention(*lo, pattern=pat, engine="tiled")
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in lo)


def test_gradcheck_tiled_float64():
    q, k, v = random_qkv(1, 2, 9, 11, 4, kv_heads=1, dtype=torch.float64, requires_grad=True)
    mod = S.kerple_log(2, 0.3, 0.8).double()

    def f(q, k, v, r1, r2):
        return attnkit.attention(q, k, v, pattern=P.sliding_window(3, 1), score_mod=mod, engine="tiled",
                                 block_q=4, block_kv=4)

    assert torch.autograd.gradcheck(f, (q, k, v, mod.r1, mod.r2))


def test_auto_dispatches_dense_to_sdpa_and_matches():
    q, k, v = random_qkv(2, 8, 77, 77, 64)
    out = attnkit.attention(q, k, v, pattern=P.causal())
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want)
    assert attnkit.not_supported_reasons(q, k, v, pattern=P.causal())["sdpa"] == []
    assert attnkit.not_supported_reasons(q, k, v, pattern=P.sliding_window(4))["sdpa"]


def test_causal_is_bottom_right_aligned_for_decoding():
    q, k, v = random_qkv(1, 2, 40, 40, 16, dtype=torch.float64)
    full = attnkit.attention(q, k, v, pattern=P.causal(), engine="reference")
    for engine in ("reference", "tiled", "auto"):
        last = attnkit.attention(q[:, :, -5:], k, v, pattern=P.causal(), engine=engine)
        assert_close(last, full[:, :, -5:])


def test_gqa_equals_repeated_heads():
    q, k, v = random_qkv(2, 6, 30, 30, 8, kv_heads=2, dtype=torch.float64)
    pat = P.sliding_window(4) & P.causal()
    a = attnkit.attention(q, k, v, pattern=pat, engine="tiled", block_q=8, block_kv=8)
    b = attnkit.attention(q, repeat_kv(k, 6), repeat_kv(v, 6), pattern=pat, engine="tiled")
    assert_close(a, b)


def test_document_equals_running_each_document_alone():
    ids = torch.tensor([0] * 13 + [1] * 20 + [2] * 7)
    q, k, v = random_qkv(1, 2, 40, 40, 8, dtype=torch.float64)
    out = attnkit.attention(q, k, v, pattern=P.document(ids) & P.causal(), engine="tiled", block_q=8, block_kv=8)
    start = 0
    for n in (13, 20, 7):
        s = slice(start, start + n)
        alone = attnkit.attention(q[:, :, s], k[:, :, s], v[:, :, s], pattern=P.causal(), engine="reference")
        assert_close(out[:, :, s], alone)
        start += n


@pytest.mark.parametrize("engine", ["reference", "tiled"])
@pytest.mark.parametrize("norm", ["softmax", "sigmoid", "softplus"])
def test_fully_masked_rows_give_zeros_without_nan(engine, norm):
    q, k, v = random_qkv(2, 2, 20, 20, 8, requires_grad=True)
    pat = P.key_padding([0, 20]) & P.causal()
    out = attnkit.attention(q, k, v, pattern=pat, normalization=norm, engine=engine)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_sinkhorn_one_iteration_is_softmax_and_converges_to_doubly_stochastic():
    q, k, v = random_qkv(1, 2, 16, 16, 8, dtype=torch.float64)
    one = attnkit.attention(q, k, v, normalization=N.sinkhorn(1))
    assert_close(one, attnkit.attention(q, k, v, engine="reference"))
    from attnkit.ops.exact.reference import attention_weights

    w = attention_weights(q, k, pattern=None, score_mod=None, normalization=N.sinkhorn(41), scale=8 ** -0.5)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.sum(-2), torch.ones(1, 2, 16, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sigmoid_zero_logits_and_additivity_over_key_sets():
    n = 12
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    k, v = torch.randn(1, 1, n, 4, dtype=torch.float64), torch.randn(1, 1, n, 5, dtype=torch.float64)
    out = attnkit.attention(q, k, v, normalization="sigmoid")
    assert_close(out, (v.sum(2, keepdim=True) / (1 + n)).expand_as(out))  # sigmoid(-log n) = 1 / (1 + n)
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    sig = N.sigmoid(bias=-math.log(n))
    first = attnkit.attention(q, k, v, normalization=sig, pattern=P.custom(lambda b, h, i, j: j < 5))
    rest = attnkit.attention(q, k, v, normalization=sig, pattern=P.custom(lambda b, h, i, j: j >= 5))
    assert_close(first + rest, attnkit.attention(q, k, v, normalization=sig), )


def test_relu_divides_by_length():
    q, k, v = random_qkv(1, 1, 5, 9, 4, dtype=torch.float64)
    s = (q @ k.transpose(-1, -2)) * 0.5
    assert_close(attnkit.attention(q, k, v, normalization="relu", engine="tiled"), torch.relu(s) / 9 @ v)


def test_window_covering_everything_equals_dense():
    q, k, v = random_qkv(1, 2, 50, 50, 8, dtype=torch.float64)
    assert_close(attnkit.attention(q, k, v, pattern=P.sliding_window(49), engine="tiled"),
                 attnkit.attention(q, k, v, engine="reference"))


def test_plan_is_linear_in_sequence_length_for_sliding_window():
    # The plan never holds more than TILE_ELEMENTS scores per step, and the number of computed tiles grows
    # linearly: this is what keeps memory O(n) at any length.
    counts = []
    for n in (4096, 8192, 16384):
        plan = make_plan(P.sliding_window(256), n, n, 64, 64, 1, 8, 8, 8 * 64 * 64, torch.device("cpu"))
        assert all(s.idx.numel() * 8 * 64 * 64 <= TILE_ELEMENTS for s in plan.steps)
        counts.append(plan.computed_tiles)
    assert counts[2] / counts[1] == pytest.approx(2, rel=0.02) and counts[1] / counts[0] == pytest.approx(2, rel=0.02)


def test_sliding_window_skips_empty_tiles():
    sol = P.speed_of_light(P.sliding_window(256), 16384, block_q=64, block_kv=64)
    assert sol["density"] == pytest.approx(513 / 16384, rel=0.02)
    assert sol["tile_fraction"] < 1.2 * (576 / 16384)


def test_fused_plans_merge_band_interiors_into_strided_runs():
    """The fused path joins a band's interior rows into one kernel call read through overlapping strided views;
    the result equals the reference (values and grads) including the ragged rows at both ends."""
    plan = make_plan(P.sliding_window(256), 16384, 16384, 32, 32, 1, 8, 8, 8 * 32 * 32, torch.device("cpu"),
                     1 << 40, 0, True)
    assert len(plan.steps) < 40 and max(s.r1 - s.r0 for s in plan.steps) > 1
    assert sum(s.r1 - s.r0 for s in plan.steps) == 16384 // 32
    q, k, v = random_qkv(1, 4, 300, 300, 16, kv_heads=2, dtype=torch.float64, requires_grad=True)
    pat = P.sliding_window(40, 7)
    ref = attnkit.attention(q, k, v, pattern=pat, engine="reference")
    out = attnkit.attention(q, k, v, pattern=pat, engine="tiled", block_q=8, block_kv=8)
    assert_close(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-kernel", "general"])
def test_non_contiguous_inputs_from_a_seq_major_layout(fused, monkeypatch):
    """q, k, v as models produce them ([B, L, H, D] transposed to [B, H, L, D], no copy): the strided key views of
    merged runs must follow the tensors' own strides."""
    monkeypatch.setattr(attnkit.ops.exact.tiled, "USE_FUSED_CPU_KERNEL", fused)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 304, 4, 16, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for _ in range(3))
    pat = P.sliding_window(40, 7)
    ref = attnkit.attention(q, k, v, pattern=pat, engine="reference")
    out = attnkit.attention(q, k, v, pattern=pat, engine="tiled", block_q=8, block_kv=8)
    assert_close(out, ref)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_close(a, b)
