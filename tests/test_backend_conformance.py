"""Conformance of every registered backend, generated from the backend registry (``attnkit.backends``).

For each backend of each operation and each case: if the backend's declared capabilities (``not_supported_reasons``)
accept the call, forcing ``engine=<backend>`` must agree with the float64 reference (and, where gradients are part of
the case, so must the gradients); if they refuse it, forcing it must raise ``NotSupportedError``. Backends whose
package is missing, or that do not run on the test device, are skipped with the reason.

The device is ``ATTNKIT_TEST_DEVICE`` (default: ``cuda`` when available, else ``cpu``); ``tests/test_cuda.py``
runs the same cases on the GPU. On CPU, FlexAttention compiles every case (seconds each): those are marked slow.
"""

from __future__ import annotations

import os

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit.backends import list_backends
from attnkit.backends.catalog import attention_call, linear_call, neighborhood_call
from attnkit.normalizations import resolve
from attnkit.ops.linear.reference import linear_attention_reference
from attnkit.ops.neighborhood import neighborhood_reference
from attnkit.patterns.windows import make_spec
from attnkit.testing import assert_close, random_qkv

DEVICE = os.environ.get("ATTNKIT_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
N, HEADS, KV_HEADS, DIM = 200, 4, 2, 32  # 200: not a multiple of any block size


def _doc_ids(n, device):
    return torch.repeat_interleave(torch.arange(3), torch.tensor([70, 1, n - 71])).to(device)


ATTENTION_CASES = {
    "full": lambda n, d: {},
    "causal": lambda n, d: {"pattern": P.causal()},
    "causal_window": lambda n, d: {"pattern": P.causal() & P.sliding_window(32)},
    "window_asym": lambda n, d: {"pattern": P.sliding_window(20, 5)},
    "document_causal": lambda n, d: {"pattern": P.document(_doc_ids(n, d)) & P.causal()},
    "global": lambda n, d: {"pattern": P.sliding_window(16) | P.global_tokens([0, 77])},
    "block_local": lambda n, d: {"pattern": P.block_local(33)},
    "dilated": lambda n, d: {"pattern": P.dilated(6, 3)},
    "key_padding_empty_row": lambda n, d: {"pattern": P.key_padding([0, 150])},  # batch 0: every row masked
    "alibi_causal": lambda n, d: {"pattern": P.causal(), "score_mod": S.alibi(HEADS)},
    "softcap": lambda n, d: {"score_mod": S.softcap(5.0)},
    "softcap_alibi_window": lambda n, d: {"pattern": P.sliding_window(24, 0),
                                          "score_mod": S.compose(S.softcap(5.0), S.alibi(HEADS))},
    "relative_bias": lambda n, d: {"score_mod": S.relative_bias(torch.randn(16, HEADS) * 0.5, max_distance=64)},
    "sigmoid": lambda n, d: {"pattern": P.causal(), "normalization": "sigmoid"},
}
# CPU FlexAttention compiles each case (5-60 s on a busy 2-core machine): on CPU they are all slow-marked, and
# tests/test_backends.py runs one compiled call in the default suite.
FLEX_CPU_DEFAULT: set = set()
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE.startswith("cuda") else [])


def _attention_params():
    for b in list_backends("attention"):
        if b.name == "reference":
            continue
        for case in ATTENTION_CASES:
            for dtype in DTYPES:
                marks = []
                if b.name == "flex" and DEVICE == "cpu" and (case, dtype) not in FLEX_CPU_DEFAULT:
                    marks.append(pytest.mark.slow)
                yield pytest.param(b.name, case, dtype, marks=marks, id=f"{b.name}-{case}-{str(dtype)[6:]}")


def _skip_unusable(b, device=DEVICE):
    if not b.installed():
        pytest.skip(f"{b.name}: {', '.join(b.missing())} not installed (attnkit[{b.extra}])")
    if torch.device(device).type not in b.devices:
        pytest.skip(f"{b.name} runs on {', '.join(b.devices)}, the test device is {device}")


def _grad_here(device=DEVICE) -> bool:
    # CPU FlexAttention and NATTEN's CPU path are inference-only: on CPU the generated cases check the forward
    # (the engines' own test files cover CPU gradients of the tiled engines).
    return str(device).startswith("cuda")


@pytest.mark.parametrize(("backend", "case", "dtype"), list(_attention_params()))
def test_attention_backend_matches_reference_or_refuses(backend, case, dtype):
    check_attention_case(backend, case, dtype, DEVICE)


