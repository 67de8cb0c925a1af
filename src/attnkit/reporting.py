"""What the reports of ``attnkit bench``, ``attnkit quality`` and ``attnkit analyze`` share: tables in text,
Markdown and HTML, the HTML style sheet, and loading matplotlib for files only."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["text_table", "md_table", "html_table", "CSS", "MissingMatplotlib", "pyplot", "fmt_bytes", "bytes_label",
           "QUALITY_BEGIN", "QUALITY_END", "splice_section", "write_text_atomic", "line_panels"]

# The markers around the "Quality" section that `attnkit quality` writes into the report `attnkit bench` writes
# (each command keeps the other's part when it rewrites the report).
QUALITY_BEGIN = "<!-- attnkit-quality:begin -->"
QUALITY_END = "<!-- attnkit-quality:end -->"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f4f4f4}
td.bad{color:#b00;font-weight:600} td.muted{color:#999}
img{max-width:100%;border:1px solid #eee;margin-top:1em}
figcaption{color:#555;font-style:italic;margin-bottom:1.5em}
code{background:#f4f4f4;padding:1px 4px}
div.wide{overflow-x:auto;max-width:100%}
table.decide td,table.decide th{text-align:left;vertical-align:top} table.decide small{color:#666}
table.decide td:first-child{min-width:230px} table.decide td{min-width:120px}
"""


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    right = [i >= 3 for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(x: str) -> str:
        return str(x).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cls(x: str) -> str:
        return {"FAILED": "bad", "OOM": "bad", "skip": "muted", "n/a": "muted", "differs": "bad"}.get(x, "")

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls(c)}">{html.escape(str(c))}</td>' for c in r) + "</tr>" for r in rows)
    # Wide tables scroll inside the page instead of overflowing it.
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


class MissingMatplotlib(ImportError):
    pass


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingMatplotlib(
            "the plots need matplotlib, which is not installed: pip install 'attnkit[bench]' "
            "(or pip install matplotlib); tables, JSON and CSV were written without plots") from exc
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def bytes_label(b: float, _pos: Any = None) -> str:
    """A plot axis's tick label for a number of bytes (a matplotlib ``FuncFormatter`` function)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:g} {unit}"
    return f"{b:g} B"


def line_panels(path: Any, panels: Sequence[tuple[str, dict[str, Sequence[tuple[float, float]]]]], *,
                xlabel: str, ylabel: str, title: str = "", logx: bool = False, ylim: tuple[float, float] | None = None,
                percent: bool = False) -> None:
    """One PNG at ``path``: a row of panels ``(panel title, {series label: [(x, y), ...]})``, one line with markers
    per series (the same colour for a label in every panel), a shared legend. ``percent``: y values are fractions
    shown as %. Raises :class:`MissingMatplotlib` without matplotlib."""
    plt = pyplot()
    labels = list(dict.fromkeys(label for _, series in panels for label in series))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colours = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1.8, 3.8), squeeze=False)
    for ax, (panel_title, series) in zip(axes[0], panels):
        for label, points in series.items():
            pts = sorted((x, y) for x, y in points if y is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, [100 * y for y in ys] if percent else ys, marker="o", ms=4, lw=1.5, label=label,
                    color=colours[label])
        if logx:
            ax.set_xscale("log", base=2)
        xticks = sorted({x for points in series.values() for x, _ in points})
        if xticks:
            ax.set_xticks(xticks)
            ax.set_xticklabels([f"{x:g}" for x in xticks])
            ax.minorticks_off()
        if ylim is not None:
            ax.set_ylim(*(100 * v for v in ylim) if percent else ylim)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel + (" (%)" if percent else ""))
    handles = [plt.Line2D([], [], color=colours[label], marker="o", label=label) for label in labels]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def splice_section(existing: str | None, section: str, *, html_doc: bool = False) -> str:
    """``existing`` with the text between the markers replaced by ``section`` (which includes the markers), or
    ``section`` appended (before ``</body>`` in HTML); a new document when ``existing`` is ``None``."""
    if existing is None:
        if html_doc:
            return ("<!doctype html><html><head><meta charset='utf-8'><title>attnkit report</title>"
                    f"<style>{CSS}</style></head><body><h1>attnkit report</h1>\n{section}\n</body></html>\n")
        return f"# attnkit report\n\n{section}\n"
    pattern = re.compile(re.escape(QUALITY_BEGIN) + r".*?" + re.escape(QUALITY_END), re.DOTALL)
    if pattern.search(existing):
        return pattern.sub(lambda _m: section, existing, count=1)
    if html_doc:
        idx = existing.lower().rfind("</body>")
        if idx >= 0:
            return existing[:idx] + section + "\n" + existing[idx:]
    return existing.rstrip("\n") + "\n\n" + section + "\n"


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp`` and a rename: an interrupted or failed write (Ctrl-C, a
    full disk) leaves the previous file, never a truncated one, and no ``.tmp`` behind."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:  # named after the file the user asked for, not the temporary one
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
