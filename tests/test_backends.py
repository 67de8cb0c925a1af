"""Backends: declared capabilities, dispatch, ``attnkit backends``, the flex lowering, and the optional libraries'
adapters (flash-attn and fla through stand-ins that implement their documented APIs naively, where the real
packages cannot run here; NATTEN for real where it imports)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit.backends import list_backends, select, use_engine
from attnkit.backends.catalog import attention_call
from attnkit.backends.flex import block_mask_from_tiles, lower_pattern
from attnkit.normalizations import resolve
from attnkit.testing import assert_close, random_qkv


def _call(q, k, v, pattern=None, score_mod=None, normalization="softmax", return_lse=False):
    return attention_call(q, k, v, pattern=pattern, score_mod=score_mod, norm=resolve(normalization),
                          scale=q.shape[-1] ** -0.5, return_lse=return_lse)


# -- dispatch ----------------------------------------------------------------------------------------------

def test_auto_on_cpu_keeps_todays_choices():
    q, k, v = random_qkv(1, 2, 40, 40, 16, requires_grad=True)
    assert select("attention", "auto", _call(q, k, v)).name == "sdpa"
    assert select("attention", "auto", _call(q, k, v, P.sliding_window(8))).name == "tiled"
    assert select("attention", "auto", _call(q, k, v, score_mod=S.softcap(3.0))).name == "tiled"
    from attnkit import normalizations as N

    assert select("attention", "auto", _call(q, k, v, normalization=N.sinkhorn(2))).name == "reference"
    with torch.no_grad():  # inference: the CPU order still puts the fused tiled path before FlexAttention
        assert select("attention", "auto", _call(q, k, v, P.sliding_window(8))).name == "tiled"


def test_forced_engine_that_cannot_run_names_every_reason():
    q, k, v = random_qkv(1, 2, 40, 40, 16, requires_grad=True)
    with pytest.raises(attnkit.NotSupportedError) as err:
        attnkit.attention(q, k, v, pattern=P.sliding_window(8), normalization="sigmoid", engine="flex")
    text = str(err.value)
    assert "engine 'flex'" in text and "sigmoid" in text and "gradients requested" in text
    assert set(err.value.reasons) == {"flex"}
    with pytest.raises(attnkit.NotSupportedError, match="flash_attn not installed|device 'cpu'"):
        attnkit.attention(q, k, v, engine="flash")


def test_auto_with_return_lse_runs_a_built_in_engine_and_agrees_with_the_reference():
    q, k, v = random_qkv(1, 2, 40, 40, 16, dtype=torch.float64, requires_grad=True)
    pat = P.causal() & P.sliding_window(7)
    out, lse = attnkit.attention(q, k, v, pattern=pat, return_lse=True)
    ref_out, ref_lse = attnkit.attention(q, k, v, pattern=pat, engine="reference", return_lse=True)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)
    (out.sum() + lse.sum()).backward()
    assert torch.isfinite(q.grad).all()


def test_auto_that_nothing_can_run_lists_each_backend():
    q, k, v = random_qkv(1, 2, 40, 40, 16, requires_grad=True)
    with pytest.raises(attnkit.NotSupportedError) as err:
        attnkit.attention(q, k, v, pattern=P.causal(), engine="flash")
    assert set(err.value.reasons) == {"flash"}


def test_unknown_engine_and_bad_return_lse():
    q, k, v = random_qkv(1, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="engine must be one of"):
        attnkit.attention(q, k, v, engine="xformers")
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        attnkit.attention(q, k, v, return_lse="yes")
    with pytest.raises(ValueError, match="return_lse=True needs normalization='softmax'"):
        attnkit.attention(q, k, v, normalization="sigmoid", return_lse=True, engine="reference")
    with pytest.raises(ValueError, match="engine must be one of"):
        attnkit.linear_attention(q, k, v, engine="triton")


def test_not_supported_reasons_covers_every_backend():
    q, k, v = random_qkv(1, 2, 8, 8, 16)
    reasons = attnkit.not_supported_reasons(q, k, v, pattern=P.causal())
    assert set(reasons) == {b.name for b in list_backends("attention")}
    assert reasons["tiled"] == [] and reasons["sdpa"] == []


@pytest.mark.parametrize("pattern", [None, P.causal() & P.sliding_window(5), P.key_padding([0, 6])])
def test_reference_return_lse_is_the_log_normaliser(pattern):
    q, k, v = random_qkv(2, 2, 9, 11, 8, dtype=torch.float64, requires_grad=True)
    out, lse = attnkit.attention(q, k, v, pattern=pattern, engine="reference", return_lse=True)
    s = q @ k.transpose(-1, -2) * 8 ** -0.5
    if pattern is not None:
        s = s.masked_fill(~pattern.materialize(9, 11, batch=2), float("-inf"))
    w = torch.softmax(s, -1).nan_to_num()
    assert_close(out, w @ v)
    expected = torch.logsumexp(s, -1)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected))  # fully masked rows: -inf
    fin = torch.isfinite(expected)
    assert_close(lse[fin], expected[fin])
    (out.sum() + lse[fin].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_use_engine_routes_auto_calls_and_restores():
    q, k, v = random_qkv(1, 2, 40, 40, 16)
    with use_engine("attention", "reference"):
        assert attnkit.backends.select("attention", "auto", _call(q, k, v)).name == "reference"
        attnkit.attention(q, k, v)
    assert attnkit.backends.select("attention", "auto", _call(q, k, v)).name == "sdpa"
    with pytest.raises(ValueError, match="no attention backend named"):
        with use_engine("attention", "cudnn"):
            pass


def test_linear_and_neighborhood_dispatch_on_cpu():
    q, k, v = random_qkv(1, 2, 30, 30, 8)
    out = attnkit.linear_attention(q, k, v, causal=True, engine="attnkit")
    assert_close(out, attnkit.linear_attention(q, k, v, causal=True))
    with pytest.raises(attnkit.NotSupportedError, match="engine 'fla'"):
        attnkit.linear_attention(q, k, v, causal=False, engine="fla")
    x = torch.randn(1, 2, 6, 7, 8)
    assert_close(attnkit.neighborhood(x, x, x, 3), attnkit.neighborhood(x, x, x, 3, engine="tiled"))
    # NATTEN refuses score modifiers where it is installed, and refuses everything where it is not (as in CI)
    with pytest.raises(attnkit.NotSupportedError, match="score_mod|natten not installed"):
        attnkit.neighborhood(x, x, x, 3, engine="natten", score_mod=S.softcap(2.0))


def test_flex_declines_decoding_steps_under_auto():
    """A decoding step changes kv_len every call, and FlexAttention compiles per length: auto leaves it to others."""
    from attnkit.backends.flex import flex_reasons

    q, k, v = random_qkv(1, 2, 1, 300, 16)
    call = dict(_call(q, k, v, P.causal()), device=torch.device("cuda"), auto=True)
    assert any("decoding" in r for r in flex_reasons(call))
    call["auto"] = False
    assert flex_reasons(call) == []


# -- listing -----------------------------------------------------------------------------------------------

def test_backends_listing_python_and_cli(capsys):
    from attnkit.backends import backends
    from attnkit.cli import main

    records = backends()
    names = {(r["operation"], r["name"]) for r in records}
    assert {("attention", "flex"), ("attention", "flash"), ("neighborhood", "natten"), ("linear", "fla")} <= names
    flash = next(r for r in records if r["name"] == "flash")
    assert flash["devices"] == ["cuda"] and flash["extra"] == "flash"
    tiled = next(r for r in records if r["name"] == "tiled" and r["operation"] == "attention")
    assert tiled["installed"] and "cpu" in tiled["usable_devices"]
    assert [b.name for b in attnkit.list_backends("linear")] == ["fla", "attnkit", "reference"]
    assert main(["backends", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == records
    assert main(["backends", "--operation", "neighborhood"]) == 0
    text = capsys.readouterr().out
    assert "natten" in text and "auto cpu/cuda" in text and "flash" not in text


def test_optional_packages_are_imported_only_when_used():
    code = ("import sys, torch, attnkit\n"
            "from attnkit import patterns as P\n"
            "q = torch.randn(1, 2, 16, 8)\n"
            "attnkit.attention(q, q, q, pattern=P.sliding_window(3))\n"
            "x = torch.randn(1, 2, 5, 5, 8)\n"
            "attnkit.neighborhood(x, x, x, 3)\n"
            "attnkit.linear_attention(q, q, q, causal=True)\n"
            "print(sorted(m for m in ('natten', 'flash_attn', 'fla', 'triton') if m in sys.modules))\n")
    src = str(Path(__file__).resolve().parent.parent / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- flex: lowering and the BlockMask from tile classes ------------------------------------------------------

def _dense_from_block_mask(bm, q_len, kv_len):
    """Blocks the BlockMask computes (partial or full) as a dense [B, H, nq, nk] boolean tensor."""
    nq = bm.kv_num_blocks.shape[-1]
    nk = -(-kv_len // bm.BLOCK_SIZE[1])
    out = torch.zeros(*bm.kv_num_blocks.shape[:2], nq, nk, dtype=torch.bool)
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        cols = torch.arange(idx.shape[-1])
        sel = cols < num[..., None]
        out |= torch.zeros_like(out).scatter(-1, idx.long(), sel)
    return out


PATTERNS = {
    "causal_window": lambda n: P.causal() & P.sliding_window(100),
    "global": lambda n: P.sliding_window(16) | P.global_tokens([0, 300], strict=False),
    "document": lambda n: P.document(torch.arange(n) * 4 // n) & P.causal(),
    "padding": lambda n: P.key_padding([0, n - 3]),
    "not_block_local": lambda n: ~P.block_local(200),
    "prefix": lambda n: P.prefix_lm(150),
}


# Tile classes of document(): the padding value iinfo(int64).max goes through F.pad's float value and overflows,
# so the last row and column of tiles come out partial (wasted work, never a wrong result).
_CONSERVATIVE = {"document": "patterns._Document._classify: F.pad(value=iinfo.max) overflows; last tiles partial"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=_CONSERVATIVE[n], strict=True))
                                  if n in _CONSERVATIVE else n for n in sorted(PATTERNS)])
def test_block_mask_matches_the_pattern(name):
    """The BlockMask built from tile classes computes exactly the blocks that hold an allowed pair, and its
    full blocks are full (checked against the dense mask)."""
    n = 700
    pattern = PATTERNS[name](n)
    bm = block_mask_from_tiles(pattern, n, n, batch=2, heads=1, device="cpu")
    dense = pattern.materialize(n, n, batch=2).expand(-1, 1, -1, -1)
    nb = -(-n // 128)
    padded = torch.nn.functional.pad(dense, (0, nb * 128 - n, 0, nb * 128 - n))
    blocks = padded.view(dense.shape[0], 1, nb, 128, nb, 128)
    any_allowed = blocks.any(dim=(3, 5))
    computed = _dense_from_block_mask(bm, n, n).expand_as(any_allowed)
    assert computed[any_allowed].all(), "a block holding an allowed pair is skipped"
    sel = torch.arange(bm.full_kv_indices.shape[-1]) < bm.full_kv_num_blocks[..., None]
    full = torch.zeros_like(computed[:, :1]).scatter(-1, bm.full_kv_indices.long(), sel)
    assert blocks.all(dim=(3, 5))[full.expand_as(any_allowed)].all(), "a block marked full is not"
    assert bm.seq_lengths == (n, n)
    assert torch.equal(computed, any_allowed), "computes blocks without an allowed pair"


def test_block_mask_never_evaluates_a_structured_predicate():
    """O(tiles), not O(n^2): building the BlockMask of a long sliding window never calls the predicate."""
    pattern = P.causal() & P.sliding_window(4096)
    calls = []
    original = type(pattern.a).allowed

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    n = 1 << 16
    try:
        type(pattern.a).allowed = spy
        bm = block_mask_from_tiles(pattern, n, n, batch=1, heads=1, device="cpu")
    finally:
        type(pattern.a).allowed = original
    assert not calls
    assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) < (n // 128) * 40


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_lowered_mask_mod_equals_the_predicate(name):
    n = 300
    pattern = PATTERNS[name](n)
    fn = lower_pattern(pattern, n, n, torch.device("cpu"))
    b = torch.arange(2).view(-1, 1, 1, 1)
    qi, ki = torch.arange(n).view(1, 1, -1, 1), torch.arange(n).view(1, 1, 1, -1)
    got = torch.broadcast_to(fn(b, torch.zeros((), dtype=torch.long), qi, ki), (2, 1, n, n))
    assert torch.equal(got, pattern.materialize(n, n, batch=2).expand(2, 1, n, n))


def test_flex_engine_on_cpu_inference_matches_reference():
    """One compiled FlexAttention call on CPU (inference): a batch-dependent pattern with a fully masked row, GQA,
    a value dim unlike the query's, ALiBi, a length not a multiple of the block size."""
    pattern = (P.causal() & P.sliding_window(60)) | P.global_tokens([3])
    pattern = pattern & P.key_padding([0, 250])
    q, k, v = random_qkv(2, 4, 260, 260, 16, kv_heads=2, dim_v=24)
    with torch.no_grad():
        out = attnkit.attention(q, k, v, pattern=pattern, score_mod=S.alibi(4), engine="flex")
    ref = attnkit.attention(q.double(), k.double(), v.double(), pattern=pattern, score_mod=S.alibi(4),
                            engine="reference")
    assert_close(out, ref, scale=4.0)
    assert (out[0] == 0).all()  # batch 0 has no key: zeros, as every attnkit engine


