"""SPARSEK attention: each query attends to k key/value pairs picked by a scorer through a differentiable
top-k mask.

Lou et al., "Sparser is Faster and Less is More: Efficient Sparse Attention for Long-Range Transformers",
2024. A scoring network gives every key a score ``u_j`` (here ``u_j = k_j . w + b`` with a learned ``w``, or
scores passed in). The SPARSEK operator is the Euclidean projection of ``u`` onto the capped simplex
``{m in [0, 1]^n : sum_j m_j = k}``:

    m = clip(u - tau(u), 0, 1),   tau(u) such that sum_j m_j = k,

a generalisation of sparsemax: at most ~k entries are non-zero, and ``m`` is differentiable in ``u``
(``dm_j / du_l = [j = l] - 1 / |F|`` on the fractional set ``F = {0 < m < 1}``). The mask weighs attention
multiplicatively:

    out_i = sum_j m_ij exp(q_i.k_j s) v_j / sum_j m_ij exp(q_i.k_j s)   (logits q_i.k_j s + log m_ij),

so the scorer learns through the attention. Causal (the paper's setting): query i selects among its own
prefix ``j <= i``, ``m_i = SPARSEK(u_{<=i}, k)``, optionally united with a sliding window of the last
``window`` keys (weight 1). Non-causal: one selection over all keys, shared by every query. When at most k
keys are visible, ``m = 1`` on all of them and the result is exact softmax attention.

Cost: attention O(n |support| d), with ``|support| >= k`` the keys with ``m > 0`` (close to k unless scores
tie). Causal fast path: the threshold ``tau_i`` never decreases with i, so for a chunk of queries every key
that can be selected scores above the previous chunk's last threshold: that pool (~ k + chunk keys) is gathered
once and attended with one matmul; all rows' thresholds come from one sort of the pool. Work O(n (k + chunk)
d) plus a scan of the prefix scores per chunk (O(n^2 / chunk), no head-dim factor); memory O(chunk (k +
chunk)). The paper's incremental decode, O(k) keys kept per step, is
:class:`~attnkit.ops.approx.SparseKDecodeCache` (a step equals row i of this function's causal pass: tested).
"""

from __future__ import annotations

import torch

from attnkit._checks import check_qkv
from attnkit.ops.approx._common import (
    causal_mask,
    check_positive_int,
    finite_rows,
    masked_attention_lse,
    merge_lse,
    prepare,
    propagate_nonfinite,
)

__all__ = ["sparsek_attention", "sparsek_reference", "sparsek_mask", "sparsek_threshold", "sparsek_scores"]


def sparsek_threshold(u: torch.Tensor, k: int) -> torch.Tensor:
    """The threshold ``tau [...]`` with ``sum_j clip(u_j - tau, 0, 1) = k`` over the last axis of ``u [..., n]``
    (``-inf`` entries are absent keys). Rows with at most ``k`` present keys give ``-inf`` (every one kept).
    Exact (piecewise-linear root by sorting), computed in float64 without autograd."""
    check_positive_int("top_k", k)
    with torch.no_grad():
        u = u.detach().double()
        present = torch.isfinite(u)
        count = present.sum(-1)
        # Absent keys become a value far enough below the others to never reach the threshold.
        low = torch.where(present, u, torch.full_like(u, float("inf"))).amin(-1, keepdim=True) - 2
        y = torch.where(present, u, low.expand_as(u)).sort(dim=-1).values.contiguous()  # ascending
        cs = torch.nn.functional.pad(y.cumsum(-1), (1, 0))
        n = y.shape[-1]
        cand = torch.cat([y, y - 1], dim=-1).sort(dim=-1).values.contiguous()  # breakpoints of f, ascending

        def f(t):
            lo = torch.searchsorted(y, t, right=True)  # first index with y > t
            hi = torch.searchsorted(y, t + 1, right=False)  # first index with y >= t + 1
            frac = cs.gather(-1, hi) - cs.gather(-1, lo) - (hi - lo) * t
            return (n - hi) + frac

        fv = f(cand)  # non-increasing; f(min y - 1) = n > k >= 1 > 0 = f(max y)
        tol = 1e-9 * k
        p = ((fv >= k - tol).sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 2)  # last breakpoint with f >= k
        p0 = (fv > k + tol).sum(-1, keepdim=True).clamp(0, 2 * n - 1)  # first breakpoint with f <= k
        t0, t1 = cand.gather(-1, p), cand.gather(-1, p + 1)
        f0, f1 = fv.gather(-1, p), fv.gather(-1, p + 1)
        tau = t0 + (f0 - k) * (t1 - t0) / (f0 - f1).clamp_min(1e-300)
        # f = k on a whole interval (k entries saturated, the rest 0: a hard top-k): take its midpoint, so no
        # entry sits on a kink of clip() and the selection is unambiguous.
        tau = torch.where(p > p0, 0.5 * (cand.gather(-1, p0) + t0), tau).squeeze(-1)
        return torch.where(count > k, tau, torch.full_like(tau, float("-inf")))


