"""Paged KV cache: one decode step at 32K cached tokens, against the contiguous KVCache, in the same run.

Target (issue 14): the paged step within 1.2x of the contiguous cache's step (CPU). Both caches hold the same
keys; steps alternate between them (A/B interleaved, process time) so machine load hits both alike. Theoretical
cost of one step: it reads the whole cache once, 2 * heads * n * dim * 4 bytes (float32), and does
4 * heads * n * dim FLOPs.

    python benchmarks/bench_paged.py [--quick] [--threads 1] [--length 32768] [--page-size 16]
"""

from __future__ import annotations

import statistics
import time

import torch

import attnkit
from attnkit.bench.scripts import machine_header, script_parser, write_json


def main() -> None:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=30)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--extent", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = 2048 if args.quick else args.length
    machine = machine_header("paged KV cache", torch.device("cpu"))
    h, d = args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, h, n, d, generator=g).unbind(0)
    flat, paged = attnkit.KVCache(n + args.repeats + 8), attnkit.PagedKVCache(args.page_size, extent=args.extent)
    flat.append(k, v)
    paged.append(k, v)
    times = {"contiguous": [], "paged": []}
    outs = {}
    for step in range(args.repeats + 2):
        q1, k1, v1 = torch.randn(3, 1, h, 1, d, generator=g).unbind(0)
        for name, cache in (("contiguous", flat), ("paged", paged)) if step % 2 else (("paged", paged),
                                                                                      ("contiguous", flat)):
            t0 = time.process_time()
            outs[name] = cache.attend(q1, k1, v1)
            t = time.process_time() - t0
            if step >= 2:  # warm-up
                times[name].append(t)
        torch.testing.assert_close(outs["paged"], outs["contiguous"])
    med = {name: statistics.median(t) for name, t in times.items()}
    byte = 2 * h * n * d * 4
    flops = 4 * h * n * d
    print(f"n={n} heads={h} dim={d} page_size={args.page_size} extent={args.extent} "
          f"runs per sequence: {len(paged._runs(0))}")
    for name, t in med.items():
        print(f"  {name:10s} {t * 1e3:8.3f} ms  ({byte / t / 1e9:.1f} GB/s of {byte / 1e6:.0f} MB read, "
              f"{flops / t / 1e9:.2f} GFLOP/s)")
    ratio = med["paged"] / med["contiguous"]
    print(f"  paged / contiguous = {ratio:.2f}x (target <= 1.2x): {'met' if ratio <= 1.2 else 'NOT met'}")
    write_json(args.json, {"machine": machine, "length": n, "median_s": med, "ratio": ratio})


if __name__ == "__main__":
    main()
