"""Data-dependent decay (GLA) and the delta rule: chunked == recurrence == reference for every chunk size,
carried states, gradients, dtypes, the papers' invariants and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from attnkit import linear_attention
from attnkit.ops.linear import gated
from attnkit.ops.linear.gated import (
    delta_rule_attention,
    delta_rule_reference,
    gated_linear_attention,
    gated_linear_attention_reference,
)
from attnkit.testing import assert_close, random_qkv

F64 = torch.float64


def _gate(shape, seed, strength=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return F.logsigmoid(torch.randn(*shape, generator=g, dtype=F64) * 2 + 1) * strength


def _case(n=37, dk=8, dv=6, heads=3, kv_heads=None, seed=0, dtype=F64, requires_grad=False):
    q, k, v = random_qkv(2, heads, n, dim=dk, dim_v=dv, kv_heads=kv_heads, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    s0 = torch.randn(2, heads, dk, dv, generator=g, dtype=F64).to(dtype)
    beta = torch.sigmoid(torch.randn(2, heads, n, generator=g, dtype=F64)).to(dtype)
    ts = (q, k, v, s0, beta)
    return tuple(t.requires_grad_(requires_grad) for t in ts)


CHUNKS = [1, 3, 16, 32, 48, 64, 100]


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("n", [1, 37, 65])
def test_gated_chunked_equals_reference_for_every_chunk_size(gate, n):
    q, k, v, s0, _ = _case(n=n, kv_heads=1)
    g = _gate((2, 3, n) if gate == "scalar" else (2, 3, n, 8), seed=1)
    ref, s_ref = gated_linear_attention_reference(q, k, v, g, initial_state=s0, return_state=True)
    for mode, c in [("recurrent", 64)] + [("chunked", c) for c in CHUNKS]:
        out, s = gated_linear_attention(q, k, v, g, mode=mode, chunk_size=c, initial_state=s0, return_state=True)
        assert_close(out, ref, msg=f"{mode} c={c}")
        assert_close(s, s_ref, msg=f"state {mode} c={c}")


@pytest.mark.parametrize("gated_delta", [False, True])
@pytest.mark.parametrize("n", [1, 37, 65])
def test_delta_chunked_equals_recurrence_for_every_chunk_size(gated_delta, n):
    q, k, v, s0, beta = _case(n=n, kv_heads=1)
    k = F.normalize(k, dim=-1)
    g = _gate((2, 3, n), seed=2) if gated_delta else None
    ref, s_ref = delta_rule_reference(q, k, v, beta, log_decay=g, initial_state=s0, return_state=True)
    for mode, c in [("recurrent", 64)] + [("chunked", c) for c in CHUNKS]:
        out, s = delta_rule_attention(q, k, v, beta, log_decay=g, mode=mode, chunk_size=c, initial_state=s0,
                                      return_state=True)
        assert_close(out, ref, msg=f"{mode} c={c}")
        assert_close(s, s_ref, msg=f"state {mode} c={c}")


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_strong_gates_stay_finite_and_exact(gate):
    """Decays of exp(-8) per token: a chunk's log-decay span exceeds what one factorised product can hold in
    float32, so the engine takes the sub-chunk (vector) or masked decay-matrix (scalar) path."""
    n = 70
    q, k, v, _, _ = _case(n=n, dk=8, dv=4, seed=3)
    shape = (2, 3, n) if gate == "scalar" else (2, 3, n, 8)
    g = -8.0 * torch.rand(*shape, generator=torch.Generator().manual_seed(4), dtype=F64) - 0.5
    ref = gated_linear_attention_reference(q, k, v, g)
    for c in (16, 64):
        out = gated_linear_attention(q.float(), k.float(), v.float(), g.float(), chunk_size=c)
        assert torch.isfinite(out).all()
        assert_close(out, ref, dtype=torch.float32)
        assert_close(gated_linear_attention(q, k, v, g, chunk_size=c), ref)


def test_sub_chunk_path_equals_the_materialised_intra_chunk_product():
    q, k, _, _, _ = _case(n=64, seed=5)
    G = _gate((2, 3, 64, 8), seed=6).cumsum(-2)
    A = gated._intra_vector(q[:, :, None], k[:, :, None], G[:, :, None], 16)[:, :, 0]  # 4 sub-chunks
    i = torch.arange(64)
    diff = (G[:, :, :, None, :] - G[:, :, None, :, :]).masked_fill(~(i[None, :] <= i[:, None])[..., None], -torch.inf)
    assert_close(A, (q[:, :, :, None, :] * k[:, :, None, :, :] * diff.exp()).sum(-1))


def test_strong_gates_in_the_gated_delta_rule():
    n = 70
    q, k, v, s0, beta = _case(n=n, seed=25)
    k = F.normalize(k, dim=-1)
    g = -8.0 * torch.rand(2, 3, n, generator=torch.Generator().manual_seed(26), dtype=F64) - 0.5
    ref = delta_rule_reference(q, k, v, beta, log_decay=g, initial_state=s0)
    for c in (16, 64):
        out = delta_rule_attention(q.float(), k.float(), v.float(), beta.float(), log_decay=g.float(),
                                   initial_state=s0.float(), chunk_size=c)
        assert torch.isfinite(out).all()
        assert_close(out, ref, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind", ["gla_scalar", "gla_vector", "gated_delta"])
def test_a_decay_of_exactly_zero_matches_the_recurrence_forward_and_backward(kind, dtype):
    """Issue 28: ``log_decay = -inf`` (a decay of exactly 0, which erases the state) at a few tokens made the chunked
    form NaN (``-inf - -inf`` in the within-chunk cumulative sums), forward and backward; the recurrence is finite.
    Zeros at a chunk's first, middle and last token, and a run of two; in one of the vector gate's dimensions."""
    n, c = 29, 8
    q, k, v, s0, beta = _case(n=n, dk=4, dv=3, heads=2, seed=31, dtype=dtype)
    k = F.normalize(k, dim=-1)
    shape = (2, 2, n, 4) if kind == "gla_vector" else (2, 2, n)
    g = _gate(shape, seed=32).to(dtype)
    zero = [0, 8, 11, 12, 15, 27]
    if kind == "gla_vector":
        g[:, :, zero, 1] = -torch.inf
        g[1, 0, 20, :] = -torch.inf
    else:
        g[:, :, zero] = -torch.inf
    results = {}
    for mode in ("recurrent", "chunked"):
        ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v, s0, g)]
        if kind == "gated_delta":
            out, s = delta_rule_attention(ins[0], ins[1], ins[2], beta, log_decay=ins[4], mode=mode, chunk_size=c,
                                          initial_state=ins[3], return_state=True)
        else:
            out, s = gated_linear_attention(ins[0], ins[1], ins[2], ins[4], mode=mode, chunk_size=c,
                                            initial_state=ins[3], return_state=True)
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=dtype)).sum() + s.square().sum()
        loss.backward()
        results[mode] = (out, s, *(t.grad for t in ins))
    for name, a, b in zip(("out", "state", "dq", "dk", "dv", "ds0", "dlog_decay"), results["chunked"],
                          results["recurrent"]):
        assert torch.isfinite(a).all(), f"{kind}: chunked {name} is not finite"
        assert_close(a, b, dtype=dtype, scale=1.0 if dtype == F64 else 4.0, msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", ["gla_scalar", "gla_vector", "delta", "gated_delta"])
def test_prefill_then_decode_equals_one_call(kind):
    """States carry across calls: a chunked prefill of 29 tokens, 7 one-token recurrent steps, then a chunked
    call for the rest equal one call over the whole sequence."""
    n = 50
    q, k, v, _, beta = _case(n=n, seed=7)
    k = F.normalize(k, dim=-1)
    g = _gate((2, 3, n, 8) if kind == "gla_vector" else (2, 3, n), seed=8)

    def call(sl, state, mode):
        if kind.startswith("gla"):
            return gated_linear_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], mode=mode,
                                          chunk_size=16, initial_state=state, return_state=True)
        return delta_rule_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl], mode=mode,
                                    log_decay=g[:, :, sl] if kind == "gated_delta" else None, chunk_size=16,
                                    initial_state=state, return_state=True)

    full, s_full = call(slice(0, n), None, "chunked")
    outs, s = [], None
    out, s = call(slice(0, 29), s, "chunked")
    outs.append(out)
    for t in range(29, 36):
        out, s = call(slice(t, t + 1), s, "auto")
        outs.append(out)
    out, s = call(slice(36, n), s, "chunked")
    outs.append(out)
    assert_close(torch.cat(outs, dim=2), full)
    assert_close(s, s_full)


def test_constant_gate_equals_linear_attention_with_decay():
    """A per-head constant gate is RetNet / Lightning's fixed decay: the existing engine's
    ``linear_attention(..., decay=lambda, feature_map='identity', normalize='none')``."""
    q, k, v, _, _ = _case(n=45, seed=9)
    lam = torch.tensor([0.9, 0.5, 0.99], dtype=F64)
    g = torch.log(lam)[None, :, None].expand(2, 3, 45)
    expect = linear_attention(q, k, v, causal=True, decay=lam, feature_map="identity", normalize="none")
    assert_close(gated_linear_attention(q, k, v, g, chunk_size=16), expect)
    # and the vector gate with equal entries is the scalar gate
    assert_close(gated_linear_attention(q, k, v, g[..., None].expand(2, 3, 45, 8).contiguous()), expect)


def test_zero_gate_is_plain_causal_linear_attention():
    q, k, v, _, _ = _case(n=33, seed=10)
    expect = linear_attention(q, k, v, causal=True, feature_map="identity", normalize="none")
    assert_close(gated_linear_attention(q, k, v, torch.zeros(2, 3, 33, dtype=F64), chunk_size=8), expect)


def test_delta_rule_invariants():
    """beta = 0 never writes; beta = 1 with a unit key overwrites the association of that key exactly
    (S^T k = v afterwards: reading with q = k returns v), which plain linear attention does not."""
    q, k, v, s0, _ = _case(n=20, seed=11)
    k = F.normalize(k, dim=-1)
    out, s = delta_rule_attention(q, k, v, torch.zeros(2, 3, 20, dtype=F64), initial_state=s0, return_state=True)
    assert_close(s, s0)
    assert_close(out, q @ s0)
    ones = torch.ones(2, 3, 20, dtype=F64)
    out = delta_rule_attention(k, k, v, ones, initial_state=s0, chunk_size=8)
    assert_close(out, v)  # o_t = S_t^T k_t = v_t right after writing v_t under k_t


def test_delta_rule_is_one_gradient_step_on_the_reconstruction_loss():
    """Titans / TTT view (D24 test 2): ``M <- M - beta (M k - v) k^T`` is a gradient step of
    ``||M k - v||^2 / 2`` with step size beta, from any M."""
    g = torch.Generator().manual_seed(12)
    M = torch.randn(5, 4, dtype=F64, requires_grad=True)  # [d_v, d_k], the paper's layout
    kk = F.normalize(torch.randn(4, dtype=F64, generator=g), dim=0)
    vv = torch.randn(5, dtype=F64, generator=g)
    beta = 0.7
    (0.5 * (M @ kk - vv).square().sum()).backward()
    stepped = M.detach() - beta * M.grad
    _, s = delta_rule_attention(kk.view(1, 1, 1, 4), kk.view(1, 1, 1, 4), vv.view(1, 1, 1, 5),
                                torch.full((1, 1, 1), beta, dtype=F64), initial_state=M.detach().T[None, None],
                                return_state=True)
    assert_close(s[0, 0].T, stepped)


@pytest.mark.parametrize("kind", ["gla_scalar", "gla_vector", "delta", "gated_delta"])
def test_gradcheck_chunked(kind):
    n = 7
    q, k, v, s0, beta = _case(n=n, dk=3, dv=2, heads=1, seed=13, requires_grad=True)
    gshape = (2, 1, n, 3) if kind == "gla_vector" else (2, 1, n)
    graw = torch.randn(*gshape, dtype=F64, generator=torch.Generator().manual_seed(14), requires_grad=True)

    def f(q, k, v, s0, beta, graw):
        g = F.logsigmoid(graw)
        if kind.startswith("gla"):
            return gated_linear_attention(q, k, v, g, chunk_size=3, initial_state=s0, return_state=True)
        return delta_rule_attention(q, F.normalize(k, dim=-1), v, beta, chunk_size=3, initial_state=s0,
                                    log_decay=g if kind == "gated_delta" else None, return_state=True)

    assert torch.autograd.gradcheck(f, (q, k, v, s0, beta, graw))


@pytest.mark.parametrize("kind", ["gla_vector", "gated_delta"])
def test_backward_matches_reference(kind):
    n = 41
    q, k, v, s0, beta = _case(n=n, seed=15, requires_grad=True)
    graw = torch.randn(2, 3, n, *((8,) if kind == "gla_vector" else ()), dtype=F64,
                       generator=torch.Generator().manual_seed(16), requires_grad=True)
    inputs = (q, k, v, s0, beta, graw)
    grads = {}
    for which in ("reference", "chunked"):
        g = F.logsigmoid(graw)
        if kind == "gla_vector":
            fn = gated_linear_attention_reference if which == "reference" else gated_linear_attention
            kw = {} if which == "reference" else {"chunk_size": 16}
            out, s = fn(q, k, v, g, initial_state=s0, return_state=True, **kw)
        else:
            kn = F.normalize(k, dim=-1)
            fn = delta_rule_reference if which == "reference" else delta_rule_attention
            kw = {} if which == "reference" else {"chunk_size": 16}
            out, s = fn(q, kn, v, beta, log_decay=g, initial_state=s0, return_state=True, **kw)
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=F64)).sum() + s.square().sum()
        grads[which] = torch.autograd.grad(loss, [t for t in inputs if t is not beta or kind != "gla_vector"])
    for a, b in zip(grads["chunked"], grads["reference"]):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gla_vector", "delta"])
def test_dtypes(dtype, kind):
    q, k, v, _, beta = _case(n=70, seed=17)
    k = F.normalize(k, dim=-1)
    g = _gate((2, 3, 70, 8), seed=18)
    if kind == "gla_vector":
        ref = gated_linear_attention_reference(q, k, v, g)
        out, s = gated_linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype), return_state=True)
    else:
        ref = delta_rule_reference(q, k, v, beta)
        out, s = delta_rule_attention(q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), return_state=True)
    assert out.dtype == dtype
    assert s.dtype == (torch.float64 if dtype == F64 else torch.float32)  # the state accumulates in float32
    # the gates themselves are rounded to dtype: compare against the reference run on the rounded inputs
    rq, rk, rv, rg, rb = (t.to(dtype).to(F64) for t in (q, k, v, g, beta))
    ref = gated_linear_attention_reference(rq, rk, rv, rg) if kind == "gla_vector" else \
        delta_rule_reference(rq, rk, rv, rb)
    assert_close(out, ref, dtype=dtype, scale=4.0)


def test_long_decode_stays_finite_and_state_is_constant_size():
    """D17 test 3 in miniature: many recurrent steps with decays near 1 stay finite; the state never grows."""
    q, k, v, _, beta = _case(n=1, seed=19, dtype=torch.float32)
    s = None
    g = torch.full((2, 3, 1), -1e-4)
    for _ in range(2000):
        out, s = gated_linear_attention(q, k, v, g, initial_state=s, return_state=True)
    assert torch.isfinite(out).all() and s.shape == (2, 3, 8, 6)


def test_bad_input_is_a_clear_error():
    q, k, v, s0, beta = _case(n=10)
    g = _gate((2, 3, 10), seed=20)
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        gated_linear_attention(q, k, v, -g)
    with pytest.raises(ValueError, match="log_decay must have shape"):
        gated_linear_attention(q, k, v, g[:, :, :5])
    with pytest.raises(ValueError, match="beta must have shape"):
        delta_rule_attention(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        gated_linear_attention(q, k, v, g, initial_state=s0[:, :1])
    with pytest.raises(ValueError, match="initial_state must be on the device of q"):  # issue 28: torch's message
        gated_linear_attention(q, k, v, g, initial_state=s0.to("meta"))
    with pytest.raises(TypeError, match="initial_state must be a floating-point"):
        delta_rule_attention(q, k, v, beta, initial_state=s0.long())
    with pytest.raises(ValueError, match="mode must be one of"):
        gated_linear_attention(q, k, v, g, mode="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_attention(q, k, v, beta, chunk_size=0)
    with pytest.raises(ValueError, match="as many queries as keys"):
        gated_linear_attention(q[:, :, :4], k, v, g[:, :, :4])
    with pytest.raises(ValueError, match="vector|shape"):
        delta_rule_attention(q, k, v, beta, log_decay=_gate((2, 3, 10, 8), seed=21))


def _fla_naive(sub: str):
    """flash-linear-attention's pure-torch ``naive.py`` of ``sub``, loaded by path (its package imports Triton,
    which CPU machines lack); skipped when fla is not installed. A test oracle only, never a dependency."""
    import importlib.util

    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention not installed (optional oracle)")
    path = f"{spec.submodule_search_locations[0]}/ops/{sub}/naive.py"
    try:
        mod_spec = importlib.util.spec_from_file_location(f"_fla_naive_{sub}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"fla naive {sub} not loadable: {exc}")
    return module


def test_fla_naive_gla_oracle():
    naive = _fla_naive("gla")
    q, k, v, s0, _ = _case(n=20, seed=22, heads=2, dtype=torch.float32)
    g = _gate((2, 2, 20, 8), seed=23).float()
    ref = gated_linear_attention(q, k, v, g, initial_state=s0, chunk_size=8)
    # fla: [batch, seq, heads, dim] and queries scaled by d^-1/2 inside
    tr = [t.transpose(1, 2) for t in (q * 8**0.5, k, v, g)]
    out, s = naive.naive_recurrent_gla(*tr, initial_state=s0, output_final_state=True)
    assert_close(out.transpose(1, 2), ref)
    assert_close(s, gated_linear_attention(q, k, v, g, initial_state=s0, return_state=True)[1])


def test_fla_naive_delta_rule_oracle():
    naive = _fla_naive("delta_rule")
    q, k, v, s0, beta = _case(n=20, seed=24, heads=2, dtype=torch.float32)
    k = F.normalize(k, dim=-1)
    out, s = naive.delta_rule_recurrence(q * 8**0.5, k, v, beta, initial_state=s0.clone())
    ref, s_ref = delta_rule_attention(q, k, v, beta, initial_state=s0, chunk_size=8, return_state=True)
    assert_close(out, ref)
    assert_close(s, s_ref)


# -- registry records of the gated engine, Cottention and causal LLN --------------------------------------------


@pytest.mark.parametrize("name", ["gla", "deltanet", "gated_deltanet"])
def test_gated_records_train_through_multihead_attention(name):
    import attnkit
    from attnkit.nn import MultiheadAttention

    layer = MultiheadAttention(32, 4, mechanism=name, causal=True)
    x = torch.randn(2, 19, 32, requires_grad=True)
    y = layer(x)
    y.square().mean().backward()
    gate_params = [p for n, p in layer.named_parameters() if "inner" in n]
    assert gate_params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in gate_params)
    # causal: the output of a prefix does not depend on the rest
    assert_close(layer(x[:, :7]), y[:, :7], scale=5.0)
    assert attnkit.mechanism_info(name).flops(batch=1, heads=4, q_len=64, kv_len=64, head_dim=8, causal=True) > 0


@pytest.mark.parametrize("gated", [False, True])
def test_deltanet_scales_the_unit_query_by_d_to_the_minus_half(gated):
    # Issue 25, defect 6: the records used unit q without the d^-1/2 attention scale of the papers and fla
    # (o_t = (q_t / |q_t|) S_t / sqrt(d)). Written from the delta rule, not from the module's own inputs.
    from attnkit.ops.linear.gated_attention import DeltaNetAttention

    torch.manual_seed(0)
    layer = DeltaNetAttention(8, causal=True, gated=gated, norm=False).double()
    q, k, v = random_qkv(1, 2, 13, dim=8, dtype=F64, seed=31)
    beta, g = layer.gates(q, k)
    ref = delta_rule_reference(F.normalize(F.silu(q), dim=-1) * 8 ** -0.5, F.normalize(F.silu(k), dim=-1), v, beta,
                               log_decay=g)
    assert_close(layer(q, k, v), ref)
    # the papers' q/k path is SiLU then L2 norm (DeltaNet sec. 4, Gated DeltaNet sec. 3.4); qk_activation=None
    # drops the SiLU (MQAR 64 tokens, 300 steps: DeltaNet 27.1% without it, 95.6% with it)
    plain = DeltaNetAttention(8, causal=True, gated=gated, norm=False, qk_activation=None).double()
    plain.load_state_dict(layer.state_dict())
    assert_close(plain(q, k, v), delta_rule_reference(F.normalize(q, dim=-1) * 8 ** -0.5, F.normalize(k, dim=-1), v,
                                                      beta, log_decay=g))
    with pytest.raises(ValueError, match="qk_activation"):
        DeltaNetAttention(8, qk_activation="relu")
    assert DeltaNetAttention(8, scale=1.0).scale == 1.0
    with pytest.raises(ValueError, match="scale"):
        DeltaNetAttention(8, scale=0.0)


def test_gated_deltanet_decay_is_mamba2s_gate_and_starts_near_one():
    # The gated delta rule's decay was logsigmoid(k.w + b) from a default nn.Linear: about 0.5 per token at
    # initialisation, so a key written 10 tokens before its query was scaled by ~1e-3 (MQAR learned slowly:
    # 22.6% where softmax reached 97.1%). Gated DeltaNet (sec. 3.4) takes Mamba2's gate: g_t = -exp(A_log) *
    # softplus(x_t W + dt_bias), A ~ U(1, 16), dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1].
    from attnkit.ops.linear.gated_attention import DeltaNetAttention

    torch.manual_seed(0)
    decays = []
    for _ in range(20):
        layer = DeltaNetAttention(16, causal=True, gated=True).double()
        a = layer.A_log.exp().item()
        assert 1.0 <= a <= 16.0
        dt = F.softplus(layer.decay_proj.bias).item()
        assert 1e-3 * 0.999 <= dt <= 1e-1 * 1.001
        q, k, v = random_qkv(1, 1, 9, dim=16, dtype=F64, seed=5)
        _, g = layer.gates(q, k)
        ref = -a * F.softplus(F.linear(k, layer.decay_proj.weight, layer.decay_proj.bias))[..., 0]
        assert_close(g, ref)
        decays.append(g.exp().mean().item())
    assert min(decays) > 0.1 and sum(decays) / len(decays) > 0.8  # the old gate: ~0.5 every time
    old = DeltaNetAttention(16, causal=True, gated=True, decay="sigmoid").double()
    assert old.A_log is None
    assert_close(old.gates(q, k)[1], F.logsigmoid(F.linear(k, old.decay_proj.weight, old.decay_proj.bias))[..., 0])
    with pytest.raises(ValueError, match="decay"):
        DeltaNetAttention(16, gated=True, decay="softplus")


def test_cottention_output_stays_at_the_scale_of_v():
    """The fix of the signed-denominator blow-up: with the length scale, |out_i| <= L_i^(1 - sigmoid(m)) max|v|
    for any inputs, including keys that nearly cancel (where a denominator sum_j cos_ij would approach 0)."""
    import attnkit

    fn = attnkit.get("cottention", causal=True, num_heads=2).double()
    q, k, v = random_qkv(1, 2, 300, dim=8, dtype=F64, seed=30)
    k = torch.cat([k[:, :, :150], -k[:, :, :150]], dim=2)  # cosine sums cancel exactly at the end
    out = fn(q, k, v)
    power = torch.sigmoid(fn.norm_const.detach())
    bound = torch.arange(1, 301, dtype=F64)[None, :] ** (1 - power[:, None]) * v.abs().amax()
    assert (out.norm(dim=-1)[0] <= bound * 8**0.5 + 1e-9).all()
    assert out.abs().max() < 300 * v.abs().max()


def test_cottention_invariants_and_decoding():
    import attnkit
    from attnkit.nn.linear_cottention import cottention_reference

    fn = attnkit.get("cottention", causal=True, num_heads=2).double()
    with torch.no_grad():
        fn.norm_const.copy_(torch.tensor([-1.0, 2.0]))
    q, k, v = random_qkv(2, 2, 40, dim=8, dtype=F64, seed=31)
    out = fn(q, k, v)
    assert_close(out, cottention_reference(fn, q, k, v))
    assert_close(fn(q * 3.0, k * 0.25, v), out)  # scale invariance of q and k (D12 test 2)
    # RNN form: prefill then one-token steps with the carried state (the length scale follows the offset)
    o1, s = fn(q[:, :, :25], k[:, :, :25], v[:, :, :25], return_state=True)
    steps = [o1]
    for t in range(25, 40):
        o, s = fn(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state=s, return_state=True)
        steps.append(o)
    assert_close(torch.cat(steps, dim=2), out)
    full = attnkit.get("cottention", num_heads=2).double()
    assert_close(full(q, k, v), cottention_reference(full, q, k, v))


def test_lln_causal_uses_prefix_statistics_only():
    from attnkit import feature_maps as fmaps
    from attnkit.errors import NotSupportedError

    q, k, v = random_qkv(1, 2, 64, dim=8, dtype=F64, seed=32)
    out = linear_attention(q, k, v, feature_map="lln", causal=True, chunk_size=16)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:] = 30.0 * torch.randn_like(k2[:, :, 40:])  # a wild future would shift global statistics/max
    v2[:, :, 40:] = 0.0
    out2 = linear_attention(q, k2, v2, feature_map="lln", causal=True, chunk_size=16)
    assert torch.equal(out2[:, :, :40], out[:, :, :40])
    # at the last position the prefix statistics are the whole call's
    causal_map, full_map = fmaps.LogNormalFeatureMap(causal=True), fmaps.LogNormalFeatureMap()
    a_c, b_c = causal_map.temperatures(q, k)
    a_f, b_f = full_map.temperatures(q, k)
    assert_close(a_c[:, :, -1:], a_f, dtype=torch.float32)
    assert_close(b_c[:, :, -1:], b_f, dtype=torch.float32)
    ref = linear_attention_reference_lln(q, k, v)
    assert_close(out, ref)
    with pytest.raises(NotSupportedError, match="causal=True"):
        linear_attention(q, k, v, feature_map=fmaps.LogNormalFeatureMap(), causal=True)


def linear_attention_reference_lln(q, k, v):
    from attnkit.ops.linear import linear_attention_reference

    return linear_attention_reference(q, k, v, feature_map="lln", causal=True)


@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0, 100.0])
def test_lln_causal_is_exact_at_large_scale(scale):
    """Issue 28: causal LLN (which drops the keys' global max shift, a function of later keys) overflowed
    exp(beta k) and returned NaN at 10x unit-scale inputs. The prefix maximum as a shift, carried as a decay of
    the state, is exact: equal to the unshifted float64 quadratic form wherever that one is finite (eps=0: the
    old eps floor biased rows with small denominators), finite in float32 at every scale, and the module path
    (records lln / lln_diag) stays finite. Gradients flow."""
    from attnkit.ops.linear.reference import linear_attention_reference

    q, k, v = random_qkv(2, 2, 40, dim=8, dtype=F64, seed=41, kv_heads=1)
    qs, ks = q * scale, k * scale
    fm = "lln"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows lost in float32 at 10x and 100x: said and 0
        out32 = linear_attention(qs.float(), ks.float(), v.float(), feature_map=fm, causal=True, chunk_size=16)
    assert torch.isfinite(out32).all()
    if scale <= 3.0:  # beyond, exp(beta k) overflows even float64 in the unshifted reference
        from attnkit.feature_maps import LogNormalFeatureMap

        ref = linear_attention_reference(qs, ks, v, feature_map=LogNormalFeatureMap(causal=True), causal=True,
                                         eps=1e-300)
        assert_close(linear_attention(qs, ks, v, feature_map=fm, causal=True, chunk_size=16), ref)
        assert_close(out32, ref, dtype=torch.float32, scale=4.0)
    # the output is a convex combination of the visible values, or (at 100x, where the kernel is a near-hard
    # maximum the factorised form cannot hold) 0 in rows whose denominator underflowed, with a warning
    lo = v.cummin(2).values.repeat_interleave(2, dim=1)
    hi = v.cummax(2).values.repeat_interleave(2, dim=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out64 = linear_attention(qs, ks, v, feature_map=fm, causal=True, chunk_size=16)
    inside = ((out64 >= lo - 1e-9) & (out64 <= hi + 1e-9)).all(-1)
    zero_rows = (out64 == 0).all(-1)
    assert (inside | zero_rows).all()
    warned = any("denominators underflowed" in str(w.message) for w in caught)
    assert warned == bool(zero_rows.any()), "zero rows without the warning (or a warning without them)"
    if scale <= 10.0:
        assert not zero_rows.any()
    qg = qs.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        linear_attention(qg, ks, v, feature_map=fm, causal=True).sum().backward()
    assert torch.isfinite(qg.grad).all()
