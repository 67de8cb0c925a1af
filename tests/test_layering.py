"""One direction of dependency (issue 26, docs/architecture.md): no import cycle between attnkit's files and no
import of a higher layer, read from the source's imports (those inside functions included) by
``tools/import_graph.py``, whose ``LAYERS`` table is the one definition of the layers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location("attnkit_import_graph", ROOT / "tools" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


G = _load_tool()


@pytest.fixture(scope="module")
def graph():
    return G.edges()


def test_every_module_has_a_layer(graph):
    missing = []
    for module in graph:
        try:
            G.layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"add these modules to LAYERS in tools/import_graph.py: {missing}"


def test_no_import_cycle_between_files(graph):
    found = G.cycles(graph)
    assert not found, "import cycles between files:\n" + "\n".join("  " + ", ".join(c) for c in found)


def test_no_import_of_a_higher_layer(graph):
    up = G.upward(graph)
    assert not up, "imports of a higher layer (see docs/architecture.md):\n" + "\n".join(
        f"  {a} ({G.LAYER_NAMES[la]}) -> {b} ({G.LAYER_NAMES[lb]}), line {line}" for a, la, b, lb, line in up)


def test_registry_loads_only_record_modules():
    """The registry (vocabulary) reaches up by name only to the record modules, the one deliberate exception."""
    from attnkit.registry import FAMILY_MODULES

    assert FAMILY_MODULES and all(m.startswith("attnkit.records.") for m in FAMILY_MODULES)
    assert all(G.layer_of(m) == G.LAYERS["attnkit.records"] for m in FAMILY_MODULES)


# The checker itself must see what it claims to see: a cycle through a lazy import and an upward relative import.
def _fake_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "attnkit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    src = _fake_tree(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "ops/__init__.py": "",
        "ops/a.py": "from attnkit.ops import b\n",
        "ops/b.py": "def f():\n    from attnkit.ops.a import x\n",
    })
    graph = G.edges(src)
    assert G.cycles(graph) == [["attnkit.ops.a", "attnkit.ops.b"]]
    assert G.upward(graph) == []


def test_checker_finds_an_upward_relative_import(tmp_path):
    src = _fake_tree(tmp_path, {
        "__init__.py": "",
        "ops/__init__.py": "",
        "ops/k.py": "def f():\n    from ..nn import m\n",
        "nn/__init__.py": "",
        "nn/m.py": "import attnkit.ops.k\n",
    })
    graph = G.edges(src)
    assert graph["attnkit.ops.k"] == {"attnkit.nn.m": 2}
    assert graph["attnkit.nn.m"] == {"attnkit.ops.k": 1}
    up = G.upward(graph)
    assert [(a, b) for a, _, b, _, _ in up] == [("attnkit.ops.k", "attnkit.nn.m")]
