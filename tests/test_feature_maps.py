"""Feature maps: the kernel identities and estimator properties each paper states."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from attnkit import feature_maps as fmaps
from attnkit.functional.linear import linear_attention
from attnkit.testing import random_qkv, relative_error


def _pairs(n: int = 64, d: int = 8, scale: float = 0.6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64) * scale
    y = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64) * scale
    return x, y


def _kernel(fm, x, y):
    """phi(x_i) . phi(y_i) for paired rows."""
    px, py = fm(x, y)
    return (px * py).sum(-1)


def _softmax_out(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("name", sorted(fmaps.FEATURE_MAPS))
def test_feature_dim_and_state_bytes(name):
    d = 6
    fm = fmaps.get(name, head_dim=d) if name in ("rebased", "hedgehog") else fmaps.get(name)
    x, y = _pairs(5, d)
    px, py = fm.float()(x.float(), y.float())
    m = fm.feature_dim(d)
    assert px.shape[-1] == py.shape[-1] == m
    assert fm.state_bytes(d, 10) == m * 11 * 4
    assert fm.state_bytes(d, 10, torch.float16) == m * 11 * 2
    if fm.nonnegative:  # the kernel, not each feature: Taylor and ReBased have signed features
        assert (px @ py.transpose(-1, -2) >= 0).all()


@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
@pytest.mark.parametrize("compact", [True, False])
def test_taylor_kernel_identity(scale, compact):
    x, y = _pairs(32, 7, scale=1.0)
    fm = fmaps.TaylorFeatureMap(scale=scale, compact=compact)
    s = (x * y).sum(-1) * (7**-0.5 if scale is None else scale)
    torch.testing.assert_close(_kernel(fm, x, y), 1 + s + s**2 / 2)
    assert fm.feature_dim(16) == (153 if compact else 273)  # Based's 1 + d' + d'^2 = 273 at d' = 16


@pytest.mark.parametrize("name", ["favor", "trig", "dijiang"])
def test_random_features_unbiased(name):
    """Averaged over many independent draws the estimate equals exp(q.k / sqrt(d)) (Performer, Lemma 1).

    The bound is statistical: the mean of 400 independent draws must lie within 5 standard errors of the exact
    kernel, entry by entry. A biased map (a missing ``-|x|^2/2`` or a wrong ``d^-1/4``) is off by a factor
    ``exp(|x'|^2/2)`` ~ 1.1-1.3 here, tens of standard errors."""
    d = 4
    x, y = _pairs(16, d, scale=0.5, seed=1)
    exact = torch.exp((x * y).sum(-1) / math.sqrt(d))
    raw = {} if name == "trig" else {"stabilize": False}  # the kernel itself, not its stabilised scale
    draws = torch.stack([_kernel(fmaps.get(name, num_features=32, seed=s, **raw).double(), x, y)
                         for s in range(400)])
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - exact).abs() < 5 * stderr).all(), ((draws.mean(0) - exact) / stderr)


@pytest.mark.parametrize("name", ["favor", "trig", "dijiang"])
def test_error_against_softmax_falls_with_features(name):
    q, k, v = random_qkv(1, 2, 48, dim=8, dtype=torch.float64, seed=2)
    q, k = q * 0.5, k * 0.5
    exact = _softmax_out(q, k, v)
    errs = []
    for m in (8, 64, 512):
        e = [relative_error(linear_attention(q, k, v, feature_map=fmaps.get(name, num_features=m, seed=s)), exact)
             for s in range(4)]
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < errs[0] / 3, errs  # ~ m^-1/2: a factor 8 fewer errors over 64x features


def test_orthogonal_features_have_lower_mse():
    d = 8
    x, y = _pairs(64, d, scale=0.6, seed=3)
    exact = torch.exp((x * y).sum(-1) / math.sqrt(d))

    def mse(orth):
        return torch.stack([(_kernel(fmaps.FavorFeatureMap(num_features=d, seed=s, orthogonal=orth,
                                                           stabilize=False).double(), x, y)
                             - exact) ** 2 for s in range(60)]).mean()

    assert mse(True) < mse(False)


