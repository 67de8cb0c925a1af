"""The registry of mechanisms: one record per mechanism, shared by the API, the CLI and the benchmarks.

A family registers its mechanisms when its module is imported. The list of family modules is below;
adding a family means adding one line to ``FAMILY_MODULES``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from attnkit.errors import UnknownMechanismError

__all__ = ["Mechanism", "register", "get", "list_mechanisms", "mechanism_info", "FAMILY_MODULES"]

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

# Shape arguments a caller (``nn.MultiheadAttention``, the benchmark) supplies to factories that declare them.
SHAPE_PARAMS = frozenset({"num_heads", "head_dim", "seq_len", "dim"})

# What a mechanism's callable maps (``Mechanism.kind``).
KINDS = ("attention", "mixer")


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

    def build(self, **params: Any) -> Callable[..., Any]:
        if params.get("causal") and not self.causal:
            from attnkit.errors import NotSupportedError

            raise NotSupportedError(
                f"mechanism {self.name!r} has no causal form (causal=True was given); "
                f"choose a mechanism listed with causal support by `attnkit list`"
            )
        return self.factory(**params)


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
