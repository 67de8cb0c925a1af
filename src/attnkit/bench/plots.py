"""PNG plots of a benchmark run (matplotlib, imported lazily: ``pip install "attnkit[bench]"``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from attnkit.reporting import MissingMatplotlib  # noqa: F401
from attnkit.reporting import bytes_label as _bytes_label
from attnkit.reporting import pyplot as _pyplot

__all__ = ["make_plots", "MissingMatplotlib", "pareto_front"]


# matplotlib loading is shared with the quality and analysis reports (attnkit.reporting).


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (lower is better), sorted by the first."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _len_label(n: float, _pos: Any = None) -> str:
    n = int(round(n))
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _time_label(s: float, _pos: Any = None) -> str:
    if s < 1e-3:
        return f"{s * 1e6:g} us"
    if s < 1:
        return f"{s * 1e3:g} ms"
    return f"{s:g} s"


class _Styles:
    """One colour per mechanism across every plot; SDPA black and thick, approximations dashed,
    FlexAttention peers dotted, causal variants with hollow markers."""

    def __init__(self, doc: dict[str, Any], plt: Any):
        cmap = plt.get_cmap("tab20")
        names = []
        for v in doc["variants"]:
            if v["kind"] != "baseline" and v["name"] not in names:
                names.append(v["name"])
        self.colour = {name: cmap((2 * i) % 20 + (i // 10) % 2) for i, name in enumerate(names)}
        self.info = {v["label"]: v for v in doc["variants"]}

    def __call__(self, label: str) -> dict[str, Any]:
        v = self.info[label]
        if v["kind"] == "baseline":
            style = dict(color="black", linewidth=2.8, marker="o", markersize=5, zorder=5)
        elif v["kind"] == "flex":
            base = v["name"][len("flex["):-1]
            style = dict(color=self.colour.get(base, "grey"), linestyle=":", linewidth=1.6, marker="D",
                         markersize=4)
        else:
            style = dict(color=self.colour[v["name"]], linestyle="-" if v["exact"] else "--", linewidth=1.6,
                         marker="o", markersize=4)
        if v["causal"]:
            style["markerfacecolor"] = "white"
        return style


def _series(doc: dict[str, Any], key: str) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    for c in sorted(doc["results"], key=lambda c: c["seq_len"]):
        s = out.setdefault(c["label"], {"n": [], "y": [], "bad_n": []})
        if c["status"] == "ok" and c.get(key) is not None:
            s["n"].append(c["seq_len"])
            s["y"].append(c[key])
        elif c["status"] in ("failed", "oom"):
            s["bad_n"].append(c["seq_len"])
    return out


def _length_axis(ax: Any, doc: dict[str, Any], plt: Any) -> None:
    lens = sorted({c["seq_len"] for c in doc["results"] if c["status"] in ("ok", "failed", "oom")})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(_len_label))
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("sequence length n")
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="y", alpha=0.1)


def _power_of_two_ticks(ax: Any, values: list[float]) -> None:
    """Byte ticks at powers of two (1 MiB, 4 MiB, ...), at most ~8 of them."""
    from matplotlib.ticker import FixedLocator, NullLocator

    values = [v for v in values if v and v > 0]
    if not values:
        return
    lo, hi = math.floor(math.log2(min(values))), math.ceil(math.log2(max(values)))
    step = max(1, math.ceil((hi - lo + 1) / 8))
    ax.yaxis.set_major_locator(FixedLocator([2.0**e for e in range(lo, hi + 1) if (e - lo) % step == 0]))
    ax.yaxis.set_minor_locator(NullLocator())


def _line_plot(doc: dict[str, Any], key: str, ylabel: str, title: str, fmt: Any, path: Path, plt: Any,
               guides: bool) -> None:
    styles = _Styles(doc, plt)
    series = _series(doc, key)
    fig, ax = plt.subplots(figsize=(11, 6.2))
    ax.set_yscale("log")
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)
    any_bad = False
    for label in [v["label"] for v in doc["variants"] if v["label"] in series]:
        s = series[label]
        st = styles(label)
        if s["n"]:
            ax.plot(s["n"], s["y"], label=label, **st)
        elif s["bad_n"]:
            ax.plot([], [], label=f"{label} (failed)", **st)
        for n in s["bad_n"]:
            any_bad = True
            ax.plot([n], [0.97], transform=top, marker="x", markersize=9, mew=2.2, color=st["color"],
                    linestyle="none", clip_on=False)
    if guides:
        base = series.get(next((v["label"] for v in doc["variants"] if v["kind"] == "baseline"), ""), None)
        if base and len(base["n"]) >= 2:
            n0, y0 = base["n"][0], base["y"][0]
            xs = [n0, base["n"][-1]]
            ax.plot(xs, [y0, y0 * (xs[1] / n0) ** 2], color="grey", alpha=0.35, linewidth=1, linestyle="-.",
                    label="guide: grows as n\u00b2")
            ax.plot(xs, [y0, y0 * (xs[1] / n0)], color="grey", alpha=0.35, linewidth=1, linestyle=(0, (1, 3)),
                    label="guide: grows as n")
    if key == "peak_memory_bytes":
        pts = sorted({(c["seq_len"], c["input_bytes"]) for c in doc["results"] if c["input_bytes"]})
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="grey", alpha=0.5, linewidth=1,
                    linestyle="-.", label="size of q, k, v together")
    if any_bad:
        ax.plot([], [], marker="x", color="black", linestyle="none", mew=2, label="x at top: failed / OOM")
    _length_axis(ax, doc, plt)
    if key == "peak_memory_bytes":
        _power_of_two_ticks(ax, [y for s in series.values() for y in s["y"]])
    ax.yaxis.set_major_formatter(plt.FuncFormatter(fmt))
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left", fontsize=11)
    entries = len(ax.get_legend_handles_labels()[1])
    ncol = max(1, math.ceil(entries / 32))  # `--all`: many series, in columns of at most 32 entries
    if ncol > 1:
        fig.set_size_inches(11 + 2.6 * ncol, 6.2 + 0.05 * min(entries, 32))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8 if ncol == 1 else 6, frameon=False,
              ncol=ncol)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Tight layout not applied" with a tall legend
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _subtitle(doc: dict[str, Any]) -> str:
    c, m = doc["config"], doc["machine"]
    mode = "fwd+bwd" if c["backward"] else "forward"
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    return f"{c['dtype']}, batch {c['batch']}, {c['heads']} heads, head dim {c['head_dim']}, {mode}; {where}"


def _annotate(ax: Any, items: list[tuple[float, float, str, Any]]) -> None:
    """Label points, moving a label down while it would overlap one already placed (in pixels)."""
    fig = ax.figure
    fig.canvas.draw()
    placed: list[tuple[float, float, float]] = []  # x, y, width of labels in display space
    for x, y, text, colour in sorted(items, key=lambda t: (-t[1], t[0])):
        px, py = ax.transData.transform((x, y))
        width = 6.2 * len(text)
        dy = 4.0
        for _ in range(12):
            ly = py + dy
            if all(abs(ly - oy) > 11 or px + 6 + width < ox or ox + ow < px + 6 for ox, oy, ow in placed):
                break
            dy -= 11
        placed.append((px + 6, py + dy, width))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, dy * 72 / fig.dpi), fontsize=8,
                    color=colour)


_CLASS_MARKERS = {"exact": "o", "masked": "s", "approx": "^", "other": "D"}


def _save(fig: Any, path: Path, plt: Any) -> bool:
    """Lay out ``fig``, write it to ``path`` and close it; True (the plot was written)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _save_scatter(ax: Any, fig: Any, path: Path, plt: Any) -> bool:
    """:func:`_save` for the scatter plots (grid, legend in the upper right)."""
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    return _save(fig, path, plt)


