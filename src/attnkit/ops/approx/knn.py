"""A maximum-inner-product (MIPS) index over keys, shared by the retrieval methods (IceFormer, RetrievalAttention,
SEA's selection, Loki's decode step): exact top-k, an inverted-file index in plain torch, and faiss's HNSW graph.

:class:`KeyIndex` keeps one index per ``[batch, heads]`` group of keys ``[batch, heads, n, dim]`` and answers
``search(q, top_k)`` with the slots (insertion order, 0-based) of each query's top-k keys by ``q . k``. Keys are
added incrementally (``add``), as a decoder appends one key per step.

Backends (``kind``):

- ``"exact"``: scores every key (``q K^T`` and ``topk``); the oracle the others are measured against.
- ``"faiss"``: an HNSW graph from faiss-cpu (``pip install attnkit[retrieval]``). ``metric="ip"`` (default):
  faiss's inner-product HNSW over the keys as they are. ``metric="l2_augmented"``: a Euclidean HNSW over keys
  augmented to ``[k, sqrt(M^2 - |k|^2)]``, the MIPS-to-nearest-neighbour reduction IceFormer uses (Mazaheri et
  al. 2024, after Bachrach et al. 2014: ``|q' - k'|^2 = |q|^2 + M^2 - 2 q . k`` for ``q' = [q, 0]``, so the
  nearest augmented key has the largest inner product); ``M`` is fixed at the first ``add`` (times
  ``max_norm_margin``) and a later, longer key goes to a side list scanned exactly. On the benchmark's clustered
  keys (64K, head dim 64, M = 32, efConstruction = 128) the inner-product graph had the higher recall at equal
  search time (0.96 vs 0.88 at efSearch = 64), hence the default.
  Why faiss rather than hnswlib: faiss-cpu ships binary wheels for every platform and Python attnkit supports
  (hnswlib often builds from source), is actively maintained (Meta), releases the GIL, and offers IVF/PQ
  indexes beside HNSW behind the same calls. IceFormer's own index (Prioritized DCI) has no maintained package.
- ``"ivf"``: an inverted-file index in plain torch (no extra): k-means centroids of a sample of the keys, keys
  stored sorted by their nearest centroid, a query scans the lists of its ``num_probes`` best centroids by
  ``q . c``. Keys added after the build wait in a tail that is scanned exactly and merged into the lists every
  ``tail_limit`` keys. This is the fallback for ``"auto"`` when faiss is absent, and it says so (a warning).
- ``"graph"``: RetrievalAttention's attention-aware index, in plain torch (Liu et al. 2024, "RetrievalAttention:
  Accelerating Long-Context LLM Inference via Vector Retrieval", Sec. 3: queries and keys follow different
  distributions, so an index built from keys alone serves queries poorly; the index is built from the
  prefill's queries, after RoarGraph's projected bipartite graph). ``add(keys, queries=q)``: each training
  query's ``graph_degree + 1`` nearest keys by ``q . k`` are found exactly; the nearest gets edges to the others
  (the query-to-key bipartite graph projected onto keys; per key the ``graph_degree - knn_edges`` most frequent
  targets are kept), plus ``knn_edges`` edges to its own nearest keys and a few long links (one along a random
  cycle through all keys, so every key is reachable); the entries are the key best aligned with the mean
  training query and a few random keys. Without queries the graph is the keys' own kNN graph (an index built
  from keys only: the baseline the paper improves on). Search is a best-first beam search of width
  ``ef_search`` from the entries, batched over queries. Recall@10 on out-of-distribution queries (2,048 keys,
  dim 32, ef 32, ``tests/test_approx_retrieval.py``): 0.95 attention-aware, 0.53 from keys only. Keys added
  later wait in an exact tail; when it reaches ``tail_limit`` keys the graph is rebuilt from every key and
  every training query given so far.
- ``"auto"``: faiss when importable, else ``"ivf"`` with a warning.

Non-finite keys (a NaN or an infinity in any component) are skipped: they are stored as all-NaN rows whose
scores count as ``-inf``, so they are never returned and never take a slot from a finite key (``-1`` only where
fewer finite keys than ``top_k`` exist); IVF builds its centroids without them, and faiss receives them as zero
vectors (then filtered from its answers). A query with a non-finite component finds nothing (all ``-1``).
Callers that attend over the retrieved keys (IceFormer, RetrievalAttention) propagate such keys as NaN in the
rows that would see them, as dense attention does.

Every backend returns the exact top-k of the candidates it examined (HNSW stores full vectors; IVF scores its
lists exactly), so results are ordered by the true ``q . k``; callers that filter candidates (causal, static
sets) ask for a few extra and re-rank.
"""

