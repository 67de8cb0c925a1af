"""Kernelized linear attention: every mode and feature map against the quadratic reference."""

from __future__ import annotations

import pytest
import torch

import attnkit.ops.linear.chunked as chunked_mod
from attnkit import feature_maps as fmaps
from attnkit.errors import NotSupportedError
from attnkit.functional.linear import linear_attention
from attnkit.ops.linear import LinearAttentionState, linear_attention_reference
from attnkit.testing import assert_close, random_qkv


def make_map(name: str, d: int, heads: int = 2) -> fmaps.FeatureMap:
    """A token-local instance of every map (so states can be carried), with small feature counts."""
    if name in ("favor", "trig", "dijiang"):
        return fmaps.get(name, num_features=12, seed=3)
    if name == "cosformer":
        return fmaps.CosformerFeatureMap(max_len=512)
    if name == "lln":
        return fmaps.LogNormalFeatureMap(alpha=0.7, beta=0.6, stabilize=False)
    if name == "rebased":
        fm = fmaps.RebasedFeatureMap(d, num_heads=heads)
    elif name == "hedgehog":
        fm = fmaps.HedgehogFeatureMap(d, num_heads=heads)
    else:
        return fmaps.get(name)
    with torch.no_grad():  # move learnable maps off their initialisation so the test is not a special case
        for p in fm.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return fm.double()


ALL_MAPS = sorted(fmaps.FEATURE_MAPS)
SIGNED = {"identity", "trig", "cosine"}


