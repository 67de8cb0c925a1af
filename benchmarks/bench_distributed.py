"""Sequence-parallel benchmark: per-rank memory versus ranks, and causal load balance of ring versus striped.

    python benchmarks/bench_distributed.py            # total length 4096, ranks 1, 2, 4 (~1 minute on 2 cores)
    python benchmarks/bench_distributed.py --quick    # total length 512: checks the script, seconds

Ranks are local processes on the loopback interface (gloo, ``attnkit.distributed.run_local``), one torch thread
each. Every configuration is checked against one-process attention before it is measured.

1. Per-rank peak memory at a fixed total length, for P = 1, 2, 4 (causal, contiguous ring, forward + backward):
   the peak of the bytes allocated during the call (``attnkit.bench.measure.peak_memory``: the profiler's
   allocation tracer; inputs excluded), and the resident bytes of the rank's shard (q, k, v, output and their
   gradients). The resident bytes fall as 1/P; the peak falls faster, because each step materialises one
   (n/P) x (n/P) block of scores per head.
2. Causal work imbalance: per-rank *compute* time (CPU time of the thread in the block kernels, so ranks sharing
   cores do not distort it) for the contiguous layout (Ring Attention) and the striped layout (Striped
   Attention); max/min over ranks. The analytic ratio of allowed (query, key) pairs is printed beside it.

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import attnkit
from attnkit import patterns as P
from attnkit.bench.machine import describe_machine
from attnkit.bench.measure import peak_memory
from attnkit.distributed import ring_attention, run_local, shard, shard_positions

CPU = torch.device("cpu")


def _inputs(n: int, heads: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, dim, generator=g) for _ in range(4)]  # q, k, v, grad_out


def _memory_worker(rank: int, world: int, n: int, heads: int, dim: int) -> dict:
    q, k, v, do = _inputs(n, heads, dim)
    ql, kl, vl = (shard(t, rank, world).clone().requires_grad_(True) for t in (q, k, v))
    dol = shard(do, rank, world).clone()

    def fwd_bwd():
        out = ring_attention(ql, kl, vl, causal=True)
        out.backward(dol)
        return out

    out, peak = peak_memory(fwd_bwd, CPU)
    # check before reporting: this rank's rows of one-process causal attention
    ref = attnkit.attention(q.double(), k.double(), v.double(), pattern=P.causal())
    err = float((out.detach().double() - shard(ref, rank, world)).abs().max())
    resident = sum(t.numel() * t.element_size() for t in (ql, kl, vl, out, ql.grad, kl.grad, vl.grad))
    return {"rank": rank, "peak_bytes": peak, "resident_bytes": resident, "max_abs_err": err}


def _balance_worker(rank: int, world: int, n: int, heads: int, dim: int, layout: str, repeats: int) -> dict:
    import attnkit.distributed.ring as ring

    spent = [0.0]
    inner = ring.block_attention

    def timed(*args, **kwargs):  # CPU time of this thread inside the block kernel
        t0 = time.thread_time()
        out = inner(*args, **kwargs)
        spent[0] += time.thread_time() - t0
        return out

    ring.block_attention = timed
    q, k, v, _ = _inputs(n, heads, dim)
    ql, kl, vl = (shard(t, rank, world, layout=layout) for t in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=True, layout=layout)  # warm-up and check
    ref = attnkit.attention(q.double(), k.double(), v.double(), pattern=P.causal())
    err = float((out.double() - shard(ref, rank, world, layout=layout)).abs().max())
    spent[0] = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            ring_attention(ql, kl, vl, causal=True, layout=layout)
    mask = P.causal().materialize(n, n)[0, 0]
    pairs = int(mask[shard_positions(n, rank, world, layout)].sum())
    return {"rank": rank, "compute_s": spent[0] / repeats, "pairs": pairs, "max_abs_err": err}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the claims")
    ap.add_argument("--seq-len", type=int, default=None, help="total sequence length (default 4096; quick 512)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    n = args.seq_len or (512 if args.quick else 4096)
    repeats = args.repeats or (2 if args.quick else 5)
    report: dict = {"machine": describe_machine(CPU), "seq_len": n, "heads": args.heads, "dim": args.dim,
                    "dtype": "float32", "memory": [], "balance": []}
    print(f"# sequence parallel on {report['machine']['cpu']} ({report['machine']['cpu_count']} cores), "
          f"gloo on loopback, 1 thread per rank; n={n}, heads={args.heads}, dim={args.dim}, float32, causal\n")

    print("## per-rank peak memory, causal ring attention forward + backward (fixed total length)\n")
    print("| ranks | peak MiB (max over ranks) | x of 1 rank | 1/P | resident shard MiB | max abs err |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    for world in args.ranks:
        rows = run_local(_memory_worker, world, n, args.heads, args.dim, timeout_s=120.0)
        peak = max(r["peak_bytes"] for r in rows)
        resident = max(r["resident_bytes"] for r in rows)
        err = max(r["max_abs_err"] for r in rows)
        if err > 1e-4:
            raise SystemExit(f"ring attention with {world} ranks disagrees with one process: {err:.2e}")
        base = base or (peak, resident)
        report["memory"].append({"ranks": world, "peak_bytes": peak, "resident_bytes": resident,
                                 "ratio_peak": peak / base[0], "ratio_resident": resident / base[1]})
        print(f"| {world} | {peak / 2**20:.1f} | {peak / base[0]:.3f} | {1 / world:.3f} | {resident / 2**20:.2f} "
              f"| {err:.1e} |")

    print("\n## causal work imbalance: per-rank compute time (CPU time in the block kernels)\n")
    print("| ranks | layout | compute ms per rank | max/min time | max/min allowed pairs |")
    print("|---:|---|---|---:|---:|")
    for world in [w for w in args.ranks if w > 1]:
        for layout in ("contiguous", "striped"):
            rows = run_local(_balance_worker, world, n, args.heads, args.dim, layout, repeats, timeout_s=120.0)
            if max(r["max_abs_err"] for r in rows) > 1e-4:
                raise SystemExit(f"{layout} ring with {world} ranks disagrees with one process")
            t = [r["compute_s"] for r in rows]
            pairs = [r["pairs"] for r in rows]
            report["balance"].append({"ranks": world, "layout": layout, "compute_s": t,
                                      "imbalance": max(t) / min(t), "pairs_imbalance": max(pairs) / min(pairs)})
            per = ", ".join(f"{x * 1e3:.1f}" for x in t)
            print(f"| {world} | {layout} | {per} | {max(t) / min(t):.2f} | {max(pairs) / min(pairs):.2f} |")
    print()
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
