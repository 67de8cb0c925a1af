"""Score modifiers: functions of one attention logit and its coordinates, applied before normalisation.

A score modifier is an ``nn.Module`` called as ``mod(score, b, h, q_idx, kv_idx, q_len, kv_len)`` on
broadcasting tensors (``score`` already scaled by ``1/sqrt(d)``); it returns the modified score. Learnable
modifiers (KERPLE, relative bias) hold ``nn.Parameter``s, so they train inside a model and every engine
(the tiled backward included) passes gradients to them. Modifiers compose with ``>>`` (apply left, then
right) or ``compose(a, b, ...)``.

Positions are bottom-right aligned like patterns: query ``i`` sits at ``p = i + kv_len - q_len``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ScoreMod", "alibi", "alibi_slopes", "relative_bias", "t5_buckets", "kerple_log", "kerple_power",
           "softcap", "custom", "compose", "length_scale", "query_key_position", "position_temperature"]


def _distance(q_idx: torch.Tensor, kv_idx: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Signed distance ``p - j`` (positive: the key is in the past)."""
    return q_idx + (kv_len - q_len) - kv_idx


def _head_index(h, like: torch.Tensor) -> torch.Tensor:
    if h is None:
        raise ValueError("this score modifier depends on the head index; the engine must pass h")
    return h


class ScoreMod(nn.Module):
    """Base class. Subclasses implement ``forward(score, b, h, q_idx, kv_idx, q_len, kv_len)``."""

    head_dependent: bool = False
    # ``mod(s, ...) == s + mod(0, ...)`` for every score: an additive bias, which fused kernels take as a mask.
    additive: bool = False

    def __rshift__(self, other: ScoreMod) -> ScoreMod:
        return compose(self, other)

    def check(self, heads: int) -> None:
        """Raise ``ValueError`` if the modifier cannot apply to ``heads`` query heads."""

    def grad_tensors(self) -> list[torch.Tensor]:
        """Tensors the modifier reads that need gradients (engines with their own backward use this)."""
        return [p for p in self.parameters() if p.requires_grad]


class _Compose(ScoreMod):
    def __init__(self, mods: list[ScoreMod]):
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.head_dependent = any(m.head_dependent for m in mods)
        self.additive = all(m.additive for m in mods)

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        for m in self.mods:
            score = m(score, b, h, q_idx, kv_idx, q_len, kv_len)
        return score

    def check(self, heads):
        for m in self.mods:
            m.check(heads)

    def grad_tensors(self):
        return [t for m in self.mods for t in m.grad_tensors()]


def compose(*mods: ScoreMod) -> ScoreMod:
    """Apply ``mods`` in order: ``compose(alibi(8), softcap(30.0))`` adds ALiBi then caps."""
    flat: list[ScoreMod] = []
    for m in mods:
        if not isinstance(m, ScoreMod):
            raise TypeError(f"compose() takes ScoreMod objects, got {type(m).__name__}; wrap functions with custom()")
        flat.extend(m.mods if isinstance(m, _Compose) else [m])
    return flat[0] if len(flat) == 1 else _Compose(flat)


def alibi_slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi's head slopes ("Train Short, Test Long", Press et al.): the geometric sequence 2^(-8/n * (h+1))
    for the closest power of two n <= num_heads, then the odd terms of the sequence for 2n (``[heads]`` in
    ``dtype``). Computed in float64 and rounded once, so they equal the published slopes to ``dtype``'s
    precision."""

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = powers(n)
    if n < num_heads:
        slopes += powers(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float64).to(dtype)


class _Alibi(ScoreMod):
    head_dependent = True
    additive = True

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)
        self._slopes64 = alibi_slopes(num_heads, torch.float64).tolist()  # for float64 scores (not a buffer:
        # some devices have no float64)

    def check(self, heads):
        if heads != self.num_heads:
            raise ValueError(f"alibi(num_heads={self.num_heads}) used with {heads} query heads; they must match")

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        if score.dtype == torch.float64:
            slopes = torch.tensor(self._slopes64, dtype=torch.float64, device=score.device)
        else:
            slopes = self.slopes.to(score.dtype)
        slope = slopes[_head_index(h, score)]
        return score - slope * _distance(q_idx, kv_idx, q_len, kv_len).abs().to(score.dtype)

    def extra_repr(self):
        return f"num_heads={self.num_heads}"


def alibi(num_heads: int) -> ScoreMod:
    """ALiBi: ``s_ij - m_h * |p - j|`` with the standard geometric slopes ``m_h`` (``alibi_slopes``)."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi(num_heads) must be a positive int, got {num_heads!r}")
    return _Alibi(num_heads)


