"""A paged KV cache: fixed-size pages in one shared pool, a block table per sequence.

The serving layout of vLLM's PagedAttention ("Efficient Memory Management for Large Language Model Serving with
PagedAttention", Kwon et al. 2023, Sec. 4.1-4.2), as FlashAttention's and FlexAttention's paged KV use it:
memory is handed out a page (``page_size`` tokens) at a time, so sequences of very different lengths share one
pool without reserving their maximum length, and a finished sequence's pages return to the pool (``free``).

Layout: ``k_pool, v_pool [kv_heads, num_pages, page_size, dim]``. Pages are allocated in *extents* of
consecutive page ids reserved for one sequence (``extent`` pages), so a sequence's keys are a few contiguous runs
of the pool, each a free view ``[kv_heads, run_pages * page_size, dim]``: a decode step over a sequence held in
one run reads the pool in place, with no gather; several runs are concatenated (one copy).

Same protocol as :class:`attnkit.KVCache` (``positions``, ``attend``, ``append``, ``nbytes``, ``reset``), so
``attnkit.nn.MultiheadAttention(...)(x, cache=PagedKVCache())`` decodes with it; prefill + N steps equals one
full causal pass, for every page size, with a batch of different lengths (``lengths=``).
"""

from __future__ import annotations

import torch

