"""Linear recurrences of the mixers family: Mamba's selective scan (Mamba-ND) and Mega's damped EMA.

Selective scan (Gu & Dao, "Mamba", eq. 2a-2b with the zero-order hold of ``A`` and Euler ``B``, as Mamba-ND
uses it): ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t``, ``y_t = <C_t, h_t>``, per channel ``e`` with state
``[e, N]``. Shapes: ``x, dt [batch, seq, E]``, ``A [E, N]``, ``B, C [batch, seq, N]``.

Damped EMA (Ma et al., "Mega", eq. 2-3): ``h_t = alpha beta u_t + (1 - alpha delta) h_{t-1}``,
``y_t = sum_h eta h_t`` per channel with expansion ``h``: a causal convolution by the closed-form kernel
``k_j = sum_h eta alpha beta (1 - alpha delta)^j``; computed by chunks (short Toeplitz matmuls inside chunks,
states carried across them: the fast path) or by FFT of the whole kernel (the paper's long-convolution view).
"""

from __future__ import annotations

import math

import torch

from attnkit.ops.mixers._common import compute_dtype, conv_fft

# ---- selective scan -------------------------------------------------------------------------------------


def selective_scan_reference(x, dt, A, B, C, h0=None):
    """The recurrence, one token at a time. Returns ``(y [batch, seq, E], h_last [batch, E, N])``."""
    b, n, e = x.shape
    h = torch.zeros(b, e, A.shape[1], dtype=x.dtype, device=x.device) if h0 is None else h0
    ys = []
    for t in range(n):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def selective_scan_step(x_t, dt_t, A, B_t, C_t, h):
    """One decoding step: ``x_t, dt_t [batch, E]``, ``B_t, C_t [batch, N]``, ``h [batch, E, N]``."""
    h = torch.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * B_t[:, None, :]
    return (h * C_t[:, None, :]).sum(-1), h


def selective_scan_chunked(x, dt, A, B, C, *, chunk: int | None = None):
    """The same recurrence by chunks of ``chunk`` tokens (default ~sqrt(seq)): every chunk is scanned from a
    zero state in parallel (``chunk`` steps over ``[batch, chunks, E, N]``), the chunk boundary states are
    carried across chunks (``chunks`` steps over ``[batch, E, N]``) and every chunk is scanned again from its
    true start state, emitting ``y``. 2 chunk + chunks sequential steps instead of seq; exact (no log-space
    cumulative products, which overflow for long chunks); never holds the ``[seq, E, N]`` states.
    Returns ``y [batch, seq, E]``."""
    b, n, e = x.shape
    N = A.shape[1]
    c = chunk or max(int(math.isqrt(n)), 1)
    nc = -(-n // c)
    pad = nc * c - n
    if pad:  # dt = 0 at padded steps: decay 1 and no input, the state passes through unchanged
        x, dt = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (x, dt))
        B, C = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (B, C))
    xs, dts = x.view(b, nc, c, e), dt.view(b, nc, c, e)
    Bs, Cs = B.view(b, nc, c, N), C.view(b, nc, c, N)
    dtx = dts * xs

    def local_scan(h, emit):
        ys = []
        for j in range(c):
            h = torch.exp(dts[:, :, j, :, None] * A) * h + dtx[:, :, j, :, None] * Bs[:, :, j, None, :]
            if emit:
                ys.append((h * Cs[:, :, j, None, :]).sum(-1))
        return h, ys

    zero = torch.zeros(b, nc, e, N, dtype=x.dtype, device=x.device)
    ends, _ = local_scan(zero, emit=False)
    decay = torch.exp(dts.sum(2)[..., None] * A)  # product of a chunk's per-step decays
    starts = [zero[:, 0]]
    for i in range(1, nc):
        starts.append(decay[:, i - 1] * starts[-1] + ends[:, i - 1])
    _, ys = local_scan(torch.stack(starts, 1), emit=True)
    return torch.stack(ys, 2).reshape(b, nc * c, e)[:, :n]


# ---- Mega's damped EMA ----------------------------------------------------------------------------------

def ema_coefficients(alpha, delta, beta, eta):
    """``(p, q, g)``: input gain ``p = alpha beta``, decay ``q = 1 - alpha delta``, output weight ``g = eta``,
    each ``[C, h]``."""
    return alpha * beta, 1.0 - alpha * delta, eta


