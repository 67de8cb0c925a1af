"""Pieces shared by the modes: features with grouped-query expansion, decay powers, output normalisation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit._checks import repeat_kv
from attnkit.errors import NotSupportedError
from attnkit.feature_maps import FeatureMap, LogNormalFeatureMap
from attnkit.feature_maps import get as get_feature_map

NORMALIZE = ("denominator", "none", "rms")


def resolve_feature_map(feature_map: str | FeatureMap, causal: bool) -> FeatureMap:
    """The map to run. Maps whose statistics span the call must use causal statistics in causal attention: the
    ``"lln"`` name builds a causal LLN map; an LLN instance built without ``causal=True`` is refused."""
    if causal and isinstance(feature_map, str) and feature_map == "lln":
        return LogNormalFeatureMap(causal=True)
    fm = get_feature_map(feature_map)
    # maps with a ``causal`` switch (LLN, Fastmax) take statistics over the call unless built causal
    if causal and getattr(fm, "causal", None) is False and not fm.token_local:
        raise NotSupportedError(
            f"this {type(fm).__name__} takes statistics (temperatures, shifts or scales) from the whole call, so "
            f"causal attention would see the future through them; build it with causal=True (prefix "
            f"statistics){' or with fixed alpha=, beta= and stabilize=False' if fm.name == 'lln' else ''}"
        )
    return fm


def features(fm: FeatureMap, q: torch.Tensor, k: torch.Tensor, q_offset: int,
             k_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi(q) [b, h, n, m]``, ``phi(k) [b, h, n_k, m]`` with key features repeated over query groups."""
    pq, pk = fm(q, k, q_offset=q_offset, k_offset=k_offset)
    return pq, repeat_kv(pk, q.shape[1])


def values_with_ones(v: torch.Tensor, heads: int) -> torch.Tensor:
    """``[v, 1]``: ``[b, h, n, d_v + 1]``. The extra column carries the denominator through the same matmuls
    as the numerator (``A [V, 1]`` gives ``A V`` and the row sums ``A 1`` in one product)."""
    v = repeat_kv(v, heads)
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def decay_powers(log_decay: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """``decay^exponents`` for ``log_decay [B]`` and integer ``exponents [...]`` -> ``[B, ...]`` (exponents >= 0,
    so nothing overflows; tiny powers underflow to 0, their true limit)."""
    e = exponents.to(log_decay.dtype)
    return torch.exp(log_decay.reshape((-1,) + (1,) * e.dim()) * e)


def make_finalize(normalize: str, eps: float, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn ``o [..., d_v + 1]`` (numerator, denominator) into the output ``[..., d_v]`` in ``dtype``.

    ``denominator``: ``num / den`` with ``den`` pushed away from zero to ``+-eps`` (signed maps such as trig
    or cosine can produce denominators near zero; outputs stay finite). ``none``: ``num`` (TransNormer's
    NormAttention applies its own norm after). ``rms``: ``num / rms(num)`` over ``d_v`` (SRMSNorm, no weight).
    """

    def finalize(o: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        num, den = o[..., :-1], o[..., -1:]
        if normalize == "denominator":
            if torch.is_grad_enabled() and o.requires_grad:
                # where() keeps gradients finite at den = 0 (1 / den there would give inf * 0)
                sign = torch.where(den < 0, -1.0, 1.0).to(den.dtype)
                inv = 1.0 / torch.where(den.abs() < eps, sign * eps, den)
            else:
                # 1 / den clamped to +-1/eps equals 1 / (den pushed away from 0 to +-eps): two cheap ops on
                # the [..., 1] column, then one multiply over the output (division is slower on CPU).
                inv = torch.reciprocal(den).clamp_(-1.0 / eps, 1.0 / eps)
            if out is not None and out.dtype == o.dtype:
                return torch.mul(num, inv, out=out)  # straight into the caller's buffer: one pass
            res = num * inv
        elif normalize == "none":
            res = num
        else:
            res = num * torch.rsqrt(num.pow(2).mean(-1, keepdim=True) + eps)
        if out is not None:
            return out.copy_(res)
        return res.to(dtype)

    finalize.dtype = dtype  # type: ignore[attr-defined]
    return finalize


def retention_decay(num_heads: int) -> torch.Tensor:
    """Per-head decays ``1 - 2^(-5 - h)``, ``h = 0 .. num_heads - 1`` (RetNet's schedule, used with
    Lightning Attention's per-head decayed state): ``[num_heads]`` float64."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    return 1.0 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))


def check_inner_loop(name: str, out: tuple, inputs: tuple, advice: Callable[[], str]) -> None:
    """Test-time learning (TTT, Titans) runs gradient steps on a memory inside the forward: a step too large for
    the loss's curvature (``eta |k|^2`` or ``theta`` times a chunk's summed gradients) makes the memory grow
    geometrically until it overflows, and the output turns NaN without a word (issue 28: Titans at 5x unit-scale
    inputs, whose gates saturate). Online gradient descent with a given step is unstable beyond such a scale,
    so: a ValueError naming the cause when an output or the final memory in ``out`` is non-finite although every
    input is finite (non-finite inputs propagate, as in dense attention). ``advice()`` is only called on
    failure. One reduction and host sync per call."""
    if bool(torch.stack([torch.isfinite(t).all() for t in out]).all()):  # outputs and the memory after them
        return
    if all(bool(torch.isfinite(t).all()) for t in inputs if isinstance(t, torch.Tensor)):
        raise ValueError(f"{name}: the memory's online gradient steps diverged (non-finite output from finite "
                         f"inputs); {advice()}")