def t5_buckets(distance: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """T5's relative position buckets of ``distance = p - j``: exact buckets for small distances, log-spaced
    up to ``max_distance``; with ``bidirectional`` half the buckets are for keys after the query."""
    rel = -distance  # T5 convention: memory position minus query position
    bucket = torch.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        bucket = bucket + (rel > 0).long() * n
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = n // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float().clamp_min(1) / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).long()
    large = torch.clamp(large, max=n - 1)
    return bucket + torch.where(is_small, rel, large)


class _RelativeBias(ScoreMod):
    head_dependent = True

    def __init__(self, table: torch.Tensor, max_distance: int, bidirectional: bool):
        super().__init__()
        if isinstance(table, nn.Parameter):
            self.table = table
        elif table.requires_grad and table.is_leaf:
            self.table = nn.Parameter(table)  # the same storage: the caller's tensor receives the gradient
        elif table.requires_grad:
            # computed (a dynamic position bias, an MLP's output): kept as given, so the gradient flows back
            # through whatever computed it; neither a parameter nor a buffer
            self._computed = table
        else:
            self.register_buffer("table", table)
        self.max_distance, self.bidirectional = max_distance, bidirectional

    def __getattr__(self, name):
        if name == "table" and "_computed" in self.__dict__:
            return self.__dict__["_computed"]
        return super().__getattr__(name)

    def grad_tensors(self):
        if "_computed" in self.__dict__:
            return [self._computed]
        return super().grad_tensors()

    def check(self, heads):
        if self.table.shape[1] != heads:
            raise ValueError(f"relative_bias(table) has {self.table.shape[1]} heads, the input has {heads}")

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        bucket = t5_buckets(_distance(q_idx, kv_idx, q_len, kv_len), self.table.shape[0], self.max_distance,
                            self.bidirectional)
        return score + self.table.to(score.dtype)[bucket, _head_index(h, score)]


def relative_bias(table: torch.Tensor, *, max_distance: int = 128, bidirectional: bool = True) -> ScoreMod:
    """T5-style learned relative position bias: ``s_ij + table[bucket(p - j), h]`` (Raffel et al., T5).

    ``table``: ``[num_buckets, heads]``. A leaf tensor with ``requires_grad`` becomes a trainable
    ``nn.Parameter`` (sharing its storage); a computed tensor (not a leaf: a dynamic position bias, an MLP's
    output) is used as given, so gradients reach what computed it; pass a new ``relative_bias`` per step.
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError("relative_bias(table) takes a tensor [num_buckets, heads]")
    if table.shape[0] < 2 or (bidirectional and table.shape[0] < 4):
        raise ValueError(f"relative_bias(table) needs at least {4 if bidirectional else 2} buckets")
    return _RelativeBias(table, max_distance, bidirectional)


def _per_head(value, num_heads: int, name: str) -> nn.Parameter:
    t = torch.as_tensor(value, dtype=torch.float32)
    t = t.expand(num_heads).clone() if t.dim() == 0 else t.clone()
    if t.shape != (num_heads,) or (t <= 0).any():
        raise ValueError(f"{name} must be a positive float or a positive tensor [num_heads={num_heads}]")
    return nn.Parameter(t)


class _Kerple(ScoreMod):
    head_dependent = True

    def __init__(self, num_heads: int, r1, r2, kind: str):
        super().__init__()
        self.kind, self.num_heads = kind, num_heads
        self.r1 = _per_head(r1, num_heads, f"kerple_{kind}(r1)")
        self.r2 = _per_head(r2, num_heads, f"kerple_{kind}(r2)")

    def check(self, heads):
        if heads != self.num_heads:
            raise ValueError(f"kerple_{self.kind}(num_heads={self.num_heads}) used with {heads} query heads")

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        h = _head_index(h, score)
        # The paper keeps r1, r2 positive by clamping (a projection step); clamping here keeps that constraint.
        r1 = self.r1.clamp_min(1e-2)[h].to(score.dtype)
        r2 = self.r2.clamp_min(1e-2)[h].to(score.dtype)
        dist = _distance(q_idx, kv_idx, q_len, kv_len).abs().to(score.dtype)
        if self.kind == "log":
            return score - r1 * torch.log1p(r2 * dist)
        return score - r1 * dist.pow(r2.clamp_max(2.0))


def kerple_log(num_heads: int, r1: float | torch.Tensor = 1.0, r2: float | torch.Tensor = 1.0) -> ScoreMod:
    """KERPLE logarithmic variant: ``s_ij - r1_h * log(1 + r2_h * |p - j|)`` with learnable ``r1, r2 > 0``
    ("KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation", Chi et al., 2022)."""
    return _Kerple(num_heads, r1, r2, "log")


def kerple_power(num_heads: int, r1: float | torch.Tensor = 1.0, r2: float | torch.Tensor = 1.0) -> ScoreMod:
    """KERPLE power variant: ``s_ij - r1_h * |p - j| ** r2_h`` with learnable ``r1 > 0`` and ``0 < r2 <= 2``."""
    return _Kerple(num_heads, r1, r2, "power")


class _Softcap(ScoreMod):
    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        return self.cap * torch.tanh(score / self.cap)

    def extra_repr(self):
        return f"cap={self.cap}"


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping ``cap * tanh(s / cap)`` (Gemma 2 style): keeps logits in ``(-cap, cap)``."""
    if not isinstance(cap, (int, float)) or cap <= 0:
        raise ValueError(f"softcap(cap) must be a positive number, got {cap!r}")
    return _Softcap(float(cap))


class _Custom(ScoreMod):
    head_dependent = True

    def __init__(self, fn: Callable, params: list[torch.Tensor]):
        super().__init__()
        self.fn = fn
        # Kept as given (not re-wrapped): fn closes over these very tensors.
        self._tensors = list(params)

    def grad_tensors(self):
        return [t for t in self._tensors if t.requires_grad]

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        if b is None:
            b = torch.zeros((), dtype=torch.long, device=score.device)
        if h is None:
            h = torch.zeros((), dtype=torch.long, device=score.device)
        out = self.fn(score, b, h, q_idx, kv_idx)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"custom(fn): fn(score, b, h, q_idx, kv_idx) must return a tensor, got "
                            f"{type(out).__name__}")
        expected = torch.broadcast_shapes(score.shape, b.shape, h.shape, q_idx.shape, kv_idx.shape)
        try:
            ok = out.dim() <= len(expected) and torch.broadcast_shapes(out.shape, expected) == expected
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"custom(fn): fn(score, b, h, q_idx, kv_idx) returned shape {tuple(out.shape)}; expected the "
                f"score's shape {tuple(expected)} (or one that broadcasts to it)"
            )
        return out