def sparsek_mask(u: torch.Tensor, k: int, tau: torch.Tensor | None = None) -> torch.Tensor:
    """The SPARSEK mask ``m = clip(u - tau, 0, 1)`` of scores ``u [..., n]`` (``-inf``: absent, m = 0), with
    the operator's gradient (``tau`` moves by the mean of the fractional entries' change). ``tau``: a
    precomputed :func:`sparsek_threshold` of the same rows (possibly computed on a superset of candidates)."""
    if tau is None:
        tau = sparsek_threshold(u, k)
    tau = tau.to(u.dtype)[..., None]
    present = torch.isfinite(u)
    z = torch.where(present, u, torch.zeros_like(u)) - torch.where(torch.isfinite(tau), tau, torch.zeros_like(tau))
    frac = present & (z > 0) & (z < 1) & torch.isfinite(tau)
    # d tau / d u_j = 1 / |F| for j in F: add a zero-valued term carrying that gradient.
    nfrac = frac.sum(-1, keepdim=True).clamp_min(1).to(u.dtype)
    delta = torch.where(frac, u - u.detach(), torch.zeros_like(u)).sum(-1, keepdim=True) / nfrac
    m = torch.where(torch.isfinite(tau), (z - delta).clamp(0, 1), torch.ones_like(z))
    return torch.where(present, m, torch.zeros_like(m))


def sparsek_scores(k: torch.Tensor, score_weight: torch.Tensor, score_bias: torch.Tensor | float | None = None
                   ) -> torch.Tensor:
    """The linear scorer ``u = k . w + b``: ``k [b, h, n, d]``, ``score_weight [h, d]`` or ``[d]`` -> ``[b, h, n]``
    in at least float32."""
    w = score_weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"score_weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() == 1:
        w = w[None]
    if w.dim() != 2 or w.shape[0] not in (1, k.shape[1]) or w.shape[1] != k.shape[-1]:
        raise ValueError(f"score_weight must be [{k.shape[-1]}] or [{k.shape[1]}, {k.shape[-1]}], got "
                         f"{tuple(score_weight.shape)}")
    acc = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
    u = torch.einsum("bhnd,hd->bhn", k.to(acc), w.to(acc).expand(k.shape[1], -1))
    if score_bias is not None:
        b = torch.as_tensor(score_bias, dtype=acc, device=k.device)
        u = u + (b.view(1, -1, 1) if b.dim() == 1 else b)
    return u