@pytest.mark.slow  # two failing compile attempts: ~30 s on a busy 2-core machine
def test_a_pattern_flex_cannot_compile_is_refused_then_remembered():
    """Forced: NotSupportedError with torch's reason. Under auto the run returns None with a warning (the caller
    then picks the next engine), and flex's reasons name the failure from then on."""
    from attnkit.backends.catalog import run_attention_backend

    def data_dependent(b, h, q_idx, kv_idx):
        keep = torch.nonzero(kv_idx.reshape(-1) % 7 == 0)  # data-dependent shape: not traceable
        return (q_idx >= kv_idx) & (keep.numel() >= 0)

    q, k, v = random_qkv(1, 2, 64, 64, 16)
    pattern = P.custom(data_dependent, batch_dependent=False, head_dependent=False)
    with torch.no_grad():
        with pytest.raises(attnkit.NotSupportedError, match="could not compile"):
            attnkit.attention(q, k, v, pattern=pattern, engine="flex")
        assert "could not compile" in " ".join(attnkit.not_supported_reasons(q, k, v, pattern=pattern)["flex"])
        other = P.custom(data_dependent, batch_dependent=False, head_dependent=False)
        with pytest.warns(RuntimeWarning, match="runs the next engine"):
            assert run_attention_backend("flex", "auto", q, k, v, pattern=other, score_mod=None,
                                         norm=resolve("softmax"), scale=0.25, return_lse=False) is None


