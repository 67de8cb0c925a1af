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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.normalizations import Normalization
from attnkit.patterns import EMPTY, FULL, Pattern
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
              min_step_elements: int = MIN_STEP_ELEMENTS) -> _Plan:
    """Choose the steps. ``row_cost``: scores per query block per key block (batch * heads * bq * bk)."""
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
        st.idx, st.computed = st.idx.to(device), st.computed.to(device)
        if not bool(st.is_full.all()):
            _attach_masks(st, pattern, q_len, kv_len, block_q, block_kv, batch, heads, kv_heads, device)
    return _Plan(block_q, block_kv, nq, nk, steps, int(nonempty.sum()))


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


def _gather(xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[B, H, nk, bk, D]`` gathered at ``idx [R, C]`` -> ``[B, H, R, C * bk, D]``."""
    b, h, _, bk, d = xb.shape
    r, c = idx.shape
    if r == 1 and c > 0 and bool((idx[0, 1:] - idx[0, :-1] == 1).all()):  # contiguous: a view, no copy
        i0 = int(idx[0, 0])
        return xb[:, :, i0: i0 + c].reshape(b, h, 1, c * bk, d)
    return xb[:, :, idx].reshape(b, h, r, c * bk, d)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # CPU half-precision matmuls are slow and accumulate poorly: compute in float32 there. On accelerators the
    # matmul runs in the input dtype and the softmax statistics in float32.
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        return torch.float32
    return x.dtype


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
        s, _ = _scores(cfg, qb[:, :, rows], _gather(kb, step.idx), step, b)
        s = s.reshape(b, hkv, step.r1 - step.r0, gbq, -1)
        vs = _gather(vb, step.idx)
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
        ks, vs = _gather(kb, step.idx), _gather(vb, step.idx)
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


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, q, k, v, *params):
        out, stat = tiled_forward(cfg, q, k, v)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, out, stat if stat is not None else torch.empty(0), *params)
        ctx.has_stat = stat is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, stat, *params = ctx.saved_tensors
        dq, dk, dv, dparams = tiled_backward(ctx.cfg, q, k, v, out, stat if ctx.has_stat else None,
                                             grad_out.contiguous(), list(params))
        return (None, dq, dk, dv, *dparams)


def choose_blocks(q_len: int, kv_len: int, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
    bq = block_q or 64
    bk = block_kv or 64
    return max(1, min(bq, q_len)), max(1, min(bk, kv_len))


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None,
                    score_mod: ScoreMod | None, normalization: Normalization, scale: float,
                    block_q: int | None = None, block_kv: int | None = None,
                    tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """Exact attention on the non-empty tiles of ``pattern``; ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``,
    ``v [B, Hkv, Lk, Dv]`` -> ``[B, H, Lq, Dv]``. Rows with no allowed key give zeros."""
    b, h, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    bq, bk = choose_blocks(q_len, kv_len, block_q, block_kv)
    row_cost = b * h * bq * bk
    plan = _cached_plan(pattern, q_len, kv_len, bq, bk, b, h, hkv, row_cost, q.device, tile_elements)
    cfg = _Config(pattern, score_mod, normalization, scale, plan, q_len, kv_len, h, hkv)
    params = score_mod.grad_tensors() if score_mod is not None else []
    return _TiledAttention.apply(cfg, q, k, v, *params)


def _cached_plan(pattern, q_len, kv_len, bq, bk, b, h, hkv, row_cost, device, tile_elements) -> _Plan:
    key = (q_len, kv_len, bq, bk, b, h, hkv, row_cost, str(device), tile_elements)
    if pattern is None:
        return make_plan(None, *key[:7], row_cost, device, tile_elements)
    cache = pattern.__dict__.setdefault("_plan_cache", {})
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = make_plan(pattern, q_len, kv_len, bq, bk, b, h, hkv, row_cost, device, tile_elements)
    return cache[key]
