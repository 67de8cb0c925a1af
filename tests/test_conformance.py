"""Conformance tests generated from the registry: every registered mechanism is tested the moment it is registered.

For each record: output shape and finiteness at lengths 1 and 36 (not a multiple of any block size; a 6 x 6 and
3 x 3 x 4 grid), causal form where declared, gradients reach every floating input, half precisions run, and,
where the record has a ``reference``, the fast path agrees with it in float64 (tight) and in float32/bfloat16
(per-dtype tolerance).
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.testing import assert_close, build_small, mechanism_inputs

MECHANISMS = attnkit.list_mechanisms()
NAMES = [m.name for m in MECHANISMS]
WITH_REFERENCE = [m.name for m in MECHANISMS if m.reference is not None]
# Known defects, each with the issue that fixes it; strict, so the mark must go when the fix lands.
KNOWN_CAUSAL_LEAKS: dict[str, str] = {}
CAUSAL = [pytest.param(m.name, marks=pytest.mark.xfail(reason=KNOWN_CAUSAL_LEAKS[m.name], strict=True))
          if m.name in KNOWN_CAUSAL_LEAKS else m.name for m in MECHANISMS if m.causal]


def _run(m, built, inputs, seed=0):
    if not m.deterministic:
        torch.manual_seed(seed)
    return built(*inputs)


def _expected_shape(m, inputs):
    if m.kind == "mixer":
        return inputs[0].shape
    q, _, v = inputs[:3]
    return (*q.shape[:-1], v.shape[-1])


@pytest.mark.parametrize("seq_len", [1, 36])
@pytest.mark.parametrize("name", NAMES)
def test_shape_finite_and_gradients(name, seq_len):
    m = attnkit.mechanism_info(name)
    inputs = mechanism_inputs(m, seq_len=seq_len, requires_grad=True)
    try:
        built, _ = build_small(m, seq_len=seq_len)
        out = _run(m, built, inputs)
    except ValueError:
        # Mechanisms with landmarks, blocks or clusters may refuse sequences shorter than their parameters,
        # but then they must say so.
        if seq_len == 1:
            return
        raise
    assert tuple(out.shape) == tuple(_expected_shape(m, inputs)), f"{name}: output shape {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output at seq_len={seq_len}"
    out.square().sum().backward()
    for i, t in enumerate(inputs):
        if t.is_floating_point():
            assert t.grad is not None and torch.isfinite(t.grad).all(), f"{name}: gradient of input {i}"


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_form_does_not_see_the_future(name):
    m = attnkit.mechanism_info(name)
    n = 36
    built, _ = build_small(m, seq_len=n, causal=True)
    inputs = mechanism_inputs(m, seq_len=n)
    out = _run(m, built, inputs)
    cut = 17
    changed = [t.clone() for t in inputs]
    for t in changed if m.kind == "attention" else changed[:1]:
        future = t[..., cut + 1:, :] if m.kind == "attention" else t[:, cut + 1:]
        future.copy_(torch.randn_like(future))
    out2 = _run(m, built, tuple(changed))
    seq_axis = -2 if m.kind == "attention" else 1
    head = out.narrow(seq_axis, 0, cut + 1)
    head2 = out2.narrow(seq_axis, 0, cut + 1)
    assert_close(head2, head, scale=5.0, msg=f"{name}: causal output before position {cut + 1} changed")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_runs(name, dtype):
    m = attnkit.mechanism_info(name)
    built, _ = build_small(m, seq_len=36, dtype=dtype)
    inputs = mechanism_inputs(m, seq_len=36, dtype=dtype)
    out = _run(m, built, inputs)
    assert out.dtype == dtype, f"{name}: {dtype} input gave {out.dtype} output"
    assert torch.isfinite(out).all(), f"{name}: non-finite {dtype} output"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [1, 36])
@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_fast_path_matches_reference(name, seq_len, dtype):
    m = attnkit.mechanism_info(name)
    inputs64 = mechanism_inputs(m, seq_len=seq_len, dtype=torch.float64)
    try:
        built64, params = build_small(m, seq_len=seq_len, dtype=torch.float64)
        _run(m, built64, inputs64)
    except ValueError:
        if seq_len == 1:  # a clear refusal of length 1 (kernels, landmarks): test_shape_finite_and_gradients
            pytest.skip("refuses length 1")
        raise
    if not m.deterministic:
        torch.manual_seed(0)
    expected = m.reference(built64, *inputs64, **params)
    if dtype == torch.float64:
        assert_close(_run(m, built64, inputs64), expected, scale=m.tolerance_scale)
        return
    built, _ = build_small(m, seq_len=seq_len, dtype=dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs64)
    assert_close(_run(m, built, inputs), expected, dtype=dtype, scale=4.0 * m.tolerance_scale)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank_is_a_clear_error(name):
    m = attnkit.mechanism_info(name)
    if m.example_inputs is not None:
        pytest.skip("custom inputs: the family's own tests check bad input")
    built, _ = build_small(m, seq_len=8)
    inputs = mechanism_inputs(m, seq_len=8)
    bad = (inputs[0][0],) + tuple(inputs[1:])  # drop the batch axis of the first input
    with pytest.raises((ValueError, TypeError)):
        built(*bad)
