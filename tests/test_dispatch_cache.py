"""The dispatch cache (issue 23): engine="auto"'s decision and the flex BlockMask remembered by the call's
structure, keyed so that different pattern parameters never share an entry."""

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.backends import dispatch, flex
from attnkit.backends.dispatch import structure_key
from attnkit.normalizations import resolve
from attnkit.ops.exact.reference import reference_attention
from attnkit.testing import assert_close


def test_structure_key_by_parameters():
    assert structure_key(P.sliding_window(16)) == structure_key(P.sliding_window(16))
    assert structure_key(P.sliding_window(16)) != structure_key(P.sliding_window(32))
    assert structure_key(P.sliding_window(16, 0)) != structure_key(P.sliding_window(16))
    assert structure_key(P.causal() & P.sliding_window(8)) != structure_key(P.causal() & P.sliding_window(9))
    assert structure_key(P.causal() & P.sliding_window(8)) != structure_key(P.causal() | P.sliding_window(8))
    assert structure_key(P.per_head_window([2, 4])) != structure_key(P.per_head_window([2, 5]))
    assert structure_key(P.block_local(16)) != structure_key(P.dilated(16, 1))
    # tensors a pattern holds: small host ones by value, others by identity
    ids = torch.tensor([0, 0, 1, 1])
    assert structure_key(P.document(ids)) == structure_key(P.document(ids))
    assert structure_key(P.document(ids)) == structure_key(P.document(ids.clone()))  # small: by value
    assert structure_key(P.document(ids)) != structure_key(P.document(torch.tensor([0, 1, 1, 1])))
    big = torch.zeros(1000, dtype=torch.long)
    assert structure_key(P.document(big)) != structure_key(P.document(big.clone()))  # large: by identity


def test_auto_decision_cache_distinguishes_structure():
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    sm = resolve("softmax")
    for w in (3, 7, 3, 11):  # a pattern seen before with other parameters in between
        pat = P.sliding_window(w)
        out = attnkit.attention(q, k, v, pattern=pat)
        assert_close(out, reference_attention(q, k, v, pattern=pat, normalization=sm, scale=8 ** -0.5),
                     dtype=torch.float64)
    # same structure, engine chosen once: a second call does not consult the backends again
    dispatch.invalidate()
    calls = []
    from attnkit.backends import base

    orig = base.select

    def spy(*a, **kw):
        calls.append(a[1])
        return orig(*a, **kw)

    base.select = spy
    try:
        for _ in range(3):
            attnkit.attention(q, k, v, pattern=P.sliding_window(5))
        assert len(calls) == 1
        attnkit.attention(q, k, v, pattern=P.sliding_window(6))
        attnkit.attention(q.float(), k.float(), v.float(), pattern=P.sliding_window(5))
        attnkit.attention(q[:, :, :20], k, v, pattern=P.sliding_window(5))
        assert len(calls) == 4
        with torch.enable_grad():
            attnkit.attention(q.requires_grad_(), k, v, pattern=P.sliding_window(5))
        assert len(calls) == 5
    finally:
        base.select = orig


def test_flex_block_masks_never_shared_across_parameters():
    # the flex engine's BlockMask cache: keyed by the pattern's parameters, so windows 16 and 300 get their own
    # masks (a reused mask would skip tiles the wider window needs); equal parameters share one
    pytest.importorskip("torch.nn.attention.flex_attention")
    flex._CACHE.clear()
    a = flex._entry(P.sliding_window(16), None, 512, 512, 1, 1, torch.device("cpu"))
    b = flex._entry(P.sliding_window(300), None, 512, 512, 1, 1, torch.device("cpu"))
    c = flex._entry(P.sliding_window(16), None, 512, 512, 1, 1, torch.device("cpu"))
    assert a[2] is not b[2] and a[2] is c[2]
    assert not torch.equal(a[2].kv_num_blocks, b[2].kv_num_blocks)
    qi, ki = torch.tensor(0), torch.tensor(40)
    assert not bool(a[2].mask_mod(0, 0, qi, ki)) and bool(b[2].mask_mod(0, 0, qi, ki))
    d = flex._entry(P.sliding_window(16), None, 512, 384, 1, 1, torch.device("cpu"))
    assert d[2] is not a[2]


