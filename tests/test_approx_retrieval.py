"""Issue 17: the shared key index, IceFormer, RetrievalAttention, SEA and their decode step (catalogue E13-E15)."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnkit
import attnkit.nn
from attnkit.bench.workloads import make_inputs
from attnkit.ops.approx import knn
from attnkit.ops.approx.error import exact_softmax
from attnkit.ops.approx.knn import KeyIndex, faiss_available, mips_augment, topk_recall
from attnkit.ops.approx.retrieval import (
    RetrievalDecoder,
    attend_selected,
    iceformer_attention,
    iceformer_reference,
    retrieval_attention,
    retrieval_reference,
    sea_attention,
    sea_reference,
)
from attnkit.testing import assert_close

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed (attnkit[retrieval])")
APPROX_INDEXES = ["ivf", "graph", pytest.param("faiss", marks=needs_faiss)]


def qkv(n=36, nk=None, b=2, h=2, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h, nk, d, generator=g, dtype=dtype),
            torch.randn(b, h, nk, d, generator=g, dtype=dtype))


def clustered(n, h=2, d=32, seed=0):
    return make_inputs("clustered", (1, h, n, d), torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the index
def test_mips_augmentation_preserves_the_inner_product_ranking():
    q, k, _ = qkv(n=5, nk=50, b=1, h=1)
    m = float(k.norm(dim=-1).max())
    ka = mips_augment(k, m)
    qa = torch.nn.functional.pad(q, (0, 1))
    by_ip = (q @ k.transpose(-1, -2)).argsort(-1, descending=True)
    by_dist = torch.cdist(qa, ka).argsort(-1)
    assert torch.equal(by_ip, by_dist)
    with pytest.raises(ValueError, match="max_norm"):
        mips_augment(k, m / 2)


def test_exact_index_is_incremental_and_matches_topk():
    q, k, _ = qkv(n=7, nk=40)
    ix = KeyIndex("exact").add(k[:, :, :13]).add(k[:, :, 13:])
    assert len(ix) == 40
    got = ix.search(q, 5)
    want = (q @ k.transpose(-1, -2)).topk(5, dim=-1).indices
    assert torch.equal(got, want)
    # more than it holds: padded with -1
    small = KeyIndex("exact").add(k[:, :, :3]).search(q, 5)
    assert (small[..., 3:] == -1).all() and (small[..., :3] >= 0).all()


@pytest.mark.parametrize("kind", APPROX_INDEXES)
def test_approximate_index_recall_on_clustered_keys(kind):
    q, k, _ = clustered(4096 + 16)
    cache, queries = k[:, :, :4096], q[:, :, 4096:]
    true = KeyIndex("exact").add(cache).search(queries, 32)
    params = {"num_probes": 16} if kind == "ivf" else {}
    # built in two parts: incremental adds (ivf: the second part waits in the exact tail)
    ix = KeyIndex(kind, **params).add(cache[:, :, :3000]).add(cache[:, :, 3000:])
    assert topk_recall(ix.search(queries, 32), true) >= 0.9


def _ood(n=2048, m_train=512, m_test=64, d=32):
    """Keys and queries from different distributions (opposite mean directions, different spreads), as the
    queries and keys of an LLM's head are (RetrievalAttention, Sec. 2)."""
    mu = torch.randn(d, generator=torch.Generator().manual_seed(0))
    mu = mu / mu.norm()
    shift = torch.randn(d, generator=torch.Generator().manual_seed(5))
    keys = torch.randn(1, 2, n, d, generator=torch.Generator().manual_seed(1)) + 3 * mu

    def queries(m, seed):
        return torch.randn(1, 2, m, d, generator=torch.Generator().manual_seed(seed)) * 0.7 - 3 * mu + shift

    return keys, queries(m_train, 2), queries(m_test, 3)


