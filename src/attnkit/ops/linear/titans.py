"""Titans' neural long-term memory (Behrouz et al. 2024, "Titans: Learning to Memorize at Test Time", sec. 3):
a memory model ``M`` (linear or a 2-layer MLP per head) trained online with momentum ("surprise") and a
forgetting gate, read by queries.

Per head and token, with ``l(M; k_t, v_t) = ||M(k_t) - v_t||^2`` (eq. 12) and data-dependent gates
``theta_t`` (step), ``eta_t`` (momentum decay), ``alpha_t`` (forgetting) in [0, 1]:

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)        (eq. 10: surprise with momentum)
    M_t = (1 - alpha_t) M_{t-1} + S_t                          (eq. 13: forgetting)
    y_t = M_t(q_t)                                             (eq. 15: retrieval, no update)

Training is parallelised by chunks (sec. 3.2): every gradient of a chunk is taken at the memory ``M_0`` of the
chunk start (``chunk_size=1`` is the exact sequential rule). Given those gradients, the recurrences are linear
with scalar coefficients, so, within a chunk with ``A[t, u] = prod_{u<r<=t} (1 - alpha_r)`` and
``H[u, s] = prod_{s<r<=u} eta_r``, ``M_t = A[t, 0] M_0 + (A P_eta)_t S_0 - sum_s (A H)[t, s] theta_s G_s`` and
the read-out needs only the masked products ``(Q K^T) * (A H) * theta``, as in the dual form of TTT
(:mod:`attnkit.ops.linear.ttt`, whose gradient factors this module reuses). For the linear memory with
``eta = alpha = 0`` one step is the delta rule ``M <- M - 2 theta (M k - v) k^T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit._checks import check_qkv, check_state, repeat_kv
from attnkit.ops.linear._common import check_inner_loop
from attnkit.ops.linear.ttt import _batch_grads, _read, default_weights

__all__ = ["titans_memory", "titans_memory_reference", "titans_read"]

# log(1 - alpha) and log(eta) are floored here: a gate of exactly 0 (or alpha of exactly 1) would give
# -inf - (-inf) in the products' exponent differences; exp(-60) ~ 1e-26 is zero at every precision used.
LOG_FLOOR = -60.0


def _log_gate(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x).clamp_min(LOG_FLOOR)


def _ratio_matrix(logs: torch.Tensor, strict: bool) -> torch.Tensor:
    """``exp(L_t - L_u)`` for ``u <= t`` (``u < t`` if ``strict``), else 0; ``L`` the inclusive cumsum of
    ``logs [..., c]``: the products ``prod_{u<r<=t}`` of the gates."""
    cum = logs.cumsum(-1)
    c = logs.shape[-1]
    keep = torch.ones(c, c, dtype=torch.bool, device=logs.device).tril(-1 if strict else 0)
    return torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~keep, float("-inf")))


def _chunk(q, k, v, theta, eta, alpha, weights, moments):
    """One chunk of the parallel form. ``q, k [B, H, c, d]``, gates ``[B, H, c]``; returns outputs, the memory
    and the momentum at the chunk end."""
    la, le = _log_gate(1.0 - alpha), _log_gate(eta)
    A = _ratio_matrix(la, strict=False)  # [.., t, u]: prod_{u<r<=t} (1 - alpha_r)
    Hm = _ratio_matrix(le, strict=False)  # [.., u, s]: prod_{s<r<=u} eta_r
    pa = torch.exp(la.cumsum(-1))  # prod_{r<=t} (1 - alpha_r): how much of M_0 is left at t
    pe = torch.exp(le.cumsum(-1))  # prod_{r<=u} eta_r: how much of S_0 is left at u
    coef = (A @ Hm) * theta[..., None, :]  # [.., t, s]: weight of theta_s G_s in M_t
    s0_coef = A @ pe[..., None]  # [.., t, 1]: weight of S_0 in M_t
    grads = _batch_grads(k, v, weights)
    if len(weights) == 1:
        (e,) = grads  # G_s = k_s e_s^T
        m0, s0 = weights[0], moments[0]
        y = pa[..., None] * (q @ m0) + s0_coef * (q @ s0) - ((q @ k.transpose(-1, -2)) * coef) @ e
        m_end = pa[..., -1, None, None] * m0 + s0_coef[..., -1, :, None] * s0 \
            - k.transpose(-1, -2) @ (coef[..., -1, :, None] * e)
        s_end = pe[..., -1, None, None] * s0 - k.transpose(-1, -2) @ ((Hm[..., -1, :] * theta)[..., None] * e)
        return y, (m_end,), (s_end,)
    (w1, w2), (s1, s2) = weights, moments
    g1, e2, a = grads  # G1_s = k_s g1_s^T, G2_s = a_s e2_s^T
    hq = pa[..., None] * (q @ w1) + s0_coef * (q @ s1) - ((q @ k.transpose(-1, -2)) * coef) @ g1
    aq = F.gelu(hq)
    y = pa[..., None] * (aq @ w2) + s0_coef * (aq @ s2) - ((aq @ a.transpose(-1, -2)) * coef) @ e2
    last_c, last_h = coef[..., -1, :, None], (Hm[..., -1, :] * theta)[..., None]
    w1_end = pa[..., -1, None, None] * w1 + s0_coef[..., -1, :, None] * s1 - k.transpose(-1, -2) @ (last_c * g1)
    w2_end = pa[..., -1, None, None] * w2 + s0_coef[..., -1, :, None] * s2 - a.transpose(-1, -2) @ (last_c * e2)
    s1_end = pe[..., -1, None, None] * s1 - k.transpose(-1, -2) @ (last_h * g1)
    s2_end = pe[..., -1, None, None] * s2 - a.transpose(-1, -2) @ (last_h * e2)
    return y, (w1_end, w2_end), (s1_end, s2_end)


def _prepare(q, k, v, gates, model):
    check_qkv(q, k, v)
    b, h, n, _ = q.shape
    if k.shape[2] != n:
        raise ValueError(f"titans memory needs as many queries as keys, got {n} and {k.shape[2]}")
    if model not in ("linear", "mlp"):
        raise ValueError(f"model must be 'linear' or 'mlp', got {model!r}")
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    out = []
    for name, g in gates.items():
        g = g.to(device=q.device, dtype=work) if isinstance(g, torch.Tensor) else \
            torch.tensor(float(g), dtype=work, device=q.device)
        g = g.expand(b, h, n) if g.dim() == 0 else g
        if tuple(g.shape) != (b, h, n):
            raise ValueError(f"{name} must be a float or [batch={b}, heads={h}, n={n}], got {tuple(g.shape)}")
        if bool(((g.detach() < 0) | (g.detach() > 1)).any()):
            raise ValueError(f"{name} must lie in [0, 1] (use sigmoid of a projection)")
        out.append(g)
    return q.to(work), repeat_kv(k, h).to(work), repeat_kv(v, h).to(work), out, work


def titans_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta, eta, alpha, *,
                  model: str = "mlp", chunk_size: int = 16, initial_state: tuple | None = None,
                  hidden: int | None = None, return_state: bool = False):
    """Titans' long-term memory over a sequence (module docstring), chunk-parallel.

    Args:
        q, k: ``[batch, heads, n, d_k]`` (``kv_heads`` for k); v: ``[batch, kv_heads, n, d_v]``.
        theta, eta, alpha: step, momentum decay and forgetting gates in [0, 1]: floats or ``[batch, heads, n]``.
        model: ``"linear"`` (``M(x) = x W``) or ``"mlp"`` (``gelu(x W1) W2``, ``hidden`` default ``4 d_k``).
        chunk_size: tokens whose gradients share the chunk-start memory (1: exact sequential updates).
        initial_state: ``(weights, momenta)``: tuples of ``[batch, heads, ., .]`` tensors (default: zero linear
            memory, or TTT's seeded MLP init, and zero momentum).

    Returns:
        ``y [batch, heads, n, d_v]`` (and ``(weights, momenta)`` with ``return_state``).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = q.dtype
    q, k, v, (theta, eta, alpha), work = _prepare(q, k, v, {"theta": theta, "eta": eta, "alpha": alpha}, model)
    b, h, n, dk = q.shape
    if initial_state is None:
        weights = default_weights(model, b, h, dk, v.shape[-1], hidden, q.device, work)
        moments = tuple(torch.zeros_like(w) for w in weights)
    else:
        check_state("initial_state", (*initial_state[0], *initial_state[1]), q)
        weights, moments = (tuple(t.to(work) for t in part) for part in initial_state)
    weights_in = weights
    outs = []
    for lo in range(0, n, chunk_size):
        sl = slice(lo, min(n, lo + chunk_size))
        y, weights, moments = _chunk(q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl], eta[:, :, sl],
                                     alpha[:, :, sl], weights, moments)
        outs.append(y)
    y = torch.cat(outs, dim=2)
    check_inner_loop("titans memory", (y, *weights, *moments), (q, k, v, theta, eta, alpha, *weights_in),
                     lambda: f"the step gates theta (up to {float(theta.detach().amax()):.2f} "
                     f"here) times the summed gradients of a chunk of {chunk_size} tokens overshoot. Keep the "
                     f"input normalised (LayerNorm / RMSNorm before the mixer, as in a pre-norm block: inputs far "
                     f"from unit scale saturate the gates and grow |v|), lower chunk_size (1: the sequential rule) "
                     f"or theta, or use model='linear'")
    y = y.to(dtype)
    return (y, (weights, moments)) if return_state else y


