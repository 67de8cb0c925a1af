"""The ``fla`` backend: flash-linear-attention's chunked Triton kernels (``attnkit[fla]``) for causal
``attnkit.linear_attention``.

fla ("flash-linear-attention", Yang & Zhang; the chunkwise form of "Gated Linear Attention Transformers with
Hardware-Efficient Training", Yang et al., 2024) has ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=None,
g_gamma=None, scale=None, initial_state=None, output_final_state=False, ...)`` on ``[batch, seq, heads, dim]``
computing ``o_t = scale * q_t^T S_t`` with ``S_t = exp(g_gamma) S_{t-1} + k_t v_t^T`` (``g_gamma``: per-head log
decay). attnkit maps its causal linear attention onto that one call, keeping its own semantics exactly:

* the feature map is applied by attnkit (``phi(q)``, ``phi(k)``, any map, grouped-query keys repeated);
* the values get a column of ones, so the same kernel carries the denominator ``z_t = sum_j phi(k_j)`` as the
  last value column, and attnkit's ``finalize`` (denominator with its ``eps`` rule, ``none`` or ``rms``) runs on
  the result; ``scale = 1``;
* ``decay`` becomes ``g_gamma = log(decay)`` per head; a carried state is attnkit's extended state
  ``[S, z]`` ``[batch, heads, m, d_v + 1]``, which is exactly fla's ``initial_state`` / final state.

Half-precision inputs run the kernel in their own dtype (fla accumulates the state in float32); float32 in float32.
"""

from __future__ import annotations

import torch

from attnkit.backends.base import import_optional

__all__ = ["fla_reasons", "fla_run", "MAX_FEATURES"]

# Feature (key) dims above this are refused: fla's chunk kernels hold a [K, V] state tile per program.
MAX_FEATURES = 256


def fla_reasons(call) -> list[str]:
    why = []
    if not call["causal"]:
        why.append("non-causal (fla's kernels are causal; attnkit's parallel mode runs the non-causal form)")
    if call["mode"] not in ("auto", "chunked"):
        why.append(f"mode={call['mode']!r} (fla runs the chunked form; use mode='auto' or 'chunked')")
    if call.get("auto") and call["q"].shape[2] == 1:
        why.append("a single token under auto (decoding: attnkit's recurrent step reads the state once)")
    m = call.get("features")
    if m is not None and m > MAX_FEATURES:
        why.append(f"{m} features > {MAX_FEATURES} (fla's chunk kernels)")
    return why


def fla_run(qf: torch.Tensor, kf: torch.Tensor, v_ext: torch.Tensor, *, log_decay: torch.Tensor | None,
            s0: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``qf, kf [B, H, n, m]`` features, ``v_ext [B, H, n, d_v + 1]`` values with ones, ``s0 [B, H, m, d_v + 1]``
    -> ``(o_ext [B, H, n, d_v + 1], s_ext [B, H, m, d_v + 1])`` (float32), via ``chunk_simple_gla``."""
    simple_gla = import_optional("fla.ops.simple_gla", "fla")
    kernel_dt = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    q, k, v = (t.transpose(1, 2).to(kernel_dt).contiguous() for t in (qf, kf, v_ext))  # [B, n, H, *]
    g_gamma = None if log_decay is None else log_decay.to(device=q.device, dtype=torch.float32)
    init = None if s0 is None else s0.to(torch.float32).contiguous()
    o, s = simple_gla.chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, initial_state=init,
                                       output_final_state=True)
    return o.transpose(1, 2).float(), s.float()
