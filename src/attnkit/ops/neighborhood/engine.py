"""The neighborhood-attention fast path: query tiles laid out over the spatial grid, one key *box* per tile.

Queries are tiled per axis in dilation-group coordinates (a tile of ``t`` positions of one dilation group),
and a multi-dimensional query tile is the product of one tile per axis, so its keys form a small box of
the grid (``t + k - 1`` positions per axis for stride 1), as in "Faster Neighborhood Attention" and
"Generalized Neighborhood Attention" (multi-dimensional tiling). Per chunk of tiles the engine gathers
each tile's box of keys and values once and runs two batched matmuls with one fused softmax between them:
a query's whole window lies in its tile's box, so no running max / sum is needed. Positions of the box
outside a query's window are masked by an additive 0/-inf bias that ``baddbmm`` adds inside the score
matmul; tiles are grouped by mask class (interior tiles share one mask; tiles whose windows cover the whole
box, as in blocked attention, need none). Memory is linear in the number of tokens: the largest buffers
are the tiled queries and outputs and one chunk of boxes. The backward pass recomputes each chunk's
softmax (FlashAttention style, without a saved log-sum-exp: the box holds the whole row) and scatters
key/value gradients with ``index_add_``.

On CPU, for softmax without a score modifier and ``d == d_v`` (``can_fuse``; switch: ``USE_FUSED_CPU_KERNEL``),
a second path runs ATen's fused flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward: scores, mask, online softmax and PV in one cache-resident pass, as ``attnkit.ops.exact.tiled``) with
the tiles in the kernel's heads dimension. Its key boxes are not gathered but *views*: keys are gathered once
into per-inner-tile *strips* over the outer axis, where each tile's box is a contiguous range of rows, so a run
of equally spaced boxes is one overlapping ``as_strided`` view (``FusedPlan``). The forward saves the output
and log-sum-exp; the backward calls the backward kernel on the same views and sums box gradients into strips
with dense strided adds. Score modifiers (rpb), ``d != d_v`` and CUDA keep the general path.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from attnkit.patterns.windows import AxisSpec, NASpec, group_bounds
from attnkit.score_mods import ScoreMod

__all__ = ["Plan", "make_plan", "choose_tiles", "neighborhood_tiled", "box_fraction", "FusedPlan", "make_fused_plan",
           "can_fuse"]

_CHUNK_ELEMENTS = 1 << 19  # scores per chunk: a few MiB, stays in cache
_PER_HEAD_MAX = 64  # row gathers / scatters loop over (batch, head) on CPU up to this many of them


@dataclass
class _AxisPlan:
    tile: int
    box: int
    q: torch.Tensor  # [nT, tile] query coordinates (clamped into the axis; see q_valid)
    q_valid: torch.Tensor  # [nT, tile]
    k: torch.Tensor  # [nT, box] key coordinates of each tile's box
    mask: torch.Tensor  # [nT, tile, box]: key in the query's window (and not a duplicate box slot)
    group: torch.Tensor  # [nT] dilation group of each tile
    start: torch.Tensor  # [nT] first box slot of each tile, in group positions


def _axis_plan(axis: AxisSpec, tile: int) -> _AxisPlan:
    d = axis.dilation
    tile = max(1, min(tile, min(axis.group_length(g) for g in range(d))))
    per_group = []
    box = 1
    for g in range(d):
        length = axis.group_length(g)
        nt = -(-length // tile)
        x = torch.arange(nt).view(-1, 1) * tile + torch.arange(tile)
        valid = x < length
        x = x.clamp(max=length - 1)
        lo, hi = group_bounds(x, length, axis.kernel, axis.stride, axis.causal)
        start, end = lo.amin(1), hi.amax(1)
        box = max(box, int((end - start + 1).max()))
        per_group.append((g, length, x, valid, lo, hi, start))
    qs, qv, ks, ms, gs, ss = [], [], [], [], [], []
    for g, length, x, valid, lo, hi, start in per_group:
        # One box length for every tile (batched matmuls); boxes stay inside the group where they fit,
        # and slots beyond a short group are duplicates, masked out.
        start = torch.clamp(torch.minimum(start, torch.tensor(length - box)), min=0)
        t = start.view(-1, 1) + torch.arange(box)
        in_group = t < length
        t = t.clamp(max=length - 1)
        m = (t[:, None, :] >= lo[:, :, None]) & (t[:, None, :] <= hi[:, :, None]) & in_group[:, None, :]
        qs.append(g + d * x)
        qv.append(valid)
        ks.append(g + d * t)
        ms.append(m)
        gs.append(torch.full_like(start, g))
        ss.append(start)
    return _AxisPlan(tile, box, torch.cat(qs), torch.cat(qv), torch.cat(ks), torch.cat(ms), torch.cat(gs),
                     torch.cat(ss))


@dataclass
class Plan:
    """Tiles of one problem: flat query / key indices per tile and the window mask."""

    spec: NASpec
    tiles: tuple[int, ...]
    num_tiles: int
    tile_q: int  # queries per tile
    box_k: int  # keys per box
    q_index: torch.Tensor  # [num_tiles, tile_q] flat query index (clamped duplicates where not valid)
    q_write: torch.Tensor  # [num_tiles * tile_q] flat index to write, num_tokens for padding slots
    has_padding: bool
    q_valid: torch.Tensor  # [num_tiles, tile_q]
    k_index: torch.Tensor  # [num_tiles, box_k]
    # Tiles are sorted by *mask class*: tiles whose (query, box slot) masks are equal (all interior tiles of
    # plain NA share one) form a run; ``runs`` lists ``(first tile, end tile, class)``. ``bias[c]`` is the
    # class's mask as an additive ``[tile_q, box_k]`` bias (0 or -inf), which the score matmul adds for free
    # (``baddbmm``) where a boolean ``masked_fill`` over every score costs as much as the matmul itself.
    bias: torch.Tensor  # [num_classes, tile_q, box_k] float32
    masked: tuple[bool, ...]  # per class: whether any pair of the box is outside a window
    runs: tuple[tuple[int, int, int], ...]


def _combine(parts: list[torch.Tensor], op) -> torch.Tensor:
    """Outer combination over axes of per-axis ``[nT_a, n_a]`` tensors into ``[prod nT, prod n]``."""
    nd = len(parts)
    out = None
    for a, p in enumerate(parts):
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = p.shape
        v = p.view(shape)
        out = v if out is None else op(out, v)
    nt = math.prod(p.shape[0] for p in parts)
    return out.reshape(nt, -1)


def make_plan(spec: NASpec, tiles: tuple[int, ...], device) -> Plan:
    axes = [_axis_plan(a, t) for a, t in zip(spec.axes, tiles)]
    strides = [math.prod(spec.shape[a + 1:]) for a in range(spec.ndim)]
    q_index = _combine([ap.q * s for ap, s in zip(axes, strides)], torch.add)
    k_index = _combine([ap.k * s for ap, s in zip(axes, strides)], torch.add)
    q_valid = _combine([ap.q_valid for ap in axes], torch.logical_and)
    # Mask classes, per axis first: a tile's mask is the outer AND of its per-axis [tile, box] masks (none of
    # them empty), so two tiles share a mask iff they share every per-axis mask. Classing the small per-axis
    # masks avoids materialising the [tiles, tile_q, box_k] mask of the whole problem.
    nd = spec.ndim
    per_axis = [torch.unique(ap.mask.flatten(1), dim=0, return_inverse=True) for ap in axes]
    sizes = [u.shape[0] for u, _ in per_axis]
    radix = [math.prod(sizes[a + 1:]) for a in range(nd)]
    cls = _combine([(inv * r).view(-1, 1) for (_, inv), r in zip(per_axis, radix)], torch.add).view(-1)
    order = torch.argsort(cls, stable=True)
    q_index, q_valid, k_index, cls = q_index[order], q_valid[order], k_index[order], cls[order]
    num_classes = math.prod(sizes)
    counts = torch.bincount(cls, minlength=num_classes).tolist()
    runs, start = [], 0
    for c, count in enumerate(counts):
        if count:
            runs.append((start, start + count, c))
        start += count
    tq, bk = q_index.shape[1], k_index.shape[1]
    allowed = None  # [classes, tile_q, box_k]: outer AND over axes of the per-axis class masks
    for a, ((u, _), ap) in enumerate(zip(per_axis, axes)):
        shape = [1] * (3 * nd)  # (class_0.., tile_0.., box_0..), row-major like cls, q_index and k_index
        shape[a], shape[nd + a], shape[2 * nd + a] = u.shape[0], ap.tile, ap.box
        v = u.view(shape)
        allowed = v if allowed is None else allowed & v
    allowed = allowed.reshape(num_classes, tq, bk)
    bias = torch.zeros(num_classes, tq, bk).masked_fill_(~allowed, float("-inf"))
    masked = tuple(bool(x) for x in (~allowed).flatten(1).any(1))
    n = spec.num_tokens
    q_write = torch.where(q_valid, q_index, torch.full_like(q_index, n)).reshape(-1)
    return Plan(spec, tuple(ap.tile for ap in axes), q_index.shape[0], tq, bk, q_index.to(device), q_write.to(device),
                bool((~q_valid).any()), q_valid.to(device), k_index.to(device), bias.to(device), masked,
                tuple(runs))


@functools.lru_cache(maxsize=32)
def _cached_plan(spec: NASpec, tiles: tuple[int, ...], device: str) -> Plan:
    return make_plan(spec, tiles, torch.device(device))


def _box_length(axis: AxisSpec, tile: int) -> int:
    return _axis_plan(axis, tile).box


@functools.lru_cache(maxsize=256)
def choose_tiles(spec: NASpec) -> tuple[int, ...]:
    """Per-axis query tile sizes minimising a CPU cost model: per query, the box size (scores computed)
    times a per-score cost ``1 + 20 / tile_q`` (small tiles give small, inefficient matmuls and more box
    gathering per query). Fitted on the issue's shapes (2 Xeon threads, fp32, head dim 32): the cost per score
    fell from 1 at 16 queries per tile to ~0.7 at 32 and ~0.6 at 64 (128 x 128, kernel 13: tiles 4 x 8,
    box 16 x 20; 16 x 32 x 32, kernel 3 x 7 x 7: tiles 2 x 4 x 4, the fastest of the shapes measured)."""
    options = []
    for axis in spec.axes:
        shortest = min(axis.group_length(g) for g in range(axis.dilation))
        cands = sorted({min(t, shortest) for t in (1, 2, 4, 8, 16, 32, 64)})
        options.append([(t, _box_length(axis, t)) for t in cands])
    best, best_cost = None, math.inf
    for combo in _product(options):
        tq = math.prod(t for t, _ in combo)
        bk = math.prod(b for _, b in combo)
        if tq > 256 or tq * bk > 1 << 16:
            continue
        cost = bk * (1.0 + 20.0 / tq)
        if cost < best_cost:
            best, best_cost = tuple(t for t, _ in combo), cost
    return best if best is not None else tuple(1 for _ in spec.axes)


def _product(options):
    if not options:
        yield ()
        return
    for head in options[0]:
        for rest in _product(options[1:]):
            yield (head, *rest)


def box_fraction(spec: NASpec, tiles: tuple[int, ...] | None = None) -> float:
    """Fraction of dense attention's (query, key) work the engine computes: sum over query tiles of
    ``tile_q * box_k``, over ``n ** 2`` (padding slots included)."""
    tiles = choose_tiles(spec) if tiles is None else tiles
    axes = [_axis_plan(a, t) for a, t in zip(spec.axes, tiles)]
    work = math.prod(ap.q.numel() * ap.box for ap in axes)
    return work / spec.num_tokens ** 2


# ---------------------------------------------------------------------------------------------------------
# Forward / backward over chunks of tiles
# ---------------------------------------------------------------------------------------------------------


def _select_rows(x3: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x3[:, idx]`` for ``x3 [B, n, d]``, one 2-D ``index_select`` per leading index: ATen's contiguous
    row-gather kernel, several times faster than ``index_select`` on dim 1 or advanced indexing."""
    out = x3.new_empty(x3.shape[0], idx.numel(), x3.shape[-1]) if out is None else out
    if not _per_head(x3):
        return torch.index_select(x3, 1, idx, out=out)
    for i in range(x3.shape[0]):
        torch.index_select(x3[i], 0, idx, out=out[i])
    return out


