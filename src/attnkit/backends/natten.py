"""The ``natten`` backend: NATTEN's fused neighborhood attention (``attnkit[natten]``) for ``attnkit.neighborhood``.

"Neighborhood Attention Transformer" (Hassani et al., 2023) and "Faster Neighborhood Attention" (Hassani et al.,
2024); NATTEN >= 0.20 exposes ``natten.na1d / na2d / na3d(query, key, value, kernel_size, stride=1, dilation=1,
is_causal=False, scale=None, ..., return_lse=False)`` on the heads-last layout ``[batch, *spatial, heads,
head_dim]`` (``head_dim_v`` may differ; fewer key/value heads are accepted). attnkit's neighborhood semantics are
NATTEN's (clamped windows, dilation groups, stride, causal per axis), so the adapter only moves the heads axis.

NATTEN's own relative positional bias was removed in 0.20, so calls with a ``score_mod`` are refused. On CPU NATTEN
runs through its ``flex-fna`` backend (FlexAttention), which has no backward there: inference only.
"""

from __future__ import annotations

import torch

from attnkit.backends.base import import_optional

__all__ = ["natten_reasons", "natten_run"]


def natten_reasons(call) -> list[str]:
    why = []
    if call["score_mod"] is not None:
        why.append("score_mod given (NATTEN >= 0.20 takes no score modifier or positional bias)")
    if call["device"].type == "cpu":
        if call["needs_grad"]:
            why.append("gradients requested on CPU (NATTEN's CPU path, flex-fna, has no backward there)")
        if call["head_dim_v"] != call["head_dim"]:
            why.append(f"value head dim {call['head_dim_v']} != {call['head_dim']} on CPU (NATTEN's flex-fna needs "
                       f"equal head dims)")
    natten = _natten_version()
    if natten is not None and natten < (0, 20):
        why.append(f"natten {'.'.join(map(str, natten))} is older than 0.20 (the na*d API this adapter targets)")
    return why


def _natten_version() -> tuple[int, ...] | None:
    try:
        from importlib.metadata import version

        return tuple(int(x) for x in version("natten").split(".")[:2])
    except Exception:  # noqa: BLE001 - unknown version: let the call decide
        return None


def natten_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec, *, scale: float) -> torch.Tensor:
    """``q [B, H, *S, D]``, ``k, v [B, Hkv, *S, D(v)]`` -> ``[B, H, *S, Dv]`` through ``natten.na{1,2,3}d``."""
    natten = import_optional("natten", "natten")
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[spec.ndim]
    qn, kn, vn = (t.movedim(1, -2) for t in (q, k, v))  # [B, *S, H, D]: NATTEN's heads-last layout
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        qn, kn, vn = qn.detach(), kn.detach(), vn.detach()
    out = fn(qn, kn, vn, kernel_size=spec.kernel_size, stride=tuple(a.stride for a in spec.axes),
             dilation=tuple(a.dilation for a in spec.axes), is_causal=tuple(a.causal for a in spec.axes),
             scale=scale)
    return out.movedim(-2, 1)
