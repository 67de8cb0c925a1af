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

    ``key_shift [batch, heads]``: maps whose key features are stabilised by a shared shift (FAVOR+) store the
    shift ``c`` the state was summed with (``S = sum exp(-c) phi(k_j) v_j^T``); the next call rescales the state
    when its keys need a larger one. ``feature_map``: the name of the map that made the state (a state cannot be
    continued with another map).
    """

    S: torch.Tensor
    z: torch.Tensor
    offset: int = 0
    key_shift: torch.Tensor | None = None
    feature_map: str | None = None

    @property
    def nbytes(self) -> int:
        """Memory held by the state in bytes (constant in the sequence length)."""
        return self.S.numel() * self.S.element_size() + self.z.numel() * self.z.element_size()

    def to(self, *args, **kwargs) -> LinearAttentionState:
        shift = None if self.key_shift is None else self.key_shift.to(*args, **kwargs)
        return LinearAttentionState(self.S.to(*args, **kwargs), self.z.to(*args, **kwargs), self.offset, shift,
                                    self.feature_map)

    def detach(self) -> LinearAttentionState:
        shift = None if self.key_shift is None else self.key_shift.detach()
        return LinearAttentionState(self.S.detach(), self.z.detach(), self.offset, shift, self.feature_map)

    # internal: the engine keeps z as an extra value column, S_ext [batch, heads, m, d_v + 1]
    def _extended(self) -> torch.Tensor:
        return torch.cat([self.S, self.z[..., None]], dim=-1)

    @staticmethod
    def _from_extended(s_ext: torch.Tensor, offset: int, key_shift: torch.Tensor | None = None,
                       feature_map: str | None = None) -> LinearAttentionState:
        return LinearAttentionState(s_ext[..., :-1], s_ext[..., -1], offset, key_shift, feature_map)
