"""Approximate attention benchmark: the Speed section of the approximate attention issue, one run.

    python benchmarks/bench_approx.py              # 16,384 tokens, 8 heads, head dim 64 (minutes on 2 cores)
    python benchmarks/bench_approx.py --quick      # 1,024 tokens: checks the script, not the targets
    python benchmarks/bench_approx.py --causal     # causal variants against SDPA(is_causal=True)

float32, batch 1, 2 threads unless told otherwise, no autograd. For every registered mechanism of the approx
family (``--mechanisms`` to choose) with its registry benchmark parameters (``attnkit list``), and for
``scaled_dot_product_attention`` (exact) in the same run:

- time: median of ``--repeats`` calls (min-max; fewer once ``--budget-s`` is spent), after one untimed call
  (which is the memory measurement);
- peak memory allocated during one call (allocation tracer of ``attnkit.bench.measure.peak_memory``; inputs
  excluded), and its ratio to one ``[heads, n, n]`` float32 score matrix: a ratio well below 1 means memory
  is not quadratic;
- theoretical forward FLOPs (the registry's count) and GFLOP/s;
- error against exact softmax: relative Frobenius error of the output on ``--rows`` query rows spread over
  the sequence (``attnkit.bench.measure.exact_softmax_rows``, float64).

Untrained parameters are what a benchmark can give: Linformer's projections and SPARSEK's scorer are random
(their errors are those of random projections / selections), Transformer-VQ's codebook is fitted by k-means on
*calibration* keys drawn independently of the measured ones, and so is causal Loki's PCA basis. SOFT and YOSO
approximate their own kernels, so their error against softmax measures the kernel change, not the estimator.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench.measure import dense_flops, exact_softmax_rows, peak_memory, relative_error, sample_rows
from attnkit.bench.scripts import machine_header, script_parser, write_json
from attnkit.bench.workloads import INPUT_KINDS, make_inputs, shape_params
from attnkit.ops.approx import pca_basis

CPU = torch.device("cpu")


def median_time(fn, repeats: int, budget_s: float) -> tuple[float, float, float, int]:
    """Median (min, max) of up to ``repeats`` calls, stopping once ``budget_s`` is spent (one call at least)."""
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start >= budget_s:
            break
    return statistics.median(times), min(times), max(times), len(times)


def qkv(n: int, heads: int, dim: int, seed: int = 0, kind: str = "clustered") -> tuple[torch.Tensor, ...]:
    """Synthetic inputs of ``attnkit bench`` (:func:`attnkit.bench.workloads.make_inputs`)."""
    return make_inputs(kind, (1, heads, n, dim), torch.Generator().manual_seed(seed))


def build(name: str, *, causal: bool, heads: int, dim: int, n: int, calibration_keys: torch.Tensor):
    m = attnkit.mechanism_info(name)
    extra = {}
    if name == "loki" and causal:  # causal Loki needs a PCA basis calibrated offline (as in the paper)
        extra["basis"] = pca_basis(calibration_keys)[0]
    fn = m.build(causal=causal, **m.bench_params, **extra,
                 **shape_params(m, heads=heads, head_dim=dim, seq_len=n))
    if isinstance(fn, torch.nn.Module):
        fn.eval()
    if name == "transformer_vq":
        fn.fit(calibration_keys, iterations=5)
    return m, fn


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=None,
                       repeats_help="timed calls per mechanism (default 3; 1 quick)",
                       quick_help="1,024 tokens: checks that the script runs")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens (default 16384; 1024 with --quick)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="stop repeating a mechanism's timed calls after this many seconds (default 60)")
    ap.add_argument("--rows", type=int, default=256, help="query rows the error is measured on (default 256)")
    ap.add_argument("--causal", action="store_true", help="causal variants (mechanisms that have one)")
    ap.add_argument("--inputs", choices=INPUT_KINDS, default="clustered",
                    help="synthetic q, k, v: clustered (peaked attention; default) or gaussian (i.i.d.)")
    ap.add_argument("--mechanisms", default=None, help="comma-separated names (default: the approx family)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.seq_len or (1024 if args.quick else 16384)
    reps = args.repeats or (1 if args.quick else 3)
    h, d = args.heads, args.head_dim
    names = (args.mechanisms.split(",") if args.mechanisms
             else [m.name for m in attnkit.list_mechanisms("approx")])
    if args.causal:
        names = [name for name in names if attnkit.mechanism_info(name).causal]

    machine = machine_header("approximate attention")
    print(f"float32, batch 1, {n} tokens, {h} heads, head dim {d}, causal={args.causal}; medians of {reps} "
          f"calls (min-max; fewer past {args.budget_s:.0f} s); error on {args.rows} sampled rows against float64 "
          f"exact softmax\n")

    q, k, v = qkv(n, h, d, kind=args.inputs)
    _, calibration_keys, _ = qkv(n if n <= 4096 else 4096, h, d, seed=1, kind=args.inputs)
    rows = sample_rows(n, args.rows, CPU)
    exact_rows = exact_softmax_rows(q, k, v, rows, causal=args.causal)
    score_matrix_bytes = h * n * n * 4
    results: dict = {"machine": machine, "quick": args.quick, "n": n, "heads": h, "head_dim": d,
                     "causal": args.causal, "repeats": reps, "rows": int(rows.numel()), "mechanisms": []}

    def measure(name, fn, flops):
        with torch.no_grad():
            out, mem = peak_memory(lambda: fn(q, k, v), CPU)  # also the warm-up call
            t = median_time(lambda: fn(q, k, v), reps, args.budget_s)
        err = relative_error(out[:, :, rows], exact_rows)
        row = {"name": name, "time_s": t[0], "time_min_s": t[1], "time_max_s": t[2], "calls": t[3], "peak_bytes": mem,
               "vs_score_matrix": mem / score_matrix_bytes, "flops": flops, "gflops_per_s": flops / t[0] / 1e9,
               "error": err}
        results["mechanisms"].append(row)
        return row

    header = (f"{'mechanism':<15} {'time ms (min-max)':>26} {'vs SDPA':>8} {'peak MiB':>9} {'/ n^2 scores':>12} "
              f"{'GFLOP':>8} {'GFLOP/s':>8} {'rel. error':>10}")
    print(header)
    print("-" * len(header))

    def show(row, base):
        ratio = row["time_s"] / base if base else 1.0
        span = f"{row['time_s'] * 1e3:.1f} ({row['time_min_s'] * 1e3:.1f}-{row['time_max_s'] * 1e3:.1f})"
        print(f"{row['name']:<15} {span:>26} {ratio:>7.2f}x {row['peak_bytes'] / 2**20:>9.1f} "
              f"{row['vs_score_matrix']:>12.3f} {row['flops'] / 1e9:>8.1f} {row['gflops_per_s']:>8.1f} "
              f"{row['error']:>10.2e}", flush=True)

    sdpa = measure("sdpa (exact)", lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_,
                                                                                      is_causal=args.causal),
                   dense_flops(batch=1, heads=h, q_len=n, kv_len=n, head_dim=d, causal=args.causal))
    base = sdpa["time_s"]
    sdpa["vs_sdpa"] = 1.0
    show(sdpa, base)
    for name in names:
        m, fn = build(name, causal=args.causal, heads=h, dim=d, n=n, calibration_keys=calibration_keys)
        flops = m.flops(batch=1, heads=h, q_len=n, kv_len=n, head_dim=d, causal=args.causal, **m.bench_params)
        row = measure(name, fn, flops)
        row["vs_sdpa"] = row["time_s"] / base
        row["params"] = dict(m.bench_params)
        show(row, base)

    faster = [r["name"] for r in results["mechanisms"][1:] if r["vs_sdpa"] < 1]
    print(f"\nfaster than SDPA at {n} tokens: {', '.join(faster) or 'none'}")
    print("peak memory below one n^2 score matrix for every mechanism: "
          f"{all(r['vs_score_matrix'] < 1 for r in results['mechanisms'][1:])}")
    write_json(args.json, results)
    summary = {"n": n, "causal": args.causal, "sdpa_ms": round(base * 1e3, 1),
               "mechanisms": {r["name"]: {"ms": round(r["time_s"] * 1e3, 1), "vs_sdpa": round(r["vs_sdpa"], 3),
                                          "peak_mib": round(r["peak_bytes"] / 2**20, 1),
                                          "error": float(f"{r['error']:.3g}")}
                              for r in results["mechanisms"][1:]}}
    print("\n" + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
