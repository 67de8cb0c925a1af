"""Attention Free Transformer (Zhai et al., "An Attention Free Transformer", 2021), eq. 2-5.

``Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_{t,t'}) V_t' / sum_t' exp(K_t' + w_{t,t'})``, per channel.
Shapes: ``q, k, v [batch, seq, channels]``; position biases ``w [seq, seq]``.

- AFT-full: learned ``w`` (here factorised ``w = U V^T`` by the module, as the paper does for large T);
  exact in O(T^2 C) time by row blocks of ``exp(w) @ (exp(K) * V)``, O(T C + block T) memory.
- AFT-simple: ``w = 0``: a softmax over positions per channel, O(T C) (cumulative sums when causal).
- AFT-local / AFT-conv: ``w`` non-zero only inside a window (zero, not -inf, outside), so the output is the
  global AFT-simple sums plus a windowed correction ``sum_{window} (exp(w) - 1) exp(K) V`` (eq. 5): O(T s C).
"""

from __future__ import annotations

import math

import torch

from attnkit.ops.mixers._common import compute_dtype, shifted_products


def _exp_keys(k: torch.Tensor) -> torch.Tensor:
    # exp(K - max_t K) per channel: the offset cancels in the ratio; it keeps exp() from overflowing.
    return torch.exp(k - k.amax(dim=1, keepdim=True))


def aft_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None = None, *,
                  causal: bool = False) -> torch.Tensor:
    """The definition materialised: weights ``softmax_t'(K_t' + w_{t,t'})`` as ``[batch, T, T, C]``."""
    n = q.shape[1]
    logits = k[:, None, :, :].expand(-1, n, -1, -1)
    if w is not None:  # [T, T] shared by the channels, or [T, T, C]
        logits = logits + (w[..., None] if w.dim() == 2 else w)[None].to(k.dtype)
    if causal:
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future[None, :, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=2)  # over t'
    return torch.sigmoid(q) * (weights * v[:, None]).sum(2)


def aft_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, *, causal: bool = False,
             block: int = 1024) -> torch.Tensor:
    """AFT-full (eq. 2): ``exp(w) @ (exp(K) * V) / exp(w) @ exp(K)`` by blocks of ``block`` query rows, so the
    T x T bias is never exponentiated whole. ``w [T, T]``. Causal: :func:`_aft_full_causal`, whose offsets
    never include a later token."""
    ct = compute_dtype(q.dtype)
    n = q.shape[1]
    if causal:
        return (torch.sigmoid(q.to(ct)) * _aft_full_causal(k.to(ct), v.to(ct), w, min(block, 64))).to(q.dtype)
    ek = _exp_keys(k.to(ct))
    ekv = ek * v.to(ct)
    both = torch.cat([ekv, ek], dim=-1)  # one matmul for numerator and denominator
    out = []
    for s in range(0, n, block):
        wb = w[s: s + block].to(ct)
        ew = torch.exp(wb - wb.amax(dim=1, keepdim=True))  # row offsets cancel in the ratio
        nd = torch.matmul(ew, both)  # [batch, rows, 2C]
        num, den = nd.chunk(2, dim=-1)
        out.append(num / den)
    return (torch.sigmoid(q.to(ct)) * torch.cat(out, dim=1)).to(q.dtype)


