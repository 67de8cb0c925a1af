"""Registers the mixers family (issue 12): the attention-free and convolutional token mixers of
CATALOGUE-FULL.md section F. Each record is ``kind="mixer"``: its factory ``(dim=..., causal=..., **params)``
returns an ``nn.Module`` mapping ``x [batch, seq, dim]`` (2-D papers: ``[batch, height, width, dim]``) to the
same shape, whose ``reference`` method is the plain computation with the same weights.

``flops(batch=, heads=, q_len=, head_dim=, ...)`` counts forward multiply-adds x 2 at width
``dim = heads * head_dim`` (dominant terms). ``extras["state_bytes"](dim=, dtype=, **params)`` is the decoding
state of one sequence for the recurrent (causal) ones.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from attnkit.nn import mixers as M
from attnkit.ops.mixers._common import grid_inputs
from attnkit.registry import Mechanism, register

FAMILY = "mixers"


def _factory(cls):
    def factory(*, dim: int, causal: bool = False, **params: Any):
        return cls(dim, causal=causal, **params)

    factory.__name__ = f"build_{cls.__name__}"
    factory.__doc__ = cls.__doc__
    factory.__signature__ = inspect.signature(cls)  # the class's parameters, so callers can check theirs
    return factory


def _reference(built, x, **_):
    return built.reference(x)


def _elem(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _d(heads, head_dim):
    return heads * head_dim


# ---- forward FLOPs (2 x multiply-adds; projections counted as 2 n d_in d_out) ---------------------------------

def _proj(n, d, k):  # k projections d -> d
    return 2 * n * d * d * k


def _flops_aft_full(*, batch, heads, q_len, head_dim, causal=False, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (_proj(n, d, 4) + 4 * n * n * d * (0.5 if causal else 1.0))


def _flops_aft_linear(window=0):
    def flops(*, batch, heads, q_len, head_dim, window=window, **_):
        n, d = q_len, _d(heads, head_dim)
        return batch * (_proj(n, d, 4) + 8 * n * d + 4 * n * (2 * window) * d)

    return flops


def _flops_mega(*, batch, heads, q_len, head_dim, chunk_size=128, ema_dim=16, **_):
    n, d = q_len, _d(heads, head_dim)
    c = min(chunk_size or n, n)
    z = max(d // 4, 1)
    fft = 2 * 5 * n * math.log2(max(2 * n, 2)) * d  # two rfft + one irfft of length 2n per channel
    return batch * (_proj(n, d, 5) + 2 * n * d * z + 2 * n * ema_dim * d + fft + 4 * n * c * (z + d) / 2)


def _flops_channel(*, batch, heads, q_len, head_dim, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (_proj(n, d, 4) + 4 * n * d * head_dim)


def _flops_lambda(*, batch, heads, q_len, head_dim, key_dim=16, receptive_field=23, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (2 * n * d * (heads * key_dim + key_dim + head_dim) + 2 * n * key_dim * head_dim
                    + 2 * n * heads * key_dim * (head_dim + receptive_field) + 2 * n * heads * receptive_field
                    * head_dim)


def _flops_conv1d(kernel_size=7, dynamic=False):
    def flops(*, batch, heads, q_len, head_dim, kernel_size=kernel_size, num_heads=4, **_):
        n, d = q_len, _d(heads, head_dim)
        extra = 2 * n * d * num_heads * kernel_size if dynamic else 0
        return batch * (_proj(n, d, 3) + 2 * n * d * kernel_size + extra)

    return flops


def _flops_convbert(*, batch, heads, q_len, head_dim, num_heads=4, conv_heads=2, kernel_size=9, **_):
    n, d = q_len, _d(heads, head_dim)
    attn = d * (num_heads - conv_heads) / num_heads
    conv = d - attn
    return batch * (_proj(n, d, 4) + 4 * n * n * attn + 2 * n * d * kernel_size + 2 * n * d * conv
                    + 2 * n * conv * conv_heads * kernel_size + 2 * n * conv * kernel_size)


def _flops_swift(*, batch, heads, q_len, head_dim, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (_proj(n, d, 4) + 6 * n * d)


def _flops_lka(*, batch, heads, q_len, head_dim, kernel_size=21, dilation=3, **_):
    n, d = q_len, _d(heads, head_dim)
    k0, k1 = 2 * dilation - 1, math.ceil(kernel_size / dilation)
    return batch * (_proj(n, d, 3) + 2 * n * d * (k0 * k0 + k1 * k1))


def _flops_lkca(*, batch, heads, q_len, head_dim, kernel_size=13, **_):
    return batch * 2 * q_len * _d(heads, head_dim) * kernel_size ** 2


def _grid(n):
    from attnkit.ops.mixers._common import grid_shape

    return grid_shape(n, 2)


def _flops_parcnet(*, batch, heads, q_len, head_dim, **_):
    n, d = q_len, _d(heads, head_dim)
    h, w = _grid(n)
    return batch * (_proj(n, d, 3) + 2 * n * d / 2 * (2 * h - 1) + 2 * n * d / 2 * (2 * w - 1))


def _flops_metamixer(*, batch, heads, q_len, head_dim, kernel_size=7, expand=2, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (4 * n * d * expand * d + 4 * n * expand * d * kernel_size ** 2)


def _fft2_flops(n, d):
    return 2 * 2.5 * n * math.log2(max(n, 2)) * d  # rfft2 + irfft2


def _flops_aff(*, batch, heads, q_len, head_dim, groups=4, hidden_ratio=1, **_):
    n, d = q_len, _d(heads, head_dim)
    cg = d // groups
    return batch * (_fft2_flops(n, d) + (n / 2) * 2 * 2 * groups * (2 * cg) * (2 * cg * hidden_ratio) + 6 * n * d)


def _flops_spect(*, batch, heads, q_len, head_dim, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (_fft2_flops(n, d) + 3 * n * d)


def _flops_ponet(*, batch, heads, q_len, head_dim, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (_proj(n, d, 7) + 6 * n * d)


def _flops_hrr(*, batch, heads, q_len, head_dim, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (_proj(n, d, 4) + 5 * 2.5 * n * d * math.log2(max(head_dim, 2)) + 10 * n * d)


def _flops_ckconv(*, batch, heads, q_len, head_dim, causal=False, hidden=32, **_):
    n, d = q_len, _d(heads, head_dim)
    lags = n if causal else 2 * n
    fft = 3 * 2.5 * (n + lags) * math.log2(n + lags) * d
    return batch * (_proj(n, d, 1) + fft) + 2 * lags * (hidden * hidden + hidden * d)


def _flops_smp(*, batch, heads, q_len, head_dim, kernel_size=31, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (_proj(n, d, 1) + 2 * n * d * kernel_size)


def _flops_mamba(*, batch, heads, q_len, head_dim, state_size=16, expand=2, conv_size=4, **_):
    n, d = q_len, _d(heads, head_dim)
    e = expand * d
    r = math.ceil(d / 16)
    proj = 2 * n * (d * 2 * e + e * (r + 2 * state_size) + r * e + e * d)
    return batch * (proj + 2 * n * e * conv_size + 2 * 6 * n * e * state_size)  # chunked: two scan passes


def _flops_extractor(*, batch, heads, q_len, head_dim, **_):
    n, d = q_len, _d(heads, head_dim)
    return batch * (_proj(n, d, 3) + 3 * 2.5 * 2 * n * math.log2(2 * n) * d + 2 * n * d)


# ---- decoding state (bytes per sequence) ---------------------------------------------------------------------

def _state_aft_simple(*, dim, dtype=torch.float32, **_):
    return 3 * dim * max(_elem(dtype), 4)  # running numerator, denominator and maximum (float32 for halves)


def _state_aft_window(default_window):
    def state(*, dim, dtype=torch.float32, window=default_window, **_):
        # running global sums (float32) + the last window - 1 tokens' exp(K) V and exp(K)
        return 2 * dim * 4 + (window - 1) * 2 * dim * _elem(dtype)

    return state


def _state_mega(*, dim, dtype=torch.float32, ema_dim=16, chunk_size=128, **_):
    z = max(dim // 4, 1)
    return dim * ema_dim * _elem(dtype) + (chunk_size or 0) * (z + dim) * _elem(dtype)  # EMA + chunk keys/values


def _state_conv(kernel_size):
    def state(*, dim, dtype=torch.float32, kernel_size=kernel_size, **_):
        return kernel_size * dim * _elem(dtype)

    return state


def _state_hrr(*, dim, dtype=torch.float32, num_heads=4, **_):
    h = dim // num_heads
    return num_heads * ((h // 2 + 1) * 2 + 1) * 4  # binding spectrum (complex) + softmax sum, float32


def _state_mamba(*, dim, dtype=torch.float32, state_size=16, expand=2, conv_size=4, **_):
    e = expand * dim
    return e * state_size * 4 + conv_size * e * _elem(dtype)


def _rec(name, paper, complexity, causal, cls, summary, *, bench=None, small=None, flops=None, state=None,
         spatial=1, in_default=False, max_bench_len=None, tolerance_scale=1.0, source=""):
    extras = {"state_bytes": state} if state is not None else {}
    if spatial > 1:
        extras["spatial"] = spatial  # x [batch, *grid, channels]: 1-D callers lay tokens out on a grid
    return register(Mechanism(
        name=name, family=FAMILY, paper=paper, exact=False, complexity=complexity, causal=causal,
        factory=_factory(cls), summary=summary, needs=("dim",), bench_params=bench or {}, small_params=small or {},
        in_default_bench=in_default, max_bench_len=max_bench_len, flops=flops, extras=extras, kind="mixer",
        reference=_reference, example_inputs=grid_inputs(spatial) if spatial > 1 else None,
        tolerance_scale=tolerance_scale, source=source))


AFT = "An Attention Free Transformer (Zhai et al., 2021)"

_rec("aft_full", AFT + ", eq. 2", "O(n^2 d)", True, M.AFTFull,
     "AFT-full: sigmoid(Q) * exp(w + K)-weighted average of V per channel, pairwise biases w = U V^T",
     bench={"max_len": 16384}, small={"max_len": 64}, flops=_flops_aft_full, source="paper")
_rec("aft_simple", AFT + ", eq. 3", "O(n d)", True, M.AFTSimple,
     "AFT-simple: sigmoid(Q) * softmax_t(K)-weighted sum of V per channel; causal by running sums",
     flops=_flops_aft_linear(0), state=_state_aft_simple, source="paper")
_rec("aft_local", AFT + ", eq. 4", "O(n s d)", True, M.AFTLocal,
     "AFT-local: learned biases only within a window of s (0 outside): global sums + windowed correction",
     bench={"max_len": 65536, "window": 32}, small={"max_len": 64, "window": 4}, flops=_flops_aft_linear(32),
     state=_state_aft_window(32), source="paper")
_rec("aft_conv", AFT + ", eq. 5", "O(n s d)", True, M.AFTConv,
     "AFT-conv: relative biases per head (depthwise conv of exp(K)V and exp(K)) + global sums",
     bench={"window": 16}, small={"window": 4}, flops=_flops_aft_linear(16), state=_state_aft_window(16),
     source="paper")
_rec("mega", "Mega: Moving Average Equipped Gated Attention (Ma et al., 2023), eq. 2-3, 6-12", "O(n c d + n log n d)",
     True, M.Mega, "damped multi-dimensional EMA (FFT of its closed-form kernel) + single-head gated attention "
     "within chunks (Mega-chunk)", bench={"chunk_size": 128}, small={"chunk_size": 8, "ema_dim": 4},
     flops=_flops_mega, state=_state_mega, source="paper")
_rec("xca", "XCiT: Cross-Covariance Image Transformers (El-Nouby et al., 2021), eq. 5", "O(n d^2 / h)", False,
     M.XCA, "cross-covariance attention: a d_h x d_h softmax map of L2-normalised (over tokens) Q, K per head",
     flops=_flops_channel, source="paper")
_rec("davit_channel", "DaViT: Dual Attention Vision Transformers (Ding et al., 2022), eq. 3", "O(n d^2 / G)",
     False, M.ChannelGroupAttention, "channel group attention: softmax(Q_g^T K_g / sqrt(C_g)) over channel groups",
     flops=_flops_channel, source="paper")
_rec("lambda", "LambdaNetworks: Modeling Long-Range Interactions Without Attention (Bello, 2021), eq. 2-3",
     "O(n k v (h + r))", False, M.LambdaLayer,
     "lambda layer (1-D): content lambda softmax(K)^T V + local position lambdas (lambda convolution)",
     small={"receptive_field": 5}, flops=_flops_lambda, source="paper")
_rec("lightconv", "Pay Less Attention with Lightweight and Dynamic Convolutions (Wu et al., 2019), eq. 2-3",
     "O(n k d)", True, M.LightConv,
     "lightweight convolution: softmax-normalised depthwise kernel shared per head, GLU in, linear out",
     small={"kernel_size": 3}, flops=_flops_conv1d(7), state=_state_conv(7), source="paper")
_rec("dynamic_conv", "Pay Less Attention with Lightweight and Dynamic Convolutions (Wu et al., 2019), eq. 4",
     "O(n k d)", True, M.DynamicConv, "dynamic convolution: a softmax kernel per position predicted from the token",
     small={"kernel_size": 3}, flops=_flops_conv1d(7, dynamic=True), state=_state_conv(7), source="paper")
_rec("convbert", "ConvBERT: Improving BERT with Span-based Dynamic Convolution (Jiang et al., 2020), eq. 3-5",
     "O(n^2 d / 2 + n k d)", False, M.ConvBERTMixer,
     "mixed attention: half softmax heads, half span-based dynamic convolution heads", small={"kernel_size": 3},
     flops=_flops_convbert, source="paper")
_rec("swiftformer", "SwiftFormer: Efficient Additive Attention for Transformer-based Real-time Mobile Vision "
     "Applications (Shaker et al., 2023), eq. 4-6", "O(n d)", False, M.SwiftFormerMixer,
     "efficient additive attention: one pooled global query, elementwise with keys, linear T",
     flops=_flops_swift, source="paper")
_rec("lka", "Visual Attention Network (Guo et al., 2022), eq. 1-2", "O(n d (k0^2 + k1^2 + d))", False,
     M.LargeKernelAttention, "large kernel attention (2-D): 5x5 dwconv, 7x7 dwconv dilation 3, 1x1 conv, gating",
     small={"kernel_size": 9, "dilation": 2}, flops=_flops_lka, spatial=2, source="paper")
_rec("lkca", "LKCA: Large Kernel Convolutional Attention (Li et al., 2024)", "O(n K^2 d)", False, M.LKCA,
     "one large depthwise convolution as fixed Toeplitz attention (2-D)", small={"kernel_size": 5},
     flops=_flops_lkca, spatial=2, source="paper")
_rec("parcnet_v2", "ParCNetV2: Oversized Kernel with Enhanced Attention (Xu et al., 2022), sec. 3.1-3.2",
     "O(n (H + W) d)", False, M.ParCNetV2Mixer,
     "oversized (2H-1, 2W-1) depthwise convolutions along H and W with a bifurcate gate (2-D; O(n^1.5) on "
     "square grids)", small={"size": 6}, flops=_flops_parcnet, spatial=2, source="paper")
_rec("aff", "Adaptive Frequency Filters As Efficient Global Token Mixers (Huang et al., 2023), eq. 4-6",
     "O(n log n d)", False, M.AdaptiveFrequencyFilter,
     "adaptive frequency filtering (2-D): rfft2, complex mask from grouped 1x1 convs of the spectrum, irfft2",
     flops=_flops_aff, spatial=2, source="paper")
_rec("spectformer", "SpectFormer: Frequency and Attention is what you need in a Vision Transformer "
     "(Patro et al., 2023), eq. 1-3", "O(n log n d)", False, M.SpectralGating,
     "spectral gating (2-D, GFNet-style): irfft2(W * rfft2(X)) with a learned complex filter",
     small={"size": 6}, flops=_flops_spect, spatial=2, source="paper")
_rec("ponet", "PoNet: Pooling Network for Efficient Token Mixing in Long Sequences (Tan et al., 2022), sec. 3",
     "O(n d)", False, M.PoNetMixer, "global aggregation + segment max-pooling + local max-pooling, fused",
     small={"segment": 8}, flops=_flops_ponet, source="paper")
_rec("hrrformer", "Recasting Self-Attention with Holographic Reduced Representations (Alam et al., 2023), eq. 1-4",
     "O(n d log(d / h))", True, M.HrrformerMixer,
     "HRR binding by FFT over features: superposed k (*) v, unbinding by q, cosine softmax weights",
     flops=_flops_hrr, state=_state_hrr, tolerance_scale=4.0, source="paper")
_rec("ckconv", "CKConv: Continuous Kernel Convolution For Sequential Data (Romero et al., 2022), eq. 3-5",
     "O(n log n d)", True, M.CKConv, "SIREN-generated depthwise kernel as long as the input, by FFT; pointwise mix",
     small={"ref_len": 64}, flops=_flops_ckconv, source="paper")
_rec("smpconv", "SMPConv: Self-moving Point Representations for Continuous Convolution (Kim & Park, 2023), "
     "eq. 4-5", "O(n K d)", True, M.SMPConv,
     "depthwise kernel from learnable points (positions, radii, weights) by linear interpolation",
     small={"kernel_size": 9}, flops=_flops_smp, source="paper")
_rec("mamba_nd", "Mamba-ND: Selective State Space Modeling for Multi-Dimensional Data (Li et al., 2024), sec. 3",
     "O(n N d)", True, M.MambaND,
     "Mamba selective scan (chunked) over x [batch, *spatial, dim] flattened in one scan order; registered with "
     "1-D inputs, where the forward order is causal and decodes step by step",
     small={"state_size": 4, "expand": 1}, bench={"expand": 1}, flops=_flops_mamba, state=_state_mamba,
     source="paper",
     )
_rec("metamixer", "MetaMixer Is All You Need (Yun et al., 2024), sec. 3", "O(n K^2 d)", False, M.MetaMixer,
     "FFNified attention (2-D): W2 DWConv(GELU(DWConv(W1 X)))", small={"kernel_size": 3}, flops=_flops_metamixer,
     spatial=2, source="paper")
_rec("extractor", "Attention Is Not All You Need Anymore (Chen, 2023)", "O(n log n d)", True, M.Extractor,
     "Extractor-style causal mixer: gating by x_t W_q of a learned position-indexed prefix sum (FFT); the "
     "paper's exact SHE/HE/WE/ME equations were not consulted", bench={"max_len": 65536},
     small={"max_len": 64}, flops=_flops_extractor,
     source="deviation: the catalogue's minimal Extractor (gated, position-weighted causal prefix sum); the paper's "
            "SHE/HE/WE/ME equations were not reachable in this session")
