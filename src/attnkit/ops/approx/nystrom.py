"""Nystromformer: segment-mean landmarks and an iterative pseudo-inverse.

Xiong et al., "Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention", AAAI 2021.
With landmarks ``Q~ = segment_means(Q, m)``, ``K~ = segment_means(K, m)``::

    S^ = softmax(Q K~^T s) . pinv(softmax(Q~ K~^T s)) . softmax(Q~ K^T s),   out = S^ V (+ DWConv(V))

Cost O(n m d + m^3) time and O(n m) memory. With m = n (every segment one token) and an exact pinv,
S^ = A pinv(A) A = A, the exact softmax matrix. No causal form: segment means mix future tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.ops.approx._common import check_positive_int, prepare, refuse_causal, segment_means, upcast
from attnkit.ops.approx.pinv import pseudo_inverse

__all__ = ["nystrom_attention", "nystrom_reference", "depthwise_conv_skip"]


def _check(q: torch.Tensor, k: torch.Tensor, num_landmarks: int, causal: bool) -> None:
    refuse_causal("nystrom", causal, "segment-mean landmarks average over future tokens")
    check_positive_int("num_landmarks", num_landmarks)
    n = min(q.shape[2], k.shape[2])
    if num_landmarks > n:
        raise ValueError(
            f"num_landmarks={num_landmarks} is more than the sequence length {n}: each landmark is the mean "
            f"of a non-empty segment; use num_landmarks <= {n} (num_landmarks = length is exact)"
        )


def depthwise_conv_skip(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The paper's skip connection: a depthwise convolution of ``v [b, h, n, dv]`` along the sequence, one
    kernel per head, ``weight [h, 1, kernel, 1]`` (odd kernel, 'same' padding)."""
    kernel = weight.shape[2]
    if kernel % 2 != 1 or weight.shape[0] != v.shape[1]:
        raise ValueError(f"conv weight must be [heads={v.shape[1]}, 1, odd kernel, 1], got {tuple(weight.shape)}")
    return F.conv2d(v, weight.to(v.dtype), padding=(kernel // 2, 0), groups=v.shape[1])


def _kernels(q, k, scale, m):
    q_l, k_l = segment_means(q, m), segment_means(k, m)
    k1 = torch.softmax(q @ k_l.transpose(-1, -2) * scale, dim=-1)  # [b, h, n, m]
    k2 = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, dim=-1)  # [b, h, m, m]
    k3 = torch.softmax(q_l @ k.transpose(-1, -2) * scale, dim=-1)  # [b, h, m, n]
    return k1, k2, k3


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_landmarks: int = 64,
                      pinv_iterations: int = 6, pinv: str = "newton_schulz",
                      conv_weight: torch.Tensor | None = None, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """Nystrom attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``.

    ``num_landmarks`` (m <= length); ``pinv``: ``"newton_schulz"`` (paper, ``pinv_iterations`` steps) or
    ``"exact"``; ``conv_weight [h, 1, kernel, 1]`` adds the depthwise-conv skip on V.
    """
    _check(q, k, num_landmarks, causal)
    k, v, scale = prepare(q, k, v, scale)
    dtype = q.dtype
    # Half precisions run in float32: the pseudo-inverse amplifies rounding of the m x m kernel.
    q, k, v = upcast(q), upcast(k), upcast(v)
    k1, k2, k3 = _kernels(q, k, scale, num_landmarks)
    z = pseudo_inverse(k2, pinv, pinv_iterations)
    # Right to left keeps every intermediate O(n m).
    out = k1 @ (z @ (k3 @ v))
    if conv_weight is not None:
        out = out + depthwise_conv_skip(v, conv_weight)
    return out.to(dtype)


def nystrom_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_landmarks: int = 64,
                      pinv_iterations: int = 6, pinv: str = "newton_schulz",
                      conv_weight: torch.Tensor | None = None, causal: bool = False,
                      scale: float | None = None, return_attention: bool = False):
    """Plain reference: materialises ``S^ [b, h, n, n]`` (float64) and returns ``S^ V`` (+ conv skip), in the
    input dtype; with ``return_attention`` also ``S^``."""
    _check(q, k, num_landmarks, causal)
    k, v, scale = prepare(q, k, v, scale)
    qd, kd, vd = q.double(), k.double(), v.double()
    k1, k2, k3 = _kernels(qd, kd, scale, num_landmarks)
    s_hat = k1 @ pseudo_inverse(k2, pinv, pinv_iterations) @ k3
    out = s_hat @ vd
    if conv_weight is not None:
        out = out + depthwise_conv_skip(vd, conv_weight.double())
    out = out.to(q.dtype)
    return (out, s_hat) if return_attention else out
