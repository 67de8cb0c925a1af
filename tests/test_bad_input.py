"""Bad input raises a clear error naming the argument (or gives the documented result)."""

import pytest
import torch

import attnkit
from attnkit import normalizations as N
from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit.testing import random_qkv


def test_wrong_rank():
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \[batch, heads, seq, dim\]"):
        attnkit.attention(q[0], k, v)


def test_mismatched_batch_heads_dims():
    q, k, v = random_qkv(2, 4, 8, 8, 16)
    with pytest.raises(ValueError, match="batch sizes differ"):
        attnkit.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="same head dim"):
        attnkit.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        attnkit.attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="k and v must have the same length"):
        attnkit.attention(q, k, v[:, :, :5])


def test_dtypes_and_devices():
    q, k, v = random_qkv()
    with pytest.raises(TypeError, match="floating tensor"):
        attnkit.attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="share a dtype"):
        attnkit.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="one device"):
        attnkit.attention(q, k.to("meta"), v)


def test_impossible_pattern_parameters():
    with pytest.raises(ValueError, match=r"sliding_window\(left\) must be >= 0"):
        P.sliding_window(-1)
    with pytest.raises(ValueError, match="num_summary"):
        P.fixed(4, 5)
    with pytest.raises(TypeError, match="integer tensor"):
        P.document(torch.rand(10))
    q, k, v = random_qkv(2, 2, 10, 10, 8)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[kv_len\]"):
        attnkit.attention(q, k, v, pattern=P.document(torch.zeros(9, dtype=torch.long)))
    with pytest.raises(ValueError, match="one length per batch element"):
        attnkit.attention(q, k, v, pattern=P.key_padding([1, 2, 3]))
    with pytest.raises(TypeError, match="Pattern"):
        attnkit.attention(q, k, v, pattern="causal")


def test_unsupported_engine_combinations_explain_why():
    q, k, v = random_qkv()
    with pytest.raises(attnkit.NotSupportedError, match="score_mod given"):
        attnkit.attention(q, k, v, score_mod=S.softcap(5.0), engine="sdpa")
    with pytest.raises(attnkit.NotSupportedError, match="needs the whole matrix"):
        attnkit.attention(q, k, v, normalization=N.sinkhorn(3), engine="tiled")
    with pytest.raises(ValueError, match="engine must be one of"):
        attnkit.attention(q, k, v, engine="fast")
    with pytest.raises(ValueError, match="normalization must be one of"):
        attnkit.attention(q, k, v, normalization="softermax")
    with pytest.raises(TypeError, match="score_mod must be"):
        attnkit.attention(q, k, v, score_mod=lambda s, *a: s)


def test_score_mod_head_count_must_match():
    q, k, v = random_qkv(1, 4, 8, 8, 8)
    with pytest.raises(ValueError, match="alibi"):
        attnkit.attention(q, k, v, score_mod=S.alibi(8))


def test_mechanism_without_causal_form_refuses_causal():
    with pytest.raises(attnkit.NotSupportedError, match="no causal form"):
        attnkit.get("sinkhorn", causal=True)


# ---- issue 19: clear errors instead of ZeroDivisionError / RuntimeError / KeyError / silent acceptance ----

def test_empty_batch_with_a_pattern_gives_an_empty_result_on_every_engine():
    q, k, v = (torch.randn(0, 2, 8, 4) for _ in range(3))
    for engine in ("auto", "reference", "tiled"):
        for pat in (None, P.causal(), P.sliding_window(2)):
            out = attnkit.attention(q, k, v, pattern=pat, engine=engine)
            assert out.shape == (0, 2, 8, 4), (engine, pat)


def test_zero_heads_in_modules_and_caches():
    with pytest.raises(ValueError, match="kv_heads must be a positive int, got 0"):
        attnkit.nn.MultiheadAttention(16, 4, kv_heads=0)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        attnkit.nn.MultiheadAttention(16, 0)
    q, k, v = random_qkv(1, 2, 3, 3, 4)
    with pytest.raises(ValueError, match=r"k/v heads \(0\), both >= 1"):
        attnkit.KVCache().attend(q, k[:, :0], v[:, :0])


def test_zero_heads_and_bad_blocks_and_scale():
    q, k, v = random_qkv(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="0 heads"):
        attnkit.attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="0 heads"):
        attnkit.attention(q[:, :0], k, v)
    for bad in (0, -4, 2.5, True):
        for name in ("block_q", "block_kv"):
            with pytest.raises(ValueError, match=f"{name} must be a positive int"):
                attnkit.attention(q, k, v, engine="tiled", **{name: bad})
            with pytest.raises(ValueError, match=f"{name} must be a positive int"):
                attnkit.attention(q, k, v, engine="reference", **{name: bad})  # not silently ignored
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be finite"):
            attnkit.attention(q, k, v, scale=bad)
        with pytest.raises(ValueError, match="scale must be finite"):
            attnkit.neighborhood(q, k, v, kernel_size=3, scale=bad)


