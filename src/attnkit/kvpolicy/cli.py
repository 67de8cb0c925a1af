"""``attnkit kvcache CHECKPOINT``: KV-cache policies judged on a model trained by ``attnkit quality`` (recall
accuracy and output error against the KV bytes each policy holds), with a plot and a report."""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a softmax MQAR checkpoint from `attnkit quality --save DIR`")
    p.add_argument("--out", type=Path, default=Path("attnkit-kvcache"), help="report directory")
    p.add_argument("--batch", type=int, default=256, help="generated examples (default 256)")
    p.add_argument("--seed", type=int, default=4321, help="seed of the generated examples")
    p.add_argument("--probe", type=int, default=16, help="prompt rows whose attention profiles the policies")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _plot(results: list[dict], out: Path) -> str:
    from attnkit.reporting import pyplot

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in dict.fromkeys(r["policy"] for r in results):
        rows = sorted((r for r in results if r["policy"] == name), key=lambda r: r["kv_bytes"])
        xs = [r["kv_bytes"] for r in rows]
        style = "k*" if name == "full" else "o-"
        a1.plot(xs, [r["accuracy"] for r in rows], style, label=name, ms=9 if name == "full" else 5)
        a2.plot(xs, [max(r["output_error"], 1e-6) for r in rows], style, label=name)
    for ax, t in ((a1, "recall accuracy"), (a2, "output error vs full cache")):
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes held per sequence")
        ax.set_title(t, fontsize=10)
    a2.set_yscale("log")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kvcache.png", dpi=110)
    plt.close(fig)
    return "kvcache.png"


def run(args: argparse.Namespace) -> int:
    from attnkit.cli import _check_out
    from attnkit.kvpolicy.judge import judge_policies
    from attnkit.quality import load_checkpoint
    from attnkit.quality.tasks import get_task
    from attnkit.reporting import CSS, MissingMatplotlib, html_table, md_table, write_text_atomic

    parser = args._parser
    if args.checkpoint.is_dir():
        parser.error(f"argument checkpoint: {args.checkpoint} is a directory; pass one .pt file written by "
                     f"`attnkit quality --save DIR`")
    if not args.checkpoint.is_file():
        parser.error(f"argument checkpoint: {args.checkpoint} does not exist")
    if args.batch < 1 or args.probe < 1:
        parser.error("--batch and --probe must be >= 1")
    _check_out(args.out, parser)  # before the policies are judged
    try:
        model, info = load_checkpoint(args.checkpoint)
    except (ValueError, OSError) as e:
        msg = str(e) if str(args.checkpoint) in str(e) else f"{args.checkpoint}: {e}"
        print(f"attnkit kvcache: error: {msg}", file=sys.stderr)
        return 2
    if info["task"] != "mqar":
        print(f"attnkit kvcache: error: {args.checkpoint} was trained on {info['task']!r}; the policies are judged "
              f"on MQAR recall, where the keys that matter are known", file=sys.stderr)
        return 2
    params = info["task_params"]
    batch = get_task("mqar").sample(args.batch, args.seed, params)
    context = 2 * int(params.get("num_kv_pairs", 8))
    try:
        results = judge_policies(model, batch.inputs, batch.targets, batch.mask, context_len=context,
                                 probe=args.probe, progress=not args.no_progress)
    except ValueError as e:
        print(f"attnkit kvcache: {e}", file=sys.stderr)
        return 2
    header = ["policy", "setting", "kept context", "KV bytes / sequence", "recall accuracy", "output error"]
    rows = [[r["policy"], r["setting"], f"{r['kept_fraction']:.0%}", f"{r['kv_bytes'] / 1024:.1f} KiB",
             f"{r['accuracy']:.1%}", f"{r['output_error']:.3g}"] for r in results]
    print(md_table(header, rows))
    plot = None
    if not args.no_plots:
        try:
            plot = _plot(results, args.out)
        except MissingMatplotlib as e:
            print(f"attnkit kvcache: {e}", file=sys.stderr)
    what = (f"{info['spec']['name']} trained on MQAR ({params}); context = the {context} pair tokens, prefilled "
            f"exactly; the policies keep part of it from the attention of its last {args.probe} rows; queries after "
            f"it decode against the kept entries. {args.batch} generated examples, seed {args.seed}.")
    md = ["# KV-cache policies judged by recall", "", what, "", md_table(header, rows), ""]
    if plot:
        md += [f"![accuracy and error against KV bytes]({plot})", ""]
    write_text_atomic(args.out / "report.md", "\n".join(md))
    write_text_atomic(args.out / "report.html",
        f"<!doctype html><html><head><meta charset='utf-8'><title>kvcache</title><style>{CSS}</style></head><body>"
        f"<h1>KV-cache policies judged by recall</h1><p>{html.escape(what)}</p>{html_table(header, rows)}"
        + (f'<img src="{plot}">' if plot else "") + "</body></html>")
    write_text_atomic(args.out / "kvcache.json", json.dumps({"checkpoint": str(args.checkpoint), "info": info,
                                                             "context_len": context, "results": results},
                                                            indent=1))
    print(f"\nReport: {args.out}/report.html and report.md; data: kvcache.json")
    return 0