@pytest.mark.parametrize(("shape", "kw"), [((32, 128), dict(kernel_size=13)),
                                           ((32, 48), dict(kernel_size=(5, 7), dilation=(2, 3), stride=(1, 3),
                                                           is_causal=(True, False))),
                                           ((8, 16, 32), dict(kernel_size=(3, 5, 7), is_causal=(False, True, False)))])
def test_neighborhood_tiles_of_the_permuted_layout_are_exact(shape, kw):
    """Spatial-tile layout for FlexAttention: the analytic classes (per-axis any/all, outer product) equal the
    dense mask's blocks, and the permutation is one."""
    from attnkit.backends.flex import neighborhood_tile_classes, tile_permutation, tile_shape_for
    from attnkit.patterns.spatial import _cached_pattern
    from attnkit.patterns.windows import make_spec

    spec = make_spec(shape, kw["kernel_size"], kw.get("dilation", 1), kw.get("stride", 1), kw.get("is_causal", False))
    tile = tile_shape_for(shape)
    assert math.prod(tile) == 128 and all(s % t == 0 for s, t in zip(shape, tile))
    n = spec.num_tokens
    perm = tile_permutation(shape, tile, "cpu")
    assert torch.equal(perm.sort().values, torch.arange(n))
    dense = _cached_pattern(spec).materialize(n, n)[0, 0][perm][:, perm].view(n // 128, 128, n // 128, 128)
    cls = neighborhood_tile_classes(spec, tile, "cpu")[0, 0]
    assert torch.equal(cls != 0, dense.any(dim=(1, 3)))
    assert torch.equal(cls == 2, dense.all(dim=(1, 3)))


@pytest.mark.slow  # one FlexAttention compile on CPU
def test_flex_neighborhood_in_spatial_tiles_matches_reference():
    """A grid where spatial tiles compute fewer blocks than row-major strips (32 x 128, 13 x 13 windows), with
    NAT's relative positional bias: the score modifier sees the original token indices."""
    from attnkit.functional.neighborhood import neighborhood_bias
    from attnkit.ops.neighborhood import neighborhood_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 128, 16, generator=g) for _ in range(3))
    bias = neighborhood_bias(2, (32, 128), 13)
    with torch.no_grad():
        out = attnkit.neighborhood(q, k, v, 13, engine="flex", score_mod=bias)
        ref = neighborhood_reference(q.double(), k.double(), v.double(), 13, score_mod=bias.double())
    assert_close(out, ref, scale=4.0)