def norm_for(name: str) -> str:
    # Signed maps have denominators that cross zero; compare them unnormalised (their usual mode).
    return "none" if name in SIGNED else "denominator"


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 tokens so short sequences span several blocks of the chunked engine."""
    monkeypatch.setattr(chunked_mod, "BLOCK_TOKENS", 16)


@pytest.mark.parametrize("name", ALL_MAPS)
def test_modes_agree_causal(name, small_blocks):
    q, k, v = random_qkv(1, 2, 45, dim=6, kv_heads=1, dim_v=5, dtype=torch.float64, seed=1)
    fm = make_map(name, 6)
    kw = dict(feature_map=fm, causal=True, normalize=norm_for(name))
    ref, ref_state = linear_attention_reference(q, k, v, return_state=True, **kw)
    outs = {"parallel": linear_attention(q, k, v, mode="parallel", return_state=True, **kw),
            "recurrent": linear_attention(q, k, v, mode="recurrent", return_state=True, **kw)}
    for cs in (1, 7, 64, 256):
        outs[f"chunked{cs}"] = linear_attention(q, k, v, mode="chunked", chunk_size=cs, return_state=True, **kw)
    for mode, (out, state) in outs.items():
        assert_close(out, ref, msg=f"{name} {mode}")
        assert_close(state.S, ref_state.S, msg=f"{name} {mode} state S")
        assert_close(state.z, ref_state.z, msg=f"{name} {mode} state z")
        assert state.offset == 45


@pytest.mark.parametrize("name", ["elu", "favor", "identity", "taylor", "cosformer"])
@pytest.mark.parametrize("normalize", ["denominator", "none", "rms"])
def test_decay_modes_agree(name, normalize, small_blocks):
    q, k, v = random_qkv(2, 2, 37, dim=4, dtype=torch.float64, seed=2)
    decay = torch.tensor([0.6, 0.97])
    fm = make_map(name, 4)
    if normalize != "denominator" and name == "favor":  # its stabilising shifts cancel only then
        fm = fmaps.get(name, num_features=12, seed=3, stabilize=False)
    kw = dict(feature_map=fm, causal=True, decay=decay, normalize=normalize)
    ref = linear_attention_reference(q, k, v, **kw)
    assert_close(linear_attention(q, k, v, mode="parallel", **kw), ref)
    assert_close(linear_attention(q, k, v, mode="recurrent", **kw), ref)
    for cs in (1, 7, 64, 256):
        assert_close(linear_attention(q, k, v, mode="chunked", chunk_size=cs, **kw), ref, msg=f"chunk {cs}")


def test_decay_matches_definition():
    """Decay weights token j by lambda^(i-j): check one output against the explicit sum."""
    q, k, v = random_qkv(1, 1, 9, dim=3, dtype=torch.float64, seed=4)
    lam = 0.7
    out = linear_attention(q, k, v, causal=True, decay=lam, normalize="none", feature_map="identity")
    i = 8
    expect = sum(lam ** (i - j) * (q[0, 0, i] @ k[0, 0, j]) * v[0, 0, j] for j in range(i + 1))
    torch.testing.assert_close(out[0, 0, i], expect)


@pytest.mark.parametrize("name", ALL_MAPS)
@pytest.mark.parametrize("decay", [None, 0.9])
def test_state_carry_equals_one_call(name, decay, small_blocks):
    q, k, v = random_qkv(1, 2, 40, dim=4, dtype=torch.float64, seed=5)
    fm = make_map(name, 4)
    kw = dict(feature_map=fm, causal=True, decay=decay, normalize=norm_for(name))
    full, full_state = linear_attention(q, k, v, return_state=True, **kw)
    # prefill 23 tokens (chunked), 10 more (chunked, chunk 4), then decode the rest one token at a time
    o1, s = linear_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], return_state=True, **kw)
    o2, s = linear_attention(q[:, :, 23:33], k[:, :, 23:33], v[:, :, 23:33], chunk_size=4, state=s,
                             return_state=True, **kw)
    steps = []
    for t in range(33, 40):
        o, s = linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state=s, return_state=True,
                                **kw)
        steps.append(o)
    assert_close(torch.cat([o1, o2, *steps], dim=2), full)
    assert_close(s.S, full_state.S)
    assert_close(s.z, full_state.z)
    assert s.offset == 40 and s.nbytes == full_state.nbytes


def test_state_definition_and_tuple_state():
    """The state equals sum_j lambda^(n-1-j) phi(k_j) v_j^T; a plain (S, z) tuple is accepted."""
    q, k, v = random_qkv(1, 1, 6, dim=3, dtype=torch.float64, seed=6)
    lam = 0.8
    _, st = linear_attention(q, k, v, causal=True, decay=lam, return_state=True)
    pk = torch.nn.functional.elu(k[0, 0]) + 1
    S = sum(lam ** (5 - j) * torch.outer(pk[j], v[0, 0, j]) for j in range(6))
    torch.testing.assert_close(st.S[0, 0], S)
    torch.testing.assert_close(st.z[0, 0], sum(lam ** (5 - j) * pk[j] for j in range(6)))
    q2, k2, v2 = random_qkv(1, 1, 3, dim=3, dtype=torch.float64, seed=7)
    a = linear_attention(q2, k2, v2, causal=True, state=st)
    b = linear_attention(q2, k2, v2, causal=True, state=(st.S, st.z))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ALL_MAPS)
def test_non_causal_matches_reference(name):
    q, k, v = random_qkv(2, 2, 11, kv_len=17, dim=5, kv_heads=1, dtype=torch.float64, seed=8)
    fm = make_map(name, 5) if name != "cosformer" else fmaps.CosformerFeatureMap()
    kw = dict(feature_map=fm, normalize=norm_for(name))
    assert_close(linear_attention(q, k, v, **kw), linear_attention_reference(q, k, v, **kw))


def test_non_causal_state_adds_prefix():
    q, k, v = random_qkv(1, 2, 8, dim=4, dtype=torch.float64, seed=9)
    _, st = linear_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], return_state=True)
    out = linear_attention(q, k[:, :, 3:], v[:, :, 3:], state=st)
    assert_close(out, linear_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["chunked", "recurrent", "parallel"])
def test_dtypes(dtype, mode):
    q, k, v = random_qkv(2, 4, 70, dim=24, kv_heads=2, dtype=dtype, seed=10)
    out = linear_attention(q, k, v, causal=True, mode=mode, chunk_size=16, decay=0.95)
    assert out.dtype == dtype
    ref = linear_attention_reference(q.double(), k.double(), v.double(), causal=True, decay=0.95)
    assert_close(out, ref)


def test_half_precision_long_sequence_does_not_overflow():
    """The denominator of elu+1 grows like n: 65,536 tokens exceed float16's 65,504; accumulation is fp32."""
    n = 65536
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g) for _ in range(3))
    q = q + 3.0  # large positive features make the denominator large
    expect = linear_attention(q, k, v, causal=True)
    for dtype in (torch.float16, torch.bfloat16):
        out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
        assert torch.isfinite(out).all()
        assert_close(out, expect, dtype=dtype, scale=2.0)
        _, st = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, return_state=True)
        assert st.S.dtype == torch.float32 and st.z.max() > 65504  # state kept in float32
    out = linear_attention(q.half(), k.half(), v.half())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode,decay", [("chunked", None), ("chunked", 0.8), ("parallel", 0.8),
                                        ("recurrent", 0.8), ("parallel", None)])
def test_gradcheck(mode, decay):
    q, k, v = random_qkv(1, 2, 5, dim=3, dtype=torch.float64, seed=11, requires_grad=True)
    causal = not (mode == "parallel" and decay is None)

    def f(q, k, v):
        return linear_attention(q, k, v, causal=causal, mode=mode, chunk_size=2, decay=decay)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("name", ["elu", "favor", "taylor", "rebased", "hedgehog", "cosformer", "lln"])
