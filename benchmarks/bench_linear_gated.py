"""Gated linear attention and delta-rule benchmark: the targets of the data-dependent-decay issue, one run.

    python benchmarks/bench_linear_gated.py            # the issue's sizes (64K tokens; ~3-6 minutes on 1 core)
    python benchmarks/bench_linear_gated.py --quick    # small sizes, seconds; checks the script, not the targets

float32, batch 1, 8 heads, head dim 64, ONE thread (``--threads``), no gradients. Timing is CPU time
(``time.process_time``) of interleaved calls, A B C D E then E D C B A and so on, so that a busy shared machine
slows every variant alike; medians (min-max) are printed with the engine's FLOP counts beside them.

1. chunked causal forward at 16K and 64K tokens of
   - ``ungated``: ``linear_attention(feature_map="identity", normalize="none", causal=True)`` (the ungated
     chunked path: the baseline),
   - ``gla_scalar`` / ``gla_vector``: ``gated_linear_attention`` with a decay per head / per key dimension,
   - ``delta`` / ``gated_delta``: ``delta_rule_attention`` without / with a per-head decay;
   each checked against the recurrent mode on the first 256 tokens, and its ratio to ``ungated`` (target <= 2);
2. recurrent decoding: one-token step with the state after 100 and after 60,000 tokens (the state is
   ``[heads, d_k, d_v]`` whatever the position; target: flat), interleaved medians;
3. peak memory allocated during a chunked call per token at 16K and 64K (linear in tokens: constant bytes per
   token).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnkit import linear_attention
from attnkit.bench.measure import peak_memory
from attnkit.bench.scripts import machine_header, script_parser, write_json
from attnkit.ops.linear.chunked import chunked_flops
from attnkit.ops.linear.gated import delta_rule_attention, gated_chunked_flops, gated_linear_attention
from attnkit.testing import relative_error

CPU = torch.device("cpu")


def inputs(n: int, h: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    return {
        "q": q, "k": k, "v": v, "kn": F.normalize(k, dim=-1),
        # GLA's gates: logsigmoid(.) / 16 (the paper's temperature); DeltaNet's beta = sigmoid(.)
        "g_scalar": F.logsigmoid(torch.randn(1, h, n, generator=g)) / 16,
        "g_vector": F.logsigmoid(torch.randn(1, h, n, d, generator=g)) / 16,
        "beta": torch.sigmoid(torch.randn(1, h, n, generator=g)),
    }


def variants(x: dict[str, torch.Tensor], chunk: int, delta_chunk: int, mode: str = "chunked", state=None,
             return_state: bool = False):
    """``name -> zero-argument call`` (``state``: a dict of carried states per name, for decoding)."""
    st = state or {}
    rs = {"return_state": return_state}
    return {
        "ungated": lambda: linear_attention(x["q"], x["k"], x["v"], feature_map="identity", normalize="none",
                                            causal=True, mode=mode, chunk_size=chunk, state=st.get("ungated"), **rs),
        "gla_scalar": lambda: gated_linear_attention(x["q"], x["k"], x["v"], x["g_scalar"], mode=mode,
                                                     chunk_size=chunk, initial_state=st.get("gla_scalar"), **rs),
        "gla_vector": lambda: gated_linear_attention(x["q"], x["k"], x["v"], x["g_vector"], mode=mode,
                                                     chunk_size=chunk, initial_state=st.get("gla_vector"), **rs),
        "delta": lambda: delta_rule_attention(x["q"], x["kn"], x["v"], x["beta"], mode=mode,
                                              chunk_size=delta_chunk, initial_state=st.get("delta"), **rs),
        "gated_delta": lambda: delta_rule_attention(x["q"], x["kn"], x["v"], x["beta"], log_decay=x["g_scalar"],
                                                    mode=mode, chunk_size=delta_chunk,
                                                    initial_state=st.get("gated_delta"), **rs),
    }


def flops(name: str, n: int, h: int, d: int, chunk: int, delta_chunk: int) -> float:
    if name == "ungated":
        return h * chunked_flops(n, d, d, chunk)
    c = delta_chunk if "delta" in name else chunk
    return h * gated_chunked_flops(n, d, d, c, vector_gate=name == "gla_vector", delta="delta" in name)


def interleaved(calls: dict, repeats: int) -> dict[str, list[float]]:
    """CPU seconds of ``repeats`` rounds; each round runs every call, in alternating order."""
    names = list(calls)
    for f in calls.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.process_time()
            calls[name]()
            times[name].append(time.process_time() - t0)
    return times


def summary(ts: list[float]) -> tuple[float, float, float]:
    return statistics.median(ts), min(ts), max(ts)


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=5)
    ap.add_argument("--chunk-size", type=int, default=64, help="chunk of the ungated and GLA paths")
    ap.add_argument("--delta-chunk-size", type=int, default=32, help="chunk of the delta-rule paths")
    ap.set_defaults(threads=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, d, reps, cs, dcs = args.heads, args.head_dim, args.repeats, args.chunk_size, args.delta_chunk_size
    lens = [2048, 8192] if args.quick else [16384, 65536]
    positions = (100, 6000) if args.quick else (100, 60000)
    results: dict = {"machine": machine_header("gated linear attention"), "quick": args.quick, "heads": h,
                     "head_dim": d, "chunk_size": cs, "delta_chunk_size": dcs}
    print(f"float32, batch 1, {h} heads, head dim {d}, chunk {cs} (delta rule: {dcs}); CPU time of interleaved "
          f"calls, medians of {reps} (min-max)\n")

    # 1. chunked forward
    print("## chunked causal forward: time, GFLOP (engine count), ratio to the ungated chunked path (target <= 2)")
    results["chunked"] = []
    with torch.no_grad():
        for n in lens:
            x = inputs(n, h, d)
            check = {k: (t[:, :, :256] if t.dim() >= 3 else t) for k, t in x.items()}
            errs = {}
            for name, f in variants(check, cs, dcs).items():
                errs[name] = relative_error(f(), variants(check, cs, dcs, mode="recurrent")[name]())
            times = interleaved(variants(x, cs, dcs), reps)
            base = statistics.median(times["ungated"])
            for name, ts in times.items():
                t = summary(ts)
                fl = flops(name, n, h, d, cs, dcs)
                row = {"n": n, "variant": name, "time": t, "flops": fl, "gflops": fl / t[0] / 1e9,
                       "ratio_to_ungated": t[0] / base, "rel_err_vs_recurrent": errs[name]}
                results["chunked"].append(row)
                print(f"n={n:6d} {name:12s} {t[0] * 1e3:8.1f} ms ({t[1] * 1e3:.1f}-{t[2] * 1e3:.1f})  "
                      f"{fl / 1e9:6.2f} GFLOP {row['gflops']:5.1f} GFLOP/s  x{row['ratio_to_ungated']:.2f} of "
                      f"ungated  (vs recurrent: {errs[name]:.1e})")
            print()

    # 2. decoding
    print(f"## recurrent decode step at position {positions[0]} vs {positions[1]} (target: flat)")
    states: dict[int, dict] = {}
    with torch.no_grad():
        for p in positions:
            x = inputs(p, h, d, seed=1)
            states[p] = {name: f()[1] for name, f in variants(x, cs, dcs, return_state=True).items()}
        one = inputs(1, h, d, seed=2)
        steps = 100 if args.quick else 400
        calls = {f"{name}@{p}": f for p in positions
                 for name, f in variants(one, cs, dcs, mode="recurrent", state=states[p]).items()}
        times = interleaved(calls, steps)
    results["decode"] = []
    for name in variants(one, cs, dcs):
        lo, hi = (statistics.median(times[f"{name}@{p}"][5:]) for p in positions)
        results["decode"].append({"variant": name, "positions": list(positions), "median_s": [lo, hi],
                                  "ratio": hi / lo})
        print(f"{name:12s} step at {positions[0]}: {lo * 1e6:7.1f} us, at {positions[1]}: {hi * 1e6:7.1f} us "
              f"= {hi / lo:.3f}x")

    # 3. memory
    print("\n## peak memory allocated during a chunked call (output included; inputs excluded)")
    results["memory"] = []
    with torch.no_grad():
        for n in lens:
            x = inputs(n, h, d)
            for name, f in variants(x, cs, dcs).items():
                _, during = peak_memory(f, CPU)
                row = {"n": n, "variant": name, "allocated_bytes": during, "bytes_per_token": during / n}
                results["memory"].append(row)
                print(f"n={n:6d} {name:12s} {during / 2**20:8.1f} MiB = {during / n / 1024:6.2f} KiB/token")

    longest = [r for r in results["chunked"] if r["n"] == lens[-1]]
    summ = {"n": lens[-1], "ratio_to_ungated": {r["variant"]: round(r["ratio_to_ungated"], 2) for r in longest},
            "ms": {r["variant"]: round(r["time"][0] * 1e3, 1) for r in longest},
            "decode_ratio": {r["variant"]: round(r["ratio"], 3) for r in results["decode"]},
            "kib_per_token": {r["variant"]: round(r["bytes_per_token"] / 1024, 2) for r in results["memory"]
                              if r["n"] == lens[-1]}}
    write_json(args.json, results)
    print("\n" + json.dumps(summ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
