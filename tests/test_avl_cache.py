"""A-VL (G15; Zhang et al., "A-VL: Adaptive Attention for Large Vision-Language Models", AAAI 2025): the rule of the
paper's method as implemented in the authors' repository (core / secondary / minor image caches with periodic core
updates; H2O-like text eviction by quantile-centred accumulated attention). A plain simulator written here (python
sets, one loop per token, position-indexed, float64) replays the rule; at every decoding step the cache must hold
what it holds and its output must equal dense attention over the full keys under the positions computed with."""

import math

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.ops.longctx import avl_text_keep, avl_text_scores, avl_vision_tiers
from attnkit.selective_cache import AdaptiveVLCache
from attnkit.testing import assert_close, random_qkv


def _weights(q, k, mask):
    """Softmax weights ``[h, m]`` of one query ``q [h, d]`` over keys ``k [h, m, d]`` under ``mask [h, m]``."""
    s = (q.unsqueeze(1) * k).sum(-1) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1)


def _simulate(q, k, v, start, end, n_prompt, drop, comp, interval, text_rate, text_init=1):
    """The A-VL rule for batch row 0, head-for-head (kv heads == heads): returns per decoding step the set of
    positions computed with and the set held after the step, and the outputs ``[steps, h, d]``."""
    h, total = q.shape[1], q.shape[2]
    q, k, v = q[0], k[0], v[0]
    n_img = end - start
    n_sec, n_core = int((1 - drop) * n_img), int((1 - comp) * n_img)
    # prefill weights (causal), per head
    w = torch.zeros(h, n_prompt, n_prompt, dtype=q.dtype)
    for i in range(n_prompt):
        w[:, i, :i + 1] = _weights(q[:, i], k[:, :i + 1], torch.ones(h, i + 1, dtype=torch.bool))
    last = w[:, -1].mean(0)
    ranked = sorted(range(start, end), key=lambda j: (-float(last[j]), j))
    secondary = set(ranked[:n_sec])
    core = set(ranked[:min(n_core, n_sec)])
    held = [set(range(start)) | secondary | set(range(end, n_prompt)) for _ in range(h)]
    score = [dict() for _ in range(h)]

    def evict(hi, seen):
        text = sorted(j for j in held[hi] if j >= end)
        budget = max(round((1 - text_rate) * (seen - end)), text_init)
        if len(text) <= budget:
            return
        recent = budget // 2
        keep = set(text[len(text) - recent:])
        rest = sorted(text[:len(text) - recent], key=lambda j: (-score[hi][j], j))
        keep |= set(rest[:budget - recent])
        held[hi] -= set(text) - keep

    if text_rate is not None:
        for hi in range(h):
            for i in range(end, n_prompt):  # prefill rows of the text block: quantile over the earlier text columns
                score[hi][i] = float(w[hi, i, i])
                if i > end:
                    row = w[hi, i, end:i]
                    qv = float(torch.quantile(row, text_rate))
                    for j in range(end, i):
                        score[hi][j] += float(w[hi, i, j]) - qv
            evict(hi, n_prompt)
    steps, outs = [], []
    for t, p in enumerate(range(n_prompt, total), start=1):
        for hi in range(h):
            held[hi].add(p)
        update = interval is None or t % interval == 0
        computed = [{j for j in held[hi] if update or not start <= j < end or j in core} for hi in range(h)]
        mask = torch.zeros(h, p + 1, dtype=torch.bool)
        for hi in range(h):
            mask[hi, sorted(computed[hi])] = True
        wt = _weights(q[:, p], k[:, :p + 1], mask)  # [h, p + 1]
        outs.append((wt.unsqueeze(-1) * v[:, :p + 1]).sum(1))
        if interval is not None and update:
            img = sorted(j for j in held[0] if start <= j < end)
            mean = wt.mean(0)
            core = set(sorted(img, key=lambda j: (-float(mean[j]), j))[:min(n_core, n_sec)])
        if text_rate is not None:
            for hi in range(h):
                cols = sorted(j for j in held[hi] if j >= end)
                score[hi][p] = float(wt[hi, p])
                qv = float(torch.quantile(wt[hi, cols], text_rate))
                for j in cols[:-1]:
                    score[hi][j] += float(wt[hi, j]) - qv
                evict(hi, p + 1)
        steps.append(([set(c) for c in computed], [set(x) for x in held]))
    return steps, torch.stack(outs)


@pytest.mark.parametrize("interval,text_rate", [(3, 0.4), (None, 0.5), (2, None), (1, 0.3)])
def test_avl_cache_follows_the_rule_and_equals_dense_attention_at_every_step(interval, text_rate):
    n_prompt, steps, start, end = 26, 14, 3, 17
    q, k, v = random_qkv(1, 2, n_prompt + steps, dim=8, dtype=torch.float64, seed=5)
    vis = torch.zeros(1, n_prompt, dtype=torch.bool)
    vis[:, start:end] = True
    cache = AdaptiveVLCache(vis, drop_rate=0.5, compute_rate=0.75, interval=interval, text_rate=text_rate)
    out = cache.attend(q[:, :, :n_prompt], k[:, :, :n_prompt], v[:, :, :n_prompt])
    assert_close(out, attnkit.attention(q[:, :, :n_prompt], k[:, :, :n_prompt], v[:, :, :n_prompt], pattern=P.causal(),
                                        engine="reference"))
    want, want_out = _simulate(q, k, v, start, end, n_prompt, 0.5, 0.75, interval, text_rate)
    for t in range(steps):
        p = n_prompt + t
        o = cache.attend(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1])
        computed, held = want[t]
        got_c, got_h = cache.computed_mask()[0], cache.held_mask()[0]
        for hi in range(2):
            assert set(got_c[hi].nonzero().flatten().tolist()) == computed[hi], (t, hi)
            assert set(got_h[hi].nonzero().flatten().tolist()) == held[hi], (t, hi)
        assert_close(o[0, :, 0], want_out[t])
        mask = cache.computed_mask()
        dense = attnkit.attention(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1], engine="reference",
                                  pattern=P.custom(lambda bi, hi, qi, ki, m=mask: m[bi, hi, ki]))
        assert_close(o, dense)
    # the image tokens held: the secondary half; the text held: the budget
    held = cache.held_mask()[0, 0]
    assert int(held[start:end].sum()) == 7
    if text_rate is not None:
        assert int(held[end:].sum()) == max(round((1 - text_rate) * (n_prompt + steps - end)), 1)
    assert cache.held_bytes == int(cache.held_mask().sum()) * 2 * 8 * 8