def test_backward_matches_reference(name, small_blocks):
    fm = make_map(name, 4)
    q, k, v = random_qkv(1, 2, 21, dim=4, dtype=torch.float64, seed=12, requires_grad=True)
    g = torch.randn(1, 2, 21, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = [q, k, v, *fm.parameters()]
    grads = {}
    for mode in ("reference", "chunked", "recurrent"):
        kw = dict(feature_map=fm, causal=True, decay=0.9)
        if mode == "reference":
            out = linear_attention_reference(q, k, v, **kw)
        else:
            out = linear_attention(q, k, v, mode=mode, chunk_size=4, **kw)
        grads[mode] = torch.autograd.grad((out * g).sum(), params)
    for mode in ("chunked", "recurrent"):
        for a, b in zip(grads[mode], grads["reference"]):
            assert_close(a, b)


def test_gqa_equals_repeated_heads():
    q, k, v = random_qkv(1, 4, 19, dim=4, kv_heads=2, dtype=torch.float64, seed=13)
    kr, vr = (t.repeat_interleave(2, dim=1) for t in (k, v))
    torch.testing.assert_close(linear_attention(q, k, v, causal=True), linear_attention(q, kr, vr, causal=True))


def test_causal_never_looks_ahead():
    q, k, v = random_qkv(1, 2, 30, dim=4, dtype=torch.float64, seed=14)
    out = linear_attention(q, k, v, causal=True, chunk_size=8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 5
    v2[:, :, 20:] -= 3
    out2 = linear_attention(q, k2, v2, causal=True, chunk_size=8)
    torch.testing.assert_close(out[:, :, :20], out2[:, :, :20])
    assert not torch.allclose(out[:, :, 20:], out2[:, :, 20:])


def test_signed_denominator_stays_finite():
    q, k, v = random_qkv(1, 2, 64, dim=8, dtype=torch.float32, seed=15)
    for name in ("trig", "cosine", "identity"):
        out = linear_attention(q, k, v, causal=True, feature_map=name)
        assert torch.isfinite(out).all(), name
    # relu: a query with no positive entry has a zero denominator -> output 0, not nan
    q = -q.abs()
    out = linear_attention(q, k, v, feature_map="relu")
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_decode_state_size_is_constant():
    q, k, v = random_qkv(1, 2, 50, dim=4, seed=16)
    _, s10 = linear_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], causal=True, return_state=True)
    _, s50 = linear_attention(q, k, v, causal=True, return_state=True)
    assert s10.nbytes == s50.nbytes == fmaps.get("elu").state_bytes(4) * 2


def test_errors_are_helpful():
    q, k, v = random_qkv(1, 2, 8, dim=4, seed=17)
    with pytest.raises(ValueError, match="mode"):
        linear_attention(q, k, v, mode="fast")
    with pytest.raises(NotSupportedError, match="causal"):
        linear_attention(q, k, v, decay=0.9)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        linear_attention(q, k, v, causal=True, decay=1.5)
    with pytest.raises(ValueError, match="one value per query head"):
        linear_attention(q, k, v, causal=True, decay=[0.5, 0.6, 0.7])
    with pytest.raises(NotSupportedError, match="parallel"):
        linear_attention(q, k, v, mode="chunked")
    with pytest.raises(NotSupportedError, match="as many queries as keys"):
        linear_attention(q, k[:, :, :5], v[:, :, :5], causal=True)
    with pytest.raises(NotSupportedError, match="max_len"):
        linear_attention(q, k, v, causal=True, feature_map="cosformer", return_state=True)
    with pytest.raises(ValueError, match="unknown feature map"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="normalize"):
        linear_attention(q, k, v, normalize="layer")
    bad = LinearAttentionState(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="state.S"):
        linear_attention(q, k, v, causal=True, state=bad)
    with pytest.raises(ValueError, match="max_len"):
        linear_attention(q, k, v, causal=True, feature_map=fmaps.CosformerFeatureMap(max_len=4))


# -- registry records ---------------------------------------------------------------------------------------

LINEAR_MECHANISMS = ["based", "cosformer", "dijiang", "efficientvit", "focused", "hedgehog",
                     "lightning", "linear_elu", "lln", "performer", "rebased", "trig_rf"]


def test_registry_lists_the_family():
    import attnkit

    names = {m.name for m in attnkit.list_mechanisms("linear")}
    assert set(LINEAR_MECHANISMS) <= names
    assert {"linear_elu", "performer"} <= {m.name for m in attnkit.list_mechanisms("linear") if m.in_default_bench}


