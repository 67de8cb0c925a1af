"""Sequence parallelism across processes (gloo on loopback): every output and gradient equals one process.

One spawn per world size runs all the checks inside (spawning costs seconds; checks cost milliseconds).
"""

import os
import time

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.distributed import (
    RankFailure,
    attention_energy,
    block_attention,
    local_decode_stats,
    merge_partials,
    ring_attention,
    run_local,
    shard,
    shard_positions,
    tree_decode,
    unshard_list,
)
from attnkit.testing import assert_close

pytestmark = pytest.mark.distributed


def _full(seed, b=2, h=4, hkv=2, n=16, d=8, dv=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, n, dv, generator=g, dtype=torch.float64)
    do = torch.randn(b, h, n, dv, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, do)]


def _ring_case(rank, world, seed, layout, causal, pattern, dtype=torch.float64, **shape):
    """Ring vs one-process reference (float64 reference engine) on this rank's rows, with gradients."""
    q, k, v, do = _full(seed, **shape)
    eff = (P.causal() & pattern if pattern is not None else P.causal()) if causal else pattern
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = attnkit.attention(qr, kr, vr, pattern=eff, engine="reference")
    ref.backward(do)
    ql, kl, vl = (shard(t, rank, world, layout=layout).to(dtype).detach().requires_grad_(True) for t in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=causal, pattern=pattern, layout=layout)
    out.backward(shard(do, rank, world, layout=layout).to(dtype))
    name = f"{layout} causal={causal} pattern={pattern!r} {dtype} rank {rank}/{world}"
    assert out.dtype == dtype
    sh = [shard(t, rank, world, layout=layout) for t in (ref, qr.grad, kr.grad, vr.grad)]
    for got, want, what in zip((out, ql.grad, kl.grad, vl.grad), sh, ("out", "dq", "dk", "dv")):
        assert_close(got, want, dtype=dtype, scale=1.0 if dtype == torch.float64 else 4.0, msg=f"{what}: {name}")


def _rsa_case(rank, world, seed, layout, causal, pattern, dtype=torch.float64, **shape):
    """Ring Self-Attention vs one process (float64 reference), outputs and gradients; and the bytes and messages
    it sends, forward and backward, equal sequence_parallel_traffic (so do the online ring's)."""
    from attnkit.distributed import count_traffic, ring_self_attention, sequence_parallel_traffic

    q, k, v, do = _full(seed, **shape)
    eff = (P.causal() & pattern if pattern is not None else P.causal()) if causal else pattern
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = attnkit.attention(qr, kr, vr, pattern=eff, engine="reference")
    ref.backward(do)
    name = f"RSA {layout} causal={causal} pattern={pattern!r} {dtype} rank {rank}/{world}"
    b, h, n, d = q.shape
    geometry = dict(seq_len=n, world_size=world, batch=b, heads=h, kv_heads=k.shape[1], dim=d, dim_v=v.shape[-1],
                    dtype=dtype)
    for algorithm, fn in (("rsa", ring_self_attention), ("ring", ring_attention)):
        ql, kl, vl = (shard(t, rank, world, layout=layout).to(dtype).detach().requires_grad_(True)
                      for t in (q, k, v))
        with count_traffic() as fwd:
            out = fn(ql, kl, vl, causal=causal, pattern=pattern, layout=layout)
        with count_traffic() as bwd:
            out.backward(shard(do, rank, world, layout=layout).to(dtype))
        want = sequence_parallel_traffic(algorithm, **geometry)
        got = {"forward_bytes": fwd.bytes_sent, "backward_bytes": bwd.bytes_sent,
               "forward_messages": fwd.messages_sent, "backward_messages": bwd.messages_sent}
        assert got == {key: want[key] for key in got}, (algorithm, name, got, want)
        if algorithm == "ring":
            continue
        assert out.dtype == dtype
        sh = [shard(t, rank, world, layout=layout) for t in (ref, qr.grad, kr.grad, vr.grad)]
        for got_t, want_t, what in zip((out, ql.grad, kl.grad, vl.grad), sh, ("out", "dq", "dk", "dv")):
            assert_close(got_t, want_t, dtype=dtype, scale=1.0 if dtype == torch.float64 else 4.0,
                         msg=f"{what}: {name}")


