"""CUDA: every family on the GPU against the CPU / float64 reference. Skipped where no GPU is present (as in CI);
run on a GPU machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import os

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit.testing import assert_close, mechanism_inputs, random_qkv

# ATTNKIT_TEST_DEVICE=cpu dry-runs these checks on the CPU (to debug the tests themselves without a GPU).
CUDA = os.environ.get("ATTNKIT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(CUDA.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA device")

PATTERNS = {
    "none": lambda n: None,
    "causal": lambda n: P.causal(),
    "causal_window": lambda n: P.causal() & P.sliding_window(40),
    "global": lambda n: P.sliding_window(16) | P.global_tokens([0, 77], strict=False),
    "document": lambda n: P.document(torch.arange(n, device=CUDA) * 3 // n),
    "block_local": lambda n: P.block_local(33),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("mod", ["none", "alibi"])
def test_tiled_engine_on_cuda_matches_float64_reference(pattern, mod, dtype):
    n = 300
    q, k, v = random_qkv(2, 4, n, n, 64, kv_heads=2, dtype=dtype, device=CUDA, requires_grad=True)
    kw = dict(pattern=PATTERNS[pattern](n), score_mod=S.alibi(4) if mod == "alibi" else None)
    out = attnkit.attention(q, k, v, engine="tiled", **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attnkit.attention(q64, k64, v64, engine="reference", **kw)
    assert out.dtype == dtype and out.device.type == torch.device(CUDA).type
    assert_close(out, ref, scale=2.0)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, (q, k, v), g.to(dtype)), _grads(ref, (q64, k64, v64), g)):
        assert_close(a, b, scale=8.0)


def test_auto_uses_sdpa_on_cuda_and_agrees():
    q, k, v = random_qkv(1, 8, 512, 512, 64, dtype=torch.float16, device=CUDA)
    out = attnkit.attention(q, k, v, pattern=P.causal())
    ref = attnkit.attention(q.double(), k.double(), v.double(), pattern=P.causal(), engine="reference")
    assert_close(out, ref, scale=2.0)


@pytest.mark.skipif(CUDA == "cpu", reason="needs two device types")
def test_mixed_devices_are_rejected():
    q, k, v = random_qkv(1, 2, 8, device=CUDA)
    with pytest.raises(ValueError, match="device"):
        attnkit.attention(q, k.cpu(), v)


@pytest.mark.parametrize("mode", ["parallel", "chunked", "recurrent"])
@pytest.mark.parametrize("feature_map", ["elu", "favor", "taylor", "cosformer"])
def test_linear_attention_on_cuda_matches_cpu(mode, feature_map):
    q, k, v = random_qkv(1, 2, 100, 100, 16, dtype=torch.float64)
    fm_kw = {"feature_map": attnkit.feature_maps.get(feature_map, **({"seed": 0} if feature_map == "favor" else {}))}
    cpu = attnkit.linear_attention(q, k, v, causal=True, mode=mode, chunk_size=16, **fm_kw)
    fm_kw["feature_map"] = fm_kw["feature_map"].to(CUDA)
    gpu = attnkit.linear_attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), causal=True, mode=mode, chunk_size=16,
                                   **fm_kw)
    assert_close(gpu.cpu(), cpu, scale=100.0)


def test_linear_half_precision_long_sequence_is_finite():
    q, k, v = random_qkv(1, 2, 65536, 65536, 32, dtype=torch.float16, device=CUDA)
    out = attnkit.linear_attention(q, k, v, causal=True, mode="chunked")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neighborhood_2d_on_cuda_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 20, 32, generator=g).to(CUDA, dtype).requires_grad_() for _ in range(3))
    out = attnkit.neighborhood(q, k, v, (5, 7), dilation=(2, 1), is_causal=(False, True))
    from attnkit.ops.neighborhood import neighborhood_reference

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = neighborhood_reference(q64, k64, v64, (5, 7), dilation=(2, 1), is_causal=(False, True))
    assert_close(out, ref, scale=2.0)
    g2 = torch.randn_like(ref)
    for a, b in zip(_grads(out, (q, k, v), g2.to(dtype)), _grads(ref, (q64, k64, v64), g2)):
        assert_close(a, b, scale=8.0)


def _mechanism_names():
    return [m.name for m in attnkit.list_mechanisms()]


@pytest.mark.parametrize("name", _mechanism_names())
def test_every_registered_mechanism_runs_on_cuda(name):
    """Forward and backward on the GPU, finite, on the GPU, and (for deterministic exact and linear ones) equal
    to the same call on the CPU."""
    from attnkit.bench.workloads import shape_params

    m = attnkit.mechanism_info(name)
    n, h, d = 256, 4, 64
    params = dict(m.bench_params)
    params.update(shape_params(m, heads=h, head_dim=d, seq_len=n))
    if m.kind == "mixer":
        _mixer_runs_on_cuda(m, params, mechanism_inputs(m, batch=1, heads=h, head_dim=d, seq_len=n, seed=1))
        return
    q, k, v = random_qkv(1, h, n, n, d, seed=1)
    torch.manual_seed(0)
    fn_cpu = m.build(**params)
    torch.manual_seed(0)
    fn_gpu = m.build(**params)
    if isinstance(fn_gpu, torch.nn.Module):
        fn_gpu = fn_gpu.to(CUDA)
    qg, kg, vg = (t.to(CUDA).requires_grad_() for t in (q, k, v))
    torch.manual_seed(0)
    out = fn_gpu(qg, kg, vg)
    assert out.device.type == torch.device(CUDA).type and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qg, kg, vg))
    if m.exact or m.family == "linear":
        torch.manual_seed(0)
        assert_close(out.detach().cpu(), fn_cpu(q, k, v), scale=5.0)


def _mixer_runs_on_cuda(m, params, inputs):
    torch.manual_seed(0)
    mixer = m.build(**params)
    x, rest = inputs[0], inputs[1:]  # extra inputs (positions, token types) ride along unchanged
    expected = m.reference(mixer.double(), x.double(), *(t.double() if t.is_floating_point() else t for t in rest),
                           **params)  # float64 on the CPU
    xg = x.to(CUDA).requires_grad_()
    out = mixer.float().to(CUDA)(xg, *(t.to(CUDA) for t in rest))
    assert out.device.type == torch.device(CUDA).type and torch.isfinite(out).all()
    out.square().mean().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert_close(out.detach().cpu(), expected, dtype=torch.float32, scale=20.0)


def test_multihead_attention_module_on_cuda():
    layer = attnkit.nn.MultiheadAttention(64, 4, kv_heads=2, mechanism="sliding_window", rotary=True,
                                          mechanism_kwargs={"window": 16}).to(CUDA)
    x = torch.randn(2, 100, 64, device=CUDA, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()


def test_bench_cli_quick_on_cuda(tmp_path):
    from attnkit.cli import main

    rc = main(["bench", "--quick", "--device", CUDA, "--mechanisms", "softmax,sliding_window,nystrom",
               "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert rc == 0 and (tmp_path / "results.json").exists()


# -- backends (issue 18): every installed backend against the reference on the GPU ---------------------------
# The same generated cases as tests/test_backend_conformance.py, with gradients, on CUDA. Backends whose package
# is missing are skipped with the extra to install. The CPU dry-run (ATTNKIT_TEST_DEVICE=cpu) runs them without
# gradients and leaves FlexAttention's per-case CPU compiles to `pytest -m slow tests/test_backend_conformance.py`.
from test_backend_conformance import (  # noqa: E402
    ATTENTION_CASES,
    LINEAR_CASES,
    NEIGHBORHOOD_CASES,
    check_attention_case,
    check_linear_case,
    check_neighborhood_case,
    check_return_lse,
)

_ON_GPU = CUDA.startswith("cuda")
_BACKEND_DTYPES = [torch.bfloat16, torch.float16] if _ON_GPU else [torch.float32]


def _cpu_dry_run_skips(backend: str) -> None:
    if not _ON_GPU and backend == "flex":
        pytest.skip("CPU dry-run: FlexAttention compiles per case on CPU "
                    "(pytest -m slow tests/test_backend_conformance.py runs them)")


# FlexAttention compiles forward and backward per case (~10-20 s on a GPU): a representative set runs here, in
# bf16; `pytest tests/test_backend_conformance.py` on the GPU runs every case and dtype.
FLEX_GPU_CASES = ("causal_window", "document_causal", "global", "key_padding_empty_row", "alibi_causal",
                  "softcap_alibi_window", "relative_bias")


def _attention_backend_params():
    for backend in ("sdpa", "flash", "tiled"):
        for case in sorted(ATTENTION_CASES):
            for dtype in _BACKEND_DTYPES:
                yield pytest.param(backend, case, dtype, id=f"{backend}-{case}-{str(dtype)[6:]}")
    for case in FLEX_GPU_CASES:
        yield pytest.param("flex", case, _BACKEND_DTYPES[0], id=f"flex-{case}")


@pytest.mark.parametrize(("backend", "case", "dtype"), list(_attention_backend_params()))
def test_attention_backends_on_cuda(backend, case, dtype):
    _cpu_dry_run_skips(backend)
    check_attention_case(backend, case, dtype, CUDA)


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_return_lse_on_cuda(backend):
    _cpu_dry_run_skips(backend)
    check_return_lse(backend, CUDA)


@pytest.mark.parametrize("case", sorted(NEIGHBORHOOD_CASES))
@pytest.mark.parametrize("backend", ["natten", "flex", "tiled"])
def test_neighborhood_backends_on_cuda(backend, case):
    _cpu_dry_run_skips(backend)
    check_neighborhood_case(backend, case, CUDA)


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
@pytest.mark.parametrize("backend", ["fla", "attnkit"])
def test_linear_backends_on_cuda(backend, case):
    check_linear_case(backend, case, CUDA)


def test_auto_picks_the_fast_backend_per_device():
    """engine='auto' on CUDA: flash-attn (if installed) or FlexAttention for a window, NATTEN (if installed) or
    FlexAttention for a neighborhood, fla (if installed) for causal linear; on CPU today's fused paths."""
    from attnkit.backends import get_backend, select
    from attnkit.backends.catalog import attention_call, linear_call, neighborhood_call
    from attnkit.normalizations import resolve
    from attnkit.patterns.windows import make_spec

    q, k, v = random_qkv(1, 4, 256, 256, 64, dtype=torch.bfloat16, device=CUDA, requires_grad=True)
    call = attention_call(q, k, v, pattern=P.causal() & P.sliding_window(64), score_mod=None,
                          norm=resolve("softmax"), scale=0.125)
    chosen = select("attention", "auto", call).name
    if _ON_GPU:
        assert chosen == ("flash" if get_backend("attention", "flash").installed() else "flex")
    else:
        assert chosen == "tiled"
    x = torch.randn(1, 4, 16, 16, 64, dtype=torch.bfloat16, device=CUDA, requires_grad=True)
    nb = select("neighborhood", "auto", neighborhood_call(x, x, x, make_spec((16, 16), 7), score_mod=None,
                                                          scale=0.125)).name
    if _ON_GPU:
        assert nb == ("natten" if get_backend("neighborhood", "natten").installed() else "flex")
    else:
        assert nb == "tiled"
    fm = attnkit.feature_maps.get("elu")
    lin = select("linear", "auto", linear_call(q, k, v, feature_map=fm, causal=True, mode="auto")).name
    assert lin == ("fla" if _ON_GPU and get_backend("linear", "fla").installed() else "attnkit")