def test_neighborhood_spec_cache_validates_types():
    x = torch.randn(1, 1, 8, 8, 4)
    attnkit.neighborhood(x, x, x, kernel_size=3)
    with pytest.raises((TypeError, ValueError)):
        attnkit.neighborhood(x, x, x, kernel_size=3.0)


# -- no silent cliff: flex compile failures fall back to SDPA with the materialised mask, said once ------------

def test_lowered_masks_equal_the_predicates():
    # per_head_window and hierarchical get mask_mods made of indexing and arithmetic only (their predicates
    # build tensors, which inductor cannot lower); they must agree with the predicates everywhere
    from attnkit.ops.exact.variants import hdt_layout

    lv, gid, _ = hdt_layout([[5, 7], [3, 9, 4]])
    n = lv.shape[0]
    pats = [P.per_head_window([2, None, 5]), P.per_head_window([2, None, 5], causal=True),
            P.hierarchical(lv, gid), P.hierarchical(torch.stack([lv, lv.flip(0)]), torch.stack([gid, gid.flip(-1)]))]
    b = torch.arange(2).view(-1, 1, 1, 1)
    h = torch.arange(3).view(1, -1, 1, 1)
    qi = torch.arange(n).view(1, 1, -1, 1)
    ki = torch.arange(n).view(1, 1, 1, -1)
    for pat in pats:
        fn = flex.lower_pattern(pat, n, n, torch.device("cpu"))
        want = pat.allowed(b, h, qi, ki, n, n).expand(2, 3, n, n)
        got = fn(b, h, qi, ki).expand(2, 3, n, n)
        assert torch.equal(got, want), pat


@pytest.mark.slow
def test_flex_cpu_compiles_per_head_window_and_hierarchical():
    # failed on CUDA (and per_head_window on the CPU compile too) before the lowering above
    from attnkit.ops.exact.variants import hdt_layout

    lv, gid, _ = hdt_layout([[20, 30], [25, 35]])
    n = lv.shape[0]
    q, k, v = (torch.randn(1, 4, n, 16) for _ in range(3))
    sm = resolve("softmax")
    for pat in (P.per_head_window([4, 8, None, 16]), P.hierarchical(lv, gid)):
        with torch.no_grad():
            out = attnkit.attention(q, k, v, pattern=pat, engine="flex")
        assert_close(out, reference_attention(q, k, v, pattern=pat, normalization=sm, scale=0.25),
                     dtype=torch.float32)


def _fallback_table(monkeypatch):
    # CPU stand-in for CUDA's order: flex first (failing to compile), then sdpa_mask, then tiled
    import dataclasses

    from attnkit.backends import base

    base._load()
    table = base._BACKENDS["attention"]

    def failing_flex(c):
        flex._mark_failed(c["pattern"], "InductorError: LoweringException: simulated")
        raise flex.FlexCompileError(f"FlexAttention could not compile pattern {c['pattern']!r}: simulated")

    def reasons(c):
        return flex.flex_reasons(dict(c, needs_grad=False))

    monkeypatch.setitem(table, "flex", dataclasses.replace(table["flex"], rank={"cpu": 0}, run=failing_flex,
                                                           reasons=reasons))
    monkeypatch.setitem(table, "sdpa_mask", dataclasses.replace(table["sdpa_mask"], rank={"cpu": 0.5}))
    monkeypatch.setattr(flex, "_FAILED", {})
    dispatch.invalidate()


