"""The fla adapters' convention conversions (issue 24), against a fake ``fla`` written from fla's documented
signatures: layout ``[B, T, H, *]``, ``scale`` on ``q . k``, log-space gates ``g`` (``[B, T, H]`` or
``[B, T, H, K]``), ``beta [B, T, H]``, states ``[B, H, K, V]``, ``(o, final_state)`` returned. fla itself runs
only on CUDA (tests/test_cuda.py compares the real kernels with the references there)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from attnkit.backends.fla import fla_gated_reasons, fla_gated_run
from attnkit.ops.linear.gated import delta_rule_reference, gated_linear_attention_reference
from attnkit.testing import assert_close

B, H, HKV, T, K, V = 2, 4, 2, 37, 8, 6  # T != H: a layout mix-up changes shapes and fails


def _check_layout(q, k, v, g=None, beta=None, initial_state=None):
    assert q.shape == (B, T, H, K) and k.shape == (B, T, H, K) and v.shape == (B, T, H, V), (q.shape, v.shape)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    if beta is not None:
        assert beta.shape == (B, T, H)
    if initial_state is not None:
        assert initial_state.shape == (B, H, K, V) and initial_state.dtype == torch.float32


def _recurrence(q, k, v, *, g, beta, scale, initial_state, output_final_state, delta):
    # fla's definitions, token by token, in float64, state [B, H, K, V]
    q, k, v = (t.double() for t in (q, k, v))
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if initial_state is None else initial_state.double()
    outs = []
    for t in range(T):
        if g is not None:
            a = torch.exp(g[:, t].double())  # [B, H] or [B, H, K]
            S = S * (a[..., None] if a.dim() == 3 else a[..., None, None])
        kt, vt = k[:, t], v[:, t]  # [B, H, K], [B, H, V]
        if delta:
            u = beta[:, t].double()[..., None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))
            S = S + kt[..., :, None] * u[..., None, :]
        else:
            S = S + kt[..., :, None] * vt[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1).to(q.dtype if q.dtype != torch.float64 else torch.float64)
    return o.float(), (S.float() if output_final_state else None)


@pytest.fixture
def fake_fla(monkeypatch):
    calls = []

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        _check_layout(q, k, v, initial_state=initial_state)
        assert g.shape == (B, T, H, K)
        calls.append("chunk_gla")
        return _recurrence(q, k, v, g=g, beta=None, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, delta=False)

    def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None):
        _check_layout(q, k, v, initial_state=initial_state)
        assert g.shape == (B, T, H) and g_gamma is None
        calls.append("chunk_simple_gla")
        return _recurrence(q, k, v, g=g, beta=None, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, delta=False)

    def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                         use_qk_l2norm_in_kernel=False, cu_seqlens=None):
        _check_layout(q, k, v, beta=beta, initial_state=initial_state)
        calls.append("chunk_delta_rule")
        return _recurrence(q, k, v, g=None, beta=beta, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, delta=True)

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None):
        _check_layout(q, k, v, beta=beta, initial_state=initial_state)
        assert g.shape == (B, T, H)
        calls.append("chunk_gated_delta_rule")
        return _recurrence(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, delta=True)

    mods = {name: types.ModuleType(name) for name in
            ("fla", "fla.ops", "fla.ops.gla", "fla.ops.simple_gla", "fla.ops.delta_rule", "fla.ops.gated_delta_rule")}
    mods["fla.ops.gla"].chunk_gla = chunk_gla
    mods["fla.ops.simple_gla"].chunk_simple_gla = chunk_simple_gla
    mods["fla.ops.delta_rule"].chunk_delta_rule = chunk_delta_rule
    mods["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = chunk_gated_delta_rule
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(B, HKV, T, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, HKV, T, V, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    return q, k, v, s0, g


@pytest.mark.parametrize("vector", [False, True])
def test_gla_adapter_matches_reference(fake_fla, vector):
    q, k, v, s0, gen = _inputs()
    shape = (B, H, T, K) if vector else (B, H, T)
    log_decay = F.logsigmoid(torch.randn(*shape, generator=gen, dtype=torch.float64) + 2)
    out, s = fla_gated_run("gla", q.float(), k.float(), v.float(), log_decay=log_decay.float(),
                           initial_state=s0.float(), return_state=True)
    kk, vv = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
    want, want_s = gated_linear_attention_reference(q, kk, vv, log_decay, initial_state=s0, return_state=True)
    assert fake_fla == ["chunk_gla" if vector else "chunk_simple_gla"]
    assert out.dtype == torch.float32 and out.shape == (B, H, T, V)
    assert_close(out, want, dtype=torch.float32)
    assert s.dtype == torch.float32 and s.shape == (B, H, K, V)
    assert_close(s, want_s, dtype=torch.float32)


@pytest.mark.parametrize("gated", [False, True])
def test_delta_adapter_matches_reference(fake_fla, gated):
    q, k, v, s0, gen = _inputs(1)
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    log_decay = F.logsigmoid(torch.randn(B, H, T, generator=gen, dtype=torch.float64) + 2) if gated else None
    out = fla_gated_run("delta", q.float(), k.float(), v.float(), log_decay=None if log_decay is None
                        else log_decay.float(), beta=beta.float(), initial_state=s0.float())
    kk, vv = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
    want = delta_rule_reference(q, kk, vv, beta, log_decay=log_decay, initial_state=s0)
    assert fake_fla == ["chunk_gated_delta_rule" if gated else "chunk_delta_rule"]
    assert_close(out, want, dtype=torch.float32)


def test_half_inputs_keep_their_dtype(fake_fla):
    q, k, v, _, gen = _inputs(2)
    beta = torch.rand(B, H, T, generator=gen)
    out, s = fla_gated_run("delta", q.bfloat16(), k.bfloat16(), v.bfloat16(), log_decay=None, beta=beta,
                           return_state=True)
    assert out.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_fla_gated_reasons():
    q = torch.randn(1, 2, 16, 8)
    base = {"q": q, "mode": "auto", "dtype": torch.float32, "head_dim": 8, "head_dim_v": 8, "kind": "delta"}
    assert any("float32" in r for r in fla_gated_reasons(base))
    assert fla_gated_reasons(dict(base, kind="gla")) == []
    assert any("chunked" in r for r in fla_gated_reasons(dict(base, kind="gla", mode="recurrent")))
    assert any("single token" in r for r in fla_gated_reasons(dict(base, kind="gla", auto=True,
                                                                      q=torch.randn(1, 2, 1, 8))))
    assert any("> 256" in r for r in fla_gated_reasons(dict(base, kind="gla", head_dim=512)))


def test_public_gated_functions_dispatch_on_cpu():
    import attnkit

    q, k, v, s0, gen = _inputs(3)
    g = F.logsigmoid(torch.randn(B, H, T, generator=gen, dtype=torch.float64))
    out = attnkit.gated_linear_attention(q, k, v, g)
    kk, vv = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
    assert_close(out, gated_linear_attention_reference(q, kk, vv, g), dtype=torch.float64)
    with pytest.raises(attnkit.NotSupportedError, match="fla"):
        attnkit.delta_rule_attention(q, k, v, torch.rand(B, H, T, dtype=torch.float64), engine="fla")


def test_fla_is_not_chosen_automatically_for_float32():
    # fla's float32 autotuning took minutes on first use (the retention mixer test on an H200: 189 s); auto leaves
    # float32 to attnkit's engine, a named engine='fla' still runs it
    from attnkit.backends.fla import fla_reasons

    q = torch.randn(1, 2, 16, 8)
    gla = {"q": q, "mode": "auto", "dtype": torch.float32, "head_dim": 8, "head_dim_v": 8, "kind": "gla"}
    assert any("float32 under auto" in r for r in fla_gated_reasons(dict(gla, auto=True)))
    assert fla_gated_reasons(dict(gla, dtype=torch.bfloat16, auto=True)) == []
    lin = {"q": q, "causal": True, "mode": "auto", "dtype": torch.float32, "features": 8}
    assert any("float32 under auto" in r for r in fla_reasons(dict(lin, auto=True)))
    assert fla_reasons(lin) == [] and fla_reasons(dict(lin, dtype=torch.float16, auto=True)) == []