def _checks(rank, world):
    import torch.distributed as dist

    from attnkit.distributed import lasp, striped_attention, unshard

    torch.manual_seed(0)
    # ring: contiguous and striped, causal or not, composed patterns, GQA, dim_v != dim
    for layout in ("contiguous", "striped"):
        _ring_case(rank, world, 1, layout, False, None)
        _ring_case(rank, world, 2, layout, True, None)
        _ring_case(rank, world, 3, layout, True, P.sliding_window(5, 0), n=8 * world, dv=6)
    _ring_case(rank, world, 4, "contiguous", False, P.document(torch.tensor([0] * 5 + [1] * 11)), hkv=1)
    _ring_case(rank, world, 5, "striped", True, None, dtype=torch.float32)
    _ring_case(rank, world, 6, "contiguous", True, None, dtype=torch.bfloat16)
    # Ring Self-Attention (two passes, no online softmax): same outputs and gradients, same bytes, 2x messages
    _rsa_case(rank, world, 16, "contiguous", False, None)
    _rsa_case(rank, world, 17, "contiguous", True, None, dv=6)
    _rsa_case(rank, world, 18, "striped", True, P.sliding_window(5, 0), n=8 * world, hkv=1)
    _rsa_case(rank, world, 19, "contiguous", False, P.document(torch.tensor([0] * 5 + [1] * 11)))
    _rsa_case(rank, world, 20, "contiguous", True, None, dtype=torch.bfloat16)
    # striped_attention is ring_attention(layout="striped", causal=True)
    q, k, v, _ = _full(7)
    a = striped_attention(*(shard(t, rank, world, layout="striped") for t in (q, k, v)))
    b = ring_attention(*(shard(t, rank, world, layout="striped") for t in (q, k, v)), causal=True, layout="striped")
    assert torch.equal(a, b)
    # unshard gathers every rank's rows back in order
    full = unshard(a, layout="striped")
    assert_close(full, attnkit.attention(q, k, v, pattern=P.causal(), engine="reference"))

    # tree decoding over shards of different lengths (rank 1 holds nothing when world > 2)
    g = torch.Generator().manual_seed(8)
    lens = [5, 0, 3, 8][:world] if world > 2 else [5, 9]
    kc = torch.randn(2, 2, sum(lens), 8, generator=g, dtype=torch.float64)
    vc = torch.randn(2, 2, sum(lens), 8, generator=g, dtype=torch.float64)
    qd = torch.randn(2, 4, 1, 8, generator=g, dtype=torch.float64)
    start = sum(lens[:rank])
    out = tree_decode(qd, kc[:, :, start:start + lens[rank]], vc[:, :, start:start + lens[rank]])
    assert_close(out, attnkit.attention(qd, kc, vc, engine="reference"))
    kl, vl = kc[:, :, start:start + lens[rank]], vc[:, :, start:start + lens[rank]]
    out32 = tree_decode(qd.float(), kl.float(), vl.float())
    assert out32.dtype == torch.float32
    assert_close(out32, attnkit.attention(qd, kc, vc, engine="reference"), dtype=torch.float32)

    # LASP: causal linear attention with decay, outputs and gradients, and bytes sent independent of n
    for n_local, decay in ((4, None), (6, 0.9)):
        q, k, v, do = _full(9, n=n_local * world, hkv=2)
        qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
        ref = attnkit.linear_attention(qr, kr, vr, causal=True, decay=decay, feature_map="elu")
        ref.backward(do)
        ql, kl, vl = (shard(t, rank, world).detach().requires_grad_(True) for t in (q, k, v))
        out = lasp(ql, kl, vl, decay=decay, chunk_size=3)
        out.backward(shard(do, rank, world))
        for got, want in zip((out, ql.grad, kl.grad, vl.grad), (ref, qr.grad, kr.grad, vr.grad)):
            assert_close(got, shard(want, rank, world))
    # LASP with FAVOR+ at q, k x 8: one key shift for the whole sequence (a max over the ranks), rescaled states
    from attnkit.feature_maps import FavorFeatureMap

    q, k, v, do = _full(15, n=5 * world, hkv=2, d=16)
    q, k = q * 8, k * 8
    fm = FavorFeatureMap(num_features=64, seed=2)
    ref = attnkit.linear_attention(q, k, v, causal=True, feature_map=fm)
    ql, kl, vl = (shard(t, rank, world) for t in (q, k, v))
    out = lasp(ql, kl, vl, feature_map=fm, chunk_size=2)
    assert_close(out, shard(ref, rank, world))
    assert out.abs().amax() > 0.3
    if world == 4:  # a sub-group: ranks 2 and 3 run a 2-way ring among themselves (group ranks != global ranks)
        sub = dist.new_group([2, 3])
        if rank >= 2:
            q, k, v, _ = _full(12)
            out = ring_attention(*(shard(t, rank - 2, 2) for t in (q, k, v)), group=sub, causal=True)
            ref = attnkit.attention(q, k, v, pattern=P.causal(), engine="reference")
            assert_close(out, shard(ref, rank - 2, 2))
    dist.barrier()
    return {"rank": rank, "world": world}


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_one_process(world):
    results = run_local(_checks, world, timeout_s=30.0)
    assert [r["rank"] for r in results] == list(range(world))