def test_flex_failure_falls_back_to_sdpa_mask_and_warns_once(monkeypatch):
    import warnings

    _fallback_table(monkeypatch)
    pat = P.per_head_window([3, 9]) & P.key_padding([0, 30])  # batch 0: every row masked (zeros, no NaN)
    q, k, v = (torch.randn(2, 2, 30, 8, requires_grad=True) for _ in range(3))
    with pytest.warns(RuntimeWarning, match=r"per_head_window.*'sdpa_mask'"):
        out = attnkit.attention(q, k, v, pattern=pat)
    sm = resolve("softmax")
    want = reference_attention(q, k, v, pattern=pat, normalization=sm, scale=8 ** -0.5)
    assert_close(out, want, dtype=torch.float32)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: an equal pattern built anew does not warn again
        again = attnkit.attention(q, k, v, pattern=P.per_head_window([3, 9]) & P.key_padding([0, 30]))
    assert_close(again, want, dtype=torch.float32)
    ex = attnkit.explain(q, k, v, pattern=pat)
    assert ex.chosen == "sdpa_mask" and any("could not compile" in r for r in ex.reasons["flex"])
    assert "sdpa_mask" in str(ex)


def test_sdpa_mask_refuses_beyond_its_budget(monkeypatch):
    monkeypatch.setenv("ATTNKIT_MASK_BUDGET", str(1000))
    q = torch.randn(1, 2, 40, 8)
    ex = attnkit.explain(q, q, q, pattern=P.sliding_window(4), engine="sdpa_mask")
    assert ex.chosen is None and any("ATTNKIT_MASK_BUDGET" in r for r in ex.reasons["sdpa_mask"])


def test_explain_names_the_engine_and_reasons():
    q = torch.randn(1, 2, 64, 8)
    ex = attnkit.explain(q, q, q, pattern=P.sliding_window(4))
    assert ex.chosen == "tiled" and ex.reasons["sdpa"] and "pattern" in ex.reasons["sdpa"][0]
    assert ex.chosen == attnkit.functional.exact.select_engine(q, q, q, P.sliding_window(4), None, resolve("softmax"),
                                                            "auto")
    x = torch.randn(1, 2, 8, 8, 8)
    nb = attnkit.explain(x, x, x, kernel_size=3)
    assert nb.operation == "neighborhood" and nb.chosen == "tiled"


def test_auto_leaves_small_cuda_calls_to_sdpa_mask():
    # a compile per shape costs seconds (and failed for MultiheadAttention with sliding_window(16) at 100 tokens on
    # an H200); below FLEX_MIN_PAIRS auto runs SDPA with the materialised mask on CUDA
    from attnkit.backends.flex import FLEX_MIN_PAIRS, flex_reasons

    call = {"device": torch.device("cuda"), "norm": resolve("softmax"), "needs_grad": True, "return_lse": False,
            "head_dim": 16, "q_len": 100, "kv_len": 100, "pattern": P.sliding_window(16), "score_mod": None}
    if not flex.flex_available():
        pytest.skip("no FlexAttention in this torch")
    assert any("materialised mask" in r for r in flex_reasons(dict(call, auto=True)))
    assert flex_reasons(call) == []  # named: runs
    big = dict(call, auto=True, q_len=256, kv_len=256)
    assert 256 * 256 >= FLEX_MIN_PAIRS and flex_reasons(big) == []


def test_linear_decisions_are_cached_per_structure():
    from attnkit.backends import base
    from attnkit.ops.linear.reference import linear_attention_reference

    q, k, v = (torch.rand(1, 2, 24, 8, dtype=torch.float64) for _ in range(3))
    dispatch.invalidate()
    calls = []
    orig = base.select

    def spy(*a, **kw):
        calls.append(a[0])
        return orig(*a, **kw)

    base.select = spy
    try:
        for _ in range(3):
            attnkit.linear_attention(q, k, v, causal=True)
        assert calls == ["linear"]
        for fm in ("elu", "relu"):
            out = attnkit.linear_attention(q, k, v, causal=True, feature_map=fm)
            assert_close(out, linear_attention_reference(q, k, v, feature_map=fm, causal=True), dtype=torch.float64)
        with base.use_engine("linear", "reference"):  # a forced engine is part of the key
            attnkit.linear_attention(q, k, v, causal=True)
        assert calls == ["linear"] * 3
    finally:
        base.select = orig
