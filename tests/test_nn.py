import pytest
import torch

import attnkit
import attnkit.nn as attnkit_nn
from attnkit import patterns as P
from attnkit.nn import MultiheadAttention, RotaryEmbedding
from attnkit.testing import assert_close


def test_multihead_attention_matches_manual_computation():
    torch.manual_seed(0)
    m = MultiheadAttention(32, 4, kv_heads=2, causal=True).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    q = m.q_proj(x).view(2, 11, 4, 8).transpose(1, 2)
    k = m.k_proj(x).view(2, 11, 2, 8).transpose(1, 2)
    v = m.v_proj(x).view(2, 11, 2, 8).transpose(1, 2)
    o = attnkit.attention(q, k, v, pattern=P.causal(), engine="reference").transpose(1, 2).reshape(2, 11, 32)
    assert_close(m(x), m.out_proj(o))


def test_rotary_preserves_norm_and_makes_scores_relative():
    rope = RotaryEmbedding(16)
    x = torch.randn(1, 1, 10, 16, dtype=torch.float64)
    y = rope(x)
    assert_close(y.norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    s1 = rope(q, offset=5) @ rope(k, offset=2).transpose(-1, -2)
    s2 = rope(q, offset=13) @ rope(k, offset=10).transpose(-1, -2)
    assert_close(s1, s2)


def test_registered_mechanism_in_module_trains():
    m = MultiheadAttention(32, 4, mechanism="sliding_window", causal=True, mechanism_kwargs={"window": 3})
    x = torch.randn(2, 20, 32, requires_grad=True)
    m(x).sum().backward()
    assert m.q_proj.weight.grad is not None and x.grad is not None


def test_module_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        MultiheadAttention(32, 4, kv_heads=3)
    with pytest.raises(KeyError, match="known mechanisms"):
        MultiheadAttention(32, 4, mechanism="nope")
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, 32\]"):
        MultiheadAttention(32, 4)(torch.randn(3, 32))


def test_public_api_is_pinned():
    expected = {"attention", "get", "list_mechanisms", "mechanism_info", "patterns", "score_mods", "normalizations",
                "NotSupportedError", "Mechanism", "register", "not_supported_reasons"}
    assert expected <= set(attnkit.__all__)
    assert all(hasattr(attnkit, name) for name in attnkit.__all__)
    assert {"MultiheadAttention", "RotaryEmbedding"} <= set(attnkit_nn.__all__)


def test_multihead_attention_dtype_mismatch_is_a_clear_type_error():
    """Issue 28: float64 input to a float32 module raised torch's matmul dtype error."""
    from attnkit.nn import MultiheadAttention

    m = MultiheadAttention(16, 2)
    with pytest.raises(TypeError, match=r"x is torch.float64 but MultiheadAttention's weights are torch.float32"):
        m(torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="context is torch.float64"):
        m(torch.randn(2, 5, 16), torch.randn(2, 3, 16, dtype=torch.float64))
    assert m.double()(torch.randn(2, 5, 16, dtype=torch.float64)).dtype == torch.float64
