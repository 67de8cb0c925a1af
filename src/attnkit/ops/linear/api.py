"""``linear_attention``: one entry point for kernelized linear attention in every mode."""

from __future__ import annotations

import torch

from attnkit._checks import check_qkv
from attnkit.errors import NotSupportedError
from attnkit.feature_maps import FeatureMap
from attnkit.feature_maps import get as get_feature_map
from attnkit.ops.linear._common import NORMALIZE, make_finalize
from attnkit.ops.linear.chunked import chunked_forward
from attnkit.ops.linear.parallel import parallel_forward
from attnkit.ops.linear.recurrent import recurrent_forward
from attnkit.ops.linear.state import LinearAttentionState

__all__ = ["linear_attention", "MODES"]

MODES = ("auto", "parallel", "chunked", "recurrent")


def _log_decay(decay, heads: int, device: torch.device) -> torch.Tensor | None:
    if decay is None:
        return None
    lam = torch.as_tensor(decay, dtype=torch.float64).detach().reshape(-1)
    if lam.numel() == 1:
        lam = lam.expand(heads)
    if lam.numel() != heads:
        raise ValueError(f"decay must be a float or have one value per query head ({heads}), got {lam.numel()}")
    if not bool(((lam > 0) & (lam <= 1)).all()):
        raise ValueError(f"decay values must lie in (0, 1], got {lam.tolist()}")
    return torch.log(lam).to(device)


