"""The registry of mechanisms: one record per mechanism, shared by the API, the CLI and the benchmarks.

A family registers its mechanisms when its module is imported. The list of family modules is below;
adding a family means adding one line to ``FAMILY_MODULES``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from attnkit.errors import UnknownMechanismError

__all__ = ["Mechanism", "register", "get", "list_mechanisms", "mechanism_info", "FAMILY_MODULES", "REQUIRED",
           "SOURCES", "check_source", "source_kind"]

# Modules whose import registers a family's mechanisms (imported lazily, once).
FAMILY_MODULES: tuple[str, ...] = (
    "attnkit.records.exact",
    "attnkit.records.neighborhood",
    "attnkit.records.linear",
    "attnkit.records.approx",
    "attnkit.records.approx_retrieval",
    "attnkit.records.longctx",
    "attnkit.records.mixers",
)

# ``Mechanism.source``: where a record's definition came from (or ``"deviation: <what and why>"``).
SOURCES = ("paper", "paper+catalogue")
_DEVIATION = "deviation:"


def check_source(source: Any, name: str = "?") -> str:
    """``source`` if it is a valid ``Mechanism.source`` (see ``SOURCES``); raises ``ValueError`` otherwise."""
    if isinstance(source, str) and (source in SOURCES or (
            source.startswith(_DEVIATION) and len(source[len(_DEVIATION):].strip()) >= 10)):
        return source
    raise ValueError(
        f"mechanism {name!r}: source must say where its definition came from: 'paper' (checked against the full "
        f"paper), 'paper+catalogue' (the paper where reachable, the catalogue's reading elsewhere) or "
        f"'deviation: <what differs from the paper, and why>'; got {source!r}")


def source_kind(source: str) -> str:
    """The short form of a source for tables: ``"paper"``, ``"paper+catalogue"`` or ``"deviation"``."""
    return "deviation" if source.startswith(_DEVIATION) else source


# Shape arguments a caller (``nn.MultiheadAttention``, the benchmark) supplies to factories that declare them.
SHAPE_PARAMS = frozenset({"num_heads", "head_dim", "seq_len", "dim"})

# What a mechanism's callable maps (``Mechanism.kind``).
KINDS = ("attention", "mixer")

# ``Mechanism.parameters()``: the value of a parameter without a default.
REQUIRED = inspect.Parameter.empty

# Names that are inputs of the built callable, not parameters of the factory.
_NOT_PARAMS = frozenset({"self", "q", "k", "v", "x", "query", "key", "value"})


def _signature_params(fn: Any, depth: int = 0) -> dict[str, Any]:
    """The keyword parameters ``fn`` takes (name -> default, ``REQUIRED`` where none), following a factory
    that forwards ``**params`` into the callables (functions, classes) its closure holds, two levels deep."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    forwards = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            forwards = True
        elif p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) and p.name not in _NOT_PARAMS:
            out[p.name] = p.default
    if forwards and depth < 2:
        for cell in getattr(getattr(fn, "__closure__", None), "__iter__", lambda: iter(()))():
            try:
                inner = cell.cell_contents
            except ValueError:
                continue
            if callable(inner) and getattr(inner, "__module__", "").startswith("attnkit"):
                for name, default in _signature_params(inner, depth + 1).items():
                    if name not in _INTERNAL:  # helpers' own shape arguments (the record's needs list those)
                        out.setdefault(name, default)
    return out


# Arguments internal helpers take that are not the user's to give (shapes come from ``needs``).
_INTERNAL = SHAPE_PARAMS | {"heads", "kv_len", "q_len"}

# A parameter whose default the record does not state (it forwards to a constructor that computes it).
class _Unstated:
    def __repr__(self) -> str:
        return "..."


UNSTATED = _Unstated()
_BUILT_PARAMS: dict[str, dict[str, Any]] = {}


def _built_params(m: Mechanism) -> dict[str, Any]:
    """The constructor parameters of what ``m`` builds, found by building it once at a tiny shape (for
    factories that forward ``**params`` to a class chosen at call time); {} when that fails."""
    if m.name not in _BUILT_PARAMS:
        import torch

        shapes = {"num_heads": 2, "head_dim": 8, "seq_len": 16, "dim": 16}
        out: dict[str, Any] = {}
        try:
            with torch.random.fork_rng(devices=[]):
                built = m.factory(**{**dict(m.small_params), **{k: shapes[k] for k in m.needs}})
            if type(built).__module__.startswith("attnkit"):
                out = {k: v for k, v in _signature_params(type(built)).items() if k not in _INTERNAL}
                for name in getattr(type(built), "accepted_params", ()):  # what its **kwargs take
                    out.setdefault(name, UNSTATED)
                fmap = getattr(built, "feature_map", None)  # linear attention: the feature map's own options
                if fmap is not None and type(fmap).__module__.startswith("attnkit"):
                    for name, default in _signature_params(type(fmap)).items():
                        if name not in _INTERNAL and default is not REQUIRED:
                            out.setdefault(name, default)
        except Exception:
            out = {}
        _BUILT_PARAMS[m.name] = out
    return _BUILT_PARAMS[m.name]


