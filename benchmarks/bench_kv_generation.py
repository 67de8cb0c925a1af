"""KV-cache policies in a long generation: bytes held and attention recall against tokens generated.

Target (issue 25): the policies of FastGen (G10), NAtS (G12), ActQKV (G14), A-VL (G15) and ZipVL (G16) compress
the generated tokens too, so the bytes they hold follow each policy however long the generation; every decoding output
equals dense attention under the policy's mask (``--check`` measures it at every step). A small randomly initialised
model of ``attnkit.quality`` (2 layers, 4 heads, width 64, learned positions) samples ``--steps`` tokens after a
random prompt, one cache per layer (``attnkit.kvpolicy.generation``); NAtS runs on the same model shape with
``neural_attention_search`` mixers (random token-type scorer). Recall: the attention mass that dense softmax
attention of each step's queries puts on the entries the policy holds (mean over layers, heads).

    python benchmarks/bench_kv_generation.py [--quick] [--steps 2000] [--check] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnkit.kvpolicy.generation import default_caches, generate
from attnkit.quality.model import QualityModel, parse_mechanism
from attnkit.selective_cache import AdaptiveVLCache, TokenTypeKVCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 steps: checks that the script runs")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="also measure the distance to dense masked attention")
    ap.add_argument("--out", type=Path, default=Path("docs/results"), help="writes kv_generation.{png,json}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = 200 if args.quick else args.steps
    total = args.prompt + steps
    torch.manual_seed(0)
    shape = dict(vocab_size=64, num_outputs=64, embed_dim=64, num_heads=4, num_layers=2, max_seq_len=total,
                 causal=True, conv_kernel=0)
    model = QualityModel(parse_mechanism("softmax"), **shape)
    nats = QualityModel(parse_mechanism("neural_attention_search@window=32+num_heads=4"), **shape)
    prompt = torch.randint(0, 64, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    runs = {**{name: (model, make) for name, make in default_caches(interval=64).items()},
            "NAtS window=32": (nats, lambda i: TokenTypeKVCache(32))}
    image = torch.zeros(1, args.prompt, dtype=torch.bool)  # A-VL: prompt tokens 4 .. 3/4 of it stand for an image
    image[:, 4:3 * args.prompt // 4] = True
    runs["A-VL drop 50%, compute 30%, update every 3, text 50%"] = (
        model, lambda i: AdaptiveVLCache(image, drop_rate=0.5, compute_rate=0.7, interval=3, text_rate=0.5))
    results = {}
    print(f"# KV policies over {steps} generated tokens (prompt {args.prompt}), float32, 1 sequence")
    print("| policy | KiB held at the end | full cache KiB | recall (mean) | recall (end) | max error | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    full_kib = None
    for name, (m, make) in runs.items():
        t0 = time.process_time()
        r = generate(m, prompt, steps, make, special_ids=(0,), punct_ids=(1, 2, 3), check=args.check, seed=2)
        secs = time.process_time() - t0
        kib = [b / 1024 for b in r["bytes"]]
        if name == "full":
            full_kib = kib
        err = max(r["error"]) if r["error"] else float("nan")
        results[name] = {"kib": [round(x, 3) for x in kib], "recall": [round(x, 5) for x in r["recall"]],
                         "max_error": err, "seconds": round(secs, 1)}
        print(f"| {name} | {kib[-1]:.1f} | {full_kib[-1] if full_kib else float('nan'):.1f} | "
              f"{sum(r['recall']) / len(r['recall']):.3f} | {r['recall'][-1]:.3f} | {err:.2g} | {secs:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_generation.json").write_text(json.dumps({"steps": steps, "prompt": args.prompt,
                                                             "results": results}))
    try:
        from attnkit.reporting import pyplot

        plt = pyplot()
    except ImportError as e:  # MissingMatplotlib
        print(e)
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(1, steps + 1)
    for name, r in results.items():
        style = "k-" if name == "full" else "-"
        a1.plot(xs, r["kib"], style, label=name, lw=1.2)
        a2.plot(xs, r["recall"], style, label=name, lw=0.8)
    a1.set_xlabel("tokens generated")
    a1.set_ylabel("KiB of KV held (2 layers)")
    a1.set_title("bytes held", fontsize=10)
    a2.set_xlabel("tokens generated")
    a2.set_ylabel("attention mass on held entries")
    a2.set_title("recall of dense attention", fontsize=10)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "kv_generation.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {args.out / 'kv_generation.png'} and kv_generation.json")


if __name__ == "__main__":
    main()