def test_attention_aware_graph_index_beats_a_key_only_index_on_out_of_distribution_queries():
    # Issue 25 (E15): RetrievalAttention builds its index from the prefill's queries (their nearest keys,
    # projected onto a key graph), because an index built from keys alone serves OOD queries poorly. Same graph
    # budget (degree, beam width): only the training queries differ.
    keys, train, test = _ood()
    true = KeyIndex("exact").add(keys).search(test, 10)
    key_only = KeyIndex("graph", ef_search=32).add(keys)
    aware = KeyIndex("graph", ef_search=32).add(keys, queries=train)
    r_key, r_aware = topk_recall(key_only.search(test, 10), true), topk_recall(aware.search(test, 10), true)
    assert r_aware >= 0.9 and r_aware > r_key + 0.3
    # a beam as wide as the index visits every reachable key: exact
    full = KeyIndex("graph", ef_search=2048).add(keys, queries=train)
    assert topk_recall(full.search(test, 10), true) == 1.0
    # the decoder passes the prompt's queries to the index
    dec = RetrievalDecoder("retrieval", top_k=10, num_sink=0, window=1, index="graph", ef_search=32)
    dec.prefill(keys, keys, q=train)
    assert topk_recall(dec.retrieve(test), true) >= 0.9


def test_ivf_tail_merges_into_lists():
    q, k, _ = clustered(600)
    ix = KeyIndex("ivf", tail_limit=64, num_probes=1000).add(k[:, :, :300])
    for start in range(300, 600, 50):  # a decoder appending keys: the tail merges every 64
        ix.add(k[:, :, start:start + 50])
    assert len(ix) == 600 and len(ix._tail) < 2
    # probing every list is exact
    assert torch.equal(ix.search(q[:, :, :9], 7), KeyIndex("exact").add(k).search(q[:, :, :9], 7))


def test_auto_index_announces_the_fallback(monkeypatch):
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="faiss is not installed"):
        ix = KeyIndex("auto")
    assert ix.kind == "ivf"
    with pytest.raises(ImportError, match="faiss-cpu"):
        KeyIndex("faiss")


def test_index_bad_arguments():
    with pytest.raises(ValueError, match="index kind"):
        KeyIndex("annoy")
    with pytest.raises(ValueError, match="num_probes"):
        KeyIndex("ivf", num_probes=0)
    ix = KeyIndex("exact").add(torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="groups"):
        ix.search(torch.randn(1, 3, 1, 4), 2)


@needs_faiss
def test_faiss_keys_longer_than_the_augmentation_go_to_the_exact_side_list():
    q, k, _ = qkv(n=3, nk=60, b=1, h=1, dtype=torch.float32)
    ix = KeyIndex("faiss", metric="l2_augmented").add(k[:, :, :50])
    long = k[:, :, 50:] * 10  # beyond M: cannot be augmented
    ix.add(long)
    allk = torch.cat([k[:, :, :50], long], dim=2)
    want = (q @ allk.transpose(-1, -2)).topk(4, dim=-1).indices
    assert torch.equal(ix.search(q, 4).sort(-1).values, want.sort(-1).values)


# ------------------------------------------------------------------------------------- the mechanisms
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 37])
def test_fast_paths_match_references(causal, n):
    q, k, v = qkv(n=n)
    for fn, ref, kw in [(iceformer_attention, iceformer_reference, dict(top_k=7)),
                        (retrieval_attention, retrieval_reference, dict(top_k=5, num_sink=2, window=3)),
                        (sea_attention, sea_reference, dict(num_blocks=6, top_k=2))]:
        assert_close(fn(q, k, v, causal=causal, chunk_size=8, **kw), ref(q, k, v, causal=causal, **kw))


@pytest.mark.parametrize("causal", [False, True])
def test_all_keys_selected_is_exact_attention(causal):
    q, k, v = qkv(n=29)
    want = exact_softmax(q, k, v, causal=causal)
    assert_close(iceformer_attention(q, k, v, top_k=29, causal=causal), want)
    assert_close(retrieval_attention(q, k, v, top_k=29, num_sink=3, window=4, causal=causal), want)
    assert_close(sea_attention(q, k, v, num_blocks=5, top_k=5, causal=causal), want)


def test_top_k_one_picks_the_largest_inner_product():
    q, k, v = qkv(n=6, nk=20)
    out = iceformer_attention(q, k, v, top_k=1)
    best = (q @ k.transpose(-1, -2)).argmax(-1)
    assert_close(out, v.gather(2, best[..., None].expand(-1, -1, -1, v.shape[-1])))