from attnkit import patterns as P
from attnkit.functional.exact import attention

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """Paged keys and values for autoregressive decoding (see the module docstring).

    Args:
        page_size: tokens per page.
        num_pages: pages preallocated in the pool (grows by doubling when exhausted).
        extent: consecutive pages reserved for a sequence at a time (1 = plain first-free allocation).

    Attributes: ``block_tables`` (a list of page ids per sequence), ``lengths [batch]``, ``free_pages``.
    """

    def __init__(self, page_size: int = 16, *, num_pages: int = 64, extent: int = 16):
        for name, val in (("page_size", page_size), ("num_pages", num_pages), ("extent", extent)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.page_size, self.initial_pages, self.extent = page_size, num_pages, extent
        self.reset()

    # -- state ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.k_pool: torch.Tensor | None = None
        self.v_pool: torch.Tensor | None = None
        self.block_tables: list[list[int]] = []
        self.lengths: torch.Tensor | None = None
        self._free: list[int] = []
        self._reserved: dict[int, list[int]] = {}  # sequence -> reserved page ids not yet used

    @property
    def num_pages(self) -> int:
        return 0 if self.k_pool is None else self.k_pool.shape[1]

    @property
    def free_pages(self) -> int:
        """Pages neither used nor reserved by a sequence."""
        return len(self._free)

    @property
    def seq_len(self) -> int:
        return 0 if self.lengths is None else int(self.lengths.max())

    @property
    def nbytes(self) -> int:
        """Bytes of the pool (every allocated page, used or not)."""
        if self.k_pool is None:
            return 0
        return self.k_pool.numel() * self.k_pool.element_size() + self.v_pool.numel() * self.v_pool.element_size()

    @property
    def used_bytes(self) -> int:
        """Bytes of the pages that hold tokens."""
        if self.k_pool is None:
            return 0
        per_page = (self.k_pool[:, :1].numel() * self.k_pool.element_size()
                    + self.v_pool[:, :1].numel() * self.v_pool.element_size())
        return per_page * sum(len(t) for t in self.block_tables)

    def block_table(self) -> torch.Tensor:
        """``[batch, max_pages]`` page ids (``-1`` where a sequence has fewer pages)."""
        width = max((len(t) for t in self.block_tables), default=0)
        return torch.tensor([t + [-1] * (width - len(t)) for t in self.block_tables], dtype=torch.long)

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        """Absolute positions ``[batch, n]`` of the next ``n`` tokens (``[1, n]`` while the cache is empty)."""
        start = torch.zeros(1, dtype=torch.long) if self.lengths is None else self.lengths
        return start.view(-1, 1) + torch.arange(n, device=start.device)

    # -- allocation ----------------------------------------------------------------------------------------
    def _create(self, k: torch.Tensor, v: torch.Tensor) -> None:
        b, hkv, _, d = k.shape
        self.k_pool = k.new_zeros(hkv, self.initial_pages, self.page_size, d)
        self.v_pool = v.new_zeros(hkv, self.initial_pages, self.page_size, v.shape[-1])
        self._free = list(range(self.initial_pages))
        self.block_tables = [[] for _ in range(b)]
        self.lengths = torch.zeros(b, dtype=torch.long, device=k.device)

    def _grow(self, at_least: int) -> None:
        old = self.num_pages
        new = max(2 * old, old + at_least)
        for name in ("k_pool", "v_pool"):
            pool = getattr(self, name)
            bigger = pool.new_zeros(pool.shape[0], new, *pool.shape[2:])
            bigger[:, :old] = pool
            setattr(self, name, bigger)
        self._free.extend(range(old, new))

    def _take_extent(self) -> list[int]:
        """The lowest run of ``extent`` consecutive free pages (growing the pool if there is none)."""
        want = self.extent
        free = sorted(self._free)
        run_start, run_len = None, 0
        for i, p in enumerate(free):
            if i and p == free[i - 1] + 1:
                run_len += 1
            else:
                run_start, run_len = p, 1
            if run_len == want:
                break
        if run_len < want:
            self._grow(want)
            return self._take_extent()
        pages = list(range(run_start, run_start + want))
        taken = set(pages)
        self._free = [p for p in self._free if p not in taken]
        return pages

    def _new_page(self, seq: int) -> int:
        reserved = self._reserved.get(seq)
        if not reserved:
            reserved = self._reserved[seq] = self._take_extent()
        return reserved.pop(0)

    def free(self, seq: int) -> None:
        """Return sequence ``seq``'s pages (used and reserved) to the pool; its length becomes 0, so the slot can
        take a new prompt (append with ``lengths=`` that is 0 for the other sequences)."""
        if self.lengths is None or not 0 <= seq < len(self.block_tables):
            raise ValueError(f"seq must index one of the {len(self.block_tables)} sequences, got {seq}")
        self._free.extend(self.block_tables[seq])
        self._free.extend(self._reserved.pop(seq, []))
        self.block_tables[seq] = []
        self.lengths[seq] = 0

    # -- writing and reading -------------------------------------------------------------------------------
    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        b, hkv, _, d = k.shape
        if (b, hkv, d, v.shape[-1]) != (len(self.block_tables), self.k_pool.shape[0], self.k_pool.shape[3],
                                        self.v_pool.shape[3]):
            raise ValueError(f"new keys {tuple(k.shape)} / values {tuple(v.shape)} do not match the cache "
                             f"[batch={len(self.block_tables)}, kv_heads={self.k_pool.shape[0]}, *, "
                             f"dim={self.k_pool.shape[3]}, dim_v={self.v_pool.shape[3]}]")
        if k.dtype != self.k_pool.dtype or k.device != self.k_pool.device or v.dtype != self.v_pool.dtype:
            raise TypeError(f"new keys are {k.dtype} on {k.device}, the cache holds {self.k_pool.dtype} on "
                            f"{self.k_pool.device}; call reset() or cast the inputs")

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> torch.Tensor:
        """Write ``k, v [batch, kv_heads, n, dim]`` after each sequence's last token; ``lengths [batch]`` says
        how many of the ``n`` are real (right padding). Returns the start positions ``[batch]``."""
        from attnkit.cache import _as_lengths

        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k, v must be [batch, kv_heads, n, dim] with equal batch/heads/length, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if not (k.is_floating_point() and v.is_floating_point()):
            raise TypeError(f"k and v must be floating-point tensors, got {k.dtype} and {v.dtype}")
        n = k.shape[2]
        valid = _as_lengths(lengths, k.shape[0], n, k.device)  # checked before the first write creates the pools
        if self.k_pool is None:
            self._create(k, v)
        self._check(k, v)
        start = self.lengths.clone()
        ps = self.page_size
        for b in range(k.shape[0]):
            pos, end, src = int(start[b]), int(start[b]) + int(valid[b]), 0
            while pos < end:
                page_idx, offset = divmod(pos, ps)
                table = self.block_tables[b]
                while len(table) <= page_idx:
                    table.append(self._new_page(b))
                take = min(ps - offset, end - pos)
                page = table[page_idx]
                self.k_pool[:, page, offset:offset + take] = k[b, :, src:src + take]
                self.v_pool[:, page, offset:offset + take] = v[b, :, src:src + take]
                pos, src = pos + take, src + take
        self.lengths = start + valid
        return start

    def _runs(self, seq: int) -> list[tuple[int, int]]:
        """Maximal runs ``(first_page, num_pages)`` of consecutive page ids in ``seq``'s block table."""
        runs: list[tuple[int, int]] = []
        for p in self.block_tables[seq]:
            if runs and p == runs[-1][0] + runs[-1][1]:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        return runs

    def get(self, seq: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of sequence ``seq``: ``[kv_heads, length, dim]`` (a view of the pool when its pages
        form one run, else one concatenation)."""
        if self.k_pool is None:
            raise ValueError("the cache is empty; call attend()/append() first")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < len(self.block_tables):
            raise ValueError(f"seq must index one of the {len(self.block_tables)} sequences (an int in "
                             f"[0, {len(self.block_tables) - 1}]), got {seq!r}")
        n = int(self.lengths[seq])
        parts_k, parts_v = [], []
        for first, count in self._runs(seq):
            shape_k = (self.k_pool.shape[0], count * self.page_size, self.k_pool.shape[3])
            shape_v = (self.v_pool.shape[0], count * self.page_size, self.v_pool.shape[3])
            parts_k.append(self.k_pool[:, first:first + count].reshape(shape_k))
            parts_v.append(self.v_pool[:, first:first + count].reshape(shape_v))
        if not parts_k:
            return self.k_pool[:, :0, 0], self.v_pool[:, :0, 0]
        kk = parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, dim=1)
        vv = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v, dim=1)
        return kk[:, :n], vv[:, :n]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: P.Pattern | None = None,
               causal: bool = True, score_mod=None, normalization="softmax", scale: float | None = None,
               lengths=None) -> torch.Tensor:
        """Append ``k, v`` and attend ``q [batch, heads, n, dim]`` (the new tokens) to each sequence's keys, with
        ``pattern`` (default: causal when ``causal``) at absolute positions. Returns ``[batch, heads, n, dim_v]``;
        padded query rows (beyond ``lengths[b]``) are zero."""
        from attnkit.cache import _as_lengths, _check_new

        _check_new(q, k, v)
        n = q.shape[2]
        valid = _as_lengths(lengths, q.shape[0], n, q.device)
        self.append(k, v, lengths)
        pat = pattern if pattern is not None else (P.causal() if causal else None)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        for b in range(q.shape[0]):
            m = int(valid[b])
            if m == 0:
                continue
            kk, vv = self.get(b)
            one = pat
            if m == 1 and isinstance(pat, P._Band) and pat.hi >= 0 and pat.lo == float("-inf"):
                one = None  # the last query sees every key: the dense fast path
            # bottom-right alignment: the m new queries are the last m of the sequence's positions
            out[b:b + 1, :, :m] = attention(q[b:b + 1, :, :m], kk.unsqueeze(0), vv.unsqueeze(0), pattern=one,
                                            score_mod=score_mod, normalization=normalization, scale=scale)
        return out
