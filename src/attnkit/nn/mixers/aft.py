"""AFT (F1) and SwiftFormer's efficient additive attention (F8): attention-free mixers that weight values by
learned position biases or one global query.

Part of :mod:`attnkit.nn.mixers` (issue 12); the math is in :mod:`attnkit.ops.mixers`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.nn.mixers._base import _check_dim, _Mixer, _positive, _refuse_causal
from attnkit.ops.mixers import aft

__all__ = ["AFTFull", "AFTSimple", "AFTLocal", "AFTConv", "SwiftFormerMixer"]


# ---- F1: AFT ----------------------------------------------------------------------------------------------

class _AFTBase(_Mixer):
    def __init__(self, dim: int, causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def _qkv(self, x):
        self._check(x)
        return self.qkv(x).chunk(3, dim=-1)

    def _max_len(self, n: int, max_len: int) -> None:
        if n > max_len:
            raise ValueError(f"sequence of {n} tokens is longer than max_len={max_len} (the learned position "
                             f"biases); build the mixer with max_len >= {n}")


class AFTFull(_AFTBase):
    """AFT-full (Zhai et al., "An Attention Free Transformer", eq. 2) with the pairwise position biases
    factorised ``w = U V^T`` (``U, V [max_len, rank]``; the paper's factorisation, sec. 3.2).
    O(seq^2 dim) time by row blocks, O(seq dim) memory."""

    def __init__(self, dim: int, *, max_len: int = 1024, rank: int = 32, causal: bool = False, block: int = 1024):
        super().__init__(dim, causal)
        _positive(max_len=max_len, rank=rank, block=block)
        self.max_len, self.block = max_len, block
        std = 0.5 * rank ** -0.25  # w = U V^T has standard deviation ~0.25
        self.u = nn.Parameter(torch.randn(max_len, rank) * std)
        self.v = nn.Parameter(torch.randn(max_len, rank) * std)

    def bias(self, n: int) -> torch.Tensor:
        self._max_len(n, self.max_len)
        return self.u[:n] @ self.v[:n].t()

    def forward(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_full(q, k, v, self.bias(x.shape[1]), causal=self.causal, block=self.block))

    def reference(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_reference(q, k, v, self.bias(x.shape[1]), causal=self.causal))


class AFTSimple(_AFTBase):
    """AFT-simple (eq. 3): ``sigmoid(Q_t) * sum_t' softmax_t'(K) V_t'``; causal by running sums, with an O(dim)
    decoding state (:meth:`step`)."""

    def forward(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_simple(q, k, v, causal=self.causal))

    def reference(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_reference(q, k, v, causal=self.causal))

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding: ``x_t [batch, dim]`` -> ``(y_t [batch, dim], state)``; ``state`` (None at the start)
        holds three ``[batch, dim]`` tensors."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        q, k, v = self.qkv(x_t).chunk(3, dim=-1)
        y, state = aft.aft_simple_step(q, k, v, state)
        return self.out(y), state


class AFTLocal(_AFTBase):
    """AFT-local (eq. 4): biases ``w_{t,t'}`` learned for ``|t - t'| < window`` and 0 (not -inf) outside, so
    the output is AFT-simple's global sums plus a windowed correction. O(seq window dim)."""

    def __init__(self, dim: int, *, max_len: int = 1024, window: int = 32, causal: bool = False):
        super().__init__(dim, causal)
        _positive(max_len=max_len, window=window)
        self.max_len, self.window = max_len, window
        self.w = nn.Parameter(torch.randn(max_len, 2 * window - 1) * 0.1)

    def _corr(self, n):
        self._max_len(n, self.max_len)
        return torch.expm1(self.w[:n])

    def forward(self, x):
        q, k, v = self._qkv(x)
        corr = self._corr(x.shape[1])
        return self.out(aft.aft_windowed(q, k, v, corr, causal=self.causal, per_position=True))

    def reference(self, x):
        q, k, v = self._qkv(x)
        wmat = aft.window_bias_matrix(self._corr(x.shape[1]), x.shape[1], per_position=True)
        return self.out(aft.aft_reference(q, k, v, wmat, causal=self.causal))

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding: ``x_t [batch, dim]`` -> ``(y_t, state)``; the state holds the running sums, the last
        ``window - 1`` keys and values, and the position (AFT-local's biases depend on it)."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        t, inner = (0, None) if state is None else state
        self._max_len(t + 1, self.max_len)
        corr = torch.expm1(self.w[t, : self.window]).flip(0)[:, None]  # offsets 0, -1, ..., -(window - 1)
        q, k, v = self.qkv(x_t).chunk(3, dim=-1)
        y, inner = aft.aft_windowed_step(q, k, v, corr, inner)
        return self.out(y), (t + 1, inner)


class AFTConv(_AFTBase):
    """AFT-conv (eq. 5): relative biases ``w [heads, 2 window - 1]`` shared by each head's channels: the
    global sums plus a depthwise convolution of ``exp(K) V`` and ``exp(K)`` by ``exp(w) - 1``."""

    def __init__(self, dim: int, *, num_heads: int = 4, window: int = 16, causal: bool = False):
        super().__init__(dim, causal)
        _check_dim(dim, num_heads=num_heads)
        _positive(window=window)
        self.num_heads, self.window = num_heads, window
        self.w = nn.Parameter(torch.randn(num_heads, 2 * window - 1) * 0.1)

    def _corr(self):
        return torch.expm1(self.w).t().repeat_interleave(self.dim // self.num_heads, dim=1)  # [2s - 1, dim]

    def forward(self, x):
        q, k, v = self._qkv(x)
        return self.out(aft.aft_windowed(q, k, v, self._corr(), causal=self.causal))

    def reference(self, x):
        q, k, v = self._qkv(x)
        wmat = aft.window_bias_matrix(self._corr(), x.shape[1], per_position=False)
        return self.out(aft.aft_reference(q, k, v, wmat, causal=self.causal))

    def step(self, x_t: torch.Tensor, state=None):
        """Causal decoding: ``x_t [batch, dim]`` -> ``(y_t, state)``; the state holds the running sums and the
        last ``window - 1`` keys and values (:func:`~attnkit.ops.mixers.aft.aft_windowed_step`)."""
        if not self.causal:
            raise ValueError("step() decodes the causal form; build the mixer with causal=True")
        q, k, v = self.qkv(x_t).chunk(3, dim=-1)
        corr = self._corr()[: self.window].flip(0)  # offsets 0, -1, ..., -(window - 1)
        y, state = aft.aft_windowed_step(q, k, v, corr, state)
        return self.out(y), state


# ---- F8: SwiftFormer ----------------------------------------------------------------------------------------

class SwiftFormerMixer(_Mixer):
    """Efficient additive attention (Shaker et al., "SwiftFormer", eq. 4-6): L2-normalised ``Q, K``, token
    scores ``alpha = Q w_a / sqrt(d)`` normalised over tokens (a softmax; the authors' code L2-normalises
    instead), a global query ``q_g = sum_i alpha_i Q_i``, and ``out = W_o (T(q_g * K) + Q)``. O(seq dim)."""

    def __init__(self, dim: int, *, causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("SwiftFormer", causal)
        _check_dim(dim)
        self.w_q = nn.Linear(dim, dim)
        self.w_k = nn.Linear(dim, dim)
        self.w_a = nn.Parameter(torch.randn(dim))
        self.t = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _qk(self, x):
        self._check(x)
        return F.normalize(self.w_q(x), dim=-1), F.normalize(self.w_k(x), dim=-1)

    def pooling_weights(self, x):
        """``[batch, seq]`` weights of the global query (they sum to 1 over the tokens)."""
        q, _ = self._qk(x)
        return torch.softmax(q @ self.w_a / math.sqrt(self.dim), dim=1)

    def forward(self, x):
        q, k = self._qk(x)
        alpha = torch.softmax(q @ self.w_a / math.sqrt(self.dim), dim=1)
        q_g = torch.einsum("bn,bnc->bc", alpha, q)
        return self.out(self.t(q_g[:, None] * k) + q)

    def reference(self, x):
        q, k = self._qk(x)
        s = (q * self.w_a).sum(-1) / math.sqrt(self.dim)
        e = torch.exp(s - s.amax(1, keepdim=True))
        q_g = ((e / e.sum(1, keepdim=True))[..., None] * q).sum(1, keepdim=True)
        return self.out(self.t(q_g * k) + q)
