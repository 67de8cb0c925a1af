"""Learned feature maps of the linear family (kept apart from ``attnkit.feature_maps``, which holds the fixed and
random-feature maps):

- :class:`SpectralFeatureMap` (Chowdhury et al. 2021, "On Learning the Transformer Kernel", KERNELIZED
  TRANSFORMER): random Fourier features ``m^-1/2 [cos(W x), sin(W x)]`` whose spectral distribution is learned:
  ``"gmm"`` (GMM-RKS, ``w = mu_c + sigma_c * eps`` by reparameterisation, ``m / C`` samples per component) or
  ``"generative"`` (``w = g(eps)``, a small MLP generator) or ``"fastfood"`` (FastFood-RKS, blocks
  ``W = S H G Pi H B / sqrt(d')`` of Hadamard ``H`` and learnable diagonals ``S, G, B``, a fixed permutation
  ``Pi``; ``d'`` the head dim rounded up to a power of two). The ``eps`` are fixed seeded buffers, so the map is
  deterministic between redraws; ``phi(q) . phi(k)`` estimates the learned stationary kernel.
- :class:`EcoHashFeatureMap` (Liu et al. 2022, "EcoFormer: Energy-Saving Attention with Linear Complexity"):
  ``b``-bit codes ``h(x) = [sign(A^T kbar(x)) + 1] / 2`` from a centred RBF kernel vector ``kbar(x)`` against
  learnable anchors; attention is linear attention with ``phi = code`` (non-negative, so products are sums of
  agreements). ``sign`` has a straight-through gradient (the derivative of ``tanh``).
- :class:`WeightedDiJiangFeatureMap` (Chen et al. 2024, "DiJiang", weighted quasi-Monte-Carlo): DiJiang's DCT +
  QMC positive features with learnable positive weights ``D`` per frequency (``phi = D * exp(T C x' - |x'|^2/2)``),
  initialised to the equal QMC weights ``1 / sqrt(m)`` (where it equals the fixed map).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.feature_maps import DiJiangFeatureMap, FeatureMap

__all__ = ["SpectralFeatureMap", "EcoHashFeatureMap", "WeightedDiJiangFeatureMap"]


class SpectralFeatureMap(FeatureMap):
    """Learned random Fourier features: ``2 num_features`` signed features (module docstring)."""

    name = "spectral"
    nonnegative = False

    def __init__(self, head_dim: int, num_features: int = 64, *, spectral: str = "gmm", components: int = 4,
                 hidden: int = 32, seed: int = 0):
        super().__init__()
        if spectral not in ("gmm", "generative", "fastfood"):
            raise ValueError(f"spectral must be 'gmm', 'generative' or 'fastfood', got {spectral!r}")
        if spectral == "gmm" and num_features % components:
            raise ValueError(f"num_features={num_features} must be a multiple of components={components}")
        self.head_dim, self.num_features, self.spectral, self.components = head_dim, num_features, spectral, components
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("eps", torch.randn(num_features, head_dim, generator=g))
        if spectral == "gmm":
            # component c starts as N(0, I / sqrt(d)): the softmax-like scale of q . k / sqrt(d)
            self.mu = nn.Parameter(torch.zeros(components, head_dim))
            self.log_sigma = nn.Parameter(torch.full((components, head_dim), -0.25 * math.log(head_dim)))
        elif spectral == "generative":
            self.generator = nn.Sequential(nn.Linear(head_dim, hidden), nn.Tanh(), nn.Linear(hidden, head_dim))
        else:
            dp = 1 << (head_dim - 1).bit_length()
            blocks = -(-num_features // dp)
            self.register_buffer("hadamard", _hadamard(dp))
            self.register_buffer("perm", torch.stack([torch.randperm(dp, generator=g) for _ in range(blocks)]))
            self.b_diag = nn.Parameter(torch.randint(0, 2, (blocks, dp), generator=g).float() * 2 - 1)
            gauss = torch.randn(blocks, dp, generator=g)
            self.g_diag = nn.Parameter(gauss)
            # S rescales rows to chi_d' norms, as for Gaussian rows (Le et al. 2013), scaled like N(0, I / sqrt(d))
            chi = torch.randn(blocks, dp, dp, generator=g).norm(dim=-1)
            self.s_diag = nn.Parameter(chi / gauss.norm(dim=-1, keepdim=True) * head_dim**-0.25)

    def frequencies(self) -> torch.Tensor:
        """``W [num_features, head_dim]``: the learned spectral samples."""
        if self.spectral == "gmm":
            per = self.num_features // self.components
            mu = self.mu.repeat_interleave(per, dim=0)
            sigma = self.log_sigma.exp().repeat_interleave(per, dim=0)
            return mu + sigma * self.eps
        if self.spectral == "generative":
            return self.generator(self.eps)
        h = self.hadamard
        dp = h.shape[0]
        rows = []
        for i in range(self.perm.shape[0]):  # W_i = S H G Pi H B / sqrt(d')
            hb = h * self.b_diag[i]  # H B (B scales columns)
            pi = hb[self.perm[i]]  # Pi H B
            w = self.s_diag[i][:, None] * (h @ (self.g_diag[i][:, None] * pi)) / dp**0.5
            rows.append(w)
        return torch.cat(rows)[: self.num_features, : self.head_dim]

    def feature_dim(self, head_dim: int) -> int:
        return 2 * self.num_features

    def phi(self, x, *, is_query, offset=0):
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"spectral map built for head_dim={self.head_dim}, got {x.shape[-1]}")
        proj = x @ self.frequencies().to(x.dtype).T
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1) * self.num_features ** -0.5


class EcoHashFeatureMap(FeatureMap):
    """``bits`` binary features from kernelised hashing (module docstring); ``m = bits``."""

    name = "ecohash"

    def __init__(self, head_dim: int, bits: int = 16, *, anchors: int = 32, gamma: float | None = None,
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.head_dim, self.bits = head_dim, bits
        self.gamma = 1.0 / head_dim if gamma is None else float(gamma)
        self.anchors = nn.Parameter(torch.randn(anchors, head_dim, generator=g))
        self.proj = nn.Parameter(torch.randn(anchors, bits, generator=g) * anchors**-0.5)

    def feature_dim(self, head_dim: int) -> int:
        return self.bits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``A^T kbar(x)``: RBF kernel values against the anchors, centred over anchors, projected."""
        d2 = (x[..., None, :] - self.anchors.to(x.dtype)).square().sum(-1)  # [..., anchors]
        kern = torch.exp(-self.gamma * d2)
        return (kern - kern.mean(-1, keepdim=True)) @ self.proj.to(x.dtype)

    def phi(self, x, *, is_query, offset=0):
        z = self.logits(x)
        soft = torch.tanh(z)
        hard = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        sign = hard + (soft - soft.detach())  # forward: sign; backward: tanh's derivative (straight-through)
        return (sign + 1) * 0.5


