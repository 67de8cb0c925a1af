"""Normalisations of attention scores: softmax and its alternatives.

Each turns scores ``s_ij`` (scaled and modified) into weights ``w_ij``; the output is ``sum_j w_ij v_j``.
Engines read two facts: ``row_normalized`` (weights divided by a per-row sum, computed tile by tile) and
``global`` (needs every row and column at once, so it runs on the dense reference engine only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Normalization", "softmax", "sigmoid", "relu", "softplus", "sinkhorn", "standardize", "resolve"]


@dataclass(frozen=True)
class Normalization:
    """A normalisation; use the constructors below or the strings "softmax", "sigmoid", "relu", "softplus",
    "sinkhorn"."""

    name: str
    bias: float | None = None  # sigmoid: added to the scores; None = -log(kv_len)
    iterations: int = 3  # sinkhorn
    row_normalized: bool = True
    is_global: bool = False
    power: float = 1.0  # softplus: re-weighting exponent (1 = none)
    eps: float = 1e-5  # standardize: added to the variance
    gain: float = 1.0  # standardize: output gain

    def weight(self, scores: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Unnormalised weights ``f(s)`` for the elementwise normalisations (not softmax / sinkhorn)."""
        if self.name == "sigmoid":
            b = -math.log(kv_len) if self.bias is None else self.bias
            return torch.sigmoid(scores + b)
        if self.name == "relu":
            return torch.relu(scores) / kv_len
        if self.name == "softplus":
            w = torch.nn.functional.softplus(scores)
            return w if self.power == 1.0 else w.pow(self.power)
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


def softplus(power: float = 1.0) -> Normalization:
    """Softplus attention ``w_ij = softplus(s_ij) / sum_j softplus(s_ij)``: softmax's exp replaced by softplus,
    keeping the l1 row normalisation ("Softplus Attention with Re-weighting Boosts Length Extrapolation in
    Large Language Models", Gao & Spratling, 2025, Sec. 3: LSSA).

    ``power > 1`` adds the paper's re-weighting (LSSAR) as a power of the normalised weights, renormalised:
    ``w'_ij = w_ij^p / sum_j w_ij^p`` (= ``softplus(s_ij)^p / sum_j softplus(s_ij)^p``): strong weights grow,
    weak ones shrink, the argmax stays and the row entropy never rises. [mem?] The paper's exact sharpening
    function could not be checked offline; this is the power form the catalogue names. The paper's length
    scale ``lambda(n) * s_ij`` is the score modifier ``attnkit.score_mods.length_scale``."""
    if not isinstance(power, (int, float)) or isinstance(power, bool) or power < 1:
        raise ValueError(f"softplus(power) must be a number >= 1 (1: no re-weighting), got {power!r}")
    return Normalization("softplus", power=float(power))


def standardize(gain: float = 1.0, eps: float = 1e-5) -> Normalization:
    """Normalised attention without the probability cage ("Normalized Attention Without Probability Cage",
    Richter & Wattenhofer, 2020, Sec. 3): each row of logits is standardised over its visible keys,
    ``a_ij = gain * (s_ij - mu_i) / sqrt(var_i + eps)`` (biased variance), and ``o_i = sum_j a_ij v_j``; weights
    may be negative and do not sum to 1. The tiled engine takes the statistics in two passes over the keys
    (mean first, then centred variance and the output), never holding a row of scores; masked keys are left
    out of the statistics and rows with no visible key give zeros."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"standardize(eps) must be a positive number, got {eps!r}")
    return Normalization("standardize", row_normalized=False, eps=float(eps), gain=float(gain))


def sinkhorn(iterations: int = 3) -> Normalization:
    """Sinkhorn (doubly stochastic) attention ("Sinkformers", Sander et al., 2022): ``exp(S)`` normalised
    alternately over rows and columns, ``iterations`` normalisations in all starting with rows (1 = softmax),
    in the log domain. Needs column sums over all queries: dense reference engine only, non-causal only."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"sinkhorn(iterations) must be a positive int, got {iterations!r}")
    return Normalization("sinkhorn", iterations=iterations, is_global=True)


_BY_NAME = {"softmax": softmax, "sigmoid": sigmoid, "relu": relu, "softplus": softplus, "sinkhorn": sinkhorn,
            "standardize": standardize}


_DEFAULTS: dict[str, Normalization] = {}


def resolve(normalization: str | Normalization) -> Normalization:
    if isinstance(normalization, Normalization):
        return normalization
    if isinstance(normalization, str) and normalization in _BY_NAME:
        hit = _DEFAULTS.get(normalization)
        if hit is None:  # frozen: one default instance per name (it is hashed per call by the dispatch cache)
            hit = _DEFAULTS[normalization] = _BY_NAME[normalization]()
        return hit
    raise ValueError(f"normalization must be one of {sorted(_BY_NAME)} or a Normalization, got {normalization!r}")
