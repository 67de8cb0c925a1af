"""``attnkit.attention``: exact attention with programmable patterns, score modifiers and normalisations.

Engines declare what they can run; ``engine="auto"`` picks the first that can, and an explicit engine that
cannot run a call raises ``NotSupportedError`` with its reasons (and those of the others).

| engine      | patterns                       | score_mod | normalisations                      | memory        |
|-------------|--------------------------------|-----------|-------------------------------------|---------------|
| `sdpa`      | none, `full()`, `causal()` (*) | no        | softmax                             | torch's       |
| `flash`     | windows, contiguous documents  | alibi, softcap | softmax (CUDA, `attnkit[flash]`) | O(n)          |
| `flex`      | any                            | any       | softmax (torch FlexAttention)       | O(n)          |
| `tiled`     | any                            | any       | softmax, sigmoid, relu, softplus    | O(n)          |
| `reference` | any                            | any       | all, including sinkhorn             | O(q_len*kv_len)|

(*) ``causal()`` only when ``q_len == kv_len``: SDPA aligns causal masks top-left, attnkit bottom-right.
``auto`` order (``attnkit.backends.catalog``): CUDA sdpa, flash, flex, sdpa_mask (SDPA with the materialised
mask, for what flex cannot compile, while the mask fits memory), tiled; CPU sdpa, tiled, flex (the
fused CPU path beats FlexAttention there); the reference is chosen automatically only for Sinkhorn, which needs
the whole matrix (column sums) by definition. ``attnkit backends`` lists what is installed and usable here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attnkit._checks import check_qkv, default_scale, repeat_kv
from attnkit.normalizations import Normalization, resolve
from attnkit.ops.exact.engines import _SDPA_HAS_GQA, ENGINES, _resolve_score_mod  # noqa: F401 (ENGINES: public)
from attnkit.ops.exact.reference import reference_attention
from attnkit.ops.exact.tiled import tiled_attention
from attnkit.patterns import Pattern, _Full
from attnkit.score_mods import ScoreMod


def not_supported_reasons(q, k, v, *, pattern=None, score_mod=None, normalization="softmax",
                          return_lse: bool = False) -> dict[str, list[str]]:
    """For each engine (every registered attention backend), the reasons it cannot run this call (empty: it can)."""
    from attnkit.backends.base import all_reasons
    from attnkit.backends.catalog import attention_call

    call = attention_call(q, k, v, pattern=pattern, score_mod=_resolve_score_mod(score_mod),
                          norm=resolve(normalization), scale=default_scale(q, None), return_lse=return_lse)
    return all_reasons("attention", call)


def select_engine(q, k, v, pattern, score_mod, norm: Normalization, engine: str, scale: float | None = None,
                  return_lse: bool = False) -> str:
    from attnkit.backends.base import select
    from attnkit.backends.catalog import attention_call

    call = attention_call(q, k, v, pattern=pattern, score_mod=score_mod, norm=norm,
                          scale=default_scale(q, scale), return_lse=return_lse)
    return select("attention", engine, call).name


_DISPATCH: list = []  # attnkit.backends.dispatch, imported on first use (an import statement costs ~10 us a call)


def _cached_engine(q, k, v, pattern, mod, norm, engine, scale, return_lse) -> str:
    # select_engine's answer, remembered by the call's structure (attnkit.backends.dispatch)
    if not _DISPATCH:
        from attnkit.backends import dispatch

        _DISPATCH.append(dispatch)
    d = _DISPATCH[0]
    key, holders = d.attention_key(q, k, v, pattern, mod, norm, return_lse)
    return d.cached_select("attention", engine, key, lambda: _call(q, k, v, pattern, mod, norm, scale, return_lse),
                           holders)


def _call(q, k, v, pattern, mod, norm, scale, return_lse):
    from attnkit.backends.catalog import attention_call

    return attention_call(q, k, v, pattern=pattern, score_mod=mod, norm=norm, scale=default_scale(q, scale),
                          return_lse=return_lse)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None = None,
              score_mod: ScoreMod | Sequence[ScoreMod] | None = None,
              normalization: str | Normalization = "softmax", scale: float | None = None,
              engine: str = "auto", block_q: int | None = None, block_kv: int | None = None,
              cu_seqlens: torch.Tensor | None = None,
              return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        engine: "auto", "sdpa", "flash", "flex", "sdpa_mask", "tiled" or "reference" (see the module docstring
            for what each supports; ``attnkit.backends.backends()`` for what is installed here).
        block_q, block_kv: tile sizes of the tiled engine (performance knobs; default 64).
        cu_seqlens: varlen packing (FlashAttention's convention): ``[num_docs + 1]`` cumulative lengths of the
            documents packed along the sequence axis (``q_len == kv_len``); queries attend only inside their
            document (``pattern`` is intersected with that block-diagonal mask, whose empty tiles are skipped).
            Restart positions per document with ``attnkit.ops.exact.variants.position_ids``.
        return_lse: also return the natural-log log-sum-exp of each row's modified, masked scores
            ``[batch, heads, q_len]`` (float32; ``-inf`` for a fully masked row), softmax only (engines flex and
            flash on CUDA, reference).

    Returns:
        ``[batch, heads, q_len, dim_v]``. A query whose row the pattern masks completely gets zeros (no NaN,
        in the forward or the backward). With ``return_lse``, the pair ``(out, lse)``.
    """
    check_qkv(q, k, v)
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an attnkit.patterns.Pattern, got {type(pattern).__name__}")
    mod = _resolve_score_mod(score_mod)
    norm = resolve(normalization)
    scale = default_scale(q, scale)
    for name, val in () if block_q is None is block_kv else (("block_q", block_q), ("block_kv", block_kv)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"{name} must be a positive int (or None for the default), got {val!r}")
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if cu_seqlens is not None:
        from attnkit.ops.exact.variants import check_cu_seqlens, varlen_pattern

        if q_len != kv_len:
            raise ValueError(f"cu_seqlens packs self-attention: q_len ({q_len}) must equal kv_len ({kv_len})")
        docs = varlen_pattern(check_cu_seqlens(cu_seqlens, kv_len))
        pattern = docs if pattern is None else pattern & docs
    if pattern is not None:
        pattern.check(q_len, kv_len, batch, heads)
    if mod is not None:
        mod.check(heads)
        mod.to(q.device)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if return_lse and norm.name != "softmax":
        raise ValueError(f"return_lse=True needs normalization='softmax' (got {norm.name!r}): the log-sum-exp is "
                         f"softmax's normaliser")
    chosen = _cached_engine(q, k, v, pattern, mod, norm, engine, scale, return_lse)
    if chosen not in ENGINES:
        from attnkit.backends.catalog import run_attention_backend

        out = run_attention_backend(chosen, engine, q, k, v, pattern=pattern, score_mod=mod, norm=norm, scale=scale,
                                    return_lse=return_lse)
        if out is not None:
            return out
        chosen = select_engine(q, k, v, pattern, mod, norm, engine, scale, return_lse)  # the failed one now refuses
        if chosen not in ENGINES:
            return run_attention_backend(chosen, "named", q, k, v, pattern=pattern, score_mod=mod, norm=norm,
                                         scale=scale, return_lse=return_lse)
    if return_lse:
        # built-in engines: the output as usual, the log-sum-exp by blocks of query rows (memory O(block * kv_len))
        from attnkit.ops.exact.weights import attention_lse

        out = attention(q, k, v, pattern=pattern, score_mod=mod, normalization=norm, scale=scale, engine=chosen,
                        block_q=block_q, block_kv=block_kv)
        return out, attention_lse(q, k, pattern=pattern, score_mod=mod, scale=scale)
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
