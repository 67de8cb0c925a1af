"""H2: Chefer et al.'s LRP-based relevance ("Transformer Interpretability Beyond Attention Visualization"): the
propagation rules, conservation through a tiny model, and the map's invariants."""

from __future__ import annotations

import pytest
import torch

from attnkit import analysis as A
from attnkit.testing import assert_close


def test_lrp_linear_is_the_alpha_one_rule_by_hand():
    x = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, -1.0], [2.0, -1.0, 0.5]], dtype=torch.float64)
    r = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    got = A.lrp_linear(x, w, r)
    # positive contributions z_ij = x_j w_ij where x_j w_ij > 0: out 0: (1*1)=1 only; out 1: 2, 2, 1.5
    want = torch.tensor([[1.0 * 1 + 0.5 * 2 / 5.5, 0.5 * 2 / 5.5, 0.5 * 1.5 / 5.5]], dtype=torch.float64)
    assert_close(got, want, dtype=torch.float32)
    assert float(got.sum()) == pytest.approx(1.5, abs=1e-6)  # conserved
    # alpha 2, beta 1: output 0 has negative contributions (x_1 w_01 = -2, x_2 w_02 = -3), which take relevance
    # away (2 * 1 - 1 * 1); output 1 has none, so it hands out 2 * 0.5
    beta = A.lrp_linear(x, w, r, alpha=2.0)
    want_beta = torch.tensor([[2.0 + 1.0 * 2 / 5.5, -1.0 * 2 / 5 + 1.0 * 2 / 5.5, -1.0 * 3 / 5 + 1.0 * 1.5 / 5.5]],
                             dtype=torch.float64)
    assert_close(beta, want_beta, dtype=torch.float32)


def test_lrp_add_and_product_conserve_relevance():
    g = torch.Generator().manual_seed(0)
    u, v, r = (torch.randn(2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ru, rv = A.lrp_add(u, v, r)
    assert_close(ru.sum((1, 2)) + rv.sum((1, 2)), r.sum((1, 2)))
    # normalisation (Eq. 10): the shares are proportional to |sum R_u| and |sum R_v| before rescaling
    a = torch.softmax(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), -1)
    vv = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    rr = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    ra, rvv = A.lrp_product("bhij,bhjd->bhid", a, vv, rr)
    assert_close(ra.sum() + rvv.sum(), rr.sum(), dtype=torch.float32)
    assert_close(ra.sum(), rr.sum() / 2, dtype=torch.float32)


def _model_and_input(seed=0):
    torch.manual_seed(seed)
    model = A.LRPClassifier(dim=16, num_heads=2, depth=3, num_classes=4).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    return model, x


def test_relevance_is_conserved_through_every_block():
    """Catalogue H2 test 3: with alpha = 1 and the normalised skip rule, the total relevance entering each block
    (and reaching the input) equals the one-hot target's."""
    model, x = _model_and_input()
    out = model.explain(x, 1)
    for total in out["block_totals"]:
        assert_close(total, torch.ones(2, dtype=torch.float64), dtype=torch.float32)
    assert_close(out["input_relevance"].sum((1, 2)), torch.ones(2, dtype=torch.float64), dtype=torch.float32)
    assert out["map"].shape == (2, 7, 7)
    for g, r in zip(out["gradients"], out["relevances"]):
        assert g.shape == r.shape == (2, 2, 7, 7)


def test_zero_gradients_give_identity_and_classes_give_different_maps():
    model, x = _model_and_input(1)
    out = model.explain(x, 0)
    eye = A.lrp_relevance([torch.zeros_like(g) for g in out["gradients"]], out["relevances"])
    assert_close(eye, torch.eye(7, dtype=torch.float64).expand(2, 7, 7))
    other = model.explain(x, 3)
    assert not torch.allclose(out["map"], other["map"])
    assert not torch.allclose(out["relevances"][-1], other["relevances"][-1])


def test_the_papers_rule_differs_from_the_follow_ups_gradient_times_attention():
    model, x = _model_and_input(2)
    out = model.explain(x, 2)
    attn = [k["attn"].detach() for k in model._keep]
    follow_up = A.relevance(attn, out["gradients"])  # R <- R + E_h[(grad A * A)^+] R
    lrp_map = out["map"]
    assert (lrp_map - follow_up).abs().amax() > 1e-4
    # the same product structure with A in place of R_A reproduces the follow-up rule exactly
    assert_close(A.lrp_relevance(out["gradients"], attn), follow_up)


def test_start_layer_and_errors():
    model, x = _model_and_input(3)
    out = model.explain(x, 0, start_layer=2)
    last = A.lrp_relevance(out["gradients"][2:], out["relevances"][2:])
    assert_close(out["map"], last)
    with pytest.raises(ValueError, match="start_layer"):
        A.lrp_relevance(out["gradients"], out["relevances"], start_layer=3)
    with pytest.raises(ValueError, match="one gradient per relevance"):
        A.lrp_relevance(out["gradients"][:1], out["relevances"])
    with pytest.raises(ValueError, match="batch, n, dim"):
        model(torch.randn(7, 16, dtype=torch.float64))
