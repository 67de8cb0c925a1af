"""Measurements of one call: wall time, peak memory, theoretical FLOPs, error against exact softmax.

Peak memory: on CUDA, the caching allocator's statistics (``torch.cuda.max_memory_allocated``); on CPU, an
allocation tracer (the PyTorch profiler with ``profile_memory=True`` records every tensor allocation and
free of the call; the peak of their running sum is the memory the call needed). Both count the bytes
allocated *during* the call (temporaries and output), not the inputs that existed before it.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["dense_flops", "sync", "time_calls", "median_time", "fmt_ms", "peak_memory", "MEMORY_METHOD",
           "exact_softmax_rows", "sample_rows", "relative_error", "is_oom", "EXACT_TOLERANCE"]

MEMORY_METHOD = {
    "cpu": "allocation tracer: peak of the running sum of tensor allocations and frees recorded by "
           "torch.profiler (profile_memory=True) during one call; inputs excluded",
    "cuda": "CUDA caching-allocator statistics: torch.cuda.max_memory_allocated during one call, minus the "
            "bytes allocated before it; inputs excluded",
}

# Relative error below which an exact mechanism agrees with exact softmax (float64 reference).
EXACT_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def dense_flops(*, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
                density: float | None = None) -> float:
    """Forward FLOPs of softmax attention: two matmuls (QK^T and PV) of 2 * q_len * kv_len * head_dim each,
    per batch element and head; halved when causal (the registry's convention), or scaled by ``density``
    (fraction of allowed pairs) when given."""
    flops = 4.0 * batch * heads * q_len * kv_len * head_dim
    if density is not None:
        return flops * density
    return flops / 2 if causal else flops


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall time measures the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, *, repeats: int, budget_s: float,
               min_repeats: int = 1) -> list[float]:
    """Wall time of up to ``repeats`` calls of ``fn``, stopping early once ``budget_s`` is spent
    (after at least ``min_repeats`` calls)."""
    times: list[float] = []
    start = time.perf_counter()
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if i + 1 >= min_repeats and time.perf_counter() - start >= budget_s:
            break
    return times


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1,
                device: torch.device | None = None) -> tuple[float, float, float]:
    """``(median, min, max)`` wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (the
    benchmark scripts' timer; ``device`` synchronises CUDA around each call)."""
    dev = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    times = time_calls(fn, dev, repeats=repeats, budget_s=float("inf"))
    return statistics.median(times), min(times), max(times)


def fmt_ms(t: tuple[float, float, float]) -> str:
    """``median ms (min-max)`` of a :func:`median_time` result."""
    med, lo, hi = t
    return f"{med * 1e3:9.1f} ms ({lo * 1e3:.1f}-{hi * 1e3:.1f})"


def summarize(times: list[float]) -> dict[str, float]:
    return {"time_s": statistics.median(times), "time_min_s": min(times), "time_max_s": max(times)}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines ("USDT: ... profiler_start") on file descriptor 2."""
    fd = 2  # the C++ side writes to file descriptor 2 whatever Python's sys.stderr is (a capture, a wrapper)
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """Call ``fn`` once and return ``(its result, peak bytes allocated during the call)``."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return out, int(torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        return fn(), None
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # The whole traced call runs with file descriptor 2 silenced: besides its start/stop lines the profiler's
    # C++ side warns ("Memory block of unknown size was allocated before the profiling started") when the call
    # frees a tensor allocated before it, and that line would print through the progress bar.
    with _quiet_stderr():
        prof.__enter__()
        try:
            out = fn()
        finally:
            prof.__exit__(None, None, None)
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort()
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return out, int(peak)


def sample_rows(seq_len: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` query rows spread evenly over the sequence, first and last included."""
    if count >= seq_len:
        return torch.arange(seq_len, device=device)
    return torch.linspace(0, seq_len - 1, count, device=device).round().long().unique()


def exact_softmax_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, *,
                       causal: bool = False, pattern: Any = None, chunk: int = 16) -> torch.Tensor:
    """Exact softmax attention, in float64, for the query ``rows`` of ``q [b, h, n, d]`` against all of
    ``k, v [b, h, n, d]``: output ``[b, h, len(rows), d_v]``. ``pattern`` (an ``attnkit.patterns.Pattern``)
    restricts the keys each query sees; ``causal`` adds the causal mask. Rows with no allowed key give zeros
    (attnkit's convention). Computed ``chunk`` rows at a time so memory stays ``O(chunk * n)``."""
    b, h, n, d = q.shape
    kv_len = k.shape[2]
    k64, v64 = k.double(), v.double()
    scale = d ** -0.5
    kv_idx = torch.arange(kv_len, device=q.device)
    outs = []
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, idx].double(), k64) * scale
        allowed = torch.ones(1, 1, idx.numel(), kv_len, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed & (kv_idx[None, :] <= (idx[:, None] + kv_len - n))[None, None]
        if pattern is not None:
            bi = torch.arange(b, device=q.device).view(-1, 1, 1, 1)
            hi = torch.arange(h, device=q.device).view(1, -1, 1, 1)
            m = pattern.allowed(bi, hi, idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1), n, kv_len)
            allowed = allowed & m
        s = s.masked_fill(~allowed, -math.inf)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a fully masked row gives zeros
        outs.append(p @ v64)
    return torch.cat(outs, dim=2)


def sampled_density(pattern: Any, n: int, *, rows: int = 1024, chunk: int = 128) -> float:
    """A pattern's density (fraction of allowed pairs) estimated on ``rows`` evenly spaced query rows, for
    lengths where counting all ``n^2`` pairs is too slow."""
    idx = sample_rows(n, rows, torch.device("cpu"))
    kv = torch.arange(n).view(1, 1, 1, -1)
    allowed = 0
    for start in range(0, idx.numel(), chunk):
        q = idx[start:start + chunk].view(1, 1, -1, 1)
        m = pattern.allowed(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                            q, kv, n, n)
        allowed += int(torch.broadcast_to(m, (1, 1, q.shape[2], n)).sum())
    return allowed / (idx.numel() * n)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error ``||actual - expected|| / ||expected||`` in float64 (0 when both are 0)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = float(e.norm())
    diff = float((a - e).norm())
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def is_oom(exc: BaseException) -> bool:
    """Whether an exception means the device ran out of memory."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def detail_length(doc: dict[str, Any]) -> int | None:
    """The length the detail table and the Pareto plot show: the longest at which the SDPA baseline and at
    least 3/4 of the most variants measured at any length were measured."""
    ok = [c for c in doc["results"] if c["status"] == "ok"]
    counts: dict[int, int] = {}
    for c in ok:
        counts[c["seq_len"]] = counts.get(c["seq_len"], 0) + 1
    if not counts:
        return None
    base = {c["seq_len"] for c in ok if c["kind"] == "baseline"} or set(counts)
    # The longest length where SDPA ran and most of what ran anywhere ran too.
    best = max(counts[n] for n in base)
    return max(n for n in base if counts[n] >= 0.75 * best)