class WeightedDiJiangFeatureMap(DiJiangFeatureMap):
    """DiJiang with learnable per-frequency weights ``D = exp(log_weight) / sqrt(m)`` (``log_weight = 0``: the
    equal-weight map). ``m = num_features``, positive features."""

    name = "dijiang_weighted"

    def __init__(self, head_dim: int | None = None, num_features: int = 256, *, seed: int = 0):
        super().__init__(head_dim, num_features, seed=seed)
        self.log_weight = nn.Parameter(torch.zeros(num_features))

    def phi(self, x, *, is_query, offset=0):
        return super().phi(x, is_query=is_query, offset=offset) * torch.exp(self.log_weight).to(x.dtype)

    def forward(self, q, k, *, q_offset=0, k_offset=0):
        if not self.stabilize:  # the unshifted path goes through phi, which weights already
            return super().forward(q, k, q_offset=q_offset, k_offset=k_offset)
        # the stabilised pair path computes both features without phi: weight them here
        fq, fk = super().forward(q, k, q_offset=q_offset, k_offset=k_offset)
        w = torch.exp(self.log_weight)
        return fq * w.to(fq.dtype), fk * w.to(fk.dtype)


def _hadamard(n: int) -> torch.Tensor:
    """Sylvester's Walsh-Hadamard matrix ``[n, n]`` (``n`` a power of two), entries +-1 (``H H^T = n I``)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h
