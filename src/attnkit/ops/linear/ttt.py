"""Test-time training layers: the hidden state is the weights of an inner model trained online by gradient descent
on a self-supervised reconstruction loss (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States", TTT-Linear / TTT-MLP; the linear case ≡ linear attention, Sun et al., "Learning to
(Learn at Test Time)", MTTT).

Per head, with ``q, k [n, d_k]`` (the paper's ``theta_Q x``, ``theta_K x``) and ``v [n, d_v]`` (``theta_V x``):
``l_t(W) = ||f(k_t; W) - v_t||^2``; tokens are taken in mini-batches of ``b``; every gradient of a mini-batch
is taken at the weights ``W_0`` of its start (what makes the inner loop parallel):
``W_t = W_0 - sum_{s <= t in the batch} eta_s grad l_s(W_0)``, output ``z_t = f(q_t; W_t)``; the next mini-batch
starts from ``W_b``. ``mini_batch=1`` is plain online gradient descent, which for the linear model is the delta
rule with ``beta = 2 eta``.

Inner models: ``"linear"`` ``f(x) = x W`` (``W [d_k, d_v]``) and ``"mlp"`` ``f(x) = gelu(x W1) W2``
(``W1 [d_k, h]``, ``W2 [h, d_v]``). Two forms that agree:

- ``"primal"``: the weights ``W_t`` of every token materialised (the definition);
- ``"dual"`` (the paper's sec. 2.7): never forms ``W_t``. For the linear model, with ``E = K W_0 - V`` and
  ``M_eta[t, s] = eta_s [s <= t]``: ``Z = Q W_0 - 2 ((Q K^T) * M_eta) E`` and ``W_b = W_0 - 2 K^T (eta * E)``.
  For the MLP the same holds layer by layer: ``H_q = Q W1_0 - ((Q K^T) * M_eta) G1`` with ``G1`` the gradients
  at the hidden pre-activations, then ``Z = gelu(H_q) W2_0 - ((gelu(H_q) A_k^T) * M_eta) G2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit._checks import check_qkv, check_state, repeat_kv
from attnkit.ops.linear._common import check_inner_loop

__all__ = ["ttt", "ttt_reference", "default_weights"]


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """Derivative of the tanh-free gelu ``x Phi(x)``: ``Phi(x) + x phi(x)``."""
    cdf = 0.5 * (1.0 + torch.erf(x * 0.5**0.5))
    pdf = torch.exp(-0.5 * x * x) * (2 * torch.pi) ** -0.5
    return cdf + x * pdf


def _layer_norm(z: torch.Tensor, ln: tuple, eps: float = 1e-6):
    """``LN(z) = weight * xhat + bias`` over the last axis with ``weight, bias [heads, d]``; returns the output,
    ``xhat`` and ``1 / std`` (for the analytic gradient)."""
    mu = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((z - mu).square().mean(-1, keepdim=True) + eps)
    xhat = (z - mu) * rstd
    w, b = (t.to(z.dtype)[None, :, None, :] for t in ln)
    return w * xhat + b, xhat, rstd


def _batch_grads(k, v, weights, ln=None):
    """Per-token gradient factors at the mini-batch's start weights (outer-product form):
    linear: ``grad_W l_s = 2 k_s e_s^T`` with ``e = k W - v``; mlp: ``grad_W2 = 2 a_s e_s^T``,
    ``grad_W1 = k_s g1_s^T`` with ``a = gelu(k W1)``, ``e = a W2 - v``, ``g1 = 2 (e W2^T) * gelu'(k W1)``."""
    if len(weights) == 1 and ln is not None:
        # TTT-Linear: f(x) = x + LN(x W); grad_W = k^T dz with dz the LN backward of 2 (f(k) - v) * weight
        y, xhat, rstd = _layer_norm(k @ weights[0], ln)
        g = 2.0 * (k + y - v) * ln[0].to(k.dtype)[None, :, None, :]
        dz = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        return (dz,)
    if len(weights) == 1:
        return (2.0 * (k @ weights[0] - v),)
    w1, w2 = weights
    pre = k @ w1
    a = F.gelu(pre)
    e2 = 2.0 * (a @ w2 - v)
    g1 = (e2 @ w2.transpose(-1, -2)) * _gelu_grad(pre)
    return g1, e2, a


