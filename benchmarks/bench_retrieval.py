"""Retrieval attention benchmark: decoding one query against a long KV cache on CPU (issue 17's target).

    python benchmarks/bench_retrieval.py            # 65,536-token cache, 8 heads, head dim 64
    python benchmarks/bench_retrieval.py --quick    # 4,096 tokens: checks the script, not the targets

float32, batch 1, one thread (``--threads``), no autograd, the bench's clustered keys (``attnkit.bench.workloads``,
16 clusters per head). The cache is prefilled once per index (build time reported separately, CPU seconds);
then ``--steps`` decode queries (the clustered queries of the last positions) are run, each through every
method in turn (interleaved A/B, ``time.process_time``), and the medians are reported:

- ``exact``: ``scaled_dot_product_attention`` of the query over the whole cache (reads every key and value);
- IceFormer and RetrievalAttention (``RetrievalDecoder``) with each index: faiss HNSW (the approximate index),
  the pure-torch IVF fallback, and exact top-k (scores every key: the selection oracle, no speed-up expected);
- recall: the fraction of each query's true top-k keys (by ``q . k`` over the whole cache) that the method
  attends (retrieved set, plus the static set for RetrievalAttention), and the relative output error against
  exact attention (float64).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnkit.bench.scripts import machine_header, script_parser, write_json
from attnkit.bench.workloads import make_inputs
from attnkit.ops.approx.knn import faiss_available
from attnkit.ops.approx.retrieval import RetrievalDecoder


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=None,
                       repeats_help="(unused; see --steps)", quick_help="4,096-token cache: checks the script")
    ap.set_defaults(threads=1)
    ap.add_argument("--cache", type=int, default=None, help="cached tokens (default 65536; 4096 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="decode queries timed (default 64; 8 with --quick)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--num-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--ef-search", type=int, default=64, help="faiss HNSW search breadth (default 64)")
    ap.add_argument("--num-probes", type=int, default=16, help="IVF lists scanned per query (default 16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    n = args.cache or (4096 if args.quick else 65536)
    steps = args.steps or (8 if args.quick else 64)
    h, d, top_k = args.heads, args.head_dim, args.top_k
    machine = machine_header("retrieval attention (decode)")
    print(f"float32, batch 1, {n}-token cache, {h} heads, head dim {d}, top_k={top_k}, {args.threads} thread(s); "
          f"medians over {steps} decode queries, methods interleaved, CPU time (process_time)\n")

    q, k, v = make_inputs("clustered", (1, h, n + steps, d), torch.Generator().manual_seed(0))
    cache_k, cache_v = k[:, :, :n].contiguous(), v[:, :, :n].contiguous()
    queries = [q[:, :, n + s:n + s + 1].contiguous() for s in range(steps)]

    indexes = (["faiss"] if faiss_available() else []) + ["ivf", "exact"]
    if not faiss_available():
        print("faiss-cpu is not installed: the approximate-index rows are missing (pip install attnkit[retrieval])\n")
    params = {"faiss": {"ef_search": args.ef_search}, "ivf": {"num_probes": args.num_probes}, "exact": {}}
    decoders, build_s = {}, {}
    for method in ("iceformer", "retrieval"):
        for kind in indexes:
            dec = RetrievalDecoder(method, top_k=top_k, num_sink=args.num_sink, window=args.window, index=kind,
                                   **params[kind])
            t0 = time.process_time()
            with torch.no_grad():
                dec.prefill(cache_k, cache_v)
            build_s[f"{method}[{kind}]"] = time.process_time() - t0
            decoders[f"{method}[{kind}]"] = dec
            print(f"built {method}[{kind}]: {build_s[f'{method}[{kind}]']:.2f} s CPU", flush=True)

    def exact(qq):
        return F.scaled_dot_product_attention(qq, cache_k, cache_v)

    names = ["exact"] + list(decoders)
    times = {name: [] for name in names}
    recall = {name: [] for name in decoders}
    error = {name: [] for name in names}
    k64, v64 = cache_k.double(), cache_v.double()
    with torch.no_grad():
        for qq in queries:
            for name in names:  # interleaved: every method sees the same machine state per query
                fn = exact if name == "exact" else decoders[name].step
                fn(qq)  # warm (first touches, allocator)
                t0 = time.process_time()
                out = fn(qq)
                times[name].append(time.process_time() - t0)
                ref = F.scaled_dot_product_attention(qq.double(), k64, v64)
                error[name].append(float((out.double() - ref).norm() / ref.norm()))
                if name != "exact":
                    dec = decoders[name]
                    true = (qq @ cache_k.transpose(-1, -2)).topk(top_k, dim=-1).indices  # [1, h, 1, k]
                    got = dec.retrieve(qq)
                    static = dec.static_positions()
                    attended = torch.cat([got, static.expand(*got.shape[:3], -1)], dim=-1)
                    hit = (true[..., :, None] == attended[..., None, :]).any(-1)
                    recall[name].append(float(hit.double().mean()))

    base = statistics.median(times["exact"])
    exact_bytes = 2 * h * n * d * 4
    print(f"{'method':<20} {'build s':>8} {'step ms':>9} {'speed-up':>9} {'recall@k':>9} {'rel. error':>10}")
    rows = []
    for name in names:
        t = statistics.median(times[name])
        rec = statistics.mean(recall[name]) if name in recall else 1.0
        err = statistics.median(error[name])
        rows.append({"name": name, "build_s": build_s.get(name, 0.0), "step_s": t, "speedup": base / t,
                     "recall": rec, "error": err})
        print(f"{name:<20} {build_s.get(name, 0.0):>8.2f} {t * 1e3:>9.3f} {base / t:>8.1f}x {rec:>9.3f} "
              f"{err:>10.2e}")
    print(f"\nexact attention reads {exact_bytes / 2**20:.0f} MiB of keys and values per step "
          f"({4 * h * n * d / 1e6:.0f} MFLOP); a retrieval step attends {top_k} (+ static) keys per head "
          f"({4 * h * (top_k + args.num_sink + args.window) * d / 1e6:.2f} MFLOP) plus the index search")
    target = {r["name"]: r["speedup"] >= 10 and r["recall"] >= 0.9 for r in rows
              if r["name"] in ("iceformer[faiss]", "retrieval[faiss]")}
    print("target (>= 10x faster than exact, recall >= 0.9, faiss index): "
          + (", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in target.items()) or "faiss absent"))
    results = {"machine": machine, "quick": args.quick, "cache": n, "heads": h, "head_dim": d, "top_k": top_k,
               "steps": steps, "threads": args.threads, "rows": rows}
    write_json(args.json, results)
    print("\n" + json.dumps({r["name"]: {"step_ms": round(r["step_s"] * 1e3, 3), "speedup": round(r["speedup"], 1),
                                         "recall": round(r["recall"], 3)} for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
