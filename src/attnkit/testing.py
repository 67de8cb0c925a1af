"""Comparison helpers and per-dtype tolerances shared by the test suite of every family.

Tolerances are declared once here. float32 paths reorder sums (tiles, chunks), so they agree with a
float64 reference to ~1e-5 relative; half precisions store each element with an 8-bit (bf16) or 11-bit
(fp16) mantissa, so outputs in [-1, 1] differ by a few units in the last place: 2^-8 and 2^-11 scaled.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 2e-5, "rtol": 2e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """``atol``/``rtol`` for comparing a ``dtype`` result with a higher-precision reference."""
    tol = TOLERANCES[dtype]
    return {"atol": tol["atol"] * scale, "rtol": tol["rtol"] * scale}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """``torch.testing.assert_close`` with attnkit's tolerance for ``dtype`` (default: ``actual.dtype``)."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), **tolerance(dtype, scale), msg=msg or None
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error ||actual - expected|| / ||expected||, computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def random_qkv(batch: int = 2, heads: int = 4, q_len: int = 16, kv_len: int | None = None, dim: int = 16,
               *, kv_heads: int | None = None, dim_v: int | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0, requires_grad: bool = False):
    """Seeded random ``q [b, h, q_len, dim]``, ``k [b, kv_heads, kv_len, dim]``,
    ``v [b, kv_heads, kv_len, dim_v]``."""
    g = torch.Generator().manual_seed(seed)
    kv_len = q_len if kv_len is None else kv_len
    kv_heads = heads if kv_heads is None else kv_heads
    dim_v = dim if dim_v is None else dim_v
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, dim_v, generator=g)
    out = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return tuple(out)


def mechanism_inputs(mechanism, *, batch: int = 2, heads: int = 2, head_dim: int = 16, seq_len: int = 16,
                     dtype: torch.dtype = torch.float32, seed: int = 0, requires_grad: bool = False) -> tuple:
    """Seeded example inputs for a registry record: its own ``example_inputs`` when it has one, else
    ``(q, k, v)`` ``[batch, heads, seq_len, head_dim]`` for attention and ``x [batch, seq_len, heads * head_dim]``
    for mixers."""
    if mechanism.example_inputs is not None:
        inputs = mechanism.example_inputs(batch=batch, seq_len=seq_len, dtype=dtype, seed=seed, heads=heads,
                                          head_dim=head_dim)
    elif mechanism.kind == "mixer":
        g = torch.Generator().manual_seed(seed)
        inputs = (torch.randn(batch, seq_len, heads * head_dim, generator=g).to(dtype),)
    else:
        inputs = random_qkv(batch, heads, seq_len, seq_len, head_dim, dtype=dtype, seed=seed)
    return tuple(t.detach().requires_grad_(requires_grad) if t.is_floating_point() else t for t in inputs)


def build_small(mechanism, *, heads: int = 2, head_dim: int = 16, seq_len: int = 16, causal: bool = False,
                dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """``mechanism`` built for short test sequences (``small_params``, else ``bench_params``) with the shape
    arguments it declares in ``needs``; modules are cast to ``dtype``. Returns ``(built, params)``."""
    params = dict(mechanism.small_params or mechanism.bench_params)
    known = {"num_heads": heads, "head_dim": head_dim, "seq_len": seq_len, "dim": heads * head_dim}
    params.update({k: known[k] for k in mechanism.needs})
    if causal:
        params["causal"] = True
    params.update(overrides)
    torch.manual_seed(seed)
    built = mechanism.build(**params)
    if isinstance(built, torch.nn.Module):
        built = built.to(dtype)
    return built, params
