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


def test_alibi_slopes_are_the_published_ones_in_float64():
    # The reference implementation (Press et al.): start * start**i with start = 2**(-2**-(log2(n) - 3)).
    def published(n):
        def p2(m):
            start = 2 ** (-(2 ** -(math.log2(m) - 3)))
            return [start * start**i for i in range(m)]
        c = 2 ** math.floor(math.log2(n))
        return p2(c) + p2(2 * c)[0::2][: n - c]

    for n in (1, 2, 8, 12, 16, 24):
        got = S.alibi_slopes(n, torch.float64)
        assert torch.allclose(got, torch.tensor(published(n), dtype=torch.float64), rtol=1e-13, atol=0)
        assert torch.equal(S.alibi_slopes(n), torch.tensor(published(n), dtype=torch.float64).float())
    # float64 scores see float64 slopes
    score = torch.zeros(1, 12, 1, 2, dtype=torch.float64)
    h = torch.arange(12).view(1, -1, 1, 1)
    out = S.alibi(12)(score, None, h, torch.zeros(1, 1, 1, 1, dtype=torch.long),
                      torch.tensor([0, 1]).view(1, 1, 1, -1), 1, 2)
    assert torch.allclose(out[0, :, 0, 0], -torch.tensor(published(12), dtype=torch.float64), rtol=1e-13, atol=0)


def test_relative_bias_from_a_computed_table_keeps_its_graph():
    torch.manual_seed(0)
    mlp = torch.nn.Linear(1, 2)  # a dynamic position bias: table = mlp(bucket index)
    table = mlp(torch.arange(8.0)[:, None])  # [8 buckets, 2 heads], not a leaf
    mod = S.relative_bias(table, max_distance=16)
    assert mod.table is table and not list(mod.parameters())
    q, k, v = random_qkv(1, 2, 6, 8, seed=1)
    for engine in ("reference", "tiled"):
        mlp.zero_grad()
        attnkit.attention(q, k, v, score_mod=mod, engine=engine).square().sum().backward(retain_graph=True)
        assert mlp.weight.grad is not None and mlp.weight.grad.abs().sum() > 0, engine
        if engine == "reference":
            ref = mlp.weight.grad.clone()
        else:
            assert_close(mlp.weight.grad, ref)
    # a leaf table with requires_grad still becomes a trainable parameter
    leaf = torch.zeros(8, 2, requires_grad=True)
    assert list(S.relative_bias(leaf).parameters())[0] is not None
