"""Neighborhood attention benchmark: the speed targets of the neighborhood issue, measured in one run.

    python benchmarks/bench_neighborhood.py            # the issue's sizes (a few minutes on 2 cores)
    python benchmarks/bench_neighborhood.py --quick    # small sizes, seconds; checks the script, not the targets
    python benchmarks/bench_neighborhood.py --ab       # A/B of the CPU engine's paths, 1 thread, CPU time
    python benchmarks/bench_neighborhood.py --ab --backward --tiles 4x8 2x8   # forward + backward; tile shapes

float32, batch 1, 8 heads, head dim 32, 2 threads unless told otherwise; medians of ``--repeats`` calls (min-max).

- 2-D, 128 x 128 tokens, kernel 13 x 13: ``attnkit.neighborhood`` against the *speed of light*, SDPA's dense
  time x the pattern's density 169/16384 (target <= 2x, goal 1.25x), and against FlexAttention compiled on
  CPU with the same mask (compile time reported apart; target: faster);
- 3-D video shape 16 x 32 x 32, kernel 3 x 7 x 7, reported likewise;
- ``natten`` in the same run where it imports (its CPU path is uncompiled FlexAttention, which materialises
  N x N scores: measured up to the size that fits in memory);
- ``--ab``: the engine's two CPU paths, fused (ATen's flash-attention kernel over key strips) and general
  (gathered boxes, matmuls, softmax), and SDPA dense, interleaved, on one thread, timed in *CPU time*
  (``time.process_time``: meaningful on a shared machine where wall time is not); medians of ``--repeats``
  rounds, each path's ratio to the speed of light measured the same way in the same process;
- every row prints the FLOPs of the allowed pairs and GFLOP/s; correctness is checked before timing against
  exact float64 softmax on sampled query rows; GNA's tile model (``neighborhood_speed_of_light``) is printed
  for the engine's tiles.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench.machine import available_memory_bytes
from attnkit.bench.measure import exact_softmax_rows, median_time, sample_rows
from attnkit.bench.measure import fmt_ms as fmt
from attnkit.bench.scripts import machine_header, script_parser, write_json
from attnkit.ops.neighborhood import neighborhood_pattern, neighborhood_speed_of_light
from attnkit.patterns.spatial import allowed_pairs

CPU = torch.device("cpu")


def gflops(flops: float, seconds: float) -> str:
    return f"{flops / 1e9:7.2f} GFLOP {flops / seconds / 1e9:6.1f} GFLOP/s"


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def flex_neighborhood(q, k, v, pattern, repeats: int) -> dict:
    """FlexAttention, compiled, with the pattern's mask_mod on flattened tokens ``[b, h, n, d]``."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return {"error": f"FlexAttention unavailable: {exc}"}
    n = q.shape[2]
    try:
        t0 = time.perf_counter()
        block_mask = create_block_mask(pattern.mask_mod(n, n), None, None, n, n, device="cpu")
        mask_s = time.perf_counter() - t0
        compiled = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        out = compiled(q, k, v, block_mask=block_mask)
        compile_s = time.perf_counter() - t0
        timing = median_time(lambda: compiled(q, k, v, block_mask=block_mask), repeats, warmup=0)
    except Exception as exc:  # compilation needs a working C++ toolchain; report, do not hide
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
    return {"time": timing, "compile_s": compile_s, "block_mask_s": mask_s, "out": out}