def _setup(q, k, v, top_k, scores, score_weight, score_bias, window, causal, scale):
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("top_k", top_k)
    check_positive_int("window", window, minimum=0)
    if window and not causal:
        raise ValueError("window= is the causal sliding window (keys i - window < j <= i); use it with causal=True "
                         "or leave window=0")
    if scores is None and score_weight is None:
        raise ValueError("sparsek needs key scores: pass score_weight= ([heads, head_dim], the linear scorer) or "
                         "scores= ([batch, heads, kv_len]), or use attnkit.nn.SparseKAttention (learned scorer)")
    if scores is not None and score_weight is not None:
        raise ValueError("pass either scores= or score_weight=, not both")
    if scores is None:
        u = sparsek_scores(k, score_weight, score_bias)
    else:
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dim() != 3 or scores.shape[0] != q.shape[0] or scores.shape[2] != k.shape[2] \
                or q.shape[1] % scores.shape[1]:
            raise ValueError(f"scores must be [batch={q.shape[0]}, heads, kv_len={k.shape[2]}] (heads dividing "
                             f"{q.shape[1]}), got {tuple(scores.shape)}")
        u = scores.repeat_interleave(q.shape[1] // scores.shape[1], dim=1)
    return k, v, scale, u


def _visible(start: int, stop: int, nk: int, window: int, device: torch.device) -> torch.Tensor:
    """``[stop - start, n_k]``: key j visible to query i (``j <= i``), and within the last ``window`` keys when
    ``window`` > 0."""
    i = torch.arange(start, stop, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return (j <= i) & (j > i - window) if window else j <= i


def sparsek_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int = 64,
                      scores: torch.Tensor | None = None, score_weight: torch.Tensor | None = None,
                      score_bias: torch.Tensor | float | None = None, window: int = 0, causal: bool = False,
                      chunk_size: int = 128, scale: float | None = None, return_attention: bool = False):
    """Plain reference: the ``[b, h, n, n_k]`` SPARSEK mask (one projection per query row over its visible keys),
    logits ``q.k s + log m``, softmax in float64."""
    k, v, scale, u = _setup(q, k, v, top_k, scores, score_weight, score_bias, window, causal, scale)
    n, nk = q.shape[2], k.shape[2]
    rows = u[..., None, :].expand(*u.shape[:2], n, nk)
    if causal:
        rows = rows.masked_fill(~causal_mask(n, nk, q.device), float("-inf"))
    m = sparsek_mask(rows.double(), top_k)
    if window:
        m = torch.where(_visible(0, n, nk, window, q.device), torch.ones_like(m), m)
    keep = m > 0
    s = q.double() @ k.double().transpose(-1, -2) * scale + torch.log(torch.where(keep, m, torch.ones_like(m)))
    out, _ = masked_attention_lse(s, v.double(), keep)
    if not return_attention:
        return out.to(q.dtype)
    return out.to(q.dtype), torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)


def _attend_selected(q, k, v, idx, m, scale):
    """Softmax of ``q.k s + log m`` over gathered keys: ``q [b, h, c, d]``, ``idx``, ``m [b, h, c, w]``."""
    d, dv = k.shape[-1], v.shape[-1]
    kc = k.gather(2, idx.flatten(2)[..., None].expand(-1, -1, -1, d)).unflatten(2, idx.shape[2:])
    vc = v.gather(2, idx.flatten(2)[..., None].expand(-1, -1, -1, dv)).unflatten(2, idx.shape[2:])
    keep = m > 0
    s = torch.einsum("bhcd,bhcwd->bhcw", q, kc) * scale
    s = s.to(m.dtype) + torch.log(torch.where(keep, m, torch.ones_like(m)))
    o, lse = masked_attention_lse(s.unsqueeze(-2), vc, keep.unsqueeze(-2))
    return o.squeeze(-2), lse.squeeze(-1)


def sparsek_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int = 64,
                      scores: torch.Tensor | None = None, score_weight: torch.Tensor | None = None,
                      score_bias: torch.Tensor | float | None = None, window: int = 0, causal: bool = False,
                      chunk_size: int = 128, scale: float | None = None) -> torch.Tensor:
    """SPARSEK attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``.

    Key scores from ``score_weight [h, d]`` (+ ``score_bias``) or given as ``scores [b, h | hkv, n_k]``;
    ``top_k`` = k of the operator; ``window``: causal sliding window united with the selection.
    """
    check_positive_int("chunk_size", chunk_size)
    check_qkv(q, k, v)
    k0, v0 = k, v
    # non-finite keys/values: selected with zeros, then NaN exactly in the rows that see them (dense attention's
    # rows; a NaN key would otherwise drop out of the selection, a NaN value leak into earlier rows as 0 * NaN)
    k, v, scale, u = _setup(q, finite_rows(k), finite_rows(v), top_k, scores, score_weight, score_bias, window,
                            causal, scale)
    out = _sparsek(q, k, v, u, top_k, window, causal, chunk_size, scale)
    return propagate_nonfinite(out, q, k0, v0, causal)


