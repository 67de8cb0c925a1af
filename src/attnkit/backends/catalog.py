"""The registered backends of each operation, and the call records their ``reasons`` read.

| operation      | backend     | devices   | auto rank cpu / cuda | extra            |
|----------------|-------------|-----------|----------------------|------------------|
| attention      | `sdpa`      | cpu, cuda | 0 / 0                | (torch)          |
| attention      | `flash`     | cuda      | - / 1                | `attnkit[flash]` |
| attention      | `flex`      | cpu, cuda | 2 / 2                | (torch >= 2.5)   |
| attention      | `sdpa_mask` | cpu, cuda | named / 3            | (torch)          |
| attention      | `tiled`     | cpu, cuda | 1 / 4                | (attnkit)        |
| attention      | `reference` | cpu, cuda | 9 / 9 (*)            | (attnkit)        |
| neighborhood   | `natten`    | cpu, cuda | named / 0            | `attnkit[natten]`|
| neighborhood   | `flex`      | cpu, cuda | named / 1            | (torch >= 2.5)   |
| neighborhood   | `tiled`     | cpu, cuda | 0 / 2                | (attnkit)        |
| neighborhood   | `reference` | cpu, cuda | named                | (attnkit)        |
| linear         | `fla`       | cuda      | - / 0                | `attnkit[fla]`   |
| linear         | `attnkit`   | cpu, cuda | 0 / 1                | (attnkit)        |
| linear         | `reference` | cpu, cuda | named                | (attnkit)        |
| gated, delta   | `fla`       | cuda      | - / 0                | `attnkit[fla]`   |
| gated, delta   | `attnkit`   | cpu, cuda | 0 / 1                | (attnkit)        |

(*) the reference runs automatically only for what nothing else runs (normalisations that need the whole matrix);
it refuses the rest under ``auto``. On CPU the tiled engine ranks before flex: its fused kernel path beats compiled
FlexAttention there (docs/benchmarks.md), and CPU FlexAttention is inference-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnkit.backends.base import Backend, get_backend, register_backend
from attnkit.backends.fla import fla_gated_reasons, fla_reasons
from attnkit.backends.flash import flash_reasons
from attnkit.backends.flex import flex_reasons
from attnkit.backends.masked import sdpa_mask_reasons, sdpa_mask_run
from attnkit.backends.natten import natten_reasons

HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def _needs_grad(tensors, extra=()) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors) or any(t.requires_grad for t in extra)


# ------------------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------------------

def attention_call(q, k, v, *, pattern, score_mod, norm, scale, return_lse=False) -> dict[str, Any]:
    """The record every attention backend's ``reasons`` reads (inputs already validated)."""
    grads = score_mod.grad_tensors() if score_mod is not None else []
    return {
        "q": q, "k": k, "v": v, "pattern": pattern, "score_mod": score_mod, "norm": norm, "scale": scale,
        "return_lse": return_lse, "device": q.device, "dtype": q.dtype, "batch": q.shape[0], "heads": q.shape[1],
        "kv_heads": k.shape[1], "q_len": q.shape[2], "kv_len": k.shape[2], "head_dim": q.shape[3],
        "head_dim_v": v.shape[3], "needs_grad": _needs_grad((q, k, v), grads),
    }


def _builtin(name):
    def reasons(c: Mapping[str, Any]) -> list[str]:
        from attnkit.ops.exact import engines

        why = engines._REASONS[name](c["q"], c["k"], c["v"], c["pattern"], c["score_mod"], c["norm"])
        # return_lse: every built-in engine returns it, computed a block of rows at a time beside the output
        return why

    return reasons


def _reference_auto_reasons(c: Mapping[str, Any]) -> list[str]:
    why = _builtin("reference")(c)
    # Materialising the matrix is the spec, never a speed choice: auto takes it only where nothing else can run.
    if not c["norm"].is_global and c.get("auto"):
        why = why + ["the reference is chosen automatically only for normalisations that need the whole matrix"]
    return why


def run_attention_backend(name, engine, q, k, v, *, pattern, score_mod, norm, scale, return_lse):
    """Run the non-built-in backend ``name``. Under ``engine="auto"`` a pattern or modifier FlexAttention cannot
    compile is remembered (flex then refuses it with that reason), a warning says so, and None is returned so the
    caller picks the next engine; a named engine raises."""
    from attnkit.backends.flex import FlexCompileError

    call = attention_call(q, k, v, pattern=pattern, score_mod=score_mod, norm=norm, scale=scale,
                          return_lse=return_lse)
    try:
        return get_backend("attention", name).run(call)
    except FlexCompileError as exc:
        if engine != "auto":
            raise
        import warnings

        from attnkit.backends.base import select

        nxt = select("attention", "auto", call).name  # flex refuses this pattern / modifier from now on
        warnings.warn(f"{exc}; engine='auto' runs the next engine for it from now on ({nxt!r}; "
                      f"attnkit.explain(q, k, v, ...) says why)", RuntimeWarning, stacklevel=3)
        return None


