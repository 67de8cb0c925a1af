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
    "EMPTY", "PARTIAL", "FULL", "Pattern", "full", "causal", "sliding_window", "dilated", "block_local",
    "strided", "fixed", "global_tokens", "document", "prefix_lm", "key_padding", "custom",
    "speed_of_light", "axial", "halo", "per_head_window", "head_strides", "hierarchical", "block_attention",
    "query_from",
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


# ---------------------------------------------------------------------------------------------------------
# Grid, per-head and hierarchical patterns (axial, halo, multi-scale heads, Hepos, HDT, Block-Attention)
# ---------------------------------------------------------------------------------------------------------

def _check_shape(name: str, shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name}: shape must be a tuple of positive ints (the grid, row-major), got {shape!r}")
    return shape


class _Axial(Pattern):
    """Tokens of one line of a row-major grid along ``axis``: ``i // period == j // period`` and
    ``i % stride == j % stride`` (every other coordinate equal), optionally ``j <= i`` (then the line is causal,
    since along one line flat order is axis order)."""

    def __init__(self, shape: tuple[int, ...], axis: int, causal: bool):
        self.shape, self.axis, self.causal = shape, axis, causal
        self._stride = math.prod(shape[axis + 1:])
        self._period = self._stride * shape[axis]

    def check(self, q_len, kv_len, batch, heads):
        n = math.prod(self.shape)
        if kv_len != n or q_len > kv_len:
            raise ValueError(f"axial(shape={self.shape}) needs kv_len == {n} (the flattened grid) and q_len <= "
                             f"kv_len, got q_len={q_len}, kv_len={kv_len}")

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        p = _positions(q_idx, q_len, kv_len)
        per, s = self._period, self._stride
        m = (torch.div(p, per, rounding_mode="floor") == torch.div(kv_idx, per, rounding_mode="floor")) & \
            (torch.remainder(p, s) == torch.remainder(kv_idx, s))
        return m & (kv_idx <= p) if self.causal else m

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        # Exact and O(tiles): within one line-group (same i // period) a pair exists iff some difference
        # j - i in [k_lo - q_hi, k_hi - q_lo] (capped at 0 when causal) is a multiple of the stride; groups
        # strictly inside both ranges always hold the pair (i, i).
        per, s = self._period, self._stride
        qs, qe = _tile_bounds(q_len, block_q, device)
        ks, ke = _tile_bounds(kv_len, block_kv, device)
        off = kv_len - q_len
        qs, qe = (qs + off).view(-1, 1), (qe + off).view(-1, 1)
        ks, ke = ks.view(1, -1), ke.view(1, -1)
        lo = torch.maximum(qs // per, ks // per)
        hi = torch.minimum(qe // per, ke // per)

        def pair_in(o):
            a1, a2 = torch.maximum(qs, o * per), torch.minimum(qe, o * per + per - 1)
            b1, b2 = torch.maximum(ks, o * per), torch.minimum(ke, o * per + per - 1)
            dlo, dhi = b1 - a2, b2 - a1
            if self.causal:
                dhi = torch.clamp(dhi, max=0)
            return torch.div(dhi, s, rounding_mode="floor") * s >= dlo

        nonempty = (lo <= hi) & (pair_in(lo) | pair_in(hi) | (hi - lo >= 2))
        one_group = (qs // per == qe // per) & (ks // per == ke // per) & (qs // per == ks // per)
        full = nonempty & one_group & ((s == 1) | ((qs == qe) & (ks == ke)))
        if self.causal:
            full = full & (ke <= qs)
        cls = torch.full(nonempty.shape, PARTIAL, dtype=torch.int8, device=device)
        cls[~nonempty] = EMPTY
        cls[full] = FULL
        return cls[None, None]


def _decode(idx: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    coords = []
    for n in reversed(shape):
        coords.append(torch.remainder(idx, n))
        idx = torch.div(idx, n, rounding_mode="floor")
    return coords[::-1]


def _box_tile_counts(shape: tuple[int, ...], bounds, block_q: int, block_kv: int, device, chunk: int = 4096):
    """Allowed pairs per tile when every query's keys are a box ``lo_a <= x_a <= hi_a`` on each grid axis
    (``bounds(coords) -> [(lo, hi) per axis]``): keys below each tile edge are counted lexicographically, O(1)
    per (query, edge), so no predicate is evaluated per element."""
    n = math.prod(shape)
    nq, nk = -(-n // block_q), -(-n // block_kv)
    edges = (torch.arange(nk + 1, device=device) * block_kv).clamp(max=n).view(1, -1)
    ecoords = _decode(edges.clamp(max=n - 1), shape)
    out = torch.zeros(nq, nk, dtype=torch.long, device=device)
    chunk = max(block_q, chunk // block_q * block_q)
    for start in range(0, n, chunk):
        qi = torch.arange(start, min(start + chunk, n), device=device)
        box = [(lo.view(-1, 1), hi.view(-1, 1)) for lo, hi in bounds(_decode(qi, shape))]
        sizes = [hi - lo + 1 for lo, hi in box]
        total, prefix = 0, 1
        for a, ((lo, hi), c) in enumerate(zip(box, ecoords)):
            term = torch.clamp(torch.minimum(c, hi + 1) - lo, min=0)
            for size in sizes[a + 1:]:
                term = term * size
            total = total + prefix * term
            prefix = prefix * ((c >= lo) & (c <= hi)).long()
        everything = math.prod(sizes) if len(sizes) > 1 else sizes[0]
        below = torch.where(edges >= n, everything, total)
        out.index_add_(0, torch.div(qi, block_q, rounding_mode="floor"), below[:, 1:] - below[:, :-1])
    qsize = torch.clamp(n - torch.arange(nq, device=device) * block_q, max=block_q)
    ksize = torch.clamp(n - torch.arange(nk, device=device) * block_kv, max=block_kv)
    cls = torch.full((nq, nk), PARTIAL, dtype=torch.int8, device=device)
    cls[out == 0] = EMPTY
    cls[out == qsize.view(-1, 1) * ksize.view(1, -1)] = FULL
    return cls[None, None]


class _Halo(Pattern):
    """HaloNet's blocked local attention: queries in ``block``-sized grid blocks share one key region, the
    block grown by ``halo`` on every side and cut at the grid's borders (padding keys do not exist)."""

    def __init__(self, shape: tuple[int, ...], block: tuple[int, ...], halo: tuple[int, ...]):
        self.shape, self.block, self.halo = shape, block, halo

    def check(self, q_len, kv_len, batch, heads):
        n = math.prod(self.shape)
        if q_len != n or kv_len != n:
            raise ValueError(f"halo(shape={self.shape}) needs q_len == kv_len == {n} (the flattened grid), got "
                             f"q_len={q_len}, kv_len={kv_len}")

    def _bounds(self, coords):
        out = []
        for x, n, b, h in zip(coords, self.shape, self.block, self.halo):
            start = torch.div(x, b, rounding_mode="floor") * b
            out.append(((start - h).clamp(min=0), (start + b - 1 + h).clamp(max=n - 1)))
        return out

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        m = None
        for (lo, hi), y in zip(self._bounds(_decode(q_idx, self.shape)), _decode(kv_idx, self.shape)):
            a = (y >= lo) & (y <= hi)
            m = a if m is None else m & a
        return m

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        return _box_tile_counts(self.shape, self._bounds, block_q, block_kv, device)


class _HaloBlockMajor(Pattern):
    """A halo pattern over tokens reordered block-major (each ``block`` of the grid contiguous, blocks in
    row-major order): what the tiled engine runs, so that a tile of ``prod(block)`` queries is one image block
    sharing one key region. Needs a grid divisible by the block. Tiles that are whole numbers of image blocks are
    classified exactly from the blocks' regions; other tilings fall back to evaluation."""

    def __init__(self, halo: _Halo):
        self.halo = halo
        self.grid = tuple(n // b for n, b in zip(halo.shape, halo.block))
        self.area = math.prod(halo.block)

    def _raster(self, idx: torch.Tensor) -> torch.Tensor:
        """Raster (row-major) index of block-major token ``idx``."""
        blk, inner = torch.div(idx, self.area, rounding_mode="floor"), torch.remainder(idx, self.area)
        bc, ic = _decode(blk, self.grid), _decode(inner, self.halo.block)
        flat = 0
        for g, i, b, n in zip(bc, ic, self.halo.block, self.halo.shape):
            flat = flat * n + g * b + i
        return flat

    def check(self, q_len, kv_len, batch, heads):
        self.halo.check(q_len, kv_len, batch, heads)

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return self.halo.allowed(b, h, self._raster(q_idx), self._raster(kv_idx), q_len, kv_len)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        a = self.area
        if block_q % a or block_kv % a:
            return None
        nb = math.prod(self.grid)
        blocks = torch.arange(nb, device=device)
        qc, kc = _decode(blocks.view(-1, 1), self.grid), _decode(blocks.view(1, -1), self.grid)
        nonempty = full = torch.ones(nb, nb, dtype=torch.bool, device=device)
        for qa, ka, b_, h_, n in zip(qc, kc, self.halo.block, self.halo.halo, self.halo.shape):
            lo, hi = (qa * b_ - h_).clamp(min=0), (qa * b_ + b_ - 1 + h_).clamp(max=n - 1)
            k0, k1 = ka * b_, ka * b_ + b_ - 1
            nonempty = nonempty & (k0 <= hi) & (k1 >= lo)
            full = full & (k0 >= lo) & (k1 <= hi)
        cls = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)
        rq, rk = block_q // a, block_kv // a
        nq, nk = -(-nb // rq), -(-nb // rk)
        padded = torch.nn.functional.pad(cls, (0, nk * rk - nb, 0, nq * rq - nb), value=-1).view(nq, rq, nk, rk)
        lo_ = torch.where(padded < 0, torch.full_like(padded, FULL), padded).amin(dim=(1, 3))
        hi_ = padded.amax(dim=(1, 3))
        out = torch.where(hi_ == EMPTY, EMPTY, torch.where(lo_ == FULL, FULL, PARTIAL)).to(torch.int8)
        return out[None, None]


class _PerHeadBand(Pattern):
    """Head ``h`` sees keys ``p - left[h] <= j <= p + right[h]`` (infinite entries: unbounded)."""

    head_dependent = True

    def __init__(self, left: tuple[float, ...], right: tuple[float, ...], name: str):
        self.left, self.right, self._name = left, right, name

    def check(self, q_len, kv_len, batch, heads):
        if heads != len(self.left):
            raise ValueError(f"{self._name} has {len(self.left)} per-head entries but the input has {heads} query "
                             f"heads; give one per head")

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if h is None:
            raise ValueError(f"{self._name} depends on the head index; pass h")
        dev = kv_idx.device
        left = torch.tensor(self.left, dtype=torch.float64, device=dev)[h]
        right = torch.tensor(self.right, dtype=torch.float64, device=dev)[h]
        d = (kv_idx - _positions(q_idx, q_len, kv_len)).to(torch.float64)
        return (d >= -left) & (d <= right)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        return torch.cat([_band_classes(-lo, hi, q_len, kv_len, block_q, block_kv, device)
                          for lo, hi in zip(self.left, self.right)], dim=1)

    def __repr__(self):
        return self._name


class _HeadStrides(Pattern):
    """Hepos: head ``h`` sees keys ``j`` with ``j % stride == h % stride``."""

    head_dependent = True

    def __init__(self, stride: int):
        self.stride = stride

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if h is None:
            raise ValueError("head_strides depends on the head index; pass h")
        return torch.remainder(kv_idx, self.stride) == torch.remainder(h, self.stride)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        s = self.stride
        ks, ke = _tile_bounds(kv_len, block_kv, device)
        r = torch.remainder(torch.arange(heads, device=device), s).view(-1, 1)
        first = ks.view(1, -1) + torch.remainder(r - ks.view(1, -1), s)  # first key of residue r in the tile
        nonempty = first <= ke.view(1, -1)
        full = nonempty & ((s == 1) | (ks == ke).view(1, -1))
        cls = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)
        return cls[None, :, None, :].expand(1, heads, -(-q_len // block_q), ks.numel())


def _id_ranges(ids: torch.Tensor, member: torch.Tensor, block: int):
    """Per block of the last axis: min and max of ``ids`` over members, member count and block size."""
    n = ids.shape[-1]
    nb = -(-n // block)
    pad = nb * block - n
    big = torch.iinfo(torch.long).max
    lo = torch.nn.functional.pad(torch.where(member, ids, big), (0, pad), value=big).view(*ids.shape[:-1], nb, block)
    hi = torch.nn.functional.pad(torch.where(member, ids, -big), (0, pad), value=-big).view(*ids.shape[:-1], nb, block)
    count = torch.nn.functional.pad(member.long(), (0, pad)).view(*ids.shape[:-1], nb, block).sum(-1)
    size = torch.clamp(n - torch.arange(nb, device=ids.device) * block, max=block)
    return lo.amin(-1), hi.amax(-1), count, size


class _Hierarchical(Pattern):
    """HDT: level-``L`` group ``g`` holds the tokens at levels ``L`` and ``L + 1`` whose level-``L + 1`` unit
    is ``g``; two tokens may attend iff they share a group at some level."""

    def __init__(self, levels: torch.Tensor, group_ids: torch.Tensor):
        self.levels, self.group_ids = levels, group_ids  # [B|1, n], [B|1, depth, n]
        self.batch_dependent = levels.shape[0] > 1

    def check(self, q_len, kv_len, batch, heads):
        n = self.levels.shape[-1]
        if q_len != n or kv_len != n:
            raise ValueError(f"hierarchical(levels) describes {n} tokens; q_len and kv_len must both be {n}, got "
                             f"{q_len}, {kv_len}")
        if self.levels.shape[0] not in (1, batch):
            raise ValueError(f"hierarchical(levels) has {self.levels.shape[0]} rows for a batch of {batch}")

    def _terms(self, device):
        lv, gid = self.levels.to(device), self.group_ids.to(device)
        for lvl in range(gid.shape[1]):
            yield (lv == lvl) | (lv == lvl + 1), gid[:, lvl]

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        if self.levels.shape[0] == 1:
            b = torch.zeros((), dtype=torch.long, device=kv_idx.device)
        elif b is None:
            raise ValueError("hierarchical(levels) with per-batch structure depends on the batch index; pass b")
        out = None
        for member, ids in self._terms(kv_idx.device):
            m = member[b, q_idx] & member[b, kv_idx] & (ids[b, q_idx] == ids[b, kv_idx])
            out = m if out is None else out | m
        return out

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        # Per level, a document mask restricted to the level's members: tiles are EMPTY when the members' id
        # ranges are disjoint, FULL when every token is a member and all ids are one; levels combine by OR.
        out = None
        for member, ids in self._terms(device):
            qlo, qhi, qn, qsize = _id_ranges(ids, member, block_q)
            klo, khi, kn, ksize = _id_ranges(ids, member, block_kv)
            qlo, qhi, qn = qlo[:, :, None], qhi[:, :, None], qn[:, :, None]
            klo, khi, kn = klo[:, None], khi[:, None], kn[:, None]
            empty = (qn == 0) | (kn == 0) | (qhi < klo) | (khi < qlo)
            full = (qn == qsize.view(-1, 1)) & (kn == ksize.view(1, -1)) & (qlo == qhi) & (klo == khi) & (qlo == klo)
            cls = torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)
            out = cls if out is None else torch.maximum(out, cls)
        return out[:, None]


class _QueryFrom(Pattern):
    """Queries at positions ``p >= start`` see every key (Block-Attention's final block)."""

    def __init__(self, start: int):
        self.start = start

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return (_positions(q_idx, q_len, kv_len) >= self.start) & (kv_idx >= 0)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        qs, qe = _tile_bounds(q_len, block_q, device)
        off = kv_len - q_len
        row = torch.where(qs + off >= self.start, FULL, torch.where(qe + off < self.start, EMPTY, PARTIAL))
        return row.to(torch.int8).view(1, 1, -1, 1).expand(1, 1, -1, -(-kv_len // block_kv))

    def __repr__(self):
        return f"query_from({self.start})"


def axial(shape: Sequence[int], axis: int, *, causal: bool = False) -> Pattern:
    """Axial attention ("Axial Attention in Multidimensional Transformers", Ho et al., 2019, Sec. 3): over the
    row-major flattening of a grid of ``shape`` (any number of axes, any lengths), a token attends to the
    tokens that differ from it only in coordinate ``axis`` (its row, column, ...). ``causal=True`` is the masked
    axial attention of the Axial Transformer (keys at or before the query along the axis). Tiles are classified
    exactly and analytically, so the tiled engine runs it block-sparse; the Transformer's shifts are
    ``attnkit.ops.exact.variants.axial_shift``."""
    shape = _check_shape("axial", shape)
    if isinstance(axis, bool) or not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
        raise ValueError(f"axial(axis) must be an int in [{-len(shape)}, {len(shape)}), got {axis!r}")
    return _Axial(shape, axis % len(shape), bool(causal))


def halo(shape: Sequence[int], block: int | Sequence[int], halo: int | Sequence[int]) -> Pattern:
    """HaloNet's blocked local attention with halo ("Scaling Local Self-Attention for Parameter Efficient Visual
    Backbones", Vaswani et al., 2021, Sec. 3.1): the grid ``shape`` (row-major flattened) is cut in
    non-overlapping ``block`` blocks; every query of a block attends to the ``(block + 2 * halo)`` region around
    it, truncated at the borders (the paper's zero padding is masked: padded keys do not exist)."""
    shape = _check_shape("halo", shape)
    nd = len(shape)
    block = (block,) * nd if isinstance(block, int) else tuple(block)
    size = (halo,) * nd if isinstance(halo, int) else tuple(halo)
    if len(block) != nd or len(size) != nd:
        raise ValueError(f"halo(block, halo) need one value or one per axis ({nd}), got {block!r}, {size!r}")
    for b_ in block:
        _check_int("halo(block)", b_, 1)
    for h_ in size:
        _check_int("halo(halo)", h_, 0)
    return _Halo(shape, block, size)


def per_head_window(windows: Sequence[int | None], *, causal: bool = False) -> Pattern:
    """Multi-scale heads ("Multi-Scale Self-Attention for Text Classification", Guo et al., 2020, Sec. 3):
    head ``h`` attends to keys with ``|p - j| <= windows[h]`` (``None``: the whole sequence); ``causal=True``
    keeps ``p - windows[h] <= j <= p``. Tile classes are exact per head (one band per head)."""
    windows = list(windows)
    if not windows:
        raise ValueError("per_head_window(windows) needs one window per head")
    left = tuple(_INF if w is None else float(_check_int("per_head_window(windows[h])", w, 0)) for w in windows)
    right = tuple(0.0 for _ in left) if causal else left
    return _PerHeadBand(left, right, f"per_head_window({windows}, causal={causal})")


def head_strides(stride: int) -> Pattern:
    """Hepos, head-wise positional strides ("Efficient Attentions for Long Document Summarization", Huang et
    al., 2021, Sec. 3.2): head ``h`` attends to source positions ``j`` with ``j % stride == h % stride``, so the
    heads together cover every source token. Exact analytic tile classes per head."""
    return _HeadStrides(_check_int("head_strides(stride)", stride, 1))


def hierarchical(levels: torch.Tensor, group_ids: torch.Tensor) -> Pattern:
    """HDT's hierarchical anchor mask ("HDT: Hierarchical Document Transformer", He et al., 2024, Sec. 3.2).

    ``levels [n]`` (or ``[batch, n]``): 0 for ordinary tokens, ``l >= 1`` for an anchor of level ``l``
    ([SENT] = 1, [SEC] = 2, [DOC] = 3). ``group_ids [depth, n]`` (or ``[batch, depth, n]``): ``group_ids[l, i]``
    is the id of the level-``l + 1`` unit holding token ``i`` (for an anchor of level ``l + 1``, its own unit).
    Tokens attend within their sentence and its anchor, sentence anchors within their section and its anchor,
    and so on: the mask is symmetric and joins any two tokens within ``2 * depth`` hops. Build ``levels`` and
    ``group_ids`` from sentence lengths with ``attnkit.ops.exact.variants.hdt_layout``."""
    levels, group_ids = torch.as_tensor(levels), torch.as_tensor(group_ids)
    if levels.dtype.is_floating_point or group_ids.dtype.is_floating_point or levels.dim() not in (1, 2) \
            or group_ids.dim() != levels.dim() + 1 or group_ids.shape[-1] != levels.shape[-1]:
        raise ValueError(f"hierarchical(levels, group_ids): integer levels [n] or [batch, n] and group_ids "
                         f"[depth, n] or [batch, depth, n], got {tuple(levels.shape)} and {tuple(group_ids.shape)}")
    if levels.dim() == 1:
        levels, group_ids = levels[None], group_ids[None]
    if (levels < 0).any() or (levels > group_ids.shape[1]).any():
        raise ValueError(f"hierarchical(levels): levels must lie in [0, depth={group_ids.shape[1]}]")
    return _Hierarchical(levels.long(), group_ids.long())


def query_from(start: int) -> Pattern:
    """Queries at positions ``>= start`` attend to every key (combine with ``causal()``)."""
    return _QueryFrom(_check_int("query_from(start)", start, 0))


def block_attention(block_lengths: Sequence[int]) -> Pattern:
    """Block-Attention ("Block-Attention for Efficient RAG", Sun et al., 2024, Sec. 2): the sequence is the
    blocks of ``block_lengths`` in order; every block but the last (retrieved passages) attends causally within
    itself, the last block (question and answer) attends causally to everything. ``causal() & (document(ids) |
    query_from(start of the last block))``, so tiles stay analytic."""
    lengths = [_check_int("block_attention(block_lengths[i])", n, 1) for n in block_lengths]
    if not lengths:
        raise ValueError("block_attention(block_lengths) needs at least one block")
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return causal() & (document(ids) | query_from(sum(lengths[:-1])))
