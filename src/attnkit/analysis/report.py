"""The report of ``attnkit analyze``: attention heatmaps, per-head entropy and distance, rollout and the
rank-collapse curve of a model, in Markdown and HTML with PNG plots (the same layout as ``attnkit bench``).

From Python, on any ``torch.nn.Module`` whose attention runs through ``attnkit.nn.MultiheadAttention`` (or
``torch.nn.MultiheadAttention``)::

    from attnkit.analysis.report import analyze
    summary = analyze(model, (tokens,), "analysis-report")
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.nn.recording import capture
from attnkit.reporting import CSS, MissingMatplotlib, html_table, md_table, pyplot, write_text_atomic

from .diagnostics import attention_distance, head_entropy, relative_residual, rollout
from .heads import head_importance, layer_inputs

__all__ = ["analyze", "summarize"]


def summarize(model: nn.Module, inputs: Sequence[Any], *, max_heads: int | None = None,
              loss_fn: Callable[[nn.Module], torch.Tensor] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``model(*inputs)`` under :func:`capture` and compute the diagnostics of the report. Returns a dict:
    ``layers`` (one entry per attention call: name, kind, mechanism, per-head entropy and mean distance), ``rollout``
    ``[n, n]`` of example 0 (when every layer has a square matrix), ``rank_collapse`` (relative residual of the
    hidden state entering each attention layer, then of the output), ``head_importance`` when ``loss_fn`` is
    given, and ``maps`` (head-averaged matrices of example 0, for the plots)."""
    model.eval()
    heads = None if max_heads is None else list(range(max_heads))
    with torch.no_grad(), capture(model, heads=heads) as cap:
        model(*inputs)
    if not cap.records:
        raise ValueError("the model ran no attnkit.nn.MultiheadAttention or torch.nn.MultiheadAttention: nothing "
                         "to analyze")
    layers, maps, square = [], [], []
    for r in cap.records:
        entry: dict[str, Any] = {"layer": r.layer, "kind": r.kind, "mechanism": r.mechanism, "note": r.note}
        if r.weights is not None:
            w = r.weights.float()
            entry["entropy"] = head_entropy(w).tolist()
            entry["max_entropy"] = math.log(w.shape[-1])
            entry["distance"] = attention_distance(w).tolist()
            maps.append((r.layer, w[0].mean(0)))
            if w.shape[-1] == w.shape[-2]:
                square.append(w)
        layers.append(entry)
    out: dict[str, Any] = {"layers": layers, "maps": maps}
    if square and len(square) == len(cap.records):
        out["rollout"] = rollout([w[:1] for w in square])[0]
    hidden = layer_inputs(model, *inputs)
    curve = [(name, float(relative_residual(x.float()).mean())) for name, x in hidden.items()
             if x.dim() == 3]
    out["rank_collapse"] = curve
    if loss_fn is not None:
        out["head_importance"] = {k: v.tolist() for k, v in head_importance(model, loss_fn, progress=progress)
                                  .items()}
    return out