def pareto_length(doc: dict[str, Any]) -> int | None:
    """The length of the Pareto plot: the longest at which errors on structured inputs were measured (so masks
    are placed against full attention), else the detail table's length."""
    from attnkit.bench.classes import structure_lengths
    from attnkit.bench.measure import detail_length

    lens = structure_lengths(doc)
    base = {c["seq_len"] for c in doc["results"] if c["kind"] == "baseline" and c["status"] == "ok"}
    both = [n for n in lens if n in base]
    return max(both) if both else (max(lens) if lens else detail_length(doc))


def _pareto_plot(doc: dict[str, Any], path: Path, plt: Any) -> bool:
    from attnkit.bench.classes import CLASS_WORDS, cell_class, cell_error
    from attnkit.bench.measure import EXACT_TOLERANCE

    n = pareto_length(doc)
    cells = []
    # One causal mode: causal attention does half the work, so the two never share a front.
    causal = not any(c["seq_len"] == n and c["status"] == "ok" and not c["causal"] for c in doc["results"])
    for c in doc["results"]:
        if c["seq_len"] != n or c["status"] != "ok" or bool(c["causal"]) != causal:
            continue
        err = cell_error(c, doc, "clustered")
        if err is not None and cell_class(c) in _CLASS_MARKERS:
            cells.append((err, c))
    if not cells:
        return False
    styles = _Styles(doc, plt)
    floor = 1e-9
    fig, ax = plt.subplots(figsize=(10, 6.2))
    tol = EXACT_TOLERANCE[doc["config"]["dtype"]]
    pts = []
    for err, c in cells:
        st = styles(c["label"])
        y = max(err, floor)
        pts.append((c["time_s"], y, c))
        ax.plot([c["time_s"]], [y], linestyle="none", marker=_CLASS_MARKERS[cell_class(c)],
                markersize=9 if c["kind"] == "baseline" else 7, color=st["color"],
                markerfacecolor=st.get("markerfacecolor", st["color"]), zorder=4)
    for cls, marker in _CLASS_MARKERS.items():
        if any(cell_class(c) == cls for _, c in cells):
            ax.plot([], [], linestyle="none", marker=marker, color="grey", label=CLASS_WORDS[cls])
    # Errors below the dtype's rounding all count as exact: only the fastest exact one is on the front.
    front = pareto_front([(x, max(y, tol)) for x, y, _ in pts])
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", alpha=0.4,
                linewidth=1.5, zorder=2, label="Pareto front (nothing is both faster and more accurate)")
    ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="none", marker="o", markersize=14,
            markerfacecolor="none", markeredgecolor="tab:red", alpha=0.6, zorder=3,
            label=None if len(front) > 1 else "Pareto front")
    ax.axhspan(floor / 2, tol, color="tab:green", alpha=0.07, zorder=0)
    ax.text(0.005, tol, f" exact within {doc['config']['dtype']} rounding (< {tol:g})", va="top", fontsize=8,
            color="tab:green", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import LogLocator

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_ylim(floor / 2, max(max(p[1] for p in pts) * 3, 1.0))
    xs = [p[0] for p in pts]
    ax.set_xlim(min(xs) / 1.6, max(xs) * 3)
    _annotate(ax, [(x, y, c["label"], "black" if c["kind"] == "baseline" else styles(c["label"])["color"])
                   for x, y, c in pts])
    ax.xaxis.set_major_formatter(plt.FuncFormatter(_time_label))
    ax.set_xlabel(f"time per call at n = {n} (log)")
    ax.set_ylabel("relative error vs full softmax, clustered inputs (log)")
    mode = "causal" if causal else "non-causal"
    ax.set_title(f"Error vs time at n = {n} ({mode}): lower left is better\n{_subtitle(doc)}", loc="left",
                 fontsize=11)
    return _save_scatter(ax, fig, path, plt)


def _sol_plot(doc: dict[str, Any], path: Path, plt: Any) -> bool:
    cells = [c for c in doc["results"] if c["status"] == "ok" and c["speed_of_light_ratio"] is not None]
    if not cells:
        return False
    styles = _Styles(doc, plt)
    labels = [v["label"] for v in doc["variants"] if any(c["label"] == v["label"] for c in cells)]
    lens = sorted({c["seq_len"] for c in cells})
    idx = {(c["label"], c["seq_len"]): c for c in cells}
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(lens) * max(len(labels), 1) * 0.5 + 4), 5.8))
    width = 0.8 / len(labels)
    ratios = [c["speed_of_light_ratio"] for c in cells]
    for i, label in enumerate(labels):
        st = styles(label)
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(lens))]
        ys = [idx[(label, n)]["speed_of_light_ratio"] if (label, n) in idx else 0 for n in lens]
        bars = ax.bar(xs, ys, width=width * 0.95, color=st["color"], label=label,
                      hatch="//" if st.get("linestyle") == ":" else None, edgecolor="white", alpha=0.9)
        for b, y in zip(bars, ys):
            if y:
                ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.2g}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=1.2, label="speed of light (1 = SDPA's cost per allowed pair)")
    if max(ratios) / max(min(ratios), 1e-9) > 30:
        ax.set_yscale("log")
    ax.set_xticks(range(len(lens)))
    ax.set_xticklabels([_len_label(n) for n in lens])
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("time / speed of light (lower is better)")
    ax.set_title("Sparse patterns against their speed of light (SDPA time x density)\n" + _subtitle(doc),
                 loc="left", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path, plt)


