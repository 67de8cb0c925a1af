"""Backends: kernels that run one attnkit operation, each declaring what it supports as data.

A :class:`Backend` is one way to run an *operation* (``"attention"``: ``attnkit.attention``; ``"neighborhood"``:
``attnkit.neighborhood``; ``"linear"``: ``attnkit.linear_attention``; ``"gated"``: ``attnkit.gated_linear_attention``;
``"delta"``: ``attnkit.delta_rule_attention``). It declares, as data, the devices,
dtypes, head dims, patterns, score modifiers and normalisations it runs, the optional package it needs (an
extra such as ``attnkit[flex]`` is never imported until the backend is used) and its rank among the backends
of its operation per device type (lower runs first under ``engine="auto"``). One function,
``reasons(call) -> list[str]``, says why it cannot run a given call; dispatch, the error of a forced backend,
``attnkit backends`` and the generated conformance tests all read it (the capability model of xformers'
``fmha`` dispatch and NATTEN's ``can_run_*`` checks).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from attnkit.errors import NotSupportedError

__all__ = ["Backend", "register_backend", "get_backend", "list_backends", "backends", "select", "all_reasons",
           "format_table", "use_engine", "AUTO_ONLY_WHEN_NAMED", "OPERATIONS"]

OPERATIONS = ("attention", "neighborhood", "linear", "gated", "delta")
# Rank of a backend that ``engine="auto"`` never picks on that device (it runs only when named).
AUTO_ONLY_WHEN_NAMED = None


@dataclass(frozen=True)
class Backend:
    """What one backend runs and how.

    ``reasons(call)`` returns why the backend cannot run ``call`` (a dict of the operation's arguments, see
    each operation's module); an empty list means it can. ``run(call)`` runs it. ``rank`` maps a device type
    (``"cpu"``, ``"cuda"``) to the backend's place in ``engine="auto"``'s order there (lower first;
    ``None``: only when named). The descriptive fields (``patterns``, ``score_mods``, ``normalizations``,
    ``notes``) are what ``attnkit backends`` prints; ``reasons`` is the authority.
    """

    name: str
    operation: str
    summary: str
    reasons: Callable[[Mapping[str, Any]], list[str]]
    run: Callable[[Mapping[str, Any]], Any]
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    head_dims: tuple[int, int] = (1, 1 << 30)
    patterns: str = "any"
    score_mods: str = "any"
    normalizations: str = "softmax"
    rank: Mapping[str, int | None] = field(default_factory=dict)
    # Optional packages (import names; the first is the backend's own) and the pip extra that installs them.
    requires: str | tuple[str, ...] | None = None
    extra: str | None = None
    notes: str = ""

    # -- availability ------------------------------------------------------------------------------------
    def installed(self) -> bool:
        """Whether the optional packages are importable here (checked without importing them)."""
        return all(_find_spec(m) for m in self._modules())

    def _modules(self) -> tuple[str, ...]:
        return () if self.requires is None else (self.requires,) if isinstance(self.requires, str) else self.requires

    def missing(self) -> list[str]:
        return [m for m in self._modules() if not _find_spec(m)]

    def version(self) -> str | None:
        if self.requires is None:
            return torch.__version__
        if not self.installed():
            return None
        try:
            from importlib.metadata import version

            main = self._modules()[0]
            return version(_DIST_NAMES.get(main, main))
        except Exception:  # noqa: BLE001 - a package without metadata still runs
            return "unknown"

    def usable_devices(self) -> list[str]:
        """Device types present here on which this backend can run (empty if its package is missing)."""
        if not self.installed():
            return []
        here = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        return [d for d in self.devices if d in here]

    def not_supported_reasons(self, call: Mapping[str, Any]) -> list[str]:
        """Every reason this backend cannot run ``call`` (device, dtype and head dim first, then its own)."""
        why: list[str] = []
        if not self.installed():
            why.append(f"package {', '.join(self.missing())} not installed (pip install 'attnkit[{self.extra}]')")
            return why
        device: torch.device = call["device"]
        if device.type not in self.devices:
            why.append(f"device {device.type!r} (runs on {', '.join(self.devices)})")
        dtype = call["dtype"]
        if dtype not in self.dtypes:
            why.append(f"dtype {dtype} (supports {', '.join(str(d).replace('torch.', '') for d in self.dtypes)})")
        for name in ("head_dim", "head_dim_v"):
            d = call.get(name)
            if d is not None and not self.head_dims[0] <= d <= self.head_dims[1]:
                why.append(f"{name.replace('_', ' ')} {d} (supports {self.head_dims[0]}..{self.head_dims[1]})")
        if not why:
            why.extend(self.reasons(call))
        return why

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly record: what ``attnkit backends`` lists."""
        return {
            "name": self.name, "operation": self.operation, "summary": self.summary,
            "installed": self.installed(), "version": self.version(), "extra": self.extra,
            "devices": list(self.devices), "usable_devices": self.usable_devices(),
            "dtypes": [str(d).replace("torch.", "") for d in self.dtypes],
            "head_dims": list(self.head_dims), "patterns": self.patterns, "score_mods": self.score_mods,
            "normalizations": self.normalizations,
            "auto_rank": {k: v for k, v in self.rank.items()}, "notes": self.notes,
        }


_DIST_NAMES = {"flash_attn": "flash-attn", "fla": "fla-core", "natten": "natten", "triton": "triton"}


@functools.cache
def _find_spec(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def import_optional(module: str, extra: str):
    """Import an optional package the first time a backend runs, with an error that names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NotSupportedError(f"{module} is not importable here ({exc}); install it with "
                                f"pip install 'attnkit[{extra}]'") from exc


_BACKENDS: dict[str, dict[str, Backend]] = {op: {} for op in OPERATIONS}
_loaded = False


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to its operation's table (a name is registered once per operation)."""
    if backend.operation not in OPERATIONS:
        raise ValueError(f"backend {backend.name!r}: operation must be one of {OPERATIONS}, got {backend.operation!r}")
    table = _BACKENDS[backend.operation]
    if backend.name in table and table[backend.name] is not backend:
        raise ValueError(f"a {backend.operation} backend named {backend.name!r} is already registered")
    table[backend.name] = backend
    _invalidate()
    return backend


def _invalidate() -> None:
    from attnkit.backends.keys import invalidate

    invalidate()


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("attnkit.backends.catalog")


def get_backend(operation: str, name: str) -> Backend:
    _load()
    try:
        return _BACKENDS[operation][name]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS.get(operation, {})))
        raise ValueError(f"no {operation} backend named {name!r}; choose 'auto' or one of: {known}") from None


