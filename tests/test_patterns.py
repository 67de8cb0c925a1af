"""Patterns mean what their papers define, and tile classes never contradict the predicate."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import patterns as P
from attnkit.patterns import EMPTY, FULL, _classify_by_evaluation


def _grid(lq, lk):
    i = torch.arange(lq).view(-1, 1) + (lk - lq)
    j = torch.arange(lk).view(1, -1)
    return i, j


@pytest.mark.parametrize("lq,lk", [(12, 12), (5, 12)])
def test_definitions(lq, lk):
    i, j = _grid(lq, lk)
    cases = {
        P.causal(): j <= i,
        P.sliding_window(3, 1): (j >= i - 3) & (j <= i + 1),
        P.dilated(2, 3): ((i - j).abs() <= 6) & ((i - j) % 3 == 0),
        P.block_local(4): (i // 4) == (j // 4),
        P.strided(4): (i - j >= 0) & (((i - j) < 4) | ((i - j) % 4 == 0)),
        P.fixed(4, 1): (((i // 4) == (j // 4)) | (j % 4 == 3)) & (j <= i),
        P.global_tokens([0, 5]): (j == 0) | (j == 5) | (i == 0) | (i == 5),
        P.prefix_lm(3): (j < 3) | (j <= i),
        P.full(): torch.ones(lq, lk, dtype=torch.bool),
        ~P.causal(): j > i,
    }
    for pattern, want in cases.items():
        assert torch.equal(pattern.materialize(lq, lk)[0, 0], want), pattern


def test_document_and_key_padding_depend_on_batch():
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    m = P.document(ids).materialize(5, 5, batch=2)
    assert m.shape == (2, 1, 5, 5)
    assert torch.equal(m[1, 0], ids[1].view(-1, 1) == ids[1].view(1, -1))
    pad = P.key_padding([2, 5]).materialize(3, 5, batch=2)
    assert pad[0, 0].sum() == 3 * 2 and pad[1, 0].all()


def test_density_of_sliding_window():
    assert P.sliding_window(2).density(10) == pytest.approx((10 * 5 - 2 * (2 + 1)) / 100)


_ATOMS = st.one_of(
    st.builds(P.sliding_window, st.integers(0, 20), st.integers(0, 20)),
    st.just(P.causal()),
    st.builds(P.dilated, st.integers(0, 5), st.integers(1, 4)),
    st.builds(P.block_local, st.integers(1, 16)),
    st.builds(P.strided, st.integers(1, 9)),
    st.builds(P.fixed, st.integers(4, 9), st.integers(0, 4)),
    st.builds(P.global_tokens, st.lists(st.integers(0, 40), max_size=3)),
    st.builds(P.prefix_lm, st.integers(0, 30)),
    st.builds(lambda n: P.document(torch.arange(50) // n), st.integers(3, 30)),
)
_PATTERNS = st.recursive(
    _ATOMS, lambda inner: st.one_of(st.builds(lambda a, b: a & b, inner, inner),
                                    st.builds(lambda a, b: a | b, inner, inner), st.builds(lambda a: ~a, inner)),
    max_leaves=4,
)


@settings(max_examples=60, deadline=None)
@given(pattern=_PATTERNS, lq=st.sampled_from([1, 17, 50]), bq=st.sampled_from([1, 4, 16]),
       bk=st.sampled_from([3, 8, 64]))
def test_tile_classes_are_conservative(pattern, lq, bq, bk):
    lk = 50
    got = pattern.tile_classes(lq, lk, bq, bk)
    exact = _classify_by_evaluation(pattern, lq, lk, bq, bk, 1, 1, None)
    got = got.expand_as(exact)
    assert not ((got == EMPTY) & (exact != EMPTY)).any()
    assert not ((got == FULL) & (exact != FULL)).any()


def test_mask_mod_matches_predicate():
    pattern = P.sliding_window(3) & P.causal()
    mm = pattern.mask_mod(8, 8)
    i, j = torch.arange(8).view(-1, 1), torch.arange(8).view(1, -1)
    assert torch.equal(mm(0, 0, i, j), pattern.materialize(8, 8)[0, 0])


@settings(max_examples=40, deadline=None)
@given(pattern=_PATTERNS, lq=st.sampled_from([1, 17, 50]), bq=st.sampled_from([4, 16, 32]),
       bk=st.sampled_from([3, 8, 64]), norm=st.sampled_from(["softmax", "sigmoid", "softplus"]),
       fused=st.booleans())
def test_random_compositions_run_exactly_on_the_tiled_engine(pattern, lq, bq, bk, norm, fused):
    """Any composition, tiled on any grid, by both softmax paths, equals the dense reference (values and grads)."""
    import attnkit
    import attnkit.ops.exact.tiled as tiled
    from attnkit.testing import assert_close, random_qkv

    q, k, v = random_qkv(1, 2, lq, 50, 8, dtype=torch.float64, requires_grad=True)
    old = tiled.USE_FUSED_CPU_KERNEL
    tiled.USE_FUSED_CPU_KERNEL = fused
    try:
        out = attnkit.attention(q, k, v, pattern=pattern, normalization=norm, engine="tiled", block_q=bq,
                                block_kv=bk)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
    finally:
        tiled.USE_FUSED_CPU_KERNEL = old
    ref = attnkit.attention(q, k, v, pattern=pattern, normalization=norm, engine="reference")
    assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b)