def _state_plot(doc: dict[str, Any], path: Path, plt: Any) -> bool:
    """Decoding: the state a decoder keeps after n tokens (KV cache of softmax, recurrent state of linear
    attention) against the error on clustered inputs, causal variants at the Pareto length, with the front."""
    from attnkit.bench.classes import cell_error
    from attnkit.bench.measure import EXACT_TOLERANCE

    n = pareto_length(doc)
    pts = []
    for c in doc["results"]:
        if c["seq_len"] != n or c["status"] != "ok" or not c["causal"] or not c.get("state_bytes"):
            continue
        err = cell_error(c, doc, "clustered")
        if err is not None:
            pts.append((float(c["state_bytes"]), err, c))
    if len(pts) < 2:
        return False
    tol = EXACT_TOLERANCE[doc["config"]["dtype"]]
    styles = _Styles(doc, plt)
    fig, ax = plt.subplots(figsize=(10, 5.6))
    for x, y, c in pts:
        st = styles(c["label"])
        ax.plot([x], [max(y, 1e-9)], linestyle="none", marker="o", markersize=8, color=st["color"], zorder=4)
    front = pareto_front([(x, max(y, tol)) for x, y, _ in pts])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", alpha=0.4, linewidth=1.5,
            label="Pareto front (nothing keeps less state and is more accurate)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(_bytes_label))
    _annotate(ax, [(x, max(y, 1e-9), c["label"], styles(c["label"])["color"]) for x, y, c in pts])
    ax.set_xlabel(f"decoding state after n = {n} tokens (KV cache or recurrent state, log)")
    ax.set_ylabel("relative error vs full softmax, clustered inputs (log)")
    ax.set_title(f"Decoding: state kept vs error at n = {n} (causal)\n{_subtitle(doc)}", loc="left", fontsize=11)
    return _save_scatter(ax, fig, path, plt)


def make_plots(doc: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Write the PNG plots into ``out_dir``; returns their file names (plots with no data are left out)."""
    plt = _pyplot()
    out = Path(out_dir)
    made = []
    if any(c["status"] == "ok" for c in doc["results"]):
        sub = _subtitle(doc)
        _line_plot(doc, "time_s", "time per call (log)", f"Time per call vs sequence length\n{sub}",
                   _time_label, out / "time_vs_length.png", plt, guides=True)
        made.append("time_vs_length.png")
        if any(c["peak_memory_bytes"] for c in doc["results"]):
            _line_plot(doc, "peak_memory_bytes", "peak memory of one call (log)",
                       f"Peak memory vs sequence length\n{sub}", _bytes_label, out / "memory_vs_length.png", plt,
                       guides=False)
            made.append("memory_vs_length.png")
    if _pareto_plot(doc, out / "error_vs_time.png", plt):
        made.append("error_vs_time.png")
    if _state_plot(doc, out / "state_vs_error.png", plt):
        made.append("state_vs_error.png")
    if _sol_plot(doc, out / "speed_of_light.png", plt):
        made.append("speed_of_light.png")
    return made