def _run_builtin(c):  # the built-in engines run inside attnkit.attention itself
    raise RuntimeError("built-in engines are run by attnkit.attention")


def _run_flex(c):
    from attnkit.backends.flex import flex_attention_call

    return flex_attention_call(c["q"], c["k"], c["v"], pattern=c["pattern"], score_mod=c["score_mod"],
                               scale=c["scale"], return_lse=c["return_lse"])


def _run_flash(c):
    from attnkit.backends.flash import flash_run

    return flash_run(c["q"], c["k"], c["v"], pattern=c["pattern"], score_mod=c["score_mod"], scale=c["scale"],
                     return_lse=c["return_lse"])


register_backend(Backend(
    "sdpa", "attention", "torch.nn.functional.scaled_dot_product_attention (FlashAttention/cuDNN/efficient kernels "
    "on CUDA, fused kernel on CPU)", _builtin("sdpa"), _run_builtin, patterns="none, full(), causal() (q_len == "
    "kv_len)", score_mods="none", rank={"cpu": 0, "cuda": 0}))
register_backend(Backend(
    "flash", "attention", "FlashAttention-2 (flash-attn): windows, softcap, ALiBi, varlen documents", flash_reasons,
    _run_flash, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), head_dims=(1, 256),
    patterns="full, causal, sliding_window and intersections; document (contiguous segments) with those",
    score_mods="alibi, softcap, softcap >> alibi", rank={"cuda": 1}, requires="flash_attn", extra="flash"))
register_backend(Backend(
    "flex", "attention", "torch FlexAttention (compiled): any pattern as mask_mod + BlockMask from attnkit's tile "
    "classes, any score modifier as score_mod", flex_reasons, _run_flex, dtypes=HALF_AND_SINGLE,
    patterns="any", score_mods="any (learnable ones without gradients to their parameters)",
    rank={"cpu": 2, "cuda": 2}, notes="CPU: inference only, no return_lse (torch 2.13); first call per shape "
    "compiles (seconds)"))
register_backend(Backend(
    "sdpa_mask", "attention", "SDPA with the pattern materialised as a boolean mask: the fused fallback where "
    "FlexAttention cannot compile a pattern, while the n^2 mask fits ATTNKIT_MASK_BUDGET (1 GiB)",
    sdpa_mask_reasons, sdpa_mask_run, patterns="any (materialised: O(q_len * kv_len) memory)", score_mods="none",
    rank={"cuda": 3}, notes="CPU: named only (the tiled engine's fused CPU path is faster and linear in memory)"))
register_backend(Backend(
    "tiled", "attention", "attnkit's tiled engine: tile skipping, online softmax, custom backward (ATen's fused "
    "flash kernel per step on CPU)", _builtin("tiled"), _run_builtin, normalizations="softmax, sigmoid, relu, "
    "softplus", rank={"cpu": 1, "cuda": 4}))
register_backend(Backend(
    "reference", "attention", "the dense reference (materialise, mask, normalise): the spec", _reference_auto_reasons,
    _run_builtin, normalizations="all, including sinkhorn", rank={"cpu": 9, "cuda": 9}))


# ------------------------------------------------------------------------------------------------------------
# neighborhood
# ------------------------------------------------------------------------------------------------------------

def neighborhood_call(q, k, v, spec, *, score_mod, scale) -> dict[str, Any]:
    grads = score_mod.grad_tensors() if score_mod is not None and hasattr(score_mod, "grad_tensors") else []
    return {
        "q": q, "k": k, "v": v, "spec": spec, "score_mod": score_mod, "scale": scale, "device": q.device,
        "dtype": q.dtype, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1],
        "needs_grad": _needs_grad((q, k, v), grads),
    }


def _nb_flex_reasons(c):
    from attnkit.normalizations import resolve
    from attnkit.patterns.spatial import _cached_pattern

    n = c["spec"].num_tokens
    # the pattern, so that one FlexAttention failed to compile before is refused with that reason
    call = dict(c, pattern=_cached_pattern(c["spec"]), norm=resolve("softmax"), return_lse=False, q_len=n, kv_len=n)
    return flex_reasons(call)


def _run_nb_flex(c):
    from attnkit.backends.flex import neighborhood_flex_call

    return neighborhood_flex_call(c["q"], c["k"], c["v"], c["spec"], score_mod=c["score_mod"], scale=c["scale"])


