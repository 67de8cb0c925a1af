"""attnkit.nn modules of the approx family: mechanisms that own parameters or state.

- :class:`LinformerAttention`: the learned sequence projections E, F of Linformer (Wang et al., 2020);
- :class:`NystromAttention`: Nystromformer with its depthwise-convolution skip (Xiong et al., 2021);
- :class:`RoutingAttention`: Routing Transformer attention with online (EMA) k-means centroids
  (Roy et al., 2021);
- :class:`TransformerVQAttention`: Transformer-VQ with an EMA k-means codebook (Lingle, 2024);
- :class:`CombinerAttention`: Combiner-Fixed with a learned within-region distribution (Ren et al., 2021);
- :class:`SparseKAttention`: SPARSEK attention with its learned linear key scorer (Lou et al., 2024);
- :class:`SelectPackAttention`: Select-and-Pack attention with its learned token gate (Zhang et al., 2024).

Each takes ``q [batch, heads, seq, dim]``, ``k``, ``v`` and returns ``[batch, heads, seq, dim_v]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.approx._common import refuse_causal_decoding
from attnkit.ops.approx.combiner import combiner_attention, combiner_reference
from attnkit.ops.approx.linformer import linformer_attention, linformer_reference
from attnkit.ops.approx.nystrom import nystrom_attention, nystrom_reference
from attnkit.ops.approx.routing import kmeans_ema_update, routing_attention
from attnkit.ops.approx.select_pack import select_pack_attention, select_pack_reference
from attnkit.ops.approx.sparsek import sparsek_attention, sparsek_reference
from attnkit.ops.approx.transformer_vq import vq_assign, vq_attention, vq_codebook, vq_commitment_loss, vq_reference

__all__ = ["LinformerAttention", "NystromAttention", "RoutingAttention", "TransformerVQAttention",
           "CombinerAttention", "SparseKAttention", "SelectPackAttention"]

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


class TransformerVQAttention(nn.Module):
    """Transformer-VQ attention (Lingle, 2024) with a codebook ``[num_heads, codebook_size, head_dim]``.

    The codebook is a buffer learned as in the paper by EMA k-means: in training mode, *after* each forward
    (so a causal call never sees its own future keys in its codebook), every code moves to
    ``decay c + (1 - decay) mean(keys assigned to it)``. :meth:`fit` sets it by k-means on calibration
    keys; :meth:`commitment_loss` is the paper's auxiliary loss on the keys. Forward: see
    :func:`attnkit.ops.approx.vq_attention` (exact softmax over the quantised keys, linear time).
    """

    def __init__(self, num_heads: int, head_dim: int, codebook_size: int = 256, *, block_size: int = 256,
                 causal: bool = False, decay: float = 0.99, scale: float | None = None, seed: int = 0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if codebook_size < 1 or block_size < 1:
            raise ValueError(f"codebook_size and block_size must be >= 1, got {codebook_size} and {block_size}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("codebook", torch.randn(num_heads, codebook_size, head_dim, generator=g))
        self.block_size, self.causal, self.decay, self.scale = block_size, causal, decay, scale

    def _params(self) -> dict:
        return dict(codebook=self.codebook, block_size=self.block_size, causal=self.causal, scale=self.scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        refuse_causal_decoding("transformer_vq", self.causal, q, k)
        out = vq_attention(q, k, v, **self._params())
        if self.training:
            self._ema_update(k)
        return out

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return vq_reference(q, k, v, **self._params())

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax over the quantised keys, ``[b, h, n, n_k]`` (materialised; small inputs)."""
        return vq_reference(q, k, v, return_attention=True, **self._params())[1]

    @torch.no_grad()
    def _ema_update(self, k: torch.Tensor) -> None:
        k = k.detach().repeat_interleave(self.codebook.shape[0] // k.shape[1], dim=1).to(self.codebook.dtype)
        idx = vq_assign(k, self.codebook)  # [b, h, n]
        onehot = torch.nn.functional.one_hot(idx, self.codebook.shape[1]).to(k.dtype)  # [b, h, n, S]
        sums = (onehot.transpose(-1, -2) @ k).sum(0)  # [h, S, d]
        counts = onehot.sum((0, 2))  # [h, S]
        mean = sums / counts.clamp_min(1)[..., None]
        self.codebook.copy_(torch.where(counts[..., None] > 0,
                                        self.decay * self.codebook + (1 - self.decay) * mean, self.codebook))

    @torch.no_grad()
    def fit(self, k: torch.Tensor, *, iterations: int = 10, seed: int = 0) -> TransformerVQAttention:
        """Set the codebook by k-means on calibration keys ``k [b, num_heads | kv_heads, n, head_dim]``; returns
        self."""
        k = k.repeat_interleave(self.codebook.shape[0] // k.shape[1], dim=1)
        self.codebook.copy_(vq_codebook(k, self.codebook.shape[1], iterations=iterations, seed=seed))
        return self

    def commitment_loss(self, k: torch.Tensor) -> torch.Tensor:
        """``mean |k - sg(code(k))|^2``: pulls the keys towards their codes (gradient to ``k`` only)."""
        k = k.repeat_interleave(self.codebook.shape[0] // k.shape[1], dim=1)
        return vq_commitment_loss(k, self.codebook)

    def extra_repr(self) -> str:
        h, s, d = self.codebook.shape
        return f"heads={h}, codebook_size={s}, head_dim={d}, block_size={self.block_size}, causal={self.causal}"


class CombinerAttention(nn.Module):
    """Combiner-Fixed attention (Ren et al., 2021) with a learned within-region scorer ``region_weight
    [num_heads, head_dim]`` (``q(j|r) = softmax_j(k_j . w)`` inside each block; zero init = mean pooling).
    See :func:`attnkit.ops.approx.combiner_attention`."""

    def __init__(self, num_heads: int, head_dim: int, *, block_size: int = 128, causal: bool = False,
                 scale: float | None = None):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.region_weight = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.block_size, self.causal, self.scale = block_size, causal, scale

    def _params(self) -> dict:
        return dict(block_size=self.block_size, region_weight=self.region_weight, causal=self.causal,
                    scale=self.scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return combiner_attention(q, k, v, **self._params())

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return combiner_reference(q, k, v, **self._params())

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return combiner_reference(q, k, v, return_attention=True, **self._params())[1]


class SparseKAttention(nn.Module):
    """SPARSEK attention (Lou et al., 2024) with its scoring network, a linear scorer of the keys
    ``u_j = k_j . w + b`` (``w [num_heads, head_dim]``, ``b [num_heads]``), trained through the
    differentiable SPARSEK mask. See :func:`attnkit.ops.approx.sparsek_attention`."""

    def __init__(self, num_heads: int, head_dim: int, top_k: int = 64, *, window: int = 0, causal: bool = False,
                 chunk_size: int = 128, scale: float | None = None, seed: int = 0):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        g = torch.Generator().manual_seed(seed)
        # Unit-variance scores for unit-variance keys: spread enough that the support stays close to top_k.
        self.score_weight = nn.Parameter(torch.randn(num_heads, head_dim, generator=g) / math.sqrt(head_dim) * 4)
        self.score_bias = nn.Parameter(torch.zeros(num_heads))
        self.top_k, self.window, self.causal, self.chunk_size, self.scale = top_k, window, causal, chunk_size, scale

    def _params(self) -> dict:
        return dict(top_k=self.top_k, score_weight=self.score_weight, score_bias=self.score_bias,
                    window=self.window, causal=self.causal, chunk_size=self.chunk_size, scale=self.scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        refuse_causal_decoding("sparsek", self.causal, q, k)
        return sparsek_attention(q, k, v, **self._params())

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sparsek_reference(q, k, v, **self._params())

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sparsek_reference(q, k, v, return_attention=True, **self._params())[1]

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, window={self.window}, causal={self.causal}"


class SelectPackAttention(nn.Module):
    """Select-and-Pack attention (Zhang et al., 2024) with its gating layer: token scores
    ``u_j = mean_h (k_j^h . w_h) + c`` (``w [num_heads, head_dim]``, ``c`` scalar), tokens with ``u_j > threshold``
    selected, packed across the batch and attended within their image; trained through a straight-through gate.
    See :func:`attnkit.ops.approx.select_pack_attention`."""

    def __init__(self, num_heads: int, head_dim: int, *, threshold: float = 0.0, chunk_size: int = 256,
                 scale: float | None = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_weight = nn.Parameter(torch.randn(num_heads, head_dim, generator=g) / math.sqrt(head_dim))
        self.gate_bias = nn.Parameter(torch.zeros(()))
        self.threshold, self.chunk_size, self.scale = float(threshold), chunk_size, scale

    def _params(self) -> dict:
        return dict(gate_weight=self.gate_weight, gate_bias=self.gate_bias, threshold=self.threshold,
                    chunk_size=self.chunk_size, scale=self.scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return select_pack_attention(q, k, v, **self._params())

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return select_pack_reference(q, k, v, **self._params())

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"