def _resolve_state(state, b: int, h: int, dv: int, device) -> tuple[torch.Tensor | None, int]:
    if state is None:
        return None, 0
    if isinstance(state, (tuple, list)) and len(state) == 2:
        state = LinearAttentionState(state[0], state[1], 0)
    if not isinstance(state, LinearAttentionState):
        raise TypeError("state must be a LinearAttentionState (returned with return_state=True) or a tuple (S, z)")
    S, z = state.S, state.z
    if S.dim() != 4 or S.shape[0] != b or S.shape[1] != h or S.shape[3] != dv:
        raise ValueError(
            f"state.S must have shape [batch={b}, heads={h}, features, d_v={dv}], got {tuple(S.shape)}; "
            f"pass the state returned by a call with the same batch, query heads and value dim"
        )
    if tuple(z.shape) != tuple(S.shape[:3]):
        raise ValueError(f"state.z must have shape {tuple(S.shape[:3])}, got {tuple(z.shape)}")
    return state._extended().to(device), state.offset


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     feature_map: str | FeatureMap = "elu", causal: bool = False, mode: str = "auto",
                     chunk_size: int = 64, decay: float | torch.Tensor | None = None,
                     normalize: str = "denominator", eps: float = 1e-6,
                     state: LinearAttentionState | tuple[torch.Tensor, torch.Tensor] | None = None,
                     return_state: bool = False, engine: str = "auto"):
    """Kernelized linear attention ``o_i = phi(q_i)^T S_i / phi(q_i)^T z_i`` (Katharopoulos et al., 2020).

    Args:
        q: ``[batch, heads, n, d]``; k: ``[batch, kv_heads, n_k, d]``; v: ``[batch, kv_heads, n_k, d_v]``
            (``heads`` a multiple of ``kv_heads``: grouped-query keys are shared by their query group).
        feature_map: a name from ``attnkit.feature_maps`` (``"elu"``, ``"favor"``, ``"taylor"``, ...) or a
            :class:`~attnkit.feature_maps.FeatureMap` (learnable maps are modules: pass the instance).
        causal: token ``i`` attends to ``j <= i`` (needs ``n == n_k``).
        mode: ``"parallel"`` (non-causal O(n m d_v); causal as the masked O(n^2) product), ``"chunked"``
            (causal: intra-chunk quadratic + inter-chunk state, Lightning Attention-2), ``"recurrent"``
            (causal: token by token, the decoding path) or ``"auto"`` (parallel if non-causal, recurrent for a
            single causal token, chunked otherwise).
        chunk_size: tokens per chunk in chunked mode (a speed knob; results do not depend on it).
        decay: per-head decay ``lambda in (0, 1]`` of the state (float or ``[heads]``); causal only:
            ``S_i = lambda S_{i-1} + phi(k_i) v_i^T`` (RetNet / Lightning style).
        normalize: ``"denominator"`` (divide by ``phi(q_i)^T z_i``, pushed away from 0 to ``+-eps``),
            ``"none"`` (no denominator; TransNormer applies a norm after) or ``"rms"`` (RMS-normalised output).
        state: a :class:`LinearAttentionState` (``S [batch, heads, m, d_v]``, ``z [batch, heads, m]``) from a
            previous call: this call continues that sequence.
        return_state: also return the state after the last token.
        engine: ``"auto"`` (flash-linear-attention's chunked kernels for causal calls on CUDA when ``attnkit[fla]``
            is installed, else attnkit's own modes), ``"attnkit"``, ``"fla"`` or ``"reference"`` (the materialised
            quadratic form, for tests; see ``attnkit backends``).

    Returns:
        ``out [batch, heads, n, d_v]`` in the dtype of ``q`` (half precisions compute in float32), and with
        ``return_state`` the pair ``(out, LinearAttentionState)``.
    """
    check_qkv(q, k, v)
    fm = get_feature_map(feature_map)
    b, h, n, _ = q.shape
    dv = v.shape[-1]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if causal and k.shape[2] != n:
        raise NotSupportedError(
            f"causal linear attention needs as many queries as keys (got {n} and {k.shape[2]}); "
            f"carry earlier keys in state= instead"
        )
    if decay is not None and not causal:
        raise NotSupportedError("decay is defined for causal attention only; pass causal=True or decay=None")
    from attnkit.backends import select
    from attnkit.backends.catalog import linear_call

    backend = select("linear", engine, linear_call(q, k, v, feature_map=fm, causal=causal, mode=mode,
                                                   features=fm.feature_dim(q.shape[-1])))
    if backend.name == "reference":
        from attnkit.ops.linear.reference import linear_attention_reference

        if isinstance(state, (tuple, list)):
            state = LinearAttentionState(state[0], state[1], 0)
        return linear_attention_reference(q, k, v, feature_map=fm, causal=causal, decay=decay, normalize=normalize,
                                          eps=eps, state=state, return_state=return_state)
    if mode == "auto":
        mode = "parallel" if not causal else ("recurrent" if n == 1 else "chunked")
    if backend.name == "fla":
        mode = "fla"
    if not causal and mode != "parallel":
        raise NotSupportedError(
            f"mode={mode!r} is a causal form; non-causal linear attention runs in mode='parallel' "
            f"(or pass causal=True)"
        )
    if (state is not None or return_state) and not fm.token_local:
        raise NotSupportedError(
            f"feature map {fm.name!r} is not token-local as configured (its features depend on the whole "
            f"call), so a state cannot be carried; fix its parameters (e.g. cosformer max_len=, lln alpha=, "
            f"beta=, stabilize=False)"
        )

    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qw, kw, vw = (t.to(work) for t in (q, k, v))
    s0, offset = _resolve_state(state, b, h, dv, q.device)
    s0 = None if s0 is None else s0.to(work)
    ld = _log_decay(decay, h, q.device)
    ld = None if ld is None else ld.to(work)
    finalize = make_finalize(normalize, eps, q.dtype)

    if mode == "fla":
        from attnkit.backends.fla import fla_run
        from attnkit.ops.linear._common import features, values_with_ones

        qf, kf = features(fm, qw, kw, offset, offset)
        o_ext, s = fla_run(qf, kf, values_with_ones(vw, h), log_decay=ld, s0=s0, dtype=q.dtype)
        out = finalize(o_ext.to(work))
    elif mode == "parallel":
        out, s = parallel_forward(qw, kw, vw, fm, causal=causal, log_decay=ld, s0=s0, offset=offset,
                                  finalize=finalize)
    elif mode == "chunked":
        out, s = chunked_forward(qw, kw, vw, fm, log_decay=ld, s0=s0, offset=offset, chunk_size=chunk_size,
                                 finalize=finalize)
    else:
        out, s = recurrent_forward(qw, kw, vw, fm, log_decay=ld, s0=s0, offset=offset, finalize=finalize)
    if not return_state:
        return out
    return out, LinearAttentionState._from_extended(s, offset + k.shape[2])