def _dies_or_hangs(rank, world):
    q = torch.randn(1, 2, 4, 8)
    if rank == 1:
        time.sleep(60)  # a hung peer: rank 0 must time out, not wait forever
    return ring_attention(q, q, q)


def _exits(rank, world):
    if rank == 1:
        os._exit(7)  # a crashed peer
    q = torch.randn(1, 2, 4, 8)
    return ring_attention(q, q, q)


def test_a_hung_or_dead_rank_gives_a_clear_error_not_a_hang():
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_local(_dies_or_hangs, 2, timeout_s=2.0)
    assert "ring_attention (forward): rank 0 failed exchanging" in info.value.errors[0]
    assert "timed out" in info.value.errors[0].lower() or "Timed out" in info.value.errors[0]
    with pytest.raises(RankFailure) as info:
        run_local(_exits, 2, timeout_s=2.0)
    assert "exited with code 7" in info.value.errors[1]
    assert time.monotonic() - t0 < 60


def _disagree(rank, world):
    """Every call below has ranks that disagree; each must raise ValueError on every rank (no abort, no partly
    filled buffer), and the group must still work afterwards."""
    from attnkit.distributed import lasp

    msgs = []
    h = 4 if rank == 0 else 2
    q = torch.randn(1, h, 4, 8)
    dtype = torch.float32 if rank == 0 else torch.float64
    qd = torch.randn(1, 2, 4, 8, dtype=dtype)
    calls = [
        lambda: ring_attention(q, q[:, :2], q[:, :2]),  # heads differ
        lambda: ring_attention(qd, qd, qd, causal=True),  # dtypes differ
        lambda: ring_attention(q[:, :2], q[:, :2], q[:, :2], causal=rank == 0),  # options differ
        lambda: lasp(q, q[:, :2], q[:, :2]),
        lambda: lasp(qd, qd, qd),
        lambda: tree_decode(q[:, :, :1], q[:, :2], q[:, :2]),
        lambda: tree_decode(qd[:, :, :1], qd[:, :, : 1 + rank], qd[:, :, : 1 + rank]),
    ]
    for call in calls:
        try:
            call()
        except ValueError as e:
            msgs.append(str(e))
        else:
            msgs.append(None)
    ok = ring_attention(*(torch.ones(1, 2, 4, 8),) * 3)  # still in step
    return msgs, float(ok.sum())


def test_ranks_that_disagree_fail_on_every_rank():
    results = run_local(_disagree, 2, timeout_s=20.0)
    for rank, (msgs, total) in enumerate(results):
        assert abs(total - 2 * 4 * 8) < 1e-3
        assert None not in msgs, (rank, msgs)
        assert "ring_attention (forward): the ranks disagree (heads: rank 0 has 4, rank 1 has 2)" in msgs[0]
        assert "dtype: rank 0 has torch.float32, rank 1 has torch.float64" in msgs[1]
        assert "causal: rank 0 has 1, rank 1 has 0" in msgs[2]
        assert msgs[3].startswith("lasp: the ranks disagree (heads: rank 0 has 4, rank 1 has 2)")
        assert "dtype" in msgs[4]
        assert msgs[5].startswith("tree_decode: the ranks disagree (heads")
        assert "dtype" in msgs[6] and "queries" not in msgs[6]  # shard lengths may differ


def test_exchange_error_names_only_the_peers_it_has(monkeypatch):
    import torch.distributed as dist

    from attnkit.distributed._comm import Exchange

    ex = Exchange.__new__(Exchange)  # only the message is formatted: no process group needed
    ex.dst, ex.src, ex.what = None, 0, "lasp (forward)"
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    msg = ex._message(RuntimeError("boom"))
    assert "(receive from group rank 0)" in msg and "None" not in msg