def test_flex_sliding_window_long_bf16_matches_tiled_and_is_cached():
    """The issue's target shape (sliding window, bf16) through the flex engine, against the tiled engine on sampled
    rows; the second call reuses the cached BlockMask and compiled kernel."""
    from attnkit.backends import flex as flex_mod

    _cpu_dry_run_skips("flex")
    n = 16384
    pattern = P.causal() & P.sliding_window(1024)
    q, k, v = random_qkv(1, 8, n, n, 64, dtype=torch.bfloat16, device=CUDA)
    out = attnkit.attention(q, k, v, pattern=pattern, engine="flex")
    entries = len(flex_mod._CACHE)
    out2 = attnkit.attention(q, k, v, pattern=pattern, engine="flex")
    assert len(flex_mod._CACHE) == entries and torch.equal(out, out2)
    rows = slice(n - 300, n)
    ref = attnkit.attention(q[:, :, rows].double(), k.double(), v.double(), pattern=pattern, engine="tiled")
    assert_close(out[:, :, rows], ref, dtype=torch.bfloat16, scale=2.0)


def test_bench_cli_engines_and_peers_on_cuda(tmp_path):
    from attnkit.cli import main

    rc = main(["bench", "--quick", "--device", CUDA, "--mechanisms", "sliding_window,neighborhood_2d,linear_elu",
               "--engines", "flex,tiled,natten,fla,flash,attnkit", "--seq-lens", "1024", "--out", str(tmp_path),
               "--no-progress", "--no-plots", "--time-budget", "120"])
    assert rc == 0
    import json

    doc = json.loads((tmp_path / "results.json").read_text())
    labels = {c["label"] for c in doc["results"]}
    assert {"sliding_window@flex", "sliding_window@tiled", "neighborhood_2d@tiled"} <= labels


