"""attnkit.nn modules of the neighborhood family: NAT-style neighborhood attention layers for vision backbones.

Inputs are channels-last feature maps ``[batch, *spatial, channels]`` (``[B, L, C]``, ``[B, H, W, C]``,
``[B, T, H, W, C]``), as NAT/DiNAT and NATTEN's modules take them; the attention itself is
``attnkit.neighborhood`` on ``[batch, heads, *spatial, head_dim]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from attnkit.functional.neighborhood import NeighborhoodBias, neighborhood
from attnkit.ops.neighborhood.dformer import SCOPES, dformer_attention, dformer_layout

__all__ = ["NeighborhoodAttention", "NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d",
           "DFormerAttention3d", "DFormerStage3d"]

IntOrTuple = int | Sequence[int]


def _tuple(name: str, value, ndim: int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise ValueError(f"{name} has {len(value)} entries, the layer has {ndim} spatial axes")
        return tuple(value)
    return (value,) * ndim


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over a channels-last grid ("Neighborhood Attention Transformer",
    Hassani et al. 2023; dilation: DiNAT; causal axes: "Faster Neighborhood Attention"; stride: GNA).

    Args:
        ndim: number of spatial axes (1, 2 or 3); prefer ``NeighborhoodAttention1d/2d/3d``.
        dim: channels ``C``; split into ``num_heads`` heads of ``C // num_heads``.
        num_heads: attention heads.
        kernel_size, dilation, stride, is_causal: as in ``attnkit.neighborhood`` (one value or one per axis).
        rel_pos_bias: learn NAT's relative positional bias, a ``[num_heads, 2k-1, ...]`` table.
        qkv_bias: bias of the fused q/k/v projection (NAT uses one).
        qk_scale: score scale (default ``head_dim ** -0.5``).
        proj_drop: dropout after the output projection.

    ``forward(x)``: ``x [batch, *spatial, dim]`` -> ``[batch, *spatial, dim]``.
    """

    def __init__(self, ndim: int, dim: int, num_heads: int, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                 stride: IntOrTuple = 1, is_causal: bool | Sequence[bool] = False, rel_pos_bias: bool = False, *,
                 qkv_bias: bool = True, qk_scale: float | None = None, proj_drop: float = 0.0):
        super().__init__()
        if ndim not in (1, 2, 3):
            raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")
        if not isinstance(dim, int) or not isinstance(num_heads, int) or dim < 1 or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive ints, got {dim!r} and {num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.ndim, self.dim, self.num_heads = ndim, dim, num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = _tuple("kernel_size", kernel_size, ndim)
        self.dilation = _tuple("dilation", dilation, ndim)
        self.stride = _tuple("stride", stride, ndim)
        self.is_causal = _tuple("is_causal", is_causal, ndim)
        for k in self.kernel_size:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"kernel_size must be positive ints, got {kernel_size!r}")
        self.scale = self.head_dim ** -0.5 if qk_scale is None else float(qk_scale)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            table = torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size))
            nn.init.trunc_normal_(table, std=0.02, a=-2.0, b=2.0)  # NAT's initialisation
            self.rpb = nn.Parameter(table)
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} takes channels-last x [batch, *spatial, {self.dim}] with "
                             f"{self.ndim} spatial axes, got shape {tuple(x.shape)}")
        b, *spatial, c = x.shape
        qkv = self.qkv(x).reshape(b, math.prod(spatial), 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, b, self.num_heads, *spatial, self.head_dim).unbind(0)
        score_mod = None
        if self.rpb is not None:  # shares self.rpb; the bias decodes coordinates on this input's grid
            score_mod = NeighborhoodBias(self.num_heads, spatial, self.kernel_size, self.dilation, table=self.rpb)
        out = neighborhood(q, k, v, self.kernel_size, dilation=self.dilation, stride=self.stride,
                           is_causal=self.is_causal, score_mod=score_mod, scale=self.scale)
        out = out.reshape(b, self.num_heads, math.prod(spatial), self.head_dim).transpose(1, 2).reshape(b, *spatial, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}")