def custom(fn: Callable, *, params: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()) -> ScoreMod:
    """A score modifier from ``fn(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's ``score_mod``
    convention; raw indices). Tensors ``fn`` closes over that should receive gradients must be listed in
    ``params`` (the tiled engine's backward differentiates only with respect to declared parameters)."""
    if not callable(fn):
        raise TypeError("custom(fn): fn must be callable as fn(score, b, h, q_idx, kv_idx)")
    return _Custom(fn, list(params))


class _LengthScale(ScoreMod):
    def __init__(self, base: float, per_row: bool):
        super().__init__()
        self.base, self.per_row = base, per_row

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        if self.per_row:
            n = (q_idx + (kv_len - q_len + 1)).to(score.dtype)  # keys up to the query's position
        else:
            n = torch.full((), float(kv_len), dtype=score.dtype, device=score.device)
        return score * (torch.log(n) / math.log(self.base))

    def extra_repr(self):
        return f"base={self.base}, per_row={self.per_row}"


def length_scale(base: float = 512.0, *, per_row: bool = True) -> ScoreMod:
    """Entropy-invariant length scale ``s_ij * log(n_i) / log(base)`` of LSSA ("Softplus Attention with
    Re-weighting Boosts Length Extrapolation in Large Language Models", Gao & Spratling, 2025, Sec. 3.1): logits
    sharpen as the context grows so the attention entropy stays near its training value. ``n_i``: the keys up to
    the query's position (``per_row``, the causal LM's context length) or ``kv_len``; ``base``: the training
    length at which the scale is 1. Combine with ``normalizations.softplus(power)`` for LSSA(R)."""
    if not isinstance(base, (int, float)) or base <= 1:
        raise ValueError(f"length_scale(base) must be a number > 1 (the training length), got {base!r}")
    return _LengthScale(float(base), bool(per_row))


