"""Cached dispatch: ``engine="auto"``'s decision remembered by the call's structure (the keys: ``keys.py``), and
``attnkit.explain``: which engine a call takes and why."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attnkit.backends import base as _base
from attnkit.backends.keys import (  # noqa: F401 - the callers' one import
    _DECISIONS,
    _EPOCH,
    DECISION_CACHE_SIZE,
    attention_key,
    invalidate,
    needs_grad,
    structure_key,
)

__all__ = ["structure_key", "cached_select", "invalidate", "needs_grad", "attention_key", "explain", "Explanation"]


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
        from attnkit.patterns.windows import make_spec

        spec = make_spec(tuple(q.shape[2:-1]), kernel_size, dilation, stride, is_causal)
        call = neighborhood_call(q, k, v, spec, score_mod=score_mod, scale=q.shape[-1] ** -0.5)
        operation = "neighborhood"
    else:
        from attnkit.backends.catalog import attention_call
        from attnkit.normalizations import resolve
        from attnkit.ops.exact.engines import _resolve_score_mod

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