def _run_natten(c):
    from attnkit.backends.natten import natten_run

    return natten_run(c["q"], c["k"], c["v"], c["spec"], scale=c["scale"])


def _no_reasons(c):
    return []


register_backend(Backend(
    "natten", "neighborhood", "NATTEN fused neighborhood attention (na1d/na2d/na3d)", natten_reasons, _run_natten,
    dtypes=HALF_AND_SINGLE, patterns="neighborhood (kernel, dilation, stride, causal per axis)", score_mods="none",
    rank={"cuda": 0}, requires="natten", extra="natten", notes="CPU (flex-fna, unfused): inference only, named only"))
register_backend(Backend(
    "flex", "neighborhood", "torch FlexAttention, tokens row-major or permuted into spatial tiles (whichever "
    "computes fewer tiles), BlockMask from the windows' analytic tile classes",
    _nb_flex_reasons, _run_nb_flex, dtypes=HALF_AND_SINGLE, patterns="neighborhood", score_mods="any",
    rank={"cuda": 1}, notes="CPU: inference only, named only"))
register_backend(Backend(
    "tiled", "neighborhood", "attnkit's tiled neighborhood engine (key boxes per query tile)", _no_reasons,
    _run_builtin, patterns="neighborhood", score_mods="any", rank={"cpu": 0, "cuda": 2}))
register_backend(Backend(
    "reference", "neighborhood", "dense masked reference", _no_reasons, _run_builtin, patterns="neighborhood",
    score_mods="any", rank={}))


# ------------------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------------------

def linear_call(q, k, v, *, feature_map, causal, mode, features=None) -> dict[str, Any]:
    return {
        "q": q, "k": k, "v": v, "feature_map": feature_map, "causal": causal, "mode": mode, "features": features,
        "device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1],
        "needs_grad": _needs_grad((q, k, v), [p for p in feature_map.parameters() if p.requires_grad]),
    }


register_backend(Backend(
    "fla", "linear", "flash-linear-attention chunk_simple_gla (Triton), features and denominator by attnkit",
    fla_reasons, _run_builtin, devices=("cuda",), dtypes=HALF_AND_SINGLE, patterns="causal",
    score_mods="decay per head", normalizations="denominator, none, rms (attnkit's finalize)", rank={"cuda": 0},
    requires=("fla", "triton"), extra="fla"))
register_backend(Backend(
    "attnkit", "linear", "attnkit's parallel / chunked / recurrent modes", _no_reasons, _run_builtin,
    patterns="causal, non-causal", score_mods="decay per head",
    normalizations="denominator, none, rms", rank={"cpu": 0, "cuda": 1}))
register_backend(Backend(
    "reference", "linear", "the materialised quadratic form (linear_attention_reference): the spec", _no_reasons,
    _run_builtin, patterns="causal, non-causal", score_mods="decay per head",
    normalizations="denominator, none, rms", rank={}))


# ------------------------------------------------------------------------------------------------------------
# gated (GLA) and delta (the delta rule, gated or not)
# ------------------------------------------------------------------------------------------------------------

def gated_call(kind, q, k, v, *, mode, grads=()) -> dict[str, Any]:
    """The record of a ``gated_linear_attention`` (``kind="gla"``) or ``delta_rule_attention`` (``"delta"``) call."""
    return {
        "q": q, "k": k, "v": v, "kind": kind, "mode": mode, "device": q.device, "dtype": q.dtype,
        "head_dim": q.shape[-1], "head_dim_v": v.shape[-1], "needs_grad": _needs_grad((q, k, v), grads),
    }


for _op, _what in (("gated", "chunk_gla (vector gates) / chunk_simple_gla (scalar gates)"),
                   ("delta", "chunk_delta_rule / chunk_gated_delta_rule")):
    register_backend(Backend(
        "fla", _op, f"flash-linear-attention {_what} (Triton); layout, scale, gates and states converted by attnkit",
        fla_gated_reasons, _run_builtin, devices=("cuda",),
        dtypes=HALF_AND_SINGLE if _op == "gated" else (torch.float16, torch.bfloat16), patterns="causal",
        score_mods="none", normalizations="none (o = S^T q, as attnkit's)", rank={"cuda": 0},
        requires=("fla", "triton"), extra="fla"))
    register_backend(Backend(
        "attnkit", _op, "attnkit's chunked (WY/UT for the delta rule) and recurrent forms", _no_reasons, _run_builtin,
        patterns="causal", score_mods="none", normalizations="none", rank={"cpu": 0, "cuda": 1}))
