"""Keys of the dispatch caches: ``engine="auto"``'s decision (``attnkit.backends.dispatch``), the flex BlockMasks
and the materialised masks, remembered by the call's structure.

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
from collections.abc import Hashable
from typing import Any

import torch

from attnkit.patterns import Pattern

__all__ = ["structure_key", "invalidate", "needs_grad", "attention_key", "DECISION_CACHE_SIZE"]

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


