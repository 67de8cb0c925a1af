"""Data-dependent decay and the delta rule: the linear-attention engine with per-token gates.

Two recurrences over a state ``S [batch, heads, d_k, d_v]`` (one row per key dimension), read out as
``o_t = q_t^T S_t`` (unnormalised, as in the papers: modules apply their own output norm):

- **gated linear attention** (GLA, Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
  Training", eq. 3; RetNet / Lightning's fixed decay is the constant special case):
  ``S_t = diag(a_t) S_{t-1} + k_t v_t^T`` with ``a_t = exp(g_t)`` and ``g_t <= 0`` given per token either as one
  scalar per head (``log_decay [b, h, n]``) or as a vector over key dimensions (``log_decay [b, h, n, d_k]``);
- **the delta rule** (DeltaNet; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
  Sequence Length", eq. 1): ``S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T`` in the paper's
  ``[d_v, d_k]`` layout, here transposed: ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``. With an
  optional scalar gate it is the gated delta rule (Yang et al. 2025, "Gated Delta Networks", eq. 10):
  ``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

Modes: ``"recurrent"`` (token by token: the decoding path, O(d_k d_v) per token whatever the position) and
``"chunked"`` (training / prefill). The chunked forms:

- GLA: within a chunk with inclusive log-cumsum ``G``, ``o_i = (q_i * e^{G_i}) S_0 + sum_{j<=i} (sum_d q_id k_jd
  e^{G_id - G_jd}) v_j`` and ``S_c = e^{G_c} S_0 + sum_j (k_j * e^{G_c - G_j}) v_j^T``. Every exponent is a
  difference ``G_i - G_j`` with ``j <= i``, so it is <= 0. Folded into one ``q k^T`` product as
  ``(q_i E_i) . (k_j / E_j)`` with ``E = exp(G - G_c)`` (scalar and vector gates alike), the factors stay within
  ``[exp(-span), exp(span)]`` when the chunk's total log-decay ``|G_c|`` is below ``span`` (half the log of the
  dtype's largest value: 44 in float32), the usual case. Beyond it, exact fallbacks: the masked decay matrix
  (scalar gates) or GLA's secondary chunking (vector gates): pairs of different sub-chunks factor through the
  boundary between them (both factors <= 1, one matmul), pairs within a sub-chunk are materialised
  ``[s, s, d_k]``.
- delta rule: the WY/UT representation (Yang et al. 2024, sec. 3): writing ``S_t = S_0 + sum_{j<=t} k_j u_j^T``,
  the pseudo-values solve the unit lower-triangular system ``(I + tril(diag(beta) (K K^T * Gamma), -1)) U =
  diag(beta) (V - diag(gamma) K S_0)`` (``gamma_i = e^{G_i}``, ``Gamma_ij = e^{G_i - G_j}``; both 1 without a
  gate), i.e. ``U = T V - (T diag(gamma) K) S_0`` with ``T = (I + tril(..))^-1 diag(beta)`` from one batched
  triangular solve for all chunks of a block; then ``O = diag(gamma) Q S_0 + ((Q K^T) * Gamma * M) U`` and
  ``S_c = gamma_c S_0 + (K * gamma_c / gamma)^T U``. Only ``U = u_tilde - w S_0`` and the state update run in
  sequence (two fused ``baddbmm`` per chunk).

Chunks are processed in blocks of ``BLOCK_TOKENS`` tokens: every per-chunk product of a block is one batched
op, and only the ``n / c`` state updates run in sequence, so memory is linear in tokens. Half precisions compute
in float32 and the state is float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit._checks import check_qkv, repeat_kv
from attnkit.errors import NotSupportedError

__all__ = [
    "gated_linear_attention",
    "delta_rule_attention",
    "gated_linear_attention_reference",
    "delta_rule_reference",
    "gated_chunked_flops",
    "BLOCK_TOKENS",
    "SUB_CHUNK",
]

MODES = ("auto", "chunked", "recurrent")
# Tokens per block of chunks (the per-chunk products of a block are batched; see the module docstring).
BLOCK_TOKENS = 1024
# Sub-chunk of the vector-gate intra-chunk product: [SUB_CHUNK, SUB_CHUNK, d_k] is materialised per sub-chunk.
SUB_CHUNK = 16


def gated_chunked_flops(n: int, dk: int, dv: int, chunk_size: int, *, vector_gate: bool = False,
                        delta: bool = False) -> float:
    """Matmul FLOPs of the chunked forward for one (batch, head) at ``n`` tokens: ``Q K^T`` and ``A V`` within
    chunks (``2 n c (d_k + d_v)``), ``Q S`` and ``K^T V`` for the state (``4 n d_k d_v``); vector gates add the
    materialised sub-chunk products (``2 n s d_k``); the delta rule adds ``K K^T``, the triangular solve on
    ``[V, K]`` (``n c (d_v + d_k)``) and ``W S`` (``2 n d_k d_v``)."""
    c = min(chunk_size, n)
    flops = 2.0 * n * c * (dk + dv) + 4.0 * n * dk * dv
    if vector_gate:
        flops += 2.0 * n * min(SUB_CHUNK, c) * dk
    if delta:
        flops += 2.0 * n * c * dk + 1.0 * n * c * (dv + dk) + 2.0 * n * dk * dv
    return flops


# ----------------------------------------------------------------------------------------------- checks


def _prepare(q, k, v, initial_state, mode, chunk_size):
    check_qkv(q, k, v)
    b, h, n, dk = q.shape
    if k.shape[2] != n:
        raise NotSupportedError(
            f"gated / delta-rule attention is causal: it needs as many queries as keys (got {n} and "
            f"{k.shape[2]}); carry earlier tokens in initial_state= instead"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dv = v.shape[-1]
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a tensor [batch, heads, d_k, d_v], got "
                            f"{type(initial_state).__name__}")
        if tuple(initial_state.shape) != (b, h, dk, dv):
            raise ValueError(
                f"initial_state must have shape [batch={b}, heads={h}, d_k={dk}, d_v={dv}], got "
                f"{tuple(initial_state.shape)}; pass the state returned by a call with return_state=True"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on the device of q ({q.device}), got {initial_state.device}; "
                             f"move it with initial_state.to(q.device)")
        if not initial_state.is_floating_point():
            raise TypeError(f"initial_state must be a floating-point tensor (the state returned with "
                            f"return_state=True), got {initial_state.dtype}")
        s0 = initial_state.to(dtype=work)
    else:
        s0 = q.new_zeros(b, h, dk, dv, dtype=work)
    qw = q.to(work)
    kw = repeat_kv(k, h).to(work)
    vw = repeat_kv(v, h).to(work)
    mode = ("recurrent" if n == 1 else "chunked") if mode == "auto" else mode
    return qw, kw, vw, s0, mode, work


def _check_gate(name: str, g: torch.Tensor | None, q: torch.Tensor, *, vector_ok: bool,
                work: torch.dtype) -> torch.Tensor | None:
    """``g`` as ``[b, h, n, 1]`` (scalar per head) or ``[b, h, n, d_k]`` (vector), in ``work`` dtype."""
    if g is None:
        return None
    b, h, n, dk = q.shape
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(g).__name__}")
    shapes = [(b, h, n)] + ([(b, h, n, dk)] if vector_ok else [])
    if tuple(g.shape) not in shapes:
        want = " or ".join(f"[{', '.join(map(str, s))}]" for s in shapes)
        raise ValueError(f"{name} must have shape {want} ([batch, heads, seq]{' or [..., d_k]' if vector_ok else ''}"
                         f"), got {tuple(g.shape)}")
    if not g.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {g.dtype}")
    if g.device != q.device:
        raise ValueError(f"{name} must be on {q.device}, got {g.device}")
    g = g.to(work)
    return g[..., None] if g.dim() == 3 else g


def _check_log_decay(g, q, *, vector_ok, work):
    g = _check_gate("log_decay", g, q, vector_ok=vector_ok, work=work)
    if g is not None and bool((g.detach() > 0).any()):
        # exp(g) > 1 would grow the state without bound (and break the chunked form's overflow guarantee)
        raise ValueError("log_decay must be <= 0 (a decay exp(log_decay) in (0, 1]); use F.logsigmoid(x) "
                         "or -F.softplus(x) to produce it")
    return g


# ----------------------------------------------------------------------------------------------- gated


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                           mode: str = "auto", chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                           return_state: bool = False):
    """Causal linear attention with per-token, data-dependent decay (GLA, Yang et al. 2024, eq. 3):
    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t``.

    Args:
        q: ``[batch, heads, n, d_k]``; k: ``[batch, kv_heads, n, d_k]``; v: ``[batch, kv_heads, n, d_v]``
            (q and k are used as features as given: apply a feature map or scale before).
        log_decay: ``g <= 0``, ``[batch, heads, n]`` (one decay per head and token) or ``[batch, heads, n, d_k]``
            (a decay per key dimension); ``F.logsigmoid`` of a projection is the usual source.
        mode: ``"chunked"``, ``"recurrent"`` or ``"auto"`` (recurrent for one token, else chunked).
        chunk_size: tokens per chunk (a speed knob: results do not depend on it).
        initial_state: ``S [batch, heads, d_k, d_v]`` from a previous call (``return_state=True``).
        return_state: also return the state after the last token.

    Returns:
        ``out [batch, heads, n, d_v]`` in the dtype of ``q``, and with ``return_state`` the pair
        ``(out, S)`` (``S`` float32 for half inputs).
    """
    qw, kw, vw, s0, mode, work = _prepare(q, k, v, initial_state, mode, chunk_size)
    g = _check_log_decay(log_decay, q, vector_ok=True, work=work)
    if g is None:
        raise TypeError("log_decay is required; use attnkit.linear_attention for attention without gates")
    if mode == "recurrent":
        out, s = _gated_recurrent(qw, kw, vw, g, s0)
    else:
        out, s = _gated_chunked(qw, kw, vw, g, s0, chunk_size)
    out = out.to(q.dtype)
    return (out, s) if return_state else out


def _gated_recurrent(q, k, v, g, s):
    outs = []
    a = torch.exp(g)
    for t in range(q.shape[2]):
        s = a[:, :, t, :, None] * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(q[:, :, t, None, :] @ s)  # [b, h, 1, d_v]
    return torch.cat(outs, dim=2), s


def _pad_chunks(c: int, *tensors):
    """Zero-pad the sequence axis (dim 2) to a multiple of ``c`` and split it into ``[b, h, N, c, ...]``.
    Padded tokens have k = v = 0, beta = 0, g = 0: they change neither earlier outputs nor the state."""
    n = tensors[0].shape[2]
    pad = (-n) % c
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, pad))
        out.append(t.reshape(t.shape[:2] + ((n + pad) // c, c) + t.shape[3:]))
    return out


def _causal_mask(c: int, device, strict: bool = False) -> torch.Tensor:
    return torch.ones(c, c, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _decay_matrix(G: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(G_i - G_j)`` for ``j <= i`` (mask), 0 elsewhere: ``G [..., c]`` -> ``[..., c, c]``. The exponent is
    masked before ``exp``, so the upper triangle (positive exponents) never overflows."""
    diff = G[..., :, None] - G[..., None, :]
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


