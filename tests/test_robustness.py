"""Robustness tests generated from the registry (issue 28): every record, the moment it is registered, at input
scales x1, x10 and x100, at lengths 0 and 1, and with a NaN in one key (one token of a mixer's input), in its
default form and (where it has one) its causal form.

The contract, per call:

- **scale**: a finite output, or a clear error (``ValueError`` / ``TypeError`` raised by attnkit's own code, whose
  message names the cause), or a non-finite / zero output *with* a warning from attnkit. Never a silent NaN,
  never all zeros where the float64 run of the same mechanism is not (near) zero too.
- **length 0**: an empty output of the right shape, or a clear error. **Length 1**: as for the scales.
- **a NaN key**: NaN somewhere in the output (as dense attention propagates it) or a clear error; never a finite
  output that ignored it, never all zeros.

Mechanisms that legitimately cannot do a scale raise or warn (e.g. trigonometric random features, whose amplitude
``exp(|x|^2 / (2 sqrt(d)))`` overflows; Titans / TTT memories whose online gradient steps diverge). Known
remaining defects are strict xfails naming the reason (the mark must go when the fix lands). Small shapes and
float32: the file runs in well under a minute.
"""

from __future__ import annotations

import os
import traceback
import warnings

import pytest
import torch

import attnkit
from attnkit.testing import build_small, mechanism_inputs

ATTNKIT_DIR = os.path.dirname(attnkit.__file__)
MECHANISMS = attnkit.list_mechanisms()
HEADS, HEAD_DIM, BATCH, SEQ = 2, 16, 2, 24
SCALES = (1.0, 10.0, 100.0)

# Known defects, each with the reason; strict: the mark must go when the fix lands.
KNOWN: dict[tuple[str, str], str] = {
    # (causal AFT at 100x: fixed on faith-defects, issue 25 defect 2)
}


def _forms(m) -> list[bool]:
    return [False, True] if m.causal else [False]


def _params(check: str, scales: tuple | None = None):
    """``(name, causal[, scale])`` cases, with the strict xfails of ``KNOWN`` (keys ``"<form>-<check>"``)."""
    out = []
    for m in MECHANISMS:
        for causal in _forms(m):
            form = "causal" if causal else "default"
            for scale in scales or (None,):
                label = check if scale is None else f"x{scale:g}"
                reason = KNOWN.get((m.name, f"{form}-{label}"))
                marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
                args = (m.name, causal) if scale is None else (m.name, causal, scale)
                out.append(pytest.param(*args, marks=marks, id=f"{m.name}-{form}-{label}"))
    return out


def _clear(exc: BaseException) -> bool:
    """A ValueError / TypeError (NotSupportedError is one) raised by attnkit's code, not by torch's."""
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    last = traceback.extract_tb(exc.__traceback__)[-1].filename
    return os.path.abspath(last).startswith(ATTNKIT_DIR)


def _build(m, causal: bool, n: int, dtype=torch.float32):
    built, _ = build_small(m, heads=HEADS, head_dim=HEAD_DIM, seq_len=max(n, 1), causal=causal, dtype=dtype)
    return built


def _inputs(m, n: int, scale: float = 1.0, nan: bool = False, dtype=torch.float32) -> list:
    try:
        inputs = list(mechanism_inputs(m, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, seq_len=n, dtype=dtype))
    except ValueError:
        if n:
            raise
        # a record whose example inputs are a grid (2-D mixers) cannot be asked for 0 tokens: an empty first axis
        inputs = [t[:, :0] for t in mechanism_inputs(m, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, seq_len=4,
                                                     dtype=dtype)]
    if m.kind == "attention" and m.example_inputs is None:
        inputs = [t * scale for t in inputs]  # q, k, v
        which = 1  # the key
    else:
        inputs[0] = inputs[0] * scale  # the token mixer's input x (positions etc. stay as they are)
        which = 0
    if nan:
        t = inputs[which].clone()
        tokens = t.view(t.shape[0], -1, t.shape[-1]) if m.kind == "mixer" else t[0, 0]
        if m.kind == "mixer":
            tokens[:, tokens.shape[1] // 2, 0] = float("nan")
        else:
            t[0, 0, n // 2, 0] = float("nan")
        inputs[which] = t
    return inputs


def _call(m, built, inputs):
    """``(out, attnkit_warnings)`` or raises."""
    if not m.deterministic:
        torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = built(*inputs)
    said = [str(w.message) for w in caught if "/torch/" not in w.filename.replace(os.sep, "/")
            and not issubclass(w.category, DeprecationWarning)]
    return out, said


def _finite_or_said(m, causal, n, scale):
    built = _build(m, causal, n)
    try:
        out, said = _call(m, built, _inputs(m, n, scale))
    except Exception as exc:  # noqa: BLE001 - the point is which exceptions
        assert _clear(exc), f"{m.name}: not a clear attnkit error: {type(exc).__name__}: {exc}"
        return
    if said:
        return  # non-finite or zero output is allowed once attnkit has said why
    assert torch.isfinite(out).all(), f"{m.name}: silent non-finite output at scale x{scale:g}, length {n}"
    if out.numel() and bool((out == 0).all()):
        out64, _ = _call(m, _build(m, causal, n, torch.float64), _inputs(m, n, scale, dtype=torch.float64))
        assert out64.abs().max() < 1e-30, f"{m.name}: all-zero output at scale x{scale:g}, length {n}"


@pytest.mark.parametrize(("name", "causal", "scale"), _params("scale", SCALES))
def test_input_scale_gives_finite_output_or_a_clear_error(name, causal, scale):
    _finite_or_said(attnkit.mechanism_info(name), causal, SEQ, scale)


@pytest.mark.parametrize(("name", "causal"), _params("length1"))
def test_length_one(name, causal):
    _finite_or_said(attnkit.mechanism_info(name), causal, 1, 1.0)


@pytest.mark.parametrize(("name", "causal"), _params("length0"))
def test_length_zero_is_empty_or_a_clear_error(name, causal):
    m = attnkit.mechanism_info(name)
    built = _build(m, causal, 0)
    inputs = _inputs(m, 0)
    try:
        out, _ = _call(m, built, inputs)
    except Exception as exc:  # noqa: BLE001
        assert _clear(exc), f"{name}: length 0 is not a clear attnkit error: {type(exc).__name__}: {exc}"
        return
    assert out.numel() == 0, f"{name}: length 0 gave a non-empty output {tuple(out.shape)}"
    if m.kind == "attention":
        q, _, v = inputs[:3]
        assert tuple(out.shape) == (*q.shape[:-1], v.shape[-1]), f"{name}: shape {tuple(out.shape)}"
    else:
        assert tuple(out.shape) == tuple(inputs[0].shape), f"{name}: shape {tuple(out.shape)}"


@pytest.mark.parametrize(("name", "causal"), _params("nan"))
def test_a_nan_key_propagates_or_is_a_clear_error(name, causal):
    m = attnkit.mechanism_info(name)
    built = _build(m, causal, SEQ)
    try:
        out, _ = _call(m, built, _inputs(m, SEQ, nan=True))
    except Exception as exc:  # noqa: BLE001
        assert _clear(exc), f"{name}: a NaN key is not a clear attnkit error: {type(exc).__name__}: {exc}"
        return
    assert not bool((out == 0).all()), f"{name}: all zeros with a NaN key"
    assert not bool(torch.isfinite(out).all()), f"{name}: finite output that ignored a NaN key"
