"""Exact-attention variants that run over ``attnkit.attention`` (and so over its dispatch): Twins' global
sub-sampled attention and Hepos' head-strided cross-attention by gathering. The pattern-level variants (packing,
registers, grids) are kernels in :mod:`attnkit.ops.exact.variants`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnkit.ops.exact.variants import grid_shape

__all__ = ["sub_sampled_attention", "sub_sampled_attention_reference", "head_strided_attention"]


def sub_sampled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ratio: int,
                          shape: Sequence[int] | None = None, *, scale: float | None = None) -> torch.Tensor:
    """Global sub-sampled attention (GSA, "Twins: Revisiting the Design of Spatial Attention in Vision
    Transformers", Chu et al., 2021, Sec. 3.2): keys and values of the grid ``shape`` (row-major flattened,
    default a near-square 2-D grid) are reduced to one representative per ``ratio x ratio`` window (its mean; the
    paper's strided convolution is the learnable form, ``attnkit.nn.SubSampledAttention``), and every query
    attends to all of them. ``q [batch, heads, n, dim]`` -> ``[batch, heads, n, dim_v]``; cost
    O(n * n / ratio^2 * d). ``ratio=1`` is full attention. Border windows of a grid not divisible by ``ratio``
    are averaged over the tokens they hold."""
    from attnkit._checks import check_qkv

    check_qkv(q, k, v)
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    n = k.shape[2]
    shape = tuple(shape) if shape is not None else grid_shape(n)
    if len(shape) != 2 or shape[0] * shape[1] != n:
        raise ValueError(f"shape must be a 2-D grid of {n} tokens, got {shape}")
    b, hk = k.shape[:2]

    def pool(x):
        img = x.transpose(-1, -2).reshape(b * hk, x.shape[-1], *shape)
        pooled = torch.nn.functional.avg_pool2d(img, ratio, ratio, ceil_mode=True, count_include_pad=False)
        return pooled.reshape(b, hk, x.shape[-1], -1).transpose(-1, -2)

    from attnkit.functional.exact import attention

    return attention(q, pool(k), pool(v), scale=scale)


def sub_sampled_attention_reference(q, k, v, ratio: int, shape: Sequence[int] | None = None, *,
                                    scale: float | None = None) -> torch.Tensor:
    """The same operator by a loop over windows (mean of each window's keys/values) and dense softmax."""
    n = k.shape[2]
    rows, cols = tuple(shape) if shape is not None else grid_shape(n)
    idx = torch.arange(n).view(rows, cols)
    ks, vs = [], []
    for r in range(0, rows, ratio):
        for c in range(0, cols, ratio):
            w = idx[r: r + ratio, c: c + ratio].reshape(-1)
            ks.append(k[:, :, w].mean(2))
            vs.append(v[:, :, w].mean(2))
    from attnkit.functional.exact import attention

    return attention(q, torch.stack(ks, 2), torch.stack(vs, 2), scale=scale, engine="reference")


def head_strided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int, *,
                           scale: float | None = None) -> torch.Tensor:
    """Hepos cross-attention ("Efficient Attentions for Long Document Summarization", Sec. 3.2) by gathering:
    head ``h`` attends to the keys ``j = h % stride, h % stride + stride, ...`` only, so each residue class's heads
    run dense attention on ``kv_len / stride`` gathered keys (SDPA): ``1 / stride`` of full attention's work,
    exactly equal to ``attention(pattern=head_strides(stride))``. ``q [batch, heads, q_len, dim]``, ``k, v
    [batch, kv_heads, kv_len, dim]``."""
    from attnkit._checks import check_qkv
    from attnkit.functional.exact import attention

    check_qkv(q, k, v)
    h, hkv = q.shape[1], k.shape[1]
    outs, order = [], []
    for r in range(min(stride, h)):
        heads = list(range(r, h, stride))
        idx = torch.tensor(heads, device=q.device)
        kv_idx = torch.div(idx, h // hkv, rounding_mode="floor")
        ks, vs = k.index_select(1, kv_idx)[:, :, r::stride], v.index_select(1, kv_idx)[:, :, r::stride]
        qs = q.index_select(1, idx)
        if ks.shape[2] == 0:  # no key of this residue: the rows are fully masked, zeros by convention
            outs.append(q.new_zeros(*qs.shape[:-1], v.shape[-1]))
        else:
            outs.append(attention(qs, ks, vs, scale=scale if scale is not None else q.shape[-1] ** -0.5))
        order += heads
    inverse = torch.argsort(torch.tensor(order, device=q.device))
    return torch.cat(outs, dim=1).index_select(1, inverse)