# --- single-process pieces: layouts, merge, energy ------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "striped"])
def test_shard_and_unshard_are_inverse(layout):
    x = torch.arange(2 * 12).view(1, 2, 12, 1)
    parts = [shard(x, r, 3, layout=layout) for r in range(3)]
    assert torch.equal(unshard_list(parts, layout=layout), x)
    for r in range(3):
        assert torch.equal(parts[r][0, 0, :, 0], shard_positions(12, r, 3, layout))
    assert shard_positions(12, 1, 3, "striped").tolist() == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        shard(x, 0, 5)
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(x, 0, 3, layout="zigzag")


def test_merge_of_block_partials_equals_attention_in_any_order():
    q, k, v, _ = _full(10, n=12)
    ref = attnkit.attention(q, k, v, pattern=P.causal(), engine="reference")
    mask = P.causal().materialize(12, 12)
    blocks = [(0, 5), (5, 6), (6, 12)]
    for order in ([0, 1, 2], [2, 0, 1]):
        out = lse = None
        for i in order:
            a, b = blocks[i]
            o, l = block_attention(q, k[:, :, a:b], v[:, :, a:b], mask[..., a:b], q.shape[-1] ** -0.5)
            out, lse = merge_partials(out, lse, o, l)
        assert_close(out, ref)
        assert not torch.isnan(out).any()


def test_striped_layout_balances_causal_work():
    n, world = 64, 4
    mask = P.causal().materialize(n, n)[0, 0]
    for layout, worst in (("contiguous", 4.0), ("striped", 1.2)):
        work = []
        for r in range(world):
            qp = shard_positions(n, r, world, layout)
            work.append(int(mask[qp].sum()))
        ratio = max(work) / min(work)
        assert ratio > 3.0 if layout == "contiguous" else ratio < worst


def test_energy_gradient_is_attention_and_local_stats_combine():
    q, k, v, _ = _full(11, n=9)
    q = q[:, :, -1:]
    zeta = torch.zeros(2, 4, 1, 8, dtype=torch.float64, requires_grad=True)
    attention_energy(q, k, v, zeta).backward()
    assert_close(zeta.grad, attnkit.attention(q, k, v, engine="reference"))
    stats = [local_decode_stats(q, k[:, :, a:b], v[:, :, a:b], 8 ** -0.5) for a, b in ((0, 4), (4, 4), (4, 9))]
    m = torch.stack([s[0] for s in stats]).amax(0)
    num = sum(s[2] * torch.exp(s[0] - m)[..., None] for s in stats)
    den = sum(s[1] * torch.exp(s[0] - m) for s in stats)
    assert_close(num / den[..., None], zeta.grad)


def test_errors_without_a_process_group():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        tree_decode(q, q, q)


@pytest.mark.parametrize("chunk_elements", [1 << 21, 200])
def test_block_kernels_in_row_chunks_match_autograd(monkeypatch, chunk_elements):
    import attnkit.distributed.merge as merge

    monkeypatch.setattr(merge, "CHUNK_ELEMENTS", chunk_elements)
    q, k, v, do = _full(13, n=40, dv=6)
    rows = torch.arange(40).view(-1, 1)
    mask = P.causal().materialize(40, 40) & (rows != 0) & (rows != 7)  # rows 0 and 7 see nothing
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = merge.block_attention(qr, kr, vr, mask, 8 ** -0.5)
    ref = attnkit.attention(q, k, v, pattern=P.custom(lambda b, h, i, j: mask[0, 0, i, j]), engine="reference")
    assert_close(out, ref)
    assert torch.isneginf(lse[:, :, [0, 7]]).all() and not out.isnan().any()
    out.backward(do)
    dq, dk, dv = merge.block_attention_backward(q, k, v, mask, 8 ** -0.5, do, lse, (do * out.detach()).sum(-1))
    for got, want in zip((dq, dk, dv), (qr.grad, kr.grad, vr.grad)):
        assert_close(got, want)


def test_striped_positions_drive_rotary_consistently():
    from attnkit.rotary import RotaryEmbedding, apply_rotary

    rope = RotaryEmbedding(8).double()
    x = torch.randn(1, 2, 12, 8, dtype=torch.float64)
    full = rope(x)
    for r in range(3):
        pos = shard_positions(12, r, 3, "striped")
        cos, sin = rope.angles(pos)
        assert_close(apply_rotary(shard(x, r, 3, layout="striped"), cos, sin), shard(full, r, 3, layout="striped"))


