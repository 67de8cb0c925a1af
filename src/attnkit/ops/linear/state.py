"""The recurrent state of causal linear attention, carried between calls and used for decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LinearAttentionState"]


@dataclass(frozen=True)
class LinearAttentionState:
    """State after ``offset`` tokens: ``S [batch, heads, m, d_v] = sum_j decay^(n-1-j) phi(k_j) v_j^T`` and the
    denominator ``z [batch, heads, m] = sum_j decay^(n-1-j) phi(k_j)`` (``m``: the feature dimension; ``heads``:
    query heads, grouped-query keys are shared). ``offset`` is the number of tokens already seen (the absolute
    position of the next token, which position-dependent feature maps such as cosFormer need).

    ``attnkit.linear_attention(..., state=s, return_state=True)`` continues from ``s`` and returns the next state;
    a plain ``(S, z)`` tuple is accepted as a state with ``offset=0``.
    """

    S: torch.Tensor
    z: torch.Tensor
    offset: int = 0

    @property
    def nbytes(self) -> int:
        """Memory held by the state in bytes (constant in the sequence length)."""
        return self.S.numel() * self.S.element_size() + self.z.numel() * self.z.element_size()

    def to(self, *args, **kwargs) -> LinearAttentionState:
        return LinearAttentionState(self.S.to(*args, **kwargs), self.z.to(*args, **kwargs), self.offset)

    def detach(self) -> LinearAttentionState:
        return LinearAttentionState(self.S.detach(), self.z.detach(), self.offset)

    # internal: the engine keeps z as an extra value column, S_ext [batch, heads, m, d_v + 1]
    def _extended(self) -> torch.Tensor:
        return torch.cat([self.S, self.z[..., None]], dim=-1)

    @staticmethod
    def _from_extended(s_ext: torch.Tensor, offset: int) -> LinearAttentionState:
        return LinearAttentionState(s_ext[..., :-1], s_ext[..., -1], offset)
