"""attnkit.nn modules of the approx family: mechanisms that own parameters or state.

- :class:`LinformerAttention`: the learned sequence projections E, F of Linformer (Wang et al., 2020);
- :class:`NystromAttention`: Nystromformer with its depthwise-convolution skip (Xiong et al., 2021);
- :class:`RoutingAttention`: Routing Transformer attention with online (EMA) k-means centroids
  (Roy et al., 2021).

Each takes ``q [batch, heads, seq, dim]``, ``k``, ``v`` and returns ``[batch, heads, seq, dim_v]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.approx.linformer import linformer_attention, linformer_reference
from attnkit.ops.approx.nystrom import nystrom_attention, nystrom_reference
from attnkit.ops.approx.routing import kmeans_ema_update, routing_attention

__all__ = ["LinformerAttention", "NystromAttention", "RoutingAttention"]

_SHARING = ("none", "headwise", "kv")


class LinformerAttention(nn.Module):
    """Linformer attention with learned ``E, F [proj_len, seq_len]``.

    ``sharing`` follows the paper: ``"none"`` (one E, F per head; needs ``num_heads``), ``"headwise"`` (one
    E and one F for all heads), ``"kv"`` (one matrix for keys and values and all heads). Layerwise sharing:
    pass ``shared=`` another ``LinformerAttention``; this layer then uses its parameters. Inputs may be
    shorter than ``seq_len`` (the first columns are used, which equals zero-padding). No causal form.
    """

    def __init__(self, seq_len: int, proj_len: int = 256, *, num_heads: int | None = None,
                 sharing: str = "headwise", shared: LinformerAttention | None = None,
                 scale: float | None = None):
        super().__init__()
        if sharing not in _SHARING:
            raise ValueError(f"sharing must be one of {_SHARING}, got {sharing!r}")
        if seq_len < 1 or proj_len < 1:
            raise ValueError(f"seq_len and proj_len must be >= 1, got {seq_len} and {proj_len}")
        if sharing == "none" and num_heads is None:
            raise ValueError("sharing='none' keeps one projection per head: pass num_heads")
        self.seq_len, self.proj_len, self.sharing, self.scale = seq_len, proj_len, sharing, scale
        if shared is not None:
            if shared.seq_len < seq_len:
                raise ValueError(f"shared layer covers {shared.seq_len} positions, fewer than seq_len={seq_len}")
            self.e, self.f = shared.e, shared.f
            return
        shape = (proj_len, seq_len) if sharing != "none" else (num_heads, proj_len, seq_len)
        # Johnson-Lindenstrauss initialisation: N(0, 1/k) entries.
        self.e = nn.Parameter(torch.randn(shape) / math.sqrt(proj_len))
        self.f = None if sharing == "kv" else nn.Parameter(torch.randn(shape) / math.sqrt(proj_len))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return linformer_attention(q, k, v, e=self.e, f=self.f, scale=self.scale)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return linformer_reference(q, k, v, e=self.e, f=self.f, scale=self.scale)

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The implied ``[b, h, n, n_k]`` matrix ``softmax(Q (E K)^T s) F`` (materialised; small inputs)."""
        return linformer_reference(q, k, v, e=self.e, f=self.f, scale=self.scale, return_attention=True)[1]

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, proj_len={self.proj_len}, sharing={self.sharing!r}"


class NystromAttention(nn.Module):
    """Nystromformer attention with the paper's depthwise-convolution skip on V (kernel ``conv_kernel``,
    one kernel per head; 0 disables it). No causal form."""

    def __init__(self, num_heads: int, num_landmarks: int = 64, *, pinv_iterations: int = 6,
                 conv_kernel: int = 33, scale: float | None = None):
        super().__init__()
        if conv_kernel and conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (same padding), got {conv_kernel}")
        self.num_landmarks, self.pinv_iterations, self.scale = num_landmarks, pinv_iterations, scale
        self.conv = (nn.Parameter(torch.randn(num_heads, 1, conv_kernel, 1) / conv_kernel)
                     if conv_kernel else None)

    def _params(self) -> dict:
        return dict(num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations,
                    conv_weight=self.conv, scale=self.scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return nystrom_attention(q, k, v, **self._params())

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return nystrom_reference(q, k, v, **self._params())

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The implied ``[b, h, n, n_k]`` matrix (the conv skip is not part of it)."""
        return nystrom_reference(q, k, v, return_attention=True, **self._params())[1]


class RoutingAttention(nn.Module):
    """Routing attention with centroids ``[num_heads, num_clusters, head_dim]`` learned by online k-means:
    in training mode each forward moves every centroid towards the mean of the (unit-normalised) queries
    and keys assigned to it, ``mu <- decay mu + (1 - decay) mean`` (Roy et al., 2021, sec. 4.1)."""

    def __init__(self, num_heads: int, head_dim: int, num_clusters: int = 8, *, decay: float = 0.999,
                 causal: bool = False, chunk_size: int = 256, scale: float | None = None, seed: int = 0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        g = torch.Generator().manual_seed(seed)
        c = torch.randn(num_heads, num_clusters, head_dim, generator=g)
        self.register_buffer("centroids", c / c.norm(dim=-1, keepdim=True))
        self.decay, self.causal, self.chunk_size, self.scale = decay, causal, chunk_size, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.centroids.copy_(kmeans_ema_update(self.centroids, q, k, self.decay))
        return routing_attention(q, k, v, num_clusters=self.centroids.shape[1], centroids=self.centroids,
                                 causal=self.causal, chunk_size=self.chunk_size, scale=self.scale)