def test_favor_redraw_and_determinism():
    x, y = _pairs(4, 8)
    a = fmaps.FavorFeatureMap(num_features=16, seed=5).double()
    b = fmaps.FavorFeatureMap(num_features=16, seed=5).double()
    torch.testing.assert_close(a(x, y)[0], b(x, y)[0])
    w0 = a.weight.clone()
    a.redraw()
    assert not torch.equal(w0, a.weight)
    c = fmaps.FavorFeatureMap(num_features=16, seed=5, redraw_interval=2).double().train()
    for _ in range(2):
        c(x, y)
    w1 = c.weight.clone()
    c(x, y)  # third call in training mode redraws
    assert not torch.equal(w1, c.weight)


@pytest.mark.parametrize("name", ["favor", "dijiang"])
def test_favor_stabilizer_cancels_when_normalised(name):
    q, k, v = random_qkv(1, 2, 16, dim=8, dtype=torch.float64, seed=4)
    for causal in (False, True):
        plain = linear_attention(q, k, v, causal=causal,
                                 feature_map=fmaps.get(name, num_features=32, seed=1, stabilize=False))
        stab = linear_attention(q, k, v, causal=causal, feature_map=fmaps.get(name, num_features=32, seed=1))
        torch.testing.assert_close(plain, stab)
    # normalize="none": a map built by name is the unshifted kernel; a stabilised instance is refused
    raw = linear_attention(q, k, v, feature_map=name, normalize="none")
    torch.testing.assert_close(raw, linear_attention(q, k, v, normalize="none",
                                                     feature_map=fmaps.get(name, stabilize=False)))
    for normalize in ("none", "rms"):
        with pytest.raises(ValueError, match="stabilize=False"):
            linear_attention(q, k, v, feature_map=fmaps.get(name), normalize=normalize)


@pytest.mark.parametrize("name", ["favor", "dijiang"])
def test_positive_random_features_do_not_collapse_at_large_scale(name):
    """q, k x 10: unstabilised, every feature underflows (or the denominator falls under eps) and the output is
    0. Stabilised (the Performer's shifts), the float32 output is the estimator's own value: its error against
    exact softmax equals that of the same features summed in float64 (d = 16: also unshifted with no eps, where
    that still fits), i.e. the estimator's usual error at these logits, not a collapse. Causal rows that see
    only keys ~e^-87 below the largest may still underflow in float32: then a warning says so."""
    for d in (16, 64):
        q, k, v = random_qkv(1, 2, 40, dim=d, dtype=torch.float64, seed=7)
        q, k = q * 10, k * 10
        for causal in (False, True):
            exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            fm = fmaps.get(name, num_features=256, seed=3)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out32 = linear_attention(q.float(), k.float(), v.float(), feature_map=fm, causal=causal)
            out64 = linear_attention(q, k, v, feature_map=fm, causal=causal)
            assert torch.isfinite(out32).all() and (out32.abs().amax(-1) > 0).float().mean() > 0.8, (d, causal)
            zero_rows = bool((out32.abs().amax(-1) == 0).any())
            assert zero_rows == any("underflowed" in str(w.message) for w in caught), (d, causal)
            if not causal:
                torch.testing.assert_close(out32.double(), out64, rtol=1e-3, atol=1e-3)
            err, usual = relative_error(out32.double(), exact), relative_error(out64, exact)
            assert err < 1.05 * usual, (d, causal, err, usual)
            raw = fmaps.get(name, num_features=256, seed=3, stabilize=False)
            plain = linear_attention(q.float(), k.float(), v.float(), feature_map=raw, causal=causal)
            assert plain.abs().amax() < 1e-3  # the collapse this guards against
            if d == 16:
                unshifted = linear_attention(q, k, v, feature_map=raw, causal=causal, eps=1e-300)
                torch.testing.assert_close(out64, unshifted)


