"""Point-to-point helpers over ``torch.distributed`` (gloo on CPU, NCCL on CUDA) with errors that say which
peer failed. Timeouts come from ``init_process_group(timeout=...)``: a peer that died or never sends makes the
waiting rank raise instead of hanging."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_info(group: dist.ProcessGroup | None, what: str) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group``, with a clear error when no process group exists."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed: call torch.distributed.init_process_group(...) first "
                           f"(torchrun, or attnkit.distributed.run_local for tests)")
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class Exchange:
    """Send ``send`` to group rank ``dst`` and receive a tensor like ``recv`` from ``src``, asynchronously;
    ``wait()`` returns the received tensor."""

    def __init__(self, send: torch.Tensor | None, dst: int | None, recv: torch.Tensor | None, src: int | None,
                 group: dist.ProcessGroup | None, tag: int, what: str):
        self.recv, self.src, self.dst, self.what = recv, src, dst, what
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), global_rank(group, dst), group, tag))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, global_rank(group, src), group, tag))
        self._send = send
        try:
            self.works = dist.batch_isend_irecv(ops) if ops else []
        except RuntimeError as e:  # pragma: no cover - transport errors at post time
            raise RuntimeError(self._message(e)) from e

    def _message(self, e: Exception) -> str:
        return (f"{self.what}: rank {dist.get_rank()} failed exchanging with peers (send to group rank "
                f"{self.dst}, receive from group rank {self.src}): {e}. A peer process died, timed out, or did not "
                f"make the same call with the same shapes (timeout: init_process_group(timeout=...))")

    def wait(self) -> torch.Tensor | None:
        try:
            for w in self.works:
                w.wait()
        except RuntimeError as e:
            raise RuntimeError(self._message(e)) from e
        return self.recv