def list_backends(operation: str | None = None) -> list[Backend]:
    """Registered backends (of one operation), in ``engine="auto"`` order on CUDA then by name."""
    _load()
    ops = OPERATIONS if operation is None else (operation,)
    out = []
    for op in ops:
        table = _BACKENDS[op]
        out.extend(sorted(table.values(), key=lambda b: (_rank_key(b, "cuda"), b.name)))
    return out


def _rank_key(b: Backend, device_type: str) -> float:
    r = b.rank.get(device_type)
    return float("inf") if r is None else r


def backends(operation: str | None = None) -> list[dict[str, Any]]:
    """What is installed and usable here: one record per backend (``attnkit backends`` prints these)."""
    return [b.describe() for b in list_backends(operation)]


def _span(dims: list[int]) -> str:
    return "any" if dims[1] >= 1 << 30 else f"{dims[0]}..{dims[1]}"


def format_table(records: list[dict[str, Any]]) -> str:
    """``attnkit backends``' table: one line per backend, then what each supports."""
    header = ("operation", "backend", "installed", "usable here", "auto cpu/cuda", "summary")
    rows = []
    for r in records:
        inst = (r["version"] or "yes") if r["installed"] else f"no: pip install 'attnkit[{r['extra']}]'"
        rank = "/".join("-" if r["auto_rank"].get(d) is None else str(r["auto_rank"][d]) for d in ("cpu", "cuda"))
        rows.append((r["operation"], r["name"], inst, ", ".join(r["usable_devices"]) or "-", rank, r["summary"]))
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in [header] + rows]
    lines.append("")
    for r in records:
        lines.append(f"{r['operation']}/{r['name']}: devices {', '.join(r['devices'])}; "
                     f"dtypes {', '.join(r['dtypes'])}; "
                     f"head dims {_span(r['head_dims'])}; patterns: {r['patterns']}; "
                     f"score mods: {r['score_mods']}; normalisations: {r['normalizations']}"
                     + (f"; {r['notes']}" if r["notes"] else ""))
    lines.append("\nauto: the lowest rank on the call's device that supports the call runs ('-': only when named).")
    return "\n".join(lines)


_FORCED: dict[str, str] = {}


@contextlib.contextmanager
def use_engine(operation: str, name: str) -> Iterator[None]:
    """Within the block, ``engine="auto"`` calls of ``operation`` run ``name`` (raising ``NotSupportedError`` if it
    cannot run a call): measures a mechanism built by the registry through one backend (``attnkit bench
    --engines``) without changing its factory."""
    get_backend(operation, name)  # validate the name now
    old = _FORCED.get(operation)
    _FORCED[operation] = name
    try:
        yield
    finally:
        if old is None:
            _FORCED.pop(operation, None)
        else:
            _FORCED[operation] = old


def select(operation: str, engine: str, call: Mapping[str, Any]) -> Backend:
    """The backend that runs ``call``: the named one (raising ``NotSupportedError`` with its reasons if it cannot)
    or, for ``"auto"``, the first by rank on the call's device that can."""
    _load()
    table = _BACKENDS[operation]
    if engine == "auto" and operation in _FORCED:
        engine = _FORCED[operation]
    if engine != "auto":
        if not isinstance(engine, str) or engine not in table:
            raise ValueError(f"engine must be one of {('auto', *table)} for {operation}, got {engine!r}")
        b = table[engine]
        why = b.not_supported_reasons(call)
        if why:
            raise NotSupportedError(f"engine={engine!r} cannot run this {operation} call", {engine: why})
        return b
    call = dict(call, auto=True)
    device_type = call["device"].type
    order = sorted(table.values(), key=lambda b: (_rank_key(b, device_type), b.name))
    reasons: dict[str, list[str]] = {}
    for b in order:
        why = b.not_supported_reasons(call)
        if b.rank.get(device_type) is None:
            why = why + [f"not chosen automatically on {device_type} (name it with engine={b.name!r})"]
        if not why:
            return b
        reasons[b.name] = why
    raise NotSupportedError(f"no {operation} backend can run this call on {device_type}", reasons)


def all_reasons(operation: str, call: Mapping[str, Any]) -> dict[str, list[str]]:
    """For each backend of ``operation``, why it cannot run ``call`` (empty: it can)."""
    _load()
    return {name: b.not_supported_reasons(call) for name, b in _BACKENDS[operation].items()}
