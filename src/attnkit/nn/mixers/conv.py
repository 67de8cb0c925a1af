"""1-D convolutional mixers: lightweight, dynamic and span-based dynamic convolutions (F6, F7) and continuous
kernels (CKConv, SMPConv: F16, F17).

Part of :mod:`attnkit.nn.mixers` (issue 12); the math is in :mod:`attnkit.ops.mixers`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.nn.mixers._base import _check_dim, _Mixer, _positive, _refuse_causal
from attnkit.ops.mixers import dynconv
from attnkit.ops.mixers._common import (
    compute_dtype,
    conv_direct,
    conv_fft,
    conv_reference,
    long_conv,
)

__all__ = ["LightConv", "DynamicConv", "ConvBERTMixer", "CKConv", "SMPConv"]


# ---- F6, F7: lightweight, dynamic and span-based dynamic convolutions --------------------------------------

class _ConvGLU(_Mixer):
    def __init__(self, dim, num_heads, kernel_size, causal):
        super().__init__(dim, causal)
        _check_dim(dim, num_heads=num_heads)
        _positive(kernel_size=kernel_size)
        self.num_heads, self.kernel_size = num_heads, kernel_size
        self.inp = nn.Linear(dim, 2 * dim)  # the paper's input projection and GLU
        self.out = nn.Linear(dim, dim)

    def _glu(self, x):
        self._check(x)
        return F.glu(self.inp(x), dim=-1)

    def _push(self, x_t: torch.Tensor, window: torch.Tensor | None):
        """One causal decoding step's input: the GLU output ``g [batch, dim]`` of ``x_t [batch, dim]`` and the
        window of the last ``kernel_size`` GLU outputs ``[batch, kernel_size, dim]`` (zeros before the first
        token), ``g`` last. Returns ``(g, window)``."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        g = F.glu(self.inp(x_t), dim=-1)
        if window is None:
            window = g.new_zeros(g.shape[0], self.kernel_size, self.dim)
        return g, torch.cat([window[:, 1:], g[:, None]], dim=1)


class LightConv(_ConvGLU):
    """LightConv (Wu et al., "Pay Less Attention with Lightweight and Dynamic Convolutions", eq. 2-3): GLU
    input projection, a depthwise convolution whose kernel ``[heads, kernel_size]`` is softmax-normalised over
    its width and shared by the ``dim / heads`` channels of each head (left-aligned when causal), output
    projection. DropConnect on the kernel is training regularisation and is left out."""

    def __init__(self, dim: int, *, num_heads: int = 4, kernel_size: int = 7, causal: bool = False):
        super().__init__(dim, num_heads, kernel_size, causal)
        self.weight = nn.Parameter(torch.randn(num_heads, kernel_size))

    def kernel(self) -> torch.Tensor:
        """Normalised kernel ``[heads, kernel_size]`` (each row sums to 1)."""
        return torch.softmax(self.weight, dim=-1)

    def forward(self, x):
        return self.out(dynconv.lightconv(self._glu(x), self.weight, causal=self.causal))

    def reference(self, x):
        return self.out(dynconv.lightconv_reference(self._glu(x), self.weight, causal=self.causal))

    def step(self, x_t: torch.Tensor, window: torch.Tensor | None = None):
        """Causal decoding: ``x_t [batch, dim]``; ``window [batch, kernel_size, dim]`` (the last GLU outputs).
        Returns ``(y_t, window)``."""
        g, window = self._push(x_t, window)
        w = self.kernel().to(g.dtype).expand(g.shape[0], -1, -1)
        return self.out(dynconv.dynamic_conv_step(window, w)), window


class DynamicConv(_ConvGLU):
    """DynamicConv (Wu et al., eq. 4): LightConv with the kernel predicted from the current token,
    ``W_i = softmax(X_i W^Q)`` ``[heads, kernel_size]``; causal decoding keeps the last ``kernel_size``
    inputs (:meth:`step`)."""

    def __init__(self, dim: int, *, num_heads: int = 4, kernel_size: int = 7, causal: bool = False):
        super().__init__(dim, num_heads, kernel_size, causal)
        self.w_kernel = nn.Linear(dim, num_heads * kernel_size)

    def kernels(self, g):
        """Per-token kernels ``[batch, seq, heads, kernel_size]`` from the GLU output."""
        w = self.w_kernel(g).unflatten(-1, (self.num_heads, self.kernel_size))
        return torch.softmax(w.to(compute_dtype(w.dtype)), dim=-1).to(g.dtype)

    def forward(self, x):
        g = self._glu(x)
        return self.out(dynconv.dynamic_conv(g, self.kernels(g), causal=self.causal))

    def reference(self, x):
        g = self._glu(x)
        return self.out(dynconv.dynamic_conv_reference(g, self.kernels(g), causal=self.causal))

    def step(self, x_t: torch.Tensor, window: torch.Tensor | None = None):
        """Causal decoding: ``x_t [batch, dim]``; ``window [batch, kernel_size, dim]`` (the last GLU outputs).
        Returns ``(y_t, window)``."""
        g, window = self._push(x_t, window)
        y = dynconv.dynamic_conv_step(window, self.kernels(g))
        return self.out(y), window


