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
    why.extend(_auto_float32(call))
    m = call.get("features")
    if m is not None and m > MAX_FEATURES:
        why.append(f"{m} features > {MAX_FEATURES} (fla's chunk kernels)")
    return why


def _auto_float32(call) -> list[str]:
    # fla autotunes its Triton kernels per shape on first use; in float32 that took minutes on an H200 (the
    # retention mixer test, float32, routed here: 189 s), while attnkit's own chunked engine runs float32 at once
    if call.get("auto") and call["dtype"] == torch.float32:
        return ["float32 under auto (fla's first float32 call autotunes its Triton kernels for minutes; attnkit's "
                "engine runs float32; name engine='fla' to force it)"]
    return []


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


# ------------------------------------------------------------------------------------------------------------
# Gated linear attention and the (gated) delta rule
# ------------------------------------------------------------------------------------------------------------
# fla's chunked kernels (fla-core 0.6 signatures, keyword arguments; all on [B, T, H, *] with (o, final_state)
# returned and states [B, H, K, V]):
#   fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=[B, T, H], scale=, initial_state=, output_final_state=)
#   fla.ops.gla.chunk_gla(q, k, v, g=[B, T, H, K], scale=, initial_state=, output_final_state=)
#   fla.ops.delta_rule.chunk_delta_rule(q, k, v, beta=[B, T, H], scale=, initial_state=, output_final_state=)
#   fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g=[B, T, H], beta=[B, T, H], scale=, ...)
# computing o_t = scale * S_t^T q_t with the states of attnkit's definitions (attnkit.ops.linear.gated):
#   GLA: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T (g <= 0, log space, scalar per head or per key dim);
#   delta rule: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ([K, V] layout, as attnkit's).
# Conventions handled here: layout [batch, heads, seq, *] <-> [batch, seq, heads, *]; attnkit applies no scale
# (q and k are used as given), so scale=1; grouped-query k / v repeated to the query heads; log decays and beta
# from [b, h, n(, d_k)] to [b, n, h(, d_k)] (decays float32, beta in the inputs' dtype); the initial state
# passed as fla's initial_state in float32 and the final state returned float32, attnkit's state dtype for half
# inputs. fla's delta-rule kernels refuse float32, so float32 calls run attnkit's own engine.

GATED_KERNELS = {
    ("gla", False): ("fla.ops.simple_gla", "chunk_simple_gla"),
    ("gla", True): ("fla.ops.gla", "chunk_gla"),
    ("delta", False): ("fla.ops.delta_rule", "chunk_delta_rule"),
    ("delta", True): ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
}


def fla_gated_reasons(call) -> list[str]:
    """Why fla cannot run a ``gated`` (GLA) or ``delta`` (delta rule) call (attnkit.backends.catalog.gated_call)."""
    why = []
    if call["mode"] not in ("auto", "chunked"):
        why.append(f"mode={call['mode']!r} (fla runs the chunked form; use mode='auto' or 'chunked')")
    if call.get("auto") and call["q"].shape[2] == 1:
        why.append("a single token under auto (decoding: attnkit's recurrent step reads the state once)")
    if call["kind"] == "delta" and call["dtype"] == torch.float32:
        why.append("float32 (fla's delta-rule kernels run float16 / bfloat16 only)")
    else:
        why.extend(_auto_float32(call))
    if call["head_dim"] > MAX_FEATURES or call["head_dim_v"] > MAX_FEATURES:
        why.append(f"head dims {call['head_dim']} / {call['head_dim_v']} > {MAX_FEATURES} (fla's chunk kernels)")
    return why


def _to_fla(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous()  # [b, h, n, ...] -> [b, n, h, ...]


def fla_gated_run(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, log_decay: torch.Tensor | None,
                  beta: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                  return_state: bool = False):
    """attnkit's ``gated_linear_attention`` (``kind="gla"``) or ``delta_rule_attention`` (``kind="delta"``) on
    fla's kernels. ``q [b, h, n, d_k]``, ``k [b, h_kv, n, d_k]``, ``v [b, h_kv, n, d_v]``, ``log_decay [b, h, n]``
    or ``[b, h, n, d_k]`` (GLA) / ``[b, h, n]`` or None (delta), ``beta [b, h, n]``, ``initial_state
    [b, h, d_k, d_v]``. Returns ``out [b, h, n, d_v]`` in q's dtype (and the float32 state with
    ``return_state``). Inputs are validated by the caller."""
    from attnkit._checks import repeat_kv

    h = q.shape[1]
    vector = log_decay is not None and log_decay.dim() == 4
    module, fn_name = GATED_KERNELS[(kind, vector if kind == "gla" else log_decay is not None)]
    fn = getattr(import_optional(module, "fla"), fn_name)
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    qf, kf, vf = (_to_fla(t.to(dt)) for t in (q, repeat_kv(k, h), repeat_kv(v, h)))
    kw = dict(scale=1.0, initial_state=None if initial_state is None else initial_state.to(torch.float32).contiguous(),
              output_final_state=return_state)
    if log_decay is not None:
        kw["g"] = _to_fla(log_decay.to(torch.float32))
    if kind == "delta":
        kw["beta"] = _to_fla(beta.to(dt))
    o, s = fn(qf, kf, vf, **kw)
    out = o.transpose(1, 2).to(q.dtype)
    return (out, s.to(torch.float32)) if return_state else out
