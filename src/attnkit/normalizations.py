"""Normalisations of attention scores: softmax and its alternatives.

Each turns scores ``s_ij`` (scaled and modified) into weights ``w_ij``; the output is ``sum_j w_ij v_j``.
Engines read two facts: ``row_normalized`` (weights divided by a per-row sum, computed tile by tile) and
``global`` (needs every row and column at once, so it runs on the dense reference engine only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Normalization", "softmax", "sigmoid", "relu", "softplus", "sinkhorn", "resolve"]


@dataclass(frozen=True)
class Normalization:
    """A normalisation; use the constructors below or the strings "softmax", "sigmoid", "relu", "softplus",
    "sinkhorn"."""

    name: str
    bias: float | None = None  # sigmoid: added to the scores; None = -log(kv_len)
    iterations: int = 3  # sinkhorn
    row_normalized: bool = True
    is_global: bool = False

    def weight(self, scores: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Unnormalised weights ``f(s)`` for the elementwise normalisations (not softmax / sinkhorn)."""
        if self.name == "sigmoid":
            b = -math.log(kv_len) if self.bias is None else self.bias
            return torch.sigmoid(scores + b)
        if self.name == "relu":
            return torch.relu(scores) / kv_len
        if self.name == "softplus":
            return torch.nn.functional.softplus(scores)
        raise ValueError(f"{self.name} has no elementwise weight")


def softmax() -> Normalization:
    """``w_ij = exp(s_ij) / sum_j exp(s_ij)``."""
    return Normalization("softmax")


def sigmoid(bias: float | None = None) -> Normalization:
    """Sigmoid attention ``w_ij = sigmoid(s_ij + b)``, no row normalisation, ``b = -log(n)`` by default
    ("Theory, Analysis, and Best Practices for Sigmoid Self-Attention", Ramapuram et al., 2024)."""
    return Normalization("sigmoid", bias=bias, row_normalized=False)


def relu() -> Normalization:
    """ReLU attention ``w_ij = relu(s_ij) / n`` ("Replacing softmax with ReLU in Vision Transformers",
    Wortsman et al., 2023), ``n`` the number of keys."""
    return Normalization("relu", row_normalized=False)


def softplus() -> Normalization:
    """Softplus attention ``w_ij = softplus(s_ij) / sum_j softplus(s_ij)``: softmax's exp replaced by softplus,
    keeping the l1 row normalisation ("Softplus Attention with Re-weighting Boosts Length Extrapolation in
    Large Language Models"). The paper's length scaling and re-weighting are not included."""
    return Normalization("softplus")


def sinkhorn(iterations: int = 3) -> Normalization:
    """Sinkhorn (doubly stochastic) attention ("Sinkformers", Sander et al., 2022): ``exp(S)`` normalised
    alternately over rows and columns, ``iterations`` normalisations in all starting with rows (1 = softmax),
    in the log domain. Needs column sums over all queries: dense reference engine only, non-causal only."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"sinkhorn(iterations) must be a positive int, got {iterations!r}")
    return Normalization("sinkhorn", iterations=iterations, is_global=True)


_BY_NAME = {"softmax": softmax, "sigmoid": sigmoid, "relu": relu, "softplus": softplus, "sinkhorn": sinkhorn}


def resolve(normalization: str | Normalization) -> Normalization:
    if isinstance(normalization, Normalization):
        return normalization
    if isinstance(normalization, str) and normalization in _BY_NAME:
        return _BY_NAME[normalization]()
    raise ValueError(f"normalization must be one of {sorted(_BY_NAME)} or a Normalization, got {normalization!r}")
