"""Writing a quality run: ``quality.json``, the plot ``accuracy_vs_state_size.png`` and a "Quality" section in
the ``report.md`` / ``report.html`` that ``attnkit bench`` writes to the same folder.

The section sits between :data:`BEGIN` and :data:`END` marker comments: an existing report keeps everything
else and gets the section replaced (or appended); without a report a short one holding the section is written.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from attnkit.reporting import QUALITY_BEGIN as BEGIN
from attnkit.reporting import QUALITY_END as END
from attnkit.reporting import bytes_label as _bytes_label
from attnkit.reporting import fmt_bytes, splice_section, write_text_atomic
from attnkit.reporting import html_table as _html_table
from attnkit.reporting import md_table as _md_table
from attnkit.reporting import pyplot as _pyplot
from attnkit.reporting import text_table as _text_table

__all__ = ["write_quality_report", "write_quality_json", "quality_table", "terminal_summary", "splice_section",
           "make_plot", "command", "task_notes", "PLOT", "FRONTIER_PLOT", "BEGIN", "END"]

PLOT = "accuracy_vs_state_size.png"
FRONTIER_PLOT = "recall_memory_frontier.png"  # ``--sweep state``
_METRIC_WORD = {"accuracy": "accuracy", "nmse": "normalised MSE"}


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 100 else f"{s / 60:.1f} min"


def _fmt_value(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if metric == "accuracy" else f"{v:.3f}"


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 10**4 else str(n)


def _fmt_lr_sweep(metric: str, sweep: list[dict[str, Any]] | None) -> str:
    if not sweep:
        return "-"
    return ", ".join(f"{x['lr']:g}: " + (_fmt_value(metric, x["mean"]) if x["status"] == "ok" else x["status"])
                     for x in sweep)


def quality_table(entry: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows of one task: mechanism, family, metric (mean over seeds, +- their standard deviation), the share of
    queries inside a window, the best learning rate and every learning rate's metric, state per head / model,
    train time, loss, parameters, note."""
    metric = entry["metric"]
    header = ["mechanism", "family", "state kind", _METRIC_WORD[metric], "in window", "best lr",
              f"{_METRIC_WORD[metric]} per lr", "state / head (elements)", "state (model, fp32)", "train time",
              "loss first -> last", "parameters", "note"]
    rows = []
    for r in entry["results"]:
        if r["status"] != "ok":
            word = "FAILED" if r["status"] == "failed" else r["status"]
            rows.append([r["mechanism"], r.get("family", ""), "-", word, "-", "-",
                         _fmt_lr_sweep(metric, r.get("lr_sweep")), "-", "-", "-", "-", "-", r["message"]])
            continue
        value = _fmt_value(metric, r["value"])
        if r.get("spread") is not None:
            value += f" +- {_fmt_value(metric, r['spread'])}"
        note = []
        if r.get("task_params"):
            note.append(", ".join(f"{k}={v}" for k, v in r["task_params"].items()
                                  if entry["params"].get(k) != v))
        rows.append([r["mechanism"], r["family"], r["state_kind"], value,
                     _fmt_value("accuracy", r["in_window"]) if r.get("in_window") is not None else "-",
                     f"{r['lr']:g}" if r.get("lr") is not None else "-", _fmt_lr_sweep(metric, r.get("lr_sweep")),
                     _fmt_count(r["state_per_head"]), fmt_bytes(r["state_bytes"]), _fmt_s(r["train_s"]),
                     f"{r['first_loss']:.3g} -> {r['final_loss']:.3g}", _fmt_count(r["num_parameters"]),
                     "; ".join(note)])
    return header, rows


# LRA (Tay et al., 2020, Table 1): models that learn ListOps reach 35-38%; collapsed ones 15-19%.
LISTOPS_LEARNED = 0.30