def _intra_vector(q, k, G, sub: int) -> torch.Tensor:
    """``A_ij = sum_d q_id k_jd exp(G_id - G_jd)`` for ``j <= i`` within each chunk: ``[..., c, d]`` -> ``[..., c,
    c]``. Sub-chunk pairs ``J < I`` factor through the last position ``r`` before sub-chunk ``I``
    (``exp(G_i - G_r) <= 1``, ``exp(G_r - G_j) <= 1``); diagonal sub-chunks are materialised."""
    c = q.shape[-2]
    if c % sub:
        sub = c
    p = c // sub
    lead = q.shape[:-2]
    qs, ks, Gs = (t.reshape(lead + (p, sub, t.shape[-1])) for t in (q, k, G))
    mask = _causal_mask(sub, q.device)
    diff = (Gs[..., :, None, :] - Gs[..., None, :, :]).masked_fill(~mask[..., None], float("-inf"))
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * torch.exp(diff)).sum(-1)  # [..., p, sub, sub]
    rows = []
    for i in range(p):
        parts = []
        lo, hi = i * sub, (i + 1) * sub
        if i:
            ref = G[..., lo - 1: lo, :]
            qt = q[..., lo:hi, :] * torch.exp(G[..., lo:hi, :] - ref)
            kt = k[..., :lo, :] * torch.exp(ref - G[..., :lo, :])
            parts.append(qt @ kt.transpose(-1, -2))
        parts.append(diag[..., i, :, :])
        if hi < c:
            parts.append(q.new_zeros(lead + (sub, c - hi)))
        rows.append(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=-2)


