"""Token mixers benchmark (issue 12): the scaling, memory and fast-path targets of the mixers family, one run.

    python benchmarks/bench_mixers.py            # width 512, 8K and 64K tokens (~20-40 minutes on 2 busy cores)
    python benchmarks/bench_mixers.py --quick    # width 64, 1K and 8K tokens: checks the script, not the targets

CPU float32, batch 1, width 512 (``--width``), 1 thread (``--threads``); times are ``time.process_time`` (CPU
seconds of this process: meaningful on a shared machine where wall time is not), medians of ``--repeats``
forward calls under ``no_grad`` (min-max), with the FLOPs of the record's ``flops`` formula beside them. On
Linux the script re-executes itself with ``GLIBC_TUNABLES`` keeping freed memory in the heap (see
``MALLOC_TUNABLES``; ``--default-malloc`` measures glibc's default, where every 64K-token call page-faults its
128 MiB temporaries afresh).

1. Scaling: each mixer at 8K and 64K tokens (2-D mixers on a 64 x 128 and 256 x 256 grid):
   ``t(64K) / t(8K)`` (target <= 9 for linear mixers, <= 10 for FFT-based ones; 8x more tokens). Quadratic
   mixers (AFT-full, ConvBERT's attention half) run at 8K only; ParCNetV2 (O(n^1.5) on square grids) is
   measured but has no linear target.
2. Memory: peak bytes allocated during one call (allocation tracer of ``attnkit.bench.measure``) at both
   lengths, and the ratio to an ``n x n`` float32 matrix (16 GiB at 64K): nothing may come near it.
3. Fast paths against the best plain-torch formulation of the same computation, interleaved A/B in one
   process at 8K tokens (target: fast <= 1.5 x the best plain one):
   FFT long convolution (CKConv, Extractor): ``conv_fft`` vs ``F.conv1d`` and vs
   ``torch.fft`` at a power-of-two size; AFF / SpectFormer's filter: ``rfft2`` vs a complex ``fft2``;
   Mega's EMA: chunked vs the sequential recurrence and vs FFT of the closed-form kernel; Mamba-ND: chunked scan vs the
   sequential recurrence; causal AFT-simple: cumulative sums vs the token-by-token recurrence; LightConv and
   SMPConv's 31-tap kernel: blocked shifted products vs ``F.conv1d`` (and unfold); DynamicConv: shifted
   products vs unfold.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench.measure import peak_memory
from attnkit.bench.scripts import machine_header, script_parser, write_json
from attnkit.ops.mixers import aft, dynconv, scan
from attnkit.ops.mixers._common import conv_direct, conv_fft, grid_shape, long_conv, spectral_filter
from attnkit.testing import relative_error

CPU = torch.device("cpu")
QUADRATIC = {"aft_full", "convbert"}
NO_LINEAR_TARGET = {"parcnet_v2"}  # O(n (H + W)) = O(n^1.5) on square grids
FFT_BASED = {"aff", "spectformer", "ckconv", "extractor", "hrrformer"}


def fmt(t) -> str:
    med, lo, hi = t
    return f"{med * 1e3:9.1f} ms ({lo * 1e3:.1f}-{hi * 1e3:.1f})"


def mixer_input(m, n: int, width: int, seed: int = 0) -> torch.Tensor:
    if m.example_inputs is not None:
        return m.example_inputs(batch=1, seq_len=n, dtype=torch.float32, seed=seed, heads=1, head_dim=width)[0]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, width, generator=g)


def scaling(names, lens, width, repeats, results):
    print(f"\n## 1-2. scaling and memory, width {width}: forward time (CPU s, median of {repeats}; the lengths "
          f"interleaved), peak bytes")
    print(f"{'mixer':14s} {'n':>6s} {'time':>28s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'peak MiB':>9s} "
          f"{'peak/(n^2*4)':>12s}")
    for name in names:
        m = attnkit.mechanism_info(name)
        torch.manual_seed(0)
        mixer = m.factory(dim=width, **m.bench_params).eval()
        run_lens = lens[:1] if name in QUADRATIC else lens
        inputs = {n: mixer_input(m, n, width) for n in run_lens}
        times: dict[int, list[float]] = {n: [] for n in run_lens}
        with torch.no_grad():
            for n in run_lens:
                mixer(inputs[n])  # warm-up
            for _ in range(repeats):  # interleaved, so drifting machine load hits every length alike
                for n in run_lens:
                    t0 = time.process_time()
                    mixer(inputs[n])
                    times[n].append(time.process_time() - t0)
        row = {}
        for n in run_lens:
            x = inputs[n]
            with torch.no_grad():
                _, peak = peak_memory(lambda: mixer(x), CPU)  # noqa: B023
            t = (statistics.median(times[n]), min(times[n]), max(times[n]))
            flops = m.flops(batch=1, heads=1, q_len=n, kv_len=n, head_dim=width, **m.bench_params)
            shape = "x".join(map(str, x.shape[1:-1]))
            print(f"{name:14s} {n:6d} {fmt(t):>28s} {flops / 1e9:8.1f} {flops / t[0] / 1e9:8.2f} "
                  f"{peak / 2**20:9.1f} {peak / (n * n * 4):12.2e}   [{shape}]", flush=True)
            row[n] = {"time_s": t[0], "time_min_s": t[1], "time_max_s": t[2], "flops": flops, "peak_bytes": peak,
                      "grid": shape}
        del inputs
        if len(row) == 2:
            a, b = (row[n]["time_s"] for n in sorted(row))
            ratio = b / a
            target = None if name in NO_LINEAR_TARGET else (10.0 if name in FFT_BASED else 9.0)
            verdict = "no target (n^1.5)" if target is None else ("ok" if ratio <= target else "MISSED")
            print(f"{'':14s} t({lens[-1] // 1024}K)/t({lens[0] // 1024}K) = {ratio:.2f} "
                  f"(target <= {target}): {verdict}", flush=True)
            row["ratio"] = ratio
            row["target"] = target
        results["scaling"][name] = row


def ab(label, fast, plains, repeats, results, check=None):
    """Interleave ``fast`` and each plain formulation, ``repeats`` rounds; medians; ratio to the best plain."""
    fns = {"fast": fast, **plains}
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min((k for k in plains), key=lambda k: med[k])
    ratio = med["fast"] / med[best]
    parts = ", ".join(f"{k} {med[k] * 1e3:.1f} ms" for k in fns)
    err = "" if check is None else f", rel. error {check():.1e}"
    print(f"{label:34s} {parts}; fast / best plain ({best}) = {ratio:.2f} "
          f"({'ok' if ratio <= 1.5 else 'MISSED'} <= 1.5){err}", flush=True)
    results["fast_paths"][label] = {"median_s": med, "best_plain": best, "ratio": ratio}


def fast_paths(n, width, repeats, results):
    print(f"\n## 3. fast paths vs the best plain-torch formulation, {n} tokens, width {width}, interleaved")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, n, width, generator=g)
    k = torch.randn(n, width, generator=g) / n
    p2 = 1 << (2 * n - 1).bit_length()

    def fft_pow2():
        xf = torch.fft.rfft(x, n=p2, dim=1)
        return torch.fft.irfft(xf * torch.fft.rfft(k, n=p2, dim=0), n=p2, dim=1)[:, :n]

    def direct():
        w = k.flip(0).t().unsqueeze(1)
        return F.conv1d(F.pad(x.transpose(1, 2), (n - 1, 0)), w, groups=width).transpose(1, 2)

    with torch.no_grad():
        plains = {"fft pow2": fft_pow2}
        if n <= 8192:
            plains["F.conv1d"] = direct
        ab("long causal conv (CKConv, Extractor)", lambda: conv_fft(x, k), plains, repeats, results,
           check=lambda: relative_error(conv_fft(x, k), fft_pow2()))

        side = int(math.isqrt(n))
        h, w = grid_shape(n, 2)
        img = torch.randn(1, h, w, width, generator=g)
        mask = torch.randn(h, w // 2 + 1, width, dtype=torch.complex64, generator=g)
        full = torch.cat([mask, mask[:, 1: (w + 1) // 2].flip(1).conj()], dim=1)  # a Hermitian extension
        del side
        ab("2-D spectral filter (AFF, SpectFormer)", lambda: spectral_filter(img, mask),
           {"complex fft2": lambda: torch.fft.ifft2(torch.fft.fft2(img, dim=(1, 2), norm="ortho") * full,
                                                    dim=(1, 2), norm="ortho").real}, repeats, results)

        e = 16
        alpha, delta = torch.rand(width, e, generator=g), torch.rand(width, e, generator=g)
        beta, eta = torch.randn(width, e, generator=g), torch.randn(width, e, generator=g)
        p, q, gg = scan.ema_coefficients(alpha, delta, beta, eta)
        ab("Mega EMA (h=16)", lambda: scan.ema_chunked(x, p, q, gg), {"recurrence": lambda: scan.ema_reference(
            x, p, q, gg), "fft": lambda: scan.ema_fft(x, p, q, gg)}, max(1, repeats // 2), results)

        N = 16
        dt = torch.rand(1, n, width, generator=g) * 0.1
        A = -torch.rand(width, N, generator=g)
        B, C = torch.randn(1, n, N, generator=g), torch.randn(1, n, N, generator=g)
        ab("Mamba selective scan (N=16)", lambda: scan.selective_scan_chunked(x, dt, A, B, C),
           {"recurrence": lambda: scan.selective_scan_reference(x, dt, A, B, C)}, max(1, repeats // 2), results)

        qa, ka, va = (torch.randn(1, n, width, generator=g) for _ in range(3))

        def aft_loop():
            state = None
            for t in range(n):
                _, state = aft.aft_simple_step(qa[:, t], ka[:, t], va[:, t], state)

        ab("causal AFT-simple", lambda: aft.aft_simple(qa, ka, va, causal=True), {"recurrence": aft_loop},
           max(1, repeats // 2), results)

        wl = torch.randn(8, 7, generator=g)
        wc = torch.softmax(wl, -1).repeat_interleave(width // 8, dim=0)[:, None]

        def lightconv_conv1d():
            return F.conv1d(F.pad(x.transpose(1, 2), (3, 3)), wc, groups=width).transpose(1, 2)

        ab("LightConv (k=7)", lambda: dynconv.lightconv(x, wl), {"unfold": lambda: dynconv.lightconv_reference(
            x, wl), "F.conv1d": lightconv_conv1d}, repeats, results)
        ks = torch.randn(31, width, generator=g)
        ab("depthwise conv, 31 taps (SMPConv)", lambda: long_conv(x, ks, 15),
           {"F.conv1d": lambda: conv_direct(x, ks, 15)}, repeats, results)
        wd = torch.softmax(torch.randn(1, n, 8, 7, generator=g), -1)
        ab("DynamicConv (k=7)", lambda: dynconv.dynamic_conv(x, wd),
           {"unfold": lambda: dynconv.dynamic_conv_reference(x, wd)}, repeats, results)


# glibc returns every freed block above its mmap threshold (32 MiB by default) to the OS, so each call at 64K
# tokens (128 MiB per [n, 512] float32 tensor) page-faults all its temporaries afresh, a system-time cost that
# 8K tokens (16 MiB tensors, reused from the heap) never pay. Keep freed memory in the heap, as a caching
# allocator does, so the ratio measures the mixers rather than the kernel's page zeroing.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def _reexec_with_caching_malloc(argv: list[str] | None) -> None:
    if argv is not None or "--default-malloc" in sys.argv or os.environ.get("GLIBC_TUNABLES") is not None:
        return
    if not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv: list[str] | None = None) -> int:
    _reexec_with_caching_malloc(argv)
    ap = script_parser(__doc__.splitlines()[0], head_dim=512, repeats=3)
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default mmap threshold (freed blocks > 32 MiB go back to the OS)")
    ap.set_defaults(threads=1)
    ap.add_argument("--width", type=int, default=None, help="channels (default 512; 64 with --quick)")
    ap.add_argument("--mechanisms", default="", help="comma-separated mixers (default: all of the family)")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--skip-fast-paths", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_header("mixers")
    machine["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES")
    print(f"GLIBC_TUNABLES={machine['GLIBC_TUNABLES']}")
    width = args.width or (64 if args.quick else 512)
    lens = [1024, 8192] if args.quick else [8192, 65536]
    names = [s for s in args.mechanisms.split(",") if s] or [m.name for m in attnkit.list_mechanisms("mixers")]
    results = {"machine": machine, "width": width, "lens": lens, "scaling": {}, "fast_paths": {}}
    if not args.skip_scaling:
        scaling(names, lens, width, args.repeats, results)
    if not args.skip_fast_paths:
        fast_paths(lens[0], width, args.repeats, results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
