"""Long-context family: Star Attention, S2-Attention and Block-Attention's re-rotated passage caches."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.distributed.launch import RankFailure, run_local
from attnkit.nn.rotary import RotaryEmbedding
from attnkit.ops.longctx import rerotate_keys, s2_kv_fraction, s2_pattern, star_attention, star_pattern
from attnkit.ops.longctx.star import star_attention_distributed
from attnkit.testing import assert_close, random_qkv


# -- Star Attention ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block", [(13, 13), (13, 40), (30, 64)])
def test_star_with_one_block_is_full_causal_attention(n, block):
    q, k, v = random_qkv(2, 4, n, n, 8, kv_heads=2, dtype=torch.float64)
    ref = attnkit.attention(q, k, v, pattern=P.causal())
    assert_close(star_attention(q, k, v, block_size=block), ref)
    assert_close(star_attention(q, k, v, block_size=4, num_query=n), ref)  # everything is query: exact


@pytest.mark.parametrize("block,anchor", [(4, None), (5, 2), (3, 7)])
def test_star_phase1_mask_is_same_block_or_anchor_and_causal(block, anchor):
    n = 17
    mask = star_pattern(block, anchor).materialize(n, n).reshape(n, n)
    a = block if anchor is None else anchor
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    assert torch.equal(mask, ((i // block == j // block) | (j < a)) & (j <= i))


def _star_worker(rank, world, q, k, v, qq, kq, vq, block):
    shard = slice(rank * block, (rank + 1) * block)
    ctx, out = star_attention_distributed(q[:, :, shard], k[:, :, shard], v[:, :, shard], (qq, kq, vq))
    return ctx, out


def test_star_distributed_phase2_equals_one_process():
    block, nq = 6, 3
    q, k, v = random_qkv(1, 2, 2 * block + nq, 2 * block + nq, 8, dtype=torch.float64, seed=3)
    ctx_n = 2 * block
    results = run_local(_star_worker, 2, q[:, :, :ctx_n], k[:, :, :ctx_n], v[:, :, :ctx_n], q[:, :, ctx_n:],
                        k[:, :, ctx_n:], v[:, :, ctx_n:], block, timeout_s=30.0)
    single = star_attention(q, k, v, block_size=block, num_query=nq)
    for rank, (ctx, out) in enumerate(results):
        assert_close(out, single[:, :, ctx_n:])  # phase 2: exact, the same on every rank
        assert_close(ctx, single[:, :, rank * block:(rank + 1) * block])  # phase 1 with the anchor


def _star_disagree(rank, world):
    q, k, v = random_qkv(1, 2 + 2 * rank, 4, 4, 8)
    star_attention_distributed(q, k, v, None)


def test_star_distributed_ranks_that_disagree_fail_on_every_rank():
    with pytest.raises(RankFailure) as err:
        run_local(_star_disagree, 2, timeout_s=10.0)
    assert str(err.value).count("ranks disagree") >= 2


# -- S2-Attention ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,stride,window", [(4, 4, 0), (8, 4, 3), (3, 3, 1)])
def test_s2_heads_together_cover_the_causal_context(heads, stride, window):
    n = 23
    mask = s2_pattern(heads, stride, window).materialize(n, n, heads=heads).reshape(heads, n, n)
    union = mask.any(dim=0)
    assert torch.equal(union, torch.ones(n, n, dtype=torch.bool).tril())
    # each head alone sees its residue class plus the window
    j = torch.arange(n)
    for h in range(heads):
        shard = ((j + h % stride) % stride) == 0
        assert torch.equal(mask[h, -1], (shard | (j > n - 1 - window)) & (j <= n - 1))


def test_s2_equals_dense_masked_attention_per_head_and_keeps_one_over_stride():
    heads, n = 4, 40
    q, k, v = random_qkv(1, heads, n, n, 8, dtype=torch.float64)
    pat = s2_pattern(heads, 4, 2)
    out = attnkit.get("s2_attention", num_heads=heads, stride=4, window=2, causal=True)(q, k, v)
    for h in range(heads):
        mask = pat.materialize(n, n, heads=heads)[0, h]
        s = (q[0, h] @ k[0, h].T) * 8 ** -0.5
        ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v[0, h]
        assert_close(out[0, h], ref)
    assert s2_kv_fraction(4096, 8, 8, 0) == pytest.approx(1 / 8, rel=1e-3)
    assert s2_kv_fraction(4096, 8, 8, 64) < 1 / 8 + 64 / 4096 + 1e-9


# -- Block-Attention for RAG ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("delta", [0, 5, 1000, -3])
def test_rerotated_cached_passage_equals_keys_computed_in_place(delta, dtype):
    rot = RotaryEmbedding(16)
    k = torch.randn(1, 2, 9, 16, dtype=dtype)
    cached = rot(k, offset=0)
    in_place = rot(k, offset=delta) if delta >= 0 else None
    if in_place is not None:
        assert_close(rerotate_keys(cached, delta, rot), in_place, scale=10.0)
    assert_close(rerotate_keys(rerotate_keys(cached, delta, rot), -delta, rot), cached, scale=10.0)


def test_block_attention_with_reused_passages_equals_recomputing_them():
    """Two passages encoded alone (positions from 0) and cached, then re-rotated to their offsets; the final
    block attends to everything: equal to running the block mask on the whole prompt."""
    torch.manual_seed(0)
    rot = RotaryEmbedding(8)
    lens = [5, 7, 4]  # passage 1, passage 2, final block
    n = sum(lens)
    q, k, v = random_qkv(1, 2, n, n, 8, dtype=torch.float64)
    block_id = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    mask = ((block_id.view(-1, 1) == block_id.view(1, -1)) | (block_id.view(-1, 1) == 2)) & \
        (torch.arange(n).view(1, -1) <= torch.arange(n).view(-1, 1))
    pat = P.custom(lambda b, h, qi, ki: mask[qi, ki], batch_dependent=False, head_dependent=False)
    qr, kr = rot(q), rot(k)
    full = attnkit.attention(qr, kr, v, pattern=pat)
    # reuse: each passage's keys rotated from 0, cached, then re-rotated by its offset
    starts = [0, lens[0], lens[0] + lens[1]]
    keys = [rerotate_keys(rot(k[:, :, s:s + m]), s, rot) for s, m in zip(starts, lens)]
    final_out = attnkit.attention(qr[:, :, starts[2]:], torch.cat(keys, 2), v, pattern=P.causal())
    assert_close(final_out, full[:, :, starts[2]:])
