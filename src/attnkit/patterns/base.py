"""Attention patterns: which (query, key) pairs may attend.

A pattern is a small frozen object with three faces:

* ``allowed(b, h, q_idx, kv_idx, q_len, kv_len)``: the predicate, on integer index tensors that broadcast
  against each other (``b`` and ``h`` may be ``None`` when the caller has no such axis);
* ``tile_classes(q_len, kv_len, block_q, block_kv)``: for a tiling, which (query-block, key-block) tiles are
  ``EMPTY`` (skipped), ``FULL`` (computed with no mask) or ``PARTIAL`` (computed with the predicate as a mask).
  Structured patterns classify tiles analytically in O(tiles); ``custom`` ones evaluate the predicate once
  per element (O(q_len * kv_len) boolean work, cached per shape);
* ``materialize(q_len, kv_len)``: the dense boolean mask ``[batch | 1, heads | 1, q_len, kv_len]``, for tests
  and the reference engine.

Patterns compose with ``&`` (both allow), ``|`` (either allows) and ``~`` (complement).

Alignment: when ``q_len < kv_len`` (decoding with a cache) queries are the *last* ``q_len`` positions, so
query ``i`` sits at position ``p = i + kv_len - q_len``; position-based patterns (causal, windows, ALiBi)
use ``p``. This is the bottom-right alignment of FlashAttention and ``torch.nn.attention.bias.causal_lower_right``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Pattern", "full", "causal", "sliding_window", "dilated", "block_local", "strided",
    "fixed", "global_tokens", "document", "prefix_lm", "key_padding", "custom", "speed_of_light",
]

EMPTY, PARTIAL, FULL = 0, 1, 2
_INF = math.inf


def _positions(q_idx: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    return q_idx + (kv_len - q_len)


def _tile_bounds(length: int, block: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index of every block (the last block clamped to ``length``)."""
    start = torch.arange(0, length, block, device=device)
    end = torch.clamp(start + block - 1, max=length - 1)
    return start, end