def task_notes(entry: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """Statements a reader needs beside a task's table (a budget too short to conclude, the window check)."""
    notes = []
    ok = [r for r in entry["results"] if r["status"] == "ok" and r.get("value") is not None]
    if entry["task"] == "listops" and ok and max(r["value"] for r in ok) < LISTOPS_LEARNED:
        notes.append(f"No mechanism passed {100 * LISTOPS_LEARNED:.0f}% on ListOps: in Long Range Arena the "
                     "models that learn it reach 35-38% and collapsed ones 15-19%, so this budget "
                     f"({doc['config']['steps']} steps) is too short to conclude anything about ListOps; "
                     "raise --steps (several thousand).")
    if any(r.get("in_window") is not None for r in ok):
        notes.append("In window: the fraction of the held-out queries whose key lies inside the window (query at p, "
                     "key at k, p - k <= window): the accuracy of a model that recalls perfectly inside its window "
                     "and guesses outside it; a windowed mechanism's accuracy should sit near it.")
    return notes


def _task_line(entry: dict[str, Any]) -> str:
    p = ", ".join(f"{k}={v}" for k, v in entry["params"].items())
    mode = "causal" if entry["causal"] else "bidirectional"
    return f"{entry['task']} ({entry['summary']}; {mode}; {p}; {entry['paper']})"


def _model_line(doc: dict[str, Any]) -> str:
    c = doc["config"]
    k = c.get("conv_kernel", 0)
    block = (f"[short causal depthwise conv (kernel {k}, residual) -> mixer]" if k else "[mixer]")
    pos = ("no positional embedding (the convolution and causal mixing give order, as Zoology)" if k
           else "learned absolute positions (--no-conv)")
    return (f"{c['num_layers']} pre-norm residual blocks of {block} + MLP (x{c['mlp_ratio']}), {pos}; width "
            f"{c['embed_dim']}, {c['num_heads']} head{'s' if c['num_heads'] > 1 else ''} of "
            f"{c['embed_dim'] // c['num_heads']}")


def _budget_line(doc: dict[str, Any]) -> str:
    c = doc["config"]
    lrs = ", ".join(f"{x:g}" for x in c["lrs"])
    seeds = ", ".join(str(x) for x in c["seeds"])
    sweep = (f"each mechanism trained at every learning rate of {{{lrs}}} and reported at the best (mean over "
             f"seeds), as Zoology sweeps its learning rate" if len(c["lrs"]) > 1 else f"learning rate {lrs}")
    spread = (f"; seeds {seeds} (value: mean +- standard deviation over seeds)" if len(c["seeds"]) > 1
              else f"; seed {seeds}")
    state = ("; state sweep: every mechanism at several state sizes (feature dimension qk_dim or num_features, "
             "window, softmax's sequence length)" if c.get("sweep") == "state" else "")
    return (f"{c['steps']} steps of batch {c['batch']} per run (AdamW, weight decay {c['weight_decay']:g}, "
            f"warm-up {c['warmup']}, cosine to 10%); {sweep}{spread}{state}; evaluated on {c['eval_examples']} "
            f"held-out examples")


def _machine_word(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    n = m["torch_threads"]
    return m.get("gpu") or f"{m['cpu']} ({n} thread{'' if n == 1 else 's'})"


def command(doc: dict[str, Any]) -> str:
    """The ``attnkit quality`` command line that reproduces the run."""
    from attnkit.quality.train import QualityConfig

    c, d = doc["config"], QualityConfig()
    parts = ["attnkit quality", "--task " + ",".join(c["tasks"]), "--mechanisms " + ",".join(c["mechanisms"])]
    for flag, key in (("--steps", "steps"), ("--batch", "batch"), ("--embed-dim", "embed_dim"),
                      ("--heads", "num_heads"), ("--layers", "num_layers"), ("--eval-examples", "eval_examples")):
        if c[key] != getattr(d, key):
            parts.append(f"{flag} {c[key]}")
    if list(c["lrs"]) != list(d.lrs):
        parts.append("--lr " + ",".join(f"{x:g}" for x in c["lrs"]))
    if list(c["seeds"]) != list(d.seeds):
        parts.append("--seed " + ",".join(str(x) for x in c["seeds"]))
    if c.get("conv_kernel", d.conv_kernel) == 0:
        parts.append("--no-conv")
    elif c.get("conv_kernel", d.conv_kernel) != d.conv_kernel:
        parts.append(f"--conv-kernel {c['conv_kernel']}")
    if c.get("sweep"):
        parts.append(f"--sweep {c['sweep']}")
    for entry in doc["tasks"]:
        from attnkit.quality.tasks import TASKS

        defaults = TASKS[entry["task"]].defaults
        parts += [f"--task-param {entry['task']}.{k}={v}" for k, v in entry["params"].items()
                  if defaults.get(k) != v]
    for name, params in c["params"].items():
        parts += [f"--param {name}.{k}={v}" for k, v in params.items()]
    if doc["machine"].get("device", "cpu") != "cpu":
        parts.append(f"--device {doc['machine']['device']}")
    if c.get("precision", "auto") != "auto":
        parts.append(f"--precision {c['precision']}")
    if c.get("jobs", 1) > 1:
        parts.append(f"--jobs {c['jobs']}")
    parts.append(f"--threads {doc['machine']['torch_threads']}")
    return " ".join(parts)


def headline(doc: dict[str, Any]) -> str:
    state = " (interrupted: partial results)" if doc["interrupted"] else ""
    return (f"attnkit quality on {_machine_word(doc)}, torch {doc['machine']['torch']}, {doc['config']['device']}"
            f"{_precision_note(doc)}, {doc['elapsed_s']:.0f} s{state}")


def _precision_note(doc: dict[str, Any]) -> str:
    """`` (bf16 autocast; float32: hrrformer)`` when any run autocast, else ``""`` (float32 throughout)."""
    runs = [r for t in doc["tasks"] for r in t["results"] if r.get("status") == "ok"]
    bf16 = [r["mechanism"] for r in runs if r.get("precision") == "bf16"]
    if not bf16:
        return ""
    fp32 = [r["mechanism"] for r in runs if r.get("precision") == "fp32"]
    return " (bf16 autocast" + (f"; float32: {', '.join(fp32)}" if fp32 else "") + ")"


def terminal_summary(doc: dict[str, Any]) -> str:
    parts = [headline(doc), "Model: " + _model_line(doc), "Budget: " + _budget_line(doc)]
    for entry in doc["tasks"]:
        parts += ["", "Task: " + _task_line(entry), _text_table(*quality_table(entry))]
        parts += task_notes(entry, doc)
    return "\n".join(parts)


_METHODS = [
    "Each mechanism trains a fresh model (same initialisation seed, same training batches) on freshly generated "
    "data for a fixed number of steps, then is scored on a held-out set generated from another seed.",
    "Accuracy: fraction of scored positions predicted exactly (MQAR: the queried values; copy: the copied "
    "tokens; ListOps: the value of each expression). Normalised MSE (regression): squared error of the last "
    "query of each sequence divided by Var(y) (1 = predicting 0, 0 = exact).",
    "State: what one head keeps to produce the next token, in elements: KV cache 2 x seq x head_dim (softmax "
    "and every mechanism that reads the whole prefix), 2 x window x head_dim (sliding window), features x d_v "
    "(linear attention's recurrent state); the model total multiplies by layers x heads and 4 bytes (fp32).",
    "Learning rate: every mechanism trains once per learning rate of the grid and reports the best (mean over "
    "seeds), as Zoology does; every value is in the table and in quality.json (lr_sweep). The best is chosen on "
    "the held-out set it is scored on, as in Zoology.",
    "Train time: wall clock of the training steps (forward, backward, optimizer), without data generation "
    "and evaluation. Small models on CPU: differences in time reflect overheads as much as the mechanism.",
]


def _section_md(doc: dict[str, Any], plot: str | None) -> str:
    out = [BEGIN, "## Quality", "", headline(doc) + ".", "", "Model: " + _model_line(doc) + ".", "",
           "Budget: " + _budget_line(doc) + ".", "", f"Reproduce: `{command(doc)}`", ""]
    if doc["interrupted"]:
        out += ["**The run was interrupted (Ctrl-C): these are the results gathered until then.**", ""]
    for entry in doc["tasks"]:
        out += [f"### {entry['task']}", "", _task_line(entry) + ".", "", _md_table(*quality_table(entry)), ""]
        out += [x for n in task_notes(entry, doc) for x in (n, "")]
    if plot:
        out += [f"![{plot}]({plot})", "", "*Accuracy (or error) against the state a head keeps per token (log "
                "scale): the recall / memory trade-off of Based, Figure 1. The line joins the mechanisms no other "
                "beats with less state.*", ""]
    out += ["How it was measured:", ""] + [f"- {x}" for x in _METHODS] + ["", "Data: `quality.json`.", END]
    return "\n".join(out)


def _section_html(doc: dict[str, Any], plot: str | None) -> str:
    e = html.escape
    out = [BEGIN, "<h2>Quality</h2>", f"<p>{e(headline(doc))}.</p>", f"<p>Model: {e(_model_line(doc))}.</p>",
           f"<p>Budget: {e(_budget_line(doc))}.</p>", f"<p>Reproduce: <code>{e(command(doc))}</code></p>"]
    if doc["interrupted"]:
        out.append("<p><b>The run was interrupted (Ctrl-C): these are the results gathered until then.</b></p>")
    for entry in doc["tasks"]:
        out += [f"<h3>{e(entry['task'])}</h3>", f"<p>{e(_task_line(entry))}.</p>",
                _html_table(*quality_table(entry))]
        out += [f"<p>{e(n)}</p>" for n in task_notes(entry, doc)]
    if plot:
        out.append(f"<figure><img src='{e(plot)}' alt='{e(plot)}'><figcaption>Accuracy (or error) against the "
                   "state a head keeps per token: the recall / memory trade-off of Based.</figcaption></figure>")
    out += ["<p>How it was measured:</p><ul>"] + [f"<li>{e(x)}</li>" for x in _METHODS] + ["</ul>",
                                                                                          "<p>Data: <code>quality.json"
                                                                                          "</code>.</p>", END]
    return "\n".join(out)


def make_plot(doc: dict[str, Any], out_dir: str | os.PathLike) -> str | None:
    """Draw :data:`PLOT` (one panel per task; :data:`FRONTIER_PLOT` for a state sweep, one line per mechanism);
    returns its file name, or ``None`` with nothing to draw.
    Raises ``attnkit.reporting.MissingMatplotlib`` without matplotlib."""

    panels = [e for e in doc["tasks"] if any(r["status"] == "ok" and r.get("state_bytes") for r in e["results"])]
    if not panels:
        return None
    plt = _pyplot()
    names = sorted({r["mechanism"] for e in panels for r in e["results"]})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.0), squeeze=False)
    for ax, entry in zip(axes[0], panels):
        pts = [(r["state_bytes"], r["value"], r["mechanism"]) for r in entry["results"]
               if r["status"] == "ok" and r.get("state_bytes") and r["value"] is not None]
        higher = entry["metric"] == "accuracy"
        _axes(ax, entry, plt, _bytes_label)
        if any(r.get("sweep") for r in entry["results"]):
            pts = []  # drawn as lines below
        # Labels of points at about the same place are stacked instead of printed over each other.
        placed: list[tuple[float, float]] = []
        for x, y, name in sorted(pts, key=lambda p: (p[0], p[1])):
            ax.scatter([x], [y], s=60, color=colour[name], label=name, zorder=3,
                       marker="o" if not name.startswith("linear") else "s")
            near = sum(1 for px, py in placed if abs(math.log2(px / x)) < 0.6 and abs(py - y) < 0.08 * (
                1.0 if higher else max(abs(y), 1e-9)))
            placed.append((x, y))
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, -3 + 11 * near), fontsize=8)
        # State sweep: one line per mechanism (family of variants), ordered by state: Based Fig. 2.
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in entry["results"]:
            if r["status"] == "ok" and r.get("sweep") and r.get("state_bytes") and r["value"] is not None:
                groups.setdefault(r["sweep"]["group"], []).append((r["state_bytes"], r["value"]))
        for gi, (group, line) in enumerate(sorted(groups.items())):
            line.sort()
            ax.plot([p[0] for p in line], [p[1] for p in line], color=plt.get_cmap("tab10")(gi % 10),
                    linewidth=2.0 if group == "softmax" else 1.4, marker="o", label=group, zorder=2)
        if groups:
            ax.legend(fontsize=8, loc="lower right")
            continue
        # Frontier: best metric reachable with at most this much state.
        front, best = [], -math.inf
        top: dict[float, float] = {}  # the best point at each state size (several mechanisms may share one)
        for x, y, _ in pts:
            top[x] = max(top.get(x, -math.inf), y) if higher else min(top.get(x, math.inf), y)
        for x, y in sorted(top.items()):
            score = y if higher else -y
            if score > best:
                front.append((x, y))
                best = score
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], color="grey", linestyle=":", zorder=2)
    c = doc["config"]
    what = "recall-memory frontier: " if c.get("sweep") == "state" else ""
    conv = f"conv {c['conv_kernel']} + mixer" if c.get("conv_kernel") else "no conv"
    fig.suptitle(f"attnkit quality: {what}{c['num_layers']} blocks ({conv}), width {c['embed_dim']},\n"
                 f"{c['steps']} steps, best of lr {{{', '.join(f'{x:g}' for x in c['lrs'])}}} "
                 f"({_machine_word(doc)})", fontsize=9)
    fig.tight_layout()
    name = FRONTIER_PLOT if c.get("sweep") == "state" else PLOT
    fig.savefig(Path(out_dir) / name, dpi=110)
    plt.close(fig)
    return name