def titans_read(q: torch.Tensor, weights: tuple) -> torch.Tensor:
    """Retrieval without update, ``M*(q)``: ``q [batch, heads, n, d_k]`` with a memory ``weights`` tuple."""
    y = _read(q, weights)
    check_inner_loop("titans memory read", (y,), (q, *weights),
                     lambda: "the memory's weights (up to "
                     f"{max(float(w.detach().abs().amax()) for w in weights):.3g}) overflow the read-out: the "
                     "memory's gradient steps grew it (keep the input normalised, lower chunk_size or theta)")
    return y


def titans_memory_reference(q, k, v, theta, eta, alpha, *, model: str = "mlp", chunk_size: int = 16,
                            initial_state: tuple | None = None, hidden: int | None = None,
                            return_state: bool = False):
    """Token by token, exactly the equations (gradients by autograd at the chunk-start memory; for tests)."""
    b, h, n, dk = q.shape
    k, v = repeat_kv(k, h), repeat_kv(v, h)

    def gate(g):
        g = g if isinstance(g, torch.Tensor) else torch.tensor(float(g), dtype=q.dtype)
        return g.to(device=q.device, dtype=q.dtype).expand(b, h, n)

    theta, eta, alpha = gate(theta), gate(eta), gate(alpha)
    if initial_state is None:
        mem = list(default_weights(model, b, h, dk, v.shape[-1], hidden, q.device, q.dtype))
        mom = [torch.zeros_like(w) for w in mem]
    else:
        mem, mom = (list(part) for part in initial_state)
    outs = []
    for lo in range(0, n, chunk_size):
        start = [w.detach().clone().requires_grad_(True) for w in mem]
        for t in range(lo, min(n, lo + chunk_size)):
            loss = (_read(k[:, :, t:t + 1], start) - v[:, :, t:t + 1]).square().sum()
            grads = torch.autograd.grad(loss, start)
            th, et, al = (g[:, :, t, None, None] for g in (theta, eta, alpha))
            mom = [et * s - th * g for s, g in zip(mom, grads)]
            mem = [(1 - al) * m + s for m, s in zip(mem, mom)]
            outs.append(_read(q[:, :, t:t + 1], mem))
    y = torch.cat(outs, dim=2)
    return (y, (tuple(mem), tuple(mom))) if return_state else y
