"""Helpers around exact-attention patterns: varlen packing (cu_seqlens, per-document positions, the packing
algorithms of Krell et al.), Axial Transformer shifts, HDT layouts, Block-Attention's key re-rotation and
register tokens.

Sequences are packed along the token axis: ``[total, ...]`` tensors with ``cu_seqlens [num_docs + 1]`` (int64,
``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == total``), the convention of FlashAttention's varlen functions.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence

import torch

from attnkit import patterns as P

__all__ = [
    "cu_seqlens_from_lengths", "segment_ids", "position_ids", "varlen_pattern", "pack", "unpack", "pack_spfhp",
    "pack_nnlshp", "axial_shift", "hdt_layout", "rerotate", "add_registers", "strip_registers",
]


# ---------------------------------------------------------------------------------------------------------
# Varlen packing ("Efficient Sequence Packing without Cross-contamination", Krell et al., 2021)
# ---------------------------------------------------------------------------------------------------------

def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    """Cumulative sequence lengths ``[0, l0, l0 + l1, ...]`` (int64)."""
    raw = torch.as_tensor(lengths, device=device).reshape(-1)
    if raw.dtype == torch.bool or (raw.numel() and not bool((raw == raw.round()).all())):
        raise ValueError(f"lengths must be whole numbers of tokens, got {raw.tolist()}")
    lengths = raw.long()
    if (lengths < 0).any():
        raise ValueError("lengths must be non-negative")
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Validate ``cu_seqlens`` against ``total`` tokens; returns it as int64."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be an integer tensor [num_docs + 1] starting at 0 "
                         "(see attnkit.ops.exact.variants.cu_seqlens_from_lengths)")
    cu = cu_seqlens.long()
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at the number of packed tokens "
                         f"({total}), got {cu.tolist()}")
    return cu


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Document index of every packed token ``[total]``."""
    cu = check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]) if isinstance(cu_seqlens, torch.Tensor)
                          and cu_seqlens.dim() == 1 and cu_seqlens.numel() else -1)
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])


def position_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 in every document ``[total]`` (Krell et al., Sec. 4: needed so that RoPE or
    learned positions see each packed sequence as if alone)."""
    cu = cu_seqlens.long()
    seg = segment_ids(cu)
    return torch.arange(seg.numel(), device=cu.device) - cu[seg]


def varlen_pattern(cu_seqlens: torch.Tensor, *, causal: bool = False) -> P.Pattern:
    """The block-diagonal mask of packed documents (``& causal()`` for decoders): tiles between documents are
    EMPTY, so the tiled engine's cost is the sum of the documents' own costs (plus boundary tiles)."""
    p = P.document(segment_ids(cu_seqlens))
    return P.causal() & p if causal else p


def pack(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``[L_i, ...]`` tensors along their first axis; returns ``(packed [sum L_i, ...], cu_seqlens)``."""
    if not sequences:
        raise ValueError("pack(sequences) needs at least one sequence")
    lengths = [s.shape[0] for s in sequences]
    return torch.cat(list(sequences), dim=0), cu_seqlens_from_lengths(lengths, device=sequences[0].device)


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
    """Split ``packed`` along ``dim`` at ``cu_seqlens`` (the inverse of ``pack``)."""
    if not isinstance(packed, torch.Tensor) or not -packed.dim() <= dim < packed.dim():
        raise ValueError(f"packed must be a tensor with an axis dim={dim}, got "
                         f"{getattr(packed, 'shape', type(packed).__name__)}")
    cu = check_cu_seqlens(cu_seqlens, packed.shape[dim]).tolist()  # non-monotone offsets would reach narrow()
    return [packed.narrow(dim, a, b - a) for a, b in zip(cu[:-1], cu[1:])]