class NeighborhoodAttention1d(NeighborhoodAttention):
    """Neighborhood attention over ``[batch, length, dim]`` (see ``NeighborhoodAttention``)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                 stride: IntOrTuple = 1, is_causal: bool | Sequence[bool] = False, rel_pos_bias: bool = False,
                 **kwargs):
        super().__init__(1, dim, num_heads, kernel_size, dilation, stride, is_causal, rel_pos_bias, **kwargs)


class NeighborhoodAttention2d(NeighborhoodAttention):
    """Neighborhood attention over ``[batch, height, width, dim]`` (see ``NeighborhoodAttention``)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                 stride: IntOrTuple = 1, is_causal: bool | Sequence[bool] = False, rel_pos_bias: bool = False,
                 **kwargs):
        super().__init__(2, dim, num_heads, kernel_size, dilation, stride, is_causal, rel_pos_bias, **kwargs)


class NeighborhoodAttention3d(NeighborhoodAttention):
    """Neighborhood attention over ``[batch, depth, height, width, dim]`` (see ``NeighborhoodAttention``)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
                 stride: IntOrTuple = 1, is_causal: bool | Sequence[bool] = False, rel_pos_bias: bool = False,
                 **kwargs):
        super().__init__(3, dim, num_heads, kernel_size, dilation, stride, is_causal, rel_pos_bias, **kwargs)


class DFormerAttention3d(nn.Module):
    """One D-Former attention layer over ``[batch, depth, height, width, dim]``: multi-head self-attention inside
    local windows (``scope="local"``) or dilated global groups (``scope="global"``) of ``group_size`` tokens per
    axis ("D-Former: A U-shaped Dilated Transformer for 3D Medical Image Segmentation", Sec. 3; the math is
    :func:`attnkit.ops.neighborhood.dformer.dformer_attention`). ``forward(x) -> [batch, D, H, W, dim]``."""

    def __init__(self, dim: int, num_heads: int, group_size: IntOrTuple = (2, 8, 8), scope: str = "local", *,
                 qkv_bias: bool = True):
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim!r}) must be a positive multiple of num_heads ({num_heads!r})")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        dformer_layout((1, 1, 1), group_size)  # validates group_size
        self.dim, self.num_heads, self.group_size, self.scope = dim, num_heads, group_size, scope
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} takes channels-last x [batch, D, H, W, {self.dim}], got shape "
                             f"{tuple(x.shape)}")
        b, *spatial, c = x.shape
        hd = c // self.num_heads
        qkv = self.qkv(x).reshape(b, math.prod(spatial), 3, self.num_heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, b, self.num_heads, *spatial, hd).unbind(0)
        out = dformer_attention(q, k, v, self.group_size, scope=self.scope)
        out = out.reshape(b, self.num_heads, math.prod(spatial), hd).transpose(1, 2).reshape(b, *spatial, c)
        return self.proj(out)


class DFormerStage3d(nn.Module):
    """One D-Former stage over ``[batch, D, H, W, dim]``: the dynamic position encoding (a depthwise 3x3x3
    convolution added to its input, once at the start of the stage), then ``depth`` pre-norm blocks
    (attention + MLP, both residual) whose attention alternates local and dilated global scopes, local first
    ("D-Former", Sec. 3; the alternation and the once-per-stage encoding as in the authors' code).
    ``forward(x) -> [batch, D, H, W, dim]``."""

    def __init__(self, dim: int, num_heads: int, depth: int = 2, group_size: IntOrTuple = (2, 8, 8),
                 mlp_ratio: float = 4.0):
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.pos = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.attn = nn.ModuleList(DFormerAttention3d(dim, num_heads, group_size, SCOPES[i % 2]) for i in range(depth))
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                 for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"DFormerStage3d takes channels-last x [batch, D, H, W, dim], got {tuple(x.shape)}")
        x = x + self.pos(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        for attn, n1, n2, mlp in zip(self.attn, self.norm1, self.norm2, self.mlp):
            x = x + attn(n1(x))
            x = x + mlp(n2(x))
        return x