def test_stabilised_state_carries_its_key_shift():
    """A state summed with one key shift continues correctly with later keys of a much larger scale (the shift
    grows, the state is rescaled), in chunked, recurrent and parallel mode, and equals one call."""
    q, k, v = random_qkv(1, 2, 24, dim=16, kv_heads=1, dtype=torch.float64, seed=8)
    k = k * torch.linspace(0.5, 12, 24, dtype=torch.float64)[:, None]  # later keys far larger
    q = q * 6
    fm = fmaps.get("favor", num_features=64, seed=1)
    whole = linear_attention(q, k, v, feature_map=fm, causal=True)
    assert whole.abs().amax() > 0.3
    for mode in ("chunked", "recurrent", "parallel"):
        st, outs = None, []
        for a, b in ((0, 5), (5, 6), (6, 17), (17, 24)):
            o, st = linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], feature_map=fm, causal=True,
                                     mode=mode, chunk_size=4, state=st, return_state=True)
            outs.append(o)
        assert st.key_shift.shape == (1, 2) and st.feature_map == "favor"
        torch.testing.assert_close(torch.cat(outs, 2), whole)
    with pytest.raises(ValueError, match="cannot be continued with feature map 'dijiang'"):
        linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], causal=True, state=st,
                         feature_map=fmaps.get("dijiang", num_features=64))
    with pytest.raises(ValueError, match="cannot be continued with feature map 'elu'"):
        linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], causal=True, state=st, feature_map="elu")


def test_cosformer_equals_quadratic_definition():
    """A_ij = relu(q_i).relu(k_j) cos(pi (i - j) / 2M), normalised (cosFormer eq. 9), written out directly."""
    q, k, v = random_qkv(1, 2, 13, dim=4, dtype=torch.float64, seed=5)
    M = 20
    out = linear_attention(q, k, v, feature_map=fmaps.CosformerFeatureMap(max_len=M), causal=True)
    i = torch.arange(13, dtype=torch.float64)
    w = torch.cos(math.pi * (i[:, None] - i[None, :]) / (2 * M)).tril()
    a = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * w
    den = a.sum(-1, keepdim=True)
    assert (den == 0).any()  # a row whose relu features all vanish: the documented result is zeros, not NaN
    torch.testing.assert_close(out, torch.where(den > 0, (a @ v) / den, 0.0))
    assert (w >= 0).all() and bool((w.diagonal() == w.max()).all())  # weights peak at i == j


def test_focused_keeps_norm_and_p1_is_relu():
    x, y = _pairs(10, 6, scale=1.0)
    fm = fmaps.FocusedFeatureMap(p=3.0, eps=0.0)
    px, _ = fm(x, y)
    torch.testing.assert_close(px.norm(dim=-1), F.relu(x).norm(dim=-1))
    q, k, v = random_qkv(1, 1, 9, dim=6, dtype=torch.float64, seed=6)
    torch.testing.assert_close(linear_attention(q, k, v, feature_map=fmaps.FocusedFeatureMap(p=1.0, eps=0.0)),
                               linear_attention(q, k, v, feature_map="relu"))


def test_rebased_kernel_is_squared_affine_dot():
    d = 5
    fm = fmaps.RebasedFeatureMap(d).double()
    with torch.no_grad():
        fm.gamma_q.uniform_(0.5, 1.5)
        fm.beta_q.uniform_(-0.3, 0.3)
    x, y = _pairs(12, d, scale=1.0)
    xt = F.layer_norm(x, (d,), eps=fm.eps) * fm.gamma_q + fm.beta_q
    yt = F.layer_norm(y, (d,), eps=fm.eps) * fm.gamma_k + fm.beta_k
    torch.testing.assert_close(_kernel(fm, x, y), (xt * yt).sum(-1) ** 2)