def _aft_full_causal(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """``sum_{t'<=t} exp(w_tt' + K_t') V_t' / sum_{t'<=t} exp(w_tt' + K_t')`` with every offset taken over
    visible tokens only: row t's keys are shifted by ``m_t = max_{t'<=t} K_t'`` (per channel) and its biases by
    their maximum over ``t' <= t``, so a large later key can neither overflow nor underflow an earlier output
    (a shift by the maximum over all T tokens made every earlier row 0/0 once a later key was ~100 larger).
    By blocks of ``block`` rows ``[s, e)``: the keys before ``s`` go through one matmul, shifted by ``m_{s-1}``
    and rescaled per row by ``exp(m_{s-1} - m_t) <= 1``; the block's own keys through a ``[batch, rows, rows,
    C]`` product shifted per row. Exact; O(T^2 C) time, O(T C + batch block^2 C) memory."""
    n, c = k.shape[1], k.shape[2]
    m = k.cummax(dim=1).values  # [batch, T, C]
    pos = torch.arange(n, device=w.device)
    out = []
    for s in range(0, n, block):
        e = min(s + block, n)
        wb = w[s:e, :e].to(k.dtype).masked_fill(pos[None, :e] > pos[s:e, None], float("-inf"))
        ew = torch.exp(wb - wb.amax(dim=1, keepdim=True))  # [rows, e], 0 at future keys
        mr = m[:, s:e]
        # the block's keys, shifted by each row's own maximum; future entries clamped (their weight is 0)
        ed = torch.exp((k[:, None, s:e] - mr[:, :, None]).clamp(max=0.0)) * ew[None, :, s:e, None]
        num = (ed * v[:, None, s:e]).sum(2)
        den = ed.sum(2)
        if s > 0:
            mp = m[:, s - 1: s]  # the largest key before the block
            ep = torch.exp(k[:, :s] - mp)
            nd = torch.matmul(ew[:, :s], torch.cat([ep * v[:, :s], ep], dim=-1))
            rescale = torch.exp(mp - mr)  # <= 1
            num = num + nd[..., :c] * rescale
            den = den + nd[..., c:] * rescale
        out.append(num / den)
    return torch.cat(out, dim=1)


def _global_sums(ekv: torch.Tensor, ek: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if causal:
        return ekv.cumsum(1), ek.cumsum(1)
    return ekv.sum(1, keepdim=True), ek.sum(1, keepdim=True)


def _gated_running_mean(k: torch.Tensor, v: torch.Tensor, chunk: int | None = None,
                        lse: torch.Tensor | None = None) -> torch.Tensor:
    """``A_t = sum_{s<=t} exp(k_s) v_s / sum_{s<=t} exp(k_s)`` per channel, ``k, v [batch, T, C]``, computed as the
    recurrence ``A_t = (1 - p_t) A_{t-1} + p_t v_t`` with ``p_t = exp(k_t - L_t)``, ``L = logcumsumexp(k)``:
    every factor lies in [0, 1], so no shift by a maximum over the sequence is needed and a large future key
    cannot underflow earlier sums (the causal hazard of a global offset). Scanned by chunks of ~sqrt(T) tokens:
    each chunk from a zero state, the chunk-boundary states carried, then each chunk again from its true start."""
    b, n, c = k.shape
    p = torch.exp(k - (torch.logcumsumexp(k, dim=1) if lse is None else lse))
    a, u = 1.0 - p, p * v
    size = chunk or max(int(math.isqrt(n)), 1)
    nc = -(-n // size)
    pad = nc * size - n
    if pad:  # a = 1, u = 0 at padded steps: the state passes through unchanged
        a = torch.nn.functional.pad(a, (0, 0, 0, pad), value=1.0)
        u = torch.nn.functional.pad(u, (0, 0, 0, pad))
    a, u = a.view(b, nc, size, c), u.view(b, nc, size, c)
    h = torch.zeros(b, nc, c, dtype=k.dtype, device=k.device)
    for j in range(size):  # every chunk from a zero state, in parallel
        h = a[:, :, j] * h + u[:, :, j]
    decay = a.prod(dim=2)  # in [0, 1]: underflow to 0 only forgets what is negligible
    starts = [torch.zeros_like(h[:, 0])]
    for i in range(1, nc):
        starts.append(decay[:, i - 1] * starts[-1] + h[:, i - 1])
    h = torch.stack(starts, 1)
    out = torch.empty_like(u)
    for j in range(size):
        h = a[:, :, j] * h + u[:, :, j]
        out[:, :, j] = h
    return out.view(b, nc * size, c)[:, :n]


def aft_simple(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """AFT-simple (eq. 3): ``sigmoid(Q_t) * sum_t' softmax_t'(K) V_t'``; causal: eq. 2 with ``t' <= t``, as a
    running weighted mean whose factors all lie in [0, 1] (:func:`_gated_running_mean`), so a large later key
    never changes (or underflows) an earlier output."""
    ct = compute_dtype(q.dtype)
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k and v must be [batch, seq, channels] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if causal:
        return (torch.sigmoid(q.to(ct)) * _gated_running_mean(k.to(ct), v.to(ct))).to(q.dtype)
    ek = _exp_keys(k.to(ct))
    num, den = _global_sums(ek * v.to(ct), ek, causal)
    return (torch.sigmoid(q.to(ct)) * num / den).to(q.dtype)


def aft_simple_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None):
    """One causal decoding step of AFT-simple. ``q_t, k_t, v_t [batch, C]``; ``state = (num, den, max)`` each
    ``[batch, C]`` (None at the start): running sums rescaled to a running maximum, so nothing overflows."""
    ct = compute_dtype(q_t.dtype)
    k_t, v_t = k_t.to(ct), v_t.to(ct)
    if state is None:
        m = k_t
        num, den = v_t.clone(), torch.ones_like(k_t)
    else:
        num, den, m_old = state
        m = torch.maximum(m_old, k_t)
        old, new = torch.exp(m_old - m), torch.exp(k_t - m)
        num, den = num * old + new * v_t, den * old + new
    y = torch.sigmoid(q_t.to(ct)) * num / den
    return y.to(q_t.dtype), (num, den, m)


def aft_windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, corr: torch.Tensor, *,
                 causal: bool = False, per_position: bool = False, block: int = 1024) -> torch.Tensor:
    """AFT-local / AFT-conv (eq. 4-5). ``corr = exp(w) - 1`` inside the window of half-width ``s``:

    - ``per_position=False`` (AFT-conv): ``corr [2s - 1, C]``, the same for every position (a depthwise conv);
    - ``per_position=True`` (AFT-local): ``corr [T, 2s - 1]`` shared by the channels (``corr[t, o]`` weights
      ``t' = t + o - s + 1``).

    Causal forms use only offsets ``t' <= t``; when a later key exceeds a row's visible keys by more than
    ``_SAFE_GAP``, offsets over visible tokens only (:func:`_aft_windowed_causal`, ~4x slower at T = 2048).
    """
    ct = compute_dtype(q.dtype)
    if causal and _needs_causal_offsets(k.to(ct)):
        return (torch.sigmoid(q.to(ct)) * _aft_windowed_causal(k.to(ct), v.to(ct), corr.to(ct), per_position,
                                                               block)).to(q.dtype)
    n = q.shape[1]
    ek = _exp_keys(k.to(ct))
    ekv = ek * v.to(ct)
    num, den = _global_sums(ekv, ek, causal)
    width = corr.shape[-1] if per_position else corr.shape[-2]
    s = (width + 1) // 2
    both = torch.cat([ekv, ek], dim=-1)
    if per_position:
        extra = torch.empty_like(both)
        last = s if causal else width  # offsets o with t' - t = o - s + 1 <= 0 when causal
        corr = corr.to(ct)
        # Blocks of output positions, so the window's partial sums stay in cache however long the sequence.
        for b0 in range(0, n, block):
            b1 = min(b0 + block, n)
            acc = torch.zeros_like(both[:, b0:b1])
            for o in range(last):
                off = o - s + 1  # t' = t + off
                lo, hi = max(b0, -off), min(b1, n - off)
                if lo < hi:
                    acc[:, lo - b0: hi - b0].addcmul_(corr[lo:hi, o, None], both[:, lo + off: hi + off])
            extra[:, b0:b1] = acc
    else:
        c = corr.to(ct)
        c = torch.cat([c, c], dim=-1)  # the same weights for exp(K) V and exp(K): [2s - 1, 2C]
        offsets = range(-(s - 1), 1 if causal else s)  # t' - t, corr index offset + s - 1
        coeff = c[[o + s - 1 for o in offsets]].t()[None, None].expand(*both.shape, len(offsets))
        extra = shifted_products(torch.zeros_like(both), coeff, both, list(offsets), block=block)
    en, ed = extra.chunk(2, dim=-1)
    return (torch.sigmoid(q.to(ct)) * (num + en) / (den + ed)).to(q.dtype)


# Largest gap between the global key maximum and a row's running maximum for which one global offset is safe in
# the causal windowed form: exp(k - max_all) then stays a normal number with full relative precision for every
# row's own largest key (float32 underflows near exp(-87), float64 near exp(-708)).
_SAFE_GAP = {torch.float32: 30.0, torch.float64: 300.0}


def _needs_causal_offsets(k: torch.Tensor) -> bool:
    """Whether some row's visible keys lie so far below a later key that the global offset ``max_t K`` would lose
    them (then :func:`_aft_windowed_causal`, whose offsets see visible tokens only, is used)."""
    gap = (k.amax(dim=1, keepdim=True) - k.cummax(dim=1).values).amax()
    return bool(gap > _SAFE_GAP.get(k.dtype, 30.0))


def _aft_windowed_causal(k: torch.Tensor, v: torch.Tensor, corr: torch.Tensor, per_position: bool,
                         block: int) -> torch.Tensor:
    """Causal AFT-local / AFT-conv without a shift by later tokens: every term of row t is divided by
    ``exp(L_t)``, ``L_t = logcumsumexp(K)_t`` (per channel), the log of the row's own global denominator. The
    global part is then the running mean of :func:`_gated_running_mean` over a denominator of exactly 1, and the
    window terms ``corr_o exp(K_t' - L_t)`` have ``exp(K_t' - L_t)`` in [0, 1] for ``t' <= t``.
    ``corr [T, 2s - 1]`` (per position) or ``[2s - 1, C]``; returns the weighted mean ``[batch, T, C]``."""
    n = k.shape[1]
    lse = torch.logcumsumexp(k, dim=1)
    num = _gated_running_mean(k, v, lse=lse)
    en, ed = torch.zeros_like(num), torch.zeros_like(num)
    width = corr.shape[-1] if per_position else corr.shape[-2]
    s = (width + 1) // 2
    for b0 in range(0, n, block):  # blocks of output positions, so the partial sums stay in cache
        b1 = min(b0 + block, n)
        for o in range(s):  # offsets t' - t = o - s + 1 <= 0
            off = o - s + 1
            lo, hi = max(b0, -off), b1
            if lo >= hi:
                continue
            e = torch.exp(k[:, lo + off: hi + off] - lse[:, lo:hi])  # exp(K_t' - L_t) <= 1 for t' <= t
            e = e * (corr[lo:hi, o, None] if per_position else corr[o])
            en[:, lo:hi].addcmul_(e, v[:, lo + off: hi + off])
            ed[:, lo:hi].add_(e)
    return (num + en) / (1.0 + ed)


def window_bias_matrix(corr: torch.Tensor, n: int, *, per_position: bool) -> torch.Tensor:
    """The dense biases ``w`` (``log(1 + corr)`` inside the window, 0 outside) for the references: ``[T, T]``
    from AFT-local's ``corr [T, 2s - 1]``, ``[T, T, C]`` from AFT-conv's ``corr [2s - 1, C]``."""
    width = corr.shape[-2] if not per_position else corr.shape[-1]
    s = (width + 1) // 2
    shape = (n, n) if per_position else (n, n, corr.shape[-1])
    w = torch.zeros(shape, dtype=corr.dtype, device=corr.device)
    for t in range(n):
        for o in range(width):
            tp = t + o - s + 1
            if 0 <= tp < n:
                w[t, tp] = torch.log1p(corr[t, o] if per_position else corr[o])
    return w


def aft_windowed_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, corr_t: torch.Tensor, state):
    """One causal decoding step of AFT-local / AFT-conv. ``q_t, k_t, v_t [batch, C]``; ``corr_t [s, C]`` (or
    ``[s, 1]``): ``exp(w) - 1`` for the offsets ``0, -1, ..., -(s - 1)`` of this step. ``state = (num, den, max,
    keys, values)``: the running global sums rescaled to a running maximum (as :func:`aft_simple_step`) and the
    last ``s - 1`` keys and values ``[batch, s - 1, C]``; None at the start."""
    ct = compute_dtype(q_t.dtype)
    k_t, v_t = k_t.to(ct), v_t.to(ct)
    s = corr_t.shape[0]
    if state is None:
        keys = k_t.new_zeros(k_t.shape[0], s - 1, k_t.shape[1])
        values = torch.zeros_like(keys)
        keys.fill_(float("-inf"))  # no token yet: exp(-inf) = 0 weight
        num, den, m = v_t.clone(), torch.ones_like(k_t), k_t
    else:
        num, den, m_old, keys, values = state
        m = torch.maximum(m_old, k_t)
        old, new = torch.exp(m_old - m), torch.exp(k_t - m)
        num, den = num * old + new * v_t, den * old + new
    win_k = torch.cat([k_t[:, None], keys.flip(1)], 1)  # offsets 0, -1, ..., -(s - 1)
    win_v = torch.cat([v_t[:, None], values.flip(1)], 1)
    e = torch.exp(win_k - m[:, None]) * corr_t.to(ct)
    y = torch.sigmoid(q_t.to(ct)) * (num + (e * win_v).sum(1)) / (den + e.sum(1))
    keys = torch.cat([keys[:, 1:], k_t[:, None]], 1) if s > 1 else keys
    values = torch.cat([values[:, 1:], v_t[:, None]], 1) if s > 1 else values
    return y.to(q_t.dtype), (num, den, m, keys, values)
