"""Cached dispatch: ``engine="auto"``'s decision remembered by the call's structure, and ``attnkit.explain``.

Choosing a backend reads every backend's ``reasons`` (tens of microseconds of Python per call), and the flex
engine's ``BlockMask`` costs more to build; both depend only on the call's *structure*: the shapes, dtype and
device of q, k, v, whether gradients are needed, the operation's options and the identity of the pattern and
score modifier. :func:`structure_key` gives patterns a key by their parameters (``sliding_window(16)`` and
``sliding_window(32)`` differ; two separately built ``sliding_window(16)`` are equal), with small host tensors
a pattern holds keyed by value and larger or device tensors and functions by identity (a pattern's tensors must
not be changed in place after its first call); a cache entry keeps the objects it was computed for alive, so an
identity in a key is never reused by another object while the entry exists.

The decision cache is invalidated (:func:`invalidate`) whenever what ``reasons`` read can change: a backend is
registered, FlexAttention fails to compile a pattern (flex then refuses it), or ``use_engine`` forces a backend.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attnkit.backends import base as _base
from attnkit.patterns import Pattern

__all__ = ["structure_key", "cached_select", "invalidate", "explain", "Explanation", "DECISION_CACHE_SIZE"]

# Distinct call structures remembered (each entry: a key tuple and the objects it holds).
DECISION_CACHE_SIZE = 256
_KEY_ATTR = "_attnkit_structure_key"
# Host tensors up to this many elements held by a pattern are keyed by value, larger ones by identity.
SMALL_TENSOR = 256
_DECISIONS: OrderedDict = OrderedDict()
_EPOCH = [0]


def invalidate() -> None:
    """Forget every cached decision (the backends' reasons may have changed)."""
    _EPOCH[0] += 1
    _DECISIONS.clear()


def _value_key(v: Any, holders: list) -> Hashable:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return ("nan",) if math.isnan(v) else v
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, *(_value_key(x, holders) for x in v))
    if isinstance(v, torch.dtype | torch.device):
        return str(v)
    if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.numel() <= SMALL_TENSOR:
        # small host tensors (lengths, token indices) by value: rebuilt patterns with equal ones share entries
        return ("tensor", str(v.dtype), tuple(v.shape), tuple(v.reshape(-1).tolist()))
    if isinstance(v, Pattern):
        return structure_key(v, holders)
    holders.append(v)  # tensors, functions, modules: by identity, kept alive by the entry
    return ("id", type(v).__name__, id(v))


class _Key:
    """A structure key with its hash computed once (keys are nested tuples; a pattern's key object is cached on
    the pattern, so repeated lookups compare by identity and hash in O(1))."""

    __slots__ = ("key", "_hash")

    def __init__(self, key: tuple):
        self.key, self._hash = key, hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, _Key) and self._hash == other._hash and self.key == other.key)

    def __repr__(self) -> str:
        return f"_Key({self.key!r})"


def structure_key(obj: Any, holders: list | None = None) -> Hashable:
    """A hashable key of a pattern (by its parameters; held tensors and functions by identity), a score
    modifier or any other object (by identity). Objects keyed by identity are appended to ``holders`` (the
    caller keeps them alive as long as the key is in use)."""
    holders = [] if holders is None else holders
    if obj is None:
        return None
    if not isinstance(obj, Pattern):
        holders.append(obj)
        return ("id", type(obj).__name__, id(obj))
    cached = obj.__dict__.get(_KEY_ATTR)
    if cached is not None:
        holders.append(obj)  # the cached key may name identities this pattern holds
        return cached
    mine: list = []
    key = (type(obj).__qualname__,) + tuple(
        (name, _value_key(val, mine)) for name, val in sorted(vars(obj).items())
        if name != _KEY_ATTR and not (name.startswith("_cache") or name.startswith("_memo")))
    key = _Key(key)
    obj.__dict__[_KEY_ATTR] = key
    holders.append(obj)
    holders.extend(mine)
    return key