def ema_kernel(p, q, g, n: int, *, block: int = 2048):
    """``k_j = sum_h g p q^j``, ``j < n``: ``[n, C]``. One table of powers ``q^i`` (``i < block``) serves every
    block of lags: block ``s`` is ``q^i`` times the weights ``g p q^s`` (a batched mat-vec per channel, no
    exponentials after the first block); memory ``block x C x h``."""
    block = max(1, min(block, n))
    i = torch.arange(block, device=q.device, dtype=q.dtype)
    powers = torch.exp(i[None, :, None] * torch.log(q)[:, None, :])  # [C, block, h]
    w = g * p  # [C, h]
    step = q ** block
    out = []
    for s in range(0, n, block):
        length = min(block, n - s)
        out.append(torch.bmm(powers[:, :length], w[:, :, None])[..., 0].t())  # [length, C]
        w = w * step
    return torch.cat(out, 0)


def ema_reference(u, p, q, g, h0=None):
    """The EMA recurrence token by token: ``u [batch, seq, C]`` -> ``(y, h_last [batch, C, h])``."""
    b, n, c = u.shape
    h = torch.zeros(b, c, p.shape[1], dtype=u.dtype, device=u.device) if h0 is None else h0
    ys = []
    for t in range(n):
        h = p * u[:, t, :, None] + q * h
        ys.append((g * h).sum(-1))
    return torch.stack(ys, 1), h


def ema_step(u_t, p, q, g, h):
    """One decoding step of the EMA: ``u_t [batch, C]``, ``h [batch, C, h]``."""
    h = p * u_t[..., None] + q * h
    return (g * h).sum(-1), h


def ema_chunked(u, p, q, g, *, chunk: int = 32):
    """The EMA by chunks of ``chunk`` tokens (the fast path): inside a chunk a causal convolution by the first
    ``chunk`` lags of the closed-form kernel (one ``chunk x chunk`` Toeplitz matmul per channel); across chunks
    the ``[C, h]`` states carried by a scan over chunks and read out through ``g q^(j+1)``. O(n C (chunk + h)),
    exact, with ``seq / chunk`` sequential steps instead of ``seq``."""
    b, n, c_ = u.shape
    ct = compute_dtype(u.dtype)
    p, q, g = p.to(ct), q.to(ct), g.to(ct)
    c = max(1, min(chunk, n))
    nc = -(-n // c)
    uc = torch.nn.functional.pad(u.to(ct), (0, 0, 0, nc * c - n)).view(b, nc, c, c_)
    j = torch.arange(c, device=u.device, dtype=ct)
    qpow = torch.exp(j[:, None, None] * torch.log(q))  # [c, C, h]: q^j
    kern = (qpow * (g * p)).sum(-1)  # [c, C]: lags 0..c-1
    lag = torch.arange(c, device=u.device)
    lag = lag[:, None] - lag[None, :]  # [j, i]
    toeplitz = kern[lag.clamp(min=0)] * (lag >= 0)[..., None].to(ct)  # [j, i, C]
    # intra-chunk: y[k, j] = sum_{i <= j} K[j - i] u[k, i], a bmm per channel
    u_cm = uc.permute(3, 0, 1, 2).reshape(c_, b * nc, c)  # [C, b nc, c]
    y = torch.bmm(u_cm, toeplitz.permute(2, 1, 0))  # [C, b nc, j]
    # states at chunk ends from zero starts, then carried across chunks
    ends = torch.einsum("bkic,ich->bkch", uc, qpow.flip(0) * p)  # sum_i q^(c-1-i) p u_i
    decay = q ** c
    starts = [torch.zeros_like(ends[:, 0])]
    for k in range(nc - 1):
        starts.append(decay * starts[-1] + ends[:, k])
    h0 = torch.stack(starts, 1)  # [b, nc, C, h]
    read = g * qpow * q  # [j, C, h]: g q^(j+1)
    carry = torch.bmm(h0.permute(2, 0, 1, 3).reshape(c_, b * nc, -1), read.permute(1, 2, 0))  # [C, b nc, j]
    out = (y + carry).view(c_, b, nc, c).permute(1, 2, 3, 0).reshape(b, nc * c, c_)
    return out[:, :n].to(u.dtype)


def ema_fft(u, p, q, g):
    """The EMA as a causal convolution by its closed-form kernel, by FFT: O(n log n C + n C h)."""
    ct = compute_dtype(u.dtype)
    k = ema_kernel(p.to(ct), q.to(ct), g.to(ct), u.shape[1])
    return conv_fft(u, k, left=0)