class _QueryKeyPosition(ScoreMod):
    head_dependent = True

    def __init__(self, qa: torch.Tensor, ka: torch.Tensor, max_distance: int):
        super().__init__()
        self.qa, self.ka, self.max_distance = qa, ka, max_distance

    def grad_tensors(self):
        return [t for t in (self.qa, self.ka) if t.requires_grad]

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        b = torch.zeros((), dtype=torch.long, device=score.device) if b is None else b
        h = _head_index(h, score)
        r = _distance(q_idx, kv_idx, q_len, kv_len).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return score + (self.qa[b, h, q_idx, r] + self.ka[b, h, kv_idx, r]).to(score.dtype)


def query_key_position(qa: torch.Tensor, ka: torch.Tensor, max_distance: int) -> ScoreMod:
    """Query-key-position interaction ("Improve Transformer Models with Better Relative Position Embeddings",
    Huang et al., 2020, method 4): ``s_ij + (q_i . a_ij + k_j . a_ij) * scale`` with ``a_ij = table[clip(p - j,
    -K, K) + K]``. Pass ``qa = (q @ table.T) * scale [batch, heads, q_len, 2K + 1]`` and ``ka = (k @ table.T) *
    scale [batch, heads, kv_len, 2K + 1]`` (products with every embedding, O(n K d), never O(n^2 d)); each logit
    then gathers its two terms. Gradients reach q, k and the table through ``qa`` and ``ka``
    (``attnkit.nn.QueryKeyPositionAttention`` wires it)."""
    if qa.dim() != 4 or ka.dim() != 4 or qa.shape[-1] != 2 * max_distance + 1 or ka.shape[-1] != qa.shape[-1]:
        raise ValueError(f"query_key_position: qa and ka must be [batch, heads, len, 2 * max_distance + 1 = "
                         f"{2 * max_distance + 1}], got {tuple(qa.shape)} and {tuple(ka.shape)}")
    return _QueryKeyPosition(qa, ka, max_distance)


class _PositionTemperature(ScoreMod):
    head_dependent = True

    def __init__(self, num_heads: int, alpha):
        super().__init__()
        self.num_heads = num_heads
        a = torch.as_tensor(alpha, dtype=torch.float32)
        self.alpha = nn.Parameter(a.expand(num_heads).clone() if a.dim() == 0 else a.clone())

    def check(self, heads):
        if heads != self.num_heads:
            raise ValueError(f"position_temperature(num_heads={self.num_heads}) used with {heads} query heads")

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        p = (q_idx + (kv_len - q_len)).to(score.dtype)
        return score * (1 + self.alpha.to(score.dtype)[_head_index(h, score)] * torch.log1p(p))


def position_temperature(num_heads: int, alpha: float | torch.Tensor = 0.0) -> ScoreMod:
    """The position part of selective attention's query temperature ("Selective Attention: Enhancing Transformer
    through Principled Context Control", Zhang et al., 2024, Sec. 3): ``s_ij * (1 + alpha_h * log(1 + p))``, a
    learnable per-head sharpening that grows with the query position against attention dilution. ``alpha = 0``
    is plain attention. The token part lives in ``attnkit.nn.SelectiveAttention``."""
    return _PositionTemperature(num_heads, alpha)
