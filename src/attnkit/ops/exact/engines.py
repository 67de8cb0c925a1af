"""The built-in exact engines (``sdpa``, ``tiled``, ``reference``): what each can run (the reasons it refuses a
call, read by the dispatch in ``attnkit.backends.catalog``) and the resolution of ``score_mod`` arguments shared by
``attnkit.attention`` and ``attnkit.attention_weights``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attnkit.patterns import _Band, _Full
from attnkit.score_mods import ScoreMod, compose

ENGINES = ("sdpa", "tiled", "reference")
# enable_gqa arrived in torch 2.5; with 2.4 k/v heads are repeated instead.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_reasons(q, k, v, pattern, score_mod, norm) -> list[str]:
    why = []
    if norm.name != "softmax":
        why.append(f"normalization {norm.name!r} (sdpa computes softmax only)")
    if score_mod is not None:
        why.append("score_mod given (sdpa takes no score modifier)")
    if pattern is not None and not isinstance(pattern, _Full):
        is_causal = isinstance(pattern, _Band) and pattern.lo == float("-inf") and pattern.hi == 0
        if not is_causal:
            why.append(f"pattern {pattern!r} (sdpa runs full and causal only)")
        elif q.shape[2] != k.shape[2]:
            why.append("causal with q_len != kv_len (sdpa aligns causal top-left; attnkit bottom-right)")
    return why


def _tiled_reasons(q, k, v, pattern, score_mod, norm) -> list[str]:
    return [f"normalization {norm.name!r} needs the whole matrix"] if norm.is_global else []


def _reference_reasons(q, k, v, pattern, score_mod, norm) -> list[str]:
    return []


_REASONS: dict[str, Callable[..., list[str]]] = {
    "sdpa": _sdpa_reasons, "tiled": _tiled_reasons, "reference": _reference_reasons,
}


def _resolve_score_mod(score_mod) -> ScoreMod | None:
    if score_mod is None:
        return None
    if isinstance(score_mod, ScoreMod):
        return score_mod
    if isinstance(score_mod, Sequence) and not isinstance(score_mod, str):
        return compose(*score_mod) if score_mod else None
    raise TypeError(
        f"score_mod must be an attnkit.score_mods.ScoreMod (or a list of them), got {type(score_mod).__name__}; "
        f"wrap a function with attnkit.score_mods.custom(fn)"
    )
