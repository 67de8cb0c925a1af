"""Backends benchmark (issue 18): attnkit through each backend beside the libraries' own kernels, interleaved A/B.

    python benchmarks/bench_backends.py --device cuda           # the issue's GPU targets (bf16)
    python benchmarks/bench_backends.py --device cpu            # CPU: flex engine against the tiled engine
    python benchmarks/bench_backends.py --quick                 # small sizes: checks the script runs

Targets (GPU of the H100/H200 class, bf16, forward and, with --backward, forward + backward):

- ``window``: causal sliding window (1024 keys back) at 16,384 tokens through ``attnkit.attention``
  (``auto``: flash-attn if installed, else the flex engine; and forced ``flex``) against FlexAttention called
  directly with ``create_block_mask`` on the same mask: target <= 1.2x;
- ``neighborhood``: 2-D neighborhood attention (128 x 128, kernel 13) through ``attnkit.neighborhood`` (``auto``:
  NATTEN if installed) against ``natten.na2d`` on heads-last tensors it already holds: target <= 1.1x;
- ``linear``: causal linear attention (elu + 1 features, 16,384 tokens) through ``attnkit.linear_attention``
  (``auto``: fla if installed) against fla's ``chunk_linear_attn(normalize=True)`` on the same features:
  target <= 1.2x.

Every variant's output is checked against the first (the reference-grade path) before timing. Times are medians of
interleaved calls (CUDA: synchronised wall time; CPU: ``time.process_time`` with the script's threads, so other
work on a shared machine does not count). Theoretical FLOPs are printed beside each time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnkit
from attnkit import patterns as P
from attnkit.bench.scripts import machine_header, script_parser, write_json


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        def run(fn):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            return time.perf_counter() - t0
    else:
        def run(fn):
            t0 = time.process_time()
            fn()
            return time.process_time() - t0
    return run


def interleaved(variants: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int,
                check_rows: slice | None = None, tol: float = 3e-2) -> dict[str, dict]:
    """Call each variant once (warm-up, compile), check it against the first, then time them interleaved."""
    out: dict[str, dict] = {}
    first = None
    live = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        try:
            y = fn()
        except Exception as exc:  # a missing library or an unsupported case is reported, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        y = y.detach().float()
        rec = {"first_call_s": time.perf_counter() - t0}
        if first is None:
            first = y
        else:
            a, b = (y, first) if check_rows is None else (y[..., check_rows, :], first[..., check_rows, :])
            err = float((a - b).norm() / b.norm().clamp_min(1e-30))
            rec["rel_diff_vs_first"] = err
            rec["check"] = "ok" if err <= tol else "DIFFERS"
        out[name] = rec
        live[name] = fn
    timer = _timer(device)
    times: dict[str, list[float]] = {n: [] for n in live}
    for _ in range(repeats):
        for name, fn in live.items():
            times[name].append(timer(fn))
    for name, ts in times.items():
        out[name].update(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts), repeats=len(ts))
    return out


def _grad_wrap(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool):
    if not backward:
        def fwd():
            with torch.no_grad():
                return fn()
        return fwd

    def fwd_bwd():
        y = fn()
        torch.autograd.grad(y, leaves, torch.ones_like(y))
        return y.detach()
    return fwd_bwd


def bench_window(dev, dtype, n, heads, dim, window, repeats, backward):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(dev, dtype).requires_grad_(backward) for _ in range(3))
    pattern = P.causal() & P.sliding_window(window, 0)
    flex = torch.compile(flex_attention, dynamic=False)
    bm = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= window), None, None, n, n, device=dev)
    variants = {
        "attnkit tiled": lambda: attnkit.attention(q, k, v, pattern=pattern, engine="tiled"),
        "attnkit auto": lambda: attnkit.attention(q, k, v, pattern=pattern),
        "attnkit flex": lambda: attnkit.attention(q, k, v, pattern=pattern, engine="flex"),
        "FlexAttention (direct)": lambda: flex(q, k, v, block_mask=bm),
    }
    if dev.type == "cuda":
        variants["attnkit flash"] = lambda: attnkit.attention(q, k, v, pattern=pattern, engine="flash")
        variants["SDPA dense causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    variants = {name: _grad_wrap(fn, [q, k, v], backward) for name, fn in variants.items()}
    pairs = sum(min(i, window) + 1 for i in range(n))
    flops = 4.0 * heads * pairs * dim * (3.0 if backward else 1.0)
    return {"flops": flops, "results": interleaved(variants, dev, repeats, check_rows=slice(n - 256, n))}


def bench_neighborhood(dev, dtype, side, kernel, heads, dim, repeats, backward):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, side, side, dim, generator=g).to(dev, dtype).requires_grad_(backward)
               for _ in range(3))
    variants = {
        "attnkit tiled": lambda: attnkit.neighborhood(q, k, v, kernel, engine="tiled"),
        "attnkit auto": lambda: attnkit.neighborhood(q, k, v, kernel),
    }
    if dev.type == "cuda":
        variants["attnkit natten"] = lambda: attnkit.neighborhood(q, k, v, kernel, engine="natten")
        variants["attnkit flex"] = lambda: attnkit.neighborhood(q, k, v, kernel, engine="flex")
        try:
            import natten

            held = [t.detach().movedim(1, -2).contiguous().requires_grad_(backward) for t in (q, k, v)]
            variants["NATTEN na2d (direct)"] = lambda: natten.na2d(*held, kernel_size=kernel).movedim(-2, 1)
        except ImportError:
            pass
    elif side <= 64:
        variants["attnkit flex"] = lambda: attnkit.neighborhood(q, k, v, kernel, engine="flex")
    variants = {name: _grad_wrap(fn, [q, k, v], backward) for name, fn in variants.items()}
    flops = 4.0 * heads * side * side * kernel * kernel * dim * (3.0 if backward else 1.0)
    return {"flops": flops, "results": interleaved(variants, dev, repeats)}


def bench_linear(dev, dtype, n, heads, dim, repeats, backward):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(dev, dtype).requires_grad_(backward) for _ in range(3))
    variants = {
        "attnkit chunked": lambda: attnkit.linear_attention(q, k, v, causal=True, engine="attnkit"),
        "attnkit auto": lambda: attnkit.linear_attention(q, k, v, causal=True),
    }
    if dev.type == "cuda":
        variants["attnkit fla"] = lambda: attnkit.linear_attention(q, k, v, causal=True, engine="fla")
        try:
            from fla.ops.linear_attn import chunk_linear_attn

            def direct():
                pq, pk = F.elu(q) + 1, F.elu(k) + 1
                o, _ = chunk_linear_attn(pq.transpose(1, 2), pk.transpose(1, 2), v.transpose(1, 2), scale=1.0,
                                         normalize=True)
                return o.transpose(1, 2)

            variants["fla chunk_linear_attn (direct)"] = direct
        except ImportError:
            pass
    variants = {name: _grad_wrap(fn, [q, k, v], backward) for name, fn in variants.items()}
    flops = (2.0 * n * 64 * (2 * dim + 1) + 4.0 * n * dim * (dim + 1)) * heads * (3.0 if backward else 1.0)
    return {"flops": flops, "results": interleaved(variants, dev, repeats)}


def _print(title: str, rec: dict, base_name: str) -> None:
    print(f"\n## {title}  ({rec['flops'] / 1e9:.2f} GFLOP of allowed work per call)")
    res = rec["results"]
    base = res.get(base_name, {}).get("median_s")
    for name, r in res.items():
        if "error" in r:
            print(f"  {name:32s} not run: {r['error']}")
            continue
        ratio = f"{r['median_s'] / base:6.2f}x {base_name}" if base else ""
        check = r.get("check", "first")
        print(f"  {name:32s} {r['median_s'] * 1e3:9.2f} ms (min {r['min_s'] * 1e3:.2f}, max {r['max_s'] * 1e3:.2f}) "
              f"{rec['flops'] / r['median_s'] / 1e9:8.1f} GFLOP/s  {ratio}  [{check}; first call "
              f"{r['first_call_s']:.1f} s]")


def main() -> None:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--targets", default="window,neighborhood,linear")
    ap.add_argument("--backward", action="store_true", help="time forward + backward (CUDA: flex has no CPU backward)")
    ap.add_argument("--seq-len", type=int, default=None, help="window / linear length (default 16384, CPU 4096)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    repeats = args.repeats or (20 if dev.type == "cuda" else 5)
    machine = machine_header("backends", dev)
    n = args.seq_len or (1024 if args.quick else 16384 if dev.type == "cuda" else 4096)
    side = 24 if args.quick else 128 if dev.type == "cuda" else 64
    window = 64 if args.quick else 1024 if dev.type == "cuda" else 256
    print(f"device {dev}, {dtype}, heads {args.heads}, head dim {args.head_dim}, "
          f"{'forward + backward' if args.backward else 'forward'}")
    if dev.type == "cuda":
        print(attnkit.backends.base.format_table(attnkit.backends.backends()).split("\n\n")[0])
    results = {"machine": machine, "device": str(dev), "dtype": str(dtype), "backward": args.backward}
    targets = args.targets.split(",")
    if "window" in targets:
        results["window"] = bench_window(dev, dtype, n, args.heads, args.head_dim, window, repeats, args.backward)
        _print(f"causal sliding window {window} at n={n}", results["window"], "FlexAttention (direct)")
    if "neighborhood" in targets:
        results["neighborhood"] = bench_neighborhood(dev, dtype, side, 13 if side >= 64 else 7, args.heads,
                                                     args.head_dim, repeats, args.backward)
        _print(f"2-D neighborhood {side}x{side}", results["neighborhood"],
               "NATTEN na2d (direct)" if dev.type == "cuda" else "attnkit tiled")
    if "linear" in targets:
        results["linear"] = bench_linear(dev, dtype, n, args.heads, args.head_dim, repeats, args.backward)
        _print(f"causal linear attention (elu) at n={n}", results["linear"],
               "fla chunk_linear_attn (direct)" if dev.type == "cuda" else "attnkit chunked")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
