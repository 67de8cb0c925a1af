"""``approximation_error``: how far an approximate mechanism is from exact softmax on the same inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from attnkit._checks import check_qkv, default_scale, repeat_kv
from attnkit.registry import mechanism_info

__all__ = ["ApproximationError", "approximation_error", "exact_softmax"]

# Attention matrices ([batch, heads, q_len, kv_len] entries) are only materialised up to this size.
MAX_MATRIX_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ApproximationError:
    """Errors of an approximation against the target (exact softmax unless told otherwise).

    ``output_relative = ||O - O*||_F / ||O*||_F`` and ``output_max = max |O - O*|`` over the outputs;
    ``attention_relative`` / ``attention_max`` the same for the ``[b, h, n, n_k]`` attention matrices, or
    None where the method defines no matrix or the inputs are too large to materialise one."""

    output_relative: float
    output_max: float
    attention_relative: float | None = None
    attention_max: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def exact_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None, return_attention: bool = False):
    """Exact softmax attention (``scaled_dot_product_attention``, GQA expanded); with ``return_attention``
    also the materialised ``[b, h, n, n_k]`` softmax matrix."""
    check_qkv(q, k, v)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scale = default_scale(q, scale)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if not return_attention:
        return out
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return out, torch.softmax(s, dim=-1)


def _errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    a, e = actual.detach().double(), expected.detach().double()
    diff = a - e
    return float(diff.norm() / e.norm().clamp_min(1e-300)), float(diff.abs().max())


def approximation_error(mechanism: str | Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
                        target: Callable[..., Any] | None = None, attention: bool | None = None,
                        **params: Any) -> ApproximationError:
    """Measure ``mechanism`` against exact softmax attention on ``q [b, h, n, d]``, ``k``, ``v``.

    ``mechanism``: a registry name (built with ``causal``, ``scale`` and ``params``; shape arguments it
    needs are taken from the inputs) or a callable ``(q, k, v, **params) -> out``. ``target``: the exact
    answer, default :func:`exact_softmax`; a callable ``(q, k, v, return_attention=...)`` (e.g.
    ``soft.gaussian_kernel_attention`` for SOFT, ``yoso.yoso_expectation`` for YOSO), called in float64
    on small inputs. ``attention``: compare attention matrices too (default: when the mechanism exposes
    ``attention_matrix(q, k, v)`` and ``b h n n_k <= 2^24``).
    """
    check_qkv(q, k, v)
    if isinstance(mechanism, str):
        info = mechanism_info(mechanism)
        shapes = {"num_heads": q.shape[1], "head_dim": q.shape[-1], "seq_len": k.shape[2]}
        build = {key: shapes[key] for key in info.needs if key not in params}
        if scale is not None:
            build["scale"] = scale
        fn = info.build(causal=causal, **build, **params)
    elif callable(mechanism):
        fn = mechanism if not params else (lambda q_, k_, v_: mechanism(q_, k_, v_, **params))
    else:
        raise TypeError(f"mechanism must be a registry name or a callable, got {type(mechanism).__name__}")
    small = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MAX_MATRIX_ELEMENTS
    matrix_fn = getattr(fn, "attention_matrix", None)
    if attention is None:
        attention = small and matrix_fn is not None
    elif attention and matrix_fn is None:
        raise ValueError("attention=True but this mechanism exposes no attention_matrix(q, k, v)")
    with torch.no_grad():
        out = fn(q, k, v)
        # A float64 target on small inputs; on long inputs the input dtype (SDPA keeps memory linear).
        qt, kt, vt = (t.double() for t in (q, k, v)) if small else (q, k, v)
        if target is None:
            def target(q_, k_, v_, return_attention=False):
                return exact_softmax(q_, k_, v_, causal=causal, scale=scale, return_attention=return_attention)
        if not attention:
            expected = target(qt, kt, vt)
            return ApproximationError(*_errors(out, expected))
        expected, expected_attn = target(qt, kt, vt, return_attention=True)
        approx_attn = matrix_fn(q, k, v)
    return ApproximationError(*_errors(out, expected), *_errors(approx_attn, expected_attn))


