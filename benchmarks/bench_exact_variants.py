"""Exact-attention variants with a sequence cost of their own (issue 16), each against its natural baseline.

    python benchmarks/bench_exact_variants.py            # the sizes below (~3-6 minutes on one core)
    python benchmarks/bench_exact_variants.py --quick    # small sizes, seconds; checks the script, not the numbers

float32, batch 1, 8 heads, head dim 64, ONE thread by default: every comparison is A/B interleaved in one process
and timed with ``time.process_time()`` (CPU seconds of this process), medians of ``--repeats`` rounds, so other
work on a shared machine disturbs the ratios little. Each row states the FLOPs of the work the variant allows.

1. varlen packing (``cu_seqlens``): one block-sparse call vs ``varlen_attention`` (each document alone through
   SDPA) vs dense SDPA with a block-diagonal boolean mask (what packing without a varlen kernel costs);
2. axial attention on a 128 x 128 grid: the pattern on the tiled engine vs ``axial_attention`` (lines moved into
   the batch for SDPA);
3. per-head windows (multi-scale heads): one call (heads grouped by their tiles) vs the union of every head's
   tiles (no grouping) vs one call per head;
4. Hepos (stride 4) cross-attention: gathered keys vs the masked pattern vs full cross-attention;
5. HaloNet blocks (b = 8, h = 3) on 128 x 128 and Block-Attention (512-token passages + a 1024-token final
   block): tiled time against the speed of light (dense SDPA x density);
6. standardised attention (two passes over the keys) vs softmax on the same general tiled path.
"""

from __future__ import annotations

import statistics
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

import attnkit
from attnkit import patterns as P
from attnkit.bench.scripts import machine_header, script_parser, write_json
from attnkit.functional import variants as FV
from attnkit.ops.exact import tiled
from attnkit.ops.exact import variants as V


