import math

import pytest
import torch

import attnkit
from attnkit import score_mods as S
from attnkit.testing import assert_close, random_qkv


def test_alibi_slopes_follow_the_paper():
    assert_close(S.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head sequence, then odd terms of the 16-head sequence.
    s12 = S.alibi_slopes(12)
    assert_close(s12[:8], S.alibi_slopes(8))
    assert_close(s12[8:], torch.tensor([2.0 ** -(0.5 + i) for i in range(4)]))


def test_alibi_bias_is_minus_slope_times_distance():
    q = torch.zeros(1, 2, 4, 8)
    k, v = torch.randn(1, 2, 4, 8), torch.eye(4).expand(1, 2, 4, 4)
    out = attnkit.attention(q, k, v, score_mod=S.alibi(2), engine="reference")  # out = weights (v = I)
    i, j = torch.arange(4).view(-1, 1), torch.arange(4).view(1, -1)
    for h, m in enumerate(S.alibi_slopes(2)):
        want = torch.softmax(-m * (i - j).abs().float(), dim=-1)
        assert_close(out[0, h], want)


def test_kerple_definitions():
    score = torch.zeros(1, 2, 3, 3)
    h = torch.arange(2).view(1, -1, 1, 1)
    qi, ki = torch.arange(3).view(1, 1, -1, 1), torch.arange(3).view(1, 1, 1, -1)
    d = (qi - ki).abs().float()
    log = S.kerple_log(2, r1=torch.tensor([1.0, 2.0]), r2=torch.tensor([0.5, 3.0]))
    want = -torch.tensor([1.0, 2.0]).view(1, 2, 1, 1) * torch.log1p(torch.tensor([0.5, 3.0]).view(1, 2, 1, 1) * d)
    assert_close(log(score, None, h, qi, ki, 3, 3), want)
    power = S.kerple_power(2, r1=1.5, r2=1.2)
    assert_close(power(score, None, h, qi, ki, 3, 3), -1.5 * d.pow(1.2).expand(1, 2, 3, 3))
    with pytest.raises(ValueError, match="positive"):
        S.kerple_log(2, r1=-1.0)


def test_t5_buckets_are_exact_near_and_logarithmic_far():
    d = torch.arange(-200, 201)
    b = S.t5_buckets(d, 32, 128, bidirectional=True)
    assert b.min() >= 0 and b.max() < 32
    assert len(set(b[(d.abs() < 8)].tolist())) == 15  # exact buckets for |d| < 8 (both sides, shared 0)
    assert (b[d >= 0].diff() <= 0).all() or (b[d >= 0].diff() >= 0).all()  # monotone in distance


def test_softcap_bounds_logits():
    s = torch.linspace(-100, 100, 11)
    out = S.softcap(5.0)(s, None, None, None, None, 1, 1)
    assert out.abs().max() <= 5.0 and torch.allclose(out[5], torch.tensor(0.0))
    assert_close(out, 5.0 * torch.tanh(s / 5.0))


def test_custom_mod_with_declared_params_gets_gradients_through_tiled_engine():
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    mod = S.custom(lambda s, b, h, qi, ki: s + bias[h], params=[bias])
    q, k, v = random_qkv(1, 4, 20, 20, 8, dtype=torch.float64)
    for engine in ("tiled", "reference"):
        out = attnkit.attention(q, k, v, score_mod=mod, engine=engine, normalization="sigmoid")
        (g,) = torch.autograd.grad(out.sum(), bias)
        assert g.abs().sum() > 0
    # A per-head constant shifts sigmoid scores: compare with the explicit bias.
    with torch.no_grad():
        bias.fill_(math.log(2))
    out = attnkit.attention(q, k, v, score_mod=mod, engine="tiled", normalization="sigmoid")
    ref = attnkit.attention(q, k, v, engine="reference", normalization=attnkit.normalizations.sigmoid(
        bias=math.log(2) - math.log(20)))
    assert_close(out, ref)
