"""attnkit.analysis: each diagnostic against a hand-computed case, capture against the reference engine."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import analysis as A
from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit.nn import MultiheadAttention
from attnkit.normalizations import resolve
from attnkit.ops.exact.reference import attention_weights as reference_weights
from attnkit.ops.exact.weights import attention_lse, attention_weights
from attnkit.testing import assert_close, random_qkv


def _stochastic(b, h, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, n, n, generator=g, dtype=torch.float64), dim=-1)


# -- public attention weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [None, P.causal(), P.sliding_window(5) | P.global_tokens([0]),
                                     P.causal() & P.block_local(4)])
@pytest.mark.parametrize("block_q", [1, 7, 256])
def test_attention_weights_match_reference(pattern, block_q):
    q, k, _ = random_qkv(2, 4, 19, 23, 8, kv_heads=2, dtype=torch.float64)
    mod = S.alibi(4)
    got = attention_weights(q, k, pattern=pattern, score_mod=mod, block_q=block_q)
    ref = reference_weights(q, k, pattern=pattern, score_mod=mod, normalization=resolve("softmax"),
                            scale=8 ** -0.5)
    assert_close(got, ref)
    rows = [0, 5, 18]
    assert_close(attention_weights(q, k, pattern=pattern, score_mod=mod, queries=rows), ref[:, :, rows])


def test_attention_weights_reproduce_attention_output_and_lse():
    q, k, v = random_qkv(1, 2, 33, 33, 16, dtype=torch.float64)
    pat = P.causal() & P.sliding_window(8)
    w = attention_weights(q, k, pattern=pat)
    assert_close(w @ v, attnkit.attention(q, k, v, pattern=pat))
    s = (q @ k.transpose(-1, -2)) * 16 ** -0.5
    s = s.masked_fill(~pat.materialize(33, 33), float("-inf"))
    assert_close(attention_lse(q, k, pattern=pat, block_q=5), torch.logsumexp(s, -1))


def test_attention_weights_masked_rows_are_zero_and_bad_input():
    q, k, _ = random_qkv(1, 1, 4, 4, 8)
    w = attention_weights(q, k, pattern=P.custom(lambda b, h, qi, ki: (qi > 0) & (ki >= 0)))
    assert torch.equal(w[0, 0, 0], torch.zeros(4)) and torch.isfinite(w).all()
    with pytest.raises(ValueError, match="block_q"):
        attention_weights(q, k, block_q=0)
    with pytest.raises(ValueError, match="queries"):
        attention_weights(q, k, queries=[7])


# -- capture -------------------------------------------------------------------------------------------------
def _two_layer(mechanism="softmax", **kw):
    torch.manual_seed(0)
    return torch.nn.Sequential(MultiheadAttention(32, 4, mechanism=mechanism, **kw),
                               MultiheadAttention(32, 4, mechanism=mechanism, **kw))


def test_capture_softmax_layers_gives_exact_probabilities_and_filters():
    model = _two_layer(causal=True)
    x = torch.randn(2, 12, 32)
    with A.capture(model) as cap:
        y = model(x)
    assert [r.layer for r in cap.records] == ["0", "1"] and all(r.kind == "probabilities" for r in cap.records)
    w0 = cap.records[0].weights
    assert w0.shape == (2, 4, 12, 12)
    assert torch.allclose(w0.sum(-1), torch.ones(2, 4, 12))
    assert torch.equal(w0.triu(1), torch.zeros_like(w0))  # causal
    with A.capture(model, layers=["1"], heads=[1, 3], queries=[0, 11]) as cap2:
        y2 = model(x)
    assert len(cap2.records) == 1 and cap2.records[0].weights.shape == (2, 2, 2, 12)
    assert torch.equal(cap2.records[0].weights[:, 0], cap.records[1].weights[:, 1][:, [0, 11]])
    assert torch.equal(y, y2)  # recording does not change the output
    with A.capture(model, max_bytes=16), pytest.raises(MemoryError, match="max_bytes"):
        model(x)


@pytest.mark.parametrize("mechanism", ["linear_elu", "nystrom", "sliding_window"])
def test_capture_probes_other_mechanisms(mechanism):
    kw = {"mechanism_kwargs": {"num_landmarks": 4}} if mechanism == "nystrom" else {}
    layer = MultiheadAttention(32, 4, mechanism=mechanism, **kw)
    x = torch.randn(1, 16, 32)
    with A.capture(layer) as cap:
        layer(x)
    (rec,) = cap.records
    assert rec.kind == "probe" and rec.weights.shape == (1, 4, 16, 16)
    if mechanism == "linear_elu":  # the normalised kernel weights phi(q) phi(k)^T / row sums
        q = layer._split(layer.q_proj(x), 4)
        k = layer._split(layer.k_proj(x), 4)
        fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        a = fq @ fk.transpose(-1, -2)
        assert_close(rec.weights, a / a.sum(-1, keepdim=True), scale=10)


def test_capture_torch_multihead_attention():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    model = torch.nn.Sequential()
    model.add_module("attn", mha)
    x = torch.randn(3, 5, 16)
    with A.capture(model) as cap:
        mha(x, x, x)
    assert cap.records[0].weights.shape == (3, 2, 5, 5) and cap.records[0].layer == "attn"


def test_capture_with_grad_gives_attention_gradients():
    model = _two_layer()
    x = torch.randn(1, 6, 32)
    ref = model(x)
    with A.capture(model, grad=True) as cap:
        y = model(x)
    assert_close(y, ref, scale=5)
    y[0, 0, 0].backward()
    grads = cap.gradients()
    assert all(g is not None and g.shape == (1, 4, 6, 6) for g in grads)


# -- rollout and flow ----------------------------------------------------------------------------------------
def test_rollout_of_identity_is_identity_and_rows_sum_to_one():
    eye = torch.eye(5).expand(1, 2, 5, 5)
    assert_close(A.rollout([eye, eye, eye]), torch.eye(5, dtype=torch.float64).unsqueeze(0))
    a = _stochastic(2, 3, 6)
    r = A.rollout([a, _stochastic(2, 3, 6, seed=1)])
    assert_close(r.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    one = A.rollout([a])
    assert_close(one, 0.5 * a.mean(1) + 0.5 * torch.eye(6, dtype=torch.float64))


def test_flow_never_exceeds_the_min_cut_of_a_two_layer_toy_graph():
    # Two tokens, two layers, no residual: capacities are the attention entries themselves.
    a1 = torch.tensor([[[[0.9, 0.1], [0.2, 0.8]]]], dtype=torch.float64)
    a2 = torch.tensor([[[[0.3, 0.7], [0.6, 0.4]]]], dtype=torch.float64)
    flow = A.attention_flow([a1, a2], residual=0.0)
    # input j -> output i: paths j -> m -> i with capacities a1[m, j] and a2[i, m]; the min cut of two parallel
    # paths is the sum over m of min(a1[m, j], a2[i, m]).
    for i in range(2):
        for j in range(2):
            cut = sum(min(float(a1[0, 0, m, j]), float(a2[0, 0, i, m])) for m in range(2))
            assert float(flow[i, j]) == pytest.approx(cut)
    # and never more than the rollout bottleneck (each edge capacity <= 1): flows into a node are <= 1
    big = A.attention_flow([_stochastic(1, 2, 4), _stochastic(1, 2, 4, 1)], outputs=[0])
    assert (big <= 1 + 1e-9).all() and (big >= 0).all()


# -- relevance -----------------------------------------------------------------------------------------------
def test_relevance_with_zero_gradients_is_identity():
    a = [_stochastic(1, 2, 5), _stochastic(1, 2, 5, 1)]
    r = A.relevance(a, [torch.zeros_like(x) for x in a])
    assert_close(r, torch.eye(5, dtype=torch.float64).unsqueeze(0))


def test_relevance_differs_between_target_classes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MultiheadAttention(16, 2), MultiheadAttention(16, 2))
    head = torch.nn.Linear(16, 3)
    x = torch.randn(1, 6, 16)
    maps = []
    for target in (0, 1):
        with A.capture(model, grad=True) as cap:
            logits = head(model(x)[:, 0])
        logits[0, target].backward()
        maps.append(A.relevance(cap.weights(), cap.gradients()))
        model.zero_grad()
    assert maps[0].shape == (1, 6, 6) and not torch.allclose(maps[0], maps[1])


# -- entropy, distance, head statistics ----------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 64])
def test_entropy_of_uniform_attention_is_log_n(n):
    a = torch.full((1, 2, 3, n), 1.0 / n)
    assert_close(A.entropy(a), torch.full((1, 2, 3), math.log(n), dtype=torch.float64), dtype=torch.float32)
    assert_close(A.head_entropy(a), torch.full((2,), math.log(n), dtype=torch.float64), dtype=torch.float32)
    one_hot = torch.zeros(1, 1, 2, n)
    one_hot[..., 0] = 1
    assert torch.equal(A.entropy(one_hot), torch.zeros(1, 1, 2, dtype=torch.float64))
    rand = _stochastic(1, 2, n)
    assert (A.entropy(rand) <= math.log(n) + 1e-12).all() and (A.entropy(rand) >= 0).all()


def test_offset_head_scores_one_for_a_fixed_offset_head():
    n = 10
    a = torch.zeros(1, 2, n, n)
    for i in range(n):
        a[0, 0, i, max(i - 1, 0)] = 1  # previous token (row 0 has no previous: it stays on 0)
        a[0, 1, i, i] = 1
    score, delta = A.offset_head_score(a)
    assert score[0] == pytest.approx((n - 1) / n) and int(delta[0]) == -1
    assert float(score[1]) == 0.0
    assert float(A.offset_attention(a, -1)[0]) == 1.0


def test_attention_distance_of_uniform_head_is_average_pairwise_distance():
    grid = A.grid_positions((3, 4))
    n = grid.shape[0]
    a = torch.full((1, 1, n, n), 1.0 / n)
    expected = torch.cdist(grid, grid).mean()
    assert float(A.attention_distance(a, grid)[0]) == pytest.approx(float(expected))


def test_distance_histogram_sums_to_query_rows():
    a = _stochastic(2, 3, 9)
    hist, edges = A.distance_histogram(a, bins=4)
    assert hist.shape == (3, 4) and edges.shape == (5,)
    assert_close(hist.sum(-1), torch.full((3,), 2.0 * 9, dtype=torch.float64))


def test_head_distances_are_symmetric_zero_on_the_diagonal_and_cluster():
    a = torch.cat([_stochastic(1, 1, 8), _stochastic(1, 1, 8), _stochastic(1, 1, 8, 5)], dim=1)
    a[:, 1] = a[:, 0]
    d = A.head_distances(a)
    assert torch.allclose(d, d.T) and torch.allclose(d.diagonal(), torch.zeros(3, dtype=torch.float64))
    assert float(d[0, 1]) == pytest.approx(0.0, abs=1e-7) and float(d[0, 2]) > 0
    labels = A.cluster_heads(d, 2)
    assert labels[0] == labels[1] != labels[2]


def test_special_token_attention():
    a = torch.zeros(1, 1, 3, 4)
    a[..., 0] = 0.25
    a[..., 1] = 0.75
    mask = torch.tensor([[True, False, False, False]])
    assert float(A.special_token_attention(a, mask)[0]) == pytest.approx(0.25)


# -- rank collapse -------------------------------------------------------------------------------------------
def test_residual_of_rank_one_matrix_is_zero():
    x = torch.ones(7, 1) @ torch.randn(1, 5)
    assert float(A.relative_residual(x)) == pytest.approx(0.0, abs=1e-12)


def test_pure_attention_collapses_rank_and_skip_connections_stop_it():
    torch.manual_seed(0)
    layers = [MultiheadAttention(32, 4) for _ in range(6)]
    x = torch.randn(2, 24, 32)
    pure = A.rank_collapse_curve(layers, x)
    skip = A.rank_collapse_curve(layers, x, skip=True)
    assert (pure[-1] < 1e-3 * pure[0]).all()  # doubly exponential contraction: tiny within a few layers
    assert (pure[1:] <= pure[:-1] + 1e-9).all()  # monotone: each layer contracts
    assert (skip[-1] > 0.3 * skip[0]).all()


def test_layer_inputs_and_joint_embedding_invariances():
    model = _two_layer()
    x = torch.randn(1, 5, 32)
    seen = A.layer_inputs(model, x)
    assert torch.equal(seen["0"], x) and seen["1"].shape == x.shape
    q, k = torch.randn(10, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    u = torch.randn(8, dtype=torch.float64)
    # AttentionViz: translating keys and (c, 1/c) scaling leave softmax attention unchanged
    assert_close(torch.softmax(q @ (k + u).T, -1), torch.softmax(q @ k.T, -1))
    assert_close((2 * q) @ (k / 2).T, q @ k.T)
    q2, k2 = A.joint_qk_embedding(q, k)
    assert q2.shape == (10, 2) and k2.shape == (12, 2)


# -- head masking --------------------------------------------------------------------------------------------
def test_masking_a_head_with_zero_output_weight_changes_nothing():
    layer = MultiheadAttention(32, 4)
    with torch.no_grad():
        layer.out_proj.weight[:, 8:16] = 0  # head 1's output columns
    x = torch.randn(2, 7, 32)
    base = layer(x)
    with A.ablate_heads(layer, {layer: [1]}):
        assert torch.equal(layer(x), base)
    with A.ablate_heads(layer, {layer: [0]}):
        assert not torch.allclose(layer(x), base)
    with A.ablate_heads(layer, {layer: [0, 1, 2, 3]}):  # every head: only the out_proj bias (none) is left
        assert torch.equal(layer(x), torch.zeros_like(base))


def test_head_importance_measures_loss_change():
    model = _two_layer()
    x = torch.randn(2, 6, 32)
    target = torch.randn(2, 6, 32)
    imp = A.head_importance(model, lambda m: (m(x) - target).square().mean(), progress=False)
    assert set(imp) == {"0", "1"} and imp["0"].shape == (4,) and imp["0"].abs().sum() > 0
    with pytest.raises(ValueError, match="no attnkit"):
        A.ablate_heads(model, {"nope": [0]}).__enter__()


# -- report --------------------------------------------------------------------------------------------------
def test_analyze_writes_a_report(tmp_path):
    from attnkit.analysis.report import analyze

    model = torch.nn.Sequential(MultiheadAttention(32, 4, causal=True),
                                MultiheadAttention(32, 4, mechanism="linear_elu", causal=True))
    x = torch.randn(2, 12, 32)
    summary = analyze(model, (x,), tmp_path, loss_fn=lambda m: m(x).square().mean(), progress=False)
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()
    assert {p.rsplit("/", 1)[-1] for p in summary["paths"]["plots"]} == {
        "attention_maps.png", "heads.png", "rollout.png", "rank_collapse.png"}
    assert len(summary["layers"]) == 2 and len(summary["rank_collapse"]) == 3
    assert "entropy per head" in (tmp_path / "report.md").read_text()


def test_analyze_cli_on_quality_checkpoints(tmp_path):
    from attnkit.cli import main

    ck = tmp_path / "ck"
    assert main(["quality", "--mechanisms", "softmax,linear:elu", "--steps", "3", "--lr", "0.01", "--seq-len", "32",
                 "--save", str(ck), "--out", str(tmp_path / "q"), "--no-progress", "--no-plots"]) == 0
    out = tmp_path / "an"
    assert main(["analyze", str(ck), "--out", str(out), "--batch", "2", "--no-progress"]) == 0
    for name in ("mqar--softmax", "mqar--linear_elu"):
        text = (out / name / "report.md").read_text()
        assert "blocks.0.mixer" in text and "Head importance" in text
        assert (out / name / "rollout.png").exists()
    with pytest.raises(SystemExit):
        main(["analyze", str(tmp_path / "missing.pt")])
