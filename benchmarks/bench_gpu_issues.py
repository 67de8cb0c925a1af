"""The tables of issues 23 and 24 in one run (benchmarks/gpu_check.sh calls it on a GPU).

    python benchmarks/bench_gpu_issues.py --device cuda      # bf16, the issues' sizes (~2-3 minutes, compiles)
    python benchmarks/bench_gpu_issues.py --quick            # CPU, small sizes: checks the script runs

Issue 23, neighborhood attention (forward; with ``--backward`` also forward + backward for the 2-D case):
attnkit ``auto`` and ``flex`` (tokens permuted into spatial tiles, ``attnkit.ops.neighborhood.tiling``) beside
FlexAttention with the plain row-major neighborhood ``mask_mod`` (``create_block_mask``) and dense SDPA over all
keys; beside them the *speed of light* (dense SDPA time x the fraction of query-key pairs in the windows) and the
*tile limit* (dense SDPA time x the fraction of pairs the chosen tiling computes). Cases: 2-D 128 x 128 kernel 13,
GNA with stride equal to the tile, 1-D 16K kernel 1025 causal, 3-D 16 x 32 x 32 kernel (3, 7, 7); then the
patterns FlexAttention failed to compile before (hierarchical, per_head_window, MultiheadAttention with
sliding_window(16)) with the engine each takes (``attnkit.explain``).

Issue 24, the linear family at 16K tokens (forward and forward + backward): attnkit routed through fla
(``engine="auto"``) against fla called directly on the same tensors, and attnkit's own engine, for GLA (scalar and
vector gates), the delta rule and the gated delta rule.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from bench_backends import _grad_wrap, interleaved

import attnkit
from attnkit import patterns as P
from attnkit.bench.scripts import machine_header, script_parser, write_json


def _row(name: str, r: dict, base: float | None) -> str:
    if "error" in r:
        return f"  {name:44s} not run: {r['error']}"
    ratio = f"{r['median_s'] / base:7.2f}x SDPA" if base else ""
    return (f"  {name:44s} {r['median_s'] * 1e3:9.3f} ms {ratio}  [{r.get('check', 'first')}, first call "
            f"{r['first_call_s']:.1f} s]")


def neighborhood_case(dev, dtype, shape, kernel, heads, dim, repeats, backward, *, stride=1, is_causal=False):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnkit.ops.neighborhood.tiling import tiling_stats
    from attnkit.patterns.spatial import _cached_pattern
    from attnkit.patterns.windows import make_spec

    spec = make_spec(shape, kernel, 1, stride, is_causal)
    n = spec.num_tokens
    st = tiling_stats(spec)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, *shape, dim, generator=g).to(dev, dtype).requires_grad_(backward)
               for _ in range(3))
    flat = [t.reshape(1, heads, n, dim) for t in (q, k, v)]
    pat = _cached_pattern(spec)
    flex = torch.compile(flex_attention, dynamic=False)
    t0 = time.perf_counter()
    bm = create_block_mask(lambda b, h, qi, ki: pat.allowed(b, h, qi, ki, n, n), None, None, n, n, device=dev)
    mask_s = time.perf_counter() - t0
    kw = dict(stride=stride, is_causal=is_causal)
    variants = {
        "attnkit auto": lambda: attnkit.neighborhood(q, k, v, kernel, **kw),
        "attnkit flex (spatial tiles)": lambda: attnkit.neighborhood(q, k, v, kernel, engine="flex", **kw),
        "FlexAttention, plain NA mask_mod": lambda: flex(*flat, block_mask=bm).reshape(*q.shape),
        "SDPA dense (all keys)": lambda: F.scaled_dot_product_attention(*flat).reshape(*q.shape),
    }
    if dev.type != "cuda":
        variants.pop("SDPA dense (all keys)")
        variants = {"attnkit tiled": lambda: attnkit.neighborhood(q, k, v, kernel, engine="tiled", **kw), **variants}
    res = interleaved({name: _grad_wrap(fn, [q, k, v], backward) for name, fn in variants.items()}, dev, repeats)
    dense = res.get("SDPA dense (all keys)", {}).get("median_s")
    return {"stats": st, "results": res, "dense_s": dense, "create_block_mask_s": mask_s,
            "speed_of_light_s": None if dense is None else dense * st["speed_of_light"],
            "tile_limit_s": None if dense is None else dense * st["tile_fraction"]}


def print_neighborhood(title, rec):
    st = rec["stats"]
    print(f"\n## {title}: tile {st['tile']}, in-window {st['speed_of_light']:.4f} of pairs, tiling computes "
          f"{st['tile_fraction']:.4f} (row-major {st['row_major_fraction']:.4f})")
    for name, r in rec["results"].items():
        print(_row(name, r, rec["dense_s"]))
    if rec["dense_s"]:
        print(f"  {'speed of light (SDPA x in-window fraction)':44s} {rec['speed_of_light_s'] * 1e3:9.3f} ms")
        print(f"  {'tile limit (SDPA x tiled fraction)':44s} {rec['tile_limit_s'] * 1e3:9.3f} ms")


def cliff_cases(dev, dtype, repeats):
    """The patterns FlexAttention failed to compile on CUDA before: the engine each takes now, and its time."""
    from attnkit.ops.exact.variants import hdt_layout

    out = {}
    lv, gid, _ = hdt_layout([[64] * 8] * 4)
    n = lv.shape[0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, generator=g).to(dev, dtype) for _ in range(3))
    for name, pat in (("hierarchical (HDT)", P.hierarchical(lv, gid)),
                      ("per_head_window", P.per_head_window([16, 32, 64, 128, 256, 512, 1024, None]))):
        ex = attnkit.explain(q, k, v, pattern=pat)
        res = interleaved({f"auto -> {ex.chosen}": lambda pat=pat: attnkit.attention(q, k, v, pattern=pat),
                           "tiled": lambda pat=pat: attnkit.attention(q, k, v, pattern=pat, engine="tiled")},
                          dev, repeats)
        out[name] = {"chosen": ex.chosen, "results": res}
    from attnkit.nn import MultiheadAttention

    layer = MultiheadAttention(64, 4, kv_heads=2, mechanism="sliding_window", rotary=True,
                                          mechanism_kwargs={"window": 16}).to(dev)
    x = torch.randn(2, 100, 64, device=dev, requires_grad=True)
    t0 = time.perf_counter()
    try:
        with torch.autograd.set_detect_anomaly(False):
            y = layer(x)
            y.sum().backward()
        out["MultiheadAttention sliding_window(16), fp32 + backward"] = {"ok": True,
                                                                       "s": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - reported
        out["MultiheadAttention sliding_window(16), fp32 + backward"] = {"ok": False, "error": repr(exc)[:300]}
    return out


def gated_cases(dev, dtype, n, heads, dim, repeats, backward):
    """attnkit routed (auto) vs fla direct vs attnkit's own engine, on the same tensors."""
    out = {}
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, heads, n, dim, generator=g) * dim ** -0.5).to(dev, dtype).requires_grad_(backward)
    k = F.normalize(torch.randn(1, heads, n, dim, generator=g), dim=-1).to(dev, dtype).requires_grad_(backward)
    v = torch.randn(1, heads, n, dim, generator=g).to(dev, dtype).requires_grad_(backward)
    gs = F.logsigmoid(torch.randn(1, heads, n, generator=g) + 3).to(dev)
    gv = F.logsigmoid(torch.randn(1, heads, n, dim, generator=g) + 3).to(dev)
    beta = torch.rand(1, heads, n, generator=g).to(dev, dtype)
    tl = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    for t in tl:
        t.requires_grad_(backward)

    def fla_direct(module, fn, **kw):
        import importlib

        f = getattr(importlib.import_module(module), fn)
        return lambda: f(*tl, scale=1.0, **kw)[0].transpose(1, 2)

    specs = {
        "GLA, scalar gate": (lambda e: attnkit.gated_linear_attention(q, k, v, gs, engine=e),
                             ("fla.ops.simple_gla", "chunk_simple_gla", {"g": gs.transpose(1, 2).contiguous()})),
        "GLA, vector gate": (lambda e: attnkit.gated_linear_attention(q, k, v, gv, engine=e),
                             ("fla.ops.gla", "chunk_gla", {"g": gv.transpose(1, 2).contiguous()})),
        "delta rule": (lambda e: attnkit.delta_rule_attention(q, k, v, beta, engine=e),
                       ("fla.ops.delta_rule", "chunk_delta_rule", {"beta": beta.transpose(1, 2).contiguous()})),
        "gated delta rule": (lambda e: attnkit.delta_rule_attention(q, k, v, beta, log_decay=gs, engine=e),
                             ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                              {"g": gs.transpose(1, 2).contiguous(), "beta": beta.transpose(1, 2).contiguous()})),
    }
    def linear_direct():
        from fla.ops.linear_attn import chunk_linear_attn

        return lambda: chunk_linear_attn(*(F.elu(t) + 1 for t in tl[:2]), tl[2], scale=1.0,
                                         normalize=True)[0].transpose(1, 2)

    specs["linear attention (elu + 1), own engine target <= 3x fla"] = (
        lambda e: attnkit.linear_attention(q, k, v, causal=True, engine=e), None)
    for name, (ours, direct) in specs.items():
        variants = {"attnkit auto (fla routed)": lambda ours=ours: ours("auto"),
                    "attnkit own engine": lambda ours=ours: ours("attnkit")}
        if dev.type == "cuda":
            try:
                variants["fla direct"] = linear_direct() if direct is None else fla_direct(direct[0], direct[1],
                                                                                              **direct[2])
            except ImportError as exc:
                variants["fla direct"] = lambda exc=exc: (_ for _ in ()).throw(exc)
        if backward:
            def fb(fn):
                def run():
                    y = fn()
                    y.float().sum().backward()
                    return y.detach()
                return run
            variants = {n_: fb(f) for n_, f in variants.items()}
        else:
            variants = {n_: _grad_wrap(f, [], False) for n_, f in variants.items()}
        out[name] = interleaved(variants, dev, repeats)
    return out


