"""``linear_attention``: one entry point for kernelized linear attention in every mode."""

from __future__ import annotations

import warnings

import torch

from attnkit._checks import check_qkv, check_state
from attnkit.errors import NotSupportedError
from attnkit.feature_maps import FeatureMap, LogNormalFeatureMap, _PositiveRandomFeatureMap
from attnkit.feature_maps import get as get_feature_map
from attnkit.ops.linear._common import NORMALIZE, make_finalize, resolve_feature_map
from attnkit.ops.linear.chunked import chunked_forward
from attnkit.ops.linear.parallel import parallel_forward
from attnkit.ops.linear.recurrent import recurrent_forward
from attnkit.ops.linear.state import LinearAttentionState

__all__ = ["linear_attention", "gated_linear_attention", "delta_rule_attention", "MODES"]

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


def _lln_causal(q, k, v, fm: LogNormalFeatureMap, eps: float, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal LLN with a running (prefix) maximum as the key shift, exactly: the causal map drops the keys' global
    shift (it would depend on later keys), so ``exp(beta k)`` overflowed to inf and the output was NaN once
    ``|beta k|`` passed ~88 (float32; e.g. q, k at 10x unit scale, issue 28). With ``m_j = max_{r <= j, f}
    beta_r k_rf`` (prefix only, so causal) the keys ``exp(beta k_j - m_j) <= 1`` are carried in a state that decays
    by ``exp(m_{j-1} - m_j) <= 1`` per token: gated linear attention (:mod:`attnkit.ops.linear.gated`, chunked) over
    ``[v, 1]`` gives numerator and denominator both scaled by ``exp(-m_i)``, which cancels in their ratio (the
    online-softmax rescaling, applied to a linear-attention state); each query's shift is chosen against the
    visible keys' per-feature maxima (as FAVOR+'s in :mod:`attnkit.feature_maps`), so the denominator stays
    >= 1 when the query's largest feature is not the keys'."""
    from attnkit._checks import repeat_kv
    from attnkit.ops.linear._common import values_with_ones
    from attnkit.ops.linear.gated import _gated_chunked

    h = q.shape[1]
    alpha, beta = fm.temperatures(q, k)
    aq = alpha * q
    bk = repeat_kv(beta * k, h)
    with torch.no_grad():
        kmax = bk.cummax(-2).values  # [b, h, n, d]: each feature's largest key exponent in the prefix
        m = kmax.amax(-1)  # [b, h, n]: the prefix maximum of the key exponents
        g = torch.cat([torch.zeros_like(m[..., :1]), m[..., :-1] - m[..., 1:]], dim=-1)  # <= 0
        # the query shift (cancels per row) as FAVOR+'s: its best-matching visible key contributes exp(0) = 1 to
        # the denominator, which cannot underflow when q and the keys peak on different features; at most 60
        # below the query's own maximum (no query feature above e^60)
        shift = torch.maximum((aq + kmax - m[..., None]).amax(-1, keepdim=True), aq.amax(-1, keepdim=True) - 60.0)
    qf = torch.exp(aq - shift)
    kf = torch.exp(bk - m[..., None])
    # the decay-matrix path throughout: a later key's larger maximum must not switch earlier chunks to the
    # factorised path (outputs before position i stay bitwise independent of keys after it)
    ve = values_with_ones(v, h)
    s0 = qf.new_zeros(*qf.shape[:2], qf.shape[-1], ve.shape[-1])
    o_ext, _ = _gated_chunked(qf, kf, ve, g[..., None], s0, chunk_size, factorise=False)
    # >= 1 by construction except where the query shift is capped; a denominator below the floor (whose
    # 1 / floor^2, the reciprocal's gradient, stays finite) has underflowed: that row is 0, and we say so
    floor = 4.0 * torch.finfo(o_ext.dtype).max ** -0.5
    lost = o_ext[..., -1:] < floor  # NaN rows (NaN input) compare False: they propagate
    o_ext = o_ext.masked_fill(lost, 0.0)
    if bool(lost.any()):
        warnings.warn(
            f"linear_attention: with the causal 'lln' map some rows' denominators underflowed (those outputs "
            f"are 0): at this input scale the LLN kernel exp(alpha q) . exp(beta k) peaks on different features "
            f"for the query and its keys by more than {str(o_ext.dtype).replace('torch.', '')} can hold (query "
            f"exponents up to {float(aq.detach().abs().amax()):.3g}). Normalise or rescale q and k",
            RuntimeWarning, stacklevel=3)
    return make_finalize("denominator", min(eps, floor), dtype)(o_ext)


def _resolve_state(state, b: int, h: int, dv: int, device, fm: FeatureMap,
                   head_dim: int) -> tuple[torch.Tensor | None, int, torch.Tensor | None]:
    """``(S_ext [b, h, m, d_v + 1] or None, offset, key_shift [b, h] or None)`` of a given state, checked."""
    if state is None:
        return None, 0, None
    if isinstance(state, (tuple, list)) and len(state) == 2:
        state = LinearAttentionState(state[0], state[1], 0)
    if not isinstance(state, LinearAttentionState):
        raise TypeError("state must be a LinearAttentionState (returned with return_state=True) or a tuple (S, z)")
    S, z = state.S, state.z
    check_state("state", (S, z), torch.empty(0, device=device))
    if S.dim() != 4 or S.shape[0] != b or S.shape[1] != h or S.shape[3] != dv:
        raise ValueError(
            f"state.S must have shape [batch={b}, heads={h}, features, d_v={dv}], got {tuple(S.shape)}; "
            f"pass the state returned by a call with the same batch, query heads and value dim"
        )
    if tuple(z.shape) != tuple(S.shape[:3]):
        raise ValueError(f"state.z must have shape {tuple(S.shape[:3])}, got {tuple(z.shape)}")
    m = fm.feature_dim(head_dim)
    if state.feature_map is not None and state.feature_map != fm.name or S.shape[2] != m:
        made = f"feature map {state.feature_map!r}" if state.feature_map else f"{S.shape[2]} features"
        raise ValueError(
            f"state was made by {made} and cannot be continued with feature map {fm.name!r} ({m} features); "
            f"continue a state with the feature map (and parameters) that made it"
        )
    shift = state.key_shift
    if shift is not None and tuple(shift.shape) != (b, h):
        raise ValueError(f"state.key_shift must have shape [batch={b}, heads={h}], got {tuple(shift.shape)}")
    return state._extended().to(device), state.offset, shift


def _rescale_state(fm: FeatureMap, ctx: dict, h: int, s0: torch.Tensor | None,
                   old: torch.Tensor | None) -> torch.Tensor | None:
    """A stabilised map's key shift for this call and a carried state: ``c = max(this call's keys' shift, the
    state's)`` is written back to ``ctx`` and the state rescaled to it, ``S <- S exp(c_old - c)`` (a factor
    <= 1: no overflow; a state without a shift was summed with shift 0)."""
    if not ctx.get("stabilised") or s0 is None:
        return s0
    c = fm.call_key_shift(ctx)
    b, hk = c.shape[:2]
    c_old = torch.zeros(b, h, dtype=c.dtype, device=c.device) if old is None else old.to(c)
    c = torch.maximum(c, c_old.view(b, hk, h // hk).amax(-1)[..., None, None])
    ctx["key_shift"] = c
    rescale = torch.exp(c_old - c.view(b, hk, 1).expand(b, hk, h // hk).reshape(b, h))
    return s0 * rescale[..., None, None].to(s0.dtype)


def _watch_underflow(finalize):
    """``finalize`` that records whether any denominator was 0 (a stabilised positive map's denominators are
    positive unless they underflow), so the caller can say so instead of returning zeros silently."""

    def watched(o: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        zero = (o[..., -1] <= 0).any()  # a tensor: read once at the end (no device sync per block)
        watched.zeros = zero if watched.zeros is None else watched.zeros | zero
        return finalize(o) if out is None else finalize(o, out=out)

    watched.zeros = None  # type: ignore[attr-defined]
    watched.dtype = finalize.dtype  # type: ignore[attr-defined]
    return watched


_DISPATCH: list = []


def _dispatch():
    """attnkit.backends.dispatch, imported on first use (an import statement costs ~10 us per call)."""
    if not _DISPATCH:
        from attnkit.backends import dispatch

        _DISPATCH.append(dispatch)
    return _DISPATCH[0]


class _Named:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def _linear_backend(q, k, v, fm, causal, mode, engine, given) -> str:
    # the backend select() picks, remembered by the call's structure (a map given by name by its name, else by
    # identity)
    d = _dispatch()
    params = [p for p in fm.parameters() if p.requires_grad] if isinstance(fm, torch.nn.Module) else []
    holders: list = [] if isinstance(given, str) else [fm]
    fm_key = ("name", given) if isinstance(given, str) else id(fm)
    key = (q.shape, k.shape, v.shape, q.dtype, q.device, d.needs_grad([q, k, v, *params]), fm_key, causal, mode)

    def call():
        from attnkit.backends.catalog import linear_call

        return linear_call(q, k, v, feature_map=fm, causal=causal, mode=mode, features=fm.feature_dim(q.shape[-1]))

    return d.cached_select("linear", engine, key, call, holders)


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
        normalize: ``"denominator"`` (divide by ``phi(q_i)^T z_i``, pushed away from 0 to ``+-eps``; for the
            stabilised positive random features of FAVOR+ and DiJiang and for causal LLN, positive by construction,
            only from 0),
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
    fm = resolve_feature_map(feature_map, causal)
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
    if (causal and isinstance(fm, LogNormalFeatureMap) and fm.causal and fm.stabilize and decay is None
            and state is None and not return_state and normalize == "denominator" and engine in ("auto", "attnkit")
            and n > 0):
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        return _lln_causal(q.to(work), k.to(work), v.to(work), fm, eps, chunk_size, q.dtype)
    backend = _Named(_linear_backend(q, k, v, fm, causal, mode, engine, feature_map))
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

    if normalize != "denominator" and isinstance(fm, _PositiveRandomFeatureMap) and fm.stabilize:
        # rms: eps inside rsqrt makes a per-row factor not quite cancel
        if isinstance(feature_map, str):  # built here: the unshifted kernel is the one asked for
            fm = get_feature_map(feature_map, stabilize=False)
        else:
            raise ValueError(
                f"feature map {fm.name!r} is stabilised by shifts that cancel only with normalize='denominator'; "
                f"with normalize={normalize!r} build it with stabilize=False"
            )

    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qw, kw, vw = (t.to(work) for t in (q, k, v))
    s0, offset, old_shift = _resolve_state(state, b, h, dv, q.device, fm, q.shape[-1])
    s0 = None if s0 is None else s0.to(work)
    ld = _log_decay(decay, h, q.device)
    ld = None if ld is None else ld.to(work)

    # One scope for the whole call (engines compute features block by block): random maps count one call, and
    # stabilised maps (FAVOR+) share one key shift across the blocks and with the carried state.
    with fm.call(kw, qw, causal=causal, offset=offset) as ctx:
        s0 = _rescale_state(fm, ctx, h, s0, old_shift)
        if ctx.get("stabilised") and normalize == "denominator":
            # positive by construction, and rows whose keys all sit far from the query have small but exact
            # denominators: guard only against 0 (eps would bias them)
            eps = min(eps, torch.finfo(work).tiny)
        finalize = make_finalize(normalize, eps, q.dtype)
        if ctx.get("stabilised"):
            finalize = _watch_underflow(finalize)
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
    if getattr(finalize, "zeros", None) is not None and bool(finalize.zeros):
        warnings.warn(
            f"linear_attention: with feature map {fm.name!r} some rows' denominators underflowed to 0 (those "
            f"outputs are 0): the key features span more than {str(work).replace('torch.', '')} can hold even "
            f"after stabilisation (q, k of very large norm, causal rows that see only keys far smaller than the "
            f"largest). Normalise or rescale q and k, or compute in float64", RuntimeWarning, stacklevel=2)
    if not return_state:
        return out
    shift = None
    if ctx.get("stabilised"):
        hk = k.shape[1]
        shift = fm.call_key_shift(ctx).view(b, hk, 1).expand(b, hk, h // hk).reshape(b, h)
    return out, LinearAttentionState._from_extended(s, offset + k.shape[2], shift, fm.name)


def _gated_checks(q, k, v, mode, chunk_size, initial_state):
    from attnkit.ops.linear import gated as G

    check_qkv(q, k, v)
    b, h, n, dk = q.shape
    if k.shape[2] != n:
        raise NotSupportedError(f"gated / delta-rule attention is causal: it needs as many queries as keys (got {n} "
                                f"and {k.shape[2]}); carry earlier tokens in initial_state= instead")
    if mode not in G.MODES:
        raise ValueError(f"mode must be one of {', '.join(G.MODES)}, got {mode!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if initial_state is not None and (not isinstance(initial_state, torch.Tensor)
                                      or tuple(initial_state.shape) != (b, h, dk, v.shape[-1])):
        raise ValueError(f"initial_state must be a tensor [batch={b}, heads={h}, d_k={dk}, d_v={v.shape[-1]}]; pass "
                         f"the state returned by a call with return_state=True")


def _gated_backend(op: str, engine: str, q, k, v, mode, grads) -> str:
    d = _dispatch()
    key = (q.shape, k.shape, v.shape, q.dtype, q.device, d.needs_grad([q, k, v, *grads]), mode)

    def call():
        from attnkit.backends.catalog import gated_call

        return gated_call("gla" if op == "gated" else "delta", q, k, v, mode=mode, grads=grads)

    return d.cached_select(op, engine, key, call, [])


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                           mode: str = "auto", chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                           return_state: bool = False, engine: str = "auto"):
    """Gated linear attention (GLA, Yang et al. 2024, eq. 3) through the backend dispatch: ``engine="auto"`` runs
    fla's ``chunk_gla`` / ``chunk_simple_gla`` on CUDA when ``attnkit[fla]`` is installed, else attnkit's engine
    (:func:`attnkit.ops.linear.gated.gated_linear_attention`, whose docstring gives the arguments and shapes);
    ``"attnkit"`` or ``"fla"`` name one (``attnkit backends --operation gated``)."""
    from attnkit.ops.linear import gated as G

    if _gated_backend("gated", engine, q, k, v, mode, [log_decay]) == "fla":
        _gated_checks(q, k, v, mode, chunk_size, initial_state)
        g = G._check_log_decay(log_decay, q, vector_ok=True, work=torch.float32)
        from attnkit.backends.fla import fla_gated_run

        return fla_gated_run("gla", q, k, v, log_decay=g if g.shape[-1] > 1 else g[..., 0],
                             initial_state=initial_state, return_state=return_state)
    return G.gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=chunk_size,
                                    initial_state=initial_state, return_state=return_state)


def delta_rule_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                         log_decay: torch.Tensor | None = None, mode: str = "auto", chunk_size: int = 32,
                         initial_state: torch.Tensor | None = None, return_state: bool = False, engine: str = "auto"):
    """The (gated) delta rule (DeltaNet; Gated Delta Networks, eq. 10) through the backend dispatch:
    ``engine="auto"`` runs fla's ``chunk_delta_rule`` / ``chunk_gated_delta_rule`` on CUDA for half precision
    when ``attnkit[fla]`` is installed, else attnkit's WY/UT engine (:func:`attnkit.ops.linear.gated.
    delta_rule_attention`, whose docstring gives the arguments and shapes); ``"attnkit"`` or ``"fla"`` name one."""
    from attnkit.ops.linear import gated as G

    grads = [t for t in (beta, log_decay) if isinstance(t, torch.Tensor)]
    if _gated_backend("delta", engine, q, k, v, mode, grads) == "fla":
        _gated_checks(q, k, v, mode, chunk_size, initial_state)
        bt = G._check_gate("beta", beta, q, vector_ok=False, work=torch.float32)
        if bt is None:
            raise TypeError("beta is required ([batch, heads, seq] writing strengths)")
        g = G._check_log_decay(log_decay, q, vector_ok=False, work=torch.float32)
        from attnkit.backends.fla import fla_gated_run

        return fla_gated_run("delta", q, k, v, log_decay=None if g is None else g[..., 0], beta=bt[..., 0],
                             initial_state=initial_state, return_state=return_state)
    return G.delta_rule_attention(q, k, v, beta, log_decay=log_decay, mode=mode, chunk_size=chunk_size,
                                  initial_state=initial_state, return_state=return_state)
