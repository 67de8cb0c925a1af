"""Decoding with caches: prefill + N one-token steps equals one full pass (KVCache, sliding window, the
recurrent state of linear attention); FastGen compressed caches report their kept memory and output error."""

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.cache import (
    POLICIES,
    AdaptiveKVCache,
    KVCache,
    RecurrentStateCache,
    SlidingWindowCache,
    choose_policies,
    policy_keep_mask,
)
from attnkit.nn import LinearMultiheadAttention, MultiheadAttention
from attnkit.testing import assert_close, relative_error


def _decode(m, x, cache, prefill: int, chunk: int = 1):
    """Prefill ``prefill`` tokens, then feed the rest ``chunk`` at a time; returns the concatenated outputs."""
    outs = [m(x[:, :prefill], cache=cache)]
    for t in range(prefill, x.shape[1], chunk):
        outs.append(m.step(x[:, t:t + chunk], cache) if hasattr(m, "step") else m(x[:, t:t + chunk], cache=cache))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kv_heads,rotary,prefill,chunk", [
    (4, False, 5, 1), (2, True, 7, 1), (1, True, 1, 1), (2, True, 6, 3),
], ids=["mha", "gqa-rope", "mqa-rope-prefill1", "gqa-rope-chunks3"])
def test_kv_cache_decoding_equals_full_causal_pass(kv_heads, rotary, prefill, chunk):
    torch.manual_seed(0)
    m = MultiheadAttention(32, 4, kv_heads=kv_heads, causal=True, rotary=rotary).double()
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    cache = KVCache(capacity=4)  # small: the cache must grow several times
    assert_close(_decode(m, x, cache, prefill, chunk), m(x))
    assert cache.seq_len == 17 and cache.k.shape[1] == kv_heads and cache.k.shape[2] >= 17
    assert cache.nbytes == 2 * cache.k.numel() * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_cache_decoding_dtypes(dtype):
    torch.manual_seed(1)
    m64 = MultiheadAttention(32, 4, kv_heads=2, causal=True, rotary=True).double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    ref = m64(x)
    m = MultiheadAttention(32, 4, kv_heads=2, causal=True, rotary=True).to(dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in m64.state_dict().items()})
    out = _decode(m, x.to(dtype), KVCache(), 4)
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype, scale=4.0)  # projections in dtype around the attention


def test_kv_cache_with_pattern_and_score_mod():
    torch.manual_seed(2)
    from attnkit import score_mods
    m = MultiheadAttention(16, 2, causal=True, pattern=P.prefix_lm(0) | P.sliding_window(3, 0),
                           score_mod=score_mods.alibi(2)).double()
    x = torch.randn(1, 11, 16, dtype=torch.float64)
    assert_close(_decode(m, x, KVCache(), 3), m(x))


def test_kv_cache_ragged_batch_equals_each_sequence_alone():
    torch.manual_seed(3)
    m = MultiheadAttention(32, 4, kv_heads=2, causal=True, rotary=True).double()
    lens = [6, 3, 1]
    prompts = [torch.randn(1, n, 32, dtype=torch.float64) for n in lens]
    steps = torch.randn(3, 4, 32, dtype=torch.float64)
    x = torch.zeros(3, max(lens), 32, dtype=torch.float64)
    for i, p in enumerate(prompts):
        x[i, :lens[i]] = p[0]
    cache = KVCache(capacity=2)
    pre = m(x, cache=cache, lengths=torch.tensor(lens))
    outs = [m.step(steps[:, t:t + 1], cache) for t in range(steps.shape[1])]
    assert cache.lengths.tolist() == [n + 4 for n in lens]
    for i, n in enumerate(lens):
        full = m(torch.cat([prompts[i], steps[i:i + 1]], dim=1))
        assert_close(pre[i, :n], full[0, :n])
        assert_close(torch.cat(outs, 1)[i], full[0, n:])


def test_sliding_window_cache_keeps_only_the_window_and_is_exact():
    torch.manual_seed(4)
    w = 4
    m = MultiheadAttention(32, 4, kv_heads=2, causal=True, rotary=True, pattern=P.sliding_window(w, 0)).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    cache = SlidingWindowCache(w)
    assert_close(_decode(m, x, cache, 9), m(x))
    assert cache.seq_len == w and cache.seen == 20
    assert cache.nbytes == 2 * 2 * 2 * w * 8 * 8  # k and v, batch 2, kv_heads 2, window, head_dim 8, float64


def test_sliding_window_cache_refuses_a_pattern_it_cannot_serve():
    m = MultiheadAttention(16, 2, causal=True)
    with pytest.raises(ValueError, match="looking back at most 3"):
        m(torch.randn(1, 5, 16), cache=SlidingWindowCache(3))
    with pytest.raises(ValueError, match="window must be a positive int"):
        SlidingWindowCache(0)


def test_linear_attention_recurrent_state_through_the_layer_interface():
    torch.manual_seed(5)
    m = LinearMultiheadAttention(32, 4, kv_heads=2, feature_map="elu", decay=0.9).double()
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    cache = RecurrentStateCache()
    out = m(x[:, :6], cache=cache)
    sizes = [cache.nbytes]
    outs = [out]
    for t in range(6, 15):
        outs.append(m(x[:, t:t + 1], cache=cache))
        sizes.append(cache.nbytes)
    assert_close(torch.cat(outs, 1), m(x))
    assert len(set(sizes)) == 1 and cache.seen == 15  # O(1) memory in the length


def test_full_policy_adaptive_cache_is_exact():
    torch.manual_seed(6)
    m = MultiheadAttention(32, 4, kv_heads=2, causal=True, rotary=True).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    cache = AdaptiveKVCache(policies=("full",))
    assert_close(_decode(m, x, cache, 10), m(x))
    assert cache.kept_fraction == 1.0
    assert cache.policies == [["full", "full"], ["full", "full"]]


