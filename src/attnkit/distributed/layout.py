"""Sequence layouts across ranks: which global positions each rank holds, and how to shard and unshard.

* ``"contiguous"`` (Ring Attention): rank ``r`` of ``P`` holds positions ``r n/P .. (r + 1) n/P - 1``. Under a
  causal mask rank ``r`` has work on ``r + 1`` of the ``P`` key blocks: the last rank does ``P`` times the work
  of the first.
* ``"striped"`` (Striped Attention, Brandon et al., 2023): rank ``r`` holds positions ``r, r + P, r + 2P, ...``.
  Every (query block, key block) pair is then almost triangular (inclusive lower-triangular when the key block's
  rank is ``<=`` the query block's, strictly lower-triangular otherwise), so every rank does about half of every
  block: balanced causal work. Position-dependent inputs (RoPE, position ids) must use :func:`shard_positions`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["LAYOUTS", "shard_positions", "shard", "unshard", "unshard_list"]

LAYOUTS = ("contiguous", "striped")


def _check(seq_len: int, world_size: int, layout: str, rank: int | None = None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if world_size < 1 or seq_len % world_size:
        raise ValueError(f"the sequence length ({seq_len}) must be divisible by the number of ranks ({world_size}); "
                         f"pad the sequence (and mask the padding) to a multiple of {world_size}")


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str = "contiguous",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions ``[seq_len // world_size]`` held by ``rank`` (long)."""
    _check(seq_len, world_size, layout, rank)
    n = seq_len // world_size
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    return torch.arange(n, device=device) * world_size + rank


def shard(x: torch.Tensor, rank: int, world_size: int, *, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The part of the full sequence ``x`` (sequence axis ``dim``, default 2 of ``[batch, heads, seq, dim]``) that
    ``rank`` holds in ``layout``. No communication: every rank slices the same full tensor."""
    dim = dim % x.dim()
    _check(x.shape[dim], world_size, layout, rank)
    n = x.shape[dim] // world_size
    if layout == "contiguous":
        return x.narrow(dim, rank * n, n)
    return x.unflatten(dim, (n, world_size)).select(dim + 1, rank)


def unshard_list(shards: list[torch.Tensor], *, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The full sequence from every rank's shard, in rank order (the inverse of :func:`shard`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dim = dim % shards[0].dim()
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    return torch.stack(shards, dim=dim + 1).flatten(dim, dim + 1)


def unshard(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, layout: str = "contiguous",
            dim: int = 2) -> torch.Tensor:
    """All-gather every rank's shard ``x`` and return the full sequence on every rank (no gradient)."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_list(parts, layout=layout, dim=dim)
