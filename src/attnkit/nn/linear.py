"""attnkit.nn modules of the linear family.

- :class:`LinearAttention`: multi-head kernelized linear attention over ``[batch, seq, embed_dim]`` with any
  feature map, optional per-head decay, and an O(1) recurrent state for decoding (Katharopoulos et al. 2020);
- :class:`LinearMultiheadAttention`: the same layer, causal by default, with the ``forward(x, cache=...)``
  decoding interface of :class:`attnkit.nn.MultiheadAttention` (``attnkit.RecurrentStateCache``);
- :class:`BasedAttention`: the Based layer (Arora et al., "Simple linear attention language models balance the
  recall-throughput tradeoff", 2024): a short causal depthwise convolution, Taylor linear attention on small
  projected feature dimensions, and exact sliding-window softmax attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit import patterns as P
from attnkit.feature_maps import FeatureMap, TaylorFeatureMap
from attnkit.feature_maps import get as get_feature_map
from attnkit.ops.exact.api import attention
from attnkit.ops.linear.api import linear_attention
from attnkit.ops.linear.state import LinearAttentionState

__all__ = ["LinearAttention", "LinearMultiheadAttention", "BasedAttention"]

# Feature maps whose constructor needs the head dimension (learnable maps own per-dimension parameters).
_NEEDS_SHAPE = ("rebased", "hedgehog")


def _check_heads(embed_dim: int, num_heads: int, kv_heads: int) -> None:
    if embed_dim < 1 or num_heads < 1 or kv_heads < 1:
        raise ValueError(f"embed_dim, num_heads and kv_heads must be >= 1, got {embed_dim}, {num_heads}, {kv_heads}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of kv_heads={kv_heads}")


def _check_x(x: torch.Tensor, embed_dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [batch, seq, {embed_dim}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(f"x must be [batch, seq, {embed_dim}], got {tuple(x.shape)}")


def _resolve_decay(decay: float | str | torch.Tensor | list | None, num_heads: int) -> torch.Tensor | None:
    if decay is None:
        return None
    if isinstance(decay, str):
        if decay != "retention":
            raise ValueError(f"decay must be a float, one value per head, 'retention' or None, got {decay!r}")
        from attnkit.ops.linear.mechanisms import retention_decay

        return retention_decay(num_heads)
    lam = torch.as_tensor(decay, dtype=torch.float64).reshape(-1)
    if lam.numel() not in (1, num_heads):
        raise ValueError(f"decay must be a float or have one value per head ({num_heads}), got {lam.numel()}")
    if not bool(((lam > 0) & (lam <= 1)).all()):
        raise ValueError(f"decay values must lie in (0, 1], got {lam.tolist()}")
    return lam.expand(num_heads).clone()


class LinearAttention(nn.Module):
    """Multi-head kernelized linear attention ``o_i = phi(q_i)^T S_i / phi(q_i)^T z_i`` with input and output
    projections ("Transformers are RNNs", Katharopoulos et al. 2020; decay as in Lightning Attention-2).

    Args:
        embed_dim: model width; ``head_dim = embed_dim // num_heads``.
        num_heads: query heads. ``kv_heads``: key/value heads (grouped-query; default ``num_heads``).
        feature_map: a name from ``attnkit.feature_maps`` (``"elu"``, ``"favor"``, ``"taylor"``, ``"hedgehog"``,
            ...; learnable maps are built with this layer's ``head_dim`` and ``num_heads``) or a
            :class:`~attnkit.feature_maps.FeatureMap` instance.
        causal: token ``t`` sees tokens ``<= t`` only (needed to carry a state).
        decay: per-head state decay in ``(0, 1]``: a float, ``num_heads`` values, ``"retention"``
            (``1 - 2^(-5-h)``) or None. Causal only.
        normalize: ``"denominator"``, ``"none"`` or ``"rms"`` (see :func:`attnkit.linear_attention`).
        chunk_size: chunk length of the causal chunked engine (speed knob only).
        bias: biases of the projections.

    Shapes: ``x [batch, seq, embed_dim]`` -> ``[batch, seq, embed_dim]``; the state is a
    :class:`~attnkit.LinearAttentionState` with ``S [batch, num_heads, m, head_dim]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kv_heads: int | None = None,
                 feature_map: str | FeatureMap = "elu", causal: bool = False,
                 decay: float | str | torch.Tensor | list | None = None, normalize: str = "denominator",
                 chunk_size: int = 64, bias: bool = False):
        super().__init__()
        kv_heads = num_heads if kv_heads is None else kv_heads
        _check_heads(embed_dim, num_heads, kv_heads)
        if decay is not None and not causal:
            raise ValueError("decay is defined for causal attention only; pass causal=True or decay=None")
        self.embed_dim, self.num_heads, self.kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.normalize, self.chunk_size = causal, normalize, chunk_size
        if isinstance(feature_map, str) and feature_map in _NEEDS_SHAPE:
            feature_map = get_feature_map(feature_map, head_dim=self.head_dim, num_heads=num_heads)
        self.feature_map = get_feature_map(feature_map)
        # float64, not a buffer: .half() must not round 1 - 2^-12 to 1 (the engine moves it to the device)
        self.decay = _resolve_decay(decay, num_heads)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)  # [b, heads, n, head_dim]

    def state_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the recurrent state of one sequence (all heads): constant in the sequence length."""
        return self.num_heads * self.feature_map.state_bytes(self.head_dim, self.head_dim, dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               state: LinearAttentionState | None = None, return_state: bool = False):
        """The attention itself on ``[batch, heads, seq, head_dim]`` tensors (no projections)."""
        return linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal, decay=self.decay,
                                normalize=self.normalize, chunk_size=self.chunk_size, state=state,
                                return_state=return_state)

    def forward(self, x: torch.Tensor, *, state: LinearAttentionState | None = None, return_state: bool = False,
                cache=None):
        """``x [batch, n, embed_dim]`` -> ``[batch, n, embed_dim]`` (and the new state with ``return_state``).

        ``state``: continue a causal sequence from a previous call's state. ``cache``: an object with a
        ``state`` attribute (``attnkit.RecurrentStateCache``), read and updated in place.
        """
        _check_x(x, self.embed_dim)
        if cache is not None:
            if not hasattr(cache, "state"):
                raise TypeError(f"cache must be an attnkit.RecurrentStateCache, got {type(cache).__name__}")
            if state is not None:
                raise ValueError("pass either state= or cache=, not both")
        if (cache is not None or state is not None or return_state) and not self.causal:
            raise ValueError("a recurrent state continues a causal sequence; build the layer with causal=True")
        q = self._split(self.q_proj(x), self.num_heads)
        k = self._split(self.k_proj(x), self.kv_heads)
        v = self._split(self.v_proj(x), self.kv_heads)
        if cache is not None:
            out, cache.state = self.attend(q, k, v, state=cache.state, return_state=True)
        elif return_state:
            out, state = self.attend(q, k, v, state=state, return_state=True)
        else:
            out = self.attend(q, k, v, state=state)
        b, _, n, _ = out.shape
        y = self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))
        return (y, state) if return_state and cache is None else y


class LinearMultiheadAttention(LinearAttention):
    """:class:`LinearAttention`, causal by default: the decoding layer used with ``forward(x, cache=
    attnkit.RecurrentStateCache())`` (prefill, then one-token calls continue from the O(1) state)."""

    def __init__(self, embed_dim: int, num_heads: int, *, kv_heads: int | None = None,
                 feature_map: str | FeatureMap = "elu", causal: bool = True,
                 decay: float | str | torch.Tensor | list | None = None, normalize: str = "denominator",
                 chunk_size: int = 64, bias: bool = False):
        super().__init__(embed_dim, num_heads, kv_heads=kv_heads, feature_map=feature_map, causal=causal,
                         decay=decay, normalize=normalize, chunk_size=chunk_size, bias=bias)


class BasedAttention(nn.Module):
    """The Based layer (Arora et al. 2024): three token mixers summed, as in the paper's hybrid.

    1. a short depthwise convolution over the sequence (``conv_size`` taps, causal: left-padded), whose
       output feeds the projections (the paper's short "BaseConv" mixing of neighbouring tokens);
    2. Taylor linear attention ``phi(q) . phi(k) = 1 + s + s^2 / 2`` on queries and keys projected to a small
       ``feature_dim`` per head (the paper uses 16: the state has ``1 + f + f (f + 1) / 2`` features per head);
    3. exact softmax attention within a sliding window of ``window`` tokens (causal: the token and the
       ``window - 1`` before it; non-causal: ``window // 2`` either side), via :func:`attnkit.attention`.

    ``x [batch, seq, embed_dim]`` -> ``[batch, seq, embed_dim]``. Memory of decoding is the linear state plus
    ``window`` cached keys and values: constant in the sequence length (the recall / memory trade-off knob).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, feature_dim: int = 16, window: int = 64,
                 conv_size: int = 3, causal: bool = True, bias: bool = False):
        super().__init__()
        _check_heads(embed_dim, num_heads, num_heads)
        for name, val in (("feature_dim", feature_dim), ("window", window), ("conv_size", conv_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.feature_dim, self.window, self.conv_size, self.causal = feature_dim, window, conv_size, causal
        self.conv = nn.Conv1d(embed_dim, embed_dim, conv_size, groups=embed_dim, bias=True)
        self.feature_map = TaylorFeatureMap()
        self.lin_qk = nn.Linear(embed_dim, 2 * num_heads * feature_dim, bias=bias)
        self.lin_v = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.win_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.pattern = P.sliding_window(window - 1, 0) if causal else P.sliding_window(window // 2)

    def state_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes held per sequence while decoding: linear state, window of keys/values, conv taps."""
        size = torch.empty((), dtype=dtype).element_size()
        linear = self.num_heads * self.feature_map.state_bytes(self.feature_dim, self.head_dim, dtype)
        return linear + 2 * self.window * self.embed_dim * size + (self.conv_size - 1) * self.embed_dim * size

    def short_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise convolution over the sequence of ``x [batch, seq, embed_dim]`` (left-padded if causal)."""
        left = self.conv_size - 1 if self.causal else (self.conv_size - 1) // 2
        right = self.conv_size - 1 - left
        h = F.pad(x.transpose(1, 2), (left, right))  # [b, embed_dim, seq + conv_size - 1]
        return self.conv(h).transpose(1, 2)

    def _heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.embed_dim)
        h = self.short_conv(x)
        ql, kl = (self._heads(t, self.feature_dim) for t in self.lin_qk(h).chunk(2, dim=-1))
        vl = self._heads(self.lin_v(h), self.head_dim)
        linear = linear_attention(ql, kl, vl, feature_map=self.feature_map, causal=self.causal)
        qw, kw, vw = (self._heads(t, self.head_dim) for t in self.win_qkv(h).chunk(3, dim=-1))
        local = attention(qw, kw, vw, pattern=self.pattern)
        out = linear + local.to(linear.dtype)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))
