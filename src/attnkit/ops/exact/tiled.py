"""The tiled engine: exact attention over the non-empty tiles of a pattern, memory linear in sequence length.

Algorithm ("Self-attention Does Not Need O(n^2) Memory", Rabe & Staats; FlashAttention, Dao et al.):

* queries are cut in blocks of ``block_q`` rows, keys in blocks of ``block_kv``; the pattern classifies each
  (query block, key block) tile as EMPTY (skipped), FULL (no mask) or PARTIAL (masked by the predicate);
* one *step* handles ``R`` query blocks at once: the key blocks each needs are gathered into a
  ``[batch, kv_heads, R, C * block_kv, dim]`` tensor and scored with one batched matmul, so a narrow band
  costs one large matmul rather than many small ones; steps are sized to ``tile_elements`` scores;
* softmax uses a running max and sum across steps (online softmax) when a row's keys need several steps;
  sigmoid/ReLU just accumulate, softplus accumulates its row sum;
* the backward (custom autograd) recomputes each step's scores from q, k and the saved per-row statistic
  (log-sum-exp, or row sum) instead of storing the N x N weights. Score-modifier gradients (ALiBi slopes are
  fixed; KERPLE, relative bias and custom tensors learn) come from autograd on the recomputed tile.

Grouped-query attention never repeats k/v: the ``G = heads / kv_heads`` query heads of a group are stacked
as extra rows of the same matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnkit.normalizations import Normalization
from attnkit.patterns import EMPTY, FULL, Pattern, _Axial, _Halo, _HaloBlockMajor
from attnkit.patterns import axial as _axial
from attnkit.score_mods import ScoreMod

# Scores computed per step (all batch elements and heads together). 2^21 float32 = 8 MiB: large enough for
# efficient matmuls, small enough to stay in cache for the elementwise passes that follow.
TILE_ELEMENTS = 1 << 21
# Below this many scores a step is dominated by Python and dispatch overhead: group more query blocks.
MIN_STEP_ELEMENTS = 1 << 18


@dataclass
class _Step:
    r0: int  # first query block
    r1: int  # one past the last query block
    idx: torch.Tensor  # [R, C] key-block indices (padding entries point at block 0 and are masked)
    computed: torch.Tensor  # [R, C] bool: the tile is non-empty (padding entries are False)
    is_full: torch.Tensor  # [R, C] bool: the tile needs no mask
    first: bool  # first step of these rows (initialise the accumulators)
    last: bool  # last step of these rows (finalise)
    # Tiles that need a mask (partial, holding padding, or padding entries) at (tile_r[t], tile_c[t]) with
    # their blocked entries ``[T, B|1, Hkv|1, G|1, bq, bk]``: evaluated once per plan, so the per-step cost
    # is one masked fill of the partial tiles only.
    tile_r: torch.Tensor | None = None
    tile_c: torch.Tensor | None = None
    blocked: torch.Tensor | None = None
    # When every row of the step reads contiguous key blocks, row i starting at block kv_start + i * kv_delta,
    # k and v are read as (possibly overlapping) strided views instead of gathered copies.
    kv_start: int | None = None
    kv_delta: int = 0
    # Additive masks of the fused path, kept per (dtype, device, batch) when every row of the step has the same
    # mask (a band's interior): stored once as [.., 1, G*bq, C*bk] and broadcast over the rows.
    mask_cache: dict = field(default_factory=dict, repr=False)

    @property
    def needs_mask(self) -> bool:
        return self.tile_r is not None


@dataclass
class _Plan:
    block_q: int
    block_kv: int
    nq: int
    nk: int
    steps: list[_Step]
    computed_tiles: int


def make_plan(pattern: Pattern | None, q_len: int, kv_len: int, block_q: int, block_kv: int, batch: int,
              heads: int, kv_heads: int, row_cost: int, device: torch.device, tile_elements: int = TILE_ELEMENTS,
              min_step_elements: int = MIN_STEP_ELEMENTS, merge_runs: bool = False) -> _Plan:
    """Choose the steps. ``row_cost``: scores per query block per key block (batch * heads * bq * bk).
    ``merge_runs``: join consecutive single-row steps whose key blocks are contiguous ranges of one width starting
    at evenly spaced blocks (a band's interior) into one step read through strided views (the fused path)."""
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    if pattern is None:
        nonempty = torch.ones(nq, nk, dtype=torch.bool)
        full = torch.ones(nq, nk, dtype=torch.bool)
    else:
        cls = pattern.tile_classes(q_len, kv_len, block_q, block_kv, batch=batch, heads=heads, device="cpu")
        nonempty = (cls.amax(dim=(0, 1)) != EMPTY)
        full = (cls.amin(dim=(0, 1)) == FULL)
    if kv_len % block_kv:
        full[:, -1] = False  # the last key block holds padding that must be masked
    counts = nonempty.sum(1)
    order = torch.argsort((~nonempty).to(torch.int8), dim=1, stable=True)  # non-empty columns first, in order
    max_cols = max(1, tile_elements // row_cost)
    steps: list[_Step] = []
    r = 0
    while r < nq:
        c = max(int(counts[r]), 1)
        if c > max_cols:  # one row needs several steps: online softmax across column chunks
            cols = order[r, : int(counts[r])]
            for c0 in range(0, cols.numel(), max_cols):
                sel = cols[c0: c0 + max_cols][None]
                steps.append(_Step(r, r + 1, sel, torch.ones_like(sel, dtype=torch.bool), full[r, sel],
                                   c0 == 0, c0 + max_cols >= cols.numel()))
            r += 1
            continue
        # Group following rows only while the step is too small to amortise per-step overhead: a single row
        # with contiguous key blocks reads k and v as views, a group of rows must gather (copy) them.
        r1, width = r + 1, c
        while (r1 < nq and (r1 - r) * width * row_cost < min_step_elements
               and (r1 - r + 1) * max(width, int(counts[r1])) <= max_cols):
            width = max(width, int(counts[r1]))
            r1 += 1
        idx = order[r:r1, :width].clone()
        pos = torch.arange(width).view(1, -1)
        computed = pos < counts[r:r1].view(-1, 1)
        idx[~computed] = 0
        rows = torch.arange(r, r1).view(-1, 1).expand_as(idx)
        is_full = full[rows, idx] & computed
        steps.append(_Step(r, r1, idx, computed, is_full, True, True))
        r = r1
    for st in steps:
        if st.idx.shape[0] == 1 and bool((st.idx[0, 1:] - st.idx[0, :-1] == 1).all()):
            st.kv_start = int(st.idx[0, 0])
    if merge_runs:
        steps = _merge_runs(steps, block_q * block_kv)
    for st in steps:
        st.idx, st.computed = st.idx.to(device), st.computed.to(device)
        if not bool(st.is_full.all()):
            _attach_masks(st, pattern, q_len, kv_len, block_q, block_kv, batch, heads, kv_heads, device)
    return _Plan(block_q, block_kv, nq, nk, steps, int(nonempty.sum()))


# A merged step's additive mask holds R * bq * C * bk floats (per batch/head only for patterns that depend on them).
MAX_RUN_MASK_ELEMENTS = 1 << 21
MAX_RUN_ROWS = 64


def _merge_runs(steps: list[_Step], tile_area: int) -> list[_Step]:
    """Join runs of single-row, single-step rows with contiguous key blocks of equal width whose starts advance
    by a constant number of blocks: one kernel call (one parallel region) then covers the run."""
    merged: list[_Step] = []
    run: list[_Step] = []

    def flush() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            first = run[0]
            merged.append(_Step(first.r0, run[-1].r1, torch.cat([st.idx for st in run]),
                                torch.cat([st.computed for st in run]), torch.cat([st.is_full for st in run]),
                                True, True, kv_start=first.kv_start,
                                kv_delta=run[1].kv_start - first.kv_start))
        run.clear()

    for st in steps:
        ok = (st.kv_start is not None and st.first and st.last and st.r1 - st.r0 == 1
              and bool(st.computed.all()))
        if ok and run:
            width = run[0].idx.shape[1]
            delta = run[1].kv_start - run[0].kv_start if len(run) > 1 else st.kv_start - run[-1].kv_start
            ok = (st.idx.shape[1] == width and st.kv_start - run[-1].kv_start == delta and delta >= 0
                  and len(run) < MAX_RUN_ROWS and (len(run) + 1) * width * tile_area <= MAX_RUN_MASK_ELEMENTS)
            if not ok:
                flush()
                ok = True
        if ok:
            run.append(st)
        else:
            flush()
            merged.append(st)
    flush()
    return merged


def _attach_masks(step: _Step, pattern: Pattern | None, q_len: int, kv_len: int, bq: int, bk: int, batch: int,
                  heads: int, kv_heads: int, device) -> None:
    """Evaluate the predicate on the step's tiles that need a mask (once per plan)."""
    tr, tc = torch.nonzero(~step.is_full.cpu(), as_tuple=True)
    tr, tc = tr.to(device), tc.to(device)
    g = heads // kv_heads
    q_idx = (step.r0 + tr).view(-1, 1) * bq + torch.arange(bq, device=device)  # [T, bq]
    kv_idx = step.idx[tr, tc].view(-1, 1) * bk + torch.arange(bk, device=device)  # [T, bk]
    allowed = (kv_idx < kv_len).view(-1, 1, 1, 1, 1, bk) & step.computed[tr, tc].view(-1, 1, 1, 1, 1, 1)
    if pattern is not None:
        b = torch.arange(batch, device=device).view(1, -1, 1, 1, 1, 1) if pattern.batch_dependent else None
        h = (torch.arange(kv_heads, device=device).view(-1, 1) * g + torch.arange(g, device=device)).view(
            1, 1, kv_heads, g, 1, 1) if pattern.head_dependent else None
        allowed = allowed & pattern.allowed(b, h, q_idx.clamp(max=q_len - 1).view(-1, 1, 1, 1, bq, 1),
                                            kv_idx.clamp(max=kv_len - 1).view(-1, 1, 1, 1, 1, bk), q_len, kv_len)
    step.tile_r, step.tile_c, step.blocked = tr, tc, allowed.logical_not()


@dataclass
class _Config:
    pattern: Pattern | None
    score_mod: ScoreMod | None
    norm: Normalization
    scale: float
    plan: _Plan
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    fused: bool = False


def _blocks_q(x: torch.Tensor, kv_heads: int, nq: int, bq: int) -> torch.Tensor:
    """``[B, H, Lq, D]`` -> ``[B, Hkv, nq, G * bq, D]`` (zero-padded to ``nq * bq``)."""
    b, h, lq, d = x.shape
    g = h // kv_heads
    if nq * bq != lq:
        x = F.pad(x, (0, 0, 0, nq * bq - lq))
    x = x.view(b, kv_heads, g, nq, bq, d)
    if g == 1:
        return x.view(b, kv_heads, nq, bq, d)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, kv_heads, nq, g * bq, d)


def _unblock_q(x: torch.Tensor, heads: int, lq: int, bq: int) -> torch.Tensor:
    """Inverse of ``_blocks_q`` (also for per-row statistics with no trailing dim when ``x.dim() == 4``)."""
    squeeze = x.dim() == 4
    if squeeze:
        x = x[..., None]
    b, hkv, nq, gbq, d = x.shape
    g = heads // hkv
    x = x.view(b, hkv, nq, g, bq, d).permute(0, 1, 3, 2, 4, 5).reshape(b, heads, nq * bq, d)[:, :, :lq]
    return x[..., 0] if squeeze else x


def _blocks_kv(x: torch.Tensor, nk: int, bk: int) -> torch.Tensor:
    b, h, lk, d = x.shape
    if nk * bk != lk:
        x = F.pad(x, (0, 0, 0, nk * bk - lk))
    return x.view(b, h, nk, bk, d)


class _StepIndex:
    """Index tensors of one step for score modifiers, shaped to broadcast against scores viewed as
    ``[B, Hkv, R, G, bq, C*bk]`` (indices past the end are clamped; those entries are masked anyway)."""

    def __init__(self, cfg: _Config, step: _Step, batch: int, device):
        plan = cfg.plan
        bq, bk = plan.block_q, plan.block_kv
        g = cfg.heads // cfg.kv_heads
        r = step.idx.shape[0]
        rows = torch.arange(step.r0, step.r1, device=device).view(r, 1) * bq + torch.arange(bq, device=device)
        cols = (step.idx.view(r, -1, 1) * bk + torch.arange(bk, device=device)).view(r, -1)
        self.q_idx = rows.clamp(max=cfg.q_len - 1).view(1, 1, r, 1, bq, 1)
        self.kv_idx = cols.clamp(max=cfg.kv_len - 1).view(1, 1, r, 1, 1, -1)
        self.b = torch.arange(batch, device=device).view(-1, 1, 1, 1, 1, 1)
        self.h = (torch.arange(cfg.kv_heads, device=device).view(-1, 1) * g
                  + torch.arange(g, device=device)).view(1, cfg.kv_heads, 1, g, 1, 1)


def _scores(cfg: _Config, qs, ks, step: _Step, batch: int, raw_grad: bool = False):
    """Scores of one step as ``[B, Hkv, R, G, bq, C*bk]`` in the compute dtype, modified and masked.

    Returns ``(scores, raw)``; ``raw`` is the unmodified product (a leaf requiring grad if asked). Without a
    score modifier or grad the masking happens in place (no extra score-sized allocation)."""
    b, hkv, r, gbq, _ = qs.shape
    g = cfg.heads // cfg.kv_heads
    raw = torch.matmul(qs, ks.transpose(-1, -2))
    if raw.dtype in (torch.float16, torch.bfloat16):
        raw = raw.float()
    if raw_grad:
        raw = raw.detach().requires_grad_(True)
    s = raw.view(b, hkv, r, g, gbq // g, -1)
    if cfg.score_mod is not None:
        si = _StepIndex(cfg, step, batch, qs.device)
        s = cfg.score_mod(s, si.b, si.h, si.q_idx, si.kv_idx, cfg.q_len, cfg.kv_len)
    if step.needs_mask:
        if raw_grad or cfg.score_mod is not None and s.requires_grad:
            s = s.clone()  # keep the autograd graph: mask a copy
        bk = cfg.plan.block_kv
        s7 = s.view(b, hkv, r, g, gbq // g, -1, bk)
        tr, tc = step.tile_r, step.tile_c
        # Non-adjacent advanced indices move to the front: tiles are [T, B, Hkv, G, bq, bk].
        s7[:, :, tr, :, :, tc, :] = s7[:, :, tr, :, :, tc, :].masked_fill(step.blocked, float("-inf"))
    return s, raw


def _gather(xb: torch.Tensor, step: _Step) -> torch.Tensor:
    """``[B, H, nk, bk, D]`` gathered at the step's ``idx [R, C]`` -> ``[B, H, R, C * bk, D]``."""
    b, h, _, bk, d = xb.shape
    r, c = step.idx.shape
    if step.kv_start is not None:  # rows of contiguous blocks: a (strided, overlapping) view, no copy
        base = xb[:, :, step.kv_start:]
        # xb's own strides: k and v may be views of a wider layout ([B, L, H, D] transposed, a cache buffer)
        s0, s1, s2, s3, s4 = base.stride()
        return base.as_strided((b, h, r, c * bk, d), (s0, s1, step.kv_delta * s2, s3, s4), base.storage_offset())
    return xb[:, :, step.idx].reshape(b, h, r, c * bk, d)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # CPU half-precision matmuls are slow and accumulate poorly: compute in float32 there. On accelerators the
    # matmul runs in the input dtype and the softmax statistics in float32.
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        return torch.float32
    return x.dtype


# The CPU flash-attention kernel of ATen, which also returns the log-sum-exp: one fused pass per step (scores,
# mask, online softmax and PV never leave the cache), about twice as fast as separate matmul and softmax passes.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# Tests switch this off to run the general (matmul + online softmax) path on CPU, the one CUDA uses.
USE_FUSED_CPU_KERNEL = True


def can_fuse(q: torch.Tensor, v: torch.Tensor, score_mod: ScoreMod | None, norm: Normalization) -> bool:
    """Softmax, equal key and value dims, on CPU, with no score modifier or a fixed additive one (ALiBi: its
    bias joins the kernel's additive mask): the fused kernel applies."""
    additive = score_mod is None or (getattr(score_mod, "additive", False) and not score_mod.grad_tensors())
    return (USE_FUSED_CPU_KERNEL and _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None
            and q.device.type == "cpu" and additive and norm.name == "softmax" and q.shape[-1] == v.shape[-1])


def _step_mask(cfg: _Config, step: _Step, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask ``[B*Hkv | 1, R | 1, G*bq, C*bk]`` of a step: -inf where its partial tiles block, plus the
    bias of an additive score modifier."""
    if not step.needs_mask and cfg.score_mod is None:
        return None
    key = (dtype, step.idx.device, batch, cfg.score_mod)
    cached = step.mask_cache.get(key)
    if cached is not None:
        return cached
    m = _build_step_mask(cfg, step, batch, dtype)
    if key not in step.mask_cache:  # first use: keep it if all rows share one mask
        shared = m.shape[1] > 1 and bool((m == m[:, :1]).all())
        step.mask_cache[key] = m[:, :1].contiguous() if shared else None
    return m


def _build_step_mask(cfg: _Config, step: _Step, batch: int, dtype: torch.dtype) -> torch.Tensor:
    if cfg.score_mod is None:
        return _build_block_mask(cfg, step, batch, dtype)
    si = _StepIndex(cfg, step, batch, step.idx.device)
    r, c = step.idx.shape
    bq, bk = cfg.plan.block_q, cfg.plan.block_kv
    g = cfg.heads // cfg.kv_heads
    zero = torch.zeros((), dtype=dtype, device=step.idx.device)
    # the modifier's bias on the step's grid [B|1, Hkv|1, R, G|1, bq, C*bk]
    bias = cfg.score_mod(zero, si.b, si.h, si.q_idx, si.kv_idx, cfg.q_len, cfg.kv_len)
    blocked = _build_block_mask(cfg, step, batch, dtype) if step.needs_mask else None
    per_head = bias.shape[0] * bias.shape[1] > 1 or (blocked is not None and blocked.shape[0] > 1)
    lead = (batch, cfg.kv_heads) if per_head else (1, 1)
    bias = bias.expand(*lead, r, g, bq, c * bk).reshape(lead[0] * lead[1], r, g * bq, c * bk)
    return bias if blocked is None else bias + blocked


def _build_block_mask(cfg: _Config, step: _Step, batch: int, dtype: torch.dtype) -> torch.Tensor:
    plan = cfg.plan
    bq, bk = plan.block_q, plan.block_kv
    r, c = step.idx.shape
    blocked = step.blocked  # [T, B|1, Hkv|1, G|1, bq, bk]
    _, bm, hm, gm, _, _ = blocked.shape
    g = cfg.heads // cfg.kv_heads
    m = torch.zeros(bm, hm, r, gm, bq, c, bk, dtype=dtype, device=blocked.device)
    m[:, :, step.tile_r, :, :, step.tile_c, :] = torch.zeros((), dtype=dtype, device=blocked.device).masked_fill(
        blocked, float("-inf"))
    if bm * hm > 1:  # batch- or head-dependent: the kernel's batch dim is B * Hkv
        bm, hm = batch, cfg.kv_heads
    m = m.expand(bm, hm, r, g, bq, c, bk)
    return m.reshape(bm * hm, r, g * bq, c * bk)


def _fused_inputs(cfg: _Config, qb, kb, vb, step: _Step):
    b, hkv, _, gbq, d = qb.shape
    r, c = step.idx.shape
    bk = cfg.plan.block_kv
    q4 = qb[:, :, step.r0: step.r1].reshape(b * hkv, r, gbq, d)
    k4 = _gather(kb, step).reshape(b * hkv, r, c * bk, d)
    v4 = _gather(vb, step).reshape(b * hkv, r, c * bk, vb.shape[-1])
    return q4, k4, v4


def fused_forward(cfg: _Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """:func:`tiled_forward` for softmax without score modifier: every step is one call of the fused kernel.
    Plans for this path put each query block's keys in a single step, so no cross-step merge is needed."""
    plan = cfg.plan
    bq, bk = plan.block_q, plan.block_kv
    cdt = _compute_dtype(q)
    qb = _blocks_q(q.to(cdt), cfg.kv_heads, plan.nq, bq)
    kb, vb = _blocks_kv(k.to(cdt), plan.nk, bk), _blocks_kv(v.to(cdt), plan.nk, bk)
    b, hkv, nq, gbq, _ = qb.shape
    # Written step by step into one buffer (not concatenated at the end: that would hold the output twice).
    out = torch.empty(b * hkv, nq, gbq, v.shape[-1], dtype=cdt, device=q.device)
    lses = []
    for step in plan.steps:  # fused plans cover the query blocks in order, each once
        assert step.first and step.last
        q4, k4, v4 = _fused_inputs(cfg, qb, kb, vb, step)
        o, l = _FLASH_CPU(q4, k4, v4, attn_mask=_step_mask(cfg, step, b, cdt), scale=cfg.scale)
        out[:, step.r0: step.r1] = o
        lses.append(l)
    # A row with no allowed key comes back as zeros with log-sum-exp 0 (the kernel's convention), which is the
    # documented result, and its backward is zero as well.
    out = out.view(b, hkv, nq, gbq, -1)
    lse = torch.cat(lses, dim=1).view(b, hkv, nq, gbq)
    return _unblock_q(out, cfg.heads, cfg.q_len, bq).to(q.dtype), _unblock_q(lse, cfg.heads, cfg.q_len, bq)


def fused_backward(cfg: _Config, q, k, v, out, lse, grad_out):
    plan = cfg.plan
    bq, bk = plan.block_q, plan.block_kv
    cdt = _compute_dtype(q)
    qb = _blocks_q(q.to(cdt), cfg.kv_heads, plan.nq, bq)
    kb, vb = _blocks_kv(k.to(cdt), plan.nk, bk), _blocks_kv(v.to(cdt), plan.nk, bk)
    ob = _blocks_q(out.to(cdt), cfg.kv_heads, plan.nq, bq)
    dob = _blocks_q(grad_out.to(cdt), cfg.kv_heads, plan.nq, bq)
    lseb = _blocks_q(lse[..., None], cfg.kv_heads, plan.nq, bq)[..., 0]
    b, hkv, nq, gbq, d = qb.shape
    dqb = torch.empty_like(qb)
    dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
    for step in plan.steps:
        r, c = step.idx.shape
        q4, k4, v4 = _fused_inputs(cfg, qb, kb, vb, step)
        rows = slice(step.r0, step.r1)
        o4 = ob[:, :, rows].reshape(b * hkv, r, gbq, -1)
        do4 = dob[:, :, rows].reshape(b * hkv, r, gbq, -1)
        l4 = lseb[:, :, rows].reshape(b * hkv, r, gbq)
        dq4, dk4, dv4 = _FLASH_CPU_BACKWARD(do4, q4, k4, v4, o4, l4, 0.0, False,
                                            attn_mask=_step_mask(cfg, step, b, cdt), scale=cfg.scale)
        dqb[:, :, rows] = dq4.reshape(b, hkv, r, gbq, d)
        flat = step.idx.reshape(-1)
        dkb.index_add_(2, flat, dk4.reshape(b, hkv, r * c, bk, d))
        dvb.index_add_(2, flat, dv4.reshape(b, hkv, r * c, bk, -1))
    dq = _unblock_q(dqb, cfg.heads, cfg.q_len, bq).to(q.dtype)
    dk = dkb.view(b, hkv, -1, k.shape[-1])[:, :, : cfg.kv_len].to(k.dtype)
    dv_ = dvb.view(b, hkv, -1, v.shape[-1])[:, :, : cfg.kv_len].to(v.dtype)
    return dq, dk, dv_


def tiled_forward(cfg: _Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Returns ``out [B, H, Lq, Dv]`` and the per-row statistic ``[B, H, Lq]`` (lse, row sum, or None)."""
    plan = cfg.plan
    bq, bk = plan.block_q, plan.block_kv
    cdt = _compute_dtype(q)
    acc_dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    norm = cfg.norm
    qb = _blocks_q(q.to(cdt) * cfg.scale, cfg.kv_heads, plan.nq, bq)
    kb = _blocks_kv(k.to(cdt), plan.nk, bk)
    dv = v.shape[-1]
    if norm.row_normalized:
        # A column of ones after v: one matmul gives both sum_j w_ij v_j and the row sum sum_j w_ij.
        v = torch.cat([v.to(cdt), torch.ones_like(v[..., :1], dtype=cdt)], dim=-1)
    vb = _blocks_kv(v.to(cdt), plan.nk, bk)
    b, hkv, nq, gbq, _ = qb.shape
    out = torch.empty(b, hkv, nq, gbq, dv, dtype=acc_dt, device=q.device)
    softmax = norm.name == "softmax"
    stat = torch.empty(b, hkv, nq, gbq, dtype=acc_dt, device=q.device) if norm.row_normalized else None
    tiny = torch.finfo(acc_dt).tiny
    m = acc = None
    for step in plan.steps:
        rows = slice(step.r0, step.r1)
        s, _ = _scores(cfg, qb[:, :, rows], _gather(kb, step), step, b)
        s = s.reshape(b, hkv, step.r1 - step.r0, gbq, -1)
        vs = _gather(vb, step)
        if softmax:
            s_max = s.amax(dim=-1)
            m_new = s_max if step.first else torch.maximum(m, s_max)
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = s.sub_(m_safe[..., None]).exp_()
            pv = torch.matmul(p.to(vs.dtype), vs).to(acc_dt)
            if step.first:
                acc = pv
            else:
                acc = acc.mul_(torch.exp(m - m_safe)[..., None].to(acc_dt)).add_(pv)
            m = m_new
        else:
            w = norm.weight(s, cfg.kv_len)
            pv = torch.matmul(w.to(vs.dtype), vs).to(acc_dt)
            acc = pv if step.first else acc.add_(pv)
        if step.last:
            if norm.row_normalized:
                lsum = acc[..., dv]
                out[:, :, rows] = acc[..., :dv] / lsum.clamp_min(tiny)[..., None]
                # softmax: log-sum-exp, -inf where the row has no allowed key; softplus: the row sum
                stat[:, :, rows] = m_safe + torch.log(lsum) if softmax else lsum
            else:
                out[:, :, rows] = acc
    out = _unblock_q(out, cfg.heads, cfg.q_len, bq).to(q.dtype)
    stat = None if stat is None else _unblock_q(stat, cfg.heads, cfg.q_len, bq)
    return out, stat


def tiled_backward(cfg: _Config, q, k, v, out, stat, grad_out, params: list[torch.Tensor]):
    plan = cfg.plan
    bq, bk = plan.block_q, plan.block_kv
    cdt = _compute_dtype(q)
    acc_dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qb = _blocks_q(q.to(cdt) * cfg.scale, cfg.kv_heads, plan.nq, bq)
    kb = _blocks_kv(k.to(cdt), plan.nk, bk)
    vb = _blocks_kv(v.to(cdt), plan.nk, bk)
    dob = _blocks_q(grad_out.to(cdt), cfg.kv_heads, plan.nq, bq)
    b, hkv, nq, gbq, _ = qb.shape
    norm = cfg.norm
    softmax = norm.name == "softmax"
    if norm.row_normalized:
        # D_i = sum_j w_ij dO_i . v_j = dO_i . o_i: the term every row-normalised weight's gradient subtracts.
        delta = _blocks_q((grad_out.to(acc_dt) * out.to(acc_dt)).sum(-1, keepdim=True), cfg.kv_heads, plan.nq,
                          bq)[..., 0]
        statb = _blocks_q(stat[..., None], cfg.kv_heads, plan.nq, bq)[..., 0]
        if softmax:
            statb = torch.where(torch.isneginf(statb), torch.zeros_like(statb), statb)
        else:
            statb = statb.clamp_min(torch.finfo(statb.dtype).tiny)
    dqb = torch.zeros(qb.shape, dtype=acc_dt, device=q.device)
    dkb = torch.zeros(kb.shape, dtype=acc_dt, device=q.device)
    dvb = torch.zeros(vb.shape, dtype=acc_dt, device=q.device)
    dparams = [torch.zeros_like(p) for p in params]
    use_autograd = cfg.score_mod is not None or not softmax
    for step in plan.steps:
        r = step.r1 - step.r0
        qs = qb[:, :, step.r0: step.r1]
        ks, vs = _gather(kb, step), _gather(vb, step)
        dos = dob[:, :, step.r0: step.r1]
        with torch.enable_grad():
            s, raw = _scores(cfg, qs, ks, step, b, raw_grad=use_autograd)
            s = s.reshape(b, hkv, r, gbq, -1)
            if softmax:
                w = torch.exp(s - statb[:, :, step.r0: step.r1, :, None])
            else:
                w = norm.weight(s, cfg.kv_len)
                if norm.row_normalized:
                    w = w / statb[:, :, step.r0: step.r1, :, None]
            dw = torch.matmul(dos, vs.transpose(-1, -2)).to(w.dtype)
            g_w = dw - delta[:, :, step.r0: step.r1, :, None] if norm.row_normalized else dw
            if use_autograd:
                grads = torch.autograd.grad(w, [raw, *params], g_w, allow_unused=True)
                d_raw = grads[0]
                for i, gp in enumerate(grads[1:]):
                    if gp is not None:
                        dparams[i] += gp
            else:
                d_raw = (w * g_w).detach()
        w = w.detach()
        dvs = torch.matmul(w.transpose(-1, -2).to(dos.dtype), dos).to(acc_dt)  # [B, Hkv, R, C*bk, Dv]
        d_raw = d_raw.reshape(b, hkv, r, gbq, -1).to(cdt)
        dqb[:, :, step.r0: step.r1] += torch.matmul(d_raw, ks).to(acc_dt)
        dks = torch.matmul(d_raw.transpose(-1, -2), qs).to(acc_dt)
        flat = step.idx.reshape(-1)
        c = step.idx.shape[1]
        dkb.index_add_(2, flat, dks.view(b, hkv, r * c, bk, -1))
        dvb.index_add_(2, flat, dvs.view(b, hkv, r * c, bk, -1))
    dq = _unblock_q(dqb * cfg.scale, cfg.heads, cfg.q_len, bq).to(q.dtype)
    dk = dkb.view(b, hkv, -1, k.shape[-1])[:, :, : cfg.kv_len].to(k.dtype)
    dv_ = dvb.view(b, hkv, -1, v.shape[-1])[:, :, : cfg.kv_len].to(v.dtype)
    return dq, dk, dv_, dparams


def _standardize_pass(cfg: _Config, qb, kb, vb, batch: int, fn, raw_grad: bool = False) -> None:
    """Visit every step with its scores ``s [B, Hkv, R, G*bq, C*bk]`` and visibility mask (keys not masked)."""
    for step in cfg.plan.steps:
        r = step.r1 - step.r0
        with torch.enable_grad() if raw_grad else torch.no_grad():
            s, raw = _scores(cfg, qb[:, :, step.r0: step.r1], _gather(kb, step), step, batch, raw_grad=raw_grad)
            s = s.reshape(batch, qb.shape[1], r, qb.shape[3], -1)
        fn(step, s, raw, ~torch.isneginf(s.detach()), _gather(vb, step))


def standardize_forward(cfg: _Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Standardised attention ("Normalized Attention Without Probability Cage") in two passes over the key tiles:
    the row mean first, then the centred variance and ``sum_j (s_ij - mu_i) v_j`` together (two-pass statistics:
    no cancellation of ``E[s^2] - E[s]^2``). Returns ``out`` and the per-row ``[mu, sigma, count]``."""
    plan = cfg.plan
    bq = plan.block_q
    cdt = _compute_dtype(q)
    acc_dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qb = _blocks_q(q.to(cdt) * cfg.scale, cfg.kv_heads, plan.nq, bq)
    kb, vb = _blocks_kv(k.to(cdt), plan.nk, plan.block_kv), _blocks_kv(v.to(cdt), plan.nk, plan.block_kv)
    b, hkv, nq, gbq, _ = qb.shape
    count = torch.zeros(b, hkv, nq, gbq, dtype=acc_dt, device=q.device)
    total = torch.zeros_like(count)

    def first(step, s, raw, vis, vs):
        rows = slice(step.r0, step.r1)
        count[:, :, rows] += vis.sum(-1).to(acc_dt)
        total[:, :, rows] += torch.where(vis, s, 0.0).sum(-1).to(acc_dt)

    _standardize_pass(cfg, qb, kb, vb, b, first)
    mu = total / count.clamp_min(1)
    out = torch.zeros(b, hkv, nq, gbq, v.shape[-1], dtype=acc_dt, device=q.device)
    var = torch.zeros_like(count)

    def second(step, s, raw, vis, vs):
        rows = slice(step.r0, step.r1)
        z = torch.where(vis, s - mu[:, :, rows, :, None].to(s.dtype), 0.0)
        var[:, :, rows] += z.square().sum(-1).to(acc_dt)
        out[:, :, rows] += torch.matmul(z.to(vs.dtype), vs).to(acc_dt)

    _standardize_pass(cfg, qb, kb, vb, b, second)
    sigma = torch.sqrt(var / count.clamp_min(1) + cfg.norm.eps)
    out = out * (cfg.norm.gain / sigma)[..., None]
    stat = torch.stack([mu, sigma, count], dim=-1)
    return (_unblock_q(out, cfg.heads, cfg.q_len, bq).to(q.dtype),
            _unblock_q(stat, cfg.heads, cfg.q_len, bq))


def standardize_backward(cfg: _Config, q, k, v, out, stat, grad_out, params: list[torch.Tensor]):
    """With ``z = s - mu``, ``a = g z / sigma`` and ``e_ij = dO_i . v_j``, the logit gradient is
    ``dL/ds_ij = (g / sigma_i) (e_ij - mean_j e_ij - z_ij (dO_i . o_i) / (g sigma_i n_i))`` over the ``n_i``
    visible keys: one
    pass for ``mean_j e_ij``, one for the gradients (scores recomputed, never stored)."""
    plan = cfg.plan
    bq = plan.block_q
    cdt = _compute_dtype(q)
    acc_dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qb = _blocks_q(q.to(cdt) * cfg.scale, cfg.kv_heads, plan.nq, bq)
    kb, vb = _blocks_kv(k.to(cdt), plan.nk, plan.block_kv), _blocks_kv(v.to(cdt), plan.nk, plan.block_kv)
    dob = _blocks_q(grad_out.to(cdt), cfg.kv_heads, plan.nq, bq)
    statb = _blocks_q(stat.to(acc_dt), cfg.kv_heads, plan.nq, bq)
    mu, sigma, count = statb.unbind(-1)
    sigma = torch.where(count > 0, sigma, torch.ones_like(sigma))  # padded / fully masked rows: no gradient
    g = cfg.norm.gain
    do_o = _blocks_q((grad_out.to(acc_dt) * out.to(acc_dt)).sum(-1, keepdim=True), cfg.kv_heads, plan.nq, bq)[..., 0]
    b, hkv, nq, gbq, _ = qb.shape
    e_sum = torch.zeros_like(mu)

    def first(step, s, raw, vis, vs):
        rows = slice(step.r0, step.r1)
        e = torch.matmul(dob[:, :, rows], vs.transpose(-1, -2))
        e_sum[:, :, rows] += torch.where(vis, e, 0.0).sum(-1).to(acc_dt)

    _standardize_pass(cfg, qb, kb, vb, b, first)
    e_mean = e_sum / count.clamp_min(1)
    dqb = torch.zeros(qb.shape, dtype=acc_dt, device=q.device)
    dkb = torch.zeros(kb.shape, dtype=acc_dt, device=q.device)
    dvb = torch.zeros(vb.shape, dtype=acc_dt, device=q.device)
    dparams = [torch.zeros_like(p) for p in params]
    use_autograd = cfg.score_mod is not None

    def second(step, s, raw, vis, vs):
        rows = slice(step.r0, step.r1)
        r = step.r1 - step.r0
        sig = sigma[:, :, rows, :, None]
        z = torch.where(vis, s.detach() - mu[:, :, rows, :, None].to(s.dtype), 0.0)
        dos = dob[:, :, rows]
        e = torch.matmul(dos, vs.transpose(-1, -2))
        n = count[:, :, rows, :, None].clamp_min(1)
        ds = (g / sig) * (e - e_mean[:, :, rows, :, None] - z * (do_o[:, :, rows, :, None] / (g * sig * n)))
        ds = torch.where(vis, ds, 0.0)
        if use_autograd:
            grads = torch.autograd.grad(s, [raw, *params], ds.to(s.dtype), allow_unused=True)
            d_raw = grads[0]
            for i, gp in enumerate(grads[1:]):
                if gp is not None:
                    dparams[i] += gp
        else:
            d_raw = ds
        a = (g / sig) * z
        dvs = torch.matmul(a.transpose(-1, -2).to(dos.dtype), dos).to(acc_dt)
        d_raw = d_raw.reshape(b, hkv, r, gbq, -1).to(cdt)
        qs, ks = qb[:, :, rows], _gather(kb, step)
        dqb[:, :, rows] += torch.matmul(d_raw, ks).to(acc_dt)
        dks = torch.matmul(d_raw.transpose(-1, -2), qs).to(acc_dt)
        flat = step.idx.reshape(-1)
        c = step.idx.shape[1]
        dkb.index_add_(2, flat, dks.view(b, hkv, r * c, plan.block_kv, -1))
        dvb.index_add_(2, flat, dvs.view(b, hkv, r * c, plan.block_kv, -1))

    _standardize_pass(cfg, qb, kb, vb, b, second, raw_grad=use_autograd)
    dq = _unblock_q(dqb * cfg.scale, cfg.heads, cfg.q_len, bq).to(q.dtype)
    dk = dkb.view(b, hkv, -1, k.shape[-1])[:, :, : cfg.kv_len].to(k.dtype)
    dv_ = dvb.view(b, hkv, -1, v.shape[-1])[:, :, : cfg.kv_len].to(v.dtype)
    return dq, dk, dv_, dparams


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, q, k, v, *params):
        if cfg.norm.name == "standardize":
            out, stat = standardize_forward(cfg, q, k, v)
        else:
            out, stat = (fused_forward if cfg.fused else tiled_forward)(cfg, q, k, v)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, out, stat if stat is not None else torch.empty(0), *params)
        ctx.has_stat = stat is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, stat, *params = ctx.saved_tensors
        if ctx.cfg.fused:
            return (None, *fused_backward(ctx.cfg, q, k, v, out, stat, grad_out.contiguous()))
        if ctx.cfg.norm.name == "standardize":
            dq, dk, dv, dparams = standardize_backward(ctx.cfg, q, k, v, out, stat, grad_out.contiguous(),
                                                       list(params))
            return (None, dq, dk, dv, *dparams)
        dq, dk, dv, dparams = tiled_backward(ctx.cfg, q, k, v, out, stat if ctx.has_stat else None,
                                             grad_out.contiguous(), list(params))
        return (None, dq, dk, dv, *dparams)


def choose_blocks(q_len: int, kv_len: int, block_q: int | None, block_kv: int | None,
                  fused: bool = False) -> tuple[int, int]:
    # The fused kernel is most efficient on short query blocks (its own inner split is 32 rows below 192), and
    # small key blocks follow a pattern's boundary closely: fewer wasted scores on partial tiles.
    default = 32 if fused else 64
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"{name} must be a positive int (or None for the default {default}), got {val!r}")
    bq = block_q or default
    bk = block_kv or default
    return max(1, min(bq, q_len)), max(1, min(bk, kv_len))


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None,
                    score_mod: ScoreMod | None, normalization: Normalization, scale: float,
                    block_q: int | None = None, block_kv: int | None = None,
                    tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """Exact attention on the non-empty tiles of ``pattern``; ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``,
    ``v [B, Hkv, Lk, Dv]`` -> ``[B, H, Lq, Dv]``. Rows with no allowed key give zeros."""
    b, h, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    if b == 0:  # an empty batch has an empty result (as every other engine gives); no plan to make
        return q.new_zeros(0, h, q_len, v.shape[-1]) + (q.sum() + k.sum() + v.sum()) * 0
    fused = can_fuse(q, v, score_mod, normalization)
    bq, bk = choose_blocks(q_len, kv_len, block_q, block_kv, fused)
    if isinstance(pattern, _Axial) and pattern._stride > 1 and score_mod is None and q_len == kv_len:
        # Lines along a non-contiguous axis (columns) are strided: every tile would be partial with a sparse
        # mask. Moving the axis last makes each line a contiguous block (full tiles); only positions move, and
        # without a score modifier nothing reads them.
        shape, axis = pattern.shape, pattern.axis
        moved = (*shape[:axis], *shape[axis + 1:], shape[axis])

        def to_lines(x):
            return x.reshape(*x.shape[:2], *shape, x.shape[-1]).movedim(2 + axis, -2).reshape(x.shape)

        out = tiled_attention(to_lines(q), to_lines(k), to_lines(v), pattern=_axial(moved, len(shape) - 1,
                              causal=pattern.causal), score_mod=None, normalization=normalization, scale=scale,
                              block_q=block_q, block_kv=block_kv, tile_elements=tile_elements)
        return out.reshape(*out.shape[:2], *moved, out.shape[-1]).movedim(-2, 2 + axis).reshape(out.shape)
    if (isinstance(pattern, _Halo) and score_mod is None and q_len == kv_len and block_q is None
            and block_kv is None and all(n % blk == 0 for n, blk in zip(pattern.shape, pattern.block))):
        # Raster order scatters a block's queries over many rows: every tile is partial. Block-major order
        # makes each image block one tile of queries sharing one key region (exact tile classes per block).
        return _halo_block_major(q, k, v, pattern, normalization, scale, tile_elements)
    groups = _head_groups(pattern, score_mod, q_len, kv_len, bq, bk, b, h)
    if groups is not None:
        # Heads whose patterns need different tiles (per-head windows) run as separate calls, each on its own
        # tiles: one call would compute the union of every head's tiles for all heads.
        outs, order = [], []
        for heads, sub in groups:
            idx = torch.tensor(heads, device=q.device)
            kv_idx = torch.div(idx, h // hkv, rounding_mode="floor")
            outs.append(tiled_attention(q.index_select(1, idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx),
                                        pattern=sub, score_mod=score_mod, normalization=normalization, scale=scale,
                                        block_q=block_q, block_kv=block_kv, tile_elements=tile_elements))
            order += heads
        inverse = torch.argsort(torch.tensor(order, device=q.device))
        return torch.cat(outs, dim=1).index_select(1, inverse)
    row_cost = b * h * bq * bk
    if fused:  # the kernel never materialises a step's scores: every query block's keys go in one step
        tile_elements = max(tile_elements, row_cost * -(-kv_len // bk))
    # Fused steps read k and v as views: rows are not grouped by gathering, only runs of evenly spaced
    # contiguous key ranges are merged (strided views), so each kernel call is one large parallel region.
    min_step = 0 if fused else MIN_STEP_ELEMENTS
    plan = _cached_plan(pattern, q_len, kv_len, bq, bk, b, h, hkv, row_cost, q.device, tile_elements, min_step,
                        fused)
    cfg = _Config(pattern, score_mod, normalization, scale, plan, q_len, kv_len, h, hkv, fused)
    params = score_mod.grad_tensors() if score_mod is not None else []
    return _TiledAttention.apply(cfg, q, k, v, *params)


def _halo_block_major(q, k, v, pattern, normalization, scale, tile_elements):
    shape, block = pattern.shape, pattern.block
    grid = [n // blk for n, blk in zip(shape, block)]
    nd = len(shape)
    split = [d for g, blk in zip(grid, block) for d in (g, blk)]
    to_bm = [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)]  # grid axes first, then in-block

    def to_blocks(x):
        b_, h_, n, d = x.shape
        return x.reshape(b_, h_, *split, d).permute(0, 1, *to_bm, 2 + 2 * nd).reshape(b_, h_, n, d)

    def from_blocks(x):
        b_, h_, n, d = x.shape
        inner = [*grid, *block]
        inverse = [0] * (2 * nd)
        for pos, ax in enumerate(to_bm):
            inverse[ax - 2] = pos + 2
        return x.reshape(b_, h_, *inner, d).permute(0, 1, *inverse, 2 + 2 * nd).reshape(b_, h_, n, d)

    bm = pattern.__dict__.get("_block_major")
    if bm is None:
        bm = pattern.__dict__["_block_major"] = _HaloBlockMajor(pattern)
    area = bm.area
    out = tiled_attention(to_blocks(q), to_blocks(k), to_blocks(v), pattern=bm, score_mod=None,
                          normalization=normalization, scale=scale, block_q=area, block_kv=area,
                          tile_elements=tile_elements)
    return from_blocks(out)


class _HeadSubset(Pattern):
    """Heads ``heads`` of a head-dependent pattern, renumbered ``0 .. len(heads) - 1``."""

    head_dependent = True

    def __init__(self, pattern: Pattern, heads: list[int], total: int):
        self.pattern, self.heads, self.total = pattern, heads, total
        self.batch_dependent = pattern.batch_dependent
        self._idx = torch.tensor(heads)

    def check(self, q_len, kv_len, batch, heads):
        self.pattern.check(q_len, kv_len, batch, self.total)

    def allowed(self, b, h, q_idx, kv_idx, q_len, kv_len):
        return self.pattern.allowed(b, None if h is None else self._idx.to(q_idx.device)[h], q_idx, kv_idx,
                                    q_len, kv_len)

    def _classify(self, q_len, kv_len, block_q, block_kv, batch, heads, device):
        cls = self.pattern.tile_classes(q_len, kv_len, block_q, block_kv, batch=batch, heads=self.total,
                                        device=device)
        return cls[:, self._idx.to(cls.device)] if cls.shape[1] > 1 else cls

    def __repr__(self):
        return f"{self.pattern!r}[heads={self.heads}]"


def _head_groups(pattern, score_mod, q_len, kv_len, bq, bk, b, h):
    """For a head-dependent pattern: ``[(heads, sub-pattern), ...]`` grouping heads with identical non-empty
    tiles, or None when one call serves every head (one group, or a head-dependent score modifier that would see
    renumbered heads)."""
    if pattern is None or not pattern.head_dependent or h == 1 or isinstance(pattern, _HeadSubset) or (
            score_mod is not None and score_mod.head_dependent):
        return None
    cache = pattern.__dict__.setdefault("_head_group_cache", {})
    key = (q_len, kv_len, bq, bk, b, h)
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cls = pattern.tile_classes(q_len, kv_len, bq, bk, batch=b, heads=h, device="cpu")
        groups: dict[bytes, list[int]] = {}
        if cls.shape[1] == h:
            nonempty = (cls.amax(dim=0) != EMPTY).to(torch.uint8)
            for head in range(h):
                groups.setdefault(nonempty[head].numpy().tobytes(), []).append(head)
        cache[key] = None if len(groups) < 2 else [(hs, _HeadSubset(pattern, hs, h)) for hs in groups.values()]
    return cache[key]


def _cached_plan(pattern, q_len, kv_len, bq, bk, b, h, hkv, row_cost, device, tile_elements,
                 min_step_elements=MIN_STEP_ELEMENTS, merge_runs=False) -> _Plan:
    key = (q_len, kv_len, bq, bk, b, h, hkv, row_cost, str(device), tile_elements, min_step_elements, merge_runs)
    if pattern is None:
        return make_plan(None, *key[:7], row_cost, device, tile_elements, min_step_elements, merge_runs)
    cache = pattern.__dict__.setdefault("_plan_cache", {})
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = make_plan(pattern, q_len, kv_len, bq, bk, b, h, hkv, row_cost, device, tile_elements,
                               min_step_elements, merge_runs)
    return cache[key]
