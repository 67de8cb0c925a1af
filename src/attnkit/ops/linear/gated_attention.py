"""Registry-level modules of the gated engine: ``(q, k, v) -> out`` with data-dependent gates computed from the
keys by small learnable projections (the layers of the papers compute them from the token ``x``; ``k`` is a
linear function of ``x``, so the (q, k, v) interface keeps the same expressiveness per layer).

- :class:`GatedLinearAttention`: GLA (Yang et al. 2024, "Gated Linear Attention Transformers with
  Hardware-Efficient Training", eq. 3-4): ``g_t = logsigmoid(k_t W_g + b_g) / tau`` per key dimension
  (``tau = 16``, the paper's gate temperature), queries scaled by ``d^-1/2``, an RMS norm per head on the output.
- :class:`DeltaNetAttention`: DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule
  over Sequence Length", sec. 3): q and k through SiLU then L2-normalised (the papers' q/k path, DeltaNet sec. 4
  and Gated DeltaNet sec. 3.4; ``qk_activation=None`` drops the SiLU: on the quick MQAR, 64 tokens, DeltaNet
  reaches 27.1% without it and 95.6% with it), q then scaled by ``d^-1/2`` as the papers' and fla's
  kernels do (``scale``), ``beta_t = sigmoid(k_t . w_b + b_b)``; with
  ``gated=True`` the Gated DeltaNet decay in the Mamba2 form the paper adopts (Gated Delta Networks, sec. 3.4;
  Mamba2, Dao & Gu 2024): ``g_t = -exp(A_log) * softplus(k_t . w_a + b_a)`` with ``A ~ U(1, 16)`` and the bias
  ``b_a = softplus^-1(dt)``, ``dt`` log-uniform in ``[1e-3, 1e-1]``, so that the decay ``exp(g_t)`` starts near 1
  (``decay="sigmoid"``: the plain ``logsigmoid(k_t . w_a + b_a)``, which starts near 0.5 per token and forgets
  a key within a few tokens); an RMS norm per head.

Both recurrences are causal by construction. ``causal=False`` runs the bidirectional form used by vision GLA
models (ViG, Liao et al. 2024): a forward and a backward scan, summed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit._checks import check_qkv
from attnkit.ops.linear.gated import (
    delta_rule_attention,
    delta_rule_reference,
    gated_linear_attention,
    gated_linear_attention_reference,
)

__all__ = ["GatedLinearAttention", "DeltaNetAttention", "gated_reference"]


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _GatedBase(nn.Module):
    def __init__(self, head_dim: int, *, causal: bool, chunk_size: int, norm: bool):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        self.head_dim, self.causal, self.chunk_size, self.norm = head_dim, causal, chunk_size, norm

    def _check(self, q, k, v):
        check_qkv(q, k, v)
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"{type(self).__name__} was built for head_dim={self.head_dim}, got {q.shape[-1]}")

    def _both_directions(self, fn, q, k, v, *gates):
        """``fn`` forward; without ``causal`` also on the reversed sequence, summed (bidirectional scan)."""
        out = fn(q, k, v, *gates)
        if not self.causal:
            flip = [t.flip(2) for t in (q, k, v, *gates)]
            out = out + fn(*flip).flip(2)
        return _rms(out) if self.norm else out

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, causal={self.causal}, chunk_size={self.chunk_size}"


class GatedLinearAttention(_GatedBase):
    """GLA: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = rms(q_t^T S_t / sqrt(d))``.

    ``q [batch, heads, n, d]``, ``k, v [batch, kv_heads, n, d / d_v]`` -> ``[batch, heads, n, d_v]``.
    """

    def __init__(self, head_dim: int, *, causal: bool = False, chunk_size: int = 64, tau: float = 16.0,
                 norm: bool = True):
        super().__init__(head_dim, causal=causal, chunk_size=chunk_size, norm=norm)
        self.tau = float(tau)
        self.gate = nn.Linear(head_dim, head_dim)

    def log_decay(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``g [batch, heads, n, d]`` (key heads repeated over their query group)."""
        gk = _work(k)
        g = F.logsigmoid(F.linear(gk, self.gate.weight.to(gk.dtype), self.gate.bias.to(gk.dtype))) / self.tau
        return g.repeat_interleave(q.shape[1] // k.shape[1], dim=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check(q, k, v)
        g = self.log_decay(q, k).to(q.dtype)
        scale = self.head_dim ** -0.5
        out = self._both_directions(
            lambda q, k, v, g: gated_linear_attention(q * scale, k, v, g, chunk_size=self.chunk_size), q, k, v, g)
        return out.to(q.dtype)


class DeltaNetAttention(_GatedBase):
    """DeltaNet / Gated DeltaNet: ``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` on unit q and k
    (after SiLU),
    ``o_t = rms(scale * q_t^T S_t)``, ``scale = d^-1/2`` by default (the attention scale the papers keep and fla's
    delta-rule kernels apply to the normalised query; with the RMS norm on, it only matters through its epsilon).

    ``q [batch, heads, n, d]``, ``k, v [batch, kv_heads, n, d / d_v]`` -> ``[batch, heads, n, d_v]``.
    """

    DECAYS = ("mamba2", "sigmoid")

    def __init__(self, head_dim: int, *, causal: bool = False, chunk_size: int = 32, gated: bool = False,
                 norm: bool = True, scale: float | None = None, decay: str = "mamba2",
                 qk_activation: str | None = "silu"):
        super().__init__(head_dim, causal=causal, chunk_size=chunk_size, norm=norm)
        if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
            raise ValueError(f"scale must be a positive number (None: head_dim ** -0.5), got {scale!r}")
        if decay not in self.DECAYS:
            raise ValueError(f"decay must be one of {', '.join(map(repr, self.DECAYS))} (the gated decay's "
                             f"parametrisation), got {decay!r}")
        self.scale = float(head_dim ** -0.5 if scale is None else scale)
        if qk_activation not in (None, "silu"):
            raise ValueError(f"qk_activation must be None or 'silu' (applied to q and k before their L2 norm), "
                             f"got {qk_activation!r}")
        self.gated, self.decay, self.qk_activation = gated, decay, qk_activation
        self.beta_proj = nn.Linear(head_dim, 1)
        self.decay_proj = nn.Linear(head_dim, 1) if gated else None
        self.A_log = None
        if gated and decay == "mamba2":
            # Mamba2's initialisation (Gated DeltaNet sec. 3.4 uses Mamba2's gate): A ~ U(1, 16) and the
            # projection's bias softplus^-1(dt), dt log-uniform in [1e-3, 1e-1]: decays exp(-A dt) near 1
            self.A_log = nn.Parameter(torch.empty(1).uniform_(1.0, 16.0).log())
            with torch.no_grad():
                dt = torch.empty(1).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp_min(1e-4)
                self.decay_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def gates(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``beta [batch, heads, n]`` and ``log_decay [batch, heads, n]`` (or None)."""
        gk = _work(k)
        rep = q.shape[1] // k.shape[1]

        def proj(layer):
            return F.linear(gk, layer.weight.to(gk.dtype), layer.bias.to(gk.dtype))[..., 0].repeat_interleave(rep, 1)

        beta = torch.sigmoid(proj(self.beta_proj))
        if not self.gated:
            return beta, None
        if self.A_log is None:
            return beta, F.logsigmoid(proj(self.decay_proj))
        return beta, -torch.exp(self.A_log.to(gk.dtype)) * F.softplus(proj(self.decay_proj))

    def _inputs(self, q, k, v):
        beta, g = self.gates(q, k)
        if self.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        return F.normalize(q, dim=-1) * self.scale, F.normalize(k, dim=-1), v, beta.to(q.dtype), \
            None if g is None else g.to(q.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check(q, k, v)
        qn, kn, v, beta, g = self._inputs(q, k, v)
        gates = (beta,) if g is None else (beta, g)

        def run(q, k, v, beta, g=None):
            return delta_rule_attention(q, k, v, beta, log_decay=g, chunk_size=self.chunk_size)

        return self._both_directions(run, qn, kn, v, *gates).to(q.dtype)


def gated_reference(built: _GatedBase, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object):
    """The registry reference: the same gates, then the quadratic GLA form or the delta-rule recurrence as the
    paper writes it (each direction when bidirectional)."""
    if isinstance(built, GatedLinearAttention):
        g = built.log_decay(q, k)
        scale = built.head_dim ** -0.5
        return built._both_directions(
            lambda q, k, v, g: gated_linear_attention_reference(q * scale, k, v, g), q, k, v, g)
    qn, kn, v, beta, g = built._inputs(q, k, v)
    gates = (beta,) if g is None else (beta, g)
    return built._both_directions(lambda q, k, v, beta, g=None: delta_rule_reference(q, k, v, beta, log_decay=g),
                                  qn, kn, v, *gates)