class Pattern:
    """Base class of patterns. Subclasses implement ``allowed`` and, when they can, ``_classify``."""

    batch_dependent: bool = False
    head_dependent: bool = False

    # -- the predicate ---------------------------------------------------------------------------------
    def allowed(self, b, h, q_idx: torch.Tensor, kv_idx: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
        raise NotImplementedError

    def check(self, q_len: int, kv_len: int, batch: int, heads: int) -> None:
        """Raise ``ValueError`` if the pattern cannot apply to these sizes (e.g. wrong segment-id length)."""

    # -- tiles -------------------------------------------------------------------------------------------
    def tile_classes(self, q_len: int, kv_len: int, block_q: int, block_kv: int, *, batch: int = 1,
                     heads: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        """Tile classes ``[batch | 1, heads | 1, ceil(q_len / block_q), ceil(kv_len / block_kv)]`` (int8)."""
        self.check(q_len, kv_len, batch, heads)
        out = self._classify(q_len, kv_len, block_q, block_kv, batch, heads, device)
        if out is None:
            out = _classify_by_evaluation(self, q_len, kv_len, block_q, block_kv, batch, heads, device)
        return out.to(torch.int8)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device) -> torch.Tensor | None:
        return None  # no analytic rule: evaluate the predicate

    # -- dense views -------------------------------------------------------------------------------------
    def materialize(self, q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """The dense boolean mask ``[batch | 1, heads | 1, q_len, kv_len]`` (True = may attend)."""
        self.check(q_len, kv_len, batch, heads)
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)
        qi = torch.arange(q_len, device=device).view(1, 1, -1, 1)
        ki = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
        m = self.allowed(b, h, qi, ki, q_len, kv_len)
        nb = batch if self.batch_dependent else 1
        nh = heads if self.head_dependent else 1
        return torch.broadcast_to(m, (nb, nh, q_len, kv_len))

    def density(self, q_len: int, kv_len: int | None = None, *, batch: int = 1, heads: int = 1,
                block: int = 1024) -> float:
        """Fraction of (query, key) pairs allowed, counted exactly (in row blocks, so memory stays small)."""
        kv_len = q_len if kv_len is None else kv_len
        self.check(q_len, kv_len, batch, heads)
        b = torch.arange(batch).view(-1, 1, 1, 1)
        h = torch.arange(heads).view(1, -1, 1, 1)
        ki = torch.arange(kv_len).view(1, 1, 1, -1)
        count = 0
        for start in range(0, q_len, block):
            qi = torch.arange(start, min(start + block, q_len)).view(1, 1, -1, 1)
            m = self.allowed(b, h, qi, ki, q_len, kv_len)
            m = m.expand(batch, heads, qi.shape[2], kv_len)
            count += int(m.sum())
        return count / (batch * heads * q_len * kv_len)

    def mask_mod(self, q_len: int, kv_len: int) -> Callable:
        """A ``mask_mod(b, h, q_idx, kv_idx)`` for ``torch.nn.attention.flex_attention`` with these lengths."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self.allowed(b, h, q_idx, kv_idx, q_len, kv_len)

        return mask_mod

    # -- composition -------------------------------------------------------------------------------------
    def __and__(self, other: Pattern) -> Pattern:
        return _And(self, _as_pattern(other))

    def __or__(self, other: Pattern) -> Pattern:
        return _Or(self, _as_pattern(other))

    def __invert__(self) -> Pattern:
        return _Not(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _as_pattern(p) -> Pattern:
    if not isinstance(p, Pattern):
        raise TypeError(f"patterns compose only with patterns, got {type(p).__name__}")
    return p


def _classify_by_evaluation(pattern: Pattern, q_len, kv_len, block_q, block_kv, batch, heads, device):
    """Classify tiles by evaluating the predicate on every element, one query block at a time."""
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    nb = batch if pattern.batch_dependent else 1
    nh = heads if pattern.head_dependent else 1
    out = torch.empty(nb, nh, nq, nk, dtype=torch.int8, device=device)
    b = torch.arange(nb, device=device).view(-1, 1, 1, 1)
    h = torch.arange(nh, device=device).view(1, -1, 1, 1)
    pad_k = nk * block_kv - kv_len
    ki = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    for r in range(nq):
        qi = torch.arange(r * block_q, min((r + 1) * block_q, q_len), device=device).view(1, 1, -1, 1)
        m = pattern.allowed(b, h, qi, ki, q_len, kv_len).expand(nb, nh, qi.shape[2], kv_len)
        if pad_k:
            m = torch.nn.functional.pad(m, (0, pad_k), value=False)
        m = m.view(nb, nh, qi.shape[2], nk, block_kv)
        count = m.sum(dim=(2, 4))
        # Padded keys beyond kv_len are not part of the tile: a last tile is full if all real keys are.
        size = torch.full((nk,), block_kv, device=device)
        size[-1] = kv_len - (nk - 1) * block_kv
        size = size * qi.shape[2]
        cls = torch.full_like(count, PARTIAL)
        cls[count == 0] = EMPTY
        cls[count == size] = FULL
        out[:, :, r] = cls
    return out


def _band_classes(lo: float, hi: float, q_len, kv_len, block_q, block_kv, device) -> torch.Tensor:
    """Classes for ``lo <= kv_idx - p <= hi`` (p: the query's aligned position), as ``[1, 1, nq, nk]``."""
    qs, qe = _tile_bounds(q_len, block_q, device)
    ks, ke = _tile_bounds(kv_len, block_kv, device)
    off = kv_len - q_len
    dmin = ks.view(1, -1) - (qe.view(-1, 1) + off)  # smallest kv - p in the tile
    dmax = ke.view(1, -1) - (qs.view(-1, 1) + off)
    cls = torch.full(dmin.shape, PARTIAL, dtype=torch.int8, device=device)
    cls[(dmax < lo) | (dmin > hi)] = EMPTY
    cls[(dmin >= lo) & (dmax <= hi)] = FULL
    return cls[None, None]


class _Full(Pattern):
    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return torch.ones((), dtype=torch.bool, device=q_idx.device).expand(
            torch.broadcast_shapes(q_idx.shape, kv_idx.shape))

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        return torch.full((1, 1, -(-q_len // block_q), -(-kv_len // block_kv)), FULL, dtype=torch.int8,
                          device=device)

    def __repr__(self):
        return "full()"


class _Band(Pattern):
    """``lo <= kv_idx - p <= hi``: causal, sliding windows."""

    def __init__(self, lo: float, hi: float, name: str):
        self.lo, self.hi, self._name = lo, hi, name

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        d = kv_idx - _positions(q_idx, q_len, kv_len)
        if self.lo == -_INF:
            return d <= self.hi
        if self.hi == _INF:
            return d >= self.lo
        return (d >= self.lo) & (d <= self.hi)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        return _band_classes(self.lo, self.hi, q_len, kv_len, block_q, block_kv, device)

    def __repr__(self):
        return self._name


class _Dilated(Pattern):
    def __init__(self, window: int, dilation: int):
        self.window, self.dilation = window, dilation

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        d = kv_idx - _positions(q_idx, q_len, kv_len)
        r = self.dilation
        return (d.abs() <= self.window * r) & (torch.remainder(d, r) == 0)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        reach = self.window * self.dilation
        cls = _band_classes(-reach, reach, q_len, kv_len, block_q, block_kv, device)
        if self.dilation > 1:
            cls[cls == FULL] = PARTIAL
        return cls


class _BlockLocal(Pattern):
    def __init__(self, block_size: int):
        self.block_size = block_size

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return torch.div(_positions(q_idx, q_len, kv_len), self.block_size, rounding_mode="floor") == \
            torch.div(kv_idx, self.block_size, rounding_mode="floor")

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        off = kv_len - q_len
        qs, qe = _tile_bounds(q_len, block_q, device)
        ks, ke = _tile_bounds(kv_len, block_kv, device)
        n = self.block_size
        qa, qb = ((qs + off) // n).view(-1, 1), ((qe + off) // n).view(-1, 1)
        ka, kb = (ks // n).view(1, -1), (ke // n).view(1, -1)
        cls = torch.full((qa.shape[0], ka.shape[1]), PARTIAL, dtype=torch.int8, device=device)
        cls[(qb < ka) | (kb < qa)] = EMPTY
        cls[(qa == qb) & (ka == kb) & (qa == ka)] = FULL
        return cls[None, None]


class _Strided(Pattern):
    def __init__(self, stride: int, causal: bool):
        self.stride, self.causal = stride, causal

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        d = _positions(q_idx, q_len, kv_len) - kv_idx  # how far back the key is
        if self.causal:
            return (d >= 0) & ((d < self.stride) | (torch.remainder(d, self.stride) == 0))
        return (d.abs() < self.stride) | (torch.remainder(d, self.stride) == 0)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        lo = -(self.stride - 1)
        hi = 0 if self.causal else self.stride - 1
        local = _band_classes(lo, hi, q_len, kv_len, block_q, block_kv, device)
        reach = _band_classes(-_INF, 0 if self.causal else _INF, q_len, kv_len, block_q, block_kv, device)
        cls = torch.where(reach == EMPTY, EMPTY, PARTIAL).to(torch.int8)
        cls[local == FULL] = FULL
        return cls


class _Fixed(Pattern):
    def __init__(self, block_size: int, num_summary: int, causal: bool):
        self.block_size, self.num_summary, self.causal = block_size, num_summary, causal

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        p = _positions(q_idx, q_len, kv_len)
        n, c = self.block_size, self.num_summary
        same = torch.div(p, n, rounding_mode="floor") == torch.div(kv_idx, n, rounding_mode="floor")
        m = same | (torch.remainder(kv_idx, n) >= n - c)
        return m & (kv_idx <= p) if self.causal else m


class _GlobalTokens(Pattern):
    def __init__(self, indices: torch.Tensor, strict: bool = True):
        self.indices, self.strict = indices, strict

    def check(self, q_len, kv_len, batch, heads):
        if self.strict and self.indices.numel() and int(self.indices.max()) >= kv_len:
            raise ValueError(
                f"global_tokens(indices): index {int(self.indices.max())} is beyond the sequence "
                f"(kv_len={kv_len}); indices must be < kv_len, or build the pattern with strict=False to "
                f"ignore the ones a shorter sequence does not reach"
            )

    def _flags(self, length: int, device) -> torch.Tensor:
        idx = self.indices.to(device)
        flags = torch.zeros(length, dtype=torch.bool, device=device)
        flags[idx[idx < length]] = True
        return flags

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        flags = self._flags(kv_len, kv_idx.device)
        return flags[kv_idx] | flags[_positions(q_idx, q_len, kv_len)]

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        flags = self._flags(kv_len, device)
        off = kv_len - q_len
        qflags = flags[off:]
        nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
        qcount = torch.nn.functional.pad(qflags.int(), (0, nq * block_q - q_len)).view(nq, block_q).sum(1)
        kcount = torch.nn.functional.pad(flags.int(), (0, nk * block_kv - kv_len)).view(nk, block_kv).sum(1)
        qsize = torch.clamp(q_len - torch.arange(nq, device=device) * block_q, max=block_q)
        ksize = torch.clamp(kv_len - torch.arange(nk, device=device) * block_kv, max=block_kv)
        cls = torch.full((nq, nk), PARTIAL, dtype=torch.int8, device=device)
        cls[(qcount.view(-1, 1) == 0) & (kcount.view(1, -1) == 0)] = EMPTY
        cls[(qcount == qsize).view(-1, 1) | (kcount == ksize).view(1, -1)] = FULL
        return cls[None, None]


class _Document(Pattern):
    batch_dependent = True

    def __init__(self, segment_ids: torch.Tensor):
        self.segment_ids = segment_ids

    def _ids(self, device) -> torch.Tensor:
        ids = self.segment_ids.to(device)
        return ids[None] if ids.dim() == 1 else ids

    def check(self, q_len, kv_len, batch, heads):
        ids = self.segment_ids
        if ids.shape[-1] != kv_len or (ids.dim() == 2 and ids.shape[0] not in (1, batch)):
            raise ValueError(
                f"document(segment_ids): segment_ids must have shape [kv_len] or [batch, kv_len] = "
                f"[{batch}, {kv_len}], got {tuple(ids.shape)}"
            )

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        ids = self._ids(kv_idx.device)
        if ids.shape[0] == 1:
            b = torch.zeros((), dtype=torch.long, device=kv_idx.device)
        elif b is None:
            raise ValueError("document(segment_ids) with per-batch ids depends on the batch index; pass b")
        return ids[b, _positions(q_idx, q_len, kv_len)] == ids[b, kv_idx]

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        ids = self._ids(device)
        off = kv_len - q_len

        def ranges(x, block):
            n = x.shape[-1]
            nb = -(-n // block)
            pad = nb * block - n
            lo = torch.nn.functional.pad(x, (0, pad), value=torch.iinfo(x.dtype).max).view(-1, nb, block)
            hi = torch.nn.functional.pad(x, (0, pad), value=torch.iinfo(x.dtype).min).view(-1, nb, block)
            return lo.amin(-1), hi.amax(-1)

        ids = ids.long()
        qmin, qmax = ranges(ids[:, off:], block_q)
        kmin, kmax = ranges(ids, block_kv)
        qmin, qmax = qmin[:, :, None], qmax[:, :, None]
        kmin, kmax = kmin[:, None, :], kmax[:, None, :]
        cls = torch.full(torch.broadcast_shapes(qmin.shape, kmin.shape), PARTIAL, dtype=torch.int8,
                         device=device)
        cls[(qmax < kmin) | (kmax < qmin)] = EMPTY
        cls[(qmin == qmax) & (kmin == kmax) & (qmin == kmin)] = FULL
        return cls[:, None]


class _KeyBelow(Pattern):
    """``kv_idx < limit`` (a per-batch limit for padding, a scalar one for prefixes)."""

    def __init__(self, limit: torch.Tensor | int, name: str):
        self.limit, self._name = limit, name
        self.batch_dependent = isinstance(limit, torch.Tensor) and limit.dim() == 1 and limit.numel() > 1

    def _limits(self, device) -> torch.Tensor:
        lim = self.limit if isinstance(self.limit, torch.Tensor) else torch.tensor([self.limit])
        return lim.to(device=device).reshape(-1)

    def check(self, q_len, kv_len, batch, heads):
        lim = self._limits("cpu")
        if lim.numel() not in (1, batch):
            raise ValueError(f"{self._name}: expected one length per batch element ({batch}), got {lim.numel()}")

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        lim = self._limits(kv_idx.device)
        if lim.numel() == 1:
            return kv_idx < lim[0]
        if b is None:
            raise ValueError(f"{self._name} depends on the batch index; pass b")
        return kv_idx < lim[b]

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        lim = self._limits(device).view(-1, 1, 1, 1)
        ks, ke = _tile_bounds(kv_len, block_kv, device)
        nq = -(-q_len // block_q)
        cls = torch.full((lim.shape[0], 1, nq, ks.numel()), PARTIAL, dtype=torch.int8, device=device)
        ks, ke = ks.view(1, 1, 1, -1).expand_as(cls), ke.view(1, 1, 1, -1).expand_as(cls)
        lim = lim.expand_as(cls)
        cls[ks >= lim] = EMPTY
        cls[ke < lim] = FULL
        return cls

    def __repr__(self):
        return self._name


def _broadcast_or_none(a: torch.Size, b: torch.Size) -> torch.Size | None:
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None


class _Custom(Pattern):
    def __init__(self, fn: Callable, batch_dependent: bool, head_dependent: bool):
        self.fn = fn
        self.batch_dependent, self.head_dependent = batch_dependent, head_dependent

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if b is None:
            b = torch.zeros((), dtype=torch.long, device=q_idx.device)
        if h is None:
            h = torch.zeros((), dtype=torch.long, device=q_idx.device)
        out = self.fn(b, h, q_idx, kv_idx)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError("custom(fn): fn(b, h, q_idx, kv_idx) must return a bool tensor")
        expected = torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
        if out.dim() > len(expected) or _broadcast_or_none(out.shape, expected) != expected:
            raise ValueError(
                f"custom(fn): fn(b, h, q_idx, kv_idx) returned shape {tuple(out.shape)}; expected a bool tensor "
                f"broadcastable to {tuple(expected)} (the broadcast shape of its index arguments)"
            )
        return out


class _And(Pattern):
    def __init__(self, a: Pattern, b: Pattern):
        self.a, self.b = a, b
        self.batch_dependent = a.batch_dependent or b.batch_dependent
        self.head_dependent = a.head_dependent or b.head_dependent

    def check(self, *args):
        self.a.check(*args)
        self.b.check(*args)

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return self.a.allowed(b, h, q_idx, kv_idx, q_len, kv_len) & self.b.allowed(b, h, q_idx, kv_idx, q_len,
                                                                                     kv_len)

    def _classify(self, *args):
        ca, cb = self.a.tile_classes(*args[:4], batch=args[4], heads=args[5], device=args[6]), \
            self.b.tile_classes(*args[:4], batch=args[4], heads=args[5], device=args[6])
        # EMPTY wins; FULL only if both FULL. With EMPTY=0 < PARTIAL=1 < FULL=2 that is the minimum.
        return torch.minimum(ca, cb)

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


class _Or(_And):
    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return self.a.allowed(b, h, q_idx, kv_idx, q_len, kv_len) | self.b.allowed(b, h, q_idx, kv_idx, q_len,
                                                                                     kv_len)

    def _classify(self, *args):
        ca, cb = self.a.tile_classes(*args[:4], batch=args[4], heads=args[5], device=args[6]), \
            self.b.tile_classes(*args[:4], batch=args[4], heads=args[5], device=args[6])
        # FULL wins; EMPTY only if both EMPTY: the maximum.
        return torch.maximum(ca, cb)

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


class _Not(Pattern):
    def __init__(self, a: Pattern):
        self.a = a
        self.batch_dependent, self.head_dependent = a.batch_dependent, a.head_dependent

    def check(self, *args):
        self.a.check(*args)

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return ~self.a.allowed(b, h, q_idx, kv_idx, q_len, kv_len)

    def _classify(self, *args):
        return (FULL - self.a.tile_classes(*args[:4], batch=args[4], heads=args[5], device=args[6])).to(
            torch.int8)

    def __repr__(self):
        return f"~{self.a!r}"


# ---------------------------------------------------------------------------------------------------------
# Constructors (the public vocabulary)
# ---------------------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@functools.cache
def full() -> Pattern:
    """Every query attends to every key (dense attention)."""
    return _Full()


def causal() -> Pattern:
    """Query at position ``p`` attends to keys ``j <= p`` (bottom-right aligned when ``q_len < kv_len``)."""
    return _Band(-_INF, 0, "causal()")


def sliding_window(left: int, right: int | None = None) -> Pattern:
    """Keys within ``left`` positions before and ``right`` after the query: ``p - left <= j <= p + right``.

    ``right=None`` means symmetric (``right = left``); ``right=0`` is the causal sliding window of
    "Local Self-Attention over Long Text" and Longformer/Mistral-style decoders.
    """
    left = _check_int("sliding_window(left)", left, 0)
    right = left if right is None else _check_int("sliding_window(right)", right, 0)
    return _Band(-left, right, f"sliding_window({left}, {right})")


def dilated(window: int, dilation: int) -> Pattern:
    """Keys ``j = p + m * dilation`` for ``|m| <= window`` (a window of ``2 * window + 1`` dilated keys)."""
    return _Dilated(_check_int("dilated(window)", window, 0), _check_int("dilated(dilation)", dilation, 1))


def block_local(block_size: int) -> Pattern:
    """Queries attend within their own block: ``p // block_size == j // block_size``."""
    return _BlockLocal(_check_int("block_local(block_size)", block_size, 1))


def strided(stride: int, *, causal: bool = True) -> Pattern:
    """The strided pattern of "Generating Long Sequences with Sparse Transformers" (Child et al., 2019):
    the union of its two heads, the previous ``stride`` keys and every ``stride``-th key back:
    ``0 <= p - j < stride or (p - j) % stride == 0`` (with ``causal=False``, distances in both directions)."""
    return _Strided(_check_int("strided(stride)", stride, 1), causal)


def fixed(block_size: int, num_summary: int, *, causal: bool = True) -> Pattern:
    """The fixed pattern of "Generating Long Sequences with Sparse Transformers": keys in the query's block
    of ``block_size`` plus the last ``num_summary`` "summary" positions of every block."""
    block_size = _check_int("fixed(block_size)", block_size, 1)
    num_summary = _check_int("fixed(num_summary)", num_summary, 0)
    if num_summary > block_size:
        raise ValueError(f"fixed(num_summary={num_summary}) must be <= block_size={block_size}")
    return _Fixed(block_size, num_summary, causal)


def global_tokens(indices: Sequence[int] | torch.Tensor, *, strict: bool = True) -> Pattern:
    """Tokens at ``indices`` attend to everything and are attended by everything (Longformer-style);
    combine with a local pattern: ``sliding_window(128) | global_tokens([0])``. An index at or beyond the
    sequence length is an error, unless ``strict=False`` (a pattern built once for sequences of any length:
    the global tokens a sequence reaches)."""
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if (idx < 0).any():
        raise ValueError("global_tokens(indices): indices must be non-negative")
    return _GlobalTokens(idx, bool(strict))


def document(segment_ids: torch.Tensor) -> Pattern:
    """Packed sequences without cross-contamination ("Efficient Sequence Packing without
    Cross-contamination", Krell et al.): a query attends only to keys of its own segment.
    ``segment_ids``: integer ``[kv_len]`` or ``[batch, kv_len]``; combine with ``causal()`` for decoders."""
    if not isinstance(segment_ids, torch.Tensor):
        segment_ids = torch.as_tensor(segment_ids)
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool or segment_ids.dim() not in (1, 2):
        raise TypeError(
            f"document(segment_ids) takes an integer tensor [kv_len] or [batch, kv_len], got "
            f"{segment_ids.dtype} of shape {tuple(segment_ids.shape)}"
        )
    return _Document(segment_ids)


def prefix_lm(prefix_len: int) -> Pattern:
    """Prefix LM: every query sees the first ``prefix_len`` keys bidirectionally, the rest causally."""
    prefix_len = _check_int("prefix_lm(prefix_len)", prefix_len, 0)
    return causal() | _KeyBelow(prefix_len, f"prefix({prefix_len})")


def key_padding(lengths: torch.Tensor | Sequence[int]) -> Pattern:
    """Batch element ``b`` attends only to its first ``lengths[b]`` keys (right-padded batches)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    if (lengths < 0).any():
        raise ValueError("key_padding(lengths): lengths must be non-negative")
    return _KeyBelow(lengths, f"key_padding({lengths.tolist()})")


def custom(fn: Callable, *, batch_dependent: bool = True, head_dependent: bool = True) -> Pattern:
    """A pattern from a predicate ``fn(b, h, q_idx, kv_idx) -> bool tensor`` on broadcasting index tensors
    (FlexAttention's ``mask_mod`` convention; indices are raw, not bottom-right aligned). Tiles are classified
    by evaluating ``fn`` once per element (cached per shape); say ``batch_dependent=False`` /
    ``head_dependent=False`` when ``fn`` ignores ``b`` / ``h`` to make that cheaper."""
    if not callable(fn):
        raise TypeError("custom(fn): fn must be callable as fn(b, h, q_idx, kv_idx)")
    return _Custom(fn, batch_dependent, head_dependent)


def speed_of_light(pattern: Pattern, q_len: int, kv_len: int | None = None, *, block_q: int = 64,
                   block_kv: int = 64, batch: int = 1, heads: int = 1) -> dict[str, float]:
    """The analytical model of "Generalized Neighborhood Attention": for a tiling, the fraction of tiles
    computed and the upper bound on speed-up over dense attention (dense tiles / computed tiles), beside
    the pattern's exact density (the bound for a perfect, element-sparse kernel)."""
    kv_len = q_len if kv_len is None else kv_len
    cls = pattern.tile_classes(q_len, kv_len, block_q, block_kv, batch=batch, heads=heads)
    cls = cls.amax(dim=(0, 1))  # a tile is computed if any batch element / head needs it
    computed = int((cls != EMPTY).sum())
    total = cls.numel()
    density = pattern.density(q_len, kv_len, batch=batch, heads=heads)
    return {
        "density": density,
        "tile_fraction": computed / total,
        "max_speedup_tiled": total / max(computed, 1),
        "max_speedup_exact": 1 / max(density, 1e-300),
        "block_q": block_q,
        "block_kv": block_kv,
    }
