"""FAST / Fastmax (Gerami et al. 2024, "FAST: Factorizable Attention for Speeding up Transformers"): a
factorisable polynomial score normalised over keys.

Queries and keys are mean-centred over features and divided by the largest norm (over the call's tokens, or over
the prefix when ``causal``: running statistics never look ahead), so ``|q . k| <= 1``; the score is the
truncated exponential ``f(x) = 1 + x`` (order 1) or ``1 + x + x^2 / 2`` (order 2) of ``x = q . k / temperature``,
which is > 0 for ``|x| <= 1``: rows are proper distributions. It factorises with features ``[1, x]`` and
``[1, x, x x^T / sqrt(2)]`` (the Taylor features of Based), so the engine runs it in O(n d^2) / O(n d^3).
"""

from __future__ import annotations

import torch

from attnkit.feature_maps import FeatureMap, TaylorFeatureMap

__all__ = ["FastmaxFeatureMap"]


class FastmaxFeatureMap(FeatureMap):
    """Fastmax features of order 1 or 2 (module docstring); ``m = 1 + d`` or ``1 + d + d (d + 1) / 2``."""

    name = "fastmax"

    def __init__(self, order: int = 2, temperature: float = 1.0, *, causal: bool = False, eps: float = 1e-6):
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"fastmax order must be 1 or 2, got {order!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.order, self.temperature, self.causal, self.eps = order, float(temperature), causal, eps
        self._taylor = TaylorFeatureMap(scale=1.0 / self.temperature)

    @property
    def token_local(self) -> bool:
        return False  # the max-norm scaling uses the call's (or the prefix's) statistics

    def feature_dim(self, head_dim: int) -> int:
        return 1 + head_dim if self.order == 1 else self._taylor.feature_dim(head_dim)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-centred over features, divided by the largest token norm (prefix-wise when ``causal``)."""
        xc = x - x.mean(-1, keepdim=True)
        norms = xc.norm(dim=-1, keepdim=True)  # [b, h, n, 1]
        top = norms.cummax(dim=-2).values if self.causal else norms.amax(dim=-2, keepdim=True)
        return xc / top.clamp_min(self.eps)

    def phi(self, x, *, is_query, offset=0):
        xn = self.normalise(x)
        if self.order == 2:
            return self._taylor.phi(xn, is_query=is_query)
        return torch.cat([torch.ones_like(xn[..., :1]), xn * self.temperature**-0.5], dim=-1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, order={self.order}, temperature={self.temperature}, causal={self.causal}"