def _sparsek(q, k, v, u, top_k, window, causal, chunk_size, scale):
    b, h, n, _ = q.shape
    nk = k.shape[2]
    if not causal:
        # One selection for all queries: candidates are the top-W scores, W doubled until they hold the support.
        idx, m = _select(u[:, :, None, :], top_k, None)
        idx, m = idx[:, :, 0], m[:, :, 0]  # [b, h, w]
        kc = k.gather(2, idx[..., None].expand(-1, -1, -1, k.shape[-1]))
        vc = v.gather(2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
        keep = m > 0
        bias = torch.log(torch.where(keep, m, torch.ones_like(m)))[:, :, None, :]
        out = torch.empty(b, h, n, v.shape[-1], dtype=v.dtype, device=v.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            s = (q[:, :, start:stop] @ kc.transpose(-1, -2) * scale).to(m.dtype) + bias
            o, _ = masked_attention_lse(s, vc, keep[:, :, None, :])
            out[:, :, start:stop] = o
        return out
    out = torch.empty(b, h, n, v.shape[-1], dtype=v.dtype, device=v.device)
    # tau_i never decreases with i (adding a key raises sum_j clip(u_j - tau, 0, 1) at every tau), so the keys
    # above the previous chunk's last threshold hold the support of every query of this chunk: one shared
    # pool per chunk, ~top_k + chunk keys, attended with one matmul.
    tau_prev = torch.full((b, h), float("-inf"), dtype=torch.float64, device=q.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        kv_stop = min(stop, nk)
        c = stop - start
        ub = u[..., :kv_stop]
        above = torch.where(ub.double() > tau_prev[..., None], ub, torch.full_like(ub, float("-inf")))
        width = max(int(torch.isfinite(above).sum(-1).max()), 1)
        pool = above.topk(width, dim=-1)  # [b, h, W], by score
        pos = torch.arange(start, stop, device=q.device)[:, None]
        visible = pool.indices[:, :, None, :] <= pos  # [b, h, c, W]
        rows = pool.values[:, :, None, :].expand(b, h, c, width).masked_fill(~visible, float("-inf"))
        tau = _pool_thresholds(pool.values, visible, top_k)
        # tau never decreases; a drop beyond rounding would mean the pool missed keys: select on full rows then.
        slack = 1e-9 * (1 + tau_prev.abs())
        if bool((tau < (tau_prev - slack)[..., None]).any()):
            o = _chunk_full_rows(q, k, v, u, top_k, window, start, stop, scale)
        else:
            m = sparsek_mask(rows, top_k, tau)
            if window:
                m = torch.where(pool.indices[:, :, None, :] > pos - window, torch.zeros_like(m), m)
            keep = m > 0
            kc = k.gather(2, pool.indices[..., None].expand(-1, -1, -1, k.shape[-1]))
            vc = v.gather(2, pool.indices[..., None].expand(-1, -1, -1, v.shape[-1]))
            s = (q[:, :, start:stop] @ kc.transpose(-1, -2) * scale).to(m.dtype)
            s = s + torch.log(torch.where(keep, m, torch.ones_like(m)))
            o, lse = masked_attention_lse(s, vc, keep)
            if window:
                o = _merge_window(q, k, v, o, lse, window, start, stop, scale)
            tau_prev = tau[..., -1]
        out[:, :, start:stop] = o.to(v.dtype)
    return out


def _pool_thresholds(values: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`sparsek_threshold` of the rows ``values`` masked by ``visible``, for many rows sharing one pool:
    ``values [b, h, W]`` (descending, ``-inf`` padding), ``visible [b, h, c, W]`` -> ``tau [b, h, c]``.

    The breakpoints of every row's piecewise-linear ``f(t) = sum_visible clip(y - t, 0, 1)`` are among the
    pool's ``y`` and ``y - 1``, so one sort and one search serve all rows; each row only masks its prefix
    sums. Same threshold as the per-row sort (an extra breakpoint inside a linear piece changes nothing)."""
    with torch.no_grad():
        y = values.detach().double().flip(-1)  # ascending
        vis = (visible & torch.isfinite(values)[:, :, None, :]).flip(-1)
        finite = torch.isfinite(y)
        low = torch.where(finite, y, torch.full_like(y, float("inf"))).amin(-1, keepdim=True) - 2
        low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
        y = torch.where(finite, y, low).contiguous()
        count = vis.sum(-1)
        visd = vis.double()
        cv = torch.nn.functional.pad(visd.cumsum(-1), (1, 0))  # [b, h, c, W + 1]
        sv = torch.nn.functional.pad((visd * y[:, :, None, :]).cumsum(-1), (1, 0))
        cand = torch.cat([y, y - 1], dim=-1).sort(dim=-1).values.contiguous()  # [b, h, 2W]
        lo = torch.searchsorted(y, cand, right=True)  # first index with y > t
        hi = torch.searchsorted(y, cand + 1, right=False)  # first index with y >= t + 1
        c = vis.shape[2]
        lo_, hi_ = (x[:, :, None, :].expand(-1, -1, c, -1) for x in (lo, hi))
        t = cand[:, :, None, :]
        cv_lo, cv_hi = cv.gather(-1, lo_), cv.gather(-1, hi_)
        fv = (cv[..., -1:] - cv_hi) + (sv.gather(-1, hi_) - sv.gather(-1, lo_)) - t * (cv_hi - cv_lo)
        n2 = fv.shape[-1]
        tol = 1e-9 * k
        p = ((fv >= k - tol).sum(-1, keepdim=True) - 1).clamp(0, n2 - 2)
        p0 = (fv > k + tol).sum(-1, keepdim=True).clamp(0, n2 - 1)
        tc = t.expand(-1, -1, c, -1)
        t0, t1 = tc.gather(-1, p), tc.gather(-1, p + 1)
        f0, f1 = fv.gather(-1, p), fv.gather(-1, p + 1)
        tau = t0 + (f0 - k) * (t1 - t0) / (f0 - f1).clamp_min(1e-300)
        tau = torch.where(p > p0, 0.5 * (tc.gather(-1, p0) + t0), tau).squeeze(-1)
        return torch.where(count > k, tau, torch.full_like(tau, float("-inf")))


def _merge_window(q, k, v, o, lse, window, start, stop, scale):
    """Merge the sliding-window part (weight 1, keys ``i - window < j <= i``) into a selected part ``o, lse``."""
    nk = k.shape[2]
    lo, hi = max(start - window + 1, 0), min(stop, nk)
    if hi <= lo:
        return o
    s = q[:, :, start:stop] @ k[:, :, lo:hi].transpose(-1, -2) * scale
    win = _visible(start, stop, nk, window, q.device)[:, lo:hi]
    o2, lse2 = masked_attention_lse(s, v[:, :, lo:hi], win)
    return merge_lse(o, lse, o2.to(o.dtype), lse2)[0]


def _chunk_full_rows(q, k, v, u, top_k, window, start, stop, scale):
    """Queries ``start:stop`` with the selection computed on their full visible rows (the plain way)."""
    nk = k.shape[2]
    rows = u[:, :, None, :].masked_fill(~_visible(start, stop, nk, 0, q.device), float("-inf"))
    win = _visible(start, stop, nk, window, q.device) if window else None
    idx, m = _select(rows, top_k, win)
    o, lse = _attend_selected(q[:, :, start:stop], k, v, idx, m, scale)
    return _merge_window(q, k, v, o, lse, window, start, stop, scale) if window else o


def _select(rows: torch.Tensor, top_k: int, window: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Support of the SPARSEK mask of each row of ``rows [b, h, c, n_k]`` (``-inf``: not visible): indices and
    mask values ``[b, h, c, w]`` (``w`` = the widest support in the chunk; padding has m = 0). Keys in the
    ``window [c, n_k]`` mask get m = 0 here (the window part attends to them with weight 1)."""
    nk = rows.shape[-1]
    width = min(nk, 2 * top_k)
    while True:
        cand = rows.topk(width, dim=-1)  # descending
        tau = sparsek_threshold(cand.values, top_k)
        # The candidates hold the support when the smallest candidate is at or below the threshold.
        ok = (width == nk) | (cand.values[..., -1] <= tau) | ~torch.isfinite(cand.values[..., -1])
        if bool(ok.all()):
            break
        width = min(nk, 2 * width)
    # Rows' exact threshold only depends on the support, so tau from the candidates is the row's tau.
    m = sparsek_mask(cand.values, top_k, tau)
    if window is not None:
        in_window = window[None, None].expand(*rows.shape[:2], -1, -1).gather(-1, cand.indices)
        m = torch.where(in_window, torch.zeros_like(m), m)
    # Keep up to the last support entry of the chunk (candidates are sorted by score, so support comes first,
    # interleaved only with window keys).
    pos = torch.arange(1, m.shape[-1] + 1, device=m.device)
    keep = max(int(((m > 0) * pos).max()), 1)
    return cand.indices[..., :keep], m[..., :keep]