@pytest.mark.parametrize("kind", APPROX_INDEXES)
@pytest.mark.parametrize("causal", [False, True])
def test_index_backends_agree_with_exact_selection_on_separated_data(kind, causal):
    # Well-separated synthetic data: the retrieved set equals the exact top-k (catalogue E14 test 3).
    q, k, v = clustered(300, d=16)
    q, k, v = q.double(), k.double(), v.double()
    params = {"num_probes": 64} if kind == "ivf" else {"ef_search": 300}
    for fn, kw in [(iceformer_attention, dict(top_k=6)), (retrieval_attention, dict(top_k=6, num_sink=2, window=5))]:
        got = fn(q, k, v, causal=causal, index=kind, index_params=params, chunk_size=64, **kw)
        assert_close(got, fn(q, k, v, causal=causal, index="exact", **kw))


def test_lse_merge_of_static_and_retrieved_equals_attention_over_the_union():
    q, k, v = qkv(n=4, nk=30)
    scale = 16 ** -0.5
    a = torch.tensor([0, 1, 2, 28, 29]).expand(2, 2, 4, -1)
    b = torch.tensor([5, 9, 17]).expand(2, 2, 4, -1)
    union = torch.cat([a, b], dim=-1)
    o1, l1 = attend_selected(q, k, v, a, torch.ones_like(a, dtype=torch.bool), scale)
    o2, l2 = attend_selected(q, k, v, b, torch.ones_like(b, dtype=torch.bool), scale)
    from attnkit.ops.approx._common import merge_lse

    merged, lse = merge_lse(o1, l1, o2, l2)
    o, lse_u = attend_selected(q, k, v, union, torch.ones_like(union, dtype=torch.bool), scale)
    assert_close(merged, o)
    assert_close(lse, lse_u)


def test_retrieval_static_set_is_always_attended():
    q, k, v = qkv(n=20)
    w = retrieval_reference(q, k, v, top_k=2, num_sink=3, window=4, causal=True, return_attention=True)[1]
    i = torch.arange(20)[:, None]
    j = torch.arange(20)[None, :]
    static = ((j < 3) | ((j > i - 4) & (j <= i))) & (j <= i)
    assert (w[..., static] > 0).all()
    assert ((w > 0).sum(-1) <= static.sum(-1) + 2).all()


def test_sea_mask_is_causal_and_block_shaped():
    q, k, v = qkv(n=24)
    w = sea_reference(q, k, v, num_blocks=6, top_k=2, causal=True, return_attention=True)[1]
    assert (w.triu(1) == 0).all()
    # each query attends at most its own block plus 2 complete earlier blocks of 4 keys
    assert ((w > 0).sum(-1) <= 3 * 4).all()


def test_sea_error_decreases_with_top_k():
    q, k, v = clustered(256, d=32)
    errs = [attnkit.approximation_error("sea", q, k, v, num_blocks=32, top_k=t).output_relative for t in (2, 8, 32)]
    assert errs[0] >= errs[1] >= errs[2] and errs[2] < 1e-5