def check_attention_case(backend: str, case: str, dtype: torch.dtype, device: str) -> None:
    """Forced ``engine=backend`` on ``case`` agrees with the float64 reference (with gradients on CUDA), or the
    backend's declared reasons refuse it and forcing it raises ``NotSupportedError``."""
    b = attnkit.backends.get_backend("attention", backend)
    _skip_unusable(b, device)
    kw = ATTENTION_CASES[case](N, device)
    grad = _grad_here(device)
    q, k, v = random_qkv(2, HEADS, N, N, DIM, kv_heads=KV_HEADS, dtype=dtype, device=device, requires_grad=grad)
    mod = kw.get("score_mod")
    if mod is not None:
        mod.to(device)
    call = attention_call(q, k, v, pattern=kw.get("pattern"), score_mod=mod,
                          norm=resolve(kw.get("normalization", "softmax")), scale=DIM ** -0.5)
    why = b.not_supported_reasons(call)
    if why:
        with pytest.raises(attnkit.NotSupportedError, match=backend):
            attnkit.attention(q, k, v, engine=backend, **kw)
        return
    with torch.set_grad_enabled(grad):
        out = attnkit.attention(q, k, v, engine=backend, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    ref = attnkit.attention(q64, k64, v64, engine="reference", **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, scale=4.0, msg=f"{backend} {case} {dtype}")
    if grad:
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
        want = torch.autograd.grad(ref, (q64, k64, v64), g)
        for a, e in zip(got, want):
            assert_close(a, e, scale=16.0, msg=f"{backend} {case} {dtype} gradient")


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_return_lse_matches_reference(backend):
    check_return_lse(backend, DEVICE)


def check_return_lse(backend: str, device: str) -> None:
    b = attnkit.backends.get_backend("attention", backend)
    _skip_unusable(b, device)
    pattern = P.causal() & P.sliding_window(40)
    q, k, v = random_qkv(2, HEADS, N, N, DIM, kv_heads=KV_HEADS, dtype=torch.bfloat16, device=device)
    call = attention_call(q, k, v, pattern=pattern, score_mod=None, norm=resolve("softmax"), scale=DIM ** -0.5,
                          return_lse=True)
    if b.not_supported_reasons(call):
        with pytest.raises(attnkit.NotSupportedError, match="return_lse"):
            attnkit.attention(q, k, v, pattern=pattern, engine=backend, return_lse=True)
        return
    out, lse = attnkit.attention(q, k, v, pattern=pattern, engine=backend, return_lse=True)
    ref_out, ref_lse = attnkit.attention(q.double(), k.double(), v.double(), pattern=pattern, engine="reference",
                                         return_lse=True)
    assert_close(out, ref_out, scale=4.0)
    assert_close(lse, ref_lse, dtype=torch.bfloat16, scale=4.0)


NEIGHBORHOOD_CASES = {  # spatial shape, value head dim, parameters
    "1d_dilated_causal": ((37,), 16, dict(kernel_size=7, dilation=2, is_causal=True)),
    "2d_stride_causal_axis": ((9, 11), 16, dict(kernel_size=(3, 5), stride=(1, 2), is_causal=(False, True))),
    "2d_value_dim": ((8, 10), 24, dict(kernel_size=5, dilation=(1, 2))),
    "3d": ((4, 5, 6), 16, dict(kernel_size=3)),
}


def _neighborhood_params():
    for b in list_backends("neighborhood"):
        if b.name == "reference":
            continue
        for case in NEIGHBORHOOD_CASES:
            marks = [pytest.mark.slow] if b.name == "flex" and DEVICE == "cpu" else []
            yield pytest.param(b.name, case, marks=marks, id=f"{b.name}-{case}")


@pytest.mark.parametrize(("backend", "case"), list(_neighborhood_params()))
def test_neighborhood_backend_matches_reference_or_refuses(backend, case):
    check_neighborhood_case(backend, case, DEVICE)


def check_neighborhood_case(backend: str, case: str, device: str) -> None:
    b = attnkit.backends.get_backend("neighborhood", backend)
    _skip_unusable(b, device)
    shape, dim_v, kw = NEIGHBORHOOD_CASES[case]
    grad = _grad_here(device)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, *shape, 16, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(2, 4, *shape, dim_v, generator=g).to(device, dtype)
    for t in (q, k, v):
        t.requires_grad_(grad)
    spec = make_spec(shape, kw["kernel_size"], kw.get("dilation", 1), kw.get("stride", 1), kw.get("is_causal", False))
    call = neighborhood_call(q, k, v, spec, score_mod=None, scale=16 ** -0.5)
    if b.not_supported_reasons(call):
        with pytest.raises(attnkit.NotSupportedError, match=backend):
            attnkit.neighborhood(q, k, v, engine=backend, **kw)
        return
    with torch.set_grad_enabled(grad):
        out = attnkit.neighborhood(q, k, v, engine=backend, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    kernel = kw["kernel_size"]
    ref = neighborhood_reference(q64, k64, v64, kernel, **{k_: v_ for k_, v_ in kw.items() if k_ != "kernel_size"})
    assert_close(out, ref, scale=4.0, msg=f"{backend} {case}")
    if grad:
        go = torch.randn_like(ref)
        for a, e in zip(torch.autograd.grad(out, (q, k, v), go.to(dtype)),
                        torch.autograd.grad(ref, (q64, k64, v64), go)):
            assert_close(a, e, scale=16.0)


LINEAR_CASES = {
    "elu_causal": dict(feature_map="elu", causal=True),
    "decay_rms": dict(feature_map="elu", causal=True, decay=0.95, normalize="rms"),
    "non_causal": dict(feature_map="elu", causal=False),
    "recurrent_mode": dict(feature_map="elu", causal=True, mode="recurrent"),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
@pytest.mark.parametrize("backend", [b.name for b in list_backends("linear")])
def test_linear_backend_matches_reference_or_refuses(backend, case):
    check_linear_case(backend, case, DEVICE)


def check_linear_case(backend: str, case: str, device: str) -> None:
    b = attnkit.backends.get_backend("linear", backend)
    _skip_unusable(b, device)
    kw = dict(LINEAR_CASES[case])
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    q, k, v = random_qkv(2, HEADS, 150, 150, DIM, kv_heads=KV_HEADS, dtype=dtype, device=device)
    fm = attnkit.feature_maps.get(kw["feature_map"])
    call = linear_call(q, k, v, feature_map=fm, causal=kw["causal"], mode=kw.get("mode", "auto"),
                       features=fm.feature_dim(DIM))
    if b.not_supported_reasons(call):
        with pytest.raises(attnkit.NotSupportedError, match=backend):
            attnkit.linear_attention(q, k, v, engine=backend, **kw)
        return
    out, state = attnkit.linear_attention(q, k, v, engine=backend, return_state=True, **kw)
    kw.pop("mode", None)
    ref, ref_state = linear_attention_reference(q.double(), k.double(), v.double(), return_state=True, **kw)
    assert_close(out, ref, scale=8.0, msg=f"{backend} {case}")
    assert_close(state.S, ref_state.S, dtype=dtype, scale=8.0)


# -- every registered mechanism through every backend of its operation ---------------------------------------
# The mechanism registry's records of the exact, neighborhood and linear families run through each installed
# backend (``attnkit.backends.use_engine`` routes their ``engine="auto"`` calls): the result equals the record's
# reference (or, without one, the same record run through the operation's reference backend in float64), or the
# backend refuses with ``NotSupportedError``, never a wrong answer. The always-available
# backends (tiled, attnkit) must run every record.
_FAMILY_OPS = {"exact": "attention", "neighborhood": "neighborhood", "linear": "linear"}
_MUST_RUN = {"tiled", "attnkit"}


def _mechanism_params():
    for m in attnkit.list_mechanisms():
        op = _FAMILY_OPS.get(m.family)
        if op is None or m.kind != "attention":
            continue
        for b in list_backends(op):
            if b.name == "reference":
                continue
            marks = [pytest.mark.slow] if b.name == "flex" and DEVICE == "cpu" else []
            yield pytest.param(m.name, op, b.name, marks=marks, id=f"{m.name}@{b.name}")


@pytest.mark.parametrize(("name", "operation", "backend"), list(_mechanism_params()))
def test_registered_mechanism_through_backend(name, operation, backend):
    from attnkit.backends import use_engine
    from attnkit.testing import build_small, mechanism_inputs

    b = attnkit.backends.get_backend(operation, backend)
    _skip_unusable(b)
    m = attnkit.mechanism_info(name)
    causal = m.causal
    built, params = build_small(m, seq_len=36, causal=causal, dtype=torch.float64)
    if isinstance(built, torch.nn.Module):
        built = built.to(DEVICE)
    inputs = tuple(t.to(DEVICE) for t in mechanism_inputs(m, seq_len=36, dtype=torch.float64))
    if m.reference is not None:
        expected = m.reference(built, *inputs, **params)
    else:  # the operation's reference backend, materialised, in float64
        with use_engine(operation, "reference"):
            expected = built(*inputs)
    dtype = torch.float32 if backend != "flash" else torch.bfloat16
    built32, _ = build_small(m, seq_len=36, causal=causal, dtype=dtype)
    if isinstance(built32, torch.nn.Module):
        built32 = built32.to(DEVICE)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    try:
        with use_engine(operation, backend), torch.no_grad():
            out = built32(*low)
    except attnkit.NotSupportedError as exc:
        # the always-available engines refuse only what needs the whole matrix (Sinkhorn)
        assert backend not in _MUST_RUN or "whole matrix" in str(exc), f"{name}: {backend} refused: {exc}"
        assert backend in str(exc)
        return
    assert_close(out, expected, dtype=dtype, scale=4.0 * m.tolerance_scale, msg=f"{name} through {backend}")
