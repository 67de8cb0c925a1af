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
  agreements). ``sign`` has a straight-through gradient (the derivative of ``tanh``). The hash functions are
  learned self-supervised from the attention map (:func:`ecoformer_hash_step`): each query's most attended keys
  are similar pairs (+1), its least attended dissimilar (-1), and the relaxed code affinity ``h(q) . h(k) / b``
  is fitted to those labels (kernel-based supervised hashing's objective); anchors may be drawn from the data
  (:meth:`EcoHashFeatureMap.set_anchors`).
- :class:`WeightedDiJiangFeatureMap` (Chen et al. 2024, "DiJiang", weighted quasi-Monte-Carlo): DiJiang's DCT +
  QMC positive features with learnable positive weights ``D`` per frequency (``phi = D * exp(T C x' - |x'|^2/2)``),
  initialised to the equal QMC weights ``1 / sqrt(m)`` (where it equals the fixed map).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.feature_maps import DiJiangFeatureMap, FeatureMap

__all__ = ["SpectralFeatureMap", "EcoHashFeatureMap", "WeightedDiJiangFeatureMap", "ecoformer_similarity_labels",
           "ecoformer_hash_loss", "ecoformer_hash_step"]


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

    def set_anchors(self, x: torch.Tensor, *, seed: int = 0) -> EcoHashFeatureMap:
        """Anchors drawn (without replacement) from the rows of ``x [..., d]`` (queries and keys of the teacher),
        as kernelised hashing samples its anchors from the data. Returns ``self``."""
        rows = x.detach().reshape(-1, x.shape[-1])
        if rows.shape[0] < self.anchors.shape[0]:
            raise ValueError(f"set_anchors needs at least {self.anchors.shape[0]} rows, got {rows.shape[0]}")
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[: self.anchors.shape[0]]
        with torch.no_grad():
            self.anchors.copy_(rows[pick.to(rows.device)].to(self.anchors.dtype))
        return self

    def phi(self, x, *, is_query, offset=0):
        z = self.logits(x)
        soft = torch.tanh(z)
        hard = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        sign = hard + (soft - soft.detach())  # forward: sign; backward: tanh's derivative (straight-through)
        return (sign + 1) * 0.5


def ecoformer_similarity_labels(q: torch.Tensor, k: torch.Tensor, *, num_similar: int = 4,
                                num_dissimilar: int = 4, causal: bool = False,
                                scale: float | None = None) -> torch.Tensor:
    """EcoFormer's self-supervision from the attention map: for each query, its ``num_similar`` most attended keys
    (largest ``q . k``) are labelled +1 and its ``num_dissimilar`` least attended -1; the rest 0 (unlabelled).
    ``q [b, h, n, d]``, ``k [b, h_kv, n_k, d]`` (the teacher's) -> labels ``[b, h, n, n_k]``; causal: among
    ``j <= i`` only (rows with fewer visible keys label what they have, similar first)."""
    for name, val in (("num_similar", num_similar), ("num_dissimilar", num_dissimilar)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {val!r}")
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    n, nk = q.shape[2], k.shape[2]
    with torch.no_grad():
        s = q.to(torch.float64) @ k.to(torch.float64).transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None
                                                                          else scale)
        visible = torch.ones(n, nk, dtype=torch.bool, device=q.device)
        if causal:
            visible = torch.arange(nk, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (
                nk - n)
        labels = torch.zeros(s.shape, dtype=q.dtype, device=q.device)
        top = s.masked_fill(~visible, float("-inf")).topk(min(num_similar, nk), dim=-1)
        labels.scatter_(-1, top.indices, torch.where(torch.isfinite(top.values), 1.0, 0.0).to(q.dtype))
        low = s.masked_fill(~visible, float("inf")).masked_fill(labels > 0, float("inf"))
        low = low.topk(min(num_dissimilar, nk), dim=-1, largest=False)
        labels.scatter_(-1, low.indices, torch.where(torch.isfinite(low.values), -1.0, 0.0).to(q.dtype)
                        + labels.gather(-1, low.indices))
    return labels


def ecoformer_hash_loss(fm: EcoHashFeatureMap, q: torch.Tensor, k: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """Kernelised-hashing objective on the labelled pairs: ``mean (h(q_i) . h(k_j) / b - y_ij)^2`` over ``y_ij !=
    0``, with the +-1 codes relaxed to ``tanh(A^T kbar(x))`` (the differentiable surrogate of ``sign``), so
    similar pairs are pushed to equal codes and dissimilar ones to opposite codes."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    hq, hk = torch.tanh(fm.logits(q)), torch.tanh(fm.logits(k))
    affinity = hq @ hk.transpose(-1, -2) / fm.bits
    mask = labels != 0
    return ((affinity - labels).square() * mask).sum() / mask.sum().clamp_min(1)


def ecoformer_hash_step(fm: EcoHashFeatureMap, optimizer: torch.optim.Optimizer, q: torch.Tensor,
                        k: torch.Tensor, *, num_similar: int = 4, num_dissimilar: int = 4, causal: bool = False,
                        scale: float | None = None) -> float:
    """One self-supervised training step of EcoFormer's hash functions on the teacher's ``q, k``: labels from
    the attention map (:func:`ecoformer_similarity_labels`), :func:`ecoformer_hash_loss`, backward,
    ``optimizer.step()``. Returns the loss. (The paper updates the hash functions from the current attention
    periodically during training; the caller chooses how often.)"""
    labels = ecoformer_similarity_labels(q.detach(), k.detach(), num_similar=num_similar,
                                         num_dissimilar=num_dissimilar, causal=causal, scale=scale)
    optimizer.zero_grad()
    loss = ecoformer_hash_loss(fm, q.detach(), k.detach(), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


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