def test_avl_cache_gqa_batches_and_without_compression_is_exact():
    n_prompt, steps = 20, 6
    q, k, v = random_qkv(2, 4, n_prompt + steps, dim=8, kv_heads=2, dtype=torch.float64, seed=1)
    vis = torch.zeros(2, n_prompt, dtype=torch.bool)
    vis[0, 2:12] = True
    vis[1, 5:9] = True
    exact = AdaptiveVLCache(vis, drop_rate=0.0, compute_rate=0.0, interval=2, text_rate=0.0)
    lossy = AdaptiveVLCache(vis, drop_rate=0.5, compute_rate=0.8, interval=2, text_rate=0.5)
    outs = [c.attend(q[:, :, :n_prompt], k[:, :, :n_prompt], v[:, :, :n_prompt]) for c in (exact, lossy)]
    for p in range(n_prompt, n_prompt + steps):
        outs = [c.attend(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1]) for c in (exact, lossy)]
        full = attnkit.attention(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1], engine="reference")
        assert_close(outs[0], full)
        mask = lossy.computed_mask()
        assert_close(outs[1], attnkit.attention(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1],
                                                engine="reference",
                                                pattern=P.custom(lambda bi, hi, qi, ki, m=mask: m[bi, hi // 2, ki])))
    assert exact.held_mask().all()
    assert lossy.held_mask()[0, :, 2:12].sum(-1).tolist() == [5, 5]
    assert lossy.held_mask()[1, :, 5:9].sum(-1).tolist() == [2, 2]
    assert lossy.held_bytes < exact.held_bytes


def test_avl_vision_tiers_counts_and_ranks():
    score = torch.tensor([9.0, 0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.05, 7.0])
    vis = torch.tensor([False, True, True, True, True, True, True, True, False])
    secondary, core = avl_vision_tiers(score, vis, drop_rate=0.5, compute_rate=0.8)
    # 7 image tokens: int(0.5 * 7) = 3 held (0.9, 0.8, 0.5), int(0.2 * 7) = 1 core (0.9); text never selected
    assert secondary.nonzero().flatten().tolist() == [2, 4, 6]
    assert core.nonzero().flatten().tolist() == [4]
    # a compute rate below the drop rate cannot make the core larger than the secondary cache
    secondary, core = avl_vision_tiers(score, vis, drop_rate=0.5, compute_rate=0.0)
    assert torch.equal(secondary, core)
    with pytest.raises(ValueError, match="drop_rate"):
        avl_vision_tiers(score, vis, drop_rate=1.5, compute_rate=0.5)


def test_avl_text_scores_and_keep_by_hand():
    a = torch.tensor([[[0.5, 0.0, 0.0], [0.2, 0.3, 0.0], [0.1, 0.4, 0.2]]])  # [1 head, 3 rows, 3 text columns]
    s = avl_text_scores(a, 0.5)
    # row 1: quantile_0.5([0.2]) = 0.2; row 2: quantile_0.5([0.1, 0.4]) = 0.25
    assert_close(s, torch.tensor([[0.5 + 0.0 + (0.1 - 0.25), 0.3 + (0.4 - 0.25), 0.2]]))
    # one decoding row: its own column set, the others gain weight - quantile over all columns (itself included)
    d = avl_text_scores(torch.tensor([[[0.1, 0.6, 0.2, 0.1]]]), 0.5, s)
    med = float(torch.quantile(torch.tensor([0.1, 0.6, 0.2, 0.1]), 0.5))
    assert_close(d, torch.cat([s + torch.tensor([[0.1, 0.6, 0.2]]) - med, torch.tensor([[0.1]])], 1))
    keep = avl_text_keep(torch.tensor([[5.0, 1.0, 4.0, 0.0, 3.0, 2.0]]), 4)  # 2 recent + the 2 best of the rest
    assert keep.tolist() == [[True, False, True, False, True, True]]
    assert avl_text_keep(torch.zeros(1, 3), 3).all()


def test_avl_cache_errors():
    vis = torch.zeros(1, 8, dtype=torch.bool)
    vis[0, [1, 3]] = True
    with pytest.raises(ValueError, match="contiguous"):
        AdaptiveVLCache(vis)
    with pytest.raises(ValueError, match="interval"):
        AdaptiveVLCache(torch.zeros(1, 8, dtype=torch.bool), interval=0)
    cache = AdaptiveVLCache(torch.zeros(1, 8, dtype=torch.bool))
    q, k, v = random_qkv(1, 2, 6, dim=4)
    with pytest.raises(ValueError, match="one flag per prompt token"):
        cache.attend(q, k, v)
    with pytest.raises(ValueError, match="no decoding step"):
        cache.computed_mask()
