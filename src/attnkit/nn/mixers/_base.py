"""What the mixer modules share: argument checks and the ``_Mixer`` base (``dim``, ``causal``, the input
check)."""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.mixers._common import (
    check_x,
)


def _check_dim(dim: int, **divisors: int) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    for name, value in divisors.items():
        if not isinstance(value, int) or value < 1 or dim % value:
            raise ValueError(f"{name}={value!r} must be a positive int dividing dim={dim}")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _refuse_causal(name: str, causal: bool) -> None:
    if causal:
        from attnkit.errors import NotSupportedError

        raise NotSupportedError(f"{name} has no causal form (causal=True was given): its paper mixes the whole "
                                f"input; choose a causal mixer (see `attnkit list`)")


class _Mixer(nn.Module):
    """Common plumbing: ``dim``, ``causal``, the number of spatial axes and the input check."""

    spatial: int | None = 1

    def __init__(self, dim: int, causal: bool = False):
        super().__init__()
        self.dim = dim
        self.causal = bool(causal)

    def _check(self, x: torch.Tensor) -> None:
        check_x(x, self.dim, spatial=self.spatial)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, causal={self.causal}"


class _Mixer2d(_Mixer):
    spatial = 2
