"""The dispatch cache (issue 23): engine="auto"'s decision and the flex BlockMask remembered by the call's
structure, keyed so that different pattern parameters never share an entry."""

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.backends import dispatch, flex
from attnkit.backends.dispatch import structure_key
from attnkit.normalizations import resolve
from attnkit.ops.exact.reference import reference_attention
from attnkit.testing import assert_close


def test_structure_key_by_parameters():
    assert structure_key(P.sliding_window(16)) == structure_key(P.sliding_window(16))
    assert structure_key(P.sliding_window(16)) != structure_key(P.sliding_window(32))
    assert structure_key(P.sliding_window(16, 0)) != structure_key(P.sliding_window(16))
    assert structure_key(P.causal() & P.sliding_window(8)) != structure_key(P.causal() & P.sliding_window(9))
    assert structure_key(P.causal() & P.sliding_window(8)) != structure_key(P.causal() | P.sliding_window(8))
    assert structure_key(P.per_head_window([2, 4])) != structure_key(P.per_head_window([2, 5]))
    assert structure_key(P.block_local(16)) != structure_key(P.dilated(16, 1))
    # tensors a pattern holds are keyed by identity (equal contents in another tensor: another key)
    ids = torch.tensor([0, 0, 1, 1])
    assert structure_key(P.document(ids)) == structure_key(P.document(ids))
    assert structure_key(P.document(ids)) != structure_key(P.document(ids.clone()))


def test_auto_decision_cache_distinguishes_structure():
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    sm = resolve("softmax")
    for w in (3, 7, 3, 11):  # a pattern seen before with other parameters in between
        pat = P.sliding_window(w)
        out = attnkit.attention(q, k, v, pattern=pat)
        assert_close(out, reference_attention(q, k, v, pattern=pat, normalization=sm, scale=8 ** -0.5),
                     dtype=torch.float64)
    # same structure, engine chosen once: a second call does not consult the backends again
    dispatch.invalidate()
    calls = []
    from attnkit.backends import base

    orig = base.select

    def spy(*a, **kw):
        calls.append(a[1])
        return orig(*a, **kw)

    base.select = spy
    try:
        for _ in range(3):
            attnkit.attention(q, k, v, pattern=P.sliding_window(5))
        assert len(calls) == 1
        attnkit.attention(q, k, v, pattern=P.sliding_window(6))
        attnkit.attention(q.float(), k.float(), v.float(), pattern=P.sliding_window(5))
        attnkit.attention(q[:, :, :20], k, v, pattern=P.sliding_window(5))
        assert len(calls) == 4
        with torch.enable_grad():
            attnkit.attention(q.requires_grad_(), k, v, pattern=P.sliding_window(5))
        assert len(calls) == 5
    finally:
        base.select = orig


def test_flex_block_masks_never_shared_across_parameters():
    # the flex engine's BlockMask cache: keyed by the pattern's parameters, so windows 16 and 300 get their own
    # masks (a reused mask would skip tiles the wider window needs); equal parameters share one
    pytest.importorskip("torch.nn.attention.flex_attention")
    flex._CACHE.clear()
    a = flex._entry(P.sliding_window(16), None, 512, 512, 1, 1, torch.device("cpu"))
    b = flex._entry(P.sliding_window(300), None, 512, 512, 1, 1, torch.device("cpu"))
    c = flex._entry(P.sliding_window(16), None, 512, 512, 1, 1, torch.device("cpu"))
    assert a[2] is not b[2] and a[2] is c[2]
    assert not torch.equal(a[2].kv_num_blocks, b[2].kv_num_blocks)
    qi, ki = torch.tensor(0), torch.tensor(40)
    assert not bool(a[2].mask_mod(0, 0, qi, ki)) and bool(b[2].mask_mod(0, 0, qi, ki))
    d = flex._entry(P.sliding_window(16), None, 512, 384, 1, 1, torch.device("cpu"))
    assert d[2] is not a[2]


def test_neighborhood_spec_cache_validates_types():
    x = torch.randn(1, 1, 8, 8, 4)
    attnkit.neighborhood(x, x, x, kernel_size=3)
    with pytest.raises((TypeError, ValueError)):
        attnkit.neighborhood(x, x, x, kernel_size=3.0)
