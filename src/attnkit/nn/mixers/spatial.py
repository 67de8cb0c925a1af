"""2-D mixers: large-kernel and convolutional attention (LKA, LKCA, ParC-Net V2, MetaMixer: F9, F10, F11, F19)
and spectral mixers (adaptive frequency filter, spectral gating: F12, F13).

Part of :mod:`attnkit.nn.mixers` (issue 12); the math is in :mod:`attnkit.ops.mixers`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.nn.mixers._base import _check_dim, _Mixer2d, _positive, _refuse_causal
from attnkit.ops.mixers._common import (
    compute_dtype,
    dwconv2d,
    dwconv2d_reference,
    irfft2_reference,
    rfft2_channels_first,
    rfft2_reference,
    spectral_filter_channels_first,
)

__all__ = ["LargeKernelAttention", "LKCA", "ParCNetV2Mixer", "MetaMixer", "AdaptiveFrequencyFilter", "SpectralGating"]


# ---- F9, F10, F11, F19: 2-D convolutional mixers --------------------------------------------------------------

class LargeKernelAttention(_Mixer2d):
    """Large kernel attention (Guo et al., "Visual Attention Network", eq. 1-2 and the spatial attention
    unit): ``u = GELU(W_1 x)``, ``attn = Conv1x1(DWConv_dilated(DWConv(u)))``, ``W_2 (attn * u)``. A
    ``kernel_size`` x ``kernel_size`` kernel decomposes into a ``(2d - 1)``-wide depthwise conv, a
    ``ceil(K / d)``-wide depthwise conv with dilation ``d`` and a 1x1 conv (K = 21, d = 3: 5x5 then 7x7
    dilated by 3, a 23 x 23 support)."""

    def __init__(self, dim: int, *, kernel_size: int = 21, dilation: int = 3, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("LKA", causal)
        _check_dim(dim)
        _positive(kernel_size=kernel_size, dilation=dilation)
        k0 = 2 * dilation - 1
        k1 = math.ceil(kernel_size / dilation)
        k1 += 1 - k1 % 2  # odd, so the dilated conv is centred
        self.dilation = dilation
        self.proj_1 = nn.Linear(dim, dim)
        self.conv0 = nn.Parameter(torch.randn(dim, 1, k0, k0) / k0)
        self.conv0_bias = nn.Parameter(torch.zeros(dim))
        self.conv_spatial = nn.Parameter(torch.randn(dim, 1, k1, k1) / k1)
        self.conv_spatial_bias = nn.Parameter(torch.zeros(dim))
        self.conv1 = nn.Linear(dim, dim)
        self.proj_2 = nn.Linear(dim, dim)

    def _run(self, x, conv):
        self._check(x)
        u = F.gelu(self.proj_1(x))
        a = conv(u, self.conv0, self.conv0_bias)
        a = conv(a, self.conv_spatial, self.conv_spatial_bias, dilation=self.dilation)
        return self.proj_2(self.conv1(a) * u)

    def forward(self, x):
        return self._run(x, dwconv2d)

    def reference(self, x):
        return self._run(x, dwconv2d_reference)


class LKCA(_Mixer2d):
    """Large kernel convolutional attention (Li et al., "LKCA: Large Kernel Convolutional Attention"): one
    ``kernel_size`` x ``kernel_size`` depthwise convolution in place of attention, i.e. attention with a fixed
    banded Toeplitz matrix ``A_pq = w[q - p]`` per channel (the paper's two equivalent views; :meth:`reference`
    materialises the matrix)."""

    def __init__(self, dim: int, *, kernel_size: int = 13, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("LKCA", causal)
        _check_dim(dim)
        _positive(kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.weight = nn.Parameter(torch.randn(dim, 1, kernel_size, kernel_size) / kernel_size)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        self._check(x)
        return dwconv2d(x, self.weight, self.bias)

    def attention_matrix(self, h: int, w: int) -> torch.Tensor:
        """``[dim, h * w, h * w]``: the weight of input position q for output position p."""
        k = self.weight.shape[-1]
        dev = self.weight.device
        ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        dy = ys[None, :] - ys[:, None] + k // 2
        dx = xs[None, :] - xs[:, None] + k // 2
        inside = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
        a = self.weight[:, 0, dy.clamp(0, k - 1), dx.clamp(0, k - 1)]
        return a * inside.to(a.dtype)

    def reference(self, x):
        self._check(x)
        b, h, w, c = x.shape
        a = self.attention_matrix(h, w)
        return torch.einsum("cpq,bqc->bpc", a, x.reshape(b, h * w, c)).reshape(b, h, w, c) + self.bias


class ParCNetV2Mixer(_Mixer2d):
    """Oversized convolution with a bifurcate gate (Xu et al., "ParCNetV2: Oversized Kernel with Enhanced
    Attention", sec. 3.1-3.2): the input is projected into two branches; in one, half of the channels are
    convolved along H and half along W by depthwise kernels of length ``2 H - 1`` / ``2 W - 1`` (twice the
    input, zero padded: every output sees the whole axis and, from the padding, its position); the other
    branch gates it elementwise (``Y = W_o (f_1(X) * f_2(X))``). Kernels are learned for ``size`` and
    linearly resampled to other input sizes (as ParC resizes its kernels)."""

    def __init__(self, dim: int, *, size: int = 14, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("ParCNetV2", causal)
        _check_dim(dim)
        if dim < 2:
            raise ValueError(f"dim must be >= 2 (half the channels run along H, half along W), got {dim}")
        _positive(size=size)
        self.split = dim // 2
        self.inp = nn.Linear(dim, 2 * dim)
        self.kernel_h = nn.Parameter(torch.randn(self.split, 2 * size - 1) / size)
        self.kernel_w = nn.Parameter(torch.randn(dim - self.split, 2 * size - 1) / size)
        self.out = nn.Linear(dim, dim)

    @staticmethod
    def _resample(kernel, length):
        if kernel.shape[-1] == length:
            return kernel
        out = F.interpolate(kernel[None].float(), size=length, mode="linear", align_corners=True)[0]
        return out.to(kernel.dtype)

    def kernels(self, h: int, w: int):
        return self._resample(self.kernel_h, 2 * h - 1), self._resample(self.kernel_w, 2 * w - 1)

    def _run(self, x, conv_h, conv_w):
        self._check(x)
        a, g = self.inp(x).chunk(2, dim=-1)
        h, w = x.shape[1:3]
        kh, kw = self.kernels(h, w)
        y = torch.cat([conv_h(a[..., : self.split], kh), conv_w(a[..., self.split:], kw)], dim=-1)
        return self.out(y * g)

    def forward(self, x):
        def along_h(a, k):  # k [C, 2H - 1]: one conv2d with a (2H - 1) x 1 kernel
            h = a.shape[1]
            y = F.conv2d(a.permute(0, 3, 1, 2), k[:, None, :, None], padding=(h - 1, 0), groups=k.shape[0])
            return y.permute(0, 2, 3, 1)

        def along_w(a, k):
            w = a.shape[2]
            y = F.conv2d(a.permute(0, 3, 1, 2), k[:, None, None, :], padding=(0, w - 1), groups=k.shape[0])
            return y.permute(0, 2, 3, 1)

        return self._run(x, along_h, along_w)

    @staticmethod
    def toeplitz(k: torch.Tensor, n: int) -> torch.Tensor:
        """``[C, n_out, n_in]`` with entry ``k[n_in - n_out + n - 1]`` (the cross-correlation as a matrix)."""
        pos = torch.arange(n, device=k.device)
        idx = pos[None, :] - pos[:, None] + n - 1
        return k[:, idx]

    def reference(self, x):
        h, w = x.shape[1:3]
        return self._run(x, lambda a, k: torch.einsum("cij,bjwc->biwc", self.toeplitz(k, h), a),
                         lambda a, k: torch.einsum("cij,bhjc->bhic", self.toeplitz(k, w), a))


class MetaMixer(_Mixer2d):
    """FFNified attention (Yun et al., "MetaMixer Is All You Need", sec. 3): the query-key-value mixer built
    from the FFN's operations: the query-key interaction is a large-kernel depthwise convolution, softmax
    becomes GELU and the weight-value interaction a second depthwise convolution, between the FFN's
    expanding and contracting projections: ``Y = W_2 DWConv_v(GELU(DWConv_k(W_1 X)))``."""

    def __init__(self, dim: int, *, kernel_size: int = 7, expand: int = 2, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("MetaMixer", causal)
        _check_dim(dim)
        _positive(kernel_size=kernel_size, expand=expand)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        inner = expand * dim
        self.w_1 = nn.Linear(dim, inner)
        self.conv_k = nn.Parameter(torch.randn(inner, 1, kernel_size, kernel_size) / kernel_size)
        self.conv_v = nn.Parameter(torch.randn(inner, 1, kernel_size, kernel_size) / kernel_size)
        self.w_2 = nn.Linear(inner, dim)

    def _run(self, x, conv):
        self._check(x)
        return self.w_2(conv(F.gelu(conv(self.w_1(x), self.conv_k)), self.conv_v))

    def forward(self, x):
        return self._run(x, dwconv2d)

    def reference(self, x):
        return self._run(x, dwconv2d_reference)


# ---- F12, F13: spectral mixers --------------------------------------------------------------------------------

class AdaptiveFrequencyFilter(_Mixer2d):
    """Adaptive frequency filtering (Huang et al., "Adaptive Frequency Filters As Efficient Global Token
    Mixers", eq. 4-6): ``X_f = FFT2(X)``, a complex mask ``M = g(X_f)`` from a grouped 1x1 conv, ReLU and a
    grouped 1x1 conv on the real and imaginary parts, ``Y = iFFT2(M * X_f)``: a dynamic circular convolution
    with a kernel as large as the feature map. ``M = 1`` is the identity (the mask starts near it)."""

    def __init__(self, dim: int, *, groups: int = 4, hidden_ratio: int = 1, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("AFF", causal)
        _check_dim(dim, groups=groups)
        _positive(hidden_ratio=hidden_ratio)
        cg = dim // groups
        self.groups = groups
        self.w1 = nn.Parameter(torch.randn(groups, 2 * cg, hidden_ratio * 2 * cg) * (2 * cg) ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(groups, hidden_ratio * 2 * cg))
        self.w2 = nn.Parameter(torch.randn(groups, hidden_ratio * 2 * cg, 2 * cg) * 0.1 / cg)
        self.b2 = nn.Parameter(torch.cat([torch.ones(groups, cg), torch.zeros(groups, cg)], dim=-1))

    def mask(self, xf: torch.Tensor) -> torch.Tensor:
        """Complex mask ``[batch, H, W // 2 + 1, dim]`` from the spectrum ``xf`` (same shape)."""
        b, h, wf, c = xf.shape
        g = self.groups
        re, im = xf.real.reshape(b, h, wf, g, -1), xf.imag.reshape(b, h, wf, g, -1)
        feats = torch.cat([re, im], dim=-1)
        w1, b1, w2, b2 = (t.to(feats.dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        hidden = F.relu(torch.einsum("bhwgi,gio->bhwgo", feats, w1) + b1)
        m = torch.einsum("bhwgi,gio->bhwgo", hidden, w2) + b2
        mr, mi = m.chunk(2, dim=-1)
        return torch.complex(mr, mi).reshape(b, h, wf, c)

    def forward(self, x):
        self._check(x)
        h, w = x.shape[1:3]
        g = self.groups
        cg = self.dim // g
        out = torch.empty(x.shape, dtype=compute_dtype(x.dtype), device=x.device)
        for i in range(g):  # groups do not interact: one group's spectra at a time stay in cache
            xf = rfft2_channels_first(x[..., i * cg: (i + 1) * cg])  # [b, cg, H, Wf]
            b, _, _, wf = xf.shape
            # the group's mask network as two 1x1 convolutions over [Re, Im] (channels first)
            feats = torch.cat([xf.real, xf.imag], 1)
            hidden = F.relu(F.conv2d(feats, self.w1[i].t()[..., None, None].to(feats.dtype),
                                     self.b1[i].to(feats.dtype)))
            m = F.conv2d(hidden, self.w2[i].t()[..., None, None].to(feats.dtype), self.b2[i].to(feats.dtype))
            y = torch.fft.irfft2(torch.complex(m[:, :cg], m[:, cg:]) * xf, s=(h, w), norm="ortho")
            out[..., i * cg: (i + 1) * cg] = y.permute(0, 2, 3, 1)
        return out.to(x.dtype)

    def reference(self, x):
        self._check(x)
        h, w = x.shape[1:3]
        xf = rfft2_reference(x)
        return irfft2_reference(self.mask(xf) * xf, h, w).to(x.dtype)


class SpectralGating(_Mixer2d):
    """Spectral gating (Patro et al., "SpectFormer", eq. 1-3, after GFNet): ``Y = iFFT2(W * FFT2(X))`` with a
    learned complex filter ``W [size, size // 2 + 1, dim]``, bilinearly resampled for other input sizes.
    SpectFormer uses it in its first blocks and multi-head attention after; this is the spectral block."""

    def __init__(self, dim: int, *, size: int = 14, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("SpectFormer's spectral gating", causal)
        _check_dim(dim)
        _positive(size=size)
        self.weight = nn.Parameter(torch.randn(size, size // 2 + 1, dim, 2) * 0.02)

    def filter_channels_first(self, h: int, w: int) -> torch.Tensor:
        """Complex filter ``[dim, h, w // 2 + 1]``."""
        wt = self.weight.permute(2, 3, 0, 1)  # [dim, 2, size, size // 2 + 1]
        if wt.shape[2:] != (h, w // 2 + 1):
            flat = F.interpolate(wt.reshape(1, -1, *wt.shape[2:]).float(), size=(h, w // 2 + 1), mode="bilinear",
                                 align_corners=True)
            wt = flat.view(self.dim, 2, h, w // 2 + 1)
        wt = wt.to(compute_dtype(self.weight.dtype))
        return torch.complex(wt[:, 0], wt[:, 1])

    def filter(self, h: int, w: int) -> torch.Tensor:
        """Complex filter ``[h, w // 2 + 1, dim]``."""
        return self.filter_channels_first(h, w).permute(1, 2, 0)

    def forward(self, x):
        self._check(x)
        return spectral_filter_channels_first(x, self.filter_channels_first(*x.shape[1:3]))

    def reference(self, x):
        self._check(x)
        h, w = x.shape[1:3]
        return irfft2_reference(self.filter(h, w) * rfft2_reference(x), h, w).to(x.dtype)
