"""Long-context family: Star Attention, S2-Attention and Block-Attention's re-rotated passage caches."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.distributed.launch import RankFailure, run_local
from attnkit.functional.star import star_attention, star_attention_distributed, star_pattern
from attnkit.ops.longctx import rerotate_keys, s2_kv_fraction, s2_pattern
from attnkit.rotary import RotaryEmbedding
from attnkit.testing import assert_close, random_qkv


# -- Star Attention ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block", [(13, 13), (13, 40), (30, 64)])
def test_star_with_one_block_is_full_causal_attention(n, block):
    q, k, v = random_qkv(2, 4, n, n, 8, kv_heads=2, dtype=torch.float64)
    ref = attnkit.attention(q, k, v, pattern=P.causal())
    assert_close(star_attention(q, k, v, block_size=block), ref)
    assert_close(star_attention(q, k, v, block_size=4, num_query=n), ref)  # everything is query: exact


def test_star_is_labelled_approximate_because_phase1_differs_from_full_attention():
    # Issue 25, defect 6: the record said exact=True; phase 1 (context blocks see the anchor and themselves)
    # approximates the full causal attention of the model it serves, phase 2 (the query tokens) is exact.
    assert attnkit.mechanism_info("star_attention").exact is False
    q, k, v = random_qkv(1, 2, 24, 24, 8, dtype=torch.float64)
    full = attnkit.attention(q, k, v, pattern=P.causal())
    out = attnkit.get("star_attention", causal=True, block_size=6, num_query=4)(q, k, v)
    assert (out[:, :, 12:20] - full[:, :, 12:20]).abs().max() > 1e-3  # phase 1, third and fourth blocks
    assert_close(out[:, :, 20:], full[:, :, 20:])  # phase 2


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
    return ctx.numpy().copy(), out.numpy().copy()  # by value: a tensor's shared memory dies with the rank


def test_star_distributed_phase2_equals_one_process():
    block, nq = 6, 3
    q, k, v = random_qkv(1, 2, 2 * block + nq, 2 * block + nq, 8, dtype=torch.float64, seed=3)
    ctx_n = 2 * block
    results = run_local(_star_worker, 2, q[:, :, :ctx_n], k[:, :, :ctx_n], v[:, :, :ctx_n], q[:, :, ctx_n:],
                        k[:, :, ctx_n:], v[:, :, ctx_n:], block, timeout_s=30.0)
    single = star_attention(q, k, v, block_size=block, num_query=nq)
    for rank, (ctx, out) in enumerate(results):
        ctx, out = torch.from_numpy(ctx), torch.from_numpy(out)
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


# -- KV selection policies -----------------------------------------------------------------------------------
from attnkit.ops.longctx import (  # noqa: E402
    cumulative_mass,
    modality_mask,
    probe_query_mask,
    span_index_mask,
    span_mask,
    token_type_mask,
    trim_visual_features,
)
from attnkit.ops.longctx.selection import dequantize, quantize  # noqa: E402
from attnkit.selective_cache import SelectiveKVCache  # noqa: E402


def _profile(b=2, h=2, r=3, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(b, h, r, n, generator=g, dtype=torch.float64), -1)


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.75, 0.99, 1.0])
def test_cumulative_mass_selects_the_minimal_set(tau):
    prof = _profile()
    keep = cumulative_mass(prof, tau)
    mass = prof.sum(-2) / prof.sum(-2).sum(-1, keepdim=True)
    for b in range(2):
        for h in range(2):
            vals = sorted(mass[b, h].tolist(), reverse=True)
            need, acc = 0, 0.0
            while acc < tau - 1e-12 and need < len(vals):
                acc += vals[need]
                need += 1
            if tau >= 1.0:
                need = len(vals)
            assert int(keep[b, h].sum()) == max(need, 0) or (tau == 0.0 and int(keep[b, h].sum()) == 0)
            if need:  # the kept keys are the heaviest
                assert float(mass[b, h][keep[b, h]].min()) >= vals[need - 1] - 1e-12


def test_token_type_rules():
    types = torch.tensor([1, 2, 0, 1, 2, 2])  # local, sliding, global, local, sliding, sliding
    m = token_type_mask(types, window=2)
    assert m[2, 0] and not m[3, 0]  # local 0 visible until the Global at 2 has arrived (query 2 is that Global)
    assert m[5, 2]  # Global: always
    assert m[4, 3] and m[5, 3]  # local 3: no later Global
    assert m[2, 1] and not m[3, 1]  # sliding 1: the next window=2 tokens only
    assert torch.equal(token_type_mask(torch.zeros(6, dtype=torch.long), 1), torch.ones(6, 6).tril().bool())


def test_evicting_cache_equals_dense_masked_attention_for_token_types():
    n, h, d = 10, 2, 8
    q, k, v = random_qkv(1, h, n + 1, n + 1, d, dtype=torch.float64)
    types = torch.tensor([0, 1, 2, 1, 0, 2, 1, 2, 2, 1, 1])
    mask = token_type_mask(types, window=3)
    cache = SelectiveKVCache(lambda p, qq, kk: mask[n, :n].expand(1, h, n).clone(), probe=1)
    cache.attend(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    step = cache.attend(q[:, :, n:], k[:, :, n:], v[:, :, n:])
    dense = attnkit.attention(q, k, v, pattern=P.custom(lambda b, hh, qi, ki: mask[qi, ki]))
    assert_close(step, dense[:, :, n:])
    assert cache.kept_fraction == pytest.approx(float(mask[n, :n].sum()) / n)


def test_span_index_retrieving_every_span_is_full_attention_and_spans_partition():
    q, k, v = random_qkv(1, 2, 5, 23, 8, dtype=torch.float64)
    full = span_index_mask(q, k, span=4, top_spans=100, window=1)
    assert torch.equal(full, P.causal().materialize(5, 23).expand_as(full))
    sparse = span_index_mask(q, k, span=4, top_spans=1, window=2)
    # every kept key outside the window belongs to a whole retrieved span (up to causality)
    assert sparse.sum() < full.sum()
    pos = torch.arange(5) + 18
    for i in range(5):  # the local window is always kept
        assert sparse[..., i, pos[i] - 1:pos[i] + 1].all()
    out = attnkit.attention(q, k, v, pattern=P.custom(lambda b, h, qi, ki: sparse[b, h, qi, ki]))
    assert torch.isfinite(out).all()


def test_probe_query_cutoff_and_determinism():
    q, k, _ = random_qkv(2, 4, 16, 16, 8, kv_heads=2)
    assert probe_query_mask(q, k, window=8, num_probe=3, cutoff=None).all()
    a = probe_query_mask(q, k, window=8, num_probe=3, cutoff=5)
    assert torch.equal(a, probe_query_mask(q, k, window=8, num_probe=3, cutoff=5))
    assert a.shape == (2, 2, 16) and (a.sum(-1) == 5).all()


def test_modality_and_trimming():
    prof = _profile(1, 2, 3, 10)
    vis = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
    assert modality_mask(prof, vis, visual_ratio=1.0, text_window=10).all()
    m = modality_mask(prof, vis, visual_ratio=0.4, text_window=2)
    assert (m[0, :, :5].sum(-1) == 2).all() and torch.equal(m[0, :, 5:8], torch.zeros(2, 3, dtype=torch.bool))
    cross = _profile(1, 2, 4, 9)
    assert torch.equal(trim_visual_features(cross, 1.0), torch.arange(9).view(1, -1))
    idx = trim_visual_features(cross, 0.5)
    assert idx.shape == (1, 5) and torch.equal(idx, trim_visual_features(cross, 0.5))


def test_span_mask_empty_is_full_and_sparse_equals_dense_masked():
    assert torch.equal(span_mask(None, 4, 6), P.causal().materialize(4, 6).reshape(4, 6))
    spans = [[(0, 2)], [], [(1, 3), (4, 5)], [(5, 6)]]
    m = span_mask(spans, 4, 6)
    assert m[1].tolist() == [True, True, True, True, False, False]
    q, k, v = random_qkv(1, 1, 4, 6, 8, dtype=torch.float64)
    out = attnkit.attention(q, k, v, pattern=P.custom(lambda b, h, qi, ki: m[qi, ki]))
    s = (q[0, 0] @ k[0, 0].T) * 8 ** -0.5
    assert_close(out[0, 0], torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v[0, 0])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantisation_error_is_bounded_by_the_bit_width(bits):
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    codes, scale, zero = quantize(x, bits)
    err = (dequantize(codes, scale, zero) - x).abs()
    assert (err <= scale / 2 + 1e-12).all()


def test_selective_cache_with_everything_kept_is_exact_and_zipvl_saves_bytes():
    torch.manual_seed(0)
    q, k, v = random_qkv(1, 4, 40, 40, 16, kv_heads=2)
    full = attnkit.attention(q, k, v, pattern=P.causal())
    exact = SelectiveKVCache(lambda p, qq, kk: cumulative_mass(p, 1.0))
    outs = [exact.attend(q[:, :, :32], k[:, :, :32], v[:, :, :32])]
    outs += [exact.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(32, 40)]
    assert_close(torch.cat(outs, 2), full)
    assert exact.kept_fraction == 1.0
    dropped = SelectiveKVCache(lambda p, qq, kk: cumulative_mass(p, 0.5))
    mixed = SelectiveKVCache(lambda p, qq, kk: cumulative_mass(p, 0.5), low_bits=4)
    errs = []
    for cache in (dropped, mixed):
        cache.attend(q[:, :, :32], k[:, :, :32], v[:, :, :32])
        step = cache.attend(q[:, :, 32:33], k[:, :, 32:33], v[:, :, 32:33])
        errs.append(float((step - full[:, :, 32:33]).norm() / full[:, :, 32:33].norm()))
    assert dropped.kept_fraction < 1.0 and dropped.nbytes < exact.nbytes
    assert errs[1] < errs[0]  # low-precision copies of the rest beat dropping it


# -- model-level methods -------------------------------------------------------------------------------------
from attnkit.nn.longctx import (  # noqa: E402
    BlockTransformerMixer,
    RecurrentAttentionMixer,
    TokenTypeMixer,
)


def test_block_transformer_token_decoder_sees_only_its_block_and_the_context():
    torch.manual_seed(0)
    mix = BlockTransformerMixer(16, 2, block_size=4).double()
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    base = mix(x)
    assert_close(base, mix.reference(x))
    ctx = mix._context(x)
    mix._context = lambda _x: ctx  # freeze the context embeddings
    y = x.clone()
    y[:, :4] = torch.randn(2, 4, 16, dtype=torch.float64)  # change block 0 only
    assert_close(mix(y)[:, 4:], base[:, 4:])  # other blocks move only through their context embedding
    del mix._context
    z = x.clone()
    z[:, 9:] = 0  # the future never matters (causal)
    assert_close(mix(z)[:, :9], base[:, :9])


def test_block_transformer_with_block_size_one_attends_to_context_and_itself():
    torch.manual_seed(1)
    mix = BlockTransformerMixer(8, 2, block_size=1).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    ctx = mix._context(x)
    for i in range(5):
        seq = torch.stack([ctx[:, i], x[:, i]], dim=1)
        q, k, v = mix.token_attn.split(seq)
        o = mix.token_attn.merge(torch.softmax(torch.tril((q @ k.transpose(-1, -2)) * 4 ** -0.5)
                                               .masked_fill(torch.ones(2, 2).triu(1).bool(), float("-inf")), -1) @ v)
        assert_close(mix(x)[:, i], o[:, 1])


def test_ran_with_one_window_is_self_attention_with_an_extra_token():
    torch.manual_seed(2)
    mix = RecurrentAttentionMixer(8, 2, window=64, memory_review=False).double()  # the windowed core
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    seq = torch.cat([mix.gpc0.expand(2, 1, 8), x], dim=1)
    q, k, v = mix.attn.split(seq)
    expected = mix.attn.merge(torch.softmax((q @ k.transpose(-1, -2)) * 4 ** -0.5, -1) @ v)[:, 1:]
    assert_close(mix(x), expected)
    small = RecurrentAttentionMixer(8, 2, window=3).double()
    assert_close(small(x), small.reference(x))
    with pytest.raises(ValueError, match="causal"):
        RecurrentAttentionMixer(8, causal=True)


@pytest.mark.parametrize("n,window", [(12, 4), (13, 4), (5, 8), (1, 3)])
def test_ran_parallel_form_and_memory_review(n, window):
    # Issue 25 (G9): the parallel form (cells first, then every window's tokens in one batched attention) equals
    # the window-by-window recurrence; the memory review lets early tokens see later windows' cells.
    torch.manual_seed(4)
    x = torch.randn(2, n, 8, dtype=torch.float64)
    for review in (True, False):
        mix = RecurrentAttentionMixer(8, 2, window=window, memory_review=review).double()
        out = mix(x)
        assert_close(out, mix.reference(x))
        if n > window:
            later = x.clone()
            later[:, -1] += 1.0  # change only the last window
            moved = (mix(later)[:, :window] - out[:, :window]).abs().max()
            assert (moved > 1e-6) if review else (moved == 0)


def test_nats_all_global_is_full_causal_attention_and_types_get_gradients():
    torch.manual_seed(3)
    mix = TokenTypeMixer(8, 2, window=2).double().eval()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    assert_close(mix(x), mix.reference(x))
    with torch.no_grad():
        mix.scorer.weight.zero_()
        mix.scorer.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # every token Global
    q, k, v = mix.attn.split(x)
    assert_close(mix(x), mix.attn.merge(attnkit.attention(q, k, v, pattern=P.causal())))
    mix.train()
    mix(x).square().sum().backward()
    assert mix.scorer.weight.grad is not None


def test_kvcache_cli_judges_policies_on_a_quality_checkpoint(tmp_path):
    from attnkit.cli import main

    ck = tmp_path / "ck"
    assert main(["quality", "--mechanisms", "softmax", "--steps", "3", "--lr", "0.01", "--seq-len", "32",
                 "--save", str(ck), "--out", str(tmp_path / "q"), "--no-progress", "--no-plots"]) == 0
    out = tmp_path / "kv"
    assert main(["kvcache", str(ck / "mqar--softmax.pt"), "--out", str(out), "--batch", "8", "--no-progress"]) == 0
    import json

    doc = json.loads((out / "kvcache.json").read_text())
    by = {(r["policy"], r["setting"]): r for r in doc["results"]}
    assert by[("full", "all")]["output_error"] == 0.0 and by[("full", "all")]["kept_fraction"] == 1.0
    assert by[("window", "0.25")]["kv_bytes"] < by[("full", "all")]["kv_bytes"]
    assert (out / "kvcache.png").exists()


def test_s2_decoding_rows_equal_the_full_call():
    """Fewer queries than keys: the queries are the last positions (bottom-right), as in every pattern."""
    q, k, v = random_qkv(1, 4, 36, 36, 8, dtype=torch.float64)
    fn = attnkit.get("s2_attention", num_heads=4, stride=3, window=2, causal=True)
    assert_close(fn(q[:, :, -4:], k, v), fn(q, k, v)[:, :, -4:])
    with pytest.raises(ValueError, match="built for 4 heads"):
        fn(q[:, :2], k[:, :2], v[:, :2])