@dataclass(frozen=True)
class Mechanism:
    """What attnkit knows about one attention mechanism.

    ``factory(**params)`` returns a callable (an ``nn.Module`` when the mechanism owns parameters). Every
    factory accepts ``causal: bool = False``; factories that need shapes list them in ``needs`` (a subset of
    ``{"num_heads", "head_dim", "seq_len", "dim"}``).

    ``kind`` says what the callable maps:

    - ``"attention"``: ``(q, k, v) -> out``, ``q [batch, heads, q_len, dim]``, ``k, v [batch, heads, kv_len, dim]``
      (``dim_v`` for ``v``), ``out [batch, heads, q_len, dim_v]``.
    - ``"mixer"``: an attention-free token mixer ``x [batch, seq, channels] -> [batch, seq, channels]`` (or
      ``[batch, *spatial, channels]``), built with ``dim=channels`` (list ``"dim"`` in ``needs``).

    The conformance suite (``tests/test_conformance.py``) runs every record: shapes, dtypes, gradients, bad
    input, and agreement with ``reference`` where one is given.
    """

    name: str
    family: str
    paper: str
    exact: bool
    complexity: str
    causal: bool
    factory: Callable[..., Callable[..., Any]]
    summary: str = ""
    needs: tuple[str, ...] = ()
    # Parameters the benchmark uses by default (e.g. number of features); users override them.
    bench_params: Mapping[str, Any] = field(default_factory=dict)
    # Include in `attnkit bench`'s default selection.
    in_default_bench: bool = False
    # Longest sequence the default benchmark runs it at (None: no limit beyond the run's own).
    max_bench_len: int | None = None
    # Forward FLOPs: flops(batch=, heads=, q_len=, kv_len=, head_dim=, causal=, **params) -> float.
    # None: the benchmark counts dense attention's 4 * b * h * q_len * kv_len * head_dim (halved if causal).
    flops: Callable[..., float] | None = None
    # Extra facts a report may show (e.g. state size in bytes, speed-of-light ratio).
    extras: Mapping[str, Any] = field(default_factory=dict)
    # See the class docstring.
    kind: str = "attention"
    # The plain reference, ``reference(built, *inputs, **params) -> out``: the same computation materialised or
    # looped, given the object ``factory(**params)`` returned (so a module's reference uses its weights).
    reference: Callable[..., Any] | None = None
    # Parameters for short sequences (tests, the quality benchmark); ``bench_params`` when empty.
    small_params: Mapping[str, Any] = field(default_factory=dict)
    # ``example_inputs(batch=, seq_len=, dtype=, seed=, **shape) -> tuple`` of input tensors, for mechanisms whose
    # inputs are not the default ``(q, k, v)`` / ``x`` (e.g. 2-D mixers, inputs with positions).
    example_inputs: Callable[..., tuple] | None = None
    # False where the output is random by design (features resampled per call): tests then seed before each call.
    deterministic: bool = True
    # Multiplier of ``attnkit.testing``'s per-dtype tolerance when comparing with ``reference``.
    tolerance_scale: float = 1.0
    # Devices it runs on (every built-in mechanism is plain PyTorch; `attnkit backends` lists faster kernels).
    devices: tuple[str, ...] = ("cpu", "cuda")
    # Where the definition came from (required; checked by ``register``): ``"paper"`` (checked against the full
    # paper's equations), ``"paper+catalogue"`` (the paper where its text was reachable, the catalogue's reading
    # of it elsewhere) or ``"deviation: <what differs from the paper, and why>"``. Shown by `attnkit list`.
    source: str = ""

    def parameters(self) -> dict[str, Any]:
        """The keyword parameters ``build`` accepts: name -> default (``REQUIRED`` where there is none). Shape
        arguments in ``needs`` are required (``MultiheadAttention`` and the benchmark supply them); parameters
        read from the factory's signature (and, for factories that forward ``**params``, from the callables they
        forward to) and from ``bench_params`` / ``small_params``."""
        out: dict[str, Any] = {name: REQUIRED for name in self.needs}
        found = _signature_params(self.factory)
        try:
            own = [p for p in inspect.signature(self.factory).parameters.values()
                   if p.kind is not p.VAR_KEYWORD and p.name != "causal" and p.name not in SHAPE_PARAMS]
        except (TypeError, ValueError):
            own = []
        if not own:  # a factory that forwards everything: its parameters are the built object's optional ones
            found.update({k: v for k, v in _built_params(self).items() if k not in found and v is not REQUIRED})
        for name, default in found.items():
            if name in self.needs:
                continue
            if name in SHAPE_PARAMS and default is REQUIRED:
                default = None  # a shape the factory takes when given (or reads from its inputs)
            out[name] = default
        for source in (self.small_params, self.bench_params):
            for name in source:
                out.setdefault(name, UNSTATED)
        out.setdefault("causal", False)
        return out

    def describe_parameters(self) -> str:
        """``"required: dim; optional: window=16, causal=False"`` (for messages and `attnkit list`)."""
        params = self.parameters()
        req = [n for n, d in params.items() if d is REQUIRED]
        opt = [n if d is UNSTATED else f"{n}={d!r}" for n, d in params.items() if d is not REQUIRED]
        parts = []
        if req:
            parts.append("required: " + ", ".join(req))
        if opt:
            parts.append("optional: " + ", ".join(opt))
        return "; ".join(parts)

    def build(self, **params: Any) -> Callable[..., Any]:
        if params.get("causal") and not self.causal:
            from attnkit.errors import NotSupportedError

            raise NotSupportedError(
                f"mechanism {self.name!r} has no causal form (causal=True was given); "
                f"choose a mechanism listed with causal support by `attnkit list`"
            )
        try:
            return self.factory(**params)
        except TypeError as exc:
            bad = _unexpected_names(str(exc), params, self.parameters())
            if not bad:
                raise
            accepted = sorted(self.parameters())
            close = [c for b in bad for c in difflib.get_close_matches(b, accepted, n=1, cutoff=0.6)]
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            inner = "" if "<lambda>" in str(exc) else f" [{exc}]"  # the constructor's own words, when useful
            raise TypeError(
                f"mechanism {self.name!r}: unknown parameters {', '.join(map(repr, bad))}{hint}; "
                f"it accepts {self.describe_parameters()}{inner}") from None


