"""Writing a benchmark's results: the terminal table, ``results.json``, ``results.csv``, ``report.md`` and
``report.html`` (with the PNG plots of `attnkit.bench.plots`)."""

from __future__ import annotations

import csv
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from attnkit.bench.measure import detail_length
from attnkit.bench.runner import CELL_FIELDS
from attnkit.reporting import (
    CSS,
    QUALITY_BEGIN,
    QUALITY_END,
    fmt_bytes,
    html_table,
    md_table,
    splice_section,
    text_table,
)

__all__ = ["write_report", "write_json", "terminal_summary", "fmt_time", "fmt_bytes", "fmt_len"]

_STATUS_WORD = {"failed": "FAILED", "oom": "OOM", "skipped": "skip", "unsupported": "n/a"}


# -- formatting -------------------------------------------------------------------------------------------
def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _fmt_num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _duration(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


# -- tables as data -----------------------------------------------------------------------------------------
def _labels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Variants in report order: baselines first, then by family and name."""
    order = {"baseline": 0, "mechanism": 1, "flex": 1, "engine": 1, "peer": 1}
    seen, out = set(), []
    for v in sorted(doc["variants"], key=lambda v: (order.get(v["kind"], 1), v["family"]
                                                    if v["kind"] not in ("flex", "peer") else "~", v["name"],
                                                    v["causal"])):
        if v["label"] not in seen:
            seen.add(v["label"])
            out.append(v)
    return out


def _cell_index(doc: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(c["label"], c["seq_len"]): c for c in doc["results"]}


def _lengths(doc: dict[str, Any]) -> list[int]:
    return sorted({c["seq_len"] for c in doc["results"]} | {n for v in doc["variants"] for n in v["seq_lens"]})


def _kind_word(v: dict[str, Any]) -> str:
    if v["kind"] == "baseline":
        return "baseline"
    if v["kind"] in ("flex", "peer"):
        return "peer"
    word = "exact" if v["exact"] else "approx"
    return f"{word} via {v.get('engine')}" if v["kind"] == "engine" else word


def time_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows: variants; columns: lengths; cells: median time, or the status when not measured."""
    lengths = _lengths(doc)
    idx = _cell_index(doc)
    header = ["mechanism", "family", "kind"] + [fmt_len(n) for n in lengths]
    rows = []
    for v in _labels(doc):
        row = [v["label"], v["family"], _kind_word(v)]
        for n in lengths:
            c = idx.get((v["label"], n))
            if c is None:
                row.append("" if n not in v["seq_lens"] else "(not run)")
            elif c["status"] == "ok":
                row.append(fmt_time(c["time_s"]))
            else:
                row.append(_STATUS_WORD.get(c["status"], c["status"]))
        rows.append(row)
    return header, rows


def detail_table(doc: dict[str, Any], n: int) -> tuple[list[str], list[list[str]]]:
    header = ["mechanism", "time (min-max)", "x SDPA", "GFLOP/s", "peak mem", "error", "check", "SoL x"]
    idx = _cell_index(doc)
    rows = []
    for v in _labels(doc):
        c = idx.get((v["label"], n))
        if c is None:
            continue
        if c["status"] != "ok":
            rows.append([v["label"], _STATUS_WORD.get(c["status"], c["status"]), "", "", "", "", "", ""])
            continue
        spread = f"{fmt_time(c['time_s'])} ({fmt_time(c['time_min_s'])}-{fmt_time(c['time_max_s'])})"
        rows.append([v["label"], spread, _fmt_ratio(c["vs_sdpa"]), _fmt_num(c["gflops_per_s"]),
                     fmt_bytes(c["peak_memory_bytes"]), _fmt_err(c["error"]), c["exact_check"] or "",
                     _fmt_ratio(c["speed_of_light_ratio"])])
    return header, rows


def full_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["mechanism", "n", "status", "time", "min", "max", "reps", "x SDPA", "GFLOP", "GFLOP/s",
              "peak mem", "decode state", "error", "check", "density", "SoL x", "compile", "note"]
    rows = []
    for c in sorted(doc["results"], key=lambda c: (c["label"], c["seq_len"])):
        rows.append([c["label"], str(c["seq_len"]), c["status"], fmt_time(c["time_s"]), fmt_time(c["time_min_s"]),
                     fmt_time(c["time_max_s"]), str(c["repeats"] or "-"), _fmt_ratio(c["vs_sdpa"]),
                     _fmt_num(c["flops"] / 1e9 if c["flops"] else None), _fmt_num(c["gflops_per_s"]),
                     fmt_bytes(c["peak_memory_bytes"]), fmt_bytes(c.get("state_bytes")), _fmt_err(c["error"]),
                     c["exact_check"] or "", _fmt_num(c["density"]), _fmt_ratio(c["speed_of_light_ratio"]),
                     fmt_time(c["compile_s"]) if c["compile_s"] is not None else "", c["message"] or ""])
    return header, rows


def problems(doc: dict[str, Any]) -> list[str]:
    """One line per variant with cells that did not run: which lengths and why."""
    by: dict[tuple[str, str, str], list[int]] = {}
    for c in doc["results"]:
        if c["status"] != "ok":
            by.setdefault((c["label"], c["status"], c["message"] or ""), []).append(c["seq_len"])
    lines = []
    for (label, status, message), lens in by.items():
        lines.append(f"{label}: {_STATUS_WORD.get(status, status)} at n={', '.join(fmt_len(n) for n in lens)}"
                     + (f" ({message})" if message else ""))
    return lines


# Tables are shared with the quality and analysis reports (attnkit.reporting).
_text_table, _md_table, _html_table, _CSS = text_table, md_table, html_table, CSS


# -- summary text -------------------------------------------------------------------------------------------
def headline(doc: dict[str, Any]) -> str:
    m, c = doc["machine"], doc["config"]
    mode = "forward+backward" if c["backward"] else "forward"
    where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
    state = " (interrupted: partial results)" if doc["interrupted"] else ""
    return (f"attnkit bench on {where}, torch {m['torch']}, {c['device']} {c['dtype']}, batch {c['batch']} x "
            f"{c['heads']} heads x head dim {c['head_dim']}, {mode}, {_duration(doc['elapsed_s'])}{state}")


def terminal_summary(doc: dict[str, Any]) -> str:
    parts = [headline(doc), "", "Median time per call (FAILED = raised, OOM = out of memory, skip = over the "
             "time or memory budget, n/a = unsupported):", _text_table(*time_table(doc))]
    n = detail_length(doc)
    if n is not None:
        parts += ["", f"At n={n}: x SDPA = time / SDPA time; error = relative error vs exact softmax; "
                      "SoL x = time / speed of light (SDPA time x pattern density)",
                  _text_table(*detail_table(doc, n))]
    lines = problems(doc)
    if lines:
        parts += ["", "Not measured:"] + [f"  {x}" for x in lines[:20]]
        if len(lines) > 20:
            parts.append(f"  ... and {len(lines) - 20} more (see report.md)")
    return "\n".join(parts)


_METHODS = [
    "Time: wall clock of one call (forward, or forward+backward with `--backward`), median with min-max over "
    "the timed repeats, after a warm-up call; inputs are random normal `[batch, heads, n, head_dim]`, the same "
    "for every mechanism at a length.",
    "FLOPs: the mechanism's own count from the registry (`flops=`), else dense attention's "
    "4 * b * h * n^2 * d (halved if causal, times the density for a sparse pattern); forward+backward counts 3x "
    "forward. GFLOP/s = FLOPs / median time.",
    "x SDPA: time / the time of `torch.nn.functional.scaled_dot_product_attention` measured at the same length, "
    "causal mode and inputs in this run.",
    "Error: relative Frobenius error of the output on {rows} sampled query rows against exact softmax "
    "attention in float64 on the same inputs (with the mechanism's sparsity pattern when it has one, causal "
    "when causal). For exact mechanisms it is a correctness check (`ok` below {tol:g} for {dtype}).",
    "Speed of light (SoL) for sparse patterns: SDPA's time in this run scaled by the pattern's density "
    "(fraction of allowed query-key pairs) relative to SDPA's; SoL x = time / that bound.",
    "FlexAttention peers: `torch.nn.attention.flex_attention` compiled with `torch.compile` (static shapes, so "
    "once per length; the default run measures it at 16K only), block mask from the same pattern; its compile "
    "time (first call minus median) is reported apart and is not in the timings.",
    "Budget: a cell whose predicted call time (extrapolated from the previous length) exceeds {max_call:g} s, "
    "or that would not fit the run's {budget:.0f} s budget, is skipped and listed.",
]


def _methods(doc: dict[str, Any]) -> list[str]:
    from attnkit.bench.measure import EXACT_TOLERANCE

    c = doc["config"]
    out = [x.format(rows=c["error_rows"], tol=EXACT_TOLERANCE[c["dtype"]], dtype=c["dtype"],
                    max_call=c["max_call_s"], budget=c["time_budget_s"]) for x in _METHODS]
    out.insert(1, f"Peak memory: {doc['memory_method']}.")
    inputs = c.get("inputs", "gaussian")
    out.insert(2, "Inputs: " + (
        "clustered synthetic q, k, v (16 clusters per head; a same-cluster logit exceeds the others by about 4, "
        "values are per-cluster vectors plus noise), so attention is peaked as content-based attention is."
        if inputs == "clustered" else
        "i.i.d. N(0, 1) q, k, v: exact attention is nearly uniform at long lengths, so relative errors of "
        "approximations are large and not very informative."))
    return out


def _machine_lines(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    keys = ["cpu", "cpu_count", "torch_threads", "memory_bytes", "gpu", "device", "platform", "python", "torch",
            "attnkit", "git_commit", "date_utc", "load_average"]
    out = []
    for k in keys:
        if k in m and m[k] is not None:
            val = fmt_bytes(m[k]) if k.endswith("bytes") else m[k]
            out.append(f"{k}: {val}")
    return out


def _command(doc: dict[str, Any]) -> str:
    c = doc["config"]
    parts = ["attnkit bench"]
    if c.get("quick"):
        parts.append("--quick")
    if c["mechanisms"]:
        parts.append("--mechanisms " + ",".join(c["mechanisms"]))
    if c["seq_lens"] and not c.get("quick"):
        parts.append("--seq-lens " + ",".join(map(str, c["seq_lens"])))
    for flag, key, default in (("--batch", "batch", 1), ("--heads", "heads", 4), ("--head-dim", "head_dim", 64),
                               ("--dtype", "dtype", "float32")):
        if c[key] != default:
            parts.append(f"{flag} {c[key]}")
    if c["causal"] != "default":
        parts.append(f"--causal {c['causal']}")
    if c["backward"]:
        parts.append("--backward")
    return " ".join(parts)


def _plot_captions() -> dict[str, str]:
    return {
        "time_vs_length.png": "Time per call against sequence length (log-log); SDPA in black. Crosses at the "
                              "top: failed or out of memory at that length.",
        "memory_vs_length.png": "Peak memory allocated by one call against sequence length (log-log).",
        "error_vs_time.png": "Error against exact softmax vs time at one length: the Pareto view (lower left "
                             "is better; the line joins the mechanisms no other beats on both).",
        "speed_of_light.png": "Sparse patterns: time / speed of light at each length (1 = as fast as SDPA's "
                              "cost per allowed pair).",
    }


def _write_keeping_sections(path: Path, text: str, *, html_doc: bool) -> None:
    """Write ``text`` to ``path``, carrying over a section another command spliced into the previous file
    (``attnkit quality`` marks its section with HTML comments), so running bench after quality keeps both."""
    BEGIN, END = QUALITY_BEGIN, QUALITY_END

    old = path.read_text() if path.exists() else ""
    start, end = old.find(BEGIN), old.find(END)
    if start >= 0 and end > start:
        text = splice_section(text, old[start: end + len(END)], html_doc=html_doc)
    path.write_text(text)


def write_markdown(doc: dict[str, Any], plots: list[str], path: Path) -> None:
    n = detail_length(doc)
    captions = _plot_captions()
    out = ["# attnkit benchmark report", "", headline(doc) + ".", "",
           f"Reproduce: `{_command(doc)}`", ""]
    if doc["interrupted"]:
        out += ["**The run was interrupted (Ctrl-C): these are the results gathered until then.**", ""]
    out += ["## Time per call (median)", "", _md_table(*time_table(doc)), "",
            "FAILED = raised an error, OOM = out of memory, skip = over the time or memory budget, "
            "n/a = not supported in this mode; see *Not measured* below.", ""]
    if n is not None:
        out += [f"## At n = {n}", "", _md_table(*detail_table(doc, n)), ""]
    for p in plots:
        out += [f"![{p}]({p})", "", f"*{captions.get(p, p)}*", ""]
    lines = problems(doc)
    if lines:
        out += ["## Not measured", ""] + [f"- {x}" for x in lines] + [""]
    out += ["## How it was measured", ""] + [f"- {x}" for x in _methods(doc)] + [""]
    out += ["## Machine", ""] + [f"- {x}" for x in _machine_lines(doc)] + [""]
    out += ["## All measurements", "", _md_table(*full_table(doc)), ""]
    _write_keeping_sections(path, "\n".join(out), html_doc=False)




def write_html(doc: dict[str, Any], plots: list[str], path: Path) -> None:
    n = detail_length(doc)
    captions = _plot_captions()
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>attnkit benchmark report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>attnkit benchmark report</h1>",
           f"<p>{e(headline(doc))}.</p>", f"<p>Reproduce: <code>{e(_command(doc))}</code></p>"]
    if doc["interrupted"]:
        out.append("<p><b>The run was interrupted (Ctrl-C): these are the results gathered until then.</b></p>")
    out += ["<h2>Time per call (median)</h2>", _html_table(*time_table(doc)),
            "<p>FAILED = raised an error, OOM = out of memory, skip = over the time or memory budget, "
            "n/a = not supported in this mode.</p>"]
    if n is not None:
        out += [f"<h2>At n = {n}</h2>", _html_table(*detail_table(doc, n))]
    for p in plots:
        out.append(f"<figure><img src='{e(p)}' alt='{e(p)}'><figcaption>{e(captions.get(p, p))}</figcaption>"
                   "</figure>")
    lines = problems(doc)
    if lines:
        out += ["<h2>Not measured</h2><ul>"] + [f"<li>{e(x)}</li>" for x in lines] + ["</ul>"]
    out += ["<h2>How it was measured</h2><ul>"] + [f"<li>{e(x)}</li>" for x in _methods(doc)] + ["</ul>"]
    out += ["<h2>Machine</h2><ul>"] + [f"<li>{e(x)}</li>" for x in _machine_lines(doc)] + ["</ul>"]
    out += ["<h2>All measurements</h2>", _html_table(*full_table(doc)), "</body></html>"]
    _write_keeping_sections(path, "\n".join(out), html_doc=True)


def write_json(doc: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``results.json`` atomically (a partial run never leaves a truncated file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
    return path


def write_csv(doc: dict[str, Any], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CELL_FIELDS))
    w.writeheader()
    for c in doc["results"]:
        row = dict(c)
        row["params"] = json.dumps(c["params"], default=str)
        w.writerow(row)
    path.write_text(buf.getvalue())


def write_report(doc: dict[str, Any], out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Any]:
    """Write every output file into ``out_dir``; returns ``{"files": [...], "plot_error": str | None}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_json(doc, out)]
    write_csv(doc, out / "results.csv")
    files.append(out / "results.csv")
    made: list[str] = []
    plot_error = None
    if plots:
        from attnkit.bench import plots as plotting

        try:
            made = plotting.make_plots(doc, out)
        except plotting.MissingMatplotlib as exc:
            plot_error = str(exc)
    write_markdown(doc, made, out / "report.md")
    write_html(doc, made, out / "report.html")
    files += [out / "report.md", out / "report.html"] + [out / p for p in made]
    return {"files": [str(f) for f in files], "plot_error": plot_error}
