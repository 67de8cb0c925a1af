"""The benchmark loop: every variant at every length, bounded in time, robust to failures and Ctrl-C.

Lengths run in increasing order and, within a length, the SDPA baseline first, so every ratio compares
numbers measured on the same inputs in the same run. Time stays bounded whatever is registered: a cell
whose predicted single call (extrapolated from the variant's previous length) exceeds ``max_call_s``, or
that would not fit in what is left of ``time_budget_s``, is skipped and reported as such; so is one whose
predicted memory exceeds what the device has free. A mechanism that raises or runs out of memory is
recorded as ``failed`` / ``oom`` with the message; nothing is dropped silently.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from attnkit.bench import measure
from attnkit.bench.machine import available_memory_bytes, describe_machine
from attnkit.bench.workloads import (
    FLEX_DEFAULT_LENS,  # noqa: F401 (its old home)
    STRUCTURES,
    BenchConfig,
    Variant,
    call_with_accepted,
    is_quadratic,
    make_inputs,
    select_variants,
    shape_params,
)

__all__ = ["run_benchmark", "CELL_FIELDS", "SCHEMA"]

SCHEMA = "attnkit-bench/1"

def decode_state_bytes(v: Variant, n: int, config: BenchConfig) -> int | None:
    """Bytes a decoder must keep to continue after ``n`` tokens: the recurrent state of linear attention
    (``extras["state_bytes"]`` per head), or the full KV cache of exact softmax (SDPA); None where not defined."""
    elem = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
    per_head = None
    if _is_mixer(v):  # a causal mixer's recurrent state: bytes per sequence at width heads x head_dim
        if not (v.causal and "state_bytes" in v.mechanism.extras):
            return None
        per_seq = call_with_accepted(v.mechanism.extras["state_bytes"], dim=config.heads * config.head_dim,
                                     dtype=getattr(torch, config.dtype), **v.params)
        return int(per_seq) * config.batch
    if v.kind == "mechanism" and v.mechanism is not None and "state_bytes" in v.mechanism.extras:
        per_head = call_with_accepted(v.mechanism.extras["state_bytes"], head_dim=config.head_dim,
                                      dtype=getattr(torch, config.dtype), **v.params)
    elif v.causal and (v.kind == "baseline" or v.name == "softmax"):
        per_head = 2 * n * config.head_dim * elem
    return None if per_head is None else int(per_head) * config.heads * config.batch


def _is_mixer(v: Variant) -> bool:
    """Token mixers (``kind == "mixer"``) take ``x [batch, seq, heads * head_dim]`` (or their own example
    inputs, e.g. a 2-D grid of the same number of tokens) instead of ``q, k, v``: same width, same length."""
    return v.kind == "mechanism" and v.mechanism is not None and v.mechanism.kind == "mixer"


# Every cell of results.json / results.csv has exactly these keys (None where it does not apply).
CELL_FIELDS = (
    "mechanism", "label", "kind", "family", "exact", "causal", "seq_len", "batch", "heads", "head_dim",
    "dtype", "device", "backward", "status", "message", "time_s", "time_min_s", "time_max_s", "repeats",
    "first_call_s", "compile_s", "build_s", "peak_memory_bytes", "input_bytes", "flops", "gflops_per_s",
    "vs_sdpa", "error", "error_reference", "exact_check", "density", "speed_of_light_s",
    "speed_of_light_ratio", "state_bytes", "params",
    # issue 27: the class a reader picks from, errors on structured inputs, timing conditions
    "accuracy_class", "errors", "load", "unstable", "reruns",
)
# ``accuracy_class``: "exact" (softmax's outputs), "masked" (exact softmax under a mask that changes the model:
# sliding window, neighborhoods), "approx" (an approximation of softmax), "other" (exact for its own definition,
# a different operator than softmax), "mixer" (a token mixer, x -> x).
ACCURACY_CLASSES = ("exact", "masked", "approx", "other", "mixer")
# A cell whose slowest timed call exceeds its fastest by this factor is timed again once; still so: unstable.
UNSTABLE_SPREAD = 1.5
# Errors on the structured inputs are measured up to this length (one extra call per input kind).
STRUCTURED_MAX_LEN = 16384
STRUCTURED_DEFAULT_LENS = (1024, 4096, 16384)
STATUSES = ("ok", "failed", "oom", "skipped", "unsupported")

# Above this length a pattern's density is estimated on evenly spaced query rows (exact counting is O(n^2)).
_EXACT_DENSITY_MAX = 16384


class _Skip(Exception):
    pass


def _peer(v: Variant, n: int, c: BenchConfig) -> Callable[..., Any]:
    """The library's own kernel on the same problem: NATTEN's ``na*d`` on the mechanism's grid (heads-last copies
    made once per input, outside the timing, as a NATTEN user holds them), or fla's ``chunk_linear_attn`` on the
    mechanism's feature map (``normalize=True``: fla's own denominator)."""
    m = v.mechanism
    if v.engine == "natten":
        import natten

        spec = call_with_accepted(m.extras["pattern"], n, causal=v.causal, **v.params).spec
        fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[spec.ndim]
        kw = dict(kernel_size=spec.kernel_size, stride=tuple(a.stride for a in spec.axes),
                  dilation=tuple(a.dilation for a in spec.axes), is_causal=tuple(a.causal for a in spec.axes))
        held: dict[int, torch.Tensor] = {}

        def heads_last(t: torch.Tensor) -> torch.Tensor:
            key = t.data_ptr()
            if key not in held:
                held[key] = t.detach().reshape(*t.shape[:2], *spec.shape, t.shape[-1]).movedim(1, -2).contiguous()
                held[key].requires_grad_(t.requires_grad)
            return held[key]

        def run_natten(q, k, v_):
            return fn(heads_last(q), heads_last(k), heads_last(v_), **kw).movedim(-2, 1).reshape(q.shape)

        return run_natten
    from fla.ops.linear_attn import chunk_linear_attn

    built = m.build(causal=v.causal, **v.params, **shape_params(m, heads=c.heads, head_dim=c.head_dim, seq_len=n))
    fm = built.feature_map.to(torch.device(c.device))
    if getattr(built, "engine", {}).get("decay") is not None:
        raise NotImplementedError("fla peer: decayed mechanisms are compared through fla's simple_gla via "
                                  "the fla engine, not chunk_linear_attn")

    def run_fla(q, k, v_):
        pq, pk = fm(q, k)
        o, _ = chunk_linear_attn(pq.transpose(1, 2), pk.transpose(1, 2), v_.transpose(1, 2), scale=1.0,
                                 normalize=True)
        return o.transpose(1, 2)

    return run_fla


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


_compiled_flex: Callable[..., Any] | None = None


def _flex() -> Callable[..., Any]:
    # Static shapes: each length compiles anyway (the mask closure holds it), and dynamic=True hits an
    # inductor C++ codegen error for windowed masks on CPU in torch 2.13.
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class _Run:
    def __init__(self, config: BenchConfig, variants: list[Variant], progress: bool,
                 on_cell: Callable[[dict[str, Any]], None] | None):
        self.config = config
        self.variants = variants
        self.progress = progress
        self.on_cell = on_cell
        self.device = torch.device(config.device)
        self.dtype = _dtype(config.dtype)
        self.cells: list[dict[str, Any]] = []
        self.history: dict[tuple[str, bool], list[tuple[int, float, int | None]]] = {}
        self.oom_at: dict[tuple[str, bool], int] = {}
        self.failed_at: dict[tuple[str, bool], int] = {}
        self._patterns: dict[tuple[str, bool, int], Any] = {}
        self._densities: dict[tuple[str, bool, int], float] = {}
        self._refs: dict[Any, torch.Tensor] = {}
        self._structured: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
        self.start = time.perf_counter()
        self.compile_total_s = 0.0  # compilation (FlexAttention) time, kept out of the run's budget

    # -- inputs and references -----------------------------------------------------------------------------
    def inputs(self, n: int) -> tuple[torch.Tensor, ...]:
        c = self.config
        g = torch.Generator().manual_seed(c.seed + n)
        shape = (c.batch, c.heads, n, c.head_dim)
        # q, k, v and the gradient, generated in float32 then cast: checked against the free memory first, so
        # an impossible --batch / --heads is an OOM cell, not the machine's out-of-memory killer
        need = 4 * math.prod(shape) * (4 + torch.empty((), dtype=self.dtype).element_size())
        free = available_memory_bytes(self.device)
        if free is not None and need > free // 2:
            raise MemoryError(f"out of memory: the inputs need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        q, k, v = make_inputs(c.inputs, shape, g)
        grad = torch.randn(shape, generator=g)
        return tuple(t.to(self.device, self.dtype) for t in (q, k, v, grad))

    def structured(self, kind: str, n: int) -> tuple[torch.Tensor, ...]:
        key = (kind, n)
        if key not in self._structured:
            c = self.config
            g = torch.Generator().manual_seed(c.seed + 7 * n + STRUCTURES.index(kind))
            q, k, v = make_inputs(kind, (c.batch, c.heads, n, c.head_dim), g)
            self._structured[key] = tuple(t.to(self.device, self.dtype) for t in (q, k, v))
        return self._structured[key]

    def elapsed_s(self) -> float:
        """Seconds the run has spent, compilation excluded (it is reported apart)."""
        return time.perf_counter() - self.start - self.compile_total_s

    def pattern(self, v: Variant, n: int) -> Any:
        key = (v.mechanism.name, v.causal, n)
        if key not in self._patterns:
            self._patterns[key] = call_with_accepted(v.pattern_fn, n, causal=v.causal, **v.params)
        return self._patterns[key]

    def density(self, v: Variant, n: int) -> float:
        key = (v.mechanism.name, v.causal, n)
        if key not in self._densities:
            pattern = self.pattern(v, n)
            if n <= _EXACT_DENSITY_MAX:
                self._densities[key] = float(pattern.density(n, n))
            else:
                self._densities[key] = measure.sampled_density(pattern, n, rows=1024)
        return self._densities[key]

    def reference(self, q, k, v_, rows, causal: bool, pattern: Any, pattern_key: Any) -> torch.Tensor:
        key = (q.shape[2], causal, pattern_key)
        if key not in self._refs:
            self._refs[key] = measure.exact_softmax_rows(q, k, v_, rows, causal=causal, pattern=pattern)
        return self._refs[key]

    # -- one cell ------------------------------------------------------------------------------------------
    def blank(self, v: Variant, n: int) -> dict[str, Any]:
        c = self.config
        cell = dict.fromkeys(CELL_FIELDS)
        cell.update(mechanism=v.name, label=v.label, kind=v.kind, family=v.family, exact=v.exact,
                    causal=v.causal, seq_len=n, batch=c.batch, heads=c.heads, head_dim=c.head_dim,
                    dtype=c.dtype, device=str(self.device), backward=c.backward, params=dict(v.params))
        return cell

    def predict(self, v: Variant, n: int) -> tuple[float | None, float | None]:
        """Predicted seconds per call and peak bytes at length ``n``, from the variant's previous lengths."""
        hist = self.history.get((v.name, v.causal), [])
        if not hist:
            return None, None
        default_exp = 2.0 if is_quadratic(v.complexity) else 1.0
        (n1, t1, m1) = hist[-1]
        exp_t = default_exp
        if len(hist) >= 2:
            n0, t0, _ = hist[-2]
            if t0 > 5e-3 and t1 > 5e-3 and n1 > n0:  # above launch overhead: trust the measured slope
                exp_t = min(max(math.log(t1 / t0) / math.log(n1 / n0), 1.0), 2.5)
        t = t1 * (n / n1) ** exp_t
        mem = None
        if m1 is not None:
            mem = m1 * (n / n1) ** max(default_exp, 1.0)
        return t, mem

    def check_budget(self, v: Variant, n: int, cell: dict[str, Any], force: bool = False) -> None:
        c = self.config
        key = (v.name, v.causal)
        if v.unsupported:
            cell["status"] = "unsupported"
            cell["message"] = v.unsupported
            raise _Skip
        if key in self.oom_at:
            raise _Skip(f"ran out of memory at n={self.oom_at[key]}")
        if key in self.failed_at and (v.kind == "flex" or v.engine == "flex"):
            raise _Skip(f"failed at n={self.failed_at[key]} (compiling again would fail the same way)")
        # force: the SDPA baseline at a length where other variants ran (every ratio needs it), whatever the budget.
        remaining = math.inf if force else c.time_budget_s - self.elapsed_s()
        if remaining <= 0:
            raise _Skip(f"run time budget of {c.time_budget_s:.0f} s spent (raise it with --time-budget)")
        t, mem = self.predict(v, n)
        if force:
            t = None
        if t is not None and t > c.max_call_s:
            raise _Skip(f"predicted {t:.1f} s per call > {c.max_call_s:g} s (--max-call)")
        if t is not None and 2 * t > remaining:
            raise _Skip(f"predicted {t:.1f} s per call does not fit the {remaining:.0f} s left of the run budget")
        if mem is not None:
            free = available_memory_bytes(self.device)
            if free is not None and mem > 0.7 * free:
                raise _Skip(f"predicted peak memory {mem / 2**30:.1f} GiB > 70% of the "
                            f"{free / 2**30:.1f} GiB available")

    def build(self, v: Variant, n: int) -> Callable[..., Any]:
        c = self.config
        if v.kind == "baseline":
            causal = v.causal
            return lambda q, k, v_: torch.nn.functional.scaled_dot_product_attention(q, k, v_, is_causal=causal)
        if v.kind == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            pattern = self.pattern(v, n)
            bm = create_block_mask(pattern.mask_mod(n, n),
                                   B=c.batch if getattr(pattern, "batch_dependent", False) else None,
                                   H=c.heads if getattr(pattern, "head_dependent", False) else None,
                                   Q_LEN=n, KV_LEN=n, device=self.device)
            flex = _flex()
            return lambda q, k, v_: flex(q, k, v_, block_mask=bm)
        if v.kind == "peer":
            return _peer(v, n, c)
        m = v.mechanism
        fn = m.build(causal=v.causal, **v.params,
                     **shape_params(m, heads=c.heads, head_dim=c.head_dim, seq_len=n))
        if isinstance(fn, torch.nn.Module):
            fn = fn.to(device=self.device, dtype=self.dtype)
        if v.kind == "engine":
            from attnkit.backends import use_engine
            from attnkit.bench.workloads import FAMILY_OPERATIONS

            inner, op, engine = fn, FAMILY_OPERATIONS[m.family], v.engine

            def through(q, k, v_):
                with use_engine(op, engine):
                    return inner(q, k, v_)

            return through
        return fn

    def mixer_input(self, v: Variant, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        q = inputs[0]
        b, h, n, d = q.shape
        m = v.mechanism
        if m.example_inputs is not None:
            x = m.example_inputs(batch=b, seq_len=n, dtype=torch.float32, seed=self.config.seed + n, heads=h,
                                 head_dim=d)[0]
            return x.to(self.device, self.dtype)
        return q.transpose(1, 2).reshape(b, n, h * d)

    def caller(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...],
               variant: Variant | None = None) -> Callable[[], torch.Tensor]:
        q, k, v, grad = inputs
        args = (self.mixer_input(variant, inputs),) if variant is not None and _is_mixer(variant) else (q, k, v)
        if not self.config.backward:
            def forward() -> torch.Tensor:
                with torch.no_grad():
                    out = fn(*args)
                return out[0] if isinstance(out, tuple) else out

            return forward
        leaves = [t.detach().requires_grad_(True) for t in args]
        params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []

        def forward_backward() -> torch.Tensor:
            out = fn(*leaves)
            out = out[0] if isinstance(out, tuple) else out
            g = grad[..., : out.shape[-1]].expand_as(out) if len(args) == 3 else torch.ones_like(out)
            torch.autograd.grad(out, leaves + params, g, allow_unused=True)
            return out.detach()

        return forward_backward

    def measure_cell(self, v: Variant, n: int, inputs: tuple[torch.Tensor, ...], cell: dict[str, Any]) -> None:
        c = self.config
        t0 = time.perf_counter()
        fn = self.build(v, n)
        call = self.caller(fn, inputs, v)
        cell["build_s"] = time.perf_counter() - t0

        # First call: warm-up (and compilation for FlexAttention); traced for memory unless it compiles.
        compiles = v.kind == "flex" or v.engine == "flex"
        traced_first = c.memory and not compiles
        t0 = time.perf_counter()
        if traced_first:
            out, peak = measure.peak_memory(call, self.device)
        else:
            out, peak = call(), None
        measure.sync(self.device)
        first = time.perf_counter() - t0
        cell["first_call_s"] = first
        if c.memory and not traced_first:
            out, peak = measure.peak_memory(call, self.device)
        cell["peak_memory_bytes"] = peak
        for _ in range(max(c.warmup - 1, 0)):
            if first > c.cell_budget_s:
                break
            call()

        self.error(v, n, inputs, out, cell)
        del out

        # Cheap cells get at least 3 timed calls (a spread to judge); a slow one keeps to its budget.
        min_repeats = min(3, max(c.repeats, 1)) if first <= c.cell_budget_s / 3 else 1
        times = measure.time_calls(call, self.device, repeats=max(c.repeats, 1), budget_s=c.cell_budget_s,
                                   min_repeats=min_repeats)
        cell["reruns"] = 0
        if len(times) >= 2 and max(times) > UNSTABLE_SPREAD * min(times) and sum(times) <= 2 * c.cell_budget_s:
            # A large spread means the machine was busy during some calls: time the cell again, keep the
            # steadier run, and flag the cell if both runs spread.
            again = measure.time_calls(call, self.device, repeats=max(c.repeats, 1), budget_s=c.cell_budget_s,
                                       min_repeats=min_repeats)
            cell["reruns"] = 1
            if max(again) / min(again) < max(times) / min(times):
                times = again
        cell["unstable"] = len(times) >= 2 and max(times) > UNSTABLE_SPREAD * min(times)
        cell.update(measure.summarize(times))
        cell["repeats"] = len(times)
        if compiles:
            cell["compile_s"] = max(first - cell["time_s"], 0.0)
            self.compile_total_s += cell["compile_s"]
        self.structured_errors(v, n, fn, cell)

    def structured_errors(self, v: Variant, n: int, fn: Callable[..., Any], cell: dict[str, Any]) -> None:
        """Relative error against full softmax (no pattern: the model a user replaces) on each structured input
        kind, for variants that are not plain exact softmax: approximations, masks, other operators."""
        c = self.config
        lens = c.structured_lens if c.structured_lens is not None else (
            [x for x in c.seq_lens if x <= STRUCTURED_MAX_LEN] if c.seq_lens is not None and not c.quick
            else list(STRUCTURED_DEFAULT_LENS))
        if _is_mixer(v) or v.kind == "baseline" or n not in lens or not c.structured_errors:
            return
        if v.exact and v.pattern_fn is None and cell.get("exact_check") == "ok":
            return  # softmax's own outputs: the error is rounding on every input
        if len(STRUCTURES) * cell["time_s"] > c.time_budget_s - self.elapsed_s():
            cell["message"] = (cell["message"] or "") + "errors on structured inputs skipped: over the run budget"
            return
        errors = {}
        rows = measure.sample_rows(n, self.config.error_rows, self.device)
        for kind in STRUCTURES:
            q, k, v_ = self.structured(kind, n)
            with torch.no_grad():
                out = fn(q, k, v_)
            out = out[0] if isinstance(out, tuple) else out
            if tuple(out.shape) != tuple(q.shape[:3]) + (v_.shape[-1],):
                return
            ref = self.reference(q, k, v_, rows, v.causal, None, ("full", kind))
            errors[kind] = measure.relative_error(out[:, :, rows], ref)
        cell["errors"] = errors

    def error(self, v: Variant, n: int, inputs, out: torch.Tensor, cell: dict[str, Any]) -> None:
        q, k, v_, _ = inputs
        if _is_mixer(v):
            cell["error_reference"] = "none: a token mixer computes its own operator, not softmax attention"
            return
        expected_shape = (q.shape[0], q.shape[1], n, v_.shape[-1])
        if tuple(out.shape) != expected_shape:
            cell["message"] = f"output shape {tuple(out.shape)} != {expected_shape}: error not computed"
            return
        pattern, pattern_key = None, None
        if v.pattern_fn is not None:
            pattern, pattern_key = self.pattern(v, n), v.mechanism.name
        rows = measure.sample_rows(n, self.config.error_rows, q.device)
        ref = self.reference(q, k, v_, rows, v.causal, pattern, pattern_key)
        cell["error"] = measure.relative_error(out[:, :, rows], ref)
        cell["error_reference"] = "softmax" + (" causal" if v.causal else "") + (
            f" with the {v.mechanism.name} pattern" if pattern is not None else "")
        if v.exact:
            ok = cell["error"] <= measure.EXACT_TOLERANCE[self.config.dtype]
            cell["exact_check"] = "ok" if ok else "differs"

    def derive(self, v: Variant, n: int, cell: dict[str, Any]) -> None:
        """FLOPs, GFLOP/s, ratio to SDPA and speed of light, once the cell and its baseline are measured."""
        c = self.config
        mult = 3.0 if c.backward else 1.0  # backward = 2 x forward matmul work
        density = None
        if v.pattern_fn is not None and cell["status"] == "ok":
            try:
                density = self.density(v, n)
                cell["density"] = density
            except Exception as exc:  # a pattern without density: report, keep the timing
                cell["message"] = (cell["message"] or "") + f" density unavailable: {exc}"
        if cell["status"] != "ok":
            return  # nothing measured: no derived numbers (and no slow pattern counting)
        shape = dict(batch=c.batch, heads=c.heads, q_len=n, kv_len=n, head_dim=c.head_dim, causal=v.causal)
        flops = None
        if v.kind in ("mechanism", "engine", "peer") and v.mechanism.flops is not None:
            try:
                flops = float(call_with_accepted(v.mechanism.flops, **shape, **v.params))
            except Exception as exc:
                cell["message"] = (cell["message"] or "") + f" flops() raised {type(exc).__name__}: {exc}"
        if flops is None and (v.kind in ("baseline", "flex") or v.mechanism.flops is None):
            flops = measure.dense_flops(**shape, density=density)
        if flops is not None:
            cell["flops"] = flops * mult
        try:
            cell["state_bytes"] = decode_state_bytes(v, n, c)
        except Exception as exc:  # a record's state formula should not cost the measurement
            cell["message"] = (cell["message"] or "") + f" state_bytes raised {type(exc).__name__}: {exc}"
        if cell["flops"]:
            cell["gflops_per_s"] = cell["flops"] / cell["time_s"] / 1e9
        base = next((b for b in reversed(self.cells) if b["kind"] == "baseline" and b["seq_len"] == n
                     and b["causal"] == v.causal and b["status"] == "ok"), None)
        if v.kind == "baseline":
            cell["vs_sdpa"] = 1.0
        elif base is not None:
            cell["vs_sdpa"] = cell["time_s"] / base["time_s"]
            base_density = (n + 1) / (2 * n) if v.causal else 1.0
            if density is not None and density < base_density * (1 - 1e-9):  # sparse beyond SDPA's own mask
                sol = base["time_s"] * density / base_density
                cell["speed_of_light_s"] = sol
                cell["speed_of_light_ratio"] = cell["time_s"] / sol

    def run_cell(self, v: Variant, n: int, inputs, force: bool = False) -> dict[str, Any]:
        cell = self.blank(v, n)
        try:
            cell["load"] = round(os.getloadavg()[0], 2)  # the 1-minute load average as the cell starts
        except (OSError, AttributeError):
            pass
        q, k, vv, _ = inputs
        cell["input_bytes"] = sum(t.numel() * t.element_size() for t in (q, k, vv))
        key = (v.name, v.causal)
        try:
            self.check_budget(v, n, cell, force)
            self.measure_cell(v, n, inputs, cell)
            cell["status"] = "ok"
            self.history.setdefault(key, []).append((n, cell["time_s"], cell["peak_memory_bytes"]))
        except _Skip as skip:
            if cell["status"] is None:
                cell["status"] = "skipped"
                cell["message"] = str(skip)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            from attnkit.errors import NotSupportedError

            if measure.is_oom(exc):
                cell["status"] = "oom"
                self.oom_at[key] = n
            elif isinstance(exc, NotSupportedError):
                cell["status"] = "unsupported"
            else:
                cell["status"] = "failed"
                self.failed_at.setdefault(key, n)
            text = str(exc).strip().splitlines()
            cell["message"] = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.derive(v, n, cell)
        cell["accuracy_class"] = accuracy_class(v, cell)
        return cell

    def complete_baselines(self, n: int, inputs, done: list[tuple[Variant, dict[str, Any]]]) -> None:
        """A baseline skipped for time at length ``n`` while other variants of its causal mode ran there is
        measured now (outside the budget), and their ratios to it derived again: no summary row loses its SDPA
        ratio because the baseline's prediction did not fit."""
        for i, (v, cell) in enumerate(done):
            if v.kind != "baseline" or cell["status"] != "skipped":
                continue
            if not any(o["status"] == "ok" and o["causal"] == v.causal and ov.kind != "baseline" for ov, o in done):
                continue
            new = self.run_cell(v, n, inputs, force=True)
            if new["status"] == "ok":
                new["message"] = "measured after the other variants (its budget prediction was exceeded)"
            self.cells[self.cells.index(cell)] = new
            done[i] = (v, new)
            for ov, o in done:
                if ov.kind != "baseline" and o["causal"] == v.causal and o["status"] == "ok":
                    self.derive(ov, n, o)


