"""Softmax-normalised short convolutions (Wu et al., "Pay Less Attention with Lightweight and Dynamic
Convolutions", eq. 2-4) and the lambda convolution of position lambdas (Bello, "LambdaNetworks", sec. 3.2).

Convention: cross-correlation ``y_i = sum_j w_j x_{i + j - pad_left}``, ``pad_left = k // 2`` (centred) or
``k - 1`` (causal, a left-aligned kernel as in the paper's decoder). ``x [batch, seq, C]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.ops.mixers._common import compute_dtype, shifted_products


def pad_left(kernel_size: int, causal: bool) -> int:
    return kernel_size - 1 if causal else kernel_size // 2


def _unfold(x: torch.Tensor, k: int, left: int) -> torch.Tensor:
    """``[batch, seq, C]`` -> ``[batch, seq, C, k]`` windows (zeros outside the sequence)."""
    xp = F.pad(x, (0, 0, left, k - 1 - left))
    return xp.unfold(1, k, 1)


def lightconv(x: torch.Tensor, weight: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """LightConv: ``weight [H, k]`` raw kernels; softmax over the kernel width and shared by the ``C / H``
    channels of each head."""
    b, n, c = x.shape
    h, k = weight.shape
    w = torch.softmax(weight.to(compute_dtype(weight.dtype)), dim=-1).to(x.dtype)  # [H, k]
    left = pad_left(k, causal)
    # one shifted multiply-add per tap over blocks of positions (cache-resident at any length); the
    # per-head weights broadcast over each head's channels
    xh = x.view(b, n, h, c // h)
    coeff = w[None, None, :, None, :].expand(b, n, h, 1, k)
    return shifted_products(torch.zeros_like(xh), coeff, xh, [j - left for j in range(k)]).view(b, n, c)


def lightconv_reference(x: torch.Tensor, weight: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """LightConv by explicit windows (unfold)."""
    b, n, c = x.shape
    h, k = weight.shape
    w = torch.softmax(weight, dim=-1)
    win = _unfold(x, k, pad_left(k, causal)).reshape(b, n, h, c // h, k)
    return torch.einsum("bnhck,hk->bnhc", win, w).reshape(b, n, c)


def dynamic_conv(x: torch.Tensor, weights: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """DynamicConv: per-position kernels ``weights [batch, seq, H, k]`` (already softmax-normalised), shared
    by each head's channels. One shifted product per tap: O(seq k C) time, O(seq C) extra memory."""
    b, n, c = x.shape
    h, k = weights.shape[2:]
    left = pad_left(k, causal)
    xh = x.view(b, n, h, c // h)
    y = torch.zeros_like(xh)
    shifted_products(y, weights[:, :, :, None, :], xh, [j - left for j in range(k)])  # y_i += w_ij x_{i + j - left}
    return y.view(b, n, c)


def dynamic_conv_reference(x: torch.Tensor, weights: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    b, n, c = x.shape
    h, k = weights.shape[2:]
    win = _unfold(x, k, pad_left(k, causal)).reshape(b, n, h, c // h, k)
    return torch.einsum("bnhck,bnhk->bnhc", win, weights).reshape(b, n, c)


def dynamic_conv_step(x_window: torch.Tensor, weights_t: torch.Tensor) -> torch.Tensor:
    """Causal decoding step: ``x_window [batch, k, C]`` (the last k inputs, oldest first, zeros before the
    start), ``weights_t [batch, H, k]`` -> ``[batch, C]``."""
    b, k, c = x_window.shape
    h = weights_t.shape[1]
    return torch.einsum("bkhc,bhk->bhc", x_window.view(b, k, h, c // h), weights_t).reshape(b, c)