def _dual_batch(q, k, v, eta, weights, ln=None):
    """One mini-batch in the dual form: ``q, k [B, H, b, d]``, ``eta [B, H, b]`` -> outputs and end weights."""
    b = q.shape[-2]
    m_eta = torch.ones(b, b, dtype=torch.bool, device=q.device).tril() * eta[..., None, :]  # [.., t, s]
    qk = (q @ k.transpose(-1, -2)) * m_eta
    if len(weights) == 1:
        (e,) = _batch_grads(k, v, weights, ln)
        z = q @ weights[0] - qk @ e  # q W_t without forming W_t
        w_end = weights[0] - k.transpose(-1, -2) @ (eta[..., None] * e)
        return (z if ln is None else q + _layer_norm(z, ln)[0]), (w_end,)
    w1, w2 = weights
    g1, e2, a = _batch_grads(k, v, weights)
    hq = q @ w1 - qk @ g1
    aq = F.gelu(hq)
    z = aq @ w2 - ((aq @ a.transpose(-1, -2)) * m_eta) @ e2
    w1_end = w1 - k.transpose(-1, -2) @ (eta[..., None] * g1)
    w2_end = w2 - a.transpose(-1, -2) @ (eta[..., None] * e2)
    return z, (w1_end, w2_end)


def _primal_batch(q, k, v, eta, weights, ln=None):
    """One mini-batch with every token's weights materialised: ``W_t = W_0 - sum_{s <= t} eta_s G_s``."""
    grads = _batch_grads(k, v, weights, ln)
    if len(weights) == 1:
        per_token = [eta[..., None, None] * k[..., :, None] * grads[0][..., None, :]]  # [B, H, b, d_k, d_v]
        factors = [weights[0]]
    else:
        g1, e2, a = grads
        per_token = [eta[..., None, None] * k[..., :, None] * g1[..., None, :],
                     eta[..., None, None] * a[..., :, None] * e2[..., None, :]]
        factors = list(weights)
    w_t = [w[..., None, :, :] - g.cumsum(-3) for w, g in zip(factors, per_token)]  # weights after token t
    if len(weights) == 1:
        z = (q[..., None, :] @ w_t[0])[..., 0, :]
        z = z if ln is None else q + _layer_norm(z, ln)[0]
    else:
        h = F.gelu((q[..., None, :] @ w_t[0])[..., 0, :])
        z = (h[..., None, :] @ w_t[1])[..., 0, :]
    return z, tuple(w[..., -1, :, :] for w in w_t)


def ttt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: float | torch.Tensor, *, model: str = "linear",
        mini_batch: int = 16, causal: bool = True, form: str = "dual", initial_state: tuple | None = None,
        hidden: int | None = None, ln: tuple | None = None, return_state: bool = False):
    """A TTT layer's inner loop (Sun et al. 2024; see the module docstring).

    Args:
        q, k: ``[batch, heads, n, d_k]`` (``kv_heads`` for k); v: ``[batch, kv_heads, n, d_v]``.
        eta: inner learning rate: a float or per token ``[batch, heads, n]`` (the paper learns it from ``x``).
        model: ``"linear"`` (``f(x) = x W``), ``"linear_ln"`` (the paper's TTT-Linear ``f(x) = x + LN(x W)``,
            ``d_k == d_v``; ``ln = (weight, bias)`` ``[heads, d]``, default 1 and 0) or ``"mlp"`` (hidden width
            ``hidden``, default ``4 d_k``).
        mini_batch: tokens per inner mini-batch (gradients of a mini-batch are taken at its start weights).
        causal: ``False`` is the full-batch setting of MTTT: one gradient step over all tokens, every output read
            with the final weights (for the linear model from ``W_0 = 0``: ``2 eta (Q K^T) V``).
        form: ``"dual"`` (fast) or ``"primal"`` (weights of every token materialised).
        initial_state: the weights ``(W,)`` or ``(W1, W2)`` ``[batch, heads, ., .]``; default zeros (linear) or a
            fixed seeded init (mlp, since zero MLP weights have zero gradients).
        return_state: also return the weights after the last token.

    Returns:
        ``z [batch, heads, n, d_v]`` (and the state with ``return_state``).
    """
    check_qkv(q, k, v)
    bsz, h, n, dk = q.shape
    if k.shape[2] != n:
        raise ValueError(f"ttt needs as many queries as keys, got {n} and {k.shape[2]}")
    if model not in ("linear", "linear_ln", "mlp"):
        raise ValueError(f"model must be 'linear', 'linear_ln' or 'mlp', got {model!r}")
    if model == "linear_ln" and v.shape[-1] != dk:
        raise ValueError(f"model='linear_ln' has a residual x + LN(x W): d_v must equal d_k ({dk}), got {v.shape[-1]}")
    if form not in ("dual", "primal"):
        raise ValueError(f"form must be 'dual' or 'primal', got {form!r}")
    if not isinstance(mini_batch, int) or mini_batch < 1:
        raise ValueError(f"mini_batch must be a positive int, got {mini_batch!r}")
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = q.to(work), repeat_kv(k, h).to(work), repeat_kv(v, h).to(work)
    dv = v.shape[-1]
    eta_t = eta.to(device=q.device, dtype=work) if isinstance(eta, torch.Tensor) else \
        torch.tensor(float(eta), dtype=work, device=q.device)
    if eta_t.dim() == 0:
        eta_t = eta_t.expand(bsz, h, n)
    if tuple(eta_t.shape) != (bsz, h, n):
        raise ValueError(f"eta must be a float or [batch={bsz}, heads={h}, n={n}], got {tuple(eta_t.shape)}")
    if initial_state is None:
        initial_state = default_weights(model, bsz, h, dk, dv, hidden, q.device, work)
    check_state("initial_state", initial_state, q)
    weights = tuple(w.to(work) for w in initial_state)
    ln = _ln_params(model, ln, h, dk, q)
    step = _dual_batch if form == "dual" else _primal_batch
    if not causal:  # full batch: one step over every token, outputs read with the final weights
        _, weights = step(q, k, v, eta_t, weights, ln)
        z = _read(q, weights, ln)
    else:
        outs = []
        for lo in range(0, n, mini_batch):
            hi = min(n, lo + mini_batch)
            z, weights = step(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], eta_t[:, :, lo:hi], weights, ln)
            outs.append(z)
        z = torch.cat(outs, dim=2)
    check_inner_loop("ttt", (z, *weights), (q, k, v, eta_t, *initial_state),
                     lambda: f"the inner learning rate eta (up to {float(eta_t.detach().amax()):.3g} here) times "
                     f"|k|^2 (up to {float(k.detach().square().sum(-1).amax()):.3g}) "
                     f"over mini-batches of {mini_batch} tokens overshoots. Keep the input normalised (LayerNorm / "
                     f"RMSNorm before the mixer, as in a pre-norm block), or lower eta (eta_base) or mini_batch")
    z = z.to(dtype)
    return (z, weights) if return_state else z


