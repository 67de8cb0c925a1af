"""attnkit.nn linear-family modules (LinearAttention, LinearMultiheadAttention, BasedAttention) against plain
references built from the functional API, plus causality, state carry, gradients and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import feature_maps as fmaps
from attnkit.nn import BasedAttention, LinearAttention, LinearMultiheadAttention
from attnkit.ops.linear import linear_attention_reference
from attnkit.testing import assert_close


def _x(b=2, n=21, e=16, dtype=torch.float64, seed=0):
    return torch.randn(b, n, e, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def _heads(x, heads, dim):
    b, n, _ = x.shape
    return x.view(b, n, heads, dim).transpose(1, 2)


def _linear_reference(m: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    q = _heads(m.q_proj(x), m.num_heads, m.head_dim)
    k = _heads(m.k_proj(x), m.kv_heads, m.head_dim)
    v = _heads(m.v_proj(x), m.kv_heads, m.head_dim)
    o = linear_attention_reference(q, k, v, feature_map=m.feature_map, causal=m.causal, decay=m.decay,
                                   normalize=m.normalize)
    return m.out_proj(o.transpose(1, 2).reshape(x.shape))


def _based_reference(m: BasedAttention, x: torch.Tensor) -> torch.Tensor:
    """Loops and masks: explicit convolution sum, quadratic Taylor attention, masked dense softmax."""
    b, n, e = x.shape
    w = m.conv.weight[:, 0]  # [e, taps]
    left = m.conv_size - 1 if m.causal else (m.conv_size - 1) // 2
    h = m.conv.bias.expand(b, n, e).clone()
    for t in range(n):
        for j in range(m.conv_size):
            src = t - left + j
            if 0 <= src < n:
                h[:, t] = h[:, t] + w[:, j] * x[:, src]
    ql, kl = (_heads(t, m.num_heads, m.feature_dim) for t in m.lin_qk(h).chunk(2, -1))
    vl = _heads(m.lin_v(h), m.num_heads, m.head_dim)
    s = ql @ kl.transpose(-1, -2) / math.sqrt(m.feature_dim)
    a = 1 + s + s * s / 2
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if m.causal:
        a = a * (j <= i)
    lin = (a @ vl) / a.sum(-1, keepdim=True)
    qw, kw, vw = (_heads(t, m.num_heads, m.head_dim) for t in m.win_qkv(h).chunk(3, -1))
    scores = qw @ kw.transpose(-1, -2) / math.sqrt(m.head_dim)
    keep = ((i - j) < m.window) & (j <= i) if m.causal else (i - j).abs() <= m.window // 2
    local = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ vw
    return m.out_proj((lin + local).transpose(1, 2).reshape(b, n, e))


# -- LinearAttention --------------------------------------------------------------------------------------

@pytest.mark.parametrize("feature_map", ["elu", "relu", "favor", "taylor", "hedgehog", "rebased", "cosformer"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_linear_attention_matches_reference(feature_map, causal):
    m = _seeded(LinearAttention(16, 4, kv_heads=2, feature_map=feature_map, causal=causal)).double()
    x = _x()
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, _linear_reference(m, x))


def test_linear_attention_decay_and_normalize():
    m = _seeded(LinearAttention(16, 4, causal=True, decay="retention", normalize="rms",
                                feature_map="identity")).double()
    x = _x(n=30)
    assert_close(m(x), _linear_reference(m, x))
    m2 = _seeded(LinearAttention(16, 4, causal=True, decay=[0.9, 0.8, 1.0, 0.5])).double()
    assert_close(m2(x), _linear_reference(m2, x))


@pytest.mark.parametrize("decay", [None, 0.9], ids=["plain", "decay"])
def test_linear_attention_is_causal(decay):
    m = _seeded(LinearAttention(16, 2, causal=True, decay=decay, chunk_size=4)).double()
    x = _x(b=1, n=19)
    y = x.clone()
    y[:, 11:] = torch.randn_like(y[:, 11:])
    a, b = m(x), m(y)
    assert_close(a[:, :11], b[:, :11])
    assert (a[:, 11:] - b[:, 11:]).abs().max() > 1e-3


def test_linear_attention_state_carry_equals_one_call():
    m = _seeded(LinearAttention(16, 4, causal=True, decay=0.95, feature_map="taylor")).double()
    x = _x(n=23)
    full = m(x)
    first, state = m(x[:, :9], return_state=True)
    second, state = m(x[:, 9:22], state=state, return_state=True)
    last = m(x[:, 22:], state=state)  # one-token decode step
    assert_close(torch.cat([first, second, last], 1), full)
    assert state.offset == 22


def test_multihead_alias_and_cache_protocol():
    class Cache:  # what attnkit.RecurrentStateCache provides: a mutable `state`
        state = None

    m = _seeded(LinearMultiheadAttention(16, 2)).double()
    assert m.causal
    x = _x(n=12)
    cache = Cache()
    steps = [m(x[:, :5], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert_close(torch.cat(steps, 1), m(x))
    assert cache.state.offset == 12


def test_state_bytes_is_constant():
    m = LinearAttention(64, 4, causal=True, feature_map="taylor")
    d = 16
    assert m.state_bytes() == 4 * (1 + d + d * (d + 1) // 2) * (d + 1) * 4


def test_linear_attention_gradients():
    m = _seeded(LinearAttention(8, 2, causal=True, decay=0.9, chunk_size=3, feature_map="hedgehog")).double()
    x = _x(b=1, n=7, e=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    m(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_linear_attention_dtypes(dtype):
    m = _seeded(LinearAttention(32, 4, causal=True, decay=0.99))
    x = _x(n=40, e=32, dtype=torch.float32) * 0.5
    expected = _linear_reference(m.double(), x.double())
    out = m.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, expected, dtype=dtype, scale=4.0)


def test_linear_attention_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        LinearAttention(10, 4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        LinearAttention(16, 4, kv_heads=3)
    with pytest.raises(ValueError, match="causal attention only"):
        LinearAttention(16, 4, decay=0.9)
    with pytest.raises(ValueError, match="decay values"):
        LinearAttention(16, 4, causal=True, decay=1.5)
    with pytest.raises(ValueError, match="'retention'"):
        LinearAttention(16, 4, causal=True, decay="fast")
    m = LinearAttention(16, 4)
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, 16\]"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="causal=True"):
        m(torch.randn(2, 5, 16), return_state=True)
    with pytest.raises(TypeError, match="RecurrentStateCache"):
        LinearAttention(16, 4, causal=True)(torch.randn(1, 3, 16), cache=object())


# -- BasedAttention ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_based_matches_reference(causal):
    m = _seeded(BasedAttention(16, 2, feature_dim=4, window=5, conv_size=3, causal=causal)).double()
    x = _x(n=17)
    out = m(x)
    assert out.shape == x.shape
    assert_close(out, _based_reference(m, x))


def test_based_is_causal():
    m = _seeded(BasedAttention(16, 4, feature_dim=4, window=4)).double()
    x = _x(b=1, n=20)
    y = x.clone()
    y[:, 13:] += 1.0
    a, b = m(x), m(y)
    assert_close(a[:, :13], b[:, :13])
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-3


def test_based_gradients_and_state():
    m = _seeded(BasedAttention(8, 2, feature_dim=3, window=3)).double()
    x = _x(b=1, n=6, e=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    m(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    f = 3
    linear = 2 * (1 + f + f * (f + 1) // 2) * (4 + 1) * 8
    assert m.state_bytes(torch.float64) == linear + 2 * 3 * 8 * 8 + 2 * 8 * 8
    assert isinstance(m.feature_map, fmaps.TaylorFeatureMap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_based_half_precision(dtype):
    m = _seeded(BasedAttention(32, 4, window=8))
    x = _x(n=33, e=32, dtype=torch.float32) * 0.5
    expected = _based_reference(m.double(), x.double())
    out = m.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, expected, dtype=dtype, scale=4.0)


def test_based_errors():
    with pytest.raises(ValueError, match="window must be a positive int"):
        BasedAttention(16, 2, window=0)
    with pytest.raises(ValueError, match="divisible"):
        BasedAttention(15, 2)
