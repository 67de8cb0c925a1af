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

from attnkit.bench.classes import CLASS_WORDS, STRUCTURE_LABELS, cell_class, cell_error, structure_lengths  # noqa: F401
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
    write_text_atomic,
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
    if v.get("mechanism_kind") == "mixer":
        return "mixer"
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
                row.append(fmt_time(c["time_s"]) + ("~" if c.get("unstable") else ""))
            else:
                row.append(_STATUS_WORD.get(c["status"], c["status"]))
        rows.append(row)
    return header, rows


def detail_table(doc: dict[str, Any], n: int) -> tuple[list[str], list[list[str]]]:
    header = ["mechanism", "class", "time (min-max)", "x SDPA", "GFLOP/s", "peak mem", "error", "check",
              "err vs full (clustered)", "SoL x"]
    idx = _cell_index(doc)
    rows = []
    for v in _labels(doc):
        c = idx.get((v["label"], n))
        if c is None:
            continue
        if c["status"] != "ok":
            rows.append([v["label"], "", _STATUS_WORD.get(c["status"], c["status"])] + [""] * 7)
            continue
        spread = f"{fmt_time(c['time_s'])} ({fmt_time(c['time_min_s'])}-{fmt_time(c['time_max_s'])})"
        spread += "~" if c.get("unstable") else ""
        full = cell_error(c, doc) if cell_class(c) != "exact" else None
        rows.append([v["label"], cell_class(c), spread, _fmt_ratio(c["vs_sdpa"]), _fmt_num(c["gflops_per_s"]),
                     fmt_bytes(c["peak_memory_bytes"]), _fmt_err(c["error"]), c["exact_check"] or "",
                     _fmt_err(full), _fmt_ratio(c["speed_of_light_ratio"])])
    return header, rows