@pytest.fixture
def single_rank_group():
    import datetime

    import torch.distributed as dist

    from attnkit.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=10))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_equals_attention_and_argument_errors(single_rank_group):
    from attnkit.distributed import lasp

    q, k, v, do = _full(14, n=10)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = ring_attention(qr, kr, vr, causal=True)
    out.backward(do)
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    attnkit.attention(q2, k2, v2, pattern=P.causal(), engine="reference").backward(do)
    assert_close(out, attnkit.attention(q, k, v, pattern=P.causal(), engine="reference"))
    for a, b in ((qr, q2), (kr, k2), (vr, v2)):
        assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="equal shards"):
        ring_attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(TypeError, match="pattern must be an attnkit.patterns.Pattern"):
        ring_attention(q, k, v, pattern="causal")
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, k, v, layout="zigzag")
    with pytest.raises(ValueError, match="shapes do not fit"):
        tree_decode(q, k[..., :4], v)
    with pytest.raises(ValueError, match="one length"):
        lasp(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(attnkit.NotSupportedError, match="not token-local"):
        lasp(q, k, v, feature_map=attnkit.feature_maps.get("cosformer"))


def test_rsa_and_ring_traffic_compare_as_documented(single_rank_group):
    """Equal bytes, twice the messages, and n times the saved scores for RSA; one rank sends nothing."""
    from attnkit.distributed import ring_self_attention, sequence_parallel_traffic

    geo = dict(seq_len=4096, world_size=8, batch=1, heads=8, kv_heads=2, dim=64, dtype=torch.bfloat16)
    ring, rsa = sequence_parallel_traffic("ring", **geo), sequence_parallel_traffic("rsa", **geo)
    assert ring["forward_bytes"] == rsa["forward_bytes"] == 7 * 2 * (2 * 512 * 64) * 2
    assert ring["backward_bytes"] == rsa["backward_bytes"] == 7 * 2 * 2 * 512 * 64 * 2 + 8 * 2 * 2 * 512 * 64 * 4
    assert rsa["forward_messages"] == 2 * ring["forward_messages"] == 14
    assert rsa["saved_score_elements"] == 4096 * ring["saved_score_elements"]
    one = sequence_parallel_traffic("rsa", **{**geo, "world_size": 1})
    assert one["forward_bytes"] == one["backward_bytes"] == one["backward_messages"] == 0
    with pytest.raises(ValueError, match="algorithm must be"):
        sequence_parallel_traffic("ulysses", **geo)
    # one rank: RSA is plain softmax attention, with gradients; fully masked rows give zeros, not NaN
    q, k, v, do = _full(21, n=10)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    pat = P.custom(lambda b, h, i, j: (j <= i) & (i != 3))
    out = ring_self_attention(qr, kr, vr, pattern=pat)
    out.backward(do)
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    attnkit.attention(q2, k2, v2, pattern=pat, engine="reference").backward(do)
    assert_close(out, attnkit.attention(q, k, v, pattern=pat, engine="reference"))
    assert not out.isnan().any() and bool((out[:, :, 3] == 0).all())
    for a, b in ((qr, q2), (kr, k2), (vr, v2)):
        assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="equal shards"):
        ring_self_attention(q, k[:, :, :5], v[:, :, :5])


def test_rsa_keeps_its_probabilities_and_the_ring_a_log_sum_exp(single_rank_group):
    """What each algorithm saves for the backward, measured with saved-tensor hooks, is what
    sequence_parallel_traffic reports (one rank: the whole sequence)."""
    from attnkit.distributed import ring_self_attention, sequence_parallel_traffic

    q, k, v, _ = _full(22, n=12)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    geo = dict(seq_len=12, world_size=1, batch=2, heads=4, kv_heads=2, dim=8)
    for algorithm, fn in (("rsa", ring_self_attention), ("ring", ring_attention)):
        saved: list[int] = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(q, k, v, causal=True)
        inputs = q.numel() + k.numel() + v.numel()
        scores = sum(saved) - inputs - (q.numel() if algorithm == "ring" else 0)  # the ring also keeps `out`
        assert scores == sequence_parallel_traffic(algorithm, **geo)["saved_score_elements"], (algorithm, saved)