def cached_select(operation: str, engine: str, key: Hashable, make_call: Callable[[], Mapping[str, Any]],
                  holders: list) -> str:
    """The name of the backend ``attnkit.backends.select`` picks for a call of this structure, computed once.

    ``key`` must hold everything the backends' ``reasons`` read (see each operation's caller); ``holders`` are
    the objects whose identities ``key`` names (kept alive by the entry). A refused call raises each time."""
    full = (operation, engine, _base._FORCED.get(operation), _EPOCH[0], key)
    hit = _DECISIONS.get(full)
    if hit is not None:
        _DECISIONS.move_to_end(full)
        return hit[0]
    name = _base.select(operation, engine, make_call()).name
    _DECISIONS[full] = (name, holders)
    while len(_DECISIONS) > DECISION_CACHE_SIZE:
        _DECISIONS.popitem(last=False)
    return name


def needs_grad(tensors, mod=None) -> bool:
    """Whether autograd will record this call (grad mode on and an input or a learnable modifier tensor)."""
    if not torch.is_grad_enabled():
        return False
    if any(t.requires_grad for t in tensors):
        return True
    if mod is not None and hasattr(mod, "grad_tensors"):
        return any(t.requires_grad for t in mod.grad_tensors())
    return False


def attention_key(q, k, v, pattern, mod, norm, return_lse) -> tuple[Hashable, list]:
    """The structure of an ``attnkit.attention`` call (what the attention backends' ``reasons`` read)."""
    holders: list = [norm]  # normalisations by identity (resolve() returns one instance per name)
    key = (q.shape, k.shape, v.shape, q.dtype, q.device, needs_grad((q, k, v), mod),
           structure_key(pattern, holders), structure_key(mod, holders), id(norm), return_lse)
    return key, holders


# ------------------------------------------------------------------------------------------------------------
# explain
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Explanation:
    """Which backend a call runs on and why: ``chosen`` (None if none can), ``order`` (the backends in
    ``engine="auto"``'s order on the call's device) and ``reasons`` (why each one before it, and every one that
    cannot, is passed over)."""

    operation: str
    device: str
    chosen: str | None
    order: list[str]
    reasons: dict[str, list[str]]

    def __str__(self) -> str:
        lines = [f"{self.operation} on {self.device}: "
                 + (f"runs on {self.chosen!r}" if self.chosen else "no backend can run this call")]
        for name in self.order:
            why = self.reasons.get(name, [])
            mark = "->" if name == self.chosen else "  "
            lines.append(f"{mark} {name}: " + ("can run it" if not why else "; ".join(why)))
        return "\n".join(lines)


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern=None, score_mod=None,
            normalization="softmax", return_lse: bool = False, engine: str = "auto", kernel_size=None,
            dilation=1, stride=1, is_causal=False) -> Explanation:
    """Which engine ``attnkit.attention(q, k, v, ...)`` (or, with ``kernel_size``, ``attnkit.neighborhood``)
    takes for these inputs and why the others are passed over; ``print()`` it for a table.

    The backends' own ``reasons`` answer, in ``engine="auto"``'s order on the inputs' device, so this is what
    the call does (a FlexAttention compile failure seen earlier in the process is among the reasons)."""
    from attnkit.backends import base
    from attnkit.errors import NotSupportedError

    if kernel_size is not None:
        from attnkit.backends.catalog import neighborhood_call
        from attnkit.ops.neighborhood.windows import make_spec

        spec = make_spec(tuple(q.shape[2:-1]), kernel_size, dilation, stride, is_causal)
        call = neighborhood_call(q, k, v, spec, score_mod=score_mod, scale=q.shape[-1] ** -0.5)
        operation = "neighborhood"
    else:
        from attnkit.backends.catalog import attention_call
        from attnkit.normalizations import resolve
        from attnkit.ops.exact.api import _resolve_score_mod

        call = attention_call(q, k, v, pattern=pattern, score_mod=_resolve_score_mod(score_mod),
                              norm=resolve(normalization), scale=q.shape[-1] ** -0.5, return_lse=return_lse)
        operation = "attention"
    base._load()
    dev = q.device.type
    table = base._BACKENDS[operation]
    order = sorted(table, key=lambda n: (base._rank_key(table[n], dev), n))
    auto_call = dict(call, auto=True)
    reasons = {}
    for name in order:
        b = table[name]
        why = b.not_supported_reasons(auto_call if engine == "auto" else call)
        if engine == "auto" and b.rank.get(dev) is None:
            why = why + [f"not chosen automatically on {dev} (name it with engine={name!r})"]
        reasons[name] = why
    try:
        chosen = base.select(operation, engine, call).name
    except NotSupportedError:
        chosen = None
    return Explanation(operation, str(q.device), chosen, order, reasons)