def _plots(summary: dict[str, Any], out_dir: Path) -> list[tuple[str, str]]:
    plt = pyplot()
    written = []
    maps = summary["maps"][:8]
    if maps:
        cols = min(4, len(maps))
        rows = math.ceil(len(maps) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (name, m) in zip(axes.flat, maps):
            ax.imshow(m.cpu().numpy(), cmap="viridis", aspect="auto")
            ax.set_title(f"layer {name}", fontsize=9)
            ax.axis("on")
            ax.set_xlabel("key")
            ax.set_ylabel("query")
        fig.tight_layout()
        fig.savefig(out_dir / "attention_maps.png", dpi=110)
        plt.close(fig)
        written.append(("attention_maps.png", "Head-averaged attention of the first example, per layer."))
    stats = [e for e in summary["layers"] if "entropy" in e]
    if stats:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
        width = 0.8 / max(len(e["entropy"]) for e in stats)
        for h in range(max(len(e["entropy"]) for e in stats)):
            xs = [i + h * width for i, e in enumerate(stats) if h < len(e["entropy"])]
            a1.bar(xs, [e["entropy"][h] for e in stats if h < len(e["entropy"])], width, label=f"head {h}")
            a2.bar(xs, [e["distance"][h] for e in stats if h < len(e["distance"])], width)
        a1.plot(range(len(stats)), [e["max_entropy"] for e in stats], "k--", lw=1, label="log n (uniform)")
        for ax, t in ((a1, "entropy per head (nats)"), (a2, "mean attention distance (tokens)")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(stats))])
            ax.set_xticklabels([e["layer"] for e in stats], fontsize=8)
            ax.set_xlabel("layer")
            ax.set_title(t, fontsize=10)
        a1.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "heads.png", dpi=110)
        plt.close(fig)
        written.append(("heads.png", "Per-head attention entropy (dashed: uniform attention) and mean attention "
                                     "distance, per layer."))
    if "rollout" in summary:
        fig, ax = plt.subplots(figsize=(4, 3.6))
        ax.imshow(summary["rollout"].cpu().numpy(), cmap="magma", aspect="auto")
        ax.set_title("attention rollout (residual 0.5)", fontsize=10)
        ax.set_xlabel("input token")
        ax.set_ylabel("output token")
        fig.tight_layout()
        fig.savefig(out_dir / "rollout.png", dpi=110)
        plt.close(fig)
        written.append(("rollout.png", "Attention rollout R = A~_L ... A~_1 of the first example (Abnar & Zuidema)."))
    if summary["rank_collapse"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = [n for n, _ in summary["rank_collapse"]]
        ax.plot(range(len(names)), [v for _, v in summary["rank_collapse"]], "o-")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("||res(X)|| / ||X||")
        ax.set_title("token uniformity across depth", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / "rank_collapse.png", dpi=110)
        plt.close(fig)
        written.append(("rank_collapse.png", "Relative residual of the hidden state entering each attention layer "
                                             "(0 = every token equal: rank collapse, Dong et al. 2021)."))
    return written


def _table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "mechanism", "recorded", "entropy per head (nats)", "log n", "mean distance per head"]
    rows = []
    for e in summary["layers"]:
        if "entropy" in e:
            rows.append([e["layer"], e["mechanism"], e["kind"], " ".join(f"{x:.2f}" for x in e["entropy"]),
                         f"{e['max_entropy']:.2f}", " ".join(f"{x:.1f}" for x in e["distance"])])
        else:
            rows.append([e["layer"], e["mechanism"], e["kind"], e["note"], "", ""])
    return header, rows


def analyze(model: nn.Module, inputs: Sequence[Any], out_dir: str | os.PathLike, *, title: str = "attnkit analyze",
            description: str = "", loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
            max_heads: int | None = None, plots: bool = True, progress: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``report.html``, ``analysis.json`` and PNG plots for ``model(*inputs)`` into
    ``out_dir``; returns the summary (:func:`summarize`) with ``paths``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(model, inputs, max_heads=max_heads, loss_fn=loss_fn, progress=progress)
    figures: list[tuple[str, str]] = []
    note = ""
    if plots:
        try:
            figures = _plots(summary, out)
        except MissingMatplotlib as e:
            note = str(e)
    header, rows = _table(summary)
    curve = ", ".join(f"{n}: {v:.3f}" for n, v in summary["rank_collapse"])
    md = [f"# {title}", "", description, "", md_table(header, rows), "",
          f"Rank collapse (relative residual entering each layer): {curve}.", ""]
    if "head_importance" in summary:
        md += ["Head importance (loss change when the head is ablated): " + "; ".join(
            f"{k}: " + " ".join(f"{x:+.4f}" for x in v) for k, v in summary["head_importance"].items()), ""]
    if note:
        md += [note, ""]
    for name, caption in figures:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(description)}</p>", html_table(header, rows),
            f"<p>Rank collapse (relative residual entering each layer): {html.escape(curve)}.</p>"]
    for name, caption in figures:
        body.append(f'<figure><img src="{name}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    write_text_atomic(out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>"
                                           f"{html.escape(title)}</title><style>{CSS}</style></head><body>"
                                           + "\n".join(body) + "</body></html>")
    doc = {k: v for k, v in summary.items() if k not in ("maps", "rollout")}
    write_text_atomic(out / "analysis.json", json.dumps(doc, indent=1))
    summary["paths"] = {"markdown": str(out / "report.md"), "html": str(out / "report.html"),
                        "json": str(out / "analysis.json"), "plots": [str(out / n) for n, _ in figures]}
    return summary