def _check_packing_args(lengths, max_len, max_per_pack):
    lengths = [int(n) for n in lengths]
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if any(n < 1 or n > max_len for n in lengths):
        raise ValueError(f"every length must lie in [1, max_len={max_len}]; truncate longer sequences first")
    if max_per_pack is not None and max_per_pack < 1:
        raise ValueError(f"max_per_pack must be >= 1 or None, got {max_per_pack}")
    return lengths


def _assign(lengths: list[int], strategies: list[tuple[tuple[int, ...], int]]) -> list[list[int]]:
    """Turn (multiset of lengths, repeat count) strategies into packs of sequence indices."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        by_len[n].append(i)
    packs = []
    for combo, count in strategies:
        for _ in range(count):
            packs.append([by_len[n].pop() for n in combo])
    return packs


def _spfhp_histogram(hist: dict[int, int], max_len: int, max_per_pack: int | None):
    # Strategies: (remaining space, lengths in the pack) -> number of packs with that content.
    open_: dict[tuple[int, tuple[int, ...]], int] = defaultdict(int)
    for n in sorted(hist, reverse=True):
        count = hist[n]
        while count:
            fits = [key for key in open_ if open_[key] and key[0] >= n
                    and (max_per_pack is None or len(key[1]) < max_per_pack)]
            if not fits:
                open_[(max_len - n, (n,))] += count
                break
            key = min(fits, key=lambda k: k[0])  # best fit: the pack with the least room that still fits
            moved = min(count, open_[key])
            open_[key] -= moved
            open_[(key[0] - n, key[1] + (n,))] += moved
            count -= moved
    return [(combo, c) for (_, combo), c in open_.items() if c]


def pack_spfhp(lengths: Sequence[int], max_len: int, max_per_pack: int | None = None) -> list[list[int]]:
    """Shortest-pack-first histogram packing (SPFHP; Krell et al., Sec. 3.2): over the histogram of lengths,
    longest first, each sequence goes into the open pack with the least remaining room that fits it (a new pack
    when none does). Works on histogram bins (packs with equal content move together), so it costs
    O(distinct lengths x open strategies), not O(sequences). Returns packs as lists of indices into ``lengths``."""
    lengths = _check_packing_args(lengths, max_len, max_per_pack)
    hist: dict[int, int] = defaultdict(int)
    for n in lengths:
        hist[n] += 1
    return _assign(lengths, _spfhp_histogram(hist, max_len, max_per_pack))


def pack_nnlshp(lengths: Sequence[int], max_len: int, max_per_pack: int = 3,
                max_strategies: int = 200_000) -> list[list[int]]:
    """Non-negative least-squares histogram packing (NNLSHP; Krell et al., Sec. 3.3): enumerate every packing
    strategy (a multiset of at most ``max_per_pack`` lengths present in the data with sum <= ``max_len``), solve
    ``min ||A x - h||, x >= 0`` for how often to use each (``A[l, s]``: sequences of length ``l`` in strategy
    ``s``; ``h``: the histogram), take ``floor(x)`` (never more sequences than exist) and pack the rest with
    SPFHP. Needs SciPy (``pip install scipy``)."""
    lengths = _check_packing_args(lengths, max_len, max_per_pack)
    try:
        from scipy.optimize import nnls
    except ImportError as e:  # pragma: no cover - scipy is an optional extra
        raise ImportError("pack_nnlshp needs SciPy: pip install 'attnkit[packing]' (or use pack_spfhp)") from e
    import numpy as np

    hist: dict[int, int] = defaultdict(int)
    for n in lengths:
        hist[n] += 1
    values = sorted(hist)
    strategies = []
    for k in range(1, max_per_pack + 1):
        for combo in itertools.combinations_with_replacement(values, k):
            if sum(combo) <= max_len:
                strategies.append(combo)
                if len(strategies) > max_strategies:
                    raise ValueError(f"more than {max_strategies} packing strategies; lower max_per_pack or use "
                                     f"pack_spfhp")
    row = {n: i for i, n in enumerate(values)}
    a = np.zeros((len(values), len(strategies)))
    for s, combo in enumerate(strategies):
        for n in combo:
            a[row[n], s] += 1
    h = np.array([hist[n] for n in values], dtype=float)
    # The paper penalises padding: among the (many) strategy mixes that fit the histogram, prefer few packs. With
    # the total token count fixed, padding = packs * max_len - tokens, so a small weight on the pack count does it.
    x, _ = nnls(np.vstack([a, np.full((1, len(strategies)), 0.1)]), np.append(h, 0.0))
    remaining = dict(hist)
    chosen = []
    order = np.argsort(-np.array([sum(c) for c in strategies]))  # fullest strategies first
    for s in order:
        combo = strategies[s]
        need: dict[int, int] = defaultdict(int)
        for n in combo:
            need[n] += 1
        count = int(np.floor(x[s] + 1e-9))
        count = min([count] + [remaining[n] // c for n, c in need.items()])
        if count > 0:
            chosen.append((combo, count))
            for n, c in need.items():
                remaining[n] -= c * count
    rest = {n: c for n, c in remaining.items() if c}
    chosen += _spfhp_histogram(rest, max_len, max_per_pack) if rest else []
    return _assign(lengths, chosen)


# ---------------------------------------------------------------------------------------------------------
# Axial Transformer shifts, HDT layouts, Block-Attention re-rotation, registers
# ---------------------------------------------------------------------------------------------------------

def axial_shift(x: torch.Tensor, shape: Sequence[int], axis: int, amount: int = 1) -> torch.Tensor:
    """Shift tokens ``x [..., prod(shape), dim]`` (row-major over the grid ``shape``) by ``amount`` along grid
    ``axis``, filling with zeros: the Axial Transformer's "shift down" (axis 0) and "shift right" (last axis)
    that make masked axial attention autoregressive in raster order (Ho et al., 2019, Sec. 4)."""
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    if x.shape[-2] != n:
        raise ValueError(f"axial_shift: x has {x.shape[-2]} tokens, the grid {shape} has {n}")
    if amount < 0 or amount > shape[axis]:
        raise ValueError(f"axial_shift(amount) must lie in [0, {shape[axis]}], got {amount}")
    g = x.reshape(*x.shape[:-2], *shape, x.shape[-1])
    dim = g.dim() - 1 - len(shape) + axis
    out = torch.zeros_like(g)
    length = shape[axis]
    out.narrow(dim, amount, length - amount).copy_(g.narrow(dim, 0, length - amount))
    return out.reshape(x.shape)


def hdt_layout(document: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token layout of HDT (He et al., 2024, Sec. 3.1) for a document given as sections of sentence lengths:
    ``[DOC] ([SEC] ([SENT] tokens...)...)...``. Returns ``(levels [n], group_ids [3, n], is_token [n])`` for
    ``attnkit.patterns.hierarchical`` (levels: 0 token, 1 [SENT], 2 [SEC], 3 [DOC])."""
    levels, sent, sec = [3], [-1], [-1]
    s_id = 0
    for c, sentences in enumerate(document):
        levels.append(2)
        sent.append(-1)
        sec.append(c)
        for n in sentences:
            if n < 1:
                raise ValueError("hdt_layout: every sentence needs at least one token")
            levels += [1] + [0] * n
            sent += [s_id] * (n + 1)
            sec += [c] * (n + 1)
            s_id += 1
    levels_t = torch.tensor(levels)
    group_ids = torch.stack([torch.tensor(sent), torch.tensor(sec), torch.zeros(len(levels), dtype=torch.long)])
    return levels_t, group_ids, levels_t == 0