class ConvBERTMixer(_Mixer):
    """ConvBERT's mixed attention (Jiang et al., "ConvBERT: Improving BERT with Span-based Dynamic
    Convolution", eq. 3-5): ``num_heads - conv_heads`` softmax attention heads beside ``conv_heads``
    span-based dynamic convolution heads, whose kernels ``softmax(W_f (Q_i * K_s_i))`` come from a span-aware
    key ``K_s`` (a depthwise-separable convolution of the input) and weight a lightweight convolution of the
    values. With ``conv_heads=0`` it is standard multi-head attention."""

    def __init__(self, dim: int, *, num_heads: int = 4, conv_heads: int = 2, kernel_size: int = 9,
                 causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("ConvBERT", causal)
        _check_dim(dim, num_heads=num_heads)
        if not 0 <= conv_heads <= num_heads:
            raise ValueError(f"conv_heads must be in [0, num_heads={num_heads}], got {conv_heads}")
        _positive(kernel_size=kernel_size)
        self.num_heads, self.conv_heads, self.kernel_size = num_heads, conv_heads, kernel_size
        self.head_dim = dim // num_heads
        self.attn_dim = (num_heads - conv_heads) * self.head_dim
        self.conv_dim = conv_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim + 2 * self.conv_dim)
        if conv_heads:
            self.span_depthwise = nn.Parameter(torch.randn(kernel_size, dim) * kernel_size ** -0.5)
            self.span_pointwise = nn.Linear(dim, self.conv_dim)
            self.w_f = nn.Linear(self.conv_dim, conv_heads * kernel_size)
        self.out = nn.Linear(dim, dim)

    def _parts(self, x, depthwise):
        self._check(x)
        b, n, _ = x.shape
        a, c = self.attn_dim, self.conv_dim
        q, k, v, qc, vc = self.qkv(x).split([a, a, a, c, c], dim=-1)
        heads = [t.view(b, n, -1, self.head_dim).transpose(1, 2) for t in (q, k, v)]
        kernels = None
        if self.conv_heads:
            ks = self.span_pointwise(depthwise(x, self.span_depthwise, self.kernel_size // 2))
            w = self.w_f(qc * ks).unflatten(-1, (self.conv_heads, self.kernel_size))
            kernels = torch.softmax(w.to(compute_dtype(w.dtype)), dim=-1).to(x.dtype)
        return heads, vc, kernels

    def _combine(self, attn, conv, b, n):
        attn = attn.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.out(torch.cat([attn, conv], dim=-1) if conv is not None else attn)

    def forward(self, x):
        (q, k, v), vc, kernels = self._parts(x, conv_direct)
        attn = F.scaled_dot_product_attention(q, k, v) if self.attn_dim else q
        conv = dynconv.dynamic_conv(vc, kernels) if self.conv_heads else None
        return self._combine(attn, conv, *x.shape[:2])

    def reference(self, x):
        (q, k, v), vc, kernels = self._parts(x, conv_reference)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        conv = dynconv.dynamic_conv_reference(vc, kernels) if self.conv_heads else None
        return self._combine(a @ v, conv, *x.shape[:2])


# ---- F16, F17: continuous kernels ----------------------------------------------------------------------------

class CKConv(_Mixer):
    """Continuous kernel convolution (Romero et al., "CKConv: Continuous Kernel Convolution For Sequential
    Data", eq. 3-5): a depthwise kernel ``psi(tau) = SIREN(tau)`` (sine MLP, ``omega_0``) evaluated at every
    relative position ``tau = lag / ref_len`` of the input, so the kernel is as long as the input; causal
    ``y_t = sum_{tau <= t} x_tau psi(t - tau)`` (or both sides), by FFT; a pointwise linear layer mixes the
    channels (the paper's full ``C x C`` kernel costs O(n log n C^2); depthwise + pointwise is its cheaper
    variant)."""

    def __init__(self, dim: int, *, hidden: int = 32, omega_0: float = 30.0, ref_len: int = 1024,
                 causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim)
        _positive(hidden=hidden, ref_len=ref_len)
        self.omega_0, self.ref_len = float(omega_0), ref_len
        self.l1, self.l2, self.l3 = nn.Linear(1, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, dim)
        with torch.no_grad():  # SIREN initialisation (Sitzmann et al. 2020)
            self.l1.weight.uniform_(-1.0, 1.0)
            bound = math.sqrt(6 / hidden) / self.omega_0
            self.l2.weight.uniform_(-bound, bound)
            self.l3.weight.uniform_(-bound, bound)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.pointwise = nn.Linear(dim, dim)

    def kernel_at(self, lags: torch.Tensor) -> torch.Tensor:
        """``psi`` at integer (or fractional) ``lags``: ``[len(lags), dim]``."""
        tau = (lags / self.ref_len).to(self.l1.weight.dtype)[:, None]
        h = torch.sin(self.omega_0 * self.l1(tau))
        h = torch.sin(self.omega_0 * self.l2(h))
        return self.l3(h)

    def kernel(self, n: int) -> tuple[torch.Tensor, int]:
        """Kernel taps for a length-``n`` input and its ``left`` (look-ahead) count."""
        dev = self.l1.weight.device
        if self.causal:
            return self.kernel_at(torch.arange(n, device=dev, dtype=torch.float64)), 0
        return self.kernel_at(torch.arange(-(n - 1), n, device=dev, dtype=torch.float64)), n - 1

    def _run(self, x, conv):
        self._check(x)
        k, left = self.kernel(x.shape[1])
        return self.pointwise(conv(x, k, left) + self.bias)

    def forward(self, x):
        return self._run(x, conv_fft)

    def reference(self, x):
        return self._run(x, conv_reference)


class SMPConv(_Mixer):
    """Self-moving point convolution (Kim & Park, "SMPConv: Self-moving Point Representations for Continuous
    Convolution", eq. 4-5), 1-D depthwise: the kernel at coordinate ``x`` is
    ``sum_i w_i max(0, 1 - |x - p_i| / r_i)`` over ``num_points`` learnable points per channel with learnable
    positions ``p_i`` and radii ``r_i``, sampled on ``kernel_size`` taps over [-1, 1] (causal: [-1, 0], lags
    ``kernel_size - 1 .. 0``); convolved directly or by FFT for long kernels; a pointwise layer mixes channels."""

    def __init__(self, dim: int, *, kernel_size: int = 31, num_points: int = 8, causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim)
        _positive(kernel_size=kernel_size, num_points=num_points)
        if kernel_size % 2 == 0 and not causal:
            raise ValueError(f"kernel_size must be odd for the centred (non-causal) kernel, got {kernel_size}")
        self.kernel_size = kernel_size
        spacing = 2.0 / max(kernel_size - 1, 1)
        lo = -1.0
        hi = 0.0 if causal else 1.0
        self.points = nn.Parameter(torch.rand(dim, num_points) * (hi - lo) + lo)
        self.radii = nn.Parameter(torch.full((dim, num_points), 2.0 * spacing))
        self.weights = nn.Parameter(torch.randn(dim, num_points) / num_points)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.pointwise = nn.Linear(dim, dim)

    def coordinates(self) -> torch.Tensor:
        hi = 0.0 if self.causal else 1.0
        return torch.linspace(-1.0, hi, self.kernel_size, device=self.points.device, dtype=self.points.dtype)

    def kernel(self) -> torch.Tensor:
        """``[kernel_size, dim]``; tap ``j`` is at coordinate ``coordinates()[j]``."""
        x = self.coordinates()[:, None, None]
        r = self.radii.abs().clamp_min(1e-4)
        return (self.weights * F.relu(1 - (x - self.points).abs() / r)).sum(-1)

    def kernel_reference(self) -> torch.Tensor:
        x = self.coordinates()
        k = torch.zeros(self.kernel_size, self.dim, dtype=self.points.dtype, device=x.device)
        for i in range(self.points.shape[1]):
            r = self.radii[:, i].abs().clamp_min(1e-4)
            k = k + self.weights[:, i] * torch.clamp(1 - (x[:, None] - self.points[:, i]).abs() / r, min=0)
        return k

    def _run(self, x, kernel, conv):
        self._check(x)
        # coordinate -1 is the oldest tap: as lags, the kernel is read backwards (lag 0 = last coordinate when
        # causal, the centre otherwise)
        k = kernel.flip(0)
        left = 0 if self.causal else self.kernel_size // 2
        return self.pointwise(conv(x, k, left) + self.bias)

    def forward(self, x):
        return self._run(x, self.kernel(), long_conv)

    def reference(self, x):
        return self._run(x, self.kernel_reference(), conv_reference)