def test_hedgehog_distillation_loss_decreases():
    torch.manual_seed(0)
    q, k, _ = random_qkv(2, 2, 24, dim=8, seed=7)
    fm = fmaps.HedgehogFeatureMap(8, num_heads=2)
    opt = torch.optim.Adam(fm.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = fmaps.hedgehog_distillation_loss(fm, q, k, causal=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # cross-entropy is bounded below by the teacher's entropy: what distillation removes is the excess (the KL)
    logits = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~torch.ones(24, 24, dtype=torch.bool).tril(), -math.inf)
    teacher = torch.softmax(logits, -1)
    entropy = -(teacher * torch.log(teacher.clamp_min(1e-12))).sum(-1).mean().item()
    assert losses[-1] - entropy < 0.5 * (losses[0] - entropy), (entropy, losses)


def test_cosine_scale_invariance_and_bounded_weights():
    q, k, v = random_qkv(1, 2, 10, dim=4, dtype=torch.float64, seed=8)
    out = linear_attention(q, k, v, feature_map="cosine", normalize="none", causal=True)
    out2 = linear_attention(q * 3.0, k * 0.2, v, feature_map="cosine", normalize="none", causal=True)
    torch.testing.assert_close(out, out2)
    px, py = fmaps.CosineFeatureMap()(q, k)
    assert (px @ py.transpose(-1, -2)).abs().max() <= 1 + 1e-12


def test_lln_shifts_cancel():
    q, k, v = random_qkv(1, 2, 16, dim=4, dtype=torch.float64, seed=9)
    a = linear_attention(q, k, v, feature_map=fmaps.LogNormalFeatureMap(stabilize=True))
    b = linear_attention(q, k, v, feature_map=fmaps.LogNormalFeatureMap(stabilize=False))
    torch.testing.assert_close(a, b)
    alpha, beta = fmaps.LogNormalFeatureMap().temperatures(q, k)
    sq, sk = q.std(dim=(-2, -1), keepdim=True), k.std(dim=(-2, -1), keepdim=True)
    st = ((sq**2 * sk**2 + 0.3549) / (2 * 0.1486)).sqrt()
    torch.testing.assert_close(alpha, st / sq)
    torch.testing.assert_close(beta, st / sk)


def test_dijiang_dct_is_orthonormal():
    c = fmaps._dct_matrix(12)
    torch.testing.assert_close(c @ c.T, torch.eye(12, dtype=torch.float64))


def test_get_errors():
    with pytest.raises(ValueError, match="unknown feature map"):
        fmaps.get("nope")
    with pytest.raises(ValueError, match="head_dim"):
        fmaps.FavorFeatureMap(head_dim=4)(torch.randn(1, 1, 2, 5), torch.randn(1, 1, 2, 5))
    with pytest.raises(ValueError, match="params cannot be given"):
        fmaps.get(fmaps.EluFeatureMap(), p=2)


def test_trig_features_that_would_overflow_are_a_clear_error():
    """Issue 28: trig_rf returned NaN without a word at 5x unit-scale inputs (amplitude exp(|x|^2 / (2 sqrt(d)))
    overflows); now a ValueError that names the cause, and a NaN input still propagates."""
    q, k, v = random_qkv(1, 2, 12, dim=8, seed=3)
    fm = fmaps.get("trig", num_features=32)
    assert torch.isfinite(linear_attention(q, k, v, feature_map=fm, normalize="rms")).all()
    for scale in (5.0, 100.0):
        with pytest.raises(ValueError, match="trig random features overflow"):
            linear_attention(q * scale, k * scale, v, feature_map=fm, normalize="rms")
    k_nan = k.clone()
    k_nan[0, 0, 3, 0] = float("nan")
    assert torch.isnan(linear_attention(q, k_nan, v, feature_map=fm, normalize="rms")).any()
