"""Cottention (Mongaras et al. 2024, "Cottention: Linear Transformers With Cosine Attention"): cosine-similarity
linear attention with the paper's learnable length scale instead of a (signed) denominator.

``out_i = N(q_i)^T (sum_{j in J_i} N(k_j) v_j^T) / L_i^{sigmoid(m_h)}`` with ``N`` the row-wise L2 normalisation,
``J_i`` the keys query ``i`` attends to (``j <= i`` causal, all keys otherwise), ``L_i = |J_i|`` and ``m_h`` one
learnable parameter per head (initialised to 0.5 as in the authors' GPT code). Weights are cosines in [-1, 1], so
``|out_i| <= L_i^{1 - sigmoid(m_h)} max_j |v_j|``: no denominator can come near zero. The RNN form (sec. 3) is
``S_i = S_{i-1} + N(k_i) v_i^T``, ``out_i = N(q_i)^T S_i / i^{sigmoid(m_h)}``: the engine's cosine map with
``normalize="none"``, then the scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.functional.linear import linear_attention
from attnkit.ops.linear.state import LinearAttentionState

__all__ = ["CottentionAttention", "cottention_reference"]

EPS = 1e-6  # the cosine map's norm floor (attnkit.feature_maps.CosineFeatureMap)


class CottentionAttention(nn.Module):
    """``(q, k, v) -> out``: ``q [batch, heads, n, d]``, ``k, v [batch, kv_heads, n_k, d / d_v]`` ->
    ``[batch, heads, n, d_v]``.

    Args:
        num_heads: query heads (one learnable length exponent ``m_h`` each).
        causal: query ``i`` sees keys ``j <= i`` (and ``L_i = offset + i + 1`` with a carried state).
        chunk_size: the causal engine's chunk (speed knob only).
        init: initial ``m_h`` (``sigmoid(0.5) = 0.62``).
    """

    def __init__(self, num_heads: int, *, causal: bool = False, chunk_size: int = 64, init: float = 0.5):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_heads, self.causal, self.chunk_size = num_heads, causal, chunk_size
        self.norm_const = nn.Parameter(torch.full((num_heads,), float(init)))

    def length_scale(self, n: int, n_k: int, offset: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``L_i^{-sigmoid(m_h)}``: ``[heads, n, 1]``."""
        if self.causal:
            count = torch.arange(offset + 1, offset + n + 1, device=device, dtype=dtype)
        else:
            count = torch.full((n,), float(n_k), device=device, dtype=dtype)
        power = torch.sigmoid(self.norm_const.to(device=device, dtype=dtype))
        return count[None, :, None] ** (-power[:, None, None])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                state: LinearAttentionState | None = None, return_state: bool = False):
        if q.dim() == 4 and q.shape[1] != self.num_heads:
            raise ValueError(f"cottention was built for num_heads={self.num_heads}, got q with {q.shape[1]} heads")
        res = linear_attention(q, k, v, feature_map="cosine", causal=self.causal, normalize="none",
                               chunk_size=self.chunk_size, state=state, return_state=return_state)
        out, new_state = res if return_state else (res, None)
        offset = state.offset if state is not None else 0
        work = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
        scale = self.length_scale(q.shape[2], k.shape[2], offset, q.device, work)
        out = (out.to(work) * scale).to(out.dtype)
        return (out, new_state) if return_state else out

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal={self.causal}"


def cottention_reference(built: CottentionAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         **_: object) -> torch.Tensor:
    """The materialised form: ``A = N(Q) N(K)^T`` (masked when causal), ``out = A V / L^{sigmoid(m)}``."""
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    a = F.normalize(q, dim=-1, eps=EPS) @ F.normalize(k, dim=-1, eps=EPS).transpose(-1, -2)
    n, n_k = q.shape[2], k.shape[2]
    if built.causal:
        a = a * torch.ones(n, n_k, dtype=torch.bool, device=q.device).tril()
        count = torch.arange(1, n + 1, device=q.device, dtype=q.dtype)
    else:
        count = torch.full((n,), float(n_k), device=q.device, dtype=q.dtype)
    power = torch.sigmoid(built.norm_const.to(q.dtype))
    return (a @ v) / count[None, :, None] ** power[:, None, None]
