"""Input validation shared by every engine: clear errors that name the argument and the fix."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, allow_gqa: bool = True) -> None:
    """Validate ``q [batch, heads, q_len, dim]``, ``k [batch, kv_heads, kv_len, dim]``, ``v [batch, kv_heads,
    kv_len, dim_v]``. Raises ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong shapes."""
    # Fast accept (every call of every engine passes here): one combined test; any doubt runs the checks below,
    # which say what is wrong.
    if type(q) is type(k) is type(v) is torch.Tensor:
        qs, ks, vs = q.shape, k.shape, v.shape
        if (len(qs) == len(ks) == len(vs) == 4 and q.dtype in FLOAT_DTYPES and q.dtype == k.dtype == v.dtype
                and q.device == k.device == v.device and qs[0] == ks[0] == vs[0] and ks[1] == vs[1]
                and ks[2] == vs[2] and qs[3] == ks[3] and qs[1] > 0 and ks[1] > 0 and qs[1] % ks[1] == 0
                and (allow_gqa or qs[1] == ks[1]) and qs[2] > 0 and ks[2] > 0):
            return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions [batch, heads, seq, dim], got shape {tuple(t.shape)}; "
                f"add missing axes with .unsqueeze() or move heads with .transpose(1, 2)"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast with .to()")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] == 0:
            raise ValueError(f"{name} has 0 heads (shape {tuple(t.shape)}); heads and kv_heads must be >= 1")
    if q.shape[1] % k.shape[1] != 0 or (not allow_gqa and q.shape[1] != k.shape[1]):
        raise ValueError(
            f"q has {q.shape[1]} heads and k/v have {k.shape[1]}: the number of query heads must be a "
            f"multiple of the number of key/value heads (grouped-query attention)"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: q_len={q.shape[2]}, kv_len={k.shape[2]}")


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}; pass None for 1/sqrt(head_dim)")
    return float(scale)


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Expand ``[batch, kv_heads, seq, dim]`` to ``[batch, num_heads, seq, dim]`` (GQA to MHA), as a view."""
    b, hkv, n, d = x.shape
    if hkv == num_heads:
        return x
    g = num_heads // hkv
    return x[:, :, None].expand(b, hkv, g, n, d).reshape(b, num_heads, n, d)


def check_state(name: str, tensors, like: torch.Tensor) -> None:
    """A carried state (``initial_state=``, ``state=``) must be floating-point tensors on the device of ``like``
    (the queries): otherwise torch fails deep inside with a message that does not name the argument."""
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must hold tensors (the state returned with return_state=True), got "
                            f"{type(t).__name__}")
        if t.device != like.device:
            raise ValueError(f"{name} must be on the device of q ({like.device}), got {t.device}; move it with "
                             f".to(q.device)")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating-point (the state returned with return_state=True), got "
                            f"{t.dtype}")
