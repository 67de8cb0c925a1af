"""Point-to-point helpers over ``torch.distributed`` (gloo on CPU, NCCL on CUDA) with errors that say which
peer failed. Timeouts come from ``init_process_group(timeout=...)``: a peer that died or never sends makes the
waiting rank raise instead of hanging."""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_META_SLOTS = 24  # every rank sends the same number of int64s, whatever it was called with


def group_info(group: dist.ProcessGroup | None, what: str) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group``, with a clear error when no process group exists."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed: call torch.distributed.init_process_group(...) first "
                           f"(torchrun, or attnkit.distributed.run_local for tests)")
    return dist.get_rank(group), dist.get_world_size(group)


def meta_code(value) -> int:
    """An int64 that stands for ``value`` in a metadata check: ints as themselves, dtypes by index, floats by
    their bits, anything else (names, flags) by a CRC of its repr."""
    if isinstance(value, bool) or value is None:
        return int(bool(value)) if value is not None else -1
    if isinstance(value, int):
        return value
    if isinstance(value, torch.dtype):
        return _DTYPES.index(value) if value in _DTYPES else 100 + zlib.crc32(str(value).encode())
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return zlib.crc32(repr(value).encode())


def check_agreement(group: dist.ProcessGroup | None, what: str, meta: Mapping[str, object],
                    device: torch.device) -> None:
    """All-gather ``meta`` (shapes, dtype, options) from every rank of ``group`` before any data moves, and raise
    the same ``ValueError`` on every rank when they disagree: a collective over mismatched buffers would abort a
    rank (gloo) or fill a buffer only in part. One message of ``_META_SLOTS`` int64s per rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    names = list(meta)
    if len(names) > _META_SLOTS - 2:
        raise AssertionError("too many metadata fields")
    codes = [meta_code(meta[k]) for k in names]
    # slot 0: a code of the call and its field names, so ranks in different calls are told apart too
    row = [zlib.crc32(f"{what}:{','.join(names)}".encode()), len(names), *codes]
    row += [0] * (_META_SLOTS - len(row))
    dev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor(row, dtype=torch.int64, device=dev)
    rows = [torch.empty_like(mine) for _ in range(world)]
    try:
        dist.all_gather(rows, mine, group=group)
    except RuntimeError as e:
        raise RuntimeError(f"{what}: rank {dist.get_rank()} failed exchanging shapes with peers: {e}. A peer process "
                           f"died, timed out, or did not make the same call "
                           f"(timeout: init_process_group(timeout=...))") from e
    table = torch.stack(rows).cpu().tolist()
    if all(r == table[0] for r in table):
        return
    if any(r[0] != table[0][0] or r[1] != table[0][1] for r in table):
        raise ValueError(f"{what}: the ranks of the group made different calls (rank {rank} called {what}); every "
                         f"rank must call the same function at the same point")
    diffs = []
    for i, name in enumerate(names):
        column = [r[2 + i] for r in table]
        if len(set(column)) > 1:
            if name == "dtype":
                shown = [str(_DTYPES[c]) if 0 <= c < len(_DTYPES) else "other" for c in column]
            elif isinstance(meta[name], int):
                shown = [str(c) for c in column]
            else:
                shown = None
            if shown is None:
                diffs.append(f"{name} differs between ranks (this rank {rank}: {meta[name]!r})")
            else:
                diffs.append(f"{name}: " + ", ".join(f"rank {r} has {s}" for r, s in enumerate(shown)))
    raise ValueError(f"{what}: the ranks disagree ({'; '.join(diffs)}); every rank must pass tensors of the same "
                     f"dtype and shape (apart from what is documented to differ) and the same options")


def global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class TrafficCounter:
    """Bytes and messages this process sent through :class:`Exchange` while the counter was active (``with
    count_traffic() as c: ...; c.bytes_sent``). Counts payload bytes only (no metadata checks, no headers)."""

    def __init__(self):
        self.bytes_sent = 0
        self.messages_sent = 0


_COUNTERS: list[TrafficCounter] = []


@contextlib.contextmanager
def count_traffic():
    """Count what this rank sends point-to-point inside the ``with`` block (see :class:`TrafficCounter`)."""
    c = TrafficCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


class Exchange:
    """Send ``send`` to group rank ``dst`` and receive a tensor like ``recv`` from ``src``, asynchronously;
    ``wait()`` returns the received tensor."""

    def __init__(self, send: torch.Tensor | None, dst: int | None, recv: torch.Tensor | None, src: int | None,
                 group: dist.ProcessGroup | None, tag: int, what: str):
        self.recv, self.src, self.dst, self.what = recv, src, dst, what
        ops = []
        if send is not None:
            for c in _COUNTERS:
                c.bytes_sent += send.numel() * send.element_size()
                c.messages_sent += 1
            ops.append(dist.P2POp(dist.isend, send.contiguous(), global_rank(group, dst), group, tag))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, global_rank(group, src), group, tag))
        self._send = send
        try:
            self.works = dist.batch_isend_irecv(ops) if ops else []
        except RuntimeError as e:  # pragma: no cover - transport errors at post time
            raise RuntimeError(self._message(e)) from e

    def _message(self, e: Exception) -> str:
        peers = ", ".join(part for part in (
            None if self.dst is None else f"send to group rank {self.dst}",
            None if self.src is None else f"receive from group rank {self.src}") if part)
        return (f"{self.what}: rank {dist.get_rank()} failed exchanging with peers ({peers}): {e}. A peer process "
                f"died, timed out, or did not make the same call with the same shapes "
                f"(timeout: init_process_group(timeout=...))")

    def wait(self) -> torch.Tensor | None:
        try:
            for w in self.works:
                w.wait()
        except RuntimeError as e:
            raise RuntimeError(self._message(e)) from e
        return self.recv
