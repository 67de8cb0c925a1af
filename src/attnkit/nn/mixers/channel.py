"""Channel attention (XCA, channel-group attention: F3, F4) and the lambda layer (F5): attention over the
feature axis or through a content lambda, linear in the sequence length.

Part of :mod:`attnkit.nn.mixers` (issue 12); the math is in :mod:`attnkit.ops.mixers`."""

from __future__ import annotations

import torch
from torch import nn

from attnkit.nn.mixers._base import _check_dim, _Mixer, _positive, _refuse_causal
from attnkit.ops.mixers import channel
from attnkit.ops.mixers._common import (
    shifted_products,
)

__all__ = ["XCA", "ChannelGroupAttention", "LambdaLayer"]


# ---- F3, F4: channel attention ------------------------------------------------------------------------------

class _ChannelMixer(_Mixer):
    def __init__(self, dim: int, num_heads: int, causal: bool, name: str):
        super().__init__(dim, False)
        _refuse_causal(name, causal)
        _check_dim(dim, num_heads=num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x):
        self._check(x)
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.dim // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [b, h, n, d]

    def _merge(self, out):
        b, h, n, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, h * d))


class XCA(_ChannelMixer):
    """Cross-covariance attention (El-Nouby et al., "XCiT", eq. 5): a ``d_h x d_h`` softmax map per head of
    L2-normalised (over tokens) queries and keys, with a learned temperature per head. The paper's local patch
    interaction and class attention are separate blocks, not part of this mixer."""

    def __init__(self, dim: int, *, num_heads: int = 4, causal: bool = False):
        super().__init__(dim, num_heads, causal, "XCA")
        self.temperature = nn.Parameter(torch.ones(num_heads))

    def forward(self, x):
        q, k, v = self._heads(x)
        return self._merge(channel.xca(q, k, v, self.temperature))

    def attention_map(self, x):
        """The ``[batch, heads, d_h, d_h]`` map (its size does not depend on the sequence length)."""
        q, k, v = self._heads(x)
        return channel.xca(q, k, v, self.temperature, return_map=True)[1]

    def reference(self, x):
        q, k, v = self._heads(x)
        return self._merge(channel.xca_reference(q, k, v, self.temperature))


class ChannelGroupAttention(_ChannelMixer):
    """DaViT's channel group attention (Ding et al., "DaViT: Dual Attention Vision Transformers", eq. 3):
    ``A_g = softmax(Q_g^T K_g / sqrt(C_g))`` per channel group, ``out_g = V_g A_g^T``. The spatial window
    attention that DaViT alternates with it is the neighborhood family's ``block_local``."""

    def __init__(self, dim: int, *, groups: int = 4, causal: bool = False):
        super().__init__(dim, groups, causal, "channel group attention")

    def forward(self, x):
        return self._merge(channel.channel_group_attention(*self._heads(x)))

    def reference(self, x):
        return self._merge(channel.channel_group_attention_reference(*self._heads(x)))


# ---- F5: lambda layer -------------------------------------------------------------------------------------

class LambdaLayer(_Mixer):
    """Lambda layer over a 1-D sequence (Bello, "LambdaNetworks", eq. 2-3 and the lambda convolution of
    sec. 3.2): content lambda ``softmax_n(K)^T V`` (``[key_dim, v]``, the same for every query), position
    lambdas ``E_n^T V`` from relative embeddings ``E [receptive_field, key_dim]`` inside a local window, output
    ``y_n = (lambda_c + lambda_p_n)^T q_n`` per head (multi-query: heads share keys and values,
    ``v = dim / heads``). The paper's batch norms on queries and values are left to the block."""

    def __init__(self, dim: int, *, num_heads: int = 4, key_dim: int = 16, receptive_field: int = 23,
                 causal: bool = False):
        super().__init__(dim, False)
        _refuse_causal("the lambda layer", causal)
        _check_dim(dim, num_heads=num_heads)
        _positive(key_dim=key_dim, receptive_field=receptive_field)
        if receptive_field % 2 == 0:
            raise ValueError(f"receptive_field must be odd (a centred window), got {receptive_field}")
        self.num_heads, self.key_dim, self.r = num_heads, key_dim, receptive_field
        self.vdim = dim // num_heads
        self.w_q = nn.Linear(dim, num_heads * key_dim, bias=False)
        self.w_k = nn.Linear(dim, key_dim, bias=False)
        self.w_v = nn.Linear(dim, self.vdim, bias=False)
        self.embedding = nn.Parameter(torch.randn(receptive_field, key_dim) * key_dim ** -0.5)

    def _qkv(self, x):
        self._check(x)
        b, n, _ = x.shape
        q = self.w_q(x).view(b, n, self.num_heads, self.key_dim)
        return q, torch.softmax(self.w_k(x), dim=1), self.w_v(x)

    def forward(self, x):
        q, k, v = self._qkv(x)
        b, n = x.shape[:2]
        content = torch.einsum("bnhk,bkv->bnhv", q, k.transpose(1, 2) @ v)
        a = q @ self.embedding.t()  # [b, n, h, r]: sum_k q_nk E_jk, the lambda conv folded into the queries
        m = self.r // 2
        # content + sum_j a[n, h, j] v[n + j - m]: context position n + j - m, zero outside the sequence
        shifted_products(content, a[:, :, :, None, :], v[:, :, None, :], [j - m for j in range(self.r)])
        return content.reshape(b, n, self.dim)

    def position_lambdas(self, x):
        """The position lambdas ``E_n^T V`` materialised: ``[batch, seq, key_dim, v]`` (O(seq^2) reference)."""
        _, _, v = self._qkv(x)
        n = x.shape[1]
        pos = torch.arange(n, device=v.device)
        rel = pos[None, :] - pos[:, None] + self.r // 2  # [n, m] index into E
        inside = (rel >= 0) & (rel < self.r)
        table = self.embedding[rel.clamp(0, self.r - 1)] * inside[..., None].to(v.dtype)  # E_n: [n, m, k]
        return torch.einsum("nmk,bmv->bnkv", table, v)

    def reference(self, x):
        q, k, v = self._qkv(x)
        b, n = x.shape[:2]
        lam = (k.transpose(1, 2) @ v)[:, None] + self.position_lambdas(x)  # [b, n, k, v]
        return torch.einsum("bnhk,bnkv->bnhv", q, lam).reshape(b, n, self.dim)