def _axes(ax: Any, entry: dict[str, Any], plt: Any, bytes_label: Any) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(bytes_label))
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel("state kept while decoding, whole model (fp32 bytes, log scale)")
    if entry["metric"] == "accuracy":
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.05)
    else:
        ax.set_ylabel("normalised MSE (lower is better)")
    p = entry["params"]
    ax.set_title(f"{entry['task']}: " + ", ".join(f"{k}={v}" for k, v in list(p.items())[:4]), fontsize=10)
    ax.grid(True, alpha=0.3)


def write_quality_json(doc: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``quality.json`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quality.json"
    write_text_atomic(path, json.dumps(doc, indent=1, default=str))
    return path


def write_quality_report(doc: dict[str, Any], out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Any]:
    """Write ``quality.json``, the plot and the Quality section of ``report.md`` and ``report.html`` into
    ``out_dir``; returns ``{"files": [...], "plot_error": str | None}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_quality_json(doc, out)]
    plot, plot_error = None, None
    if plots:
        from attnkit.reporting import MissingMatplotlib

        try:
            plot = make_plot(doc, out)
        except MissingMatplotlib as exc:
            plot_error = str(exc)
    for name, section, is_html in (("report.md", _section_md(doc, plot), False),
                                   ("report.html", _section_html(doc, plot), True)):
        path = out / name
        existing = path.read_text() if path.exists() else None
        write_text_atomic(path, splice_section(existing, section, html_doc=is_html))
        files.append(path)
    if plot:
        files.append(out / plot)
    return {"files": [str(f) for f in files], "plot_error": plot_error}
