"""SOFT: softmax-free attention with a Gaussian kernel, made linear by a Nystrom decomposition.

Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity", NeurIPS 2021 (journal version
"Softmax-free Linear Transformers"). The attention matrix is the Gaussian kernel

    S_ij = exp(-|q_i - k_j|^2 s / 2)        (s = 1 / sqrt(d): exp(-|q - k|^2 / (2 sqrt(d))))

and is approximated through ``m`` landmarks ``Q~, K~`` (segment means, the paper's average-pooling
bottleneck): ``S^ = S(Q, K~) pinv(S(Q~, K~)) S(Q~, K)``, ``out = S^ V``, the pseudo-inverse by
Newton-Raphson iterations. In the paper queries and keys share one projection (so ``S`` is symmetric PSD);
here they may differ. ``normalize=True`` applies the journal version's symmetric normalisation
``D_q^{-1/2} S^ D_k^{-1/2}`` with ``D`` the row and column sums of ``S^``.

It approximates the Gaussian-kernel attention (:func:`gaussian_kernel_attention`), not softmax. With
``m = n`` and an exact pseudo-inverse it is exact (``S pinv(S) S = S``). No causal form.
O(n m d + m^3) time, O(n m) memory.
"""

from __future__ import annotations

import math
import warnings

import torch

from attnkit.ops.approx._common import check_positive_int, prepare, refuse_causal, segment_means, upcast
from attnkit.ops.approx.pinv import pseudo_inverse

__all__ = ["soft_attention", "soft_reference", "gaussian_kernel", "gaussian_kernel_attention"]


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """``exp(-|x_i - y_j|^2 scale / 2)`` for ``x [.., n, d]``, ``y [.., m, d]``: ``[.., n, m]``."""
    return torch.exp(_log_gaussian(x, y, scale))


