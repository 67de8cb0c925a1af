"""Holographic reduced representations (Alam et al., "Recasting Self-Attention with Holographic Reduced
Representations", eq. 1-4). Binding ``a (*) b`` is circular convolution over the feature axis (FFT); vectors are
projected to unit-magnitude spectra, so the involution ``q^+ = (q_0, q_{H-1}, ..., q_1)`` (a conjugate spectrum)
is the exact inverse and unbinding recovers bound values.

``beta = sum_t k_t (*) v_t``; ``v_hat_t = q_t^+ (*) beta``; ``w_t = cos(v_t, v_hat_t)``;
``a = softmax_t(w)``; ``out_t = a_t v_t``. Shapes ``[batch, heads, seq, H]``. The causal form (not in the
paper, which classifies) uses prefix sums ``beta_t`` and a prefix softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.ops.mixers._common import compute_dtype


def project(x: torch.Tensor) -> torch.Tensor:
    """Unit-magnitude spectrum: ``irfft(rfft(x) / |rfft(x)|)`` (the paper's projection step)."""
    f = torch.fft.rfft(x, dim=-1)
    return torch.fft.irfft(f / f.abs().clamp_min(1e-12), n=x.shape[-1], dim=-1)


def bind(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Circular convolution over the last axis by FFT."""
    n = a.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(a, dim=-1) * torch.fft.rfft(b, dim=-1), n=n, dim=-1)


def involution(a: torch.Tensor) -> torch.Tensor:
    """``a^+_i = a_{-i mod H}``: the HRR approximate inverse (exact for unit-magnitude spectra)."""
    return torch.roll(a.flip(-1), 1, dims=-1)


def bind_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a (*) b)_i = sum_j a_j b_{(i - j) mod H}`` with an explicit index matrix."""
    n = a.shape[-1]
    idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) % n  # [i, j]
    return (a[..., None, :] * b[..., idx.to(a.device)]).sum(-1)


def hrr_attention(q, k, v, *, causal: bool = False) -> torch.Tensor:
    """Hrrformer attention, O(seq H log H) per head."""
    ct = compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    n = q.shape[-1]
    qf = torch.fft.rfft(project(q), dim=-1)
    kf = torch.fft.rfft(project(k), dim=-1)
    kv = kf * torch.fft.rfft(v, dim=-1)
    beta = kv.cumsum(2) if causal else kv.sum(2, keepdim=True)
    v_hat = torch.fft.irfft(qf.conj() * beta, n=n, dim=-1)  # q^+ (*) beta: conjugate spectrum
    w = F.cosine_similarity(v, v_hat, dim=-1, eps=1e-8)  # [b, h, T] in [-1, 1]: exp cannot overflow
    if causal:
        e = torch.exp(w)
        a = e / e.cumsum(-1)
    else:
        a = torch.softmax(w, dim=-1)
    return a[..., None] * v


def hrr_attention_reference(q, k, v, *, causal: bool = False) -> torch.Tensor:
    """The same with explicit circular convolutions, the involution and a materialised (masked) sum."""
    q, k = project(q), project(k)
    bound = bind_reference(k, v)  # [b, h, T, H]
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=q.dtype, device=q.device)
    if causal:
        mask = mask.tril()
    beta = torch.einsum("ts,bhsd->bhtd", mask, bound)
    v_hat = bind_reference(involution(q), beta)
    w = (v * v_hat).sum(-1) / (v.norm(dim=-1) * v_hat.norm(dim=-1)).clamp_min(1e-8)
    e = torch.exp(w)
    a = e / torch.einsum("ts,bhs->bht", mask, e)
    return a[..., None] * v


def hrr_step(q_t, k_t, v_t, state):
    """Causal decoding step: ``q_t, k_t, v_t [batch, heads, H]``; ``state = (beta_f, z)`` with the spectrum of
    the running binding ``[batch, heads, H // 2 + 1]`` and the running softmax sum ``[batch, heads]``."""
    ct = compute_dtype(q_t.dtype)
    q_t, k_t, v_t = q_t.to(ct), k_t.to(ct), v_t.to(ct)
    n = q_t.shape[-1]
    kv = torch.fft.rfft(project(k_t), dim=-1) * torch.fft.rfft(v_t, dim=-1)
    beta, z = (kv, 0.0) if state is None else (state[0] + kv, state[1])
    v_hat = torch.fft.irfft(torch.fft.rfft(project(q_t), dim=-1).conj() * beta, n=n, dim=-1)
    e = torch.exp(F.cosine_similarity(v_t, v_hat, dim=-1, eps=1e-8))
    z = z + e
    return (e / z)[..., None] * v_t, (beta, z)
