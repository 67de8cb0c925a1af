"""attnkit.nn modules of the linear family.

- :class:`LinearAttention`: multi-head kernelized linear attention over ``[batch, seq, embed_dim]`` with any
  feature map, optional per-head decay, and an O(1) recurrent state for decoding (Katharopoulos et al. 2020);
- :class:`LinearMultiheadAttention`: the same layer, causal by default, with the ``forward(x, cache=...)``
  decoding interface of :class:`attnkit.nn.MultiheadAttention` (``attnkit.RecurrentStateCache``);
- :class:`BasedAttention`: the Based layer (Arora et al., "Simple linear attention language models balance the
  recall-throughput tradeoff", 2024): a short causal depthwise convolution, Taylor linear attention on small
  projected feature dimensions, and exact sliding-window softmax attention;
- :class:`RetentionLayer`: multi-scale retention (RetNet, Sun et al. 2023; ViR, Hatamizadeh et al. 2023) with
  per-head decays, GroupNorm and a swish gate, in parallel, recurrent or chunked mode;
- :class:`TTTLayer`: TTT-Linear / TTT-MLP (Sun et al. 2024): the state is an inner model trained at test time;
- :class:`TitansLayer`: Titans (Behrouz et al. 2024): neural long-term memory with sliding-window attention and
  persistent memory, arranged as memory-as-context (MAC), memory-as-gate (MAG) or memory-as-layer (MAL);
- :class:`TransNormerLayer` (NormAttention / DiagAttention) and :class:`TransNormerLLMLayer` (decay, LRPE,
  SRMSNorm, output gate) with its :class:`SGLU` channel mixer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnkit import feature_maps as fmaps
from attnkit import patterns as P
from attnkit.feature_maps import FeatureMap, TaylorFeatureMap
from attnkit.feature_maps import get as get_feature_map
from attnkit.functional.exact import attention
from attnkit.functional.linear import linear_attention
from attnkit.ops.linear.state import LinearAttentionState
from attnkit.rotary import RotaryEmbedding, apply_rotary

__all__ = ["LinearAttention", "LinearMultiheadAttention", "BasedAttention", "RetentionLayer", "TTTLayer",
           "TitansLayer", "TransNormerLayer", "TransNormerLLMLayer", "SGLU", "MultiScaleLinearAttention"]

# Feature maps whose constructor needs the head dimension (learnable maps own per-dimension parameters).
_NEEDS_SHAPE = ("rebased", "hedgehog")


# Parameters consumed by ``linear_attention``; every other parameter goes to the feature map.
ENGINE_PARAMS = ("chunk_size", "decay", "normalize", "mode", "eps")


class KernelizedAttention(nn.Module):
    """``(q, k, v) -> linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal, ...)``.

    ``q [batch, heads, n, d]``, ``k [batch, kv_heads, n, d]``, ``v [batch, kv_heads, n, d_v]`` ->
    ``[batch, heads, n, d_v]``. The feature map is a submodule, so ``.to(device, dtype)`` and
    ``.parameters()`` see its parameters and buffers.
    """

    accepted_params = ENGINE_PARAMS  # what ``**engine`` takes (``Mechanism.parameters()`` lists them)

    def __init__(self, feature_map: fmaps.FeatureMap, *, causal: bool = False, **engine: Any):
        super().__init__()
        unknown = set(engine) - set(ENGINE_PARAMS)
        if unknown:
            raise TypeError(f"unexpected engine parameters {sorted(unknown)}; accepted: {list(ENGINE_PARAMS)}")
        self.feature_map = feature_map
        self.causal = causal
        self.engine = engine

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal, **self.engine)

    def extra_repr(self) -> str:
        return ", ".join([f"causal={self.causal}"] + [f"{k}={v!r}" for k, v in self.engine.items()])


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
        from attnkit.ops.linear._common import retention_decay

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


def default_heads(dim: int, head_dim: int = 16) -> int:
    """Heads for a mixer built from ``dim`` alone: ``dim // head_dim`` rounded down to a divisor of ``dim``."""
    heads = max(1, dim // head_dim)
    while dim % heads:
        heads -= 1
    return heads


class RetentionLayer(nn.Module):
    """Multi-scale retention (RetNet: Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large
    Language Models", eq. 5-9; ViR: Hatamizadeh et al. 2023, "ViR: Vision Retention Networks"), a token mixer
    ``x [batch, seq, dim] -> [batch, seq, dim]``:

    ``retention_h = (Q_h K_h^T / sqrt(d) * D_h) V_h`` with ``D_h[n, m] = gamma_h^(n - m)`` for ``n >= m`` (causal)
    or ``gamma_h^|n - m|`` (``causal=False``: ViR's bidirectional form, a forward plus a backward scan less the
    shared diagonal); ``gamma_h = 1 - 2^(-5 - h)`` (``decays`` to override);
    ``Y = GroupNorm_h(retention)``, ``out = (swish(X W_G) * Y) W_O``.

    ``xpos=True`` (the paper's default, eq. 3-5): ``Q = (X W_Q) * Theta``, ``K = (X W_K) * conj(Theta)``,
    ``Theta_n = e^(i n theta)``, so ``Q_n K_m^dagger`` depends on ``n - m`` through ``e^(i (n - m) theta)`` (the xPos
    rotation; its decay is the ``gamma`` of ``D``). Real channel pairs ``(c, c + d/2)`` are the complex
    components, ``theta_c = theta_base^(-2c/d)`` (RoPE's and xPos's frequencies). Positions continue from a
    carried state's ``offset``. ``xpos=False`` drops the rotation (position only through the decay).

    ``mode``: ``"parallel"`` (the masked quadratic form), ``"chunked"`` or ``"recurrent"``
    (``S_n = gamma S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``): the three forms agree (the paper's dual form).
    ``forward(x, state=..., return_state=True)`` carries the per-head states ``[batch, heads, d, d_v]`` (causal).
    """

    def __init__(self, dim: int, num_heads: int | None = None, *, causal: bool = True, mode: str = "chunked",
                 chunk_size: int = 64, decays: list[float] | torch.Tensor | None = None, bias: bool = False,
                 xpos: bool = True, theta_base: float = 10000.0):
        super().__init__()
        num_heads = default_heads(dim) if num_heads is None else num_heads
        _check_heads(dim, num_heads, num_heads)
        if mode not in ("parallel", "chunked", "recurrent"):
            raise ValueError(f"mode must be 'parallel', 'chunked' or 'recurrent', got {mode!r}")
        if not isinstance(theta_base, (int, float)) or isinstance(theta_base, bool) or theta_base <= 1:
            raise ValueError(f"theta_base must be a number > 1 (10000 in RetNet), got {theta_base!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        # theta_c = theta_base^(-2c/d), float64 and not a buffer (like the decays): .half() must not round them;
        # None without xpos, or with a single channel (no complex pair to rotate)
        half = self.head_dim // 2
        self.theta = (float(theta_base) ** (-2 * torch.arange(half, dtype=torch.float64) / self.head_dim)
                      if xpos and half else None)
        self.causal, self.mode, self.chunk_size = causal, mode, chunk_size
        from attnkit.ops.linear._common import retention_decay

        # float64 and not a buffer: .half() must not round 1 - 2^-12 to 1 (the engine moves it to the device)
        self.decays = retention_decay(num_heads) if decays is None else _resolve_decay(decays, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.gate = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.norm = nn.GroupNorm(num_heads, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``Q * Theta`` and ``K * conj(Theta)`` at positions ``offset, offset + 1, ...`` (unchanged without xpos):
        the same rotation for both, so their product carries ``e^(i (n - m) theta)``."""
        if self.theta is None:
            return q, k
        pos = torch.arange(offset, offset + q.shape[-2], device=q.device, dtype=torch.float64)
        angle = pos[:, None] * self.theta.to(q.device)[None]
        cos, sin = angle.cos(), angle.sin()
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def retention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, state=None, return_state=False):
        """The retention of ``[batch, heads, n, d]`` heads (no projections, no norm)."""
        kw = dict(feature_map="identity", normalize="none", decay=self.decays.double(), chunk_size=self.chunk_size)
        k = k * self.head_dim ** -0.5
        if self.causal:
            return linear_attention(q, k, v, causal=True, mode=self.mode, state=state, return_state=return_state,
                                    **kw)
        if state is not None or return_state:
            raise ValueError("a recurrent state continues a causal sequence; build the layer with causal=True")
        fwd = linear_attention(q, k, v, causal=True, mode=self.mode, **kw)
        bwd = linear_attention(q.flip(2), k.flip(2), v.flip(2), causal=True, mode=self.mode, **kw).flip(2)
        return fwd + bwd - (q * k).sum(-1, keepdim=True) * v  # the diagonal (gamma^0) was counted twice

    def forward(self, x: torch.Tensor, *, state=None, return_state: bool = False):
        _check_x(x, self.dim)
        q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = self.rotate(q, k, state.offset if isinstance(state, LinearAttentionState) else 0)
        res = self.retention(q, k, v, state=state, return_state=return_state)
        ret, new_state = res if return_state else (res, None)
        b, _, n, _ = ret.shape
        y = ret.transpose(1, 2).reshape(b * n, self.dim)
        y = self.norm(y.to(self.norm.weight.dtype)).view(b, n, self.dim)
        out = self.out_proj(F.silu(self.gate(x)) * y)
        return (out, new_state) if return_state else out


def retention_reference(built: RetentionLayer, x: torch.Tensor, **_: object) -> torch.Tensor:
    """The parallel form materialised: ``D_h[n, m] = gamma_h^(n - m) [n >= m]`` (or ``gamma_h^|n - m|``),
    ``(Q K^T / sqrt(d) * D) V`` on the rotated ``Q, K`` (xpos), GroupNorm, swish gate, output projection."""
    q, k, v = (built._heads(t) for t in built.qkv(x).chunk(3, dim=-1))
    q, k = built.rotate(q, k)
    n = x.shape[1]
    i = torch.arange(n, device=x.device)
    rel = (i[:, None] - i[None, :]).to(torch.float64)
    gam = built.decays.to(device=x.device, dtype=torch.float64)[:, None, None]
    dist = rel.clamp_min(0) if built.causal else rel.abs()
    d = torch.where((rel >= 0) | (not built.causal), gam ** dist, torch.zeros((), dtype=torch.float64,
                                                                                device=x.device))
    ret = ((q @ k.transpose(-1, -2)) * built.head_dim ** -0.5 * d.to(q.dtype)) @ v
    b = x.shape[0]
    y = built.norm(ret.transpose(1, 2).reshape(b * n, built.dim)).view(b, n, built.dim)
    return built.out_proj(F.silu(built.gate(x)) * y)


class TTTLayer(nn.Module):
    """A test-time-training layer (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden
    States", TTT-Linear / TTT-MLP), a token mixer ``x [batch, seq, dim] -> [batch, seq, dim]``.

    ``q, k, v = theta_Q x, theta_K x, theta_V x`` per head; the inner model ``f(.; W)`` (``model="linear_ln"``:
    the paper's TTT-Linear ``x + LN(x W)``; ``"linear"``: plain ``x W``; ``"mlp"``: TTT-MLP) starts from learnable
    weights ``W_0`` (learned by the outer loop, as in the paper, like the inner LayerNorm's) and takes gradient
    steps on ``||f(k_t; W) - v_t||^2`` in mini-batches of ``mini_batch`` tokens with the learnable per-token rate
    ``eta_t = eta_base * sigmoid(x_t . w_eta + b_eta)`` (one per head); ``z_t = f(q_t; W_t)`` through
    :func:`attnkit.ops.linear.ttt.ttt` (dual form); output ``W_O rms_norm(z)``. ``causal=False`` is the
    full-batch setting (one step over all tokens).
    """

    def __init__(self, dim: int, num_heads: int | None = None, *, model: str = "linear_ln", mini_batch: int = 16,
                 causal: bool = True, eta_base: float = 1.0, hidden: int | None = None, bias: bool = False):
        super().__init__()
        from attnkit.ops.linear.ttt import default_weights

        num_heads = default_heads(dim) if num_heads is None else num_heads
        _check_heads(dim, num_heads, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.model, self.mini_batch, self.causal, self.eta_base = model, mini_batch, causal, float(eta_base)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.eta_proj = nn.Linear(dim, num_heads)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        init = default_weights(model, 1, num_heads, self.head_dim, self.head_dim, hidden, None, torch.float32)
        self.initial = nn.ParameterList([nn.Parameter(w[0].clone()) for w in init])  # W_0 per head
        # the inner LayerNorm of TTT-Linear (x + LN(x W)): outer-loop parameters, one per head
        self.ln_weight = nn.Parameter(torch.ones(num_heads, self.head_dim)) if model == "linear_ln" else None
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim)) if model == "linear_ln" else None

    def inputs(self, x: torch.Tensor):
        """``q, k, v [batch, heads, n, d]`` (q, k scaled by ``d^-1/2``, keeping inner steps stable) and
        ``eta [batch, heads, n]``."""
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        eta = self.eta_base * torch.sigmoid(self.eta_proj(x)).transpose(1, 2) / self.head_dim
        scale = self.head_dim ** -0.5
        return q * scale, k * scale, v, eta

    def state0(self, batch: int) -> tuple:
        return tuple(w.expand(batch, *w.shape) for w in self.initial)

    def ln(self) -> tuple | None:
        return None if self.ln_weight is None else (self.ln_weight, self.ln_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from attnkit.ops.linear.ttt import ttt

        _check_x(x, self.dim)
        q, k, v, eta = self.inputs(x)
        z = ttt(q, k, v, eta, model=self.model, mini_batch=self.mini_batch, causal=self.causal,
                initial_state=self.state0(x.shape[0]), ln=self.ln())
        b, _, n, _ = z.shape
        zw = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        z = (zw * torch.rsqrt(zw.pow(2).mean(-1, keepdim=True) + 1e-6)).to(z.dtype)
        return self.out_proj(z.transpose(1, 2).reshape(b, n, self.dim).to(x.dtype))


def ttt_layer_reference(built: TTTLayer, x: torch.Tensor, **_: object) -> torch.Tensor:
    """The layer with the inner loop run token by token with autograd (``ttt_reference``)."""
    from attnkit.ops.linear.ttt import ttt_reference

    q, k, v, eta = built.inputs(x)
    z = ttt_reference(q, k, v, eta, model=built.model, mini_batch=built.mini_batch, causal=built.causal,
                      initial_state=built.state0(x.shape[0]), ln=built.ln())
    b, _, n, _ = z.shape
    z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
    return built.out_proj(z.transpose(1, 2).reshape(b, n, built.dim))


ARRANGEMENTS = ("mac", "mag", "mal")


class TitansLayer(nn.Module):
    """Titans (Behrouz et al. 2024, "Titans: Learning to Memorize at Test Time", sec. 4), a token mixer
    ``x [batch, seq, dim] -> [batch, seq, dim]`` combining three memories:

    - long-term: the neural memory of :func:`attnkit.ops.linear.titans.titans_memory` (``memory="mlp"`` or
      ``"linear"``), per head, keys and queries L2-normalised, gates ``theta_t, eta_t, alpha_t = sigmoid(x W_g)``
      (data-dependent, one per head), learnable initial memory;
    - short-term: exact sliding-window attention over the last ``window`` tokens;
    - persistent: ``persistent`` learnable tokens every query attends to (task knowledge, input-independent).

    ``arrangement``:

    - ``"mag"`` (memory as a gate, eq. 26-28): ``o = W_O (rms(SWA*(x)) * sigmoid(W_G M(x)))``;
    - ``"mal"`` (memory as a layer, eq. 29-31): ``o = W_O SWA*(M(x))``;
    - ``"mac"`` (memory as context, eq. 21-25): the sequence is cut into segments of ``window`` tokens; for a
      segment, ``h = M*_{prev}(q)`` is read from the memory left by the earlier segments (no update), attention
      runs over ``[persistent, h, segment]`` (``h`` and the segment causally), the memory is then updated with the
      attention output ``y`` and ``o = W_O (y * sigmoid(W_G M_t(y_t)))`` with ``M_t`` the memory after token ``t``.
      (The paper reads with the memory after the whole segment; reading after token ``t`` keeps it causal.)

    ``causal=False``: memory scans in both directions (summed; MAC passes the forward scan's memory on to the next
    segment), attention windows symmetric.
    """

    def __init__(self, dim: int, num_heads: int | None = None, *, arrangement: str = "mag", window: int = 64,
                 persistent: int = 4, memory: str = "mlp", chunk_size: int = 16, causal: bool = True,
                 hidden: int | None = None, bias: bool = False):
        super().__init__()
        from attnkit.ops.linear.ttt import default_weights

        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"arrangement must be one of {', '.join(ARRANGEMENTS)}, got {arrangement!r}")
        for name, val in (("window", window), ("chunk_size", chunk_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not isinstance(persistent, int) or persistent < 0:
            raise ValueError(f"persistent must be an int >= 0, got {persistent!r}")
        num_heads = default_heads(dim) if num_heads is None else num_heads
        _check_heads(dim, num_heads, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.arrangement, self.window, self.memory_model = arrangement, window, memory
        self.chunk_size, self.causal = chunk_size, causal
        self.mem_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.gates = nn.Linear(dim, 3 * num_heads)
        with torch.no_grad():  # start with small steps, strong momentum, little forgetting
            self.gates.bias.copy_(torch.tensor([-4.0, 1.0, -4.0]).repeat_interleave(num_heads))
        init = default_weights(memory, 1, num_heads, self.head_dim, self.head_dim, hidden, None, torch.float32)
        self.memory_init = nn.ParameterList([nn.Parameter(w[0].clone()) for w in init])
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.persistent = nn.Parameter(torch.randn(persistent, dim) * dim**-0.5)
        self.gate_proj = nn.Linear(dim, dim, bias=bias) if arrangement != "mal" else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.dim)

    def memory_inputs(self, x: torch.Tensor):
        """Memory queries, keys, values ``[batch, heads, n, d]`` and gates ``theta, eta, alpha [batch, heads, n]``."""
        q, k, v = (self._heads(t) for t in self.mem_qkv(x).chunk(3, dim=-1))
        logits = self.gates(x)
        gates = torch.sigmoid(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits)
        gates = gates.transpose(1, 2)  # [b, 3 heads, n]
        theta, eta, alpha = gates.chunk(3, dim=1)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, theta, eta, alpha

    def _state0(self, batch: int):
        weights = tuple(w.expand(batch, *w.shape) for w in self.memory_init)
        return weights, tuple(torch.zeros_like(w) for w in weights)

    def long_term(self, x: torch.Tensor, state=None, return_state: bool = False, memory_fn=None):
        """``M_t(q_t)`` over ``x``: ``[batch, n, dim]`` (both directions summed when not causal)."""
        from attnkit.ops.linear.titans import titans_memory

        memory_fn = memory_fn or titans_memory
        q, k, v, theta, eta, alpha = self.memory_inputs(x)
        kw = dict(model=self.memory_model, chunk_size=self.chunk_size)
        state = state if state is not None else self._state0(x.shape[0])
        res = memory_fn(q, k, v, theta, eta, alpha, initial_state=state, return_state=return_state, **kw)
        y, new_state = res if return_state else (res, None)
        if not self.causal:  # plus the backward scan; the state passed on is the forward scan's
            flip = [t.flip(2) for t in (q, k, v, theta, eta, alpha)]
            y = y + memory_fn(*flip, initial_state=state, **kw).flip(2)
        y = self._merge(y.to(x.dtype))
        return (y, new_state) if return_state else y

    def _allowed(self, n_prefix: int, n_ctx: int):
        """Pattern over ``[persistent (n_prefix), context (n_ctx), tokens]``: persistent keys always; context and
        token keys within the window (causal) or, for MAC's retrieved context, causally aligned to the token."""
        w, causal = self.window, self.causal

        def allowed(b, h, qi, kj):
            keep = kj < n_prefix
            if n_ctx:  # MAC: context j (position kj - n_prefix) aligned with token j
                in_ctx = (kj >= n_prefix) & (kj < n_prefix + n_ctx)
                rel = (qi - n_prefix - n_ctx) - (kj - n_prefix)
                keep = keep | (in_ctx & ((rel >= 0) if causal else (rel == rel)))
            tok = kj >= n_prefix + n_ctx
            d = qi - kj
            keep = keep | (tok & (((d >= 0) & (d < w)) if causal else (d.abs() <= w // 2)))
            return keep

        return P.custom(allowed, batch_dependent=False, head_dependent=False)

    def short_term(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Sliding-window attention of ``x [batch, n, dim]`` with the persistent tokens (and MAC's context)."""
        b, n, _ = x.shape
        parts = [self.persistent.to(x.dtype).expand(b, -1, -1)] + ([context] if context is not None else []) + [x]
        z = torch.cat(parts, dim=1)
        q, k, v = (self._heads(t) for t in self.attn_qkv(z).chunk(3, dim=-1))
        n_ctx = 0 if context is None else context.shape[1]
        out = attention(q, k, v, pattern=self._allowed(self.persistent.shape[0], n_ctx))
        return self._merge(out)[:, -n:]

    def forward(self, x: torch.Tensor, memory_fn=None) -> torch.Tensor:
        """``memory_fn``: the memory routine (``titans_memory``; tests pass the token-by-token reference)."""
        from attnkit.ops.linear._common import check_inner_loop
        from attnkit.ops.linear.titans import titans_memory, titans_read

        _check_x(x, self.dim)
        memory_fn = memory_fn or titans_memory
        if self.arrangement == "mag":
            y = self.short_term(x)
            m = self.long_term(x, memory_fn=memory_fn)
            y = y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(y.dtype)
            out = self.out_proj(y * torch.sigmoid(self.gate_proj(m)))
        elif self.arrangement == "mal":
            out = self.out_proj(self.short_term(self.long_term(x, memory_fn=memory_fn)))
        else:  # mac: segment by segment
            state = self._state0(x.shape[0])
            outs = []
            for lo in range(0, x.shape[1], self.window):
                seg = x[:, lo:lo + self.window]
                q, _, _, _, _, _ = self.memory_inputs(seg)
                work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
                h = self._merge(titans_read(q.to(work), tuple(w.to(work) for w in state[0])).to(x.dtype))
                y = self.short_term(seg, context=h)
                m, state = self.long_term(y, state=state, return_state=True, memory_fn=memory_fn)
                outs.append(y * torch.sigmoid(self.gate_proj(m)))
            out = self.out_proj(torch.cat(outs, dim=1))
        # a memory grown huge (but finite) by its updates overflows the attention over its read-out (MAL, MAC)
        check_inner_loop(f"titans ({self.arrangement})", (out,), (x,), lambda: (
            "the memory's gradient steps grew it until its read-out overflowed the attention that follows; "
            "keep the input normalised (LayerNorm / RMSNorm before the mixer), lower chunk_size or theta"))
        return out


def srms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SRMSNorm (TransNormerLLM): ``x / ||x|| * sqrt(d)`` over the last axis, no learnable weight."""
    xw = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class TransNormerLayer(nn.Module):
    """TransNormer's token mixers (Qin et al. 2022, "The Devil in Linear Transformer"), ``x [batch, seq, dim] ->
    [batch, seq, dim]``:

    - ``kind="norm"``: NormAttention ``out = Norm(phi(Q) (phi(K)^T V))`` with ``phi = 1 + elu`` and no
      denominator (the source of unbounded gradients the paper identifies); ``Norm`` is an RMS norm per head;
    - ``kind="diag"``: DiagAttention, softmax attention within non-overlapping blocks of ``block`` tokens (used in
      the early layers against attention dilution; causal within the block when ``causal``).
    """

    def __init__(self, dim: int, num_heads: int | None = None, *, kind: str = "norm", block: int = 64,
                 causal: bool = True, chunk_size: int = 64, bias: bool = False):
        super().__init__()
        if kind not in ("norm", "diag"):
            raise ValueError(f"kind must be 'norm' or 'diag', got {kind!r}")
        num_heads = default_heads(dim) if num_heads is None else num_heads
        _check_heads(dim, num_heads, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kind, self.block, self.causal, self.chunk_size = kind, block, causal, chunk_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def heads(self, x: torch.Tensor):
        b, n, _ = x.shape
        return [t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)]

    def pattern(self):
        p = P.block_local(self.block)
        return p & P.causal() if self.causal else p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.dim)
        q, k, v = self.heads(x)
        if self.kind == "norm":
            out = srms_norm(linear_attention(q, k, v, feature_map="elu", normalize="none", causal=self.causal,
                                             chunk_size=self.chunk_size))
        else:
            out = attention(q, k, v, pattern=self.pattern())
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.dim).to(x.dtype))


class TransNormerLLMLayer(nn.Module):
    """TransNormerLLM's token mixer (Qin et al. 2023, "Scaling TransNormer to 175 Billion Parameters", sec. 3):
    ``x [batch, seq, dim] -> [batch, seq, dim]``,

    ``a_st = q_s^T R(theta (s - t)) k_t lambda_h^(s - t)`` for ``s >= t`` (LRPE as a rotation of q and k, an
    exponential decay per head), computed unnormalised by the gated engine (``lambda_h = sigmoid(w_h)`` is
    learnable; initialised on the paper's geometric schedule ``1 - 2^(-5 - 8 h / H)``);
    ``O = SRMSNorm(A V) * sigmoid(X W_u)``, ``out = O W_o``. ``q, k`` use SiLU (the paper's activation).
    ``causal=False``: a forward and a backward scan (decays ``lambda^|s - t|``).
    """

    def __init__(self, dim: int, num_heads: int | None = None, *, causal: bool = True, chunk_size: int = 64,
                 bias: bool = False):
        super().__init__()
        num_heads = default_heads(dim) if num_heads is None else num_heads
        _check_heads(dim, num_heads, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.causal, self.chunk_size = causal, chunk_size
        self.qkvu = nn.Linear(dim, 4 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim)
        lam = 1.0 - 2.0 ** (-5.0 - 8.0 * torch.arange(num_heads, dtype=torch.float64) / num_heads)
        self.decay_logit = nn.Parameter(torch.logit(lam).float())

    def inputs(self, x: torch.Tensor):
        b, n, _ = x.shape
        q, k, v, u = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkvu(x).chunk(4, -1))
        q, k = self.rotary(F.silu(q)), self.rotary(F.silu(k)) * self.head_dim ** -0.5
        log_decay = F.logsigmoid(self.decay_logit.to(torch.float32 if q.dtype != torch.float64 else q.dtype))
        return q, k, v, u, log_decay

    def mix(self, q, k, v, log_decay, fn=None):
        from attnkit.ops.linear.gated import gated_linear_attention

        fn = fn or (lambda q, k, v, g: gated_linear_attention(q, k, v, g, chunk_size=self.chunk_size))
        b, h, n, _ = q.shape
        g = log_decay.to(q.dtype)[None, :, None].expand(b, h, n)
        out = fn(q, k, v, g)
        if not self.causal:
            out = out + fn(q.flip(2), k.flip(2), v.flip(2), g).flip(2) - (q * k).sum(-1, keepdim=True) * v
        return out

    def forward(self, x: torch.Tensor, fn=None) -> torch.Tensor:
        """``fn``: the attention routine ``(q, k, v, log_decay [b, h, n])`` (tests pass the quadratic reference)."""
        _check_x(x, self.dim)
        q, k, v, u, log_decay = self.inputs(x)
        o = srms_norm(self.mix(q, k, v, log_decay, fn)) * torch.sigmoid(u)
        b, _, n, _ = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, n, self.dim).to(x.dtype))


class SGLU(nn.Module):
    """TransNormerLLM's channel mixer, a GLU without activation: ``out = ((X W_v) * (X W_u)) W_o``."""

    def __init__(self, dim: int, hidden: int | None = None, bias: bool = False):
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        self.v, self.u, self.o = (nn.Linear(dim, hidden, bias=bias), nn.Linear(dim, hidden, bias=bias),
                                  nn.Linear(hidden, dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.v(x) * self.u(x))


def transnormer_reference(built: nn.Module, x: torch.Tensor, **_: object) -> torch.Tensor:
    """Materialised forms: NormAttention as ``RMS(((phi(Q) phi(K)^T) * M) V)``, DiagAttention as a masked softmax
    over the blocks, TransNormerLLM through the quadratic gated reference."""
    from attnkit.ops.linear.gated import gated_linear_attention_reference

    if isinstance(built, TransNormerLLMLayer):
        return built(x, fn=gated_linear_attention_reference)
    q, k, v = built.heads(x)
    n = x.shape[1]
    i = torch.arange(n, device=x.device)
    causal = (i[None, :] <= i[:, None]) if built.causal else torch.ones(n, n, dtype=torch.bool, device=x.device)
    if built.kind == "norm":
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        out = srms_norm(((fq @ fk.transpose(-1, -2)) * causal) @ v)
    else:
        keep = causal & ((i[:, None] // built.block) == (i[None, :] // built.block))
        s = (q @ k.transpose(-1, -2)) * built.head_dim ** -0.5
        out = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
    b = x.shape[0]
    return built.out_proj(out.transpose(1, 2).reshape(b, n, built.dim))


class MultiScaleLinearAttention(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention (Cai et al. 2023, "EfficientViT: Lightweight Multi-Scale
    Attention for High-Resolution Dense Prediction", sec. 3.2), on token sequences ``x [batch, seq, dim] ->
    [batch, seq, dim]``:

    ``Q, K, V = x W``; for every kernel size ``s`` in ``scales`` the three are aggregated by a depthwise
    convolution of ``s`` taps over the sequence followed by a grouped 1x1 convolution (one group per head and
    tensor), giving multi-scale tokens; ReLU linear attention (``relu(q) . relu(k)`` normalised) runs per head on
    the original and every aggregated scale; the outputs are concatenated and projected. Images are flattened
    in raster order (the paper's 2-D convolutions become 1-D ones over that order); ``causal`` left-pads the
    convolutions and makes the attention causal.
    """

    def __init__(self, dim: int, num_heads: int | None = None, *, scales: tuple[int, ...] = (5,),
                 causal: bool = False, chunk_size: int = 64, bias: bool = False):
        super().__init__()
        num_heads = default_heads(dim) if num_heads is None else num_heads
        _check_heads(dim, num_heads, num_heads)
        if any(not isinstance(s, int) or s < 1 for s in scales):
            raise ValueError(f"scales must be positive ints, got {scales!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scales, self.causal, self.chunk_size = tuple(scales), causal, chunk_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.dw = nn.ModuleList(nn.Conv1d(3 * dim, 3 * dim, s, groups=3 * dim, bias=False) for s in self.scales)
        self.pw = nn.ModuleList(nn.Conv1d(3 * dim, 3 * dim, 1, groups=3 * num_heads, bias=False)
                                for _ in self.scales)
        self.out_proj = nn.Linear(dim * (1 + len(self.scales)), dim, bias=bias)

    def scale_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[q, k, v]`` concatenated ``[batch, seq, 3 dim]`` for the original scale and each aggregated one."""
        qkv = self.qkv(x)
        out = [qkv]
        h = qkv.transpose(1, 2)  # [b, 3 dim, n]
        for s, dw, pw in zip(self.scales, self.dw, self.pw):
            left = s - 1 if self.causal else (s - 1) // 2
            agg = pw(dw(F.pad(h, (left, s - 1 - left))))
            out.append(agg.transpose(1, 2))
        return out

    def _heads(self, t: torch.Tensor) -> list[torch.Tensor]:
        b, n, _ = t.shape
        return [u.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for u in t.chunk(3, dim=-1)]

    def forward(self, x: torch.Tensor, attend=None) -> torch.Tensor:
        """``attend(q, k, v)``: the attention routine (tests pass the quadratic reference)."""
        _check_x(x, self.dim)
        if x.shape[1] == 0:  # no tokens: an empty output (the aggregation convolutions need a few)
            return x.new_zeros(x.shape)
        attend = attend or (lambda q, k, v: linear_attention(q, k, v, feature_map="relu", causal=self.causal,
                                                             chunk_size=self.chunk_size))
        outs = []
        for t in self.scale_tokens(x):
            o = attend(*self._heads(t))
            b, _, n, _ = o.shape
            outs.append(o.transpose(1, 2).reshape(b, n, self.dim))
        return self.out_proj(torch.cat(outs, dim=-1).to(x.dtype))


def multiscale_reference(built: MultiScaleLinearAttention, x: torch.Tensor, **_: object) -> torch.Tensor:
    from attnkit.ops.linear.reference import linear_attention_reference

    return built(x, attend=lambda q, k, v: linear_attention_reference(q, k, v, feature_map="relu",
                                                                      causal=built.causal))
