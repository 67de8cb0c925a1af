"""Shared pieces of the mixers family: input checks, long 1-D convolutions (direct, FFT, loop reference),
2-D spectral filtering (FFT and a materialised-DFT reference) and grid shapes for 2-D/3-D examples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def check_x(x: torch.Tensor, dim: int, *, spatial: int | None = 1, name: str = "x") -> None:
    """Validate ``x [batch, *spatial, dim]`` with ``spatial`` spatial axes (None: any number >= 1)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [batch, seq, {dim}], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    axes = {1: "[batch, seq, channels]", 2: "[batch, height, width, channels]",
            3: "[batch, time, height, width, channels]"}
    if spatial is None:
        if x.dim() < 3:
            raise ValueError(f"{name} must be [batch, *spatial, {dim}] with at least one spatial axis, "
                             f"got shape {tuple(x.shape)}")
    elif x.dim() != spatial + 2:
        raise ValueError(f"{name} must have {spatial + 2} dimensions {axes[spatial]}, got shape {tuple(x.shape)}; "
                         f"add missing axes with .unsqueeze()")
    if x.shape[-1] != dim:
        raise ValueError(f"{name} has {x.shape[-1]} channels (last axis) but the mixer was built with dim={dim}")
    if any(s == 0 for s in x.shape[1:-1]):
        raise ValueError(f"{name} has an empty spatial/sequence axis: shape {tuple(x.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half precisions (exp, cumulative sums, FFTs), else ``dtype``."""
    return torch.float32 if dtype in _HALF else dtype


def fast_fft_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (pocketfft and cuFFT are fastest on such sizes)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


# ---- long 1-D convolutions ------------------------------------------------------------------------------
# Convention: y_t = sum_j k[j] * x_{t - j + left}, j = 0..L-1 (a true convolution; ``left`` taps look ahead).
# left = 0 is causal; left = (L - 1) // 2 is centred. x [batch, seq, channels], k [L, channels] (depthwise).

def conv_reference(x: torch.Tensor, k: torch.Tensor, left: int = 0) -> torch.Tensor:
    """The definition, one shifted product per tap (plain reference)."""
    n, L = x.shape[1], k.shape[0]
    y = torch.zeros_like(x)
    for j in range(L):
        s = j - left  # y_t += k[j] x_{t - s}
        if s >= n or -s >= n:
            continue
        if s >= 0:
            y[:, s:] += k[j] * x[:, : n - s]
        else:
            y[:, : n + s] += k[j] * x[:, -s:]
    return y


def conv_direct(x: torch.Tensor, k: torch.Tensor, left: int = 0) -> torch.Tensor:
    """``F.conv1d`` (depthwise, cross-correlation with the flipped kernel); O(n L C)."""
    L, c = k.shape
    w = k.flip(0).t().unsqueeze(1).to(x.dtype)  # [C, 1, L]
    xt = F.pad(x.transpose(1, 2), (L - 1 - left, left))
    return F.conv1d(xt, w, groups=c).transpose(1, 2)


def conv_fft(x: torch.Tensor, k: torch.Tensor, left: int = 0, *, n_fft: int | None = None,
             block_elems: int = 1 << 21) -> torch.Tensor:
    """The same convolution by FFT, zero-padded so nothing wraps around; O((n + L) log(n + L) C). Runs by
    blocks of channels, channels first (each transform over a contiguous row), sized so a block's padded
    signals hold about ``block_elems`` values and stay in cache."""
    b, n, c = x.shape
    L = k.shape[0]
    ct = compute_dtype(x.dtype)
    m = n_fft or fast_fft_len(n + L - 1)
    cb = max(1, block_elems // (m * b))
    out = torch.empty(x.shape, dtype=ct, device=x.device)
    for c0 in range(0, c, cb):
        c1 = min(c0 + cb, c)
        xf = torch.fft.rfft(x[..., c0:c1].to(ct).transpose(1, 2), n=m)  # [b, cb, m // 2 + 1]
        kf = torch.fft.rfft(k[:, c0:c1].to(ct).t(), n=m)
        out[..., c0:c1] = torch.fft.irfft(xf * kf, n=m)[..., left: left + n].transpose(1, 2)
    return out.to(x.dtype)


def conv_shifted(x: torch.Tensor, k: torch.Tensor, left: int = 0) -> torch.Tensor:
    """The same convolution as one shifted multiply-add per tap over blocks of positions
    (:func:`shifted_products`): for short kernels on long sequences it stays in cache where ``F.conv1d`` on the
    transposed input streams through memory (5x faster at 64K tokens, 1024 channels, 31 taps, on CPU)."""
    L = k.shape[0]
    coeff = k.to(x.dtype).t()[None, None].expand(*x.shape, L)
    return shifted_products(torch.zeros_like(x), coeff, x, [left - j for j in range(L)])


def long_conv(x: torch.Tensor, k: torch.Tensor, left: int = 0, *, method: str = "auto") -> torch.Tensor:
    """Depthwise convolution by ``method``: ``"direct"`` (shifted products), ``"fft"`` or ``"auto"`` (FFT once
    the kernel is longer than 64 taps, where its O(log n) per element beats the direct O(L))."""
    if method == "auto":
        method = "fft" if k.shape[0] > 64 else "direct"
    if method == "direct":
        return conv_shifted(x, k, left)
    if method == "fft":
        return conv_fft(x, k, left)
    raise ValueError(f"method must be 'auto', 'direct' or 'fft', got {method!r}")


def shifted_products(out: torch.Tensor, coeff: torch.Tensor, x: torch.Tensor, shifts, *,
                     block: int = 1024) -> torch.Tensor:
    """``out[:, i] += coeff[:, i, ..., j] * x[:, i + shifts[j]]`` for every tap ``j`` (zero outside the sequence),
    by blocks of ``block`` positions so the partial sums stay in cache at any length. ``out, x [batch, seq,
    ...]``; ``coeff [batch, seq, ..., taps]`` broadcasting against them (with the tap axis last)."""
    n = x.shape[1]
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        acc = out[:, b0:b1]
        for j, s in enumerate(shifts):
            lo, hi = max(b0, -s), min(b1, n - s)
            if lo < hi:
                acc[:, lo - b0: hi - b0].addcmul_(coeff[:, lo:hi, ..., j], x[:, lo + s: hi + s])
    return out


# ---- 2-D spectral filtering -----------------------------------------------------------------------------

def spectral_filter(x: torch.Tensor, mask: torch.Tensor, *, block: int = 32) -> torch.Tensor:
    """``irfft2(mask * rfft2(x))`` over the spatial axes of ``x [batch, H, W, C]``; ``mask`` is complex,
    ``[H, W // 2 + 1, C]`` or ``[batch, H, W // 2 + 1, C]``. A circular convolution by the kernel
    ``irfft2(mask)`` (convolution theorem); the output is real by construction."""
    return spectral_filter_channels_first(x, mask.movedim(-1, -3), block=block)


def spectral_filter_channels_first(x: torch.Tensor, mask: torch.Tensor, *, block: int = 32) -> torch.Tensor:
    """:func:`spectral_filter` with the mask channels first (``[C, H, W // 2 + 1]``, optionally with a leading
    batch axis), by blocks of ``block`` channels: channels do not interact, and a block's spectra stay in
    cache where the whole ``[C, H, W]`` transform would stream through memory several times."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    ct = compute_dtype(x.dtype)
    out = torch.empty(x.shape, dtype=ct, device=x.device)
    for c0 in range(0, c, block):
        c1 = min(c0 + block, c)
        xf = rfft2_channels_first(x[..., c0:c1])
        y = torch.fft.irfft2(xf * mask[..., c0:c1, :, :], s=(h, w), norm="ortho")
        out[..., c0:c1] = y.permute(0, 2, 3, 1)
    return out.to(x.dtype)


def rfft2_channels_first(x: torch.Tensor) -> torch.Tensor:
    """``rfft2`` (ortho) of channels-last ``x [batch, H, W, C]`` as ``[batch, C, H, W // 2 + 1]`` (the 2-D
    transforms then run over contiguous rows; channels-last strides make pocketfft gather every line)."""
    return torch.fft.rfft2(x.to(compute_dtype(x.dtype)).permute(0, 3, 1, 2).contiguous(), norm="ortho")


def _dft_matrices(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    fh = torch.arange(h, device=device, dtype=torch.float64)
    fw = torch.arange(w // 2 + 1, device=device, dtype=torch.float64)
    pos_w = torch.arange(w, device=device, dtype=torch.float64)
    dft_h = torch.exp(-2j * math.pi * torch.outer(fh, fh) / h)  # [f, h]
    dft_w = torch.exp(-2j * math.pi * torch.outer(pos_w, fw) / w)  # [w, g]
    return dft_h, dft_w


def rfft2_reference(x: torch.Tensor) -> torch.Tensor:
    """``rfft2(x, norm="ortho")`` over axes 1, 2 of ``x [batch, H, W, C]`` by materialised DFT matrices."""
    h, w = x.shape[1], x.shape[2]
    dft_h, dft_w = _dft_matrices(h, w, x.device)
    z = torch.einsum("fh,bhwc,wg->bfgc", dft_h, x.to(torch.complex128), dft_w)
    return z / math.sqrt(h * w)


def irfft2_reference(z: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_reference` with ``irfft2``'s semantics: the half spectrum is extended by
    Hermitian symmetry (bins 1..ceil(W/2)-1 count twice) and the imaginary parts of the self-conjugate
    columns are dropped."""
    dft_h, dft_w = _dft_matrices(h, w, z.device)
    t = torch.einsum("hf,bfgc->bhgc", dft_h.conj(), z.to(torch.complex128))
    g = torch.arange(w // 2 + 1, device=z.device)
    weight = torch.full((w // 2 + 1,), 2.0, dtype=torch.float64, device=z.device)
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    basis = dft_w.conj().t() * weight[:, None]  # [g, w]: c_g e^{+2 pi i g w / W}
    del g
    return torch.einsum("bhgc,gw->bhwc", t, basis).real / math.sqrt(h * w)


def circular_conv2d_reference(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``y[p] = sum_q kernel[q] x[p - q]`` (indices mod H, W), per channel, by a loop over kernel taps.
    ``x [batch, H, W, C]``, ``kernel [H, W, C]``."""
    h, w = x.shape[1], x.shape[2]
    y = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            y = y + kernel[i, j] * torch.roll(x, shifts=(i, j), dims=(1, 2))
    return y


# ---- depthwise 2-D convolutions: F.conv2d and a loop over taps (reference) --------------------------------

def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, dilation: int = 1,
             padding_mode: str = "zeros") -> torch.Tensor:
    """Same-size depthwise convolution of channels-last ``x [batch, H, W, C]`` with ``weight [C, 1, kh, kw]``
    (odd kernel sizes; ``padding_mode`` "zeros" or "circular")."""
    kh, kw = weight.shape[-2:]
    ph, pw = dilation * (kh // 2), dilation * (kw // 2)
    xt = x.permute(0, 3, 1, 2)
    if padding_mode == "circular":
        xt = F.pad(xt, (pw, pw, ph, ph), mode="circular")
        y = F.conv2d(xt, weight, bias, dilation=dilation, groups=x.shape[-1])
    else:
        y = F.conv2d(xt, weight, bias, padding=(ph, pw), dilation=dilation, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1)


def dwconv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                       dilation: int = 1, padding_mode: str = "zeros") -> torch.Tensor:
    """The same cross-correlation as :func:`dwconv2d`, one shifted product per tap."""
    kh, kw = weight.shape[-2:]
    h, w = x.shape[1], x.shape[2]
    ph, pw = dilation * (kh // 2), dilation * (kw // 2)
    mode = "circular" if padding_mode == "circular" else "constant"
    xp = F.pad(x.permute(0, 3, 1, 2), (pw, pw, ph, ph), mode=mode).permute(0, 2, 3, 1)
    y = torch.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            y = y + weight[:, 0, i, j] * xp[:, i * dilation: i * dilation + h, j * dilation: j * dilation + w]
    return y if bias is None else y + bias


# ---- grids for 2-D / 3-D example inputs -------------------------------------------------------------------

def grid_shape(n: int, ndim: int) -> tuple[int, ...]:
    """Near-cubic factorisation of ``n`` tokens into ``ndim`` axes (36 -> (6, 6) or (3, 3, 4); 1 -> (1, 1))."""
    if ndim == 1:
        return (n,)
    root = n ** (1.0 / ndim)
    first = max(d for d in range(1, n + 1) if n % d == 0 and d <= root + 1e-9)
    return (first, *grid_shape(n // first, ndim - 1))


def grid_inputs(ndim: int):
    """An ``example_inputs`` function for registry records of ``ndim``-D mixers: ``x [batch, *grid, channels]``
    with ``seq_len`` tokens and ``heads * head_dim`` channels."""

    def example_inputs(*, batch: int = 2, seq_len: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0,
                       heads: int = 2, head_dim: int = 16, **_) -> tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = (batch, *grid_shape(seq_len, ndim), heads * head_dim)
        return (torch.randn(shape, generator=g).to(dtype),)

    return example_inputs