from __future__ import annotations

import math
import warnings

import torch

from attnkit.ops.approx._common import check_positive_int

__all__ = ["KeyIndex", "INDEX_KINDS", "faiss_available", "mips_augment", "topk_recall"]

INDEX_KINDS = ("auto", "exact", "ivf", "faiss", "graph")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def mips_augment(keys: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Keys ``[..., n, d]`` -> ``[..., n, d + 1]`` with the extra coordinate ``sqrt(M^2 - |k|^2)``: the nearest
    augmented key (Euclidean) to ``[q, 0]`` is the one with the largest ``q . k``. Requires ``|k| <= M``."""
    sq = keys.double().square().sum(-1, keepdim=True)
    if bool((sq > max_norm ** 2 * (1 + 1e-9)).any()):
        raise ValueError(f"mips_augment needs every key norm <= max_norm={max_norm}; pass a larger max_norm")
    extra = (max_norm ** 2 - sq).clamp_min(0).sqrt().to(keys.dtype)
    return torch.cat([keys, extra], dim=-1)


def topk_recall(found: torch.Tensor, true: torch.Tensor) -> float:
    """Mean fraction of the true top-k slots ``true [..., k]`` present in ``found [..., k']`` (``-1``: none)."""
    hit = (found[..., :, None] == true[..., None, :]).any(-2)  # [..., k]
    return float(hit.double().mean())


def _kmeans(x: torch.Tensor, num_lists: int, iterations: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means of ``x [G, n, d]`` (float32) -> centroids ``[G, C, d]``; empty lists keep their centroid."""
    g = torch.Generator().manual_seed(int(seed))
    n = x.shape[1]
    start = torch.randperm(n, generator=g)[:num_lists].to(x.device)
    c = x[:, start].clone()
    for _ in range(iterations):
        assign = _nearest(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, assign[..., None].expand_as(x), x)
        counts = torch.zeros(c.shape[:2], dtype=x.dtype, device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=x.dtype))
        c = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], c)
    return c


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (Euclidean) of each row of ``x [G, n, d]`` among ``c [G, C, d]``: ``[G, n]``."""
    return (c.square().sum(-1)[:, None, :] - 2 * x @ c.transpose(-1, -2)).argmin(-1)


class KeyIndex:
    """A top-k inner-product index over the keys of ``groups`` (batch x heads) sequences; see the module doc.

    ``num_lists`` (ivf; default ``2 sqrt(n)`` at build), ``num_probes`` (ivf lists scanned per query),
    ``hnsw_m``, ``ef_construction``, ``ef_search`` (faiss HNSW), ``tail_limit`` (ivf: keys kept in the exact
    tail before they are merged into the lists), ``seed`` (k-means start). The index keeps its own float32
    copy of the keys (on the keys' device for exact/ivf; in faiss's memory for faiss). Keys with a NaN or an
    infinity are skipped (never returned; see the module docstring).
    """

    def __init__(self, kind: str = "auto", *, num_lists: int | None = None, num_probes: int = 16,
                 hnsw_m: int = 32, ef_construction: int = 128, ef_search: int = 64, metric: str = "ip",
                 max_norm_margin: float = 1.0, tail_limit: int = 4096,
                 kmeans_iterations: int = 5, seed: int = 0, graph_degree: int = 32, knn_edges: int = 8):
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        if kind == "auto":
            if faiss_available():
                kind = "faiss"
            else:
                warnings.warn("attnkit retrieval: faiss is not installed, using the pure-torch IVF index instead "
                              "(slower and lower recall at equal work); `pip install attnkit[retrieval]` for "
                              "faiss-cpu", RuntimeWarning, stacklevel=2)
                kind = "ivf"
        if kind == "faiss" and not faiss_available():
            raise ImportError("index='faiss' needs faiss-cpu: `pip install attnkit[retrieval]` (or "
                              "`pip install faiss-cpu`), or use index='ivf' (pure torch) or 'exact'")
        for name, value in (("num_probes", num_probes), ("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search), ("tail_limit", tail_limit), ("graph_degree", graph_degree)):
            check_positive_int(name, value)
        check_positive_int("knn_edges", knn_edges, minimum=0)
        if knn_edges > graph_degree:
            raise ValueError(f"knn_edges ({knn_edges}) must be <= graph_degree ({graph_degree})")
        self.graph_degree, self.knn_edges = graph_degree, knn_edges
        # graph: every key [G, n, d], out-neighbours [G, n, degree] (-1: none), entry [G, 1], training queries
        self._graph_keys = self._graph = self._entry = None
        self._graph_queries: list[torch.Tensor] = []
        if num_lists is not None:
            check_positive_int("num_lists", num_lists)
        self.kind = kind
        self.num_lists, self.num_probes = num_lists, num_probes
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        if metric not in ("ip", "l2_augmented"):
            raise ValueError(f"metric must be 'ip' (faiss's inner-product HNSW) or 'l2_augmented' (the MIPS -> "
                             f"nearest-neighbour reduction), got {metric!r}")
        if not max_norm_margin >= 1.0:
            raise ValueError(f"max_norm_margin must be >= 1 (M = margin x the largest first-batch key norm), got "
                             f"{max_norm_margin!r}")
        self.metric, self.max_norm_margin = metric, float(max_norm_margin)
        self.tail_limit, self.kmeans_iterations, self.seed = tail_limit, kmeans_iterations, seed
        self.groups: int | None = None
        self.dim: int | None = None
        self.size = 0
        # exact: keys [G, cap, d]; ivf: sorted keys, their slots, list offsets, centroids, and the tail.
        self._keys: torch.Tensor | None = None
        self._sorted = self._slots = self._offsets = self._centroids = self._lists = None
        self._tail: list[torch.Tensor] = []
        self._tail_start = 0
        self._faiss: list = []
        self._max_norm = 0.0
        self._overflow: list[list[torch.Tensor]] = []
        self._overflow_slots: list[list[torch.Tensor]] = []
        self._skipped: list[torch.Tensor] = []  # faiss: [G, m] flags of non-finite keys (zero vectors there)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"KeyIndex(kind={self.kind!r}, groups={self.groups}, size={self.size})"

    # ------------------------------------------------------------------ adding keys
    def add(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> KeyIndex:
        """Append keys ``[batch, heads, m, d]`` (or ``[groups, m, d]``); their slots are ``len(self) ..``.
        ``queries`` (same layout, any count): training queries for ``kind="graph"`` (the prefill's queries of
        RetrievalAttention's attention-aware index); ignored by the other kinds."""
        x = self._as_groups(keys).detach().float()
        if queries is not None and self.kind == "graph":
            qx = self._as_groups(queries).detach().float()
            if qx.shape[1]:
                self._graph_queries.append(qx)
        if x.shape[1] == 0:
            return self
        bad = ~torch.isfinite(x).all(-1, keepdim=True)  # non-finite keys are skipped (module docstring)
        x = x.masked_fill(bad, float("nan"))
        if self.kind == "exact":
            self._keys = x if self._keys is None else torch.cat([self._keys, x], dim=1)
        elif self.kind == "ivf":
            self._add_ivf(x)
        elif self.kind == "graph":
            self._add_graph(x)
        else:
            self._add_faiss(x)
        self.size += x.shape[1]
        return self

    def _add_graph(self, x: torch.Tensor) -> None:
        if self._graph is not None:
            self._tail.append(x)
            if sum(t.shape[1] for t in self._tail) < self.tail_limit:
                return
            x = torch.cat([self._graph_keys, *self._tail], dim=1)
            self._tail = []
        self._graph_keys = x
        queries = torch.cat(self._graph_queries, dim=1) if self._graph_queries else None
        self._graph, self._entry = _projected_graph(x, queries, self.graph_degree, self.knn_edges)
        self._tail_start = x.shape[1]

    def _as_groups(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            raise ValueError("keys/queries must be tensors [batch, heads, n, dim] (or [groups, n, dim]), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        x = x.flatten(0, 1) if x.dim() == 4 else x
        if self.groups is None:
            self.groups, self.dim = x.shape[0], x.shape[-1]
        elif x.shape[0] != self.groups or x.shape[-1] != self.dim:
            raise ValueError(f"this index holds {self.groups} groups of dim {self.dim}; got groups={x.shape[0]}, "
                             f"dim={x.shape[-1]} (batch x heads must match the keys it was built on)")
        return x

    def _add_ivf(self, x: torch.Tensor) -> None:
        if self._centroids is None:
            n = x.shape[1]
            c = self.num_lists or max(1, min(n, int(2 * math.sqrt(n))))
            sample = x
            if n > 32 * c:  # k-means on a sample: 32 points per centroid are plenty
                g = torch.Generator().manual_seed(self.seed + 1)
                sample = x[:, torch.randperm(n, generator=g)[:32 * c].to(x.device)]
            # skipped (NaN) keys count as the origin for the centroids; their scores are -inf at search
            self._centroids = _kmeans(sample.nan_to_num(0.0), min(c, n), self.kmeans_iterations, self.seed)
            self._store_lists(x, torch.arange(n, device=x.device).expand(x.shape[0], n))
            self._tail_start = n
            return
        self._tail.append(x)
        if sum(t.shape[1] for t in self._tail) >= self.tail_limit:
            self._merge_tail()

    def _store_lists(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        assign = _nearest(x, self._centroids)
        order = assign.argsort(dim=1, stable=True)
        self._sorted = x.gather(1, order[..., None].expand_as(x))
        self._slots = slots.gather(1, order)
        self._lists = assign.gather(1, order)  # list of each sorted row
        counts = torch.zeros(assign.shape[0], self._centroids.shape[1] + 1, dtype=torch.long, device=x.device)
        counts[:, 1:].scatter_add_(1, assign, torch.ones_like(assign))
        self._offsets = counts.cumsum(1)

    def _merge_tail(self) -> None:
        tail = torch.cat(self._tail, dim=1)
        new_slots = torch.arange(self._tail_start, self._tail_start + tail.shape[1], device=tail.device)
        x = torch.cat([self._sorted, tail], dim=1)
        slots = torch.cat([self._slots, new_slots.expand(tail.shape[0], -1)], dim=1)
        self._store_lists(x, slots)
        self._tail, self._tail_start = [], self._tail_start + tail.shape[1]

    def _add_faiss(self, x: torch.Tensor) -> None:
        import faiss

        bad = torch.isnan(x[..., 0]).cpu()  # skipped keys: zero vectors in the graph, filtered at search
        self._skipped.append(bad)
        x = x.nan_to_num(0.0)

        if not self._faiss:
            self._max_norm = float(x.norm(dim=-1).max()) * self.max_norm_margin * (1 + 1e-6)
            for _ in range(x.shape[0]):
                if self.metric == "ip":
                    index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                else:
                    index = faiss.IndexHNSWFlat(self.dim + 1, self.hnsw_m)
                index.hnsw.efConstruction = self.ef_construction
                self._faiss.append(index)
                self._overflow.append([])
                self._overflow_slots.append([])
        if self.metric == "ip":
            xc = x.cpu()
            for g, index in enumerate(self._faiss):
                index.add(xc[g].contiguous().numpy())
            return
        norms = x.norm(dim=-1).cpu()
        base = self.size
        xc = x.cpu()
        for g, index in enumerate(self._faiss):
            fits = norms[g] <= self._max_norm
            if not bool(fits.all()):
                # Too long for the augmentation: scanned exactly from a side list. In the graph they are zero
                # vectors (faiss ids are insertion order, so ids stay equal to slots); search merges both.
                self._overflow[g].append(xc[g][~fits])
                self._overflow_slots[g].append(base + torch.nonzero(~fits).flatten())
            index.add(mips_augment(xc[g].masked_fill(~fits[:, None], 0.0), self._max_norm).numpy())

    # ------------------------------------------------------------------ searching
    def search(self, q: torch.Tensor, top_k: int) -> torch.Tensor:
        """Slots ``[batch, heads, m, top_k]`` (or ``[groups, m, top_k]``) of the top-k keys of each query
        ``q [batch, heads, m, d]`` by inner product (exact for ``kind="exact"``, candidates otherwise; ``-1``
        where the index holds fewer keys)."""
        check_positive_int("top_k", top_k)
        shape = q.shape
        x = self._as_groups(q).detach().float()
        if self.size == 0:
            out = torch.full((*x.shape[:2], top_k), -1, dtype=torch.long, device=q.device)
        elif self.kind == "exact":
            out = self._topk(x, self._keys, None, top_k)[1]
        elif self.kind == "ivf":
            out = self._search_ivf(x, top_k)
        elif self.kind == "graph":
            out = self._search_graph(x, top_k)
        else:
            out = self._search_faiss(x, top_k).to(q.device)
            skipped = torch.cat(self._skipped, dim=1)  # [G, size]: the group's key at that slot was non-finite
            if bool(skipped.any()):
                hit = skipped.to(out.device).gather(1, out.clamp_min(0).flatten(1)).view_as(out) & (out >= 0)
                out = out.masked_fill(hit, -1)
        return out.view(*shape[:-1], top_k) if len(shape) == 4 else out

    @staticmethod
    def _topk(x: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor | None, top_k: int,
              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of ``x [G, m, d]`` against ``keys [G, w, d]`` or ``[G, m, w, d]`` (``slots`` alike, else
        the key's position): ``(scores, slots) [G, m, top_k]``, padded with ``-inf`` / ``-1``."""
        if keys.dim() == 3:
            s = x @ keys.transpose(-1, -2)
        else:
            s = torch.einsum("gmd,gmwd->gmw", x, keys)
        s = s.nan_to_num(nan=float("-inf"))  # skipped keys (stored as NaN rows) and NaN queries
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))
        kk = min(top_k, s.shape[-1])
        top = s.topk(kk, dim=-1)
        idx = top.indices
        if slots is not None:
            idx = slots.gather(-1, idx) if slots.dim() == idx.dim() else slots.gather(1, idx.flatten(1)).view_as(idx)
        return _pad(top.values, idx.masked_fill(~torch.isfinite(top.values), -1), top_k)

    def _search_ivf(self, x: torch.Tensor, top_k: int) -> torch.Tensor:
        G, m, d = x.shape
        c = self._centroids
        probes = min(self.num_probes, c.shape[1])
        lists = (x @ c.transpose(-1, -2)).topk(probes, dim=-1).indices  # [G, m, P]
        lo = self._offsets.gather(1, lists.flatten(1)).view_as(lists)
        hi = self._offsets.gather(1, (lists + 1).flatten(1)).view_as(lists)
        sizes = hi - lo
        total = max(int(sizes.sum(-1).max()), 1)  # most keys any query scans
        n_sorted = self._sorted.shape[1]
        if m * total * 4 >= n_sorted:
            # Many queries, or probed lists covering much of the index: scoring every key with one matmul and
            # masking the lists not probed beats gathering (the gathered copy would be m x total x d); queries go
            # in sub-chunks so the [G, m, n] scores stay below 2^24 entries.
            step = max(1, (1 << 24) // max(G * n_sorted, 1))
            parts = []
            for a in range(0, m, step):
                xs, ls = x[:, a:a + step], lists[:, a:a + step]
                s_ = xs @ self._sorted.transpose(-1, -2)  # [G, mc, n]
                probed = torch.zeros(G, xs.shape[1], c.shape[1], dtype=torch.bool, device=x.device).scatter_(2, ls,
                                                                                                               True)
                keep = probed.gather(2, self._lists[:, None, :].expand(G, xs.shape[1], n_sorted))
                parts.append(_topk_scores(s_.nan_to_num(nan=float("-inf")).masked_fill_(~keep, float("-inf")),
                                          self._slots, top_k))
            scores, found = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
        else:
            scores, found = self._gathered(x, lo, sizes, total, top_k)
        if self._tail:
            tail = torch.cat(self._tail, dim=1)
            tail_slots = torch.arange(self._tail_start, self._tail_start + tail.shape[1], device=x.device)
            s2, f2 = self._topk(x, tail, tail_slots.expand(G, -1), top_k)
            scores, found = _merge(scores, found, s2, f2, top_k)
        return found

    def _search_graph(self, x: torch.Tensor, top_k: int) -> torch.Tensor:
        scores, found = _beam_search(x, self._graph_keys, self._graph, self._entry, top_k,
                                     max(self.ef_search, top_k))
        if self._tail:
            tail = torch.cat(self._tail, dim=1)
            tail_slots = torch.arange(self._tail_start, self._tail_start + tail.shape[1], device=x.device)
            s2, f2 = self._topk(x, tail, tail_slots.expand(x.shape[0], -1), top_k)
            scores, found = _merge(scores, found, s2, f2, top_k)
        return found

    def _gathered(self, x, lo, sizes, total, top_k):
        """Score the probed lists' keys, concatenated per query without padding lists to the longest one:
        entry t of query (g, i) is in probe p = #{cumulative sizes <= t}, at row lo_p + t - start_p."""
        G, m, d = x.shape
        ends = sizes.cumsum(-1)  # [G, m, P]
        t = torch.arange(total, device=x.device).expand(G, m, total).contiguous()
        p = torch.searchsorted(ends, t, right=True).clamp_max(sizes.shape[-1] - 1)
        valid = t < ends[..., -1:]
        pos = (lo.gather(-1, p) + t - (ends - sizes).gather(-1, p)).clamp(0, self._sorted.shape[1] - 1)
        rows = (pos.flatten(1) + torch.arange(G, device=x.device)[:, None] * self._sorted.shape[1]).flatten()
        cand = self._sorted.reshape(-1, d).index_select(0, rows).view(G, m, total, d)  # faster than gather
        slots = self._slots.gather(1, pos.flatten(1)).view(G, m, total)
        return self._topk(x, cand, slots, top_k, valid)

    def _search_faiss(self, x: torch.Tensor, top_k: int) -> torch.Tensor:
        import faiss

        xc = x.cpu().contiguous()
        xs = xc if self.metric == "ip" else torch.nn.functional.pad(xc, (0, 1))  # augmented queries [q, 0]
        G, m, _ = xs.shape
        # One output buffer for all groups, filled through faiss's C entry point (the Python wrapper's checks
        # and allocations cost more than a small HNSW search).
        dist = torch.empty(G, m, top_k, dtype=torch.float32)
        ids = torch.empty(G, m, top_k, dtype=torch.int64)
        ef = max(self.ef_search, top_k)
        for g, index in enumerate(self._faiss):
            if index.hnsw.efSearch != ef:
                index.hnsw.efSearch = ef
            index.search_c(m, faiss.swig_ptr(xs[g].numpy()), top_k, faiss.swig_ptr(dist[g].numpy()),
                           faiss.swig_ptr(ids[g].numpy()))
        if not any(self._overflow):
            return ids
        qq = xc.double().square().sum(-1, keepdim=True)
        out = []
        for g in range(G):
            found = ids[g]
            if self._overflow[g]:
                # |q' - k'|^2 = |q|^2 + M^2 - 2 q.k gives the inner products back; merge with the exact side list.
                scores = (qq[g] + self._max_norm ** 2 - dist[g].double()) / 2
                slots = torch.cat(self._overflow_slots[g])
                scores = scores.masked_fill((found < 0) | torch.isin(found, slots), float("-inf"))
                extra = torch.cat(self._overflow[g], dim=0)
                s2, f2 = self._topk(xc[g][None], extra[None], slots[None], top_k)
                _, found = _merge(scores[None].float(), found[None], s2, f2, top_k)
                found = found[0]
            out.append(found)
        return torch.stack(out)


def _top_ip(x: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices ``[G, m, k]`` of each row's ``k`` largest inner products with ``keys [G, n, d]``, by chunks of
    rows (the ``[G, chunk, n]`` scores only)."""
    k = min(k, keys.shape[1])
    return torch.cat([(x[:, a:a + chunk] @ keys.transpose(-1, -2)).topk(k, dim=-1).indices
                      for a in range(0, x.shape[1], chunk)], dim=1)


def _projected_graph(keys: torch.Tensor, queries: torch.Tensor | None, degree: int,
                     knn_edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-neighbours ``[G, n, degree]`` (``-1``: none) and entry keys ``[G, 1]`` of the ``"graph"`` index (see
    the module doc): the training queries' bipartite query -> nearest-keys graph projected onto keys (the
    nearest key of each query linked to the others, the most frequent links kept), plus ``knn_edges`` (all
    ``degree`` without queries) links from each key to its own nearest keys by inner product."""
    G, n, _ = keys.shape
    dev = keys.device
    own = knn_edges if queries is not None else degree
    parts = []
    if queries is not None and degree > knn_edges:
        width = degree - knn_edges
        near = _top_ip(queries, keys, degree + 1)  # [G, t, K]
        proj = torch.full((G, n, width), -1, dtype=torch.long, device=dev)
        if near.shape[-1] > 1:
            for g in range(G):
                src = near[g, :, :1].expand(-1, near.shape[-1] - 1).reshape(-1)
                dst = near[g, :, 1:].reshape(-1)
                pair, count = (src * n + dst).unique(return_counts=True)
                src, dst = pair // n, pair % n
                # by source, then most frequent first
                order = torch.argsort(src * (int(count.max()) + 1) + (int(count.max()) - count), stable=True)
                src, dst = src[order], dst[order]
                start = torch.zeros(n + 1, dtype=torch.long, device=dev)
                start[1:] = torch.bincount(src, minlength=n).cumsum(0)
                rank = torch.arange(src.numel(), device=dev) - start[src]
                keep = rank < width
                proj[g, src[keep], rank[keep]] = dst[keep]
        parts.append(proj)
    if own:
        # a key's nearest keys by Euclidean distance (inner-product neighbours would all be the few longest keys),
        # a quarter of them (at least one) replaced by long links that join clusters: the first along one seeded
        # random cycle through every key (so every key is reachable), the others to seeded random keys
        far = max(own // 4, 1)
        near_keys = own - far
        if near_keys and n > 1:
            sq = keys.square().sum(-1)
            parts.append(torch.cat([(2 * keys[:, a:a + 1024] @ keys.transpose(-1, -2) - sq[:, None, :])
                                    .topk(min(near_keys + 1, n), dim=-1).indices[..., 1:]
                                    for a in range(0, n, 1024)], dim=1))
        g = torch.Generator().manual_seed(n)
        cycle = torch.randperm(n, generator=g)
        succ = torch.empty(n, dtype=torch.long)
        succ[cycle] = cycle.roll(-1)
        parts.append(succ.to(dev).expand(G, n)[..., None])
        if far > 1:
            parts.append(torch.randint(0, n, (G, n, far - 1), generator=g).to(dev))
    graph = torch.cat(parts, dim=-1)
    if graph.shape[-1] < degree:
        graph = torch.nn.functional.pad(graph, (0, degree - graph.shape[-1]), value=-1)
    # one entry per neighbour: no repeats (a repeated key would fill two places of the search's beam), no self
    graph = graph.masked_fill(graph == torch.arange(n, device=dev)[None, :, None], -1).sort(-1).values
    graph = graph.masked_fill(torch.nn.functional.pad(graph[..., 1:] == graph[..., :-1], (1, 0)), -1)
    centre = (queries if queries is not None else keys).mean(1, keepdim=True)
    best = (centre @ keys.transpose(-1, -2)).argmax(-1)  # [G, 1]
    spread = torch.randperm(n, generator=torch.Generator().manual_seed(n + 1))[:15].to(dev)
    return graph, torch.cat([best, spread.expand(G, -1)], dim=-1)


def _beam_search(x: torch.Tensor, keys: torch.Tensor, graph: torch.Tensor, entry: torch.Tensor, top_k: int,
                 ef: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first search of every query ``x [G, m, d]`` on ``graph [G, n, M]`` from ``entry [G, E]``, keeping the
    ``ef`` best keys seen by ``q . k``, until every kept key is expanded: ``(scores, slots) [G, m, top_k]``."""
    G, m, d = x.shape
    n, M = graph.shape[1], graph.shape[2]
    ef = min(ef, n)
    flat_keys = keys.reshape(G * n, d)
    base = (torch.arange(G, device=x.device) * n)[:, None, None]
    ids = entry[:, None, :].expand(G, m, entry.shape[1]).contiguous()
    scores = torch.einsum("gmd,gmed->gme", x, flat_keys[(ids + base).flatten()].view(G, m, -1, d))
    # column n absorbs the -1 (no neighbour) entries
    visited = torch.zeros(G, m, n + 1, dtype=torch.bool, device=x.device).scatter_(2, ids, True)
    done = torch.zeros_like(ids, dtype=torch.bool)
    pad = ef - ids.shape[2]
    if pad > 0:
        ids = torch.nn.functional.pad(ids, (0, pad))
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        done = torch.nn.functional.pad(done, (0, pad), value=True)
    flat_graph = graph.reshape(G * n, M)
    for _ in range(4 * n + 4):  # each round expands one key per query: at most n rounds
        open_ = scores.masked_fill(done, float("-inf"))
        best = open_.argmax(-1, keepdim=True)
        active = torch.isfinite(open_.gather(-1, best))  # [G, m, 1]
        if not bool(active.any()):
            break
        done.scatter_(-1, best, True)
        node = ids.gather(-1, best)  # [G, m, 1]
        nb = flat_graph[(node + base).flatten()].view(G, m, M)
        nb = torch.where(nb >= 0, nb, n)
        valid = active & (nb < n) & ~visited.gather(2, nb)
        visited.scatter_(2, torch.where(valid, nb, n), True)
        nb = torch.where(valid, nb, 0)
        s = torch.einsum("gmd,gmed->gme", x, flat_keys[(nb + base).flatten()].view(G, m, M, d))
        s = s.masked_fill(~valid, float("-inf"))
        top = torch.cat([scores, s], -1).topk(ef, dim=-1)
        scores = top.values
        ids = torch.cat([ids, nb], -1).gather(-1, top.indices)
        done = torch.cat([done, ~valid], -1).gather(-1, top.indices) | ~torch.isfinite(scores)
    top = scores.topk(min(top_k, ef), dim=-1)
    found = ids.gather(-1, top.indices).masked_fill(~torch.isfinite(top.values), -1)
    return _pad(top.values, found, top_k)


def _pad(scores: torch.Tensor, idx: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    short = top_k - idx.shape[-1]
    if short <= 0:
        return scores, idx
    return (torch.nn.functional.pad(scores, (0, short), value=float("-inf")),
            torch.nn.functional.pad(idx, (0, short), value=-1))


def _topk_scores(s: torch.Tensor, slots: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of scores ``s [G, m, n]`` (``-inf``: excluded) -> scores and ``slots [G, n]`` entries (``-1``: none)."""
    top = s.topk(min(top_k, s.shape[-1]), dim=-1)
    idx = slots.gather(1, top.indices.flatten(1)).view_as(top.indices)
    return _pad(top.values, idx.masked_fill(~torch.isfinite(top.values), -1), top_k)


def _merge(s1, i1, s2, i2, top_k):
    """Top-k of two candidate lists (scores, slots) over disjoint keys."""
    s, i = torch.cat([s1, s2], dim=-1), torch.cat([i1, i2], dim=-1)
    top = s.topk(min(top_k, s.shape[-1]), dim=-1)
    return _pad(top.values, i.gather(-1, top.indices).masked_fill(~torch.isfinite(top.values), -1), top_k)
