"""attnkit.nn modules of the mixers family: attention-free and convolutional token mixers (issue 12).

Every module maps ``x [batch, seq, dim]`` (1-D) or ``x [batch, height, width, dim]`` (2-D papers) to the same
shape, exposes ``forward`` (the fast path) and ``reference`` (the plain computation with the same weights), and
the recurrent ones a causal ``step``. The math lives in :mod:`attnkit.ops.mixers`; each class names its paper
and the equations it implements.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.mixers import aft, channel, dynconv, hrr, scan
from attnkit.ops.mixers._common import (
    check_x,
    compute_dtype,
    conv_direct,
    conv_fft,
    conv_reference,
    dwconv2d,
    dwconv2d_reference,
    irfft2_reference,
    long_conv,
    rfft2_channels_first,
    rfft2_reference,
    shifted_products,
    spectral_filter_channels_first,
)

__all__ = [
    "AFTFull", "AFTSimple", "AFTLocal", "AFTConv", "Mega", "XCA", "ChannelGroupAttention", "LambdaLayer",
    "LightConv", "DynamicConv", "ConvBERTMixer", "SwiftFormerMixer", "LargeKernelAttention", "LKCA",
    "ParCNetV2Mixer", "AdaptiveFrequencyFilter", "SpectralGating", "PoNetMixer", "HrrformerMixer", "CKConv",
    "SMPConv", "MambaND", "MetaMixer", "Extractor",
]


def _check_dim(dim: int, **divisors: int) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    for name, value in divisors.items():
        if not isinstance(value, int) or value < 1 or dim % value:
            raise ValueError(f"{name}={value!r} must be a positive int dividing dim={dim}")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _refuse_causal(name: str, causal: bool) -> None:
    if causal:
        from attnkit.errors import NotSupportedError

        raise NotSupportedError(f"{name} has no causal form (causal=True was given): its paper mixes the whole "
                                f"input; choose a causal mixer (see `attnkit list`)")


class _Mixer(nn.Module):
    """Common plumbing: ``dim``, ``causal``, the number of spatial axes and the input check."""

    spatial: int | None = 1

    def __init__(self, dim: int, causal: bool = False):
        super().__init__()
        self.dim = dim
        self.causal = bool(causal)

    def _check(self, x: torch.Tensor) -> None:
        check_x(x, self.dim, spatial=self.spatial)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, causal={self.causal}"


# ---- F1: AFT ----------------------------------------------------------------------------------------------

class _AFTBase(_Mixer):
    def __init__(self, dim: int, causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def _qkv(self, x):
        self._check(x)
        return self.qkv(x).chunk(3, dim=-1)

    def _max_len(self, n: int, max_len: int) -> None:
        if n > max_len:
            raise ValueError(f"sequence of {n} tokens is longer than max_len={max_len} (the learned position "
                             f"biases); build the mixer with max_len >= {n}")


class AFTFull(_AFTBase):
    """AFT-full (Zhai et al., "An Attention Free Transformer", eq. 2) with the pairwise position biases
    factorised ``w = U V^T`` (``U, V [max_len, rank]``; the paper's factorisation, sec. 3.2).
    O(seq^2 dim) time by row blocks, O(seq dim) memory."""

    def __init__(self, dim: int, *, max_len: int = 1024, rank: int = 32, causal: bool = False, block: int = 1024):
        super().__init__(dim, causal)
        _positive(max_len=max_len, rank=rank, block=block)
        self.max_len, self.block = max_len, block
        std = 0.5 * rank ** -0.25  # w = U V^T has standard deviation ~0.25
        self.u = nn.Parameter(torch.randn(max_len, rank) * std)
        self.v = nn.Parameter(torch.randn(max_len, rank) * std)

    def bias(self, n: int) -> torch.Tensor:
        self._max_len(n, self.max_len)
        return self.u[:n] @ self.v[:n].t()

    def forward(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_full(q, k, v, self.bias(x.shape[1]), causal=self.causal, block=self.block))

    def reference(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_reference(q, k, v, self.bias(x.shape[1]), causal=self.causal))


class AFTSimple(_AFTBase):
    """AFT-simple (eq. 3): ``sigmoid(Q_t) * sum_t' softmax_t'(K) V_t'``; causal by running sums, with an O(dim)
    decoding state (:meth:`step`)."""

    def forward(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_simple(q, k, v, causal=self.causal))

    def reference(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_reference(q, k, v, causal=self.causal))

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding: ``x_t [batch, dim]`` -> ``(y_t [batch, dim], state)``; ``state`` (None at the start)
        holds three ``[batch, dim]`` tensors."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        q, k, v = self.qkv(x_t).chunk(3, dim=-1)
        y, state = aft.aft_simple_step(q, k, v, state)
        return self.out(y), state


class AFTLocal(_AFTBase):
    """AFT-local (eq. 4): biases ``w_{t,t'}`` learned for ``|t - t'| < window`` and 0 (not -inf) outside, so
    the output is AFT-simple's global sums plus a windowed correction. O(seq window dim)."""

    def __init__(self, dim: int, *, max_len: int = 1024, window: int = 32, causal: bool = False):
        super().__init__(dim, causal)
        _positive(max_len=max_len, window=window)
        self.max_len, self.window = max_len, window
        self.w = nn.Parameter(torch.randn(max_len, 2 * window - 1) * 0.1)

    def _corr(self, n):
        self._max_len(n, self.max_len)
        return torch.expm1(self.w[:n])

    def forward(self, x):
        q, k, v = self._qkv(x)
        corr = self._corr(x.shape[1])
        return self.out(aft.aft_windowed(q, k, v, corr, causal=self.causal, per_position=True))

    def reference(self, x):
        q, k, v = self._qkv(x)
        wmat = aft.window_bias_matrix(self._corr(x.shape[1]), x.shape[1], per_position=True)
        return self.out(aft.aft_reference(q, k, v, wmat, causal=self.causal))

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding: ``x_t [batch, dim]`` -> ``(y_t, state)``; the state holds the running sums, the last
        ``window - 1`` keys and values, and the position (AFT-local's biases depend on it)."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        t, inner = (0, None) if state is None else state
        self._max_len(t + 1, self.max_len)
        corr = torch.expm1(self.w[t, : self.window]).flip(0)[:, None]  # offsets 0, -1, ..., -(window - 1)
        q, k, v = self.qkv(x_t).chunk(3, dim=-1)
        y, inner = aft.aft_windowed_step(q, k, v, corr, inner)
        return self.out(y), (t + 1, inner)


class AFTConv(_AFTBase):
    """AFT-conv (eq. 5): relative biases ``w [heads, 2 window - 1]`` shared by each head's channels: the
    global sums plus a depthwise convolution of ``exp(K) V`` and ``exp(K)`` by ``exp(w) - 1``."""

    def __init__(self, dim: int, *, num_heads: int = 4, window: int = 16, causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim, num_heads=num_heads)
        _positive(window=window)
        self.num_heads, self.window = num_heads, window
        self.w = nn.Parameter(torch.randn(num_heads, 2 * window - 1) * 0.1)

    def _corr(self):
        return torch.expm1(self.w).t().repeat_interleave(self.dim // self.num_heads, dim=1)  # [2s - 1, dim]

    def forward(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_windowed(q, k, v, self._corr(), causal=self.causal))

    def reference(self, x):
        q, k, v = self._qkv(x)
        wmat = aft.window_bias_matrix(self._corr(), x.shape[1], per_position=False)
        return self.out(aft.aft_reference(q, k, v, wmat, causal=self.causal))

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding: ``x_t [batch, dim]`` -> ``(y_t, state)``; the state holds the running sums and the
        last ``window - 1`` keys and values (:func:`~attnkit.ops.mixers.aft.aft_windowed_step`)."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        q, k, v = self.qkv(x_t).chunk(3, dim=-1)
        corr = self._corr()[: self.window].flip(0)  # offsets 0, -1, ..., -(window - 1)
        y, state = aft.aft_windowed_step(q, k, v, corr, state)
        return self.out(y), state


# ---- F2: Mega ---------------------------------------------------------------------------------------------

class Mega(_Mixer):
    """Mega (Ma et al., "Mega: Moving Average Equipped Gated Attention", eq. 2-3 EMA, eq. 6-12 gated
    attention): multi-dimensional damped EMA ``X' = SiLU(EMA(X) + omega X)``, single-head attention of
    ``Q = kappa_q Z + mu_q``, ``K = kappa_k Z + mu_k`` (``Z = SiLU(X' W_z)``) over ``V = SiLU(X W_v)`` within
    chunks of ``chunk_size`` tokens (Mega-chunk; None: the whole sequence), reset gate ``r``, output
    ``H = SiLU(X' W_h + (r * A V) W_o)`` and update gate ``Y = u H + (1 - u) X``. The EMA runs by chunks
    (:func:`~attnkit.ops.mixers.scan.ema_chunked`; reference: the recurrence; :func:`~attnkit.ops.mixers.scan.
    ema_fft` is its FFT form). Not included: the relative-position bias ``b_rel`` and the
    bidirectional EMA of the paper's encoders (the EMA here is always causal)."""

    def __init__(self, dim: int, *, ema_dim: int = 16, z_dim: int | None = None, chunk_size: int | None = 128,
                 causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim)
        z_dim = z_dim or max(dim // 4, 1)
        _positive(ema_dim=ema_dim, z_dim=z_dim)
        if chunk_size is not None:
            _positive(chunk_size=chunk_size)
        self.chunk_size, self.z_dim = chunk_size, z_dim
        self.alpha = nn.Parameter(torch.randn(dim, ema_dim) * 0.2)  # sigmoid(.) around 0.5
        self.delta = nn.Parameter(torch.randn(dim, ema_dim) * 0.2)
        self.beta = nn.Parameter(torch.randn(dim, ema_dim) * 0.02 + (-1.0) ** torch.arange(ema_dim))
        self.eta = nn.Parameter(torch.randn(dim, ema_dim) * ema_dim ** -0.5)
        self.omega = nn.Parameter(torch.randn(dim) * 0.1)
        self.w_z = nn.Linear(dim, z_dim)
        self.kappa = nn.Parameter(torch.randn(2, z_dim) * 0.1 + 1.0)
        self.mu = nn.Parameter(torch.zeros(2, z_dim))
        self.w_v = nn.Linear(dim, dim)
        self.w_r = nn.Linear(dim, dim)
        self.w_h = nn.Linear(dim, dim)
        self.w_o = nn.Linear(dim, dim, bias=False)
        self.w_u = nn.Linear(dim, dim)

    def ema_coefficients(self):
        return scan.ema_coefficients(torch.sigmoid(self.alpha), torch.sigmoid(self.delta), self.beta, self.eta)

    def _gated(self, x, ema_out, attend):
        xp = F.silu(ema_out + self.omega * x)
        z = F.silu(self.w_z(xp))
        q = z * self.kappa[0] + self.mu[0]
        k = z * self.kappa[1] + self.mu[1]
        v = F.silu(self.w_v(x))
        r = F.silu(self.w_r(xp))
        h = F.silu(self.w_h(xp) + self.w_o(r * attend(q, k, v)))
        u = torch.sigmoid(self.w_u(xp))
        return u * h + (1 - u) * x

    def _chunk(self, n: int) -> int:
        return n if self.chunk_size is None else min(self.chunk_size, n)

    def forward(self, x):
        self._check(x)
        p, q, g = self.ema_coefficients()
        ema_out = scan.ema_chunked(x, p, q, g)
        return self._gated(x, ema_out, self._chunked_attention)

    def reference(self, x):
        self._check(x)
        p, q, g = self.ema_coefficients()
        ema_out, _ = scan.ema_reference(x, p, q, g)
        return self._gated(x, ema_out, self._dense_attention)

    def _chunked_attention(self, q, k, v):
        b, n, _ = q.shape
        c = self._chunk(n)
        nc = -(-n // c)
        pad = nc * c - n
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        q, k, v = (t.view(b, nc, c, -1) for t in (q, k, v))
        mask = None
        if pad:
            valid = torch.arange(nc * c, device=q.device).view(nc, 1, c) < n  # keys that exist
            mask = valid.expand(nc, c, c)
            if self.causal:
                mask = mask & torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                             scale=self.z_dim ** -0.5)
        return out.reshape(b, nc * c, -1)[:, :n]

    def _dense_attention(self, q, k, v):
        n = q.shape[1]
        c = self._chunk(n)
        idx = torch.arange(n, device=q.device)
        allowed = (idx[:, None] // c) == (idx[None, :] // c)
        if self.causal:
            allowed = allowed & (idx[None, :] <= idx[:, None])
        logits = (q @ k.transpose(-1, -2)) * self.z_dim ** -0.5
        a = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return a @ v

    def ema_step(self, x_t: torch.Tensor, h: torch.Tensor | None = None):
        """One decoding step of the EMA (the recurrent part; the chunk attention keeps its chunk's keys):
        ``x_t [batch, dim]``, ``h [batch, dim, ema_dim]`` -> ``(EMA output [batch, dim], h)``."""
        p, q, g = self.ema_coefficients()
        if h is None:
            h = torch.zeros(*x_t.shape, p.shape[1], dtype=x_t.dtype, device=x_t.device)
        return scan.ema_step(x_t, p, q, g, h)


# ---- F3, F4: channel attention ------------------------------------------------------------------------------

class _ChannelMixer(_Mixer):
    def __init__(self, dim: int, num_heads: int, causal: bool, name: str):
        super().__init__(dim, False)
        _refuse_causal(name, causal)
        _check_dim(dim, num_heads=num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x):
        self._check(x)
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.dim // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [b, h, n, d]

    def _merge(self, out):
        b, h, n, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, h * d))


class XCA(_ChannelMixer):
    """Cross-covariance attention (El-Nouby et al., "XCiT", eq. 5): a ``d_h x d_h`` softmax map per head of
    L2-normalised (over tokens) queries and keys, with a learned temperature per head. The paper's local patch
    interaction and class attention are separate blocks, not part of this mixer."""

    def __init__(self, dim: int, *, num_heads: int = 4, causal: bool = False):
        super().__init__(dim, num_heads, causal, "XCA")
        self.temperature = nn.Parameter(torch.ones(num_heads))

    def forward(self, x):
        q, k, v = self._heads(x)
        return self._merge(channel.xca(q, k, v, self.temperature))

    def attention_map(self, x):
        """The ``[batch, heads, d_h, d_h]`` map (its size does not depend on the sequence length)."""
        q, k, v = self._heads(x)
        return channel.xca(q, k, v, self.temperature, return_map=True)[1]

    def reference(self, x):
        q, k, v = self._heads(x)
        return self._merge(channel.xca_reference(q, k, v, self.temperature))


class ChannelGroupAttention(_ChannelMixer):
    """DaViT's channel group attention (Ding et al., "DaViT: Dual Attention Vision Transformers", eq. 3):
    ``A_g = softmax(Q_g^T K_g / sqrt(C_g))`` per channel group, ``out_g = V_g A_g^T``. The spatial window
    attention that DaViT alternates with it is the neighborhood family's ``block_local``."""

    def __init__(self, dim: int, *, groups: int = 4, causal: bool = False):
        super().__init__(dim, groups, causal, "channel group attention")

    def forward(self, x):
        return self._merge(channel.channel_group_attention(*self._heads(x)))

    def reference(self, x):
        return self._merge(channel.channel_group_attention_reference(*self._heads(x)))


# ---- F5: lambda layer -------------------------------------------------------------------------------------

class LambdaLayer(_Mixer):
    """Lambda layer over a 1-D sequence (Bello, "LambdaNetworks", eq. 2-3 and the lambda convolution of
    sec. 3.2): content lambda ``softmax_n(K)^T V`` (``[key_dim, v]``, the same for every query), position
    lambdas ``E_n^T V`` from relative embeddings ``E [receptive_field, key_dim]`` inside a local window, output
    ``y_n = (lambda_c + lambda_p_n)^T q_n`` per head (multi-query: heads share keys and values,
    ``v = dim / heads``). The paper's batch norms on queries and values are left to the block."""

    def __init__(self, dim: int, *, num_heads: int = 4, key_dim: int = 16, receptive_field: int = 23,
                 causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("the lambda layer", causal)
        _check_dim(dim, num_heads=num_heads)
        _positive(key_dim=key_dim, receptive_field=receptive_field)
        if receptive_field % 2 == 0:
            raise ValueError(f"receptive_field must be odd (a centred window), got {receptive_field}")
        self.num_heads, self.key_dim, self.r = num_heads, key_dim, receptive_field
        self.vdim = dim // num_heads
        self.w_q = nn.Linear(dim, num_heads * key_dim, bias=False)
        self.w_k = nn.Linear(dim, key_dim, bias=False)
        self.w_v = nn.Linear(dim, self.vdim, bias=False)
        self.embedding = nn.Parameter(torch.randn(receptive_field, key_dim) * key_dim ** -0.5)

    def _qkv(self, x):
        self._check(x)
        b, n, _ = x.shape
        q = self.w_q(x).view(b, n, self.num_heads, self.key_dim)
        return q, torch.softmax(self.w_k(x), dim=1), self.w_v(x)

    def forward(self, x):
        q, k, v = self._qkv(x)
        b, n = x.shape[:2]
        content = torch.einsum("bnhk,bkv->bnhv", q, k.transpose(1, 2) @ v)
        a = q @ self.embedding.t()  # [b, n, h, r]: sum_k q_nk E_jk, the lambda conv folded into the queries
        m = self.r // 2
        # content + sum_j a[n, h, j] v[n + j - m]: context position n + j - m, zero outside the sequence
        shifted_products(content, a[:, :, :, None, :], v[:, :, None, :], [j - m for j in range(self.r)])
        return content.reshape(b, n, self.dim)

    def position_lambdas(self, x):
        """The position lambdas ``E_n^T V`` materialised: ``[batch, seq, key_dim, v]`` (O(seq^2) reference)."""
        _, _, v = self._qkv(x)
        n = x.shape[1]
        pos = torch.arange(n, device=v.device)
        rel = pos[None, :] - pos[:, None] + self.r // 2  # [n, m] index into E
        inside = (rel >= 0) & (rel < self.r)
        table = self.embedding[rel.clamp(0, self.r - 1)] * inside[..., None].to(v.dtype)  # E_n: [n, m, k]
        return torch.einsum("nmk,bmv->bnkv", table, v)

    def reference(self, x):
        q, k, v = self._qkv(x)
        b, n = x.shape[:2]
        lam = (k.transpose(1, 2) @ v)[:, None] + self.position_lambdas(x)  # [b, n, k, v]
        return torch.einsum("bnhk,bnkv->bnhv", q, lam).reshape(b, n, self.dim)


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
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        g = F.glu(self.inp(x_t), dim=-1)
        if window is None:
            window = g.new_zeros(g.shape[0], self.kernel_size, self.dim)
        window = torch.cat([window[:, 1:], g[:, None]], dim=1)
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
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        g = F.glu(self.inp(x_t), dim=-1)
        if window is None:
            window = g.new_zeros(g.shape[0], self.kernel_size, self.dim)
        window = torch.cat([window[:, 1:], g[:, None]], dim=1)
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


# ---- F8: SwiftFormer ----------------------------------------------------------------------------------------

class SwiftFormerMixer(_Mixer):
    """Efficient additive attention (Shaker et al., "SwiftFormer", eq. 4-6): L2-normalised ``Q, K``, token
    scores ``alpha = Q w_a / sqrt(d)`` normalised over tokens (a softmax; the authors' code L2-normalises
    instead), a global query ``q_g = sum_i alpha_i Q_i``, and ``out = W_o (T(q_g * K) + Q)``. O(seq dim)."""

    def __init__(self, dim: int, *, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("SwiftFormer", causal)
        _check_dim(dim)
        self.w_q = nn.Linear(dim, dim)
        self.w_k = nn.Linear(dim, dim)
        self.w_a = nn.Parameter(torch.randn(dim))
        self.t = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _qk(self, x):
        self._check(x)
        return F.normalize(self.w_q(x), dim=-1), F.normalize(self.w_k(x), dim=-1)

    def pooling_weights(self, x):
        """``[batch, seq]`` weights of the global query (they sum to 1 over the tokens)."""
        q, _ = self._qk(x)
        return torch.softmax(q @ self.w_a / math.sqrt(self.dim), dim=1)

    def forward(self, x):
        q, k = self._qk(x)
        alpha = torch.softmax(q @ self.w_a / math.sqrt(self.dim), dim=1)
        q_g = torch.einsum("bn,bnc->bc", alpha, q)
        return self.out(self.t(q_g[:, None] * k) + q)

    def reference(self, x):
        q, k = self._qk(x)
        s = (q * self.w_a).sum(-1) / math.sqrt(self.dim)
        e = torch.exp(s - s.amax(1, keepdim=True))
        q_g = ((e / e.sum(1, keepdim=True))[..., None] * q).sum(1, keepdim=True)
        return self.out(self.t(q_g * k) + q)


# ---- F9, F10, F11, F19: 2-D convolutional mixers --------------------------------------------------------------

class _Mixer2d(_Mixer):
    spatial = 2


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


# ---- F14: PoNet -------------------------------------------------------------------------------------------------

class PoNetMixer(_Mixer):
    """PoNet's multi-granularity pooling (Tan et al., "PoNet: Pooling Network for Efficient Token Mixing in
    Long Sequences", sec. 3): global aggregation (a mean-pooled query ``g`` attending once over the tokens,
    ``g' = softmax(g K^T / sqrt(d)) V``), segment max-pooling over fixed segments of ``segment`` tokens (the
    paper's sentence segments) and local max-pooling over ``local_window`` tokens, fused as
    ``o_i = W_o (g' * x_o_i + s_seg(i) + l_i)``. O(seq dim)."""

    def __init__(self, dim: int, *, segment: int = 32, local_window: int = 3, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("PoNet", causal)
        _check_dim(dim)
        _positive(segment=segment, local_window=local_window)
        if local_window % 2 == 0:
            raise ValueError(f"local_window must be odd (same padding), got {local_window}")
        self.segment, self.local_window = segment, local_window
        self.proj = nn.Linear(dim, 6 * dim)  # g, k, v, x_o, segment, local
        self.out = nn.Linear(dim, dim)

    def _parts(self, x):
        self._check(x)
        return self.proj(x).chunk(6, dim=-1)

    def _global(self, g, k, v):
        q = g.mean(1, keepdim=True)  # [b, 1, d]
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.dim), dim=-1) @ v

    def _segments(self, s):
        b, n, d = s.shape
        c = min(self.segment, n)
        nc = -(-n // c)
        sp = F.pad(s, (0, 0, 0, nc * c - n), value=float("-inf"))
        return sp.view(b, nc, c, d).amax(2).repeat_interleave(c, dim=1)[:, :n]

    def local_max(self, l_):
        w = self.local_window
        return F.max_pool1d(l_.transpose(1, 2), w, stride=1, padding=w // 2).transpose(1, 2)

    def forward(self, x):
        g, k, v, xo, s, l_ = self._parts(x)
        return self.out(self._global(g, k, v) * xo + self._segments(s) + self.local_max(l_))

    def reference(self, x):
        g, k, v, xo, s, l_ = self._parts(x)
        n = x.shape[1]
        c = min(self.segment, n)
        seg = torch.stack([s[:, (i // c) * c: (i // c + 1) * c].amax(1) for i in range(n)], 1)
        m = self.local_window // 2
        loc = torch.stack([l_[:, max(i - m, 0): i + m + 1].amax(1) for i in range(n)], 1)
        return self.out(self._global(g, k, v) * xo + seg + loc)


# ---- F15: Hrrformer -------------------------------------------------------------------------------------------

class HrrformerMixer(_Mixer):
    """Hrrformer attention (Alam et al., "Recasting Self-Attention with Holographic Reduced
    Representations", eq. 1-4) over ``num_heads`` heads, with input and output projections; see
    :mod:`attnkit.ops.mixers.hrr`. The causal form (prefix sums of the bindings, a prefix softmax) is not in
    the paper; it decodes with an O(dim) state (:meth:`step`)."""

    def __init__(self, dim: int, *, num_heads: int = 4, causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim, num_heads=num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x):
        self._check(x)
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.dim // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def _merge(self, o, x):
        b, n, _ = x.shape
        return self.out(o.transpose(1, 2).reshape(b, n, self.dim).to(x.dtype))

    def forward(self, x):
        return self._merge(hrr.hrr_attention(*self._heads(x), causal=self.causal), x)

    def reference(self, x):
        return self._merge(hrr.hrr_attention_reference(*self._heads(x), causal=self.causal), x)

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding: ``x_t [batch, dim]`` -> ``(y_t [batch, dim], state)``."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        b = x_t.shape[0]
        q, k, v = self.qkv(x_t).view(b, 3, self.num_heads, -1).unbind(1)
        y, state = hrr.hrr_step(q, k, v, state)
        return self.out(y.reshape(b, self.dim).to(x_t.dtype)), state


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


# ---- F18: Mamba-ND --------------------------------------------------------------------------------------------

SCAN_ORDERS = ("forward", "backward", "transposed", "transposed_backward")


class MambaND(_Mixer):
    """Mamba-ND (Li et al., "Mamba-ND: Selective State Space Modeling for Multi-Dimensional Data", sec. 3):
    a Mamba layer (Gu & Dao, "Mamba", Algorithm 2: input projection, causal depthwise conv, selective scan
    with input-dependent ``dt, B, C``, SiLU gate, output projection) run over ``x [batch, *spatial, dim]``
    flattened in one ``order``: ``"forward"`` (row-major, H+W+), ``"backward"`` (H-W-), ``"transposed"``
    (axes reversed, W+H+) or ``"transposed_backward"`` (W-H-); the paper alternates orders across layers.
    The scan runs by chunks (:func:`~attnkit.ops.mixers.scan.selective_scan_chunked`); the 1-D forward
    order is causal and decodes with :meth:`step`."""

    spatial = None

    def __init__(self, dim: int, *, state_size: int = 16, expand: int = 2, conv_size: int = 4,
                 dt_rank: int | None = None, order: str = "forward", chunk: int | None = None,
                 causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim)
        dt_rank = dt_rank or math.ceil(dim / 16)
        _positive(state_size=state_size, expand=expand, conv_size=conv_size, dt_rank=dt_rank)
        if order not in SCAN_ORDERS:
            raise ValueError(f"order must be one of {SCAN_ORDERS}, got {order!r}")
        if causal and order != "forward":
            raise ValueError(f"causal=True needs order='forward' (the scan runs past to future), got {order!r}")
        self.order, self.chunk, self.conv_size = order, chunk, conv_size
        e = expand * dim
        self.inner, self.state_size, self.dt_rank = e, state_size, dt_rank
        self.in_proj = nn.Linear(dim, 2 * e)
        self.conv = nn.Parameter(torch.randn(conv_size, e) * conv_size ** -0.5)
        self.conv_bias = nn.Parameter(torch.zeros(e))
        self.x_proj = nn.Linear(e, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, e)
        with torch.no_grad():  # dt in [1e-3, 1e-1] at initialisation, as in Mamba
            dt = torch.exp(torch.rand(e) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state_size + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, dim)

    # -- scan orders --------------------------------------------------------------------------------------
    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, *spatial, dim]`` -> ``[batch, seq, dim]`` in this layer's order."""
        nd = x.dim() - 2
        if self.order.startswith("transposed") and nd > 1:
            x = x.permute(0, *range(nd, 0, -1), nd + 1)
        seq = x.reshape(x.shape[0], -1, x.shape[-1])
        return seq.flip(1) if self.order.endswith("backward") else seq

    def unflatten(self, seq: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        nd = len(shape) - 2
        if self.order.endswith("backward"):
            seq = seq.flip(1)
        if self.order.startswith("transposed") and nd > 1:
            tshape = (shape[0], *reversed(shape[1:-1]), seq.shape[-1])
            return seq.reshape(tshape).permute(0, *range(nd, 0, -1), nd + 1)
        return seq.reshape(*shape[:-1], seq.shape[-1])

    # -- the 1-D layer --------------------------------------------------------------------------------------
    def _project(self, u):
        xz = self.in_proj(u)
        return xz.chunk(2, dim=-1)

    def _ssm_inputs(self, xc):
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        return dt, B, C

    def _layer(self, u, conv, scan_fn):
        x, z = self._project(u)
        xc = F.silu(conv(x, self.conv, 0) + self.conv_bias)
        dt, B, C = self._ssm_inputs(xc)
        ct = compute_dtype(u.dtype)
        A = -torch.exp(self.A_log.to(ct))
        y = scan_fn(xc.to(ct), dt.to(ct), A, B.to(ct), C.to(ct)).to(u.dtype)
        y = (y + self.D * xc) * F.silu(z)
        return self.out_proj(y)

    def forward(self, x):
        self._check(x)
        seq = self.flatten(x)
        y = self._layer(seq, conv_direct, lambda *a: scan.selective_scan_chunked(*a, chunk=self.chunk))
        return self.unflatten(y, x.shape)

    def reference(self, x):
        self._check(x)
        seq = self.flatten(x)
        y = self._layer(seq, conv_reference, lambda *a: scan.selective_scan_reference(*a)[0])
        return self.unflatten(y, x.shape)

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding of a 1-D sequence: ``x_t [batch, dim]``; ``state = (conv window [batch, conv_size,
        inner], h [batch, inner, state_size])``, None at the start."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        x, z = self._project(x_t)
        ct = compute_dtype(x_t.dtype)
        if state is None:
            window = x.new_zeros(x.shape[0], self.conv_size, self.inner)
            h = torch.zeros(x.shape[0], self.inner, self.state_size, dtype=ct, device=x.device)
        else:
            window, h = state
        window = torch.cat([window[:, 1:], x[:, None]], dim=1)
        # conv convention y_t = sum_j k[j] x_{t - j}: the newest input meets tap 0
        xc = F.silu((window.flip(1) * self.conv).sum(1) + self.conv_bias)
        dt, B, C = self._ssm_inputs(xc)
        A = -torch.exp(self.A_log.to(ct))
        y, h = scan.selective_scan_step(xc.to(ct), dt.to(ct), A, B.to(ct), C.to(ct), h)
        y = (y.to(x_t.dtype) + self.D * xc) * F.silu(z)
        return self.out_proj(y), (window, h)


# ---- F20: Extractor ----------------------------------------------------------------------------------------------

class Extractor(_Mixer):
    """An Extractor-style causal mixer after Chen, "Attention Is Not All You Need Anymore" (2023): the paper
    builds its Extractors (SHE, HE, WE, ME) from elementwise products and learnable weights indexed by the
    relative position over the causal prefix. The full text was not reachable in this session, so this is the
    minimalist structure the catalogue records (F20), not a verified transcription of the paper's equations:
    ``y_t = W_o ((x_t W_q) * sum_{j <= t} w_{t - j} * (x_j W_v))`` with learned per-channel weights
    ``w [max_len, dim]`` (lags beyond ``max_len`` weigh 0), computed by FFT. Always causal."""

    def __init__(self, dim: int, *, max_len: int = 2048, causal: bool = True):
        super().__init__(dim, True)
        _check_dim(dim)
        _positive(max_len=max_len)
        self.max_len = max_len
        self.qv = nn.Linear(dim, 2 * dim)
        decay = torch.exp(-torch.arange(max_len, dtype=torch.float32)[:, None] / 64.0)
        self.weight = nn.Parameter(decay * (1 + 0.1 * torch.randn(max_len, dim)) / 8.0)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        self._check(x)
        q, v = self.qv(x).chunk(2, dim=-1)
        k = self.weight[: min(x.shape[1], self.max_len)]
        return self.out(q * long_conv(v, k, 0))

    def reference(self, x):
        self._check(x)
        q, v = self.qv(x).chunk(2, dim=-1)
        n = x.shape[1]
        pos = torch.arange(n, device=x.device)
        lag = pos[:, None] - pos[None, :]
        inside = (lag >= 0) & (lag < self.max_len)
        w = self.weight[lag.clamp(0, self.max_len - 1)] * inside[..., None].to(x.dtype)  # [t, j, dim]
        return self.out(q * torch.einsum("tjc,bjc->btc", w, v))