def test_adaptive_cache_reports_kept_fraction_and_error():
    torch.manual_seed(7)
    m = MultiheadAttention(32, 4, kv_heads=2, causal=True, rotary=True).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    ref = m(x)[:, 30:]
    results = {}
    for t in (0.0, 0.5, 0.9, 1.0):
        cache = AdaptiveKVCache(threshold=t, local_ratio=0.2, frequent_ratio=0.2)
        out = _decode(m, x, cache, 30)[:, 30:]
        assert 0.0 < cache.kept_fraction <= 1.0
        assert bool((cache.recovery >= t - 1e-6).all())  # the chosen policy recovers the threshold
        results[t] = (cache.kept_fraction, relative_error(out, ref))
    assert results[0.0][0] < 0.5 < results[1.0][0] or results[1.0][0] == 1.0
    assert results[1.0][1] < 1e-10  # a threshold of 1 keeps every attended key
    assert results[0.0][0] <= results[0.5][0] <= results[0.9][0] <= results[1.0][0]
    assert results[0.0][1] >= results[1.0][1]


def test_choose_policies_picks_the_cheapest_policy_that_recovers():
    n = 8
    # head 0 attends only to the start token, head 1 to its own position (local), head 2 uniformly
    a = torch.zeros(1, 3, n, n)
    a[0, 0, :, 0] = 1
    a[0, 1] = torch.eye(n)
    a[0, 2] = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).view(-1, 1)
    names, keep, rec = choose_policies(a, threshold=0.99, local_ratio=0.25, frequent_ratio=0.25)
    assert names[0][0] == "special" and keep[0, 0].sum() == 1
    assert names[0][1] == "special+punct+frequent+local"
    assert names[0][2] == "full" and bool(keep[0, 2].all())
    assert rec.shape == (1, 3) and bool((rec >= 0.99).all())
    assert POLICIES[-1] == "full"


def test_policy_masks_and_errors():
    a = torch.softmax(torch.randn(1, 1, 6, 6).masked_fill(~torch.tril(torch.ones(6, 6, dtype=torch.bool)),
                                                            float("-inf")), -1)
    kw = dict(special=torch.zeros(1, 6, dtype=torch.bool), punct=torch.zeros(1, 6, dtype=torch.bool),
              local_ratio=0.5, frequent_ratio=0.5)
    assert policy_keep_mask("local", a, per_query=False, **kw)[0, 0].tolist() == [False] * 3 + [True] * 3
    assert int(policy_keep_mask("frequent", a, per_query=False, **kw).sum()) == 3
    with pytest.raises(ValueError, match="unknown policy component"):
        policy_keep_mask("recent", a, per_query=False, **kw)
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveKVCache(threshold=1.5)
    with pytest.raises(ValueError, match="unknown policy"):
        AdaptiveKVCache(policies=("special", "nope"))


def test_cache_argument_errors():
    m = MultiheadAttention(16, 2, causal=True)
    with pytest.raises(TypeError, match="cache must be an attnkit cache"):
        m(torch.randn(1, 3, 16), cache={})
    with pytest.raises(ValueError, match="lengths= applies to decoding"):
        m(torch.randn(1, 3, 16), lengths=[3])
    with pytest.raises(ValueError, match="lengths must have one entry per batch"):
        m(torch.randn(2, 3, 16), cache=KVCache(), lengths=[3])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
        m(torch.randn(1, 3, 16), cache=KVCache(), lengths=[4])
    with pytest.raises(ValueError, match="capacity"):
        KVCache(capacity=0)
    cache = KVCache()
    m(torch.randn(1, 3, 16), cache=cache)
    with pytest.raises(TypeError, match="cache holds torch.float32"):
        m.double()(torch.randn(1, 1, 16, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="no cache path"):
        MultiheadAttention(16, 2, mechanism="sliding_window", causal=True, mechanism_kwargs={"window": 2})(
            torch.randn(1, 3, 16), cache=KVCache())


def test_public_exports():
    assert {"KVCache", "SlidingWindowCache", "AdaptiveKVCache", "RecurrentStateCache"} <= set(attnkit.__all__)
    assert "LinearMultiheadAttention" in attnkit.nn.__all__


def test_adaptive_cache_compresses_a_sink_head_with_small_error():
    # every query aligns with the key of token 0 (an attention sink): "special" recovers the map, one entry kept
    g = torch.Generator().manual_seed(8)
    n, d = 24, 8
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0
    q = 6.0 * u + 0.1 * torch.randn(1, 2, n + 4, d, generator=g, dtype=torch.float64)
    k = 0.1 * torch.randn(1, 2, n + 4, d, generator=g, dtype=torch.float64)
    k[:, :, 0] += 6.0 * u
    v = torch.randn(1, 2, n + 4, d, generator=g, dtype=torch.float64)
    cache = AdaptiveKVCache(threshold=0.95)
    outs = [cache.attend(q[:, :, :n], k[:, :, :n], v[:, :, :n])]
    outs += [cache.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(n, n + 4)]
    ref = attnkit.attention(q, k, v, pattern=P.causal())
    assert cache.policies == [["special", "special"]]
    # generated tokens are not special: the special heads keep the sink alone (FastGen, generation phase)
    assert cache.kept_fraction == 1 / n and cache.k.shape[2] == 1 and cache.held.tolist() == [[1, 1]]
    assert relative_error(torch.cat(outs[1:], 2), ref[:, :, n:]) < 0.05
    assert_close(outs[0], ref[:, :, :n])  # the prompt itself is exact