def _unexpected_names(message: str, given: Mapping[str, Any], known: Mapping[str, Any]) -> list[str]:
    """The given keyword names a factory's ``TypeError`` complains about ("unexpected keyword argument 'x'",
    "unknown parameters ['x']") that the record does not list as parameters."""
    if not re.search(r"unexpected keyword|unexpected param|unknown param", message):
        return []
    named = set(re.findall(r"'([A-Za-z_][A-Za-z0-9_]*)'", message))
    return [name for name in given if name in named and name not in known] or \
        ([name for name in given if name not in known] if not named else [])


_REGISTRY: dict[str, Mechanism] = {}
_loaded = False


def register(mechanism: Mechanism) -> Mechanism:
    """Add ``mechanism`` to the registry; a name can be registered once."""
    if mechanism.name in _REGISTRY and _REGISTRY[mechanism.name] is not mechanism:
        raise ValueError(f"a mechanism named {mechanism.name!r} is already registered")
    if mechanism.kind not in KINDS:
        raise ValueError(f"mechanism {mechanism.name!r}: kind must be one of {KINDS}, got {mechanism.kind!r}")
    unknown = set(mechanism.needs) - SHAPE_PARAMS
    if unknown:
        raise ValueError(f"mechanism {mechanism.name!r}: unknown entries in needs: {sorted(unknown)}")
    check_source(mechanism.source, mechanism.name)
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def mechanism_info(name: str) -> Mechanism:
    """The registry record of ``name``; raises :class:`~attnkit.errors.UnknownMechanismError` (a ``ValueError``
    and a ``KeyError``) naming the closest registered names and listing all of them."""
    _load_families()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise UnknownMechanismError(
            f"no mechanism named {name!r}; {hint}known mechanisms: {', '.join(known)}") from None


def get(name: str, **params: Any) -> Callable[..., Any]:
    """Build mechanism ``name`` with ``params``; returns a callable ``(q, k, v) -> out``.

    Example: ``attnkit.get("sliding_window", window=128, causal=True)(q, k, v)``.
    """
    return mechanism_info(name).build(**params)


def list_mechanisms(family: str | None = None) -> list[Mechanism]:
    """All registered mechanisms (optionally of one family), sorted by family then name."""
    _load_families()
    items = [m for m in _REGISTRY.values() if family is None or m.family == family]
    return sorted(items, key=lambda m: (m.family, m.name))
