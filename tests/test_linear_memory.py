"""Test-time-training layers (TTT-Linear / TTT-MLP) and retention: forms agree, the papers' invariants."""

from __future__ import annotations

import pytest
import torch

from attnkit.ops.linear.gated import delta_rule_attention
from attnkit.ops.linear.ttt import ttt, ttt_reference
from attnkit.testing import assert_close, random_qkv

F64 = torch.float64


def _qkv_eta(n=21, seed=0, heads=3):
    q, k, v = (t * 0.5 for t in random_qkv(2, heads, n, dim=8, dim_v=6, dtype=F64, seed=seed))
    eta = 0.1 * torch.rand(2, heads, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return q, k, v, eta


@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("mini_batch", [1, 4, 16, 40])
def test_ttt_dual_and_primal_equal_the_autograd_inner_loop(model, mini_batch):
    q, k, v, eta = _qkv_eta()
    ref = ttt_reference(q, k, v, eta, model=model, mini_batch=mini_batch)
    for form in ("dual", "primal"):
        assert_close(ttt(q, k, v, eta, model=model, mini_batch=mini_batch, form=form), ref, msg=form)


def test_ttt_linear_online_is_the_delta_rule():
    """Mini-batch 1: W_t = W_{t-1} - 2 eta k (k^T W - v)^T is the delta rule with beta = 2 eta."""
    q, k, v, eta = _qkv_eta(seed=2)
    assert_close(ttt(q, k, v, eta, mini_batch=1), delta_rule_attention(q, k, v, 2 * eta))


def test_ttt_linear_full_batch_one_step_is_linear_attention():
    """D23 test 1: a linear inner model, one full-batch step from W_0 = 0, is 2 eta (Q K^T) V."""
    q, k, v, _ = _qkv_eta(seed=3)
    assert_close(ttt(q, k, v, 0.3, causal=False), 0.6 * (q @ k.transpose(-1, -2)) @ v)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_ttt_state_carries_across_calls_at_mini_batch_boundaries(model):
    q, k, v, eta = _qkv_eta(n=24, seed=4)
    full, w_full = ttt(q, k, v, eta, model=model, mini_batch=8, return_state=True)
    a, w = ttt(q[:, :, :16], k[:, :, :16], v[:, :, :16], eta[:, :, :16], model=model, mini_batch=8,
               return_state=True)
    b, w2 = ttt(q[:, :, 16:], k[:, :, 16:], v[:, :, 16:], eta[:, :, 16:], model=model, mini_batch=8,
                initial_state=w, return_state=True)
    assert_close(torch.cat([a, b], dim=2), full)
    for x, y in zip(w2, w_full):
        assert_close(x, y)


def test_ttt_gradients_and_bad_input():
    q, k, v, eta = (t.requires_grad_(True) for t in _qkv_eta(n=6, seed=5))
    assert torch.autograd.gradcheck(lambda q, k, v, e: ttt(q, k, v, e, model="mlp", mini_batch=4),
                                    (q, k, v, eta))
    with pytest.raises(ValueError, match="model"):
        ttt(q, k, v, eta, model="rnn")
    with pytest.raises(ValueError, match="eta"):
        ttt(q, k, v, eta[..., :2])
    with pytest.raises(ValueError, match="mini_batch"):
        ttt(q, k, v, eta, mini_batch=0)


@pytest.mark.parametrize("causal", [True, False])
def test_retention_parallel_recurrent_chunked_agree(causal):
    """RetNet's dual form: the parallel, recurrent and chunked forms of one layer are the same function."""
    from attnkit.nn import RetentionLayer
    from attnkit.nn.linear import retention_reference

    x = torch.randn(2, 37, 32, dtype=F64, generator=torch.Generator().manual_seed(6))
    outs = []
    for mode in ("parallel", "chunked", "recurrent"):
        torch.manual_seed(0)
        layer = RetentionLayer(32, 4, mode=mode, causal=causal, chunk_size=8).double()
        outs.append(layer(x))
    for o in outs[1:]:
        assert_close(o, outs[0])
    assert_close(outs[0], retention_reference(layer, x))


def test_retention_state_carry_and_unit_decay():
    from attnkit.nn import RetentionLayer

    x = torch.randn(1, 30, 16, dtype=F64, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    layer = RetentionLayer(16, 2, chunk_size=8).double()
    full = layer(x)
    a, s = layer(x[:, :20], return_state=True)
    b, _ = layer(x[:, 20:], state=s, return_state=True)
    assert_close(torch.cat([a, b], dim=1), full)
    # D20 test 2: gamma = 1 is unnormalised causal linear attention (identity map)
    from attnkit import linear_attention

    layer1 = RetentionLayer(16, 2, decays=[1.0, 1.0]).double()
    q, k, v = (layer1._heads(t) for t in layer1.qkv(x).chunk(3, dim=-1))
    assert_close(layer1.retention(q, k, v), linear_attention(q, k * 8**-0.5, v, causal=True,
                                                             feature_map="identity", normalize="none"))