# -- optional libraries through stand-ins of their documented APIs -----------------------------------------

def _fake_flash_module():
    """flash-attn's documented semantics, naively: [B, L, H, D], windows and causal aligned bottom-right, softcap
    on the scaled scores, then ALiBi ``-slope * |i + Lk - Lq - j|``, GQA by head groups; lse on request."""

    def dense(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes):
        b, lq, h, d = q.shape
        lk, hk = k.shape[1], k.shape[2]
        k = k.repeat_interleave(h // hk, dim=2)
        v = v.repeat_interleave(h // hk, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * softmax_scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(lq).view(-1, 1) + lk - lq
        j = torch.arange(lk).view(1, -1)
        if alibi_slopes is not None:
            s = s - alibi_slopes.double().view(1, -1, 1, 1) * (i - j).abs()
        left, right = window_size
        if causal:
            right = 0
        ok = torch.ones(lq, lk, dtype=torch.bool)
        if right >= 0:
            ok &= j <= i + right
        if left >= 0:
            ok &= j >= i - left
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, -1)
        o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).nan_to_num(), v.double())
        return o.to(q.dtype), lse.float()

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        o, lse = dense(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes)
        return (o, lse, None) if return_attn_probs else o

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False):
        outs = []
        for a, e in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            assert e - a <= max_seqlen_q
            outs.append(dense(q[None, a:e], k[None, a:e], v[None, a:e], softmax_scale, causal, window_size,
                              softcap, alibi_slopes)[0][0])
        return torch.cat(outs)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