def full_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["mechanism", "n", "status", "class", "time", "min", "max", "reps", "load", "stable", "x SDPA", "GFLOP",
              "GFLOP/s", "peak mem", "decode state", "error", "check", "density", "SoL x", "compile", "note"]
    rows = []
    for c in sorted(doc["results"], key=lambda c: (c["label"], c["seq_len"])):
        stable = "" if c["status"] != "ok" or c.get("unstable") is None else (
            "UNSTABLE" if c["unstable"] else "ok" + (" (re-run)" if c.get("reruns") else ""))
        rows.append([c["label"], str(c["seq_len"]), c["status"], cell_class(c) if c["status"] == "ok" else "",
                     fmt_time(c["time_s"]), fmt_time(c["time_min_s"]),
                     fmt_time(c["time_max_s"]), str(c["repeats"] or "-"),
                     "-" if c.get("load") is None else f"{c['load']:.1f}", stable, _fmt_ratio(c["vs_sdpa"]),
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


# -- the decision: which mechanism to pick ------------------------------------------------------------------
MEMORY_LIMIT_BYTES = 2**30  # the decision's "under 1 GiB" row
_DECISION_LEAD = ("The fastest mechanism of each accuracy class at each length: time per call · peak memory of one "
                  "call · error against full softmax on clustered inputs (approximations and masks).")
_MODE_WORDS = {False: "Non-causal (encoders, prefill of bidirectional models)",
               True: "Causal (decoders): compared only with causal variants"}
_DECISION_INTRO = (
    "For each length measured: the fastest mechanism of each accuracy class, with its time per call, the peak "
    "memory of one call and, for approximations and masks, its relative error against full softmax on clustered "
    "inputs (other structures below). Exact = softmax's outputs; masked = exact softmax under a mask that "
    "changes the model (sliding window, neighborhoods), not a drop-in replacement; approximate = an "
    "approximation of softmax. ~ = unstable timing (busy machine).")
# What each row of the decision table picks, and when a reader should take it.
_NEEDS = [
    ("exact, fastest", "you need softmax's outputs unchanged"),
    ("exact, under 1 GiB", "you need exact outputs and one call must stay under 1 GiB"),
    ("exact, least memory", "memory, not time, is what runs out"),
    ("masked (different model), fastest", "a model trained with this mask is acceptable (outputs differ from "
                                          "full attention)"),
    ("approximate, fastest", "speed matters more than agreement with softmax"),
    ("approximate, lowest error on clustered inputs", "you want an approximation that stays close to softmax on "
                                                       "peaked, content-based attention"),
    ("token mixer, fastest", "you train from scratch and may replace attention by another operator"),
]


def _pick(doc: dict[str, Any], n: int, need: str, causal: bool = False) -> dict[str, Any] | None:
    ok = [c for c in doc["results"] if c["seq_len"] == n and c["status"] == "ok" and c["time_s"] is not None
          and bool(c["causal"]) == causal]
    by_class: dict[str, list[dict[str, Any]]] = {}
    for c in ok:
        by_class.setdefault(cell_class(c), []).append(c)

    def fastest(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
        return min(cells, key=lambda c: c["time_s"]) if cells else None

    exact = by_class.get("exact", [])
    if need == "exact, fastest":
        return fastest(exact)
    if need == "exact, under 1 GiB":
        return fastest([c for c in exact if c["peak_memory_bytes"] is not None
                        and c["peak_memory_bytes"] <= MEMORY_LIMIT_BYTES])
    if need == "exact, least memory":
        with_mem = [c for c in exact if c["peak_memory_bytes"] is not None]
        return min(with_mem, key=lambda c: (c["peak_memory_bytes"], c["time_s"])) if with_mem else None
    if need.startswith("masked"):
        return fastest(by_class.get("masked", []))
    if need == "approximate, fastest":
        return fastest(by_class.get("approx", []))
    if need.startswith("approximate, lowest error"):
        scored = [(cell_error(c, doc), c) for c in by_class.get("approx", [])]
        scored = [(e, c) for e, c in scored if e is not None]
        return min(scored, key=lambda t: (t[0], t[1]["time_s"]))[1] if scored else None
    if need.startswith("token mixer"):
        return fastest(by_class.get("mixer", []))
    raise ValueError(need)


DECISION_COLUMNS = 5  # lengths in the decision table (it must fit the first screen)


def decision_lengths(doc: dict[str, Any], causal: bool = False) -> list[int]:
    """The lengths of the decision table: every length measured when they fit in ``DECISION_COLUMNS``
    columns, else the shortest, 4K, 16K, the longest and evenly spread others (the rest are in the tables
    below)."""
    lens = sorted({c["seq_len"] for c in doc["results"] if c["status"] == "ok" and bool(c["causal"]) == causal})
    if len(lens) <= DECISION_COLUMNS:
        return lens
    keep = {lens[0], lens[-1]} | ({4096, 16384} & set(lens))
    rest = [n for n in lens if n not in keep]
    while len(keep) < DECISION_COLUMNS and rest:
        # the remaining length farthest (in log2) from those kept
        import math

        pick = max(rest, key=lambda n: min(abs(math.log2(n) - math.log2(k)) for k in keep))
        keep.add(pick)
        rest.remove(pick)
    return sorted(keep)


def decision_modes(doc: dict[str, Any]) -> list[bool]:
    """Causal modes with a decision table: non-causal (encoders), and causal (decoders) when a mechanism other
    than the baseline was measured causal. Picks never mix the two: causal attention does half the work."""
    modes = [False] if any(not c["causal"] and c["status"] == "ok" for c in doc["results"]) else []
    if any(c["causal"] and c["status"] == "ok" and c["kind"] != "baseline" for c in doc["results"]):
        modes.append(True)
    return modes


def decision_cells(doc: dict[str, Any], causal: bool = False
                   ) -> list[tuple[str, str, dict[int, dict[str, Any] | None]]]:
    """``(need, pick this if, {length: chosen cell or None})`` for every row of the decision table that has a
    pick at some length, among cells of one causal mode."""
    lengths = decision_lengths(doc, causal)
    out = []
    for need, why in _NEEDS:
        picks = {n: _pick(doc, n, need, causal) for n in lengths}
        if any(picks.values()):
            out.append((need, why, picks))
    return out


def _pick_text(c: dict[str, Any] | None, doc: dict[str, Any]) -> tuple[str, str]:
    """``(name, "time · memory · error")`` of a picked cell."""
    if c is None:
        return "-", ""
    parts = [fmt_time(c["time_s"]) + ("~" if c.get("unstable") else ""), fmt_bytes(c["peak_memory_bytes"])]
    if cell_class(c) in ("approx", "masked", "other"):
        err = cell_error(c, doc)
        if err is not None:
            parts.append(f"err {err:.2g} clustered")
    return c["label"], " · ".join(parts)


def decision_table(doc: dict[str, Any], causal: bool = False) -> tuple[list[str], list[list[str]]]:
    """Rows: what a reader needs; columns: lengths; cells: the pick with its time, peak memory and error."""
    lengths = decision_lengths(doc, causal)
    header = ["need (pick this if ...)"] + [f"n = {fmt_len(n)}" for n in lengths]
    rows = []
    for need, why, picks in decision_cells(doc, causal):
        row = [f"{need}: {why}"]
        for n in lengths:
            name, detail = _pick_text(picks[n], doc)
            row.append(name if not detail else f"{name} ({detail})")
        rows.append(row)
    return header, rows


def _decision_html(doc: dict[str, Any], causal: bool = False) -> str:
    e = html.escape
    lengths = decision_lengths(doc, causal)
    head = "<th>need <small>(pick this if ...)</small></th>" + "".join(f"<th>n = {fmt_len(n)}</th>" for n in lengths)
    body = []
    for need, why, picks in decision_cells(doc, causal):
        tds = [f"<td><b>{e(need)}</b><br><small>{e(why)}</small></td>"]
        for n in lengths:
            name, detail = _pick_text(picks[n], doc)
            tds.append(f"<td><b>{e(name)}</b><br><small>{e(detail)}</small></td>" if detail else "<td>-</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f"<div class='wide'><table class='decide'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table></div>")


def family_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The fastest measured variant of every family at each length (with its class)."""
    lengths = decision_lengths(doc)
    families = sorted({c["family"] for c in doc["results"] if c["status"] == "ok" and c["kind"] != "baseline"
                       and not c["causal"]})
    header = ["family"] + [fmt_len(n) for n in lengths]
    rows = []
    for fam in families:
        row = [fam]
        for n in lengths:
            cells = [c for c in doc["results"] if c["family"] == fam and c["seq_len"] == n and c["status"] == "ok"
                     and not c["causal"]]
            best = min(cells, key=lambda c: c["time_s"]) if cells else None
            row.append("-" if best is None else f"{best['label']} ({fmt_time(best['time_s'])}, "
                                                  f"{fmt_bytes(best['peak_memory_bytes'])}, {cell_class(best)})")
        rows.append(row)
    return header, rows


def structure_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Error against full softmax of every approximation and mask on each structured input, per length."""
    lengths = structure_lengths(doc)
    kinds = list(STRUCTURE_LABELS)
    header = ["mechanism", "class"] + [f"{fmt_len(n)} {STRUCTURE_LABELS[k]}" for n in lengths for k in kinds]
    idx = _cell_index(doc)
    rows = []
    for v in _labels(doc):
        cells = [idx.get((v["label"], n)) for n in lengths]
        if not any(c and c.get("errors") for c in cells):
            continue
        cls = cell_class(next(c for c in cells if c and c.get("errors")))
        row = [v["label"], cls]
        for c in cells:
            errs = (c or {}).get("errors") or {}
            row += [_fmt_err(errs.get(k)) for k in kinds]
        rows.append(row)
    rows.sort(key=lambda r: (r[1], r[0]))
    return header, rows


_STRUCTURE_NOTE = (
    "Errors are relative (Frobenius) against full softmax attention in float64 on the same inputs, for four "
    "kinds of synthetic q, k, v: random (i.i.d. N(0, 1)), low-rank (rank-4 q, k, v), clustered (16 clusters per "
    "head, peaked content-based attention) and local (each query attends to its ~16 neighbours). Random inputs "
    "are the hardest case and the least like real attention: with no low-rank structure, softmax over n "
    "near-equal logits is almost uniform, the exact output is about mean(v), a vector of tiny norm, so any "
    "approximation's relative error is large; Linformer's random projection of the length-n axis mixes n "
    "independent values, so its error grows with n. Judge an approximation on the structure it assumes "
    "(low-rank: Linformer, Nystrom; clustered: Reformer/hyper-attention style hashing and clustering; local: "
    "windows). Masks (sliding window, neighborhoods) are exact for their own model, but compared with full "
    "attention they differ wherever attention is not local.")


def decision_lines(doc: dict[str, Any]) -> list[str]:
    """Plain-text picks at the longest length measured and at 4K (the terminal's first lines)."""
    out = []
    for causal in decision_modes(doc):
        lengths = decision_lengths(doc, causal)
        rows = decision_cells(doc, causal)
        for n in sorted({lengths[-1]} | ({4096, 16384} & set(lengths))):
            lines = [f"  {need:46s} {_pick_text(picks[n], doc)[0]} ({_pick_text(picks[n], doc)[1]})"
                     for need, _why, picks in rows if picks[n] is not None]
            if lines:
                out += [f"Pick at n={fmt_len(n)}{', causal' if causal else ''}:"] + lines
    return out


def coverage(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """``(summary line, one line per selected record never measured, naming why)``."""
    names = sorted({v["name"] for v in doc["variants"] if v["kind"] == "mechanism"})
    ok = {c["mechanism"] for c in doc["results"] if c["status"] == "ok" and c["kind"] == "mechanism"}
    left = []
    for name in names:
        if name in ok:
            continue
        cells = [c for c in doc["results"] if c["mechanism"] == name]
        why = next((c["message"] for c in cells if c["message"]), None) or (
            "not reached (the run was interrupted)" if doc.get("interrupted") else "no length selected")
        left.append(f"{name}: {why}")
    return f"{len(ok)} of {len(names)} selected records measured at least once", left


# Tables are shared with the quality and analysis reports (attnkit.reporting).
_text_table, _md_table, _html_table, _CSS = text_table, md_table, html_table, CSS


# -- summary text -------------------------------------------------------------------------------------------
def headline(doc: dict[str, Any]) -> str:
    m, c = doc["machine"], doc["config"]
    mode = "forward+backward" if c["backward"] else "forward"
    where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
    state = " (interrupted: partial results)" if doc["interrupted"] else ""
    compile_s = doc.get("compile_s") or 0.0
    spent = _duration(doc["elapsed_s"]) + (f" (of which {_duration(compile_s)} compiling, outside the budget)"
                                           if compile_s >= 0.5 else "")
    return (f"attnkit bench on {where}, torch {m['torch']}, {c['device']} {c['dtype']}, batch {c['batch']} x "
            f"{c['heads']} heads x head dim {c['head_dim']}, {mode}, {spent}{state}{load_note(doc)}")


UNSTABLE_NOTE = ("~ = unstable: the slowest timed call exceeded the fastest by more than 1.5x even after one "
                 "re-run (the machine was busy: see the load column of All measurements)")


def load_note(doc: dict[str, Any]) -> str:
    """``"; load 0.4-5.1, 3 unstable cells"``: the load average seen by the cells and how many are unstable."""
    loads = [c["load"] for c in doc["results"] if c.get("load") is not None]
    unstable = sum(1 for c in doc["results"] if c.get("unstable"))
    out = f"; load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    if unstable:
        out += f", {unstable} unstable cell{'s' if unstable > 1 else ''} (marked ~)"
    return out


def terminal_summary(doc: dict[str, Any]) -> str:
    parts = [headline(doc), ""] + decision_lines(doc)
    parts += ["", "Median time per call (FAILED = raised, OOM = out of memory, skip = over the "
              "time or memory budget, n/a = unsupported; " + UNSTABLE_NOTE + "):", _text_table(*time_table(doc))]
    n = detail_length(doc)
    if n is not None:
        parts += ["", f"At n={n}: x SDPA = time / SDPA time; error = relative error vs exact softmax (under the "
                      "mechanism's own mask, if any: the check); err vs full = against full softmax on clustered "
                      "inputs (a mask is a different model); SoL x = time / speed of light (SDPA time x pattern "
                      "density)",
                  _text_table(*detail_table(doc, n))]
    summary, left = coverage(doc)
    if doc["config"].get("all") or left:
        parts += ["", f"Coverage: {summary}" + ("; never measured:" if left else ".")]
        parts += [f"  {x}" for x in left[:30]] + ([f"  ... and {len(left) - 30} more"] if len(left) > 30 else [])
    lines = problems(doc)
    if lines:
        parts += ["", "Not measured:"] + [f"  {x}" for x in lines[:20]]
        if len(lines) > 20:
            parts.append(f"  ... and {len(lines) - 20} more (see report.md)")
    return "\n".join(parts)


_METHODS = [
    "Time: wall clock of one call (forward, or forward+backward with `--backward`), median with min-max over "
    "the timed repeats, after a warm-up call; the same inputs `[batch, heads, n, head_dim]` for every mechanism "
    "at a length. The 1-minute load average is recorded beside every cell; a cell whose slowest call exceeds "
    "its fastest by 1.5x is timed again and, if it still spreads, flagged unstable (~). The SDPA baseline is "
    "measured at every length where another variant of its causal mode ran, whatever the budget, so every "
    "ratio has its denominator. Compilation (FlexAttention) is not counted in the run's budget; it is reported "
    "apart.",
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
    out.append("Accuracy classes: exact = softmax's outputs (SDPA, exact engines); masked = exact softmax under a "
               "mask that changes the model (sliding window, neighborhoods: checked against softmax with the same "
               "mask, but compared with full attention in the decision and the Pareto plot); approximate; other "
               "= exact for its own definition, a different operator; token mixer = x -> x, no softmax to "
               "compare with.")
    out.append(_STRUCTURE_NOTE)
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
    if c.get("all"):
        parts.append("--all")
    if c["mechanisms"] and not c.get("all"):
        parts.append("--mechanisms " + ",".join(c["mechanisms"]))
    if c["seq_lens"] and not c.get("quick") and not c.get("all"):
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
        "error_vs_time.png": "Error against full softmax (on clustered inputs) vs time at one length: the Pareto "
                             "view (lower left is better; the red line is the front: the mechanisms no other "
                             "beats on both). Masks (sliding window, neighborhoods) are placed by their error "
                             "against full attention, not against their own mask.",
        "state_vs_error.png": "Decoding: the state a causal decoder keeps after n tokens (softmax's KV cache "
                              "grows with n; linear attention's recurrent state does not) against the error on "
                              "clustered inputs, with the Pareto front.",
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
    write_text_atomic(path, text)


def write_markdown(doc: dict[str, Any], plots: list[str], path: Path) -> None:
    n = detail_length(doc)
    captions = _plot_captions()
    out = ["# attnkit benchmark report", "", headline(doc) + ".", "",
           f"Reproduce: `{_command(doc)}`", ""]
    if doc["interrupted"]:
        out += ["**The run was interrupted (Ctrl-C): these are the results gathered until then.**", ""]
    modes = decision_modes(doc)
    if modes:
        out += ["## Which mechanism to pick", "", _DECISION_INTRO, ""]
        for causal in modes:
            out += [f"**{_MODE_WORDS[causal]}**", "", _md_table(*decision_table(doc, causal)), ""]
        out += ["### Fastest per family", "", _md_table(*family_table(doc)), ""]
    if structure_lengths(doc):
        out += ["### Error by input structure (against full softmax)", "", _md_table(*structure_table(doc)), "",
                _STRUCTURE_NOTE, ""]
    out += ["## Time per call (median)", "", _md_table(*time_table(doc)), "", UNSTABLE_NOTE + ".", "",
            "FAILED = raised an error, OOM = out of memory, skip = over the time or memory budget, "
            "n/a = not supported in this mode; see *Not measured* below.", ""]
    if n is not None:
        out += [f"## At n = {n}", "", _md_table(*detail_table(doc, n)), ""]
    for p in plots:
        out += [f"![{p}]({p})", "", f"*{captions.get(p, p)}*", ""]
    summary, left = coverage(doc)
    out += ["## Coverage", "", summary + ("; never measured (why):" if left else "."), ""]
    out += [f"- {x}" for x in left] + ([""] if left else [])
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
    modes = decision_modes(doc)
    if modes:
        out += ["<h2 id='pick'>Which mechanism to pick</h2>", f"<p>{e(_DECISION_LEAD)}</p>"]
        for causal in modes:
            out += [f"<p><b>{e(_MODE_WORDS[causal])}</b></p>", _decision_html(doc, causal)]
        out.append(f"<p><small>{e(_DECISION_INTRO)}</small></p>")
        if "error_vs_time.png" in plots:
            out.append("<p>Time against error, with the Pareto front: <a href='#pareto'>the plot below</a>.</p>")
        out += ["<h3>Fastest per family</h3>", _html_table(*family_table(doc))]
    if structure_lengths(doc):
        out += ["<h3>Error by input structure (against full softmax)</h3>", _html_table(*structure_table(doc)),
                f"<p>{e(_STRUCTURE_NOTE)}</p>"]
    out += ["<h2>Time per call (median)</h2>", _html_table(*time_table(doc)), f"<p>{e(UNSTABLE_NOTE)}.</p>",
            "<p>FAILED = raised an error, OOM = out of memory, skip = over the time or memory budget, "
            "n/a = not supported in this mode.</p>"]
    if n is not None:
        out += [f"<h2>At n = {n}</h2>", _html_table(*detail_table(doc, n))]
    for p in plots:
        anchor = " id='pareto'" if p == "error_vs_time.png" else ""
        out.append(f"<figure{anchor}><img src='{e(p)}' alt='{e(p)}'><figcaption>{e(captions.get(p, p))}"
                   "</figcaption></figure>")
    summary, left = coverage(doc)
    out += ["<h2>Coverage</h2>", f"<p>{e(summary)}{'; never measured (why):' if left else '.'}</p>"]
    if left:
        out += ["<ul>"] + [f"<li>{e(x)}</li>" for x in left] + ["</ul>"]
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
    write_text_atomic(path, json.dumps(doc, indent=1, default=str))
    return path


def write_csv(doc: dict[str, Any], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CELL_FIELDS))
    w.writeheader()
    for c in doc["results"]:
        row = dict(c)
        row["params"] = json.dumps(c["params"], default=str)
        row["errors"] = json.dumps(c.get("errors"), default=str) if c.get("errors") else ""
        w.writerow(row)
    write_text_atomic(path, buf.getvalue())


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