def main() -> None:
    ap = script_parser(__doc__.splitlines()[0], head_dim=64, repeats=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backward", action="store_true", help="also forward + backward (2-D neighborhood, gated)")
    ap.add_argument("--only", default="na2d,gated,cliff,na_rest", help="sections, in this order")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = args.repeats or (20 if cuda else 3)
    heads = args.heads if cuda else 2
    machine = machine_header("GPU issues 23 / 24", dev)
    results: dict = {"machine": machine, "device": str(dev), "dtype": str(dtype)}
    big = cuda and not args.quick
    s2, s1, s3 = ((128, 128), (16384,), (16, 32, 32)) if big else ((32, 32), (1024,), (4, 16, 16))
    na_cases = {
        "2-D kernel 13": (s2, 13 if big else 7, {}),
        "2-D GNA kernel (8, 16) stride (8, 16)": (s2, (8, 16), {"stride": (8, 16)}),
        "1-D causal kernel 1025": (s1, 1025 if big else 65, {"is_causal": True}),
        "3-D kernel (3, 7, 7)": (s3, (3, 7, 7), {}),
    }

    def run_na(titles):
        for title in titles:
            shape, kernel, kw = na_cases[title]
            for bwd in ((False, True) if args.backward and cuda and title == "2-D kernel 13" else (False,)):
                key = f"{title} {'x'.join(map(str, shape))}, {'forward + backward' if bwd else 'forward'}"
                try:
                    rec = neighborhood_case(dev, dtype, shape, kernel, heads, args.head_dim, repeats, bwd, **kw)
                except Exception as exc:  # noqa: BLE001 - one case failing must not hide the others
                    print(f"\n## {key}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                results[key] = rec
                print_neighborhood(key, rec)

    def run_cliff():
        rec = cliff_cases(dev, dtype, repeats)
        results["cliff"] = rec
        print("\n## patterns FlexAttention failed to compile before (issue 23)")
        for name, r in rec.items():
            if "results" in r:
                print(f"  {name}: auto runs {r['chosen']!r}")
                for v_name, v in r["results"].items():
                    print(_row(v_name, v, None))
            else:
                print(f"  {name}: {'ok' if r['ok'] else r['error']} ({r.get('s', 0):.1f} s)")

    def run_gated():
        n = 16384 if big else 1024
        for bwd in ((False, True) if args.backward and cuda else (False,)):
            rec = gated_cases(dev, dtype, n, heads, args.head_dim, repeats, bwd)
            results[f"gated, {'forward + backward' if bwd else 'forward'}"] = rec
            print(f"\n## linear family at n={n}, {'forward + backward' if bwd else 'forward'} (issue 24)")
            for name, res in rec.items():
                base = res.get("fla direct", {}).get("median_s")
                print(f"  {name}")
                for v_name, r in res.items():
                    ratio = "" if not base or "error" in r else f" {r['median_s'] / base:6.2f}x fla direct"
                    print(_row("  " + v_name, r, None) + ratio, flush=True)

    sections = {"na2d": lambda: run_na(["2-D kernel 13"]), "gated": run_gated, "cliff": run_cliff,
                "na_rest": lambda: run_na([t for t in na_cases if t != "2-D kernel 13"])}
    for name in args.only.split(","):  # in the order given: the most wanted first (a timeout keeps what ran)
        sections[name]()
        write_json(args.json, results)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