FLASH_CASES = {
    "causal": (lambda n: P.causal(), None),
    "window": (lambda n: P.sliding_window(7, 3), None),
    "causal_window_alibi": (lambda n: P.causal() & P.sliding_window(9), S.alibi(4)),
    "softcap_alibi": (lambda n: None, S.compose(S.softcap(2.0), S.alibi(4))),
    "document_window": (lambda n: P.document(torch.tensor([0] * 10 + [1] * 3 + [2] * (n - 13))) & P.causal()
                        & P.sliding_window(5), None),
}


@pytest.mark.parametrize("case", sorted(FLASH_CASES))
def test_flash_adapter_maps_attnkit_semantics(case, monkeypatch):
    from attnkit.backends.flash import flash_reasons, flash_run

    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module())
    make, mod = FLASH_CASES[case]
    n = 29
    pattern = make(n)
    q, k, v = random_qkv(2, 4, n, n, 16, kv_heads=2, dtype=torch.float64)
    assert flash_reasons(_call(q, k, v, pattern, mod)) == []
    out = flash_run(q, k, v, pattern=pattern, score_mod=mod, scale=0.25)
    ref = attnkit.attention(q, k, v, pattern=pattern, score_mod=mod, scale=0.25, engine="reference")
    assert_close(out, ref)


