"""Issue 17: SPARSEK's O(k) decode cache (catalogue E11, test 4: incremental selection equals recomputed)."""

from __future__ import annotations

import pytest
import torch

from attnkit.ops.approx import SparseKDecodeCache, sparsek_attention
from attnkit.testing import assert_close


def qkv(n, b=2, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("top_k", [1, 6])
def test_decode_steps_equal_rows_of_the_causal_pass_and_the_cache_stays_small(window, top_k):
    n = 90
    q, k, v = qkv(n)
    w = torch.randn(2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = sparsek_attention(q, k, v, top_k=top_k, score_weight=w, window=window, causal=True)
    cache = SparseKDecodeCache(top_k, window=window, score_weight=w)
    outs, sizes = [], []
    for i in range(n):
        outs.append(cache.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]))
        sizes.append(len(cache))
    assert_close(torch.cat(outs, dim=2), want)
    assert cache.position == n
    # O(k + window) entries, not O(n): the support (k plus a few fractional entries) and the window
    assert max(sizes) <= 3 * top_k + window + 4, max(sizes)


def test_scores_given_per_step_and_bad_input():
    q, k, v = qkv(12)
    u = torch.randn(2, 2, 12, dtype=torch.float64)
    want = sparsek_attention(q, k, v, top_k=3, scores=u, causal=True)
    cache = SparseKDecodeCache(3)
    outs = [cache.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], scores=u[:, :, i:i + 1])
            for i in range(12)]
    assert_close(torch.cat(outs, dim=2), want)
    with pytest.raises(ValueError, match="scores="):
        SparseKDecodeCache(3).step(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="one decode step"):
        cache.step(q[:, :, :2], k[:, :, :2], v[:, :, :2], scores=u[:, :, :2])
    with pytest.raises(ValueError, match="top_k"):
        SparseKDecodeCache(0)
