"""Linear attention benchmark: the speed and memory targets of the kernelized linear attention issue, one run.

    python benchmarks/bench_linear.py            # the issue's sizes (~2-4 minutes on 2 cores)
    python benchmarks/bench_linear.py --quick    # small sizes, seconds; checks the script, not the targets

float32, batch 1, 8 heads, head dim 64, 2 threads unless told otherwise; causal linear attention with the
``elu`` feature map (``--feature-map``) in chunked mode. Every time is a median of ``--repeats`` calls (min-max).

1. the machine's fp32 matmul GFLOP/s (a 2048^3 ``torch.mm``, best of 5): the peak the rest is compared with;
2. causal chunked at 8K .. 64K tokens: achieved GFLOP/s on the engine's own FLOP count
   (``attnkit.ops.linear.chunked.chunked_flops``: intra-chunk ``Q K^T``, ``A [V, 1]``; per chunk ``K^T [V, 1]``
   and ``Q S``) and its % of the matmul peak (target >= 40% at 64K); output checked against the parallel
   (masked quadratic) mode on the first 2,048 tokens;
3. linear time: t(64K) / t(8K) (target <= 9);
4. against ``scaled_dot_product_attention(is_causal=True)`` from 2,048 tokens up (target: faster);
5. recurrent decoding: one-token step with the state after 100 and after 60,000 tokens, interleaved, medians
   (target: within 1.1x);
6. peak memory allocated during a chunked call (allocation tracer of ``attnkit.bench.measure``), per token:
   linear in tokens means a constant bytes-per-token.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit import feature_maps
from attnkit.bench.measure import fmt_ms as fmt
from attnkit.bench.measure import median_time, peak_memory
from attnkit.bench.scripts import machine_header, script_parser, write_json
from attnkit.ops.linear.chunked import chunked_flops
from attnkit.testing import relative_error

CPU = torch.device("cpu")


def qkv(n: int, heads: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, dim, generator=g) for _ in range(3)]


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a square ``torch.mm`` into a preallocated output (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    torch.mm(a, b, out=c)
    best = min(median_time(lambda: torch.mm(a, b, out=c), 1, warmup=0)[0] for _ in range(repeats))
    return 2.0 * size**3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=3)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--feature-map", default="elu", help="a name from attnkit.feature_maps (default elu)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, d, reps, cs = args.heads, args.head_dim, args.repeats, args.chunk_size
    fm = feature_maps.get(args.feature_map)
    m = fm.feature_dim(d)
    lens = [1024, 2048, 4096, 8192] if args.quick else [8192, 16384, 32768, 65536]
    sdpa_lens = [1024, 2048] if args.quick else [2048, 4096, 8192, 16384]
    decay_positions = (100, 6000) if args.quick else (100, 60000)
    results: dict = {"machine": machine_header("linear attention"), "quick": args.quick, "heads": h,
                     "head_dim": d, "feature_map": args.feature_map, "chunk_size": cs}
    print(f"float32, batch 1, {h} heads, head dim {d}, feature map {args.feature_map} (m = {m}), chunk {cs}; "
          f"medians of {reps} calls (min-max)\n")

    def run(q, k, v, **kw):
        with torch.no_grad():
            return attnkit.linear_attention(q, k, v, feature_map=fm, causal=True, chunk_size=cs, **kw)

    # 1. the machine
    peak = matmul_peak()
    results["matmul_gflops"] = peak
    print(f"## fp32 matmul peak (2048^3 torch.mm, best of 5): {peak:.1f} GFLOP/s\n")

    # 2 + 3. chunked causal: GFLOP/s on its own count, % of peak, scaling
    print("## causal chunked: own FLOP count, GFLOP/s, % of matmul peak (target >= 40% at the longest)")
    results["chunked"] = []
    for n in lens:
        q, k, v = qkv(n, h, d)
        t = median_time(lambda q=q, k=k, v=v: run(q, k, v, mode="chunked"), reps)
        flops = h * chunked_flops(n, m, d, cs)
        check = min(n, 2048)
        with torch.no_grad():
            sl = [x[:, :, :check] for x in (q, k, v)]
            err = relative_error(run(*sl, mode="chunked"), run(*sl, mode="parallel"))
        row = {"n": n, "time": t, "flops": flops, "gflops": flops / t[0] / 1e9,
               "pct_peak": 100 * flops / t[0] / 1e9 / peak, "rel_err_vs_parallel": err}
        results["chunked"].append(row)
        print(f"n={n:6d} {fmt(t)}  {flops / 1e9:7.2f} GFLOP  {row['gflops']:6.1f} GFLOP/s = {row['pct_peak']:5.1f}% "
              f"of peak  (vs parallel on {check} tokens: {err:.1e})")
    ratio = results["chunked"][-1]["time"][0] / results["chunked"][0]["time"][0]
    results["scaling"] = {"long": lens[-1], "short": lens[0], "ratio": ratio, "ideal": lens[-1] / lens[0]}
    print(f"t({lens[-1]}) / t({lens[0]}) = {ratio:.2f} (ideal {lens[-1] / lens[0]:.0f}; target <= "
          f"{lens[-1] / lens[0] * 9 / 8:.0f})\n")

    # 4. against SDPA causal
    print("## causal chunked vs SDPA causal (target: faster from 2,048 up)")
    results["vs_sdpa"] = []
    for n in sdpa_lens:
        q, k, v = qkv(n, h, d)
        with torch.no_grad():
            t_sdpa = median_time(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
        t_lin = median_time(lambda q=q, k=k, v=v: run(q, k, v, mode="chunked"), reps)
        row = {"n": n, "sdpa": t_sdpa, "linear": t_lin, "speedup": t_sdpa[0] / t_lin[0]}
        results["vs_sdpa"].append(row)
        print(f"n={n:6d}  SDPA {fmt(t_sdpa)}  linear {fmt(t_lin)}  speedup {row['speedup']:.2f}x")

    # 5. decoding: step time at two positions, interleaved
    print(f"\n## recurrent decode step at position {decay_positions[0]} vs {decay_positions[1]} (target <= 1.1x)")
    states = {}
    for p in decay_positions:
        q, k, v = qkv(p, h, d, seed=1)
        _, states[p] = run(q, k, v, return_state=True)
    q1, k1, v1 = qkv(1, h, d, seed=2)
    steps = 200 if args.quick else 2000
    times: dict[int, list[float]] = {p: [] for p in decay_positions}
    for i in range(steps):
        for p in decay_positions if i % 2 == 0 else decay_positions[::-1]:  # ABBA: neither always runs first
            t0 = time.perf_counter()
            run(q1, k1, v1, state=states[p])
            times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(ts[10:]) for p, ts in times.items()}
    best = {p: min(ts) for p, ts in times.items()}
    lo, hi = decay_positions
    results["decode"] = {"positions": list(decay_positions), "median_s": [med[lo], med[hi]],
                         "min_s": [best[lo], best[hi]], "ratio": med[hi] / med[lo],
                         "ratio_min": best[hi] / best[lo], "state_bytes": states[hi].nbytes}
    print(f"step at {lo}: {med[lo] * 1e6:.1f} us, at {hi}: {med[hi] * 1e6:.1f} us = {med[hi] / med[lo]:.3f}x "
          f"(fastest steps: {best[hi] / best[lo]:.3f}x); state {states[hi].nbytes / 1024:.1f} KiB whatever the "
          f"position ({steps} interleaved steps)\n")

    # 6. memory
    print("## peak memory allocated during a chunked call (output included; inputs excluded)")
    results["memory"] = []
    for n in lens:
        q, k, v = qkv(n, h, d)
        _, during = peak_memory(lambda q=q, k=k, v=v: run(q, k, v, mode="chunked"), CPU)
        io = 4 * q.numel() * q.element_size()
        row = {"n": n, "allocated_bytes": during, "bytes_per_token": during / n, "qkvo_bytes": io}
        results["memory"].append(row)
        print(f"n={n:6d}  {during / 2**20:8.1f} MiB = {during / n / 1024:6.2f} KiB/token  "
              f"(q, k, v, out: {io / 2**20:.1f} MiB)")

    last = results["chunked"][-1]
    summary = {"matmul_gflops": round(peak, 1), "n": last["n"], "chunked_ms": round(last["time"][0] * 1e3, 1),
               "chunked_gflops": round(last["gflops"], 1), "pct_peak": round(last["pct_peak"], 1),
               "scaling": round(ratio, 2), "min_speedup_vs_sdpa": round(min(r["speedup"] for r in
                                                                           results["vs_sdpa"]), 2),
               "decode_ratio": round(results["decode"]["ratio"], 3),
               "bytes_per_token": [round(r["bytes_per_token"]) for r in results["memory"]]}
    write_json(args.json, results)
    print("\n" + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