def test_flash_adapter_refuses_what_flash_attn_lacks():
    from attnkit.backends.flash import flash_reasons

    q, k, v = random_qkv(1, 4, 20, 20, 16)
    assert "score_mod" in " ".join(flash_reasons(_call(q, k, v, None, S.compose(S.alibi(4), S.softcap(2.0)))))
    assert "pattern" in " ".join(flash_reasons(_call(q, k, v, P.block_local(4))))
    split = P.document(torch.tensor([0] * 5 + [1] * 5 + [0] * 10))
    assert "contiguous" in " ".join(flash_reasons(_call(q, k, v, split)))
    assert "value head dim" in " ".join(flash_reasons(_call(q, k, torch.randn(1, 4, 20, 8))))


def _fake_fla_simple_gla():
    """fla's documented chunk_simple_gla, as its recurrence: S_t = exp(g_gamma) S_{t-1} + k_t v_t^T,
    o_t = scale * q_t^T S_t, on [B, T, H, *]; initial_state / final state [B, H, K, V]."""

    def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                         **kwargs):
        b, t, h, dk = q.shape
        scale = dk ** -0.5 if scale is None else scale
        state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64) if initial_state is None \
            else initial_state.double().clone()
        lam = torch.ones(h, dtype=torch.float64) if g_gamma is None else torch.exp(g_gamma.double())
        outs = []
        for i in range(t):
            state = lam.view(1, -1, 1, 1) * state + k[:, i].double()[..., None] * v[:, i].double()[..., None, :]
            outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, i].double(), state))
        return torch.stack(outs, 1).to(q.dtype), (state.float() if output_final_state else None)

    return types.SimpleNamespace(chunk_simple_gla=chunk_simple_gla)


@pytest.mark.parametrize("kw", [dict(), dict(decay=0.9, normalize="rms"), dict(feature_map="favor")],
                         ids=["elu", "decay_rms", "favor"])
def test_fla_adapter_carries_attnkit_semantics_and_state(kw, monkeypatch):
    """Through fla's kernel: attnkit's feature map, the denominator as a value column of ones, decay as g_gamma,
    and the state carried across two calls equal the reference on the whole sequence."""
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", _fake_fla_simple_gla())
    q, k, v = random_qkv(1, 4, 24, 24, 8, kv_heads=2, dtype=torch.float64)
    kw = dict(kw)
    # favor unstabilised: raw features() calls here do not share the per-call key shift that linear_attention's
    # feature-map scope keeps across blocks and carried states
    name = kw.pop("feature_map", "elu")
    fm = attnkit.feature_maps.get(name, **({"seed": 0, "stabilize": False} if name == "favor" else {}))
    from attnkit.backends.fla import fla_run
    from attnkit.ops.linear._common import features, make_finalize, values_with_ones
    from attnkit.ops.linear.reference import linear_attention_reference

    decay = kw.get("decay")
    ld = None if decay is None else torch.full((4,), math.log(decay), dtype=torch.float64)
    finalize = make_finalize(kw.get("normalize", "denominator"), 1e-6, q.dtype)
    s = None
    outs = []
    for lo, hi in ((0, 10), (10, 24)):  # two calls: the second continues from the first's state
        qf, kf = features(fm, q[:, :, lo:hi], k[:, :, lo:hi], lo, lo)
        o_ext, s = fla_run(qf, kf, values_with_ones(v[:, :, lo:hi], 4), log_decay=ld, s0=s, dtype=torch.float32)
        outs.append(finalize(o_ext.double()))
    ref, ref_state = linear_attention_reference(q, k, v, feature_map=fm, causal=True, return_state=True, **kw)
    assert_close(torch.cat(outs, 2), ref, dtype=torch.float32, scale=4.0)
    assert_close(s[..., :-1], ref_state.S, dtype=torch.float32, scale=4.0)
    assert_close(s[..., -1], ref_state.z, dtype=torch.float32, scale=4.0)


# -- NATTEN, for real where it imports -------------------------------------------------------------------

def test_natten_adapter_matches_reference_where_natten_imports():
    pytest.importorskip("natten")
    from attnkit.ops.neighborhood import neighborhood_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 9, 16, generator=g) for _ in range(3))
    kw = dict(dilation=(2, 1), stride=(1, 2), is_causal=(False, True))
    with torch.no_grad():
        out = attnkit.neighborhood(q, k, v, (3, 5), engine="natten", **kw)
    ref = neighborhood_reference(q.double(), k.double(), v.double(), (3, 5), **kw)
    assert_close(out, ref, scale=4.0)