def _topic_batch(seed, b=2, n=64, d=16, blocks=8):
    """Keys in blocks that each carry one topic of a fixed bank (a head's consistent subspace); each query looks
    for one topic: the teacher's attention is concentrated on the blocks of that topic."""
    bank = torch.randn(12, d, generator=torch.Generator().manual_seed(12345))
    g = torch.Generator().manual_seed(seed)
    topics = bank[torch.randint(0, 12, (b, 1, blocks), generator=g)]
    k = topics.repeat_interleave(n // blocks, 2) + 0.5 * torch.randn(b, 1, n, d, generator=g)
    pick = torch.randint(0, blocks, (b, 1, n, 1), generator=g).expand(-1, -1, -1, d)
    q = 2.0 * topics.gather(2, pick) + 0.5 * torch.randn(b, 1, n, d, generator=g)
    return q, k, torch.randn(b, 1, n, d, generator=g)


@pytest.mark.parametrize("causal", [False, True])
def test_sea_distilled_estimator_beats_the_untrained_one(causal):
    # Issue 25 (E13): SEA trains its estimator by distillation from the teacher's attention. A few steps of
    # sea_distillation_step on a synthetic task must beat the untrained (FAVOR+) estimate it starts from, on
    # held-out inputs: lower KL to the teacher's block attention, more teacher mass in the selected blocks, and a
    # smaller output error of the sparse attention.
    from attnkit.ops.approx import SEAEstimator, sea_distillation_loss, sea_distillation_step, sea_teacher_blocks
    from attnkit.ops.approx.retrieval import sea_block_estimate

    blocks, top = 8, 2
    torch.manual_seed(0)
    est = SEAEstimator(16, num_features=8, seed=0)
    q, k, v = _topic_batch(100)
    with torch.no_grad():
        assert torch.equal(est(q, k, blocks), sea_block_estimate(q, k, blocks, num_features=8, seed=0))

    def scores():
        with torch.no_grad():
            loss = float(sea_distillation_loss(est, q, k, num_blocks=blocks, causal=causal))
        out = sea_attention(q, k, v, num_blocks=blocks, top_k=top, causal=causal, estimator=est)
        return loss, float((out - exact).norm() / exact.norm())

    exact = exact_softmax(q, k, v, causal=causal)
    loss0, err0 = scores()
    opt = torch.optim.Adam(est.parameters(), lr=0.05)
    for step in range(60):
        qq, kk, _ = _topic_batch(step)
        sea_distillation_step(est, opt, qq, kk, num_blocks=blocks, causal=causal)
    loss1, err1 = scores()
    assert loss1 < 0.6 * loss0 and err1 < 0.7 * err0
    if not causal:
        teacher = sea_teacher_blocks(q, k, blocks)
        with torch.no_grad():
            mass = [float(teacher.gather(-1, e.topk(top, -1).indices).sum(-1).mean())
                    for e in (sea_block_estimate(q, k, blocks, num_features=8), est(q, k, blocks))]
        assert mass[1] > mass[0] + 0.1
    # the selection with the estimator is the reference's
    assert_close(sea_attention(q, k, v, num_blocks=blocks, top_k=top, causal=causal, estimator=est, chunk_size=16),
                 sea_reference(q, k, v, num_blocks=blocks, top_k=top, causal=causal, estimator=est))


def test_iceformer_error_decreases_with_top_k_on_clustered_inputs():
    q, k, v = clustered(256, d=32)
    errs = [attnkit.approximation_error("iceformer", q, k, v, top_k=t, index="exact").output_relative
            for t in (4, 32, 256)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def test_bad_arguments_are_clear():
    q, k, v = qkv(n=8)
    with pytest.raises(ValueError, match="top_k"):
        iceformer_attention(q, k, v, top_k=0)
    with pytest.raises(ValueError, match="index"):
        iceformer_attention(q, k, v, index="hnsw")
    with pytest.raises(ValueError, match="window"):
        retrieval_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="num_blocks"):
        sea_attention(q, k, v, num_blocks=0)


# --------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("method", ["iceformer", "retrieval"])
def test_decoder_steps_equal_the_batched_causal_pass(method):
    q, k, v = qkv(n=40, b=1)
    kw = dict(top_k=5) if method == "iceformer" else dict(top_k=5, num_sink=2, window=6)
    fn = iceformer_attention if method == "iceformer" else retrieval_attention
    want = fn(q, k, v, causal=True, **kw)
    dec = RetrievalDecoder(method, index="exact", **kw).prefill(k[:, :, :10], v[:, :, :10])
    outs = [dec.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(10, 40)]
    assert_close(torch.cat(outs, dim=2), want[:, :, 10:])
    assert dec.length == 40


@pytest.mark.parametrize("kind", APPROX_INDEXES)
def test_decoder_with_an_approximate_index_recalls_the_top_k(kind):
    q, k, v = clustered(3000 + 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit kind never warns
        dec = RetrievalDecoder("retrieval", top_k=16, num_sink=4, window=32, index=kind)
    dec.prefill(k[:, :, :3000], v[:, :, :3000])
    recalls = []
    for s in range(8):
        qq = q[:, :, 3000 + s:3001 + s]
        dec.step(qq, k[:, :, 3000 + s:3001 + s], v[:, :, 3000 + s:3001 + s])
        keys = k[:, :, :dec.length]
        true = (qq @ keys.transpose(-1, -2)).topk(16, dim=-1).indices
        got = torch.cat([dec.retrieve(qq), dec.static_positions().expand(1, 2, 1, -1)], dim=-1)
        recalls.append(topk_recall(got, true))
    assert sum(recalls) / len(recalls) >= 0.9


def test_decoder_bad_input():
    with pytest.raises(ValueError, match="method"):
        RetrievalDecoder("lsh")
    dec = RetrievalDecoder("iceformer", index="exact")
    with pytest.raises(ValueError, match="empty"):
        dec.step(torch.randn(1, 2, 1, 4))
    dec.prefill(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="q must be"):
        dec.step(torch.randn(1, 3, 1, 4))


def test_multihead_attention_runs_iceformer():
    mha = attnkit.nn.MultiheadAttention(32, 4, mechanism="iceformer", causal=True)
    x = torch.randn(2, 20, 32)
    out = mha(x)
    assert out.shape == x.shape


@needs_faiss
def test_faiss_augmented_metric_finds_the_exact_top_k_on_separated_data():
    q, k, _ = clustered(500, d=16)
    true = KeyIndex("exact").add(k).search(q[:, :, :20], 5)
    ix = KeyIndex("faiss", metric="l2_augmented", ef_search=200).add(k)
    assert topk_recall(ix.search(q[:, :, :20], 5), true) >= 0.98
    with pytest.raises(ValueError, match="metric"):
        KeyIndex("faiss", metric="cosine")


def test_loki_decoder_reuses_the_index_in_its_low_rank_space():
    from attnkit.ops.approx import loki_attention, pca_basis

    q, k, v = qkv(n=30, b=1)
    basis = pca_basis(qkv(n=64, b=1, seed=5)[1])[0]  # calibrated on other keys, [heads, d, d]
    want = loki_attention(q, k, v, top_k=6, rank=4, basis=basis, causal=True)
    dec = RetrievalDecoder("loki", top_k=6, index="exact", basis=basis, rank=4)
    dec.prefill(k[:, :, :8], v[:, :, :8])
    outs = [dec.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(8, 30)]
    assert_close(torch.cat(outs, dim=2), want[:, :, 8:])
    with pytest.raises(ValueError, match="basis"):
        RetrievalDecoder("loki")


# one query, few lists: the probed keys are gathered; more queries or lists: one masked matmul
@pytest.mark.parametrize("probes,queries", [(2, 1), (2, 5), (31, 1)])
def test_ivf_search_is_the_exact_top_k_of_the_probed_lists(probes, queries):
    q, k, _ = clustered(1024 + queries, d=16)
    keys, queries = k[:, :, :1024], q[:, :, 1024:]
    ix = KeyIndex("ivf", num_lists=32, num_probes=probes).add(keys)
    got = ix.search(queries, 10).flatten(0, 1)
    c = ix._centroids
    x = keys.flatten(0, 1).float()
    assign = knn._nearest(x, c)  # [G, n]
    lists = (queries.flatten(0, 1) @ c.transpose(-1, -2)).topk(probes, dim=-1).indices  # [G, m, P]
    probed = (assign[:, None, :, None] == lists[:, :, None, :]).any(-1)  # [G, m, n]
    s = (queries.flatten(0, 1) @ x.transpose(-1, -2)).masked_fill(~probed, float("-inf"))
    want = s.topk(10, dim=-1).indices
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


# ------------------------------------------------------------------------------------------- non-finite keys
@pytest.mark.parametrize("kind", ["exact", "ivf", pytest.param("faiss", marks=needs_faiss)])
@pytest.mark.parametrize("incremental", [False, True])
def test_index_skips_non_finite_keys_and_still_finds_the_finite_ones(kind, incremental):
    """Issue 28: with 10 NaN keys out of 200 the exact and IVF indexes returned -1 for every slot (recall 0 for
    the 190 finite keys). Non-finite keys are skipped: never returned, and the finite top-k is found as if
    they were absent (an inf component counts as non-finite too)."""
    g = torch.Generator().manual_seed(0)
    k, q = torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
    bad = torch.randperm(200, generator=g)[:10]
    keep = torch.ones(200, dtype=torch.bool)
    keep[bad] = False
    k_bad = k.clone()
    k_bad[:, :, bad, 3] = float("nan")
    k_bad[0, 1, bad[0], 0] = float("inf")
    true = torch.nonzero(keep).flatten()[KeyIndex("exact").add(k[:, :, keep]).search(q, 8)]
    index = KeyIndex(kind, num_probes=64, tail_limit=1000)
    if incremental:  # ivf: the second half waits in the exactly scanned tail
        index.add(k_bad[:, :, :100]).add(k_bad[:, :, 100:])
    else:
        index.add(k_bad)
    found = index.search(q, 8)
    assert not torch.isin(found, bad).any(), "a non-finite key was returned"
    assert (found >= 0).all()
    assert topk_recall(found, true) >= (1.0 if kind != "faiss" else 0.9)
    q_nan = q.clone()
    q_nan[0, 0, 0, 0] = float("nan")
    assert (index.search(q_nan, 8)[0, 0, 0] == -1).all()  # a NaN query finds nothing


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["iceformer", "retrieval_attention", "sea", "sparsek", "yoso"])
def test_a_non_finite_key_propagates_like_dense_attention(name, causal):
    """Issue 28: with one NaN key iceformer and retrieval_attention returned a finite output computed without
    retrieval (and sea, sparsek, yoso without that key). Now NaN in exactly the rows dense softmax attention
    makes NaN: every row (j <= i when causal), also for a NaN value or query; other rows unchanged."""
    from attnkit.ops.approx import sparsek, yoso

    fns = {"iceformer": lambda *a, **kw: iceformer_attention(*a, top_k=4, **kw),
           "retrieval_attention": lambda *a, **kw: retrieval_attention(*a, top_k=4, num_sink=1, window=2, **kw),
           "sea": lambda *a, **kw: sea_attention(*a, num_blocks=4, top_k=2, **kw),
           "sparsek": lambda *a, **kw: sparsek.sparsek_attention(*a, top_k=4, score_weight=torch.ones(2, 8) / 8, **kw),
           "yoso": lambda *a, **kw: yoso.yoso_attention(*a, **kw)}
    fn = fns[name]
    q, k, v = qkv(n=16, d=8, dtype=torch.float32, seed=5)
    clean = fn(q, k, v, causal=causal)
    dense_k = k.clone()
    dense_k[0, 1, 9, 2] = float("nan")
    expected = torch.isnan(torch.nn.functional.scaled_dot_product_attention(q, dense_k, v, is_causal=causal))
    for which in ("k", "v"):
        ins = [q, k.clone(), v.clone()]
        ins[1 if which == "k" else 2][0, 1, 9, 2] = float("nan")
        out = fn(*ins, causal=causal)
        nan_rows = torch.isnan(out).any(-1)
        assert torch.equal(nan_rows, expected.any(-1)), f"{name}: NaN {which} does not propagate as dense attention"
        assert_close(out[~nan_rows], clean[~nan_rows], dtype=torch.float32)
    q_nan = q.clone()
    q_nan[1, 0, 3, 0] = float("nan")
    out = fn(q_nan, k, v, causal=causal)
    assert torch.isnan(out[1, 0, 3]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("method", ["iceformer", "retrieval"])
def test_decoder_propagates_a_non_finite_key_like_dense_attention(method):
    """The decoder's index skips a NaN key; every later step's output is NaN (a dense decoder's would be), also
    once the key has left RetrievalAttention's window; other heads are unaffected."""
    q, k, v = qkv(n=40, d=8, dtype=torch.float32, seed=9)
    k_bad = k.clone()
    k_bad[0, 1, 10, 3] = float("nan")
    dec = RetrievalDecoder(method, top_k=4, num_sink=1, window=4, index="exact").prefill(k_bad[:, :, :30],
                                                                                      v[:, :, :30])
    clean = RetrievalDecoder(method, top_k=4, num_sink=1, window=4, index="exact").prefill(k[:, :, :30], v[:, :, :30])
    for t in range(30, 34):
        out = dec.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        ref = clean.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert torch.isnan(out[0, 1]).all()
        keep = torch.ones(2, 2, dtype=torch.bool)
        keep[0, 1] = False
        assert_close(out[keep], ref[keep], dtype=torch.float32)