def _log_gaussian(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    sq = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.transpose(-1, -2)
    return -0.5 * scale * sq.clamp_min(0)


def _shifted_gaussian(x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(L - g), g)`` with ``L`` the log-kernel and ``g [.., 1, 1]`` its maximum (no gradient): the kernel
    up to one factor per (batch, head). Unshifted, every entry underflows once ``|x - y|^2 scale / 2`` passes
    ~87 (float32; q, k of 5x unit scale at d = 64) and the output collapses to zeros."""
    log_k = _log_gaussian(x, y, scale)
    g = log_k.detach().amax((-2, -1), keepdim=True)
    return torch.exp(log_k - g), g


def _check(q, k, num_landmarks, causal):
    refuse_causal("soft", causal, "segment-mean landmarks average over future tokens")
    check_positive_int("num_landmarks", num_landmarks)
    n = min(q.shape[2], k.shape[2])
    if num_landmarks > n:
        raise ValueError(f"num_landmarks={num_landmarks} is more than the sequence length {n}; use "
                         f"num_landmarks <= {n} (num_landmarks = length with pinv='exact' is exact)")


def _normalise(p1, z, p2, v, normalize):
    """``S^ v`` with ``S^ = p1 z p2`` applied right to left; optionally the symmetric normalisation."""
    def apply(x):
        return p1 @ (z @ (p2 @ x))

    if not normalize:
        return apply(v)
    ones_k = torch.ones(*p2.shape[:-2], p2.shape[-1], 1, dtype=v.dtype, device=v.device)
    row = apply(ones_k)[..., 0].clamp_min(1e-12)  # S^ 1
    ones_q = torch.ones(*p1.shape[:-2], 1, p1.shape[-2], dtype=v.dtype, device=v.device)
    col = (((ones_q @ p1) @ z) @ p2)[..., 0, :].clamp_min(1e-12)  # 1^T S^
    return apply(v * col.rsqrt()[..., None]) * row.rsqrt()[..., None]


def soft_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_landmarks: int = 64,
                   newton_iterations: int = 20, pinv: str = "newton_raphson", normalize: bool = False,
                   causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """SOFT attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``.

    ``pinv``: ``"newton_raphson"`` (paper; ``newton_iterations`` steps), ``"newton_schulz"`` or ``"exact"``.
    """
    _check(q, k, num_landmarks, causal)
    k, v, scale = prepare(q, k, v, scale)
    dtype = q.dtype
    # Half precisions run in float32: |q - k|^2 cancels and the pseudo-inverse amplifies rounding.
    q, k, v = upcast(q), upcast(k), upcast(v)
    q_l, k_l = segment_means(q, num_landmarks), segment_means(k, num_landmarks)
    # Each kernel up to a factor e^g per (batch, head) (pinv(e^g W) = e^-g pinv(W)): the factors cancel in the
    # normalised form and multiply the plain one once at the end, in the log domain.
    p1, g1 = _shifted_gaussian(q, k_l, scale)  # [b, h, n, m]
    w, g3 = _shifted_gaussian(q_l, k_l, scale)
    z = pseudo_inverse(w, pinv, newton_iterations)
    p2, g2 = _shifted_gaussian(q_l, k, scale)  # [b, h, m, n_k]
    out = _normalise(p1, z, p2, v, normalize)
    if not normalize:
        log_scale = g1 + g2 - g3
        if bool((log_scale < math.log(torch.finfo(dtype).tiny)).any()):
            warnings.warn(
                "soft_attention: the Gaussian kernel exp(-|q - k|^2 / (2 sqrt(d))) of these queries and keys is "
                f"below {dtype}'s range (every |q - k| is large), so the unnormalised output underflows to 0. "
                "Pass normalize=True (its scale cancels) or scale q and k down", RuntimeWarning, stacklevel=2)
        out = out * torch.exp(log_scale)  # the kernel's own scale: tiny for far-apart q, k, as S itself
    return out.to(dtype)


def soft_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_landmarks: int = 64,
                   newton_iterations: int = 20, pinv: str = "newton_raphson", normalize: bool = False,
                   causal: bool = False, scale: float | None = None, return_attention: bool = False):
    """Plain reference (float64): materialises ``S^ [b, h, n, n_k]`` (normalised when asked) and returns
    ``S^ V``."""
    _check(q, k, num_landmarks, causal)
    k, v, scale = prepare(q, k, v, scale)
    qd, kd = q.double(), k.double()
    q_l, k_l = segment_means(qd, num_landmarks), segment_means(kd, num_landmarks)
    (p1, g1), (w, g3), (p2, g2) = (_shifted_gaussian(a, b, scale) for a, b in ((qd, k_l), (q_l, k_l), (q_l, kd)))
    s_hat = p1 @ pseudo_inverse(w, pinv, newton_iterations) @ p2  # S^ up to exp(g1 + g2 - g3), as in the fast path
    if not normalize:
        s_hat = s_hat * torch.exp(g1 + g2 - g3)
    if normalize:
        row, col = s_hat.sum(-1).clamp_min(1e-12), s_hat.sum(-2).clamp_min(1e-12)
        s_hat = s_hat * row.rsqrt()[..., :, None] * col.rsqrt()[..., None, :]
    out = (s_hat @ v.double()).to(q.dtype)
    return (out, s_hat) if return_attention else out


def gaussian_kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool = False,
                              scale: float | None = None, return_attention: bool = False, **_):
    """The exact target of SOFT (float64, quadratic): ``S V`` with the full Gaussian kernel ``S``
    (symmetrically normalised when ``normalize``)."""
    k, v, scale = prepare(q, k, v, scale)
    s, g = _shifted_gaussian(q.double(), k.double(), scale)  # a global factor: cancels when normalised
    if not normalize:
        s = s * torch.exp(g)
    if normalize:
        s = s * s.sum(-1).rsqrt()[..., :, None] * s.sum(-2).rsqrt()[..., None, :]
    out = (s @ v.double()).to(q.dtype)
    return (out, s) if return_attention else out
