"""Run a function on ``world_size`` local processes over the loopback interface (tests, benchmarks, examples).

For real jobs use ``torchrun`` (see docs/long-context.md); this helper exists so that a test or a benchmark can
start a small process group from Python, and so that a rank that dies or hangs gives an error, not a hang.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_local", "free_port", "RankFailure"]


class RankFailure(RuntimeError):
    """One or more ranks raised, died or did not finish; ``errors`` maps rank to its traceback or reason."""

    def __init__(self, message: str, errors: dict[int, str]):
        super().__init__(message)
        self.errors = errors


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, timeout_s: float, threads: int,
            fn: Callable, args: tuple, results) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # report everything, including SystemExit from the function
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover - best effort
                pass
    results.close()
    results.join_thread()  # flush the result through the pipe before the hard exit
    # skip interpreter teardown (and gloo's destructors waiting on dead peers)
    os._exit(0)


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout_s: float = 20.0,
              deadline_s: float | None = None, threads: int = 1, start_method: str = "forkserver") -> list[Any]:
    """Start ``world_size`` processes, each running ``fn(rank, world_size, *args)`` inside an initialised
    process group (``backend``, ``init_process_group(timeout=timeout_s)``), and return their results in rank
    order. ``fn`` must be importable (a module-level function) and its results picklable.

    Raises :class:`RankFailure` listing every rank's error when any rank raises, dies, or when the whole run
    exceeds ``deadline_s`` (default ``3 * timeout_s + 60``): no hang. After a first failure the other ranks have
    ``timeout_s`` to report (their own timeouts name the peer they waited for), then they are killed.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    deadline_s = 3 * timeout_s + 60 if deadline_s is None else deadline_s
    if start_method == "forkserver":
        # one clean server process imports torch once; every rank is forked from it (cheap, and safe: the server
        # never started OpenMP or a process group). Spawn re-imports torch in every rank (seconds each).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "attnkit", "attnkit.distributed"])
    else:
        ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, threads, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any]] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(got) < world_size and time.monotonic() < end:
            failed = [r for r, (s, _) in got.items() if s != "ok"]
            if failed:  # the others get one timeout to fail on their own, then are killed
                end = min(end, time.monotonic() + timeout_s + 1.0)
            try:
                rank, status, value = results.get(timeout=0.2)
                got[rank] = (status, value)
            except queue.Empty:
                for r, p in enumerate(procs):  # a rank that died without reporting (killed, os._exit, segfault)
                    if r not in got and p.exitcode is not None:
                        time.sleep(0.2)  # its message may still be in the pipe
                        if results.empty():
                            got[r] = ("error", f"process exited with code {p.exitcode} without a result")
    finally:
        for p in procs:
            p.join(timeout=1.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=1.0)
    errors = {r: v for r, (s, v) in got.items() if s != "ok"}
    for r in range(world_size):
        if r not in got:
            errors[r] = f"no result within deadline_s={deadline_s}s (killed)"
    if errors:
        detail = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed:\n{detail}", errors)
    return [got[r][1] for r in range(world_size)]