def _split_blocks(c: int, *chunked):
    """Per tensor ``[b, h, N, c, ...]`` (or None), its blocks of chunks as one ``split`` (slicing each block out
    of the whole tensor made autograd add a gradient of the whole tensor's size per block: quadratic backward)."""
    per = max(1, BLOCK_TOKENS // c)
    n_blocks = -(-chunked[0].shape[2] // per)
    return [[None] * n_blocks if t is None else t.split(per, dim=2) for t in chunked]


def _join(outs: list[torch.Tensor]) -> torch.Tensor:
    """Blocks' outputs along the chunk axis: one ``cat`` (its backward is one split; writing each block into a
    preallocated output recorded a copy of the whole gradient per block)."""
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _scan(decay, add, s):
    """States at the start of each chunk of a block, and after the block: ``s <- decay_t * s + add_t`` with
    ``decay [b, h, nb, d_k or 1, 1]`` (diagonal) and ``add [b, h, nb, d_k, d_v]``: the only sequential work of the
    chunked GLA form, one fused op per chunk."""
    starts = []
    for add_t, decay_t in zip(add.unbind(2), decay.unbind(2)):  # unbind: one backward node, not one per chunk
        starts.append(s)
        s = torch.addcmul(add_t, decay_t, s)
    return torch.stack(starts, dim=2), s


# Largest log-decay span |G_c| of a chunk for which the factorisation exp(G_i - G_j) = E_i / E_j with
# E = exp(G - G_c) in [1, exp(span)] has no overflow or underflow (products keep full relative precision;
# masked pairs j > i stay finite). Beyond it the exact fallbacks run (decay matrix, or sub-chunks for vectors).
def _max_span(dtype: torch.dtype) -> float:
    return 0.5 * math.log(torch.finfo(dtype).max)


def _log_floor(dtype: torch.dtype) -> float:
    """A finite log-decay whose ``exp`` is exactly 0 in ``dtype`` (below half the smallest subnormal: -104.7 in
    float32, -745.8 in float64). The chunked forms clamp ``g`` to it: a decay of exactly 0 (``g = -inf``, which
    the recurrent form handles) would otherwise make the within-chunk cumulative sums ``-inf`` and their
    differences ``exp(G_i - G_j)`` NaN (``-inf - -inf``). The clamp is exact: ``exp(g)`` is 0 in ``dtype`` for
    every ``g`` it moves, any product through such a token stays 0 (every other ``g`` is <= 0), and the gradient
    there is ``exp(g) * ... = 0`` as in the recurrence."""
    fi = torch.finfo(dtype)
    return math.log(fi.tiny) + math.log(fi.eps) - math.log(4.0)  # log(smallest subnormal / 4)


def _gated_chunked(q, k, v, g, s, c, factorise: bool = True):
    """``factorise=False``: always the masked decay-matrix / sub-chunk path (exact for any span; which path runs
    then never depends on later tokens, so a chunk's outputs are bitwise independent of the future)."""
    b, h, n, _ = q.shape
    c = min(c, n)
    g = g.clamp_min(_log_floor(g.dtype))  # decays of exactly 0 (g = -inf): see _log_floor
    qc, kc, vc, gc = _pad_chunks(c, q, k, v, g)
    N = qc.shape[2]
    mask = _causal_mask(c, q.device)
    vector = gc.shape[-1] > 1
    span = _max_span(q.dtype)
    outs = []
    for qb, kb, vb, gb in zip(*_split_blocks(c, qc, kc, vc, gc)):
        G = gb.cumsum(-2)  # [b, h, nb, c, 1 or d_k]: inclusive log-decay from the chunk start
        last = G[..., -1:, :]
        if factorise and bool(last.detach().amin() >= -span):
            # The usual case, one matmul for scalar and vector gates alike: with E = exp(G - G_c) in
            # [1, exp(span)], A_ij = (q_i E_i) . (k_j / E_j); k / E is also the key of the chunk's state update,
            # and q E exp(G_c) = q exp(G) the query that reads the carried state.
            e = torch.exp(G - last)
            k_out = kb / e
            q_hat = qb * e
            A = (q_hat @ k_out.transpose(-1, -2)).masked_fill_(~mask, 0.0)
            q_in = q_hat * torch.exp(last)
        else:
            A = (qb @ kb.transpose(-1, -2)) * _decay_matrix(G[..., 0], mask) if not vector else \
                _intra_vector(qb, kb, G, SUB_CHUNK)
            k_out, q_in = kb * torch.exp(last - G), qb * torch.exp(G)
        kv = k_out.transpose(-1, -2) @ vb  # [b, h, nb, d_k, d_v]: the chunk's own update
        starts, s = _scan(torch.exp(last).transpose(-1, -2), kv, s)  # decay [b, h, nb, d_k or 1, 1]
        outs.append((A @ vb).add_(q_in @ starts))
    out = _join(outs).reshape(b, h, N * c, -1)[:, :, :n]
    return out, s


def gated_linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     log_decay: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                                     return_state: bool = False):
    """The materialised quadratic form (for tests; pass float64): ``G = cumsum(g)``,
    ``A_ij = sum_d q_id k_jd exp(G_id - G_jd) [j <= i]``, ``out = A V + (Q * e^G) S_0``,
    ``S_n = e^{G_n} S_0 + sum_j (k_j * e^{G_n - G_j}) v_j^T``. Shapes as :func:`gated_linear_attention`;
    memory ``[b, h, n, n, d_k]``."""
    b, h, n, dk = q.shape
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    g = log_decay if log_decay.dim() == 4 else log_decay[..., None]
    G = g.cumsum(2)  # [b, h, n, 1 or d_k]
    i = torch.arange(n, device=q.device)
    keep = (i[None, :] <= i[:, None])[..., None]  # [n, n, 1]
    diff = (G[:, :, :, None, :] - G[:, :, None, :, :]).masked_fill(~keep, float("-inf"))
    A = (q[:, :, :, None, :] * k[:, :, None, :, :] * torch.exp(diff)).sum(-1)  # [b, h, n, n]
    out = A @ v
    s0 = initial_state if initial_state is not None else q.new_zeros(b, h, dk, v.shape[-1])
    out = out + (q * torch.exp(G)) @ s0
    if not return_state:
        return out
    last = G[:, :, -1:, :]
    s = torch.exp(last).transpose(-1, -2) * s0 + (k * torch.exp(last - G)).transpose(-1, -2) @ v
    return out, s


# ----------------------------------------------------------------------------------------------- delta rule


def delta_rule_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                         log_decay: torch.Tensor | None = None, mode: str = "auto", chunk_size: int = 32,
                         initial_state: torch.Tensor | None = None, return_state: bool = False):
    """The delta rule (DeltaNet; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
    Sequence Length", eq. 1): ``S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, ``o_t = S_t q_t``
    (stored transposed, ``[d_k, d_v]``); with ``log_decay`` the gated delta rule (Gated Delta Networks, eq. 10)
    ``S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``. Chunked mode uses the WY/UT form.

    Args:
        q, k: ``[batch, heads, n, d_k]`` (``kv_heads`` for k); keys are used as given: DeltaNet L2-normalises
            them, which keeps ``I - beta k k^T`` a contraction for ``beta in [0, 2]``.
        v: ``[batch, kv_heads, n, d_v]``.
        beta: ``[batch, heads, n]`` writing strengths (``sigmoid`` of a projection in DeltaNet).
        log_decay: optional ``[batch, heads, n]``, ``<= 0``: one decay per head and token.
        mode, chunk_size, initial_state, return_state: as :func:`gated_linear_attention` (the default chunk is 32
            here: the triangular solve grows as ``c^2`` per token; 32 was fastest on CPU, see docs/benchmarks.md).

    Returns:
        ``out [batch, heads, n, d_v]`` (and the state ``[batch, heads, d_k, d_v]`` with ``return_state``).
    """
    qw, kw, vw, s0, mode, work = _prepare(q, k, v, initial_state, mode, chunk_size)
    bt = _check_gate("beta", beta, q, vector_ok=False, work=work)
    if bt is None:
        raise TypeError("beta is required ([batch, heads, seq] writing strengths)")
    g = _check_log_decay(log_decay, q, vector_ok=False, work=work)
    if mode == "recurrent":
        out, s = _delta_recurrent(qw, kw, vw, bt[..., 0], None if g is None else g[..., 0], s0)
    else:
        out, s = _delta_chunked(qw, kw, vw, bt[..., 0], None if g is None else g[..., 0], s0, chunk_size)
    out = out.to(q.dtype)
    return (out, s) if return_state else out


