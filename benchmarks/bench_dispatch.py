"""Dispatch overhead of ``engine="auto"`` (issue 23): host time per call over calling the chosen backend directly.

    python benchmarks/bench_dispatch.py                 # CPU, small inputs
    python benchmarks/bench_dispatch.py --device cuda   # GPU (synchronised per call)

Small inputs (1 x 2 x 64 x 32), so the kernels cost little and the per-call Python work shows. Each case times,
interleaved, ``attnkit.attention(..., engine="auto")`` (or ``attnkit.neighborhood``), the same call with the
engine named, and the chosen backend's function called directly with everything it needs prepared (for flex, the
compiled kernel with the cached BlockMask). Synchronised per call; medians of ``time.perf_counter`` in
microseconds. Target: auto minus direct <= 20 us.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit import patterns as P
from attnkit.bench.scripts import machine_header, script_parser, write_json


def _median_us(fns: dict, device, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) * 1e6 for n, ts in times.items()}


def _direct_attention(chosen, q, k, v, pattern, scale):
    """The backend ``chosen`` called directly, with what it needs prepared (flex: the cached BlockMask)."""
    from attnkit.backends.flex import flex_attention_call
    from attnkit.normalizations import resolve
    from attnkit.ops.exact.tiled import tiled_attention

    if chosen == "sdpa":
        causal = pattern is not None
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if chosen == "tiled":
        sm = resolve("softmax")
        return lambda: tiled_attention(q, k, v, pattern=pattern, score_mod=None, normalization=sm, scale=scale)
    if chosen == "flex":
        return lambda: flex_attention_call(q, k, v, pattern=pattern, score_mod=None, scale=scale)
    if chosen == "sdpa_mask":
        from attnkit.backends.masked import _mask

        m = _mask(pattern, q.shape[2], k.shape[2], q.shape[0], q.shape[1], q.device)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    raise ValueError(chosen)


def cases(device, dtype):
    from attnkit.backends.flex import neighborhood_flex_call
    from attnkit.ops.neighborhood.engine import neighborhood_tiled

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=g).to(device, dtype) for _ in range(3))
    scale = 32 ** -0.5
    win = P.causal() & P.sliding_window(16, 0)
    out = {}
    for title, pattern in (("full", None), ("causal", P.causal()), ("causal sliding window 16", win)):
        chosen = attnkit.explain(q, k, v, pattern=pattern).chosen
        out[f"{title} ({chosen})"] = {
            "auto": lambda pattern=pattern: attnkit.attention(q, k, v, pattern=pattern),
            "direct": _direct_attention(chosen, q, k, v, pattern, scale),
        }
    if attnkit.backends.base.get_backend("attention", "flex").installed():
        out["causal sliding window 16, named (flex)"] = {
            "named flex": lambda: attnkit.attention(q, k, v, pattern=win, engine="flex"),
            "direct": _direct_attention("flex", q, k, v, win, scale),
        }
    x = torch.randn(1, 2, 16, 16, 32, generator=g).to(device, dtype)
    chosen = attnkit.explain(x, x, x, kernel_size=5).chosen
    spec = _spec(x, 5)
    direct = (lambda: neighborhood_flex_call(x, x, x, spec, score_mod=None, scale=scale)) if chosen == "flex" else \
        (lambda: neighborhood_tiled(x, x, x, spec, scale=scale))
    out[f"2-D neighborhood 16x16 k5 ({chosen})"] = {"auto": lambda: attnkit.neighborhood(x, x, x, kernel_size=5),
                                                    "direct": direct}
    return out


def _spec(x, kernel_size):
    from attnkit.patterns.windows import make_spec

    return make_spec(tuple(x.shape[2:-1]), kernel_size)


def main(argv=None) -> int:
    ap = script_parser(__doc__, head_dim=32, repeats=300)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    machine_header("dispatch overhead", device)
    rows = {}
    with torch.no_grad():
        for name, fns in cases(device, torch.float32).items():
            res = _median_us(fns, device, 30 if args.quick else args.repeats)
            rows[name] = res
            over = res.get("auto", res.get("named flex")) - res["direct"]
            print(f"{name:40s} " + "  ".join(f"{k} {v:8.1f} us" for k, v in res.items())
                  + f"  overhead {over:6.1f} us")
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
