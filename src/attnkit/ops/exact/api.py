"""``attnkit.attention``: exact attention with programmable patterns, score modifiers and normalisations.

Engines declare what they can run; ``engine="auto"`` picks the first that can, and an explicit engine that
cannot run a call raises ``NotSupportedError`` with its reasons (and those of the others).

| engine      | patterns                       | score_mod | normalisations                      | memory        |
|-------------|--------------------------------|-----------|-------------------------------------|---------------|
| `sdpa`      | none, `full()`, `causal()` (*) | no        | softmax                             | torch's       |
| `tiled`     | any                            | any       | softmax, sigmoid, relu, softplus    | O(n)          |
| `reference` | any                            | any       | all, including sinkhorn             | O(q_len*kv_len)|

(*) ``causal()`` only when ``q_len == kv_len``: SDPA aligns causal masks top-left, attnkit bottom-right.
``auto`` order: sdpa, tiled, reference; the reference is chosen automatically only for Sinkhorn, which needs
the whole matrix (column sums) by definition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from attnkit._checks import check_qkv, default_scale, repeat_kv
from attnkit.errors import NotSupportedError
from attnkit.normalizations import Normalization, resolve
from attnkit.patterns import Pattern, _Band, _Full
from attnkit.score_mods import ScoreMod, compose

from .reference import reference_attention
from .tiled import tiled_attention

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


def not_supported_reasons(q, k, v, *, pattern=None, score_mod=None, normalization="softmax") -> dict[str, list[str]]:
    """For each engine, the reasons it cannot run this call (an empty list: it can)."""
    norm = resolve(normalization)
    return {name: fn(q, k, v, pattern, score_mod, norm) for name, fn in _REASONS.items()}


def select_engine(q, k, v, pattern, score_mod, norm: Normalization, engine: str) -> str:
    if engine not in (*ENGINES, "auto"):
        raise ValueError(f"engine must be one of {('auto', *ENGINES)}, got {engine!r}")
    reasons = {name: fn(q, k, v, pattern, score_mod, norm) for name, fn in _REASONS.items()}
    if engine != "auto":
        if reasons[engine]:
            raise NotSupportedError(f"engine={engine!r} cannot run this call", {engine: reasons[engine]})
        return engine
    for name in ENGINES:
        if not reasons[name]:
            return name
    raise NotSupportedError("no engine can run this call", reasons)  # pragma: no cover


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None = None,
              score_mod: ScoreMod | Sequence[ScoreMod] | None = None,
              normalization: str | Normalization = "softmax", scale: float | None = None,
              engine: str = "auto", block_q: int | None = None, block_kv: int | None = None,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention ``o_i = sum_j w_ij v_j`` with ``w = normalization(score_mod(q_i . k_j * scale))`` over
    the pairs ``pattern`` allows.

    Args:
        q: ``[batch, heads, q_len, dim]``.
        k: ``[batch, kv_heads, kv_len, dim]``; ``heads`` must be a multiple of ``kv_heads`` (GQA / MQA).
        v: ``[batch, kv_heads, kv_len, dim_v]``; ``dim_v`` may differ from ``dim``.
        pattern: an ``attnkit.patterns`` pattern (default: full attention). When ``q_len < kv_len`` queries
            are the last positions (decoding): ``causal()`` lets query ``i`` see keys ``<= i + kv_len - q_len``.
        score_mod: an ``attnkit.score_mods`` modifier or a list applied in order.
        normalization: "softmax", "sigmoid", "relu", "softplus", "sinkhorn" or an
            ``attnkit.normalizations`` object.
        scale: score scale, default ``1/sqrt(dim)``.
        engine: "auto", "sdpa", "tiled" or "reference" (see the module docstring for what each supports).
        block_q, block_kv: tile sizes of the tiled engine (performance knobs; default 64).
        cu_seqlens: varlen packing (FlashAttention's convention): ``[num_docs + 1]`` cumulative lengths of the
            documents packed along the sequence axis (``q_len == kv_len``); queries attend only inside their
            document (``pattern`` is intersected with that block-diagonal mask, whose empty tiles are skipped).
            Restart positions per document with ``attnkit.ops.exact.variants.position_ids``.

    Returns:
        ``[batch, heads, q_len, dim_v]``. A query whose row the pattern masks completely gets zeros (no NaN,
        in the forward or the backward).
    """
    check_qkv(q, k, v)
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an attnkit.patterns.Pattern, got {type(pattern).__name__}")
    mod = _resolve_score_mod(score_mod)
    norm = resolve(normalization)
    scale = default_scale(q, scale)
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):  # checked whichever engine runs
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"{name} must be a positive int (or None for the default), got {val!r}")
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if cu_seqlens is not None:
        from .variants import check_cu_seqlens, varlen_pattern

        if q_len != kv_len:
            raise ValueError(f"cu_seqlens packs self-attention: q_len ({q_len}) must equal kv_len ({kv_len})")
        docs = varlen_pattern(check_cu_seqlens(cu_seqlens, kv_len))
        pattern = docs if pattern is None else pattern & docs
    if pattern is not None:
        pattern.check(q_len, kv_len, batch, heads)
    if mod is not None:
        mod.check(heads)
        mod.to(q.device)
    chosen = select_engine(q, k, v, pattern, mod, norm, engine)
    if chosen == "sdpa":
        is_causal = pattern is not None and not isinstance(pattern, _Full)
        if k.shape[1] != heads and _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)
        kk, vv = repeat_kv(k, heads), repeat_kv(v, heads)
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=is_causal, scale=scale)
    if chosen == "tiled":
        return tiled_attention(q, k, v, pattern=pattern, score_mod=mod, normalization=norm, scale=scale,
                               block_q=block_q, block_kv=block_kv)
    return reference_attention(q, k, v, pattern=pattern, score_mod=mod, normalization=norm, scale=scale)
