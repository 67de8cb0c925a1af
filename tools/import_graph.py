"""attnkit's import graph, read from the source (every ``import`` / ``from ... import`` of an attnkit module,
including the ones inside functions), with its cycles and the imports that go up a layer.

    python tools/import_graph.py            # cycles and upward imports; exit 1 if there is any
    python tools/import_graph.py --edges    # every edge, "a -> b  (line)"

The layers are ``LAYERS`` below (see docs/architecture.md); ``tests/test_layering.py`` runs the same check.
An edge ``a -> b`` is the import of ``b`` written in ``a``; ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``. Importing ``a.b.c`` also runs ``a/__init__`` and
``a.b/__init__``; those implicit edges are not counted (every module would otherwise depend on ``attnkit``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Layer of a module: the longest prefix in this table wins. Lower layers must not import higher ones.
LAYERS: dict[str, int] = {
    "attnkit.rotary": 1,
    "attnkit._version": 1,
    # 1. vocabulary: errors, input checks, patterns, score modifiers, normalisations, feature maps, testing
    "attnkit.errors": 1,
    "attnkit._checks": 1,
    "attnkit.patterns": 1,
    "attnkit.score_mods": 1,
    "attnkit.normalizations": 1,
    "attnkit.feature_maps": 1,
    "attnkit.testing": 1,
    # 2. kernels and their references, by family (pure functions on tensors)
    "attnkit.ops": 2,
    # 3. backends: adapters and the dispatch behind engine="auto"
    "attnkit.backends": 3,
    # 4. the public functional API over the dispatch
    "attnkit.functional": 4,
    # 5. modules (one file per family), decoding caches, distributed attention
    "attnkit.nn": 5,
    "attnkit.cache": 5,
    "attnkit.selective_cache": 5,
    "attnkit.paged_cache": 5,
    "attnkit.distributed": 5,
    # 6. the registry and its records (which name functions of 4 and modules of 5)
    "attnkit.registry": 1,
    "attnkit.records": 6,
    # 7. tools
    "attnkit.reporting": 7,
    "attnkit.analysis": 7,
    "attnkit.bench": 7,
    "attnkit.quality": 7,
    "attnkit.kvpolicy": 7,
    "attnkit.integrations": 7,
    "attnkit.cli": 7,
    # the package's face re-exports everything
    "attnkit": 8,
}
LAYER_NAMES = {1: "vocabulary", 2: "ops", 3: "backends", 4: "functional", 5: "nn", 6: "records", 7: "tools",
               8: "attnkit"}


def modules(src: Path = SRC) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``src/attnkit``."""
    out = {}
    for path in sorted((src / "attnkit").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int:
    best, layer = -1, None
    for prefix, value in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
            best, layer = len(prefix), value
    if layer is None:
        raise KeyError(f"{module} has no layer: add it to LAYERS in tools/import_graph.py")
    return layer


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The attnkit module ``name`` refers to (itself, or the closest package above it that exists)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(src: Path = SRC) -> dict[str, dict[str, int]]:
    """``{importer: {imported: first line}}`` over every attnkit import in the source."""
    known = modules(src)
    graph: dict[str, dict[str, int]] = {m: {} for m in known}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module or ""
                targets = [f"{pkg}.{alias.name}" if f"{pkg}.{alias.name}" in known else pkg for alias in node.names]
            for target in targets:
                if not (target == "attnkit" or target.startswith("attnkit.")):
                    continue
                resolved = _resolve(target, known)
                if resolved and resolved != mod:
                    graph[mod].setdefault(resolved, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def upward(graph: dict[str, dict[str, int]]) -> list[tuple[str, int, str, int, int]]:
    """``(importer, its layer, imported, its layer, line)`` for every import of a higher layer."""
    out = []
    for a, targets in sorted(graph.items()):
        for b, line in sorted(targets.items()):
            if layer_of(b) > layer_of(a):
                out.append((a, layer_of(a), b, layer_of(b), line))
    return out


def main(argv: list[str]) -> int:
    graph = edges()
    if "--edges" in argv:
        for a, targets in sorted(graph.items()):
            for b, line in sorted(targets.items()):
                print(f"{a} -> {b}  ({line})")
        return 0
    found = cycles(graph)
    up = upward(graph)
    print(f"{len(graph)} modules, {sum(len(t) for t in graph.values())} import edges")
    print(f"{len(found)} import cycles between files")
    for comp in found:
        print("  cycle: " + ", ".join(comp))
    print(f"{len(up)} imports of a higher layer")
    for a, la, b, lb, line in up:
        print(f"  {a} ({LAYER_NAMES[la]}) -> {b} ({LAYER_NAMES[lb]})  line {line}")
    return 1 if (found or up) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
