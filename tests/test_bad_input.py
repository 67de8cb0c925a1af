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
