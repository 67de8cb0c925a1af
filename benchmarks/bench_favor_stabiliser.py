"""What the FAVOR+ stabiliser costs: ``performer`` features with ``stabilize=True`` (the default: per-query and
per-call key shifts) against ``stabilize=False`` (the unshifted features, which underflow to zeros for large
q, k).

A/B interleaved in one process, ``time.process_time()`` (CPU time: robust to other work on the machine),
medians. Theoretical extra work per (batch, head): non-causal (one forward sees every key) no matmul, only
``O(n m)`` maxima and subtractions; causal (chunked, features in blocks) ``2 n d m`` FLOPs for one projection
of the keys that takes their maximum before the first block, beside the mechanism's own count.

    PYTHONPATH=src python benchmarks/bench_favor_stabiliser.py [--quick] [--threads 1]
"""

from __future__ import annotations

import statistics
import time

import torch

import attnkit
from attnkit.bench.scripts import machine_header, script_parser, write_json
from attnkit.feature_maps import FavorFeatureMap
from attnkit.ops.linear.chunked import chunked_flops


def main() -> None:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=7)
    ap.add_argument("--features", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_header("FAVOR+ stabiliser")
    lens = [1024, 2048] if args.quick else [2048, 8192]
    h, d, m = args.heads, args.head_dim, args.features
    results = []
    for n in lens:
        for causal in (False, True):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
            maps = {"stabilised": FavorFeatureMap(d, m, seed=1),
                    "plain": FavorFeatureMap(d, m, seed=1, stabilize=False)}
            times: dict[str, list[float]] = {name: [] for name in maps}
            with torch.no_grad():
                for fm in maps.values():  # warm-up
                    attnkit.linear_attention(q, k, v, feature_map=fm, causal=causal)
                for _ in range(args.repeats):
                    for name, fm in maps.items():  # interleaved A/B
                        t0 = time.process_time()
                        attnkit.linear_attention(q, k, v, feature_map=fm, causal=causal)
                        times[name].append(time.process_time() - t0)
            if causal:
                base = chunked_flops(n, m, d, 64)
            else:
                base = 4.0 * n * m * (d + 1)
            base += 2.0 * 2 * n * d * m  # the features of q and k
            extra = 2.0 * n * d * m * (1 if causal else 0)  # a pass over the keys when features come in blocks
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {"n": n, "causal": causal, "heads": h, "head_dim": d, "features": m,
                   "plain_s": med["plain"], "stabilised_s": med["stabilised"],
                   "ratio": med["stabilised"] / med["plain"], "flops_per_head": base, "extra_flops_per_head": extra}
            results.append(row)
            print(f"n={n:6d} causal={causal!s:5}  plain {med['plain'] * 1e3:8.1f} ms  stabilised "
                  f"{med['stabilised'] * 1e3:8.1f} ms  ratio {row['ratio']:.2f}  (FLOPs/head {base / 1e6:.0f} M, "
                  f"extra {extra / 1e6:.0f} M = {extra / base:.0%})")
    write_json(args.json, {"machine": machine, "results": results})


if __name__ == "__main__":
    main()
