"""Bird-Eye attention (C11; "Bird-Eye Transformers for Text Generation Models", Sha et al., 2022), with the rule
taken from the authors' code (github.com/shalei120/fairseq-1, fairseq/modules/multihead_attention.py, BET):
second-pass logits ``beta_j q_i . k_j / sqrt(d)``, ``beta_j = sigmoid(w . [k_j ; o_j] + c)`` from the first pass's
output (mixed by the output projection), each token's own key masked except token 0's."""

import math

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.nn.exact import BirdEyeAttention
from attnkit.testing import assert_close, random_qkv


def _loops(module, q, k, v):
    """The repository's computation, token by token in float64 (MHA, first_proj the identity)."""
    b, h, n, d = q.shape
    w, c = module.gate.weight[0].double(), module.gate.bias[0].double()
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            first = []
            for i in range(n):
                js = range(i + 1) if module.causal else range(n)
                s = torch.stack([q[bi, hi, i] @ k[bi, hi, j] / math.sqrt(d) for j in js])
                first.append(sum(p * v[bi, hi, j] for p, j in zip(torch.softmax(s, 0), js)))
            beta = [torch.sigmoid(w @ torch.cat([k[bi, hi, j], first[j]]) + c) for j in range(n)]
            for i in range(n):
                js = [j for j in (range(i + 1) if module.causal else range(n)) if j != i or i == 0]
                s = torch.stack([beta[j] * (q[bi, hi, i] @ k[bi, hi, j]) / math.sqrt(d) for j in js])
                out[bi, hi, i] = sum(p * v[bi, hi, j] for p, j in zip(torch.softmax(s, 0), js))
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_bird_eye_equals_the_repository_rule_token_by_token(causal):
    torch.manual_seed(0)
    m = BirdEyeAttention(2, 4, causal=causal).double()
    with torch.no_grad():
        m.gate.weight.normal_()
        m.gate.bias.fill_(0.3)
    q, k, v = random_qkv(2, 2, 7, dim=4, dtype=torch.float64, seed=3)
    want = _loops(m, q, k, v)
    assert_close(m(q, k, v), want)
    assert_close(m.reference(q, k, v), want)


def test_bird_eye_fast_path_gradients_match_the_reference_with_gqa_and_a_trained_projection():
    torch.manual_seed(1)
    m = BirdEyeAttention(4, 8, causal=True).double()
    with torch.no_grad():
        m.gate.weight.normal_()
        m.first_proj.weight.add_(0.1 * torch.randn_like(m.first_proj.weight))
    q, k, v = random_qkv(2, 4, 12, dim=8, kv_heads=2, dtype=torch.float64, seed=2, requires_grad=True)
    out, ref = m(q, k, v), m.reference(q, k, v)
    assert_close(out, ref)
    g = torch.randn_like(out)
    params = [q, k, v, m.gate.weight, m.first_proj.weight]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_bird_eye_masks_each_tokens_own_key_and_without_reweighting_is_causal_attention():
    m = BirdEyeAttention(2, 4, causal=True).double()
    q, k, v = random_qkv(1, 2, 6, dim=4, dtype=torch.float64, seed=4)
    # token 0 sees only itself; token 1 only token 0 (its own key is masked)
    out = m(q, k, v)
    assert_close(out[:, :, 0], v[:, :, 0])
    assert_close(out[:, :, 1], v[:, :, 0])
    # beta = 1 (a saturated gate) and no diagonal mask: plain causal attention
    plain = BirdEyeAttention(2, 4, causal=True, exclude_self=False).double()
    with torch.no_grad():
        plain.gate.weight.zero_()
        plain.gate.bias.fill_(60.0)
    assert_close(plain(q, k, v), attnkit.attention(q, k, v, pattern=P.causal(), engine="reference"))


def test_bird_eye_errors():
    m = BirdEyeAttention(2, 4)
    q, k, v = random_qkv(1, 2, 4, kv_len=6, dim=4)
    with pytest.raises(ValueError, match="q_len must equal kv_len"):
        m(q, k, v)
    q, k, v = random_qkv(1, 3, 4, dim=4)
    with pytest.raises(ValueError, match="num_heads=2"):
        m(q, k, v)