def _delta_recurrent(q, k, v, beta, g, s):
    outs = []
    for t in range(q.shape[2]):
        if g is not None:
            s = torch.exp(g[:, :, t])[..., None, None] * s
        kt = k[:, :, t]
        u = beta[:, :, t, None] * (v[:, :, t] - (kt[:, :, None, :] @ s)[:, :, 0])  # beta (v - S^T k)
        s = s + kt[..., :, None] * u[..., None, :]
        outs.append(q[:, :, t, None, :] @ s)
    return torch.cat(outs, dim=2), s


def _delta_chunked(q, k, v, beta, g, s, c):
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    c = min(c, n)
    if g is not None:
        g = g.clamp_min(_log_floor(g.dtype))  # decays of exactly 0 (g = -inf): see _log_floor
    qc, kc, vc, bc, gc = _pad_chunks(c, q, k, v, beta[..., None], None if g is None else g[..., None])
    bc = bc[..., 0]
    N = qc.shape[2]
    incl = _causal_mask(c, q.device)
    strict = _causal_mask(c, q.device, strict=True)
    span = _max_span(q.dtype)
    outs = []
    for qb, kb, vb, bb, gb in zip(*_split_blocks(c, qc, kc, vc, bc, gc)):
        kt = kb.transpose(-1, -2)
        nb = qb.shape[2]
        if gb is not None:
            G = gb[..., 0].cumsum(-1)[..., None]  # [b, h, nb, c, 1]: log gamma_i from the chunk start
            last = G[..., -1:, :]
            dec = torch.exp(last)  # [b, h, nb, 1, 1]
            if bool(last.detach().amin() >= -span):
                # as in GLA: e_i = gamma_i / gamma_c in [1, exp(span)] folds Gamma_ij = e_i / e_j into the products
                e = torch.exp(G - last)
                k_st = kb / e  # k_j gamma_c / gamma_j: the key of the chunk's state update
                ke = kb * e
                kk, qk = ke @ k_st.transpose(-1, -2), ((qb * e) @ k_st.transpose(-1, -2)).masked_fill_(~incl, 0.0)
                q_in, k_in = qb * (e * dec), ke * dec
            else:
                Gam = _decay_matrix(G[..., 0], incl)  # Gamma_ij = gamma_i / gamma_j for j <= i, else 0
                kk, qk = (kb @ kt) * Gam, (qb @ kt) * Gam
                gam = torch.exp(G)
                k_st, q_in, k_in = kb * torch.exp(last - G), qb * gam, kb * gam
        else:
            kk, qk = kb @ kt, (qb @ kt).masked_fill_(~incl, 0.0)
            k_st, dec, q_in, k_in = kb, None, qb, kb
        # T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta) by one batched unit-triangular solve; then
        # u_tilde = T V and w = T diag(gamma) K: the chunk's pseudo-values are U = u_tilde - w S_0 (UT transform)
        system = (bb[..., :, None] * kk).masked_fill_(~strict, 0.0)
        system.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        t_mat = torch.linalg.solve_triangular(system, torch.diag_embed(bb), upper=False, unitriangular=True)
        u_tilde, w = t_mat @ vb, t_mat @ k_in
        # the sequential part, on [b * h] batches so that each step is two fused baddbmm calls:
        # U_t = u_tilde_t - w_t S and S <- dec S + K_t^T U_t
        k_stt = k_st.transpose(-1, -2)
        s3 = s.flatten(0, 1)
        us, starts = [], []
        # per-chunk operands by one unbind each (one backward node each, not one per chunk)
        u_ts, w_ts, k_ts = (x.flatten(0, 1).unbind(1) for x in (u_tilde, w, k_stt))
        dec_ts = [None] * nb if dec is None else dec.flatten(0, 1).unbind(1)
        for t in range(nb):
            starts.append(s3)
            u = torch.baddbmm(u_ts[t], w_ts[t], s3, alpha=-1.0)
            us.append(u)
            base = s3 if dec_ts[t] is None else dec_ts[t] * s3
            s3 = torch.baddbmm(base, k_ts[t], u)
        s = s3.view(b, h, dk, dv)
        # O = q_in S_0 + qk U, batched over the block
        u_all = torch.stack(us, dim=1).view(b, h, nb, c, dv)
        s_all = torch.stack(starts, dim=1).view(b, h, nb, dk, dv)
        outs.append((qk @ u_all).add_(q_in @ s_all))
    out = _join(outs).reshape(b, h, N * c, dv)[:, :, :n]
    return out, s


def delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                         log_decay: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                         return_state: bool = False):
    """The recurrence exactly as the paper writes it, in its ``[d_v, d_k]`` layout (for tests; pass float64):
    ``S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, ``o_t = S_t q_t``. Returns the state in
    the engine's ``[d_k, d_v]`` layout."""
    b, h, n, dk = q.shape
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    dv = v.shape[-1]
    S = (initial_state.transpose(-1, -2) if initial_state is not None
         else q.new_zeros(b, h, dv, dk))  # [b, h, d_v, d_k]
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    outs = []
    for t in range(n):
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t, None, None]
        a = 1.0 if log_decay is None else torch.exp(log_decay[:, :, t])[..., None, None]
        S = a * S @ (eye - bt * kt[..., :, None] * kt[..., None, :]) + bt * vt[..., :, None] * kt[..., None, :]
        outs.append((S @ q[:, :, t, :, None])[..., 0])
    out = torch.stack(outs, dim=2)
    return (out, S.transpose(-1, -2)) if return_state else out