def rerotate(k: torch.Tensor, delta: int | torch.Tensor, rotary) -> torch.Tensor:
    """Move RoPE-rotated keys ``k [batch, heads, seq, dim]`` by ``delta`` positions: ``RoPE(k, p + delta) =
    R(delta) RoPE(k, p)`` (Block-Attention, Sec. 2.3: passages cached at position 0 are re-encoded at their
    offset in the assembled prompt). ``rotary``: the ``attnkit.nn.RotaryEmbedding`` that rotated them."""
    from attnkit.rotary import apply_rotary

    pos = torch.as_tensor(delta, device=k.device).reshape(-1)
    cos, sin = rotary.angles(pos)
    return apply_rotary(k, cos, sin)


def add_registers(x: torch.Tensor, registers: torch.Tensor, *, after: int = 0) -> torch.Tensor:
    """Insert ``registers [R, channels]`` into ``x [batch, seq, channels]`` after the first ``after`` tokens
    (after [CLS]: ``after=1``), as "Vision Transformers Need Registers" (Darcet et al., 2024, Sec. 2.2)."""
    if registers.dim() != 2 or registers.shape[-1] != x.shape[-1]:
        raise ValueError(f"registers must be [R, {x.shape[-1]}], got {tuple(registers.shape)}")
    reg = registers.to(x.dtype).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :after], reg, x[:, after:]], dim=1)


