"""PagedKVCache: exact against the contiguous KVCache and the full causal pass, for every page size."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import PagedKVCache
from attnkit import patterns as P
from attnkit.nn import MultiheadAttention
from attnkit.testing import assert_close, random_qkv


@pytest.mark.parametrize("page_size,extent", [(1, 1), (3, 2), (16, 16), (64, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_and_steps_equal_the_full_causal_pass(page_size, extent, dtype):
    torch.manual_seed(0)
    layer = MultiheadAttention(32, 4, kv_heads=2, causal=True, rotary=True).to(dtype)
    x = torch.randn(2, 21, 32, dtype=dtype)
    full = layer(x)
    cache = PagedKVCache(page_size, num_pages=2, extent=extent)
    outs = [layer(x[:, :9], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(9, 21)]
    assert_close(torch.cat(outs, 1), full, scale=4.0)
    assert cache.seq_len == 21 and int(cache.lengths.min()) == 21


@pytest.mark.parametrize("page_size", [1, 5, 8])
def test_batch_of_different_lengths_matches_contiguous_cache(page_size):
    torch.manual_seed(1)
    q, k, v = random_qkv(3, 4, 11, 11, 8, kv_heads=2)
    lengths = torch.tensor([11, 4, 7])
    pat = P.causal() & P.sliding_window(5)
    paged, flat = PagedKVCache(page_size, num_pages=1, extent=1), attnkit.KVCache(2)
    a = paged.attend(q, k, v, pattern=pat, lengths=lengths)
    b = flat.attend(q, k, v, pattern=pat, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        assert_close(a[i, :, :n], b[i, :, :n])
        assert torch.equal(a[i, :, n:], torch.zeros_like(a[i, :, n:]))
    for _ in range(3):
        q1, k1, v1 = random_qkv(3, 4, 1, 1, 8, kv_heads=2, seed=_ + 5)
        assert_close(paged.attend(q1, k1, v1, pattern=pat), flat.attend(q1, k1, v1, pattern=pat))
    assert paged.lengths.tolist() == [14, 7, 10]
    for i in range(3):
        kk, vv = paged.get(i)
        assert_close(kk, flat.k[i, :, :int(paged.lengths[i])])


def test_pages_are_freed_and_reused_and_bytes_are_reported():
    cache = PagedKVCache(4, num_pages=4, extent=1)
    q, k, v = random_qkv(2, 2, 10, 10, 8)
    cache.attend(q, k, v)
    assert cache.block_table().shape == (2, 3)
    used_before = cache.used_bytes
    assert used_before == 2 * 3 * 2 * (2 * 4 * 8 * 4) and cache.nbytes >= used_before
    pages = set(cache.block_tables[1])
    cache.free(1)
    assert cache.lengths.tolist() == [10, 0] and cache.block_tables[1] == []
    assert cache.used_bytes == used_before // 2
    # a new prompt in slot 1: it takes freed pages before growing the pool
    q2, k2, v2 = random_qkv(2, 2, 6, 6, 8, seed=3)
    before = cache.num_pages
    cache.append(k2, v2, lengths=torch.tensor([0, 6]))
    assert cache.num_pages == before and set(cache.block_tables[1]) <= pages | set(range(before))
    assert_close(cache.get(1)[0], k2[1])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(0)
    cache = PagedKVCache(4)
    q, k, v = random_qkv(1, 2, 3, 3, 8)
    cache.attend(q, k, v)
    q3, k3, v3 = random_qkv(1, 4, 1, 1, 8)
    with pytest.raises(ValueError, match="do not match"):
        cache.attend(q3, k3, v3)
    with pytest.raises(TypeError, match="cast"):
        cache.attend(q.double()[:, :, :1], k.double()[:, :, :1], v.double()[:, :, :1])
    with pytest.raises(ValueError, match="seq"):
        cache.free(5)


def test_bad_lengths_sequences_and_batches_are_our_errors():
    """Issue 28: fractional lengths were truncated (1.5 -> 1) without a word; get(5), integer keys, a query batch
    other than the keys' and string lengths gave torch's messages or nothing."""
    q, k, v = random_qkv(2, 2, 4, 4, 8)
    for bad in ([1.5, 2], torch.tensor([1.5, 2.0]), [float("nan"), 2]):
        cache = PagedKVCache(4)
        with pytest.raises(ValueError, match="lengths must be whole numbers"):
            cache.append(k, v, lengths=bad)
        assert cache.k_pool is None  # nothing written
    with pytest.raises(TypeError, match="lengths must be"):
        PagedKVCache(4).append(k, v, lengths="ab")
    with pytest.raises(TypeError, match="lengths must be integers"):
        PagedKVCache(4).append(k, v, lengths=[True, False])
    with pytest.raises(TypeError, match="floating-point"):
        PagedKVCache(4).append(k.long(), v.long())
    with pytest.raises(ValueError, match="same batch"):
        PagedKVCache(4).attend(q[:1], k, v)
    cache = PagedKVCache(4)
    assert cache.append(k, v, lengths=torch.tensor([3.0, 4.0])).tolist() == [0, 0]  # whole floats are fine
    assert cache.lengths.tolist() == [3, 4]
    for seq in (5, -1, 1.5):
        with pytest.raises(ValueError, match="seq must index one of the 2 sequences"):
            cache.get(seq)