def natten_rows(shape, kernel, h: int, d: int, repeats: int, sizes) -> list[dict]:
    """``natten.na2d`` / ``na3d`` on CPU at growing sizes, while N x N float32 scores fit in half the free memory."""
    try:
        import natten
    except ImportError as exc:
        return [{"error": f"natten is not installed ({exc}); it is not installable in this environment, so "
                          f"it is not measured (where it is, this row times natten.na{len(shape)}d on CPU)"}]
    rows = []
    fn = getattr(natten, f"na{len(shape)}d", None)
    if fn is None:
        return [{"error": f"natten {getattr(natten, '__version__', '?')} has no na{len(shape)}d"}]
    for size in sizes:
        n = math.prod(size)
        need = 4 * h * n * n * 2  # scores and probabilities, float32
        free = available_memory_bytes(CPU)
        if free is not None and need > 0.5 * free:
            rows.append({"size": size, "skipped": f"N x N scores need {need / 2**30:.1f} GiB > half of the "
                                                  f"{free / 2**30:.1f} GiB free"})
            continue
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, *size, h, d, generator=g) for _ in range(3))  # natten layout [B, *S, H, D]
        try:
            t = median_time(lambda q=q, k=k, v=v: fn(q, k, v, kernel_size=kernel), repeats)
            rows.append({"size": size, "time": t})
        except Exception as exc:
            rows.append({"size": size, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"})
    return rows


def run_case(title: str, shape, kernel, h: int, d: int, reps: int, flex: bool, natten_sizes) -> dict:
    n = math.prod(shape)
    pattern = neighborhood_pattern(shape, kernel)
    pairs = allowed_pairs(pattern.spec)
    density = pairs / n ** 2
    flops = 4.0 * h * pairs * d
    kernel_t = kernel if isinstance(kernel, tuple) else (kernel,) * len(shape)
    print(f"\n## {title}: {' x '.join(map(str, shape))} tokens, kernel {' x '.join(map(str, kernel_t))}, "
          f"{h} heads, head dim {d} (targets: <= 2x speed of light, goal 1.25x; faster than FlexAttention)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, *shape, d, generator=g) for _ in range(3))
    qf, kf, vf = (t.reshape(1, h, n, d) for t in (q, k, v))

    # correctness first: sampled rows against exact float64 softmax under the pattern
    out = attnkit.neighborhood(q, k, v, kernel).reshape(1, h, n, d)
    rows = sample_rows(n, 64, CPU)
    err = rel_error(out[:, :, rows], exact_softmax_rows(qf, kf, vf, rows, pattern=pattern))
    print(f"check: relative error vs exact softmax on 64 sampled rows {err:.1e} ({'ok' if err < 1e-5 else 'DIFFERS'})")

    dense = median_time(lambda: F.scaled_dot_product_attention(qf, kf, vf), max(1, min(reps, 3)))
    sol = dense[0] * density
    ours = median_time(lambda: attnkit.neighborhood(q, k, v, kernel), reps)
    res = {"shape": shape, "kernel": kernel_t, "heads": h, "head_dim": d, "n": n, "pairs": pairs,
           "density": density, "flops": flops, "sdpa_dense": dense, "speed_of_light_s": sol, "neighborhood": ours,
           "ratio_to_sol": ours[0] / sol, "check_error": err}
    print(f"SDPA dense            {fmt(dense)}  | {gflops(4.0 * h * n * n * d, dense[0])}")
    print(f"speed of light        {sol * 1e3:9.1f} ms  = SDPA dense x {pairs // n}/{n} (density {density:.4f})")
    print(f"attnkit.neighborhood  {fmt(ours)} = {ours[0] / sol:.2f}x speed of light | {gflops(flops, ours[0])}")
    model = neighborhood_speed_of_light(shape, kernel, tile_shape=8)
    res["tile_model"] = {key: model[key] for key in ("tile_fraction", "max_speedup_tiled", "max_speedup_exact",
                                                     "engine_tiles", "engine_work_fraction")}
    print(f"tile model (GNA)      8^{len(shape)} tiles: {model['tile_fraction']:.4f} of tiles computed -> at most "
          f"{model['max_speedup_tiled']:.1f}x over dense ({model['max_speedup_exact']:.1f}x element-sparse); "
          f"attnkit's engine: query tiles {model['engine_tiles']}, computes {model['engine_work_fraction']:.4f} "
          f"of dense work ({model['engine_work_fraction'] / density:.2f}x the allowed pairs)")
    if flex:
        fx = flex_neighborhood(qf, kf, vf, pattern, reps)
        if "error" in fx:
            print(f"FlexAttention         not measured: {fx['error']}")
            res["flex_error"] = fx["error"]
        else:
            ferr = rel_error(fx["out"], out)
            res.update(flex=fx["time"], flex_compile_s=fx["compile_s"], flex_block_mask_s=fx["block_mask_s"],
                       flex_rel_diff=ferr, flex_over_ours=fx["time"][0] / ours[0])
            print(f"FlexAttention         {fmt(fx['time'])} = {fx['time'][0] / sol:.2f}x speed of light "
                  f"(compile {fx['compile_s']:.1f} s, block mask {fx['block_mask_s']:.1f} s; rel. diff to ours "
                  f"{ferr:.1e}); attnkit is {fx['time'][0] / ours[0]:.2f}x faster")
    nat = natten_rows(shape, kernel_t, h, d, reps, natten_sizes)
    res["natten"] = nat
    for row in nat:
        if "error" in row and "size" not in row:
            print(f"natten                not measured: {row['error']}")
        elif "time" in row:
            print(f"natten {row['size']}  {fmt(row['time'])}")
        else:
            print(f"natten {row['size']}  {row.get('skipped') or row.get('error')}")
    return res


def cpu_time(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def ab_case(title: str, shape, kernel, h: int, d: int, rounds: int, backward: bool, tiles: list) -> dict:
    """Interleaved A/B of the engine's CPU paths against SDPA dense, single thread, CPU time."""
    from attnkit.ops.neighborhood import engine

    n = math.prod(shape)
    pattern = neighborhood_pattern(shape, kernel)
    density = allowed_pairs(pattern.spec) / n ** 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, *shape, d, generator=g).requires_grad_(backward) for _ in range(3))
    flat = [t.detach().reshape(1, h, n, d).requires_grad_(backward) for t in (q, k, v)]
    grad = torch.randn(1, h, *shape, d, generator=g)

    def ours(fused: bool, tile=None):
        def fn():
            engine.USE_FUSED_CPU_KERNEL = fused
            try:
                out = attnkit.neighborhood(q, k, v, kernel, tiles=tile)
                if backward:
                    torch.autograd.grad(out, [q, k, v], grad)
            finally:
                engine.USE_FUSED_CPU_KERNEL = True
        return fn

    def dense():
        out = F.scaled_dot_product_attention(*flat)
        if backward:
            torch.autograd.grad(out, flat, grad.reshape(out.shape))

    paths = {"SDPA dense": dense, "general": ours(False), "fused": ours(True)}
    for tile in tiles:
        tile = tuple(tile) if len(tile) == len(shape) else tuple(tile) * len(shape)
        paths[f"fused, tiles {'x'.join(map(str, tile))}"] = ours(True, tile)
    for fn in paths.values():  # warm-up: plans, allocator
        fn()
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            times[name].append(cpu_time(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    sol = med["SDPA dense"] * density
    kind = "forward + backward" if backward else "forward"
    print(f"\n## A/B {title}: {' x '.join(map(str, shape))} tokens, kernel {kernel}, {h} heads, head dim {d}, "
          f"{kind}; 1 thread, CPU time, medians of {rounds} interleaved rounds; engine tiles "
          f"{engine.choose_tiles(pattern.spec)}")
    print(f"speed of light = SDPA dense x density {density:.5f} = {sol * 1e3:.1f} ms")
    for name, t in med.items():
        print(f"{name:24s} {t * 1e3:9.1f} ms (min {min(times[name]) * 1e3:.1f})  {t / sol:6.2f}x speed of light")
    return {"shape": shape, "kernel": kernel, "backward": backward, "density": density, "speed_of_light_s": sol,
            "median_s": med, "ratio_to_sol": {name: t / sol for name, t in med.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__.splitlines()[0], head_dim=32, repeats=5)
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention peer (compiles per shape)")
    ap.add_argument("--ab", action="store_true", help="A/B of the engine's fused and general CPU paths against "
                    "SDPA dense: 1 thread, CPU time, interleaved rounds")
    ap.add_argument("--backward", action="store_true", help="--ab: time forward + backward")
    ap.add_argument("--tiles", nargs="*", default=[], help="--ab: also time the fused path with these query "
                    "tiles, e.g. 4x8 2x8 (one number: the same on every axis)")
    args = ap.parse_args(argv)
    if args.ab:
        torch.set_num_threads(1)
        tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles]
        if args.quick:
            cases = [("2-D", (32, 32), 7), ("3-D", (8, 8, 8), (3, 5, 5))]
        else:
            cases = [("2-D", (128, 128), 13), ("3-D video", (16, 32, 32), (3, 7, 7))]
        res = [ab_case(title, shape, kernel, args.heads, args.head_dim, args.repeats, args.backward,
                       [t for t in tiles if len(t) in (1, len(shape))]) for title, shape, kernel in cases]
        write_json(args.json, res, default=str)
        return 0
    torch.set_num_threads(args.threads)
    h, d, reps = args.heads, args.head_dim, args.repeats
    if args.quick:
        h, reps = min(h, 4), min(reps, 2)
        cases = [("2-D", (32, 32), 7, [(32, 32)]), ("3-D", (8, 8, 8), (3, 5, 5), [(8, 8, 8)])]
    else:
        cases = [("2-D", (128, 128), 13, [(32, 32), (64, 64), (128, 128)]),
                 ("3-D video", (16, 32, 32), (3, 7, 7), [(8, 16, 16), (16, 32, 32)])]
    results: dict = {"machine": machine_header("neighborhood attention"), "quick": args.quick, "cases": []}
    print(f"float32, batch 1; medians of {reps} calls (min-max); FLOPs count the allowed pairs only "
          f"(4 x heads x pairs x head dim)")
    for title, shape, kernel, natten_sizes in cases:
        results["cases"].append(run_case(title, shape, kernel, h, d, reps, not args.no_flex, natten_sizes))
    write_json(args.json, results, default=str)
    ok = all(c["check_error"] < 1e-5 for c in results["cases"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