def strip_registers(y: torch.Tensor, num_registers: int, *, after: int = 0) -> torch.Tensor:
    """Drop the register outputs again (the paper discards them at the output)."""
    return torch.cat([y[:, :after], y[:, after + num_registers:]], dim=1)


def grid_shape(n: int) -> tuple[int, int]:
    """A near-square 2-D grid ``(rows, cols)`` with ``rows * cols == n`` (rows <= cols), for mechanisms that read
    a flat sequence as an image when no shape is given."""
    rows = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0) if n > 0 else 1
    return rows, n // rows if n > 0 else 1


def axial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Sequence[int], axis: int, *,
                    causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Axial attention by moving the axis last (one transposed copy of q, k, v) and running every line as a batch
    element of dense attention (SDPA): the same operator as ``attention(pattern=axial(shape, axis))``, without
    the strided masks a non-contiguous axis (columns) puts on every tile. ``q, k, v [batch, heads, prod(shape),
    dim]`` (self-attention over the grid)."""
    from attnkit._checks import check_qkv, repeat_kv

    check_qkv(q, k, v)
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    if q.shape[2] != n or k.shape[2] != n:
        raise ValueError(f"axial_attention: q and k must hold the {n} tokens of the grid {shape}, got "
                         f"{q.shape[2]} and {k.shape[2]}")
    axis = axis % len(shape)
    b, h = q.shape[:2]
    k, v = repeat_kv(k, h), repeat_kv(v, h)

    def to_lines(x):
        g = x.reshape(b, h, *shape, x.shape[-1]).movedim(2 + axis, -2)
        return g.reshape(b, -1, shape[axis], x.shape[-1]), g.shape

    (ql, _), (kl, _), (vl, moved) = to_lines(q), to_lines(k), to_lines(v)
    out = torch.nn.functional.scaled_dot_product_attention(
        ql, kl, vl, is_causal=causal, scale=scale if scale is not None else q.shape[-1] ** -0.5)
    return out.reshape(moved).movedim(-2, 2 + axis).reshape(b, h, n, v.shape[-1])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Packed documents run one by one through dense attention (SDPA): exactly ``attention(cu_seqlens=...)``,
    O(sum_s L_s^2 d) with no partial boundary tiles; a Python loop over documents, so for many short documents
    the block-sparse ``attention(cu_seqlens=)`` is the better call. ``q, k, v [batch, heads, total, dim]``."""
    from attnkit._checks import check_qkv, repeat_kv

    check_qkv(q, k, v)
    cu = check_cu_seqlens(cu_seqlens, k.shape[2]).tolist()
    h = q.shape[1]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            ks, vs = repeat_kv(k[:, :, a:b], h), repeat_kv(v[:, :, a:b], h)
            outs.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], ks, vs, is_causal=causal,
                                                                         scale=scale))
    return torch.cat(outs, dim=2)