def test_global_tokens_beyond_the_length():
    q, k, v = random_qkv(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match=r"index 9 is beyond the sequence \(kv_len=8\)"):
        attnkit.attention(q, k, v, pattern=P.sliding_window(1) | P.global_tokens([0, 9]))
    # strict=False: one pattern for any length (the registered "longformer" builds it so)
    lenient = P.sliding_window(1) | P.global_tokens([0, 9], strict=False)
    torch.testing.assert_close(attnkit.attention(q, k, v, pattern=lenient),
                               attnkit.attention(q, k, v, pattern=P.sliding_window(1) | P.global_tokens([0])))


def test_shard_rank_out_of_range():
    from attnkit.distributed import shard, shard_positions

    x = torch.randn(1, 1, 8, 2)
    for rank in (2, -1):
        with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\)"):
            shard(x, rank, 2)
        with pytest.raises(ValueError, match="rank must be"):
            shard_positions(8, rank, 2)


def test_custom_pattern_and_score_mod_of_the_wrong_shape():
    q, k, v = random_qkv(1, 2, 8, 8, 4)
    bad_pattern = P.custom(lambda b, h, qi, ki: torch.ones(3, 5, dtype=torch.bool))
    for engine in ("reference", "tiled"):
        with pytest.raises(ValueError, match=r"custom\(fn\).*returned shape \(3, 5\); expected"):
            attnkit.attention(q, k, v, pattern=bad_pattern, engine=engine)
        bad_mod = S.custom(lambda s, b, h, qi, ki: s.sum(-1))
        with pytest.raises(ValueError, match=r"custom\(fn\).*returned shape .*; expected the score's shape"):
            attnkit.attention(q, k, v, score_mod=bad_mod, engine=engine)
    # shapes that broadcast are fine (fn ignores some indices)
    ok = P.custom(lambda b, h, qi, ki: qi >= ki, batch_dependent=False, head_dependent=False)
    attnkit.attention(q, k, v, pattern=ok)
    attnkit.attention(q, k, v, score_mod=S.custom(lambda s, b, h, qi, ki: s - (qi - ki).abs()))


@pytest.mark.parametrize("cache_name", ["KVCache", "SlidingWindowCache", "AdaptiveKVCache"])
def test_caches_refuse_other_heads_and_dtypes(cache_name):
    from attnkit import patterns as P_

    cache = {"KVCache": lambda: attnkit.KVCache(), "SlidingWindowCache": lambda: attnkit.SlidingWindowCache(4),
             "AdaptiveKVCache": lambda: attnkit.AdaptiveKVCache()}[cache_name]()
    pattern = P_.causal() & P_.sliding_window(3, 0) if cache_name == "SlidingWindowCache" else None
    q, k, v = random_qkv(1, 4, 6, 6, 8, kv_heads=2)
    cache.attend(q, k, v, pattern=pattern)
    q1, k1, v1 = random_qkv(1, 4, 1, 1, 8, kv_heads=4, seed=1)
    with pytest.raises(ValueError, match=rf"{cache_name}: new keys .* do not match the cache.*kv_heads=2"):
        cache.attend(q1, k1, v1, pattern=pattern)
    q1, k1, v1 = random_qkv(1, 4, 1, 1, 8, kv_heads=2, seed=1, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf"{cache_name}: new keys are torch.float64.*holds torch.float32"):
        cache.attend(q1, k1, v1, pattern=pattern)
    q1, k1, v1 = random_qkv(1, 4, 1, 1, 8, kv_heads=2, seed=1)
    assert cache.attend(q1, k1, v1, pattern=pattern).shape == (1, 4, 1, 8)  # still usable


def test_unknown_mechanism_is_a_value_error_with_close_matches():
    with pytest.raises(ValueError, match="did you mean 'sliding_window'"):
        attnkit.get("sliding_windw")


def test_linear_state_continued_with_another_feature_map():
    q, k, v = random_qkv(1, 2, 6, 6, 4)
    _, state = attnkit.linear_attention(q, k, v, causal=True, feature_map="elu", return_state=True)
    with pytest.raises(ValueError, match="state was made by feature map 'elu' and cannot be continued with "
                                         "feature map 'relu'"):
        attnkit.linear_attention(q, k, v, causal=True, feature_map="relu", state=state)
    with pytest.raises(ValueError, match="state was made by 4 features and cannot be continued with feature "
                                         "map 'taylor'"):
        attnkit.linear_attention(q, k, v, causal=True, feature_map="taylor", state=(state.S, state.z))
def test_exact_variant_parameters_are_checked():
    q, k, v = random_qkv(1, 2, 12, 12, 8)
    with pytest.raises(ValueError, match="axial"):
        attnkit.attention(q, k, v, pattern=P.axial((3, 5), 0))  # 15 grid tokens, 12 given
    with pytest.raises(ValueError, match="axis"):
        P.axial((3, 4), 2)
    with pytest.raises(ValueError, match="per-head"):
        attnkit.attention(q, k, v, pattern=P.per_head_window([1, 2, 3]))
    with pytest.raises(ValueError, match="halo"):
        P.halo((3, 4), (2,), 1)
    with pytest.raises(ValueError, match="levels"):
        P.hierarchical(torch.tensor([0, 5]), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="power"):
        N.softplus(power=0.0)
    with pytest.raises(ValueError, match="base"):
        S.length_scale(1.0)