def _ln_params(model: str, ln, h: int, d: int, like: torch.Tensor):
    if model != "linear_ln":
        return None
    if ln is None:
        return like.new_ones(h, d), like.new_zeros(h, d)
    return tuple(t.to(device=like.device, dtype=like.dtype) for t in ln)


def _read(q, weights, ln=None):
    if len(weights) == 1:
        return q @ weights[0] if ln is None else q + _layer_norm(q @ weights[0], ln)[0]
    return F.gelu(q @ weights[0]) @ weights[1]


def default_weights(model: str, bsz: int, h: int, dk: int, dv: int, hidden: int | None, device, dtype) -> tuple:
    """Zero weights for the linear model; for the MLP a seeded ``N(0, 1/fan_in)`` init (zeros have zero
    gradients), identical for every batch element and head."""
    if model in ("linear", "linear_ln"):
        return (torch.zeros(bsz, h, dk, dv, device=device, dtype=dtype),)
    hid = 4 * dk if hidden is None else hidden
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(dk, hid, generator=g, dtype=torch.float64) * dk**-0.5
    w2 = torch.randn(hid, dv, generator=g, dtype=torch.float64) * hid**-0.5
    return tuple(w.to(device=device, dtype=dtype).expand(bsz, h, *w.shape) for w in (w1, w2))


def ttt_reference(q, k, v, eta, *, model: str = "linear", mini_batch: int = 16, causal: bool = True,
                  initial_state: tuple | None = None, hidden: int | None = None, ln: tuple | None = None):
    """Token by token with autograd: every gradient of a mini-batch taken at its start weights by
    ``torch.autograd.grad`` of ``||f(k_s; W) - v_s||^2`` (for tests; pass float64)."""
    bsz, h, n, dk = q.shape
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    eta_t = (eta.to(q.dtype) if isinstance(eta, torch.Tensor) else torch.tensor(float(eta), dtype=q.dtype))
    eta_t = eta_t.expand(bsz, h, n)
    weights = initial_state or default_weights(model, bsz, h, dk, v.shape[-1], hidden, q.device, q.dtype)
    weights = [w.detach().clone() for w in weights]
    ln = _ln_params(model, ln, h, dk, q)
    span = n if not causal else mini_batch
    outs = []
    for lo in range(0, n, span):
        start = [w.clone().requires_grad_(True) for w in weights]
        current = [w.clone() for w in weights]
        for t in range(lo, min(n, lo + span)):
            loss = (_read(k[:, :, t:t + 1], start, ln) - v[:, :, t:t + 1]).square().sum(-1)  # [B, H, 1]
            grads = torch.autograd.grad(loss.sum(), start)  # heads and batch are independent: sum is per W
            current = [c - eta_t[:, :, t, None, None] * g for c, g in zip(current, grads)]
            if causal:
                outs.append(_read(q[:, :, t:t + 1], current, ln))
        weights = current
    if not causal:
        return _read(q, weights, ln)
    return torch.cat(outs, dim=2)