def accuracy_class(v: Variant, cell: dict[str, Any]) -> str:
    """Which of ``ACCURACY_CLASSES`` a measured variant belongs to (see there)."""
    if v.kind == "baseline":
        return "exact"
    if _is_mixer(v):
        return "mixer"
    if not v.exact:
        return "approx"
    if v.pattern_fn is not None:
        n = cell["seq_len"]
        full = (n + 1) / (2 * n) if v.causal else 1.0
        density = cell.get("density")
        if density is None or density < full * (1 - 1e-9):
            return "masked"
    return "other" if cell.get("exact_check") == "differs" else "exact"


def run_benchmark(config: BenchConfig, *, variants: list[Variant] | None = None, progress: bool = True,
                  on_cell: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``config`` and return the results document (the content of ``results.json``).

    ``on_cell(document)`` is called after every cell with the document so far (to save partial results).
    Ctrl-C stops the run between calls; the document then has ``"interrupted": true`` and every cell
    measured until then.
    """
    if variants is None:
        variants = select_variants(config)
    run = _Run(config, variants, progress, on_cell)
    device = run.device
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "config": config.to_dict(),
        "machine": describe_machine(device),
        "memory_method": measure.MEMORY_METHOD.get(device.type, "not measured on this device"),
        "variants": [{"name": v.name, "label": v.label, "kind": v.kind, "family": v.family, "exact": v.exact,
                      "causal": v.causal, "complexity": v.complexity, "paper": v.paper,
                      "seq_lens": v.seq_lens, "params": dict(v.params), "unsupported": v.unsupported,
                      "engine": v.engine,
                      "mechanism_kind": v.mechanism.kind if v.mechanism is not None else "attention"}
                     for v in variants],
        "results": run.cells,
        "interrupted": False,
        "complete": False,
        "elapsed_s": 0.0,
        "compile_s": 0.0,
        "left_out": [{"name": v.name, "label": v.label, "why": v.unsupported} for v in variants if v.unsupported],
    }
    lengths = sorted({n for v in variants for n in v.seq_lens})
    total = sum(len(v.seq_lens) for v in variants)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="cell", desc="attnkit bench", dynamic_ncols=True, leave=False)
    try:
        for n in lengths:
            try:
                inputs = run.inputs(n)
            except Exception as exc:  # the inputs alone do not fit (--batch / --heads too large): every cell OOM
                if not measure.is_oom(exc):
                    raise
                for v in variants:
                    if n in v.seq_lens:
                        cell = run.blank(v, n)
                        cell["status"] = "oom"
                        cell["message"] = (f"the inputs q, k, v of {n} tokens do not fit in memory "
                                           f"({str(exc).splitlines()[0][:160]}); lower --batch, --heads or the length")
                        run.cells.append(cell)
                        if bar is not None:
                            bar.update(1)
                if on_cell is not None:
                    on_cell(doc)
                continue
            run._refs.clear()
            done = []
            for v in variants:
                if n not in v.seq_lens:
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"{v.label} n={n}, {run.elapsed_s():.0f}/{config.time_budget_s:.0f} s budget",
                                        refresh=True)
                cell = run.run_cell(v, n, inputs)
                run.cells.append(cell)
                done.append((v, cell))
                doc["elapsed_s"] = time.perf_counter() - run.start
                doc["compile_s"] = run.compile_total_s
                if bar is not None:
                    bar.update(1)
                if on_cell is not None:
                    on_cell(doc)
            run.complete_baselines(n, inputs, done)
            del inputs
            run._structured.clear()
        doc["complete"] = True
    except KeyboardInterrupt:
        doc["interrupted"] = True
    finally:
        if bar is not None:
            bar.close()
    doc["elapsed_s"] = time.perf_counter() - run.start
    doc["compile_s"] = run.compile_total_s
    return doc