def test_flex_neighborhood_in_spatial_tiles_on_cuda():
    """The flex neighborhood engine in its spatial-tile layout (32 x 128, 13 x 13 windows), forward and backward."""
    from attnkit.ops.neighborhood import neighborhood_reference

    _cpu_dry_run_skips("flex")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 32, 128, 32, generator=g).to(CUDA, torch.bfloat16).requires_grad_()
               for _ in range(3))
    out = attnkit.neighborhood(q, k, v, 13, engine="flex")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = neighborhood_reference(q64, k64, v64, 13)
    assert_close(out, ref, scale=2.0)
    g2 = torch.randn_like(ref)
    for a, b in zip(_grads(out, (q, k, v), g2.to(torch.bfloat16)), _grads(ref, (q64, k64, v64), g2)):
        assert_close(a, b, scale=8.0)


# -- fla routing of the gated families (issue 24): the real kernels against attnkit's float64 references -------
@pytest.mark.parametrize("case", ["gla_scalar", "gla_vector", "delta", "gated_delta"])
def test_fla_gated_routing_matches_reference_on_cuda(case):
    import torch.nn.functional as F

    from attnkit.backends import get_backend
    from attnkit.ops.linear.gated import delta_rule_reference, gated_linear_attention_reference

    op = "gated" if case.startswith("gla") else "delta"
    if not _ON_GPU or not get_backend(op, "fla").installed():
        pytest.skip("needs CUDA and fla (pip install 'attnkit[fla]')")
    g = torch.Generator().manual_seed(0)
    b, h, hkv, n, dk, dv = 2, 4, 2, 300, 64, 64
    q = torch.randn(b, h, n, dk, generator=g) * dk ** -0.5
    k = F.normalize(torch.randn(b, hkv, n, dk, generator=g), dim=-1)
    v = torch.randn(b, hkv, n, dv, generator=g)
    s0 = torch.randn(b, h, dk, dv, generator=g) * 0.1
    ld = F.logsigmoid(torch.randn(b, h, n, *((dk,) if case == "gla_vector" else ()), generator=g) + 3)
    beta = torch.rand(b, h, n, generator=g)
    dt = torch.bfloat16
    kk, vv = (t.repeat_interleave(h // hkv, dim=1).double() for t in (k, v))
    leaves = [t.to(CUDA, dt).requires_grad_() for t in (q, k, v)]
    if op == "gated":
        out, s = attnkit.gated_linear_attention(*leaves, ld.to(CUDA), initial_state=s0.to(CUDA), return_state=True,
                                                engine="fla")
        want, want_s = gated_linear_attention_reference(q.double(), kk, vv, ld.double(), initial_state=s0.double(),
                                                        return_state=True)
    else:
        gate = ld.to(CUDA) if case == "gated_delta" else None
        out, s = attnkit.delta_rule_attention(*leaves, beta.to(CUDA, dt), log_decay=gate, initial_state=s0.to(CUDA),
                                              return_state=True, engine="fla")
        want, want_s = delta_rule_reference(q.double(), kk, vv, beta.double(), log_decay=None if gate is None else
                                            ld.double(), initial_state=s0.double(), return_state=True)
    assert out.dtype == dt and s.dtype == torch.float32
    assert_close(out.float().cpu(), want, dtype=dt, scale=4.0)
    assert_close(s.cpu(), want_s, dtype=dt, scale=4.0)
    out.float().square().mean().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("case", ["hierarchical", "per_head_window", "per_head_window_causal"])
def test_flex_compiles_the_patterns_that_failed_before_on_cuda(case):
    """hierarchical (HDT) and per_head_window failed to compile on FlexAttention (issue 23); their lowerings index
    prepared tensors only. Forward and backward against the float64 reference, and no fallback warning."""
    import warnings

    from attnkit.ops.exact.variants import hdt_layout

    _cpu_dry_run_skips("flex")
    lv, gid, _ = hdt_layout([[40, 60, 30], [50, 70]])
    n = lv.shape[0]
    pattern = {"hierarchical": P.hierarchical(lv, gid),
               "per_head_window": P.per_head_window([8, 32, 100, None]),
               "per_head_window_causal": P.per_head_window([8, 32, 100, None], causal=True)}[case]
    q, k, v = random_qkv(1, 4, n, n, 64, dtype=torch.bfloat16, device=CUDA, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = attnkit.attention(q, k, v, pattern=pattern, engine="flex")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attnkit.attention(q64, k64, v64, pattern=pattern, engine="reference")
    assert_close(out, ref, scale=2.0)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, (q, k, v), g.to(torch.bfloat16)), _grads(ref, (q64, k64, v64), g)):
        assert_close(a, b, scale=8.0)