def qkv(n: int, heads: int, dim: int, *, kv_len: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kv_len = n if kv_len is None else kv_len
    return (torch.randn(1, heads, n, dim, generator=g), torch.randn(1, heads, kv_len, dim, generator=g),
            torch.randn(1, heads, kv_len, dim, generator=g))


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds of each function, calls interleaved round by round (one warm-up round first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def show(title: str, med: dict[str, float], flops: dict[str, float], base: str) -> dict:
    print(f"\n## {title}")
    for name, t in med.items():
        f = flops.get(name)
        rate = f"  {f / 1e9:8.2f} GFLOP {f / t / 1e9:6.1f} GFLOP/s" if f else ""
        print(f"{name:34s} {t * 1e3:9.1f} ms  = {t / med[base]:5.2f}x {base}{rate}")
    return {"median_s": med, "flops": flops}


def check(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = float((a - b).norm() / b.norm())
    if err > 1e-4:
        raise SystemExit(f"{what}: fast path differs from its baseline (relative error {err:.1e})")


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=5)
    ap.set_defaults(threads=1)
    sections = ("varlen", "axial", "heads", "hepos", "sol", "standardize")
    ap.add_argument("--sections", default=",".join(sections), help=f"comma-separated subset of {sections}")
    args = ap.parse_args(argv)
    run = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    h, d, reps = args.heads, args.head_dim, args.repeats
    quick = args.quick
    results: dict = {"machine": machine_header("exact variants"), "quick": quick}
    print(f"float32, batch 1, {h} heads, head dim {d}; process_time medians of {reps} interleaved rounds")

    # 1. varlen packing
    if "varlen" in run:
        n = 2048 if quick else 16384
        g = torch.Generator().manual_seed(0)
        lengths = []
        while sum(lengths) < n:
            lengths.append(int(torch.randint(128 if quick else 256, (512 if quick else 4096) + 1, (1,), generator=g)))
        lengths[-1] -= sum(lengths) - n
        cu = V.cu_seqlens_from_lengths(lengths)
        q, k, v = qkv(n, h, d)
        docs = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        mask = V.varlen_pattern(cu).materialize(n, n)
        pairs = sum((b - a) ** 2 for a, b in docs)

        def per_doc(causal=False):
            return V.varlen_attention(q, k, v, cu, causal=causal)

        check(attnkit.attention(q, k, v, cu_seqlens=cu), per_doc(), "varlen")
        med = interleaved({
            "attention(cu_seqlens)": lambda: attnkit.attention(q, k, v, cu_seqlens=cu),
            "varlen_attention (SDPA per doc)": per_doc,
            "SDPA dense + block-diag mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        }, reps)
        fl = 4.0 * h * pairs * d
        results["varlen"] = show(f"varlen: {len(lengths)} documents (256-4096 tokens) packed in {n}", med, {
            "attention(cu_seqlens)": fl, "varlen_attention (SDPA per doc)": fl,
            "SDPA dense + block-diag mask": 4.0 * h * n * n * d}, "varlen_attention (SDPA per doc)")
        causal_docs = P.causal()
        med = interleaved({
            "attention(cu_seqlens, causal)": lambda: attnkit.attention(q, k, v, cu_seqlens=cu, pattern=causal_docs),
            "varlen_attention causal": lambda: per_doc(True),
        }, reps)
        results["varlen_causal"] = show("varlen, causal", med, {}, "varlen_attention causal")
        mask = None  # free the n x n boolean mask before the next sections

    # 2. axial attention
    if "axial" in run:
        side = 32 if quick else 128
        n = side * side
        q, k, v = qkv(n, h, d)

        def lines(axis):
            return lambda: V.axial_attention(q, k, v, (side, side), axis)

        fl = 4.0 * h * n * side * d
        for axis, label in ((1, "rows"), (0, "columns")):
            pat = P.axial((side, side), axis)
            check(attnkit.attention(q, k, v, pattern=pat), lines(axis)(), f"axial {label}")
            med = interleaved({
                f"axial {label} (tiled pattern)": lambda pat=pat: attnkit.attention(q, k, v, pattern=pat),
                f"axial_attention ({label}, lines + SDPA)": lines(axis)}, reps)
            results[f"axial_{label}"] = show(f"axial attention, {label} of a {side} x {side} grid", med,
                                             {k_: fl for k_ in med}, f"axial_attention ({label}, lines + SDPA)")

    # 3. per-head windows
    if "heads" in run:
        n = 2048 if quick else 8192
        windows = [32, 32, 64, 64, 128, 128, 256, None][:h]
        q, k, v = qkv(n, h, d)
        pat = P.per_head_window(windows)

        def per_head():
            outs = []
            for i, w in enumerate(windows):
                s = slice(i, i + 1)
                outs.append(attnkit.attention(q[:, s], k[:, s], v[:, s],
                                              pattern=None if w is None else P.sliding_window(w)))
            return torch.cat(outs, dim=1)

        def union():
            with mock.patch.object(tiled, "_head_groups", lambda *a: None):
                return attnkit.attention(q, k, v, pattern=pat)

        check(attnkit.attention(q, k, v, pattern=pat), per_head(), "per-head windows")
        density = pat.density(n, heads=h)
        med = interleaved({"per_head_window (grouped heads)": lambda: attnkit.attention(q, k, v, pattern=pat),
                           "union of tiles (no grouping)": union, "one call per head": per_head}, reps)
        fl = 4.0 * h * n * n * d * density
        results["per_head_window"] = show(f"per-head windows {windows} at {n} tokens (density {density:.3f})", med,
                                          {k_: fl for k_ in med}, "one call per head")

    # 4. Hepos
    if "hepos" in run:
        m, n = (256, 2048) if quick else (1024, 16384)
        q, k, v = qkv(m, h, d, kv_len=n)
        hep = P.head_strides(4)
        check(FV.head_strided_attention(q, k, v, 4), attnkit.attention(q, k, v, pattern=hep), "hepos")
        med = interleaved({"hepos gathered keys": lambda: FV.head_strided_attention(q, k, v, 4),
                           "hepos masked pattern (tiled)": lambda: attnkit.attention(q, k, v, pattern=hep),
                           "full cross-attention (SDPA)": lambda: F.scaled_dot_product_attention(q, k, v)}, reps)
        results["hepos"] = show(f"Hepos stride 4, {m} queries x {n} source tokens", med, {
            "hepos gathered keys": 4.0 * h * m * n * d / 4, "hepos masked pattern (tiled)": 4.0 * h * m * n * d / 4,
            "full cross-attention (SDPA)": 4.0 * h * m * n * d}, "hepos gathered keys")

    # 5. halo and block-attention against the speed of light
    if "sol" in run:
        side = 32 if quick else 128
        n = side * side
        q, k, v = qkv(n, h, d)
        halo = P.halo((side, side), 8, 3)
        blocks = ([256] * 6 + [512]) if quick else ([512] * 30 + [1024])
        q2, k2, v2 = qkv(sum(blocks), h, d)
        batt = P.block_attention(blocks)
        med = interleaved({"halo (tiled)": lambda: attnkit.attention(q, k, v, pattern=halo),
                           "SDPA dense": lambda: F.scaled_dot_product_attention(q, k, v)}, reps)
        dens = halo.density(n)
        med["speed of light (dense x density)"] = med["SDPA dense"] * dens
        results["halo"] = show(f"HaloNet b=8 h=3 on {side} x {side} (density {dens:.4f})", med,
                               {"halo (tiled)": 4.0 * h * n * n * d * dens, "SDPA dense": 4.0 * h * n * n * d},
                               "speed of light (dense x density)")
        nb = sum(blocks)
        med = interleaved({
            "block_attention (tiled)": lambda: attnkit.attention(q2, k2, v2, pattern=batt),
            "SDPA dense causal": lambda: F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)}, reps)
        dens = batt.density(nb)
        med["speed of light (dense x density)"] = med["SDPA dense causal"] * dens / ((nb + 1) / (2 * nb))
        results["block_attention"] = show(f"Block-Attention, {len(blocks) - 1} passages + final block ({nb} tokens, "
                                          f"density {dens:.4f})", med, {"block_attention (tiled)": 4.0 * h * nb * nb * d
                                                                        * dens}, "speed of light (dense x density)")

    # 6. standardised attention vs softmax, both on the general tiled path
    if "standardize" in run:
        n = 2048 if quick else 8192
        q, k, v = qkv(n, h, d)
        sw = P.sliding_window(256)
        with mock.patch.object(tiled, "USE_FUSED_CPU_KERNEL", False):
            med = interleaved({
                "standardize, sliding window 256": lambda: attnkit.attention(q, k, v, pattern=sw,
                                                                             normalization="standardize"),
                "softmax, sliding window 256": lambda: attnkit.attention(q, k, v, pattern=sw),
            }, reps)
        fl = 4.0 * h * d * sum(min(n - 1, i + 256) - max(0, i - 256) + 1 for i in range(n))
        results["standardize"] = show(f"standardised attention (two passes) vs softmax, general tiled path, {n} "
                                      f"tokens", med, {k_: fl for k_ in med}, "softmax, sliding window 256")
        print("\n(the second pass recomputes QK^T: the scores cost twice, the PV product once)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