@pytest.mark.parametrize("name", LINEAR_MECHANISMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_registry_mechanism_matches_reference(name, causal):
    import attnkit

    info = attnkit.mechanism_info(name)
    assert info.family == "linear" and info.causal and not info.exact
    fn = attnkit.get(name, causal=causal, head_dim=8, num_heads=2, **dict(info.bench_params))
    assert isinstance(fn, torch.nn.Module)
    fn = fn.double()
    q, k, v = random_qkv(1, 2, 37, dim=8, dtype=torch.float64, seed=4)
    out = fn(q, k, v)
    expected = linear_attention_reference(q, k, v, feature_map=fn.feature_map, causal=causal,
                                          decay=fn.engine.get("decay"),
                                          normalize=fn.engine.get("normalize", "denominator"))
    assert_close(out, expected)
    m = fn.feature_map.feature_dim(8)
    assert info.extras["feature_dim"](8) == m
    assert info.extras["state_bytes"](8) == m * 9 * 4
    flops = info.flops(batch=1, heads=2, q_len=37, kv_len=37, head_dim=8, causal=causal)
    assert flops > 4 * 37 * m * 8


def test_registry_parameters_and_errors():
    import attnkit

    fn = attnkit.get("performer", num_features=16, chunk_size=8, causal=True)
    assert fn.feature_map.num_features == 16 and fn.engine["chunk_size"] == 8
    assert attnkit.get("lightning", causal=True, num_heads=3).engine["decay"].shape == (3,)
    assert "decay" not in attnkit.get("lightning", num_heads=3).engine
    with pytest.raises(TypeError, match="needs num_heads"):
        attnkit.get("lightning", causal=True)
    with pytest.raises(TypeError, match="feature map 'elu'"):
        attnkit.get("linear_elu", num_features=3)


@pytest.mark.parametrize("per_head", [True, False], ids=["per_head_features", "block_features"])
@pytest.mark.parametrize("name", ["elu", "favor", "taylor", "hedgehog"])
def test_inference_fast_path_equals_batched_path(name, per_head, small_blocks, monkeypatch):
    """Without decay and gradients the chunked mode runs a head-by-head path; it must equal the batched one
    (used with gradients) for grouped-query heads, a carried state and lengths that do not fill a block."""
    monkeypatch.setattr(chunked_mod, "PER_HEAD_FEATURES", per_head)
    q, k, v = random_qkv(2, 4, 53, dim=4, kv_heads=2, dim_v=3, dtype=torch.float64, seed=21)
    fm = make_map(name, 4, heads=4)
    fm.requires_grad_(False)
    kw = dict(feature_map=fm, causal=True, mode="chunked", chunk_size=5)
    with torch.no_grad():
        _, s = linear_attention(q[:, :, :17], k[:, :, :17], v[:, :, :17], return_state=True, **kw)
        fast, fast_s = linear_attention(q[:, :, 17:], k[:, :, 17:], v[:, :, 17:], state=s, return_state=True, **kw)
    qg = q.clone().requires_grad_(True)  # gradients on: the batched path
    slow, slow_s = linear_attention(qg[:, :, 17:], k[:, :, 17:], v[:, :, 17:], state=s, return_state=True, **kw)
    assert_close(fast, slow.detach())
    assert_close(fast_s.S, slow_s.S.detach())
    assert_close(fast_s.z, slow_s.z.detach())
    ref = linear_attention_reference(q, k, v, feature_map=fm, causal=True)
    assert_close(fast, ref[:, :, 17:])


def test_chunked_blocks_read_inputs_through_one_split():
    # Each block sliced out of the whole input made autograd add a zero-filled gradient of the whole tensor per
    # block (quadratic backward: 16K tokens cost 9.6x 4K on CPU); one split per tensor reads it once.
    from attnkit.feature_maps import get as get_fm
    from attnkit.ops.linear._common import make_finalize
    from attnkit.ops.linear.chunked import chunked_forward

    q, k, v = (torch.randn(1, 2, 512, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ld = torch.log(torch.tensor([0.9, 0.99], dtype=torch.float64))
    out, _ = chunked_forward(q, k, v, get_fm("elu"), log_decay=ld,
                             s0=None, offset=0, chunk_size=16, finalize=make_finalize("denominator", 1e-6, q.dtype),
                             block_tokens=64)  # 8 blocks
    readers = {id(t): 0 for t in (q, k, v)}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and type(nxt).__name__ == "AccumulateGrad" and id(nxt.variable) in readers:
                readers[id(nxt.variable)] += 1
            stack.append(nxt)
    assert all(n == 1 for n in readers.values()), readers
