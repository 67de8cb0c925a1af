"""Where each registered record's definition came from (``Mechanism.source``, issue 25) and
docs/faithfulness.md, the table of the seed's entries: every name it gives exists, every record is in it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import attnkit
from attnkit.registry import SOURCES, Mechanism, check_source, register, source_kind

DOC = Path(__file__).resolve().parents[1] / "docs" / "faithfulness.md"
STATUSES = ("faithful", "partial", "missing", "out of scope")


def _tables() -> list[list[list[str]]]:
    """The doc's markdown tables: lists of rows of cells (header and rule rows dropped)."""
    tables, current = [], None
    for line in DOC.read_text().splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
                continue  # the header
            if set("".join(cells)) <= set("-: "):
                continue
            current.append(cells)
        else:
            current = None
    return tables


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _entry_rows() -> list[list[str]]:
    return next(t for t in _tables() if t and re.fullmatch(r"[A-H]\d+", t[0][0]))


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_record_says_where_its_definition_came_from():
    records = attnkit.list_mechanisms()
    assert len(records) >= 130
    for m in records:
        assert check_source(m.source, m.name) == m.source
        assert m.source in SOURCES or m.source.startswith("deviation: ")
        assert "source" not in m.extras, f"{m.name}: the source is the record's field, not an extra"
    kinds = {source_kind(m.source) for m in records}
    assert kinds == {"paper", "paper+catalogue", "deviation"}
    # The records that substitute something for the paper's method say so (issue 25's audit, main today).
    by_name = {m.name: m for m in records}
    assert by_name["extractor"].source.startswith("deviation:")
    assert by_name["karat"].source.startswith("deviation:") and by_name["fourier_karat"].source == "paper"
    assert by_name["dformer_3d"].source == "paper"


@pytest.mark.parametrize("source", ["", "papers", "catalogue", "deviation:", "deviation: tbd", None, 1])
def test_register_refuses_a_record_without_a_valid_source(source):
    m = Mechanism("test_provenance_bad", "test", "(test)", True, "O(n^2 d)", False, lambda causal=False: None,
                  source=source)
    with pytest.raises(ValueError, match="source must say where its definition came from"):
        register(m)
    assert "test_provenance_bad" not in {r.name for r in attnkit.list_mechanisms()}


def test_faithfulness_table_counts_and_statuses():
    rows = _entry_rows()
    assert len(rows) == 135 and len({r[0] for r in rows}) == 135
    statuses = [r[4] for r in rows]
    assert set(statuses) <= set(STATUSES)
    in_scope = [s for s in statuses if s != "out of scope"]
    assert len(in_scope) == 126
    head = DOC.read_text().split("\n\n")[1]
    for status in ("faithful", "partial", "missing"):
        assert f"**{statuses.count(status)} {status}**" in head, status
    for r in rows:  # anything not faithful says why; anything faithful names what implements it
        if r[4] != "faithful":
            assert len(r[5]) > 20, r[0]
        else:
            assert _names(r[2]) or _names(r[3]), r[0]


def test_every_name_in_the_faithfulness_table_exists_and_every_record_is_listed():
    registered = {m.name for m in attnkit.list_mechanisms()}
    mentioned = set()
    for row in _entry_rows():
        for name in _names(row[2]):
            assert name in registered, f"docs/faithfulness.md {row[0]}: no record named {name!r}"
            mentioned.add(name)
        for dotted in _names(row[3]):
            assert dotted.startswith("attnkit."), dotted
            _resolve(dotted)  # raises if the function or class does not exist
    others = [t for t in _tables() if t and t[0][0].startswith("`")]
    assert len(others) == 2  # records outside the seed's entries; records whose source is a deviation
    for table in others:
        for row in table:
            (name,) = _names(row[0])
            assert name in registered, f"docs/faithfulness.md: no record named {name!r}"
            mentioned.add(name)
    assert registered <= mentioned, f"records missing from docs/faithfulness.md: {sorted(registered - mentioned)}"
    deviations = {_names(r[0])[0] for r in others[1]}
    for m in attnkit.list_mechanisms():
        if m.source.startswith("deviation:"):
            assert m.name in deviations, f"{m.name}'s deviation is not listed in docs/faithfulness.md"