def _add_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[:, idx] += src`` for ``[B, n, d]`` tensors (per leading index on CPU, as ``_select_rows``)."""
    if not _per_head(dst):
        dst.index_add_(1, idx, src)
        return
    for i in range(dst.shape[0]):
        dst[i].index_add_(0, idx, src[i])


def _per_head(x: torch.Tensor) -> bool:
    # A Python loop over heads pays off on CPU for a moderate number of them; on accelerators it would launch
    # one kernel per head.
    return x.device.type == "cpu" and x.shape[0] <= _PER_HEAD_MAX


class _Ctx:
    """Shapes and index helpers shared by forward and backward."""

    def __init__(self, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, score_mod):
        self.plan, self.scale, self.score_mod = plan, scale, score_mod
        self.b, self.h = q.shape[0], q.shape[1]
        self.hkv = k.shape[1]
        self.g = self.h // self.hkv
        self.n = plan.spec.num_tokens
        self.d, self.dv = q.shape[-1], v.shape[-1]
        self.bh = self.b * self.hkv
        self.m = self.g * plan.tile_q  # rows of one tile's score matrix (GQA groups share the box)
        per_tile = self.bh * self.m * plan.box_k
        self.chunk = max(1, min(plan.num_tiles, _CHUNK_ELEMENTS // max(per_tile, 1)))
        self.dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        dev = q.device
        # Per class: the additive mask for one tile's [g * tile_q, box_k] scores (GQA heads share the box).
        self.bias = plan.bias.to(self.dtype).repeat(1, self.g, 1) if self.g > 1 else plan.bias.to(self.dtype)
        if score_mod is not None:
            self.b_idx = torch.arange(self.b, device=dev).view(-1, 1, 1, 1, 1, 1)
            self.h_idx = (torch.arange(self.hkv, device=dev).view(-1, 1) * self.g
                          + torch.arange(self.g, device=dev)).view(1, self.hkv, 1, self.g, 1, 1)

    def tile_rows(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """``[b, h, *spatial, d]`` -> ``[b * h_kv, tiles, g * tile_q, d]`` in compute dtype."""
        p = self.plan
        if self.g == 1:  # per-head row gathers: the fast contiguous index_select, not advanced indexing
            x = _select_rows(x.reshape(self.bh, self.n, x.shape[-1]), p.q_index.reshape(-1)).to(self.dtype)
            return x.view(self.bh, p.num_tiles, self.m, -1) if scale is None else x.mul_(scale).view(
                self.bh, p.num_tiles, self.m, -1)
        x = x.reshape(self.b, self.hkv, self.g, self.n, x.shape[-1])
        x = x[:, :, :, p.q_index.reshape(-1)].to(self.dtype)
        x = x.view(self.b, self.hkv, self.g, p.num_tiles, p.tile_q, -1).permute(0, 1, 3, 2, 4, 5)
        if scale is not None:
            x = x * scale
        return x.reshape(self.bh, p.num_tiles, self.m, -1)

    def untile_rows(self, xt: torch.Tensor, shape: tuple[int, ...], dtype) -> torch.Tensor:
        """Inverse of ``tile_rows`` (padding slots dropped) -> ``[b, h, *spatial, d]``."""
        p = self.plan
        dim = xt.shape[-1]
        if self.g == 1:
            out = torch.empty(self.bh, self.n + int(p.has_padding), dim, dtype=dtype, device=xt.device)
            src = xt.reshape(self.bh, -1, dim).to(dtype)
            if _per_head(out):
                for i in range(self.bh):
                    out[i].index_copy_(0, p.q_write, src[i])
            else:
                out.index_copy_(1, p.q_write, src)
            return out[:, : self.n].reshape(shape)
        x = xt.view(self.b, self.hkv, p.num_tiles, self.g, p.tile_q, dim).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(self.b, self.hkv, self.g, p.num_tiles * p.tile_q, dim)
        out = torch.empty(self.b, self.hkv, self.g, self.n + int(p.has_padding), dim, dtype=dtype, device=xt.device)
        out.index_copy_(3, p.q_write, x.to(dtype))
        if p.has_padding:
            out = out[:, :, :, : self.n]
        return out.reshape(shape)

    def flat_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.bh, self.n, x.shape[-1]).to(self.dtype)

    def chunks(self):
        """``(first tile, end tile, mask class)`` of every chunk: runs of one class, cut to ``chunk`` tiles."""
        for t0, t1, c in self.plan.runs:
            for c0 in range(t0, t1, self.chunk):
                yield c0, min(c0 + self.chunk, t1), c

    def scores(self, qc: torch.Tensor, kc: torch.Tensor, c0: int, c1: int, c: int, params_grad: bool = False):
        """Masked, modified scores of tiles ``[c0, c1)`` (all of mask class ``c``): ``[bh * ch, g * tile_q,
        box_k]`` (and the raw scores when ``params_grad``, for the score modifier's backward)."""
        p = self.plan
        ch = c1 - c0
        qc = qc.reshape(-1, self.m, self.d)
        masked = p.masked[c]
        if self.score_mod is None:
            if masked:  # the mask rides on the matmul: scores = bias + q k^T
                return torch.baddbmm(self.bias[c].unsqueeze(0), qc, kc.transpose(1, 2)), None
            return torch.bmm(qc, kc.transpose(1, 2)), None
        s = torch.bmm(qc, kc.transpose(1, 2)).view(self.bh, ch, self.g, p.tile_q, p.box_k)
        raw = None
        if self.score_mod is not None:
            qi = p.q_index[c0:c1].view(1, 1, ch, 1, p.tile_q, 1)
            ki = p.k_index[c0:c1].view(1, 1, ch, 1, 1, p.box_k)
            if params_grad:
                raw = s.detach().requires_grad_(True)
                s = raw
            s6 = s.view(self.b, self.hkv, ch, self.g, p.tile_q, p.box_k)
            s = self.score_mod(s6, self.b_idx, self.h_idx, qi, ki, self.n, self.n)
        s = s.reshape(-1, self.m, p.box_k)
        if masked:
            s = s + self.bias[c]
        return s, raw

    def gather_box(self, x3: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        idx = self.plan.k_index[c0:c1].reshape(-1)
        return x3.index_select(1, idx).view(self.bh * (c1 - c0), self.plan.box_k, x3.shape[-1])


def _forward(cx: _Ctx, q, k, v):
    p = cx.plan
    qt = cx.tile_rows(q, None if cx.score_mod is not None else cx.scale)
    if cx.score_mod is not None:
        qt = qt * cx.scale
    k3, v3 = cx.flat_kv(k), cx.flat_kv(v)
    ot = torch.empty(cx.bh, p.num_tiles, cx.m, cx.dv, dtype=cx.dtype, device=q.device)
    if cx.score_mod is None:
        _forward_buffered(cx, qt, k3, v3, ot)
        return qt, ot
    for c0, c1, c in cx.chunks():
        kc = cx.gather_box(k3, c0, c1)
        vc = cx.gather_box(v3, c0, c1)
        s, _ = cx.scores(qt[:, c0:c1], kc, c0, c1, c)
        # A query's whole window lies in its tile's box: one fused softmax per row, no running max/sum.
        pr = torch.softmax(s, dim=-1)
        ot[:, c0:c1] = torch.bmm(pr, vc).view(cx.bh, c1 - c0, cx.m, cx.dv)
    return qt, ot


def _forward_buffered(cx: _Ctx, qt, k3, v3, ot) -> None:
    """The forward loop without a score modifier, reusing one set of chunk buffers (no allocation per chunk)."""
    p = cx.plan
    rows = cx.bh * cx.chunk
    kbuf = k3.new_empty(rows * p.box_k * cx.d)  # flat: a shorter last chunk views a contiguous prefix
    vbuf = v3.new_empty(rows * p.box_k * cx.dv)
    qbuf = k3.new_empty(rows * cx.m * cx.d)
    sbuf = k3.new_empty(rows * cx.m * p.box_k)
    pbuf = torch.empty_like(sbuf)
    obuf = k3.new_empty(rows * cx.m * cx.dv)

    def view(buf, *shape):
        return buf[: math.prod(shape)].view(shape)

    for c0, c1, c in cx.chunks():
        ch = c1 - c0
        b = cx.bh * ch
        idx = p.k_index[c0:c1].reshape(-1)
        kc = torch.index_select(k3, 1, idx, out=view(kbuf, cx.bh, ch * p.box_k, cx.d)).view(b, p.box_k, cx.d)
        vc = torch.index_select(v3, 1, idx, out=view(vbuf, cx.bh, ch * p.box_k, cx.dv)).view(b, p.box_k, cx.dv)
        qc = view(qbuf, cx.bh, ch, cx.m, cx.d)
        qc.copy_(qt[:, c0:c1])
        qc = qc.view(b, cx.m, cx.d)
        s = view(sbuf, b, cx.m, p.box_k)
        if p.masked[c]:
            torch.baddbmm(cx.bias[c].unsqueeze(0), qc, kc.transpose(1, 2), out=s)
        else:
            torch.bmm(qc, kc.transpose(1, 2), out=s)
        pr = torch.ops.aten._softmax.out(s, -1, False, out=view(pbuf, b, cx.m, p.box_k))
        o = torch.bmm(pr, vc, out=view(obuf, b, cx.m, cx.dv))
        ot[:, c0:c1] = o.view(cx.bh, ch, cx.m, cx.dv)


def _backward(cx: _Ctx, qt, k, v, ot, grad_out, params):
    p = cx.plan
    k3, v3 = cx.flat_kv(k), cx.flat_kv(v)
    dot = cx.tile_rows(grad_out)
    if p.has_padding:  # padding slots duplicate real queries: they must not add to dK, dV
        valid = p.q_valid.view(1, p.num_tiles, 1, p.tile_q, 1).to(dot.dtype)
        dot = (dot.view(cx.bh, p.num_tiles, cx.g, p.tile_q, cx.dv) * valid).view_as(dot)
    delta = (dot * ot).sum(-1)  # [bh, tiles, m]
    dqt = torch.empty_like(qt)
    dk3 = torch.zeros_like(k3)
    dv3 = torch.zeros_like(v3)
    pgrads = [torch.zeros_like(t) for t in params]
    for c0, c1, c in cx.chunks():
        ch = c1 - c0
        kc = cx.gather_box(k3, c0, c1)
        vc = cx.gather_box(v3, c0, c1)
        qc = qt[:, c0:c1].reshape(-1, cx.m, cx.d)
        # With a score modifier, differentiate through it (its derivative need not be 1, e.g. softcap).
        mod = cx.score_mod is not None
        with torch.enable_grad() if mod else torch.no_grad():
            s, raw = cx.scores(qc, kc, c0, c1, c, params_grad=mod)
        pr = torch.softmax(s.detach().reshape(-1, cx.m, p.box_k), dim=-1)  # recomputed: the box holds the row
        doc = dot[:, c0:c1].reshape(-1, cx.m, cx.dv)
        dvc = torch.bmm(pr.transpose(1, 2), doc)
        kidx = p.k_index[c0:c1].reshape(-1)
        dv3.index_add_(1, kidx, dvc.view(cx.bh, ch * p.box_k, cx.dv))
        dp = torch.bmm(doc, vc.transpose(1, 2))
        ds = pr.mul_(dp.sub_(delta[:, c0:c1].reshape(-1, cx.m, 1)))
        if mod:
            grads = torch.autograd.grad(s, [raw, *params], ds.view_as(s), allow_unused=True)
            ds = torch.zeros_like(raw) if grads[0] is None else grads[0]  # a modifier may ignore the score
            ds = ds.reshape(-1, cx.m, p.box_k)
            for acc, gr in zip(pgrads, grads[1:]):
                if gr is not None:
                    acc.add_(gr)
        dqt[:, c0:c1] = torch.bmm(ds, kc).view(cx.bh, ch, cx.m, cx.d)
        dkc = torch.bmm(ds.transpose(1, 2), qc)  # qc is pre-scaled: d(scale q.k)/dk = scale q
        dk3.index_add_(1, kidx, dkc.view(cx.bh, ch * p.box_k, cx.d))
    return dqt.mul_(cx.scale), dk3, dv3, pgrads


class _NeighborhoodFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, scale, score_mod, q, k, v, *params):
        cx = _Ctx(plan, q, k, v, scale, score_mod)
        with torch.no_grad():
            qt, ot = _forward(cx, q, k, v)
        out = cx.untile_rows(ot, (*q.shape[:-1], v.shape[-1]), q.dtype)
        ctx.cx = cx
        ctx.shapes = (q.shape, q.dtype, k.shape, v.shape)
        ctx.save_for_backward(qt, k, v, ot, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cx = ctx.cx
        qt, k, v, ot, *params = ctx.saved_tensors
        qshape, qdtype, kshape, vshape = ctx.shapes
        dqt, dk3, dv3, pgrads = _backward(cx, qt, k, v, ot, grad_out, params)
        dq = cx.untile_rows(dqt, qshape, qdtype)
        dk = dk3.reshape(kshape).to(k.dtype)
        dv = dv3.reshape(vshape).to(v.dtype)
        return (None, None, None, dq, dk, dv, *pgrads)


# ---------------------------------------------------------------------------------------------------------
# The fused CPU path: ATen's flash-attention kernel over strided views of key / value *strips*
# ---------------------------------------------------------------------------------------------------------

# ATen's CPU flash-attention kernel (scores, mask, online softmax and PV in one cache-resident pass; returns the
# log-sum-exp), as in ``attnkit.ops.exact.tiled``. It reads q, k, v through their strides, so key boxes can be
# overlapping views of one tensor instead of gathered copies.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# Tests switch this off to run the general path (gathered boxes, matmuls and softmax; the one CUDA and score
# modifiers use) on CPU as well.
USE_FUSED_CPU_KERNEL = True


def can_fuse(q: torch.Tensor, v: torch.Tensor, score_mod: ScoreMod | None) -> bool:
    """Softmax without score modifier, equal key and value head dims, on CPU: the fused kernel applies."""
    return (USE_FUSED_CPU_KERNEL and _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None
            and q.device.type == "cpu" and score_mod is None and q.shape[-1] == v.shape[-1])


@dataclass
class FusedPlan:
    """Tiles of one problem for the fused kernel, laid out so that every key box is a *view*.

    The outer axis is the one with the largest box / tile ratio (axis 0 on ties), the others (none in 1-D)
    are inner. A *strip* is, for one inner tile ``J``, the keys of its inner box over every outer position:
    ``strip[J, r, s]`` is the key at outer coordinate ``rows[r]`` (dilation groups one after the other, each
    padded to at least a box with clamped duplicates) and inner box slot ``s``. An outer tile ``i`` starts its
    box at strip row ``offset[i]``, so the box of tile ``(J, i)`` is the contiguous ``strip[J, offset[i]:
    offset[i] + box0]``, and a run of outer tiles of one mask class with equal offset spacing is one
    ``as_strided`` view ``[b * h_kv, run, box_k, d]`` (one kernel call, one shared 2-D mask). The strips hold
    ``inner box / inner tile`` times the keys (2.5x for 4 x 8 tiles, kernel 13) instead of ``box_k /
    tile_q`` (10x) for gathered boxes. Tiles are ordered ``(J, i)``; the mask of a tile is the outer AND of
    its outer and inner masks, so classes are pairs ``(outer class, inner class)``.
    """

    spec: NASpec
    tiles: tuple[int, ...]
    outer_axis: int
    num_tiles: int
    tile_q: int
    box_k: int
    q_index: torch.Tensor  # [num_tiles, tile_q], tiles in (inner J, outer i) order
    q_write: torch.Tensor
    has_padding: bool
    q_valid: torch.Tensor
    bias: torch.Tensor  # [classes, tile_q, box_k] float32, class = outer class * inner classes + inner class
    masked: tuple[bool, ...]
    n_outer: int
    n_inner: int
    box0: int  # outer box length (strip rows per box)
    inner_box: int  # inner box slots per strip row
    strip_rows: int
    strip_index: torch.Tensor  # [n_inner * strip_rows * inner_box] flat key index of every strip slot
    # kernel calls: (inner tile J, first outer tile, end outer tile, strip row of the first box, row spacing,
    # class)
    calls: tuple[tuple[int, int, int, int, int, int], ...]


def _outer_and(masks: list[torch.Tensor]) -> torch.Tensor:
    """Per-axis ``[nT_a, t_a, b_a]`` masks -> ``[prod nT, prod t, prod b]`` (row-major over axes)."""
    nd = len(masks)
    out = None
    for a, m in enumerate(masks):
        shape = [1] * (3 * nd)
        shape[a], shape[nd + a], shape[2 * nd + a] = m.shape
        v = m.view(shape)
        out = v if out is None else out & v
    nt = math.prod(m.shape[0] for m in masks)
    tq = math.prod(m.shape[1] for m in masks)
    return out.reshape(nt, tq, -1)


def make_fused_plan(spec: NASpec, tiles: tuple[int, ...], device) -> FusedPlan:
    """The ``FusedPlan`` of a problem for query tiles ``tiles`` (per axis, as ``make_plan``)."""
    axes = [_axis_plan(a, t) for a, t in zip(spec.axes, tiles)]
    strides = [math.prod(spec.shape[a + 1:]) for a in range(spec.ndim)]
    # The outer axis: the one whose boxes overlap most (largest box / tile), so the strips, which hold the
    # inner boxes of every outer position, are smallest.
    o = max(range(spec.ndim), key=lambda a: (axes[a].box / axes[a].tile, -a))
    outer, inner = axes[o], [ap for a, ap in enumerate(axes) if a != o]
    inner_strides = [s for a, s in enumerate(strides) if a != o]
    ax_o = spec.axes[o]
    # Strip rows: dilation groups of the outer axis one after the other, each padded to at least one box (clamped
    # duplicates, masked out by the box mask) so that every outer box is a contiguous range of rows.
    rows, seg_start = [], []
    for g in range(ax_o.dilation):
        length = ax_o.group_length(g)
        seg_start.append(len(rows))
        rows.extend(g + ax_o.dilation * min(t, length - 1) for t in range(max(length, outer.box)))
    rows_t = torch.tensor(rows)
    offset = torch.tensor(seg_start)[outer.group] + outer.start  # [nI]
    assert torch.equal(rows_t[offset.view(-1, 1) + torch.arange(outer.box)], outer.k)
    if inner:
        iq = _combine([ap.q * s for ap, s in zip(inner, inner_strides)], torch.add)
        ik = _combine([ap.k * s for ap, s in zip(inner, inner_strides)], torch.add)
        iv = _combine([ap.q_valid for ap in inner], torch.logical_and)
        imask = _outer_and([ap.mask for ap in inner])
    else:
        iq = ik = torch.zeros(1, 1, dtype=torch.long)
        iv = torch.ones(1, 1, dtype=torch.bool)
        imask = torch.ones(1, 1, 1, dtype=torch.bool)
    n_i, n_j = outer.q.shape[0], iq.shape[0]
    t0, b0, it, ib = outer.tile, outer.box, iq.shape[1], ik.shape[1]
    q_index = (outer.q.view(1, n_i, t0, 1) * strides[o] + iq.view(n_j, 1, 1, it)).reshape(n_j * n_i, t0 * it)
    q_valid = (outer.q_valid.view(1, n_i, t0, 1) & iv.view(n_j, 1, 1, it)).reshape(n_j * n_i, t0 * it)
    strip_index = (rows_t.view(1, -1, 1) * strides[o] + ik.view(n_j, 1, ib)).reshape(-1)
    u0, inv0 = torch.unique(outer.mask.flatten(1), dim=0, return_inverse=True)
    uj, invj = torch.unique(imask.flatten(1), dim=0, return_inverse=True)
    nc0, ncj = u0.shape[0], uj.shape[0]
    allowed = u0.view(nc0, 1, t0, 1, b0, 1) & uj.view(1, ncj, 1, it, 1, ib)
    allowed = allowed.reshape(nc0 * ncj, t0 * it, b0 * ib)
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    masked = tuple(bool(x) for x in (~allowed).flatten(1).any(1))
    # Runs of outer tiles of one class whose boxes start at equally spaced strip rows: one view each.
    runs = []
    off, cls0 = offset.tolist(), inv0.tolist()
    for i in range(n_i):
        if runs:
            i0, i1, o0, step, c = runs[-1]
            if c == cls0[i] and off[i] - off[i - 1] >= 0 and (i1 - i0 == 1 or off[i] - off[i - 1] == step):
                runs[-1] = (i0, i + 1, o0, off[i] - off[i - 1], c)
                continue
        runs.append((i, i + 1, off[i], 0, cls0[i]))
    calls = tuple((j, i0, i1, o0, step, c * ncj + cj) for j, cj in enumerate(invj.tolist())
                  for i0, i1, o0, step, c in runs)
    n = spec.num_tokens
    q_write = torch.where(q_valid, q_index, torch.full_like(q_index, n)).reshape(-1)
    return FusedPlan(spec, tuple(ap.tile for ap in axes), o, n_j * n_i, t0 * it, b0 * ib, q_index.to(device),
                     q_write.to(device), bool((~q_valid).any()), q_valid.to(device), bias.to(device), masked, n_i,
                     n_j, b0, ib, len(rows), strip_index.to(device), calls)


@functools.lru_cache(maxsize=32)
def _cached_fused_plan(spec: NASpec, tiles: tuple[int, ...], device: str) -> FusedPlan:
    return make_fused_plan(spec, tiles, torch.device(device))


def _strip(cx: _Ctx, x3: torch.Tensor, j: int, out: torch.Tensor) -> torch.Tensor:
    """The strip of inner tile ``j`` of ``x3 [b * h_kv, n, d]``, into ``out``: ``[b * h_kv, strip_rows,
    inner_box, d]``. One strip at a time stays in cache and keeps buffers small."""
    p = cx.plan
    idx = p.strip_index.view(p.n_inner, -1)[j]
    return _select_rows(x3, idx, out).view(cx.bh, p.strip_rows, p.inner_box, x3.shape[-1])


def _box_view(cx: _Ctx, strip: torch.Tensor, i0: int, i1: int, row: int, step: int) -> torch.Tensor:
    """Key boxes of outer tiles ``i0..i1`` as an overlapping view ``[b * h_kv, i1 - i0, box_k, d]``."""
    st = strip.stride()
    return strip.as_strided((cx.bh, i1 - i0, cx.plan.box_k, strip.shape[-1]), (st[0], step * st[1], st[2], st[3]),
                            strip.storage_offset() + row * st[1])


def _calls_by_strip(plan: FusedPlan):
    return itertools.groupby(plan.calls, key=lambda call: call[0])


def _fused_forward(cx: _Ctx, q, k, v):
    """Forward of every tile with the fused kernel: tiled ``q`` (unscaled), tiled output and log-sum-exp."""
    p = cx.plan
    qt = cx.tile_rows(q).view(cx.bh, p.n_inner, p.n_outer, cx.m, cx.d)
    k3, v3 = cx.flat_kv(k), cx.flat_kv(v)
    kbuf = k3.new_empty(cx.bh, p.strip_rows * p.inner_box, cx.d)
    vbuf = v3.new_empty(cx.bh, p.strip_rows * p.inner_box, cx.dv)
    ot = torch.empty(cx.bh, p.n_inner, p.n_outer, cx.m, cx.dv, dtype=cx.dtype, device=q.device)
    lse = torch.empty(cx.bh, p.n_inner, p.n_outer, cx.m, dtype=_lse_dtype(cx.dtype), device=q.device)
    for j, calls in _calls_by_strip(p):
        ks, vs = _strip(cx, k3, j, kbuf), _strip(cx, v3, j, vbuf)
        for _, i0, i1, row, step, c in calls:
            o, lo = _FLASH_CPU(qt[:, j, i0:i1], _box_view(cx, ks, i0, i1, row, step),
                               _box_view(cx, vs, i0, i1, row, step), attn_mask=cx.bias[c] if p.masked[c] else None,
                               scale=cx.scale)
            ot[:, j, i0:i1] = o
            lse[:, j, i0:i1] = lo
    return qt, ot, lse


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused_backward(cx: _Ctx, qt, k, v, ot, lse, grad_out):
    """Gradients with the fused backward kernel from the saved output and log-sum-exp (nothing recomputed
    but the strips); box gradients are summed into strip gradients, then into ``dK, dV``."""
    p = cx.plan
    dot = cx.tile_rows(grad_out)
    if p.has_padding:  # padding slots duplicate real queries: they must not add to dK, dV
        valid = p.q_valid.view(1, p.num_tiles, 1, p.tile_q, 1).to(dot.dtype)
        dot = (dot.view(cx.bh, p.num_tiles, cx.g, p.tile_q, cx.dv) * valid).view_as(dot)
    dot = dot.view(cx.bh, p.n_inner, p.n_outer, cx.m, cx.dv)
    k3, v3 = cx.flat_kv(k), cx.flat_kv(v)
    slots = p.strip_rows * p.inner_box
    kbuf, vbuf = k3.new_empty(cx.bh, slots, cx.d), v3.new_empty(cx.bh, slots, cx.dv)
    dkbuf, dvbuf = k3.new_empty(cx.bh, slots, cx.d), v3.new_empty(cx.bh, slots, cx.dv)
    dqt = torch.empty_like(qt)
    dk3, dv3 = torch.zeros_like(k3), torch.zeros_like(v3)
    for j, calls in _calls_by_strip(p):
        ks, vs = _strip(cx, k3, j, kbuf), _strip(cx, v3, j, vbuf)
        dks = dkbuf.zero_().view(cx.bh, p.strip_rows, p.inner_box, cx.d)
        dvs = dvbuf.zero_().view(cx.bh, p.strip_rows, p.inner_box, cx.dv)
        for _, i0, i1, row, step, c in calls:
            dq4, dk4, dv4 = _FLASH_CPU_BACKWARD(
                dot[:, j, i0:i1], qt[:, j, i0:i1], _box_view(cx, ks, i0, i1, row, step),
                _box_view(cx, vs, i0, i1, row, step), ot[:, j, i0:i1], lse[:, j, i0:i1], 0.0, False,
                attn_mask=cx.bias[c] if p.masked[c] else None, scale=cx.scale)
            dqt[:, j, i0:i1] = dq4
            _add_boxes(dks, dk4, row, step, p.box0)
            _add_boxes(dvs, dv4, row, step, p.box0)
        idx = p.strip_index.view(p.n_inner, -1)[j]
        _add_rows(dk3, idx, dkbuf)
        _add_rows(dv3, idx, dvbuf)
    return dqt, dk3, dv3


def _add_boxes(strip: torch.Tensor, grad: torch.Tensor, row: int, step: int, box0: int) -> None:
    """``strip[:, row + step * t + a] += grad[:, t, a]`` for the overlapping boxes of a run (``grad [b * h_kv,
    run, box0 * inner_box, d]``) as a few dense adds: box rows ``a = step * u + w`` with equal ``u`` go to
    non-overlapping, equally spaced strip rows."""
    bh, run = grad.shape[:2]
    ib, d = strip.shape[2], strip.shape[3]
    grad = grad.view(bh, run, box0, ib, d)
    st = strip.stride()
    if step == 0 or run == 1:
        strip[:, row: row + box0].add_(grad.sum(1))
        return
    for u in range(-(-box0 // step)):
        w = min(step, box0 - step * u)
        dst = strip.as_strided((bh, run, w, ib, d), (st[0], step * st[1], st[1], st[2], st[3]),
                               strip.storage_offset() + (row + step * u) * st[1])
        dst.add_(grad[:, :, step * u: step * u + w])


class _FusedNeighborhoodFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, scale, q, k, v):
        cx = _Ctx(plan, q, k, v, scale, None)
        with torch.no_grad():
            qt, ot, lse = _fused_forward(cx, q, k, v)
        out = cx.untile_rows(ot.view(cx.bh, plan.num_tiles, cx.m, cx.dv), (*q.shape[:-1], v.shape[-1]), q.dtype)
        ctx.cx = cx
        ctx.shapes = (q.shape, q.dtype, k.shape, v.shape)
        ctx.save_for_backward(qt, k, v, ot, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cx = ctx.cx
        qt, k, v, ot, lse = ctx.saved_tensors
        qshape, qdtype, kshape, vshape = ctx.shapes
        dqt, dk3, dv3 = _fused_backward(cx, qt, k, v, ot, lse, grad_out)
        dq = cx.untile_rows(dqt.view(cx.bh, cx.plan.num_tiles, cx.m, cx.d), qshape, qdtype)
        return None, None, dq, dk3.reshape(kshape).to(k.dtype), dv3.reshape(vshape).to(v.dtype)


def neighborhood_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: NASpec, *, scale: float,
                       score_mod=None, tiles: tuple[int, ...] | None = None) -> torch.Tensor:
    """Tiled neighborhood attention on ``q [b, h, *spatial, d]``, ``k, v [b, h_kv, *spatial, d(_v)]``
    (inputs already validated). ``tiles``: query tile size per axis (default: ``choose_tiles``)."""
    tiles = choose_tiles(spec) if tiles is None else tuple(tiles)
    if can_fuse(q, v, score_mod):
        return _FusedNeighborhoodFn.apply(_cached_fused_plan(spec, tiles, str(q.device)), scale, q, k, v)
    plan = _cached_plan(spec, tiles, str(q.device))
    params = [] if score_mod is None else list(score_mod.grad_tensors())
    return _NeighborhoodFn.apply(plan, scale, score_mod, q, k, v, *params)
