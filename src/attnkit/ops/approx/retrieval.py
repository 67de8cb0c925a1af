"""Attention over retrieved keys: IceFormer, RetrievalAttention and SEA, on the shared key index
(:class:`~attnkit.ops.approx.knn.KeyIndex`), plus :class:`RetrievalDecoder`, their incremental decode step.

- IceFormer (Mazaheri et al., "IceFormer: Accelerated Inference with Long-Sequence Transformers on CPUs",
  ICLR 2024): each query attends to its top-k keys by ``q . k`` found by a k-nearest-neighbour search (MIPS
  reduced to nearest neighbours, :func:`~attnkit.ops.approx.knn.mips_augment`); the other keys get weight 0::

      S_i = top_k_{j visible} q_i . k_j,     out_i = softmax_{j in S_i}(q_i . k_j s) v_j

- RetrievalAttention (Liu et al., "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector
  Retrieval", 2024): a static set (the first ``num_sink`` keys and the last ``window`` keys) is attended
  exactly; the top-k of the other keys are retrieved from the index; the two partial softmaxes merge by
  log-sum-exp (``L = log(e^L1 + e^L2)``, ``o = e^(L1-L) o1 + e^(L2-L) o2``), which equals one softmax over the
  union of the two disjoint sets.
- SEA (Lee et al., "SEA: Sparse Linear Attention with Estimated Attention Mask", ICLR 2024): a linear-attention
  estimate of the attention compressed along the key axis (``num_blocks`` contiguous blocks; the mass of block
  c is estimated as ``phi(q_i) . sum_{j in c} phi(k_j)`` with positive random features ``phi`` of the softmax
  kernel, FAVOR+), the ``top_k`` blocks per query interpolated to a mask over their keys, then exact sparse
  softmax on that mask. The paper distils a trained estimator from the teacher's attention: :class:`SEAEstimator`
  (learned features and a small CNN decoder) and :func:`sea_distillation_step` (KL to the teacher's
  block-compressed attention); without one, the random-feature estimate of ``exp(q . k)`` is the untrained
  stand-in. Causal: a query's own block is
  always attended (its keys ``j <= i``); the top-k blocks are chosen among complete earlier blocks.

With ``top_k`` covering every visible key each method is exact softmax attention. ``index``: ``"exact"`` (score
every key, O(n n_k d): the reference selection), ``"ivf"``, ``"faiss"``, ``"graph"`` (RetrievalAttention's
attention-aware index, trained on the queries: the call's own queries, or the prompt's through
``RetrievalDecoder.prefill(k, v, q)``) or ``"auto"`` (see ``knn``); the
approximate indexes propose candidates that are re-ranked by exact ``q . k``. Causal prefill with an index adds
keys chunk by chunk (as decoding does) and scores the chunk's own keys exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnkit.ops.approx._common import (
    causal_mask,
    check_positive_int,
    masked_attention_lse,
    merge_lse,
    prepare,
    propagate_nonfinite,
    segment_ids,
    upcast,
)
from attnkit.ops.approx.knn import INDEX_KINDS, KeyIndex

__all__ = [
    "attend_selected", "select_topk",
    "iceformer_attention", "iceformer_reference",
    "retrieval_attention", "retrieval_reference",
    "sea_attention", "sea_reference", "sea_block_estimate", "SEAEstimator", "sea_teacher_blocks",
    "sea_distillation_loss", "sea_distillation_step",
    "RetrievalDecoder",
]

Allowed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [b, h, n, d]`` at ``idx [b, h, c, w]`` -> ``[b, h, c, w, d]`` (out-of-range ids are clamped:
    mask them)."""
    b, h, n, d = x.shape
    flat = idx.clamp(0, n - 1).flatten(2)
    if x.is_contiguous() and idx.shape[:2] == (b, h):  # one index_select over [b h n, d] (faster than gather)
        flat = flat + torch.arange(b * h, device=x.device).view(b, h, 1) * n
        return x.view(b * h * n, d).index_select(0, flat.flatten()).view(*idx.shape, d)
    return x.gather(2, flat[..., None].expand(-1, -1, -1, d)).unflatten(2, idx.shape[2:])


def attend_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query over its own selected keys: ``q [b, h, c, d]``, ``k, v [b, h, n_k, .]``,
    ``idx, valid [b, h, c, w]`` -> ``out [b, h, c, dv]``, ``lse [b, h, c]`` (no valid key: 0 and -inf).
    Memory O(c w d): the shared last step of IceFormer, RetrievalAttention, SEA and Loki."""
    kc, vc = _gather(k, idx), _gather(v, idx)
    # masked entries hold clamped (arbitrary) rows: zero them, so that a NaN there (a future key's value) cannot
    # reach the output as 0 * NaN
    vc = vc.masked_fill(~valid[..., None], 0.0)
    s = torch.einsum("bhcd,bhcwd->bhcw", q, kc) * scale
    o, lse = masked_attention_lse(s.unsqueeze(-2), vc, valid.unsqueeze(-2))
    return o.squeeze(-2), lse.squeeze(-1)


def _attend_chunks(q, k, v, idx, valid, scale, chunk_size):
    """:func:`attend_selected` over chunks of queries: the gathered keys/values stay O(chunk w d)."""
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk_size):
        sl = slice(start, start + chunk_size)
        o, lse = attend_selected(q[:, :, sl], k, v, idx[:, :, sl], valid[:, :, sl], scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _check_index(index: str) -> None:
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")


def select_topk(q: torch.Tensor, k: torch.Tensor, top_k: int, *, allowed: Allowed = None, causal: bool = False,
                index: str = "exact", chunk_size: int = 256, extra: int = 0, index_params: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``top_k`` keys by ``q . k`` among those ``allowed(i [c, 1], j [.., c, w]) -> bool`` permits
    (None: all; ``causal`` adds ``j <= i``): ``idx, valid [b, h, n, top_k]``. ``q [b, h, n, d]``, ``k [b, h, n_k,
    d]`` (heads matched). ``index="exact"`` scores every key; other kinds take ``top_k + extra`` candidates from a
    :class:`KeyIndex` and re-rank them exactly (``extra``: room for candidates ``allowed`` will reject)."""
    _check_index(index)
    n, nk = q.shape[2], k.shape[2]
    dev = q.device

    def ok(i, j):
        keep = (j >= 0) & (j < nk)
        if causal:
            keep = keep & (j <= i)
        if allowed is not None:
            keep = keep & allowed(i, j)
        return keep

    kk = min(top_k, nk)
    qs, ks = upcast(q.detach()), upcast(k.detach())
    idxs, valids = [], []
    if index == "exact":
        j = torch.arange(nk, device=dev)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            i = torch.arange(start, stop, device=dev)[:, None]
            s = (qs[:, :, start:stop] @ ks.transpose(-1, -2)).masked_fill(~ok(i, j), float("-inf"))
            top = s.topk(kk, dim=-1)
            idxs.append(top.indices)
            valids.append(torch.isfinite(top.values))
        return torch.cat(idxs, dim=2), torch.cat(valids, dim=2)
    ix = KeyIndex(index, **(index_params or {}))
    if not causal:
        ix.add(k, queries=q)  # the queries train the attention-aware index (kind "graph"); others ignore them
    added = 0
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        i = torch.arange(start, stop, device=dev)[:, None]
        if causal:  # the index holds the keys before the chunk; the chunk's own keys are scored exactly
            if min(start, nk) > added:
                ix.add(k[:, :, added:min(start, nk)], queries=q[:, :, added:min(start, nk)])
                added = min(start, nk)
            cand = ix.search(q[:, :, start:stop], kk + extra) if added else None
            own = torch.arange(added, min(stop, nk), device=dev).expand(*q.shape[:2], stop - start, -1)
            cand = own if cand is None else torch.cat([cand, own], dim=-1)
        else:
            cand = ix.search(q[:, :, start:stop], kk + extra)
        s = torch.einsum("bhcd,bhcwd->bhcw", qs[:, :, start:stop], _gather(ks, cand))
        s = s.masked_fill(~ok(i, cand), float("-inf"))
        top = s.topk(min(kk, s.shape[-1]), dim=-1)
        idx, valid = cand.gather(-1, top.indices), torch.isfinite(top.values)
        if idx.shape[-1] < kk:
            pad = kk - idx.shape[-1]
            idx = torch.nn.functional.pad(idx, (0, pad), value=0)
            valid = torch.nn.functional.pad(valid, (0, pad), value=False)
        idxs.append(idx)
        valids.append(valid)
    return torch.cat(idxs, dim=2), torch.cat(valids, dim=2)


def _dense_topk_mask(q: torch.Tensor, k: torch.Tensor, top_k: int, allowed: torch.Tensor) -> torch.Tensor:
    """Reference selection: ``[b, h, n, n_k]`` mask of each row's top-k allowed keys by ``q . k``."""
    s = (upcast(q) @ upcast(k).transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    top = s.topk(min(top_k, k.shape[2]), dim=-1)
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top.indices, True)
    return mask & allowed


def _masked_reference(q, k, v, mask, scale, return_attention):
    s = q.double() @ k.double().transpose(-1, -2) * scale
    out, _ = masked_attention_lse(s, v.double(), mask)
    if not return_attention:
        return out.to(q.dtype)
    return out.to(q.dtype), torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)


def _visible(n: int, nk: int, causal: bool, device: torch.device) -> torch.Tensor:
    return causal_mask(n, nk, device) if causal else torch.ones(n, nk, dtype=torch.bool, device=device)


# ---------------------------------------------------------------------------------------------- IceFormer
def iceformer_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int = 64,
                        causal: bool = False, index: str = "exact", chunk_size: int = 256,
                        index_params: dict | None = None, scale: float | None = None,
                        return_attention: bool = False):
    """Plain reference: the dense mask of each row's exact top-k visible keys, masked softmax in float64."""
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("top_k", top_k)
    _check_index(index)
    mask = _dense_topk_mask(q, k, top_k, _visible(q.shape[2], k.shape[2], causal, q.device))
    return _masked_reference(q, k, v, mask, scale, return_attention)


def iceformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int = 64,
                        causal: bool = False, index: str = "exact", chunk_size: int = 256,
                        index_params: dict | None = None, scale: float | None = None) -> torch.Tensor:
    """IceFormer attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` ->
    ``[b, h, n, dv]``: softmax over each query's ``top_k`` keys by ``q . k`` (found by ``index``)."""
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("top_k", top_k)
    check_positive_int("chunk_size", chunk_size)
    idx, valid = select_topk(q, k, top_k, causal=causal, index=index, chunk_size=chunk_size,
                             index_params=index_params)
    out = _attend_chunks(q, k, v, idx, valid, scale, chunk_size)[0]
    return propagate_nonfinite(out, q, k, v, causal)  # as dense attention (a NaN key is never retrieved)


# ------------------------------------------------------------------------------------- RetrievalAttention
def _static_positions(start: int, stop: int, nk: int, num_sink: int, window: int, causal: bool,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The static keys of queries ``start..stop-1``: ``idx, valid [c, num_sink + window]`` (sinks, then the
    window; a window key that is also a sink is dropped)."""
    c = stop - start
    sink = torch.arange(num_sink, device=device).expand(c, -1)
    i = torch.arange(start, stop, device=device)[:, None]
    last = i if causal else torch.full_like(i, nk - 1)
    win = last - window + 1 + torch.arange(window, device=device)  # [c, window]
    idx = torch.cat([sink, win], dim=-1)
    valid = torch.cat([sink < nk, (win >= num_sink) & (win >= 0)], dim=-1) & (idx < nk)
    if causal:
        valid = valid & (idx <= i)
    return idx.clamp(0, max(nk - 1, 0)), valid


def _is_static(num_sink: int, window: int, nk: int, causal: bool):
    def static(i, j):
        last = i if causal else nk - 1
        return (j < num_sink) | ((j > last - window) & (j <= last))
    return static


def _check_retrieval(top_k, num_sink, window):
    check_positive_int("top_k", top_k)
    check_positive_int("num_sink", num_sink, minimum=0)
    check_positive_int("window", window, minimum=0)


def retrieval_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int = 64, num_sink: int = 4,
                        window: int = 64, causal: bool = False, index: str = "exact", chunk_size: int = 256,
                        index_params: dict | None = None, scale: float | None = None,
                        return_attention: bool = False):
    """Plain reference: dense mask = static set (sinks + window) united with the exact top-k of the other
    visible keys; one masked softmax in float64 (no merge)."""
    k, v, scale = prepare(q, k, v, scale)
    _check_retrieval(top_k, num_sink, window)
    _check_index(index)
    n, nk = q.shape[2], k.shape[2]
    visible = _visible(n, nk, causal, q.device)
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    static = _is_static(num_sink, window, nk, causal)(i, j) & visible
    mask = _dense_topk_mask(q, k, top_k, visible & ~static) | static
    return _masked_reference(q, k, v, mask, scale, return_attention)


def retrieval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int = 64, num_sink: int = 4,
                        window: int = 64, causal: bool = False, index: str = "exact", chunk_size: int = 256,
                        index_params: dict | None = None, scale: float | None = None) -> torch.Tensor:
    """RetrievalAttention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``:
    exact attention over the static set (first ``num_sink`` keys, last ``window`` keys: ``i - window < j <= i``
    when causal, the cache's last ``window`` otherwise), merged by log-sum-exp with attention over the ``top_k``
    other keys retrieved through ``index``."""
    k, v, scale = prepare(q, k, v, scale)
    _check_retrieval(top_k, num_sink, window)
    check_positive_int("chunk_size", chunk_size)
    b, h, n, _ = q.shape
    nk = k.shape[2]
    static = _is_static(num_sink, window, nk, causal)
    idx, valid = select_topk(q, k, top_k, allowed=lambda i, j: ~static(i, j), causal=causal, index=index,
                             chunk_size=chunk_size, extra=num_sink + window,
                             index_params=index_params)
    o1, lse1 = _attend_chunks(q, k, v, idx, valid, scale, chunk_size)
    outs = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sidx, svalid = _static_positions(start, stop, nk, num_sink, window, causal, q.device)
        o2, lse2 = attend_selected(q[:, :, start:stop], k, v, sidx.expand(b, h, -1, -1),
                                   svalid.expand(b, h, -1, -1), scale)
        outs.append(merge_lse(o1[:, :, start:stop], lse1[:, :, start:stop], o2, lse2)[0])
    return propagate_nonfinite(torch.cat(outs, dim=2).to(v.dtype), q, k, v, causal)  # as dense attention


# -------------------------------------------------------------------------------------------------- SEA
def _sea_block_logits(q: torch.Tensor, k: torch.Tensor, num_blocks: int, w: torch.Tensor) -> torch.Tensor:
    """``log(phi(q_i) . sum_{j in block c} phi(k_j))`` up to a per-row constant, ``[b, h, n, num_blocks]``, with
    positive features ``phi(x) = exp(w . x' - |x'|^2 / 2)``, ``x' = x d^-1/4``, ``w [d, m]`` (differentiable in
    ``w``; ``q`` and ``k`` as given)."""
    d = q.shape[-1]
    nk = k.shape[2]
    qs, ks = q.to(w.dtype) * d ** -0.25, k.to(w.dtype) * d ** -0.25
    aq = qs @ w - qs.square().sum(-1, keepdim=True) / 2  # [b, h, n, m]
    ak = ks @ w - ks.square().sum(-1, keepdim=True) / 2  # [b, h, n_k, m]
    # Shifts keep exp() finite: per query row (the ranking within a row ignores it) and per key block (added
    # back in log space), so a block's estimate depends on its own keys only (causal: no future key enters).
    pq = torch.exp(aq - aq.amax(-1, keepdim=True).detach())
    seg = segment_ids(nk, num_blocks, k.device)
    bmax = torch.full((*ak.shape[:2], num_blocks), float("-inf"), dtype=w.dtype, device=k.device)
    bmax = bmax.scatter_reduce(2, seg.expand(*ak.shape[:2], -1), ak.amax(-1).detach(), "amax")
    pk = torch.exp(ak - bmax.gather(2, seg.expand(*ak.shape[:2], -1))[..., None])
    sums = torch.zeros(*pk.shape[:2], num_blocks, w.shape[1], dtype=w.dtype, device=k.device).index_add(2, seg, pk)
    return torch.log((pq @ sums.transpose(-1, -2)).clamp_min(torch.finfo(w.dtype).tiny)) + bmax[..., None, :]


def sea_block_estimate(q: torch.Tensor, k: torch.Tensor, num_blocks: int, *, num_features: int = 64,
                       seed: int = 0) -> torch.Tensor:
    """SEA's compressed attention estimate, untrained: ``[b, h, n, num_blocks]`` log of ``phi(q_i) . sum_{j in
    block c} phi(k_j)`` up to a per-row constant (ranking within a row is what the selection uses), with
    FAVOR+ positive random features ``phi(x) = exp(w . x' - |x'|^2 / 2)`` of ``x' = x d^-1/4`` (``num_features``
    Gaussian ``w`` fixed by ``seed``). ``q [b, h, n, d]``, ``k [b, h, n_k, d]``. The trained estimator is
    :class:`SEAEstimator`."""
    from attnkit.ops.approx._common import randn

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    w = randn((q.shape[-1], num_features), seed, q, dtype=acc)
    return _sea_block_logits(q.detach(), k.detach(), num_blocks, w)


class SEAEstimator(torch.nn.Module):
    """SEA's trainable estimator of the compressed attention (Lee et al., "SEA: Sparse Linear Attention with
    Estimated Attention Mask", ICLR 2024, Sec. 3.1): kernel-based linear attention gives, per query, one logit per
    key block (``log phi(q_i) . sum_{j in c} phi(k_j)``, the block-compressed attention), and a small CNN decoder
    refines the row of block logits. Both are learned by distillation from the teacher's attention
    (:func:`sea_distillation_step`); :func:`sea_attention` then takes each row's top-k blocks of this estimate.

    ``phi(x) = exp(x' W - |x'|^2 / 2)``, ``x' = x d^-1/4``, ``W [head_dim, num_features]`` learnable, initialised
    with the FAVOR+ Gaussian draws of ``seed`` (so before training it is the untrained estimate
    :func:`sea_block_estimate`); the decoder is a residual 1-D convolution over the block axis, padded on the left
    (block c sees blocks <= c: a causal query's candidate blocks never see later keys), initialised to zero.
    Deviations from the paper: one feature map shared by the heads, and a one-layer decoder over block logits
    (the paper's decoder is a deeper CNN over the estimated compressed attention matrix).
    ``forward(q, k, num_blocks) -> [b, h, n, num_blocks]`` block logits (the row's softmax is the estimate)."""

    def __init__(self, head_dim: int, num_features: int = 64, *, kernel_size: int = 3, seed: int = 0):
        super().__init__()
        check_positive_int("head_dim", head_dim)
        check_positive_int("num_features", num_features)
        check_positive_int("kernel_size", kernel_size)
        g = torch.Generator().manual_seed(int(seed))
        self.proj = torch.nn.Parameter(torch.randn(head_dim, num_features, generator=g, dtype=torch.float64)
                                       .float())
        self.decoder = torch.nn.Conv1d(1, 1, kernel_size)
        torch.nn.init.zeros_(self.decoder.weight)
        torch.nn.init.zeros_(self.decoder.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, num_blocks: int) -> torch.Tensor:
        if q.shape[-1] != self.proj.shape[0]:
            raise ValueError(f"SEAEstimator was built for head_dim={self.proj.shape[0]}, got q of dim {q.shape[-1]}")
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        logits = _sea_block_logits(q.detach(), k.detach(), num_blocks, self.proj.to(acc))
        lead = logits.shape[:-1]
        flat = logits.reshape(-1, 1, num_blocks)
        pad = torch.nn.functional.pad(flat, (self.decoder.kernel_size[0] - 1, 0), mode="replicate")
        refined = torch.nn.functional.conv1d(pad, self.decoder.weight.to(acc), self.decoder.bias.to(acc))
        return (flat + refined).reshape(*lead, num_blocks)


def _sea_visible_blocks(n: int, nk: int, num_blocks: int, causal: bool, device) -> torch.Tensor | None:
    """``[n, num_blocks]``: the blocks a query may select (causal: complete earlier blocks); None: all."""
    if not causal:
        return None
    seg = segment_ids(nk, num_blocks, device)
    own = seg[torch.arange(n, device=device).clamp_max(nk - 1)]  # block of query i's position
    own = torch.where(torch.arange(n, device=device) < nk, own, torch.full_like(own, num_blocks))
    return torch.arange(num_blocks, device=device)[None, :] < own[:, None]


def sea_teacher_blocks(q: torch.Tensor, k: torch.Tensor, num_blocks: int, *, causal: bool = False,
                       scale: float | None = None) -> torch.Tensor:
    """The teacher's compressed attention: softmax attention ``[b, h, n, n_k]`` (causal: over ``j <= i``) summed
    over each of ``num_blocks`` key blocks, ``[b, h, n, num_blocks]``; float64 or float32, no gradient."""
    k, _, scale = prepare(q, k, k, scale)
    num_blocks = min(num_blocks, k.shape[2])
    with torch.no_grad():
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        seg = segment_ids(k.shape[2], num_blocks, q.device)
        return torch.zeros(*p.shape[:3], num_blocks, dtype=acc, device=q.device).index_add(3, seg, p)


def sea_distillation_loss(estimator: SEAEstimator, q: torch.Tensor, k: torch.Tensor, *, num_blocks: int,
                          causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``KL(teacher || estimate)`` of each query's distribution over key blocks, averaged over queries: the
    teacher's compressed attention (:func:`sea_teacher_blocks`) against the softmax of the estimator's block
    logits, both over the blocks the query may select (causal: complete earlier blocks, the teacher
    renormalised over them; queries with none are left out). SEA's attention-distillation term."""
    k, _, _ = prepare(q, k, k, scale)
    num_blocks = _check_sea(q, k, num_blocks, 1, 1)
    teacher = sea_teacher_blocks(q, k, num_blocks, causal=causal, scale=scale)
    logits = estimator(q, k, num_blocks).to(teacher.dtype)
    visible = _sea_visible_blocks(q.shape[2], k.shape[2], num_blocks, causal, q.device)
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
        teacher = teacher * visible
        teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(torch.finfo(teacher.dtype).tiny)
    logp = torch.log_softmax(logits, dim=-1)
    terms = torch.where(teacher > 0, teacher * (torch.log(teacher.clamp_min(torch.finfo(teacher.dtype).tiny))
                                                - logp), torch.zeros((), dtype=teacher.dtype, device=q.device))
    rows = terms.sum(-1)
    if visible is not None:
        rows = rows[..., visible.any(-1)]
    return rows.mean()


def sea_distillation_step(estimator: SEAEstimator, optimizer: torch.optim.Optimizer, q: torch.Tensor,
                          k: torch.Tensor, *, num_blocks: int, causal: bool = False,
                          scale: float | None = None) -> float:
    """One training step of SEA's estimator on a batch of the teacher's queries and keys ``q [b, h, n, d]``,
    ``k [b, h_kv, n_k, d]``: :func:`sea_distillation_loss`, backward, ``optimizer.step()``. Returns the loss.
    (The paper also distils the layer's output and keeps the task loss; with the teacher's own q, k, v the
    sparse attention on the selected blocks is exact, so the mask estimate is the part to learn.)"""
    optimizer.zero_grad()
    loss = sea_distillation_loss(estimator, q, k, num_blocks=num_blocks, causal=causal, scale=scale)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _sea_blocks(q, k, num_blocks, top_k, causal, num_features, seed, estimator=None):
    """Selected blocks ``[b, h, n, top_k]`` (+ validity) from the estimate (``estimator``'s when given, else the
    untrained random-feature one); causal: among complete earlier blocks (the own block is added by the
    caller)."""
    n, nk = q.shape[2], k.shape[2]
    if estimator is None:
        est = sea_block_estimate(q, k, num_blocks, num_features=num_features, seed=seed)
    else:
        with torch.no_grad():
            est = estimator(q, k, num_blocks)
    earlier = _sea_visible_blocks(n, nk, num_blocks, causal, q.device)
    if earlier is not None:
        est = est.masked_fill(~earlier, float("-inf"))
    top = est.topk(min(top_k, num_blocks), dim=-1)
    return top.indices, torch.isfinite(top.values)


def _check_sea(q, k, num_blocks, top_k, num_features) -> int:
    check_positive_int("num_blocks", num_blocks)
    check_positive_int("top_k", top_k)
    check_positive_int("num_features", num_features)
    return min(num_blocks, k.shape[2])  # more blocks than keys: one key per block


def sea_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_blocks: int = 64, top_k: int = 8,
                  num_features: int = 64, causal: bool = False, seed: int = 0, chunk_size: int = 256,
                  scale: float | None = None, return_attention: bool = False,
                  estimator: SEAEstimator | None = None):
    """Plain reference: the selected blocks interpolated to a dense ``[b, h, n, n_k]`` mask (plus the own block
    when causal, intersected with ``j <= i``); masked softmax in float64."""
    k, v, scale = prepare(q, k, v, scale)
    num_blocks = _check_sea(q, k, num_blocks, top_k, num_features)
    n, nk = q.shape[2], k.shape[2]
    blocks, ok = _sea_blocks(q, k, num_blocks, top_k, causal, num_features, seed, estimator)
    chosen = torch.zeros(*blocks.shape[:3], num_blocks + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(ok, blocks, num_blocks), True)
    seg = segment_ids(nk, num_blocks, q.device)
    mask = chosen[..., :num_blocks].gather(-1, seg.expand(*blocks.shape[:3], -1))
    if causal:
        own = seg[torch.arange(n, device=q.device).clamp_max(nk - 1)]
        mask = (mask | (seg[None, :] == own[:, None])) & causal_mask(n, nk, q.device)
    return _masked_reference(q, k, v, mask, scale, return_attention)


def sea_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_blocks: int = 64, top_k: int = 8,
                  num_features: int = 64, causal: bool = False, seed: int = 0, chunk_size: int = 256,
                  scale: float | None = None, estimator: SEAEstimator | None = None) -> torch.Tensor:
    """SEA attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]`` -> ``[b, h, n, dv]``:
    keys cut into ``num_blocks`` blocks, each query's ``top_k`` blocks by the estimate (a trained
    :class:`SEAEstimator` when given, else the untrained random-feature one of ``num_features``, ``seed``),
    exact softmax over their keys (and its own block's ``j <= i`` when causal).
    Time O(n (num_blocks m + top_k n_k / num_blocks d))."""
    k, v, scale = prepare(q, k, v, scale)
    num_blocks = _check_sea(q, k, num_blocks, top_k, num_features)
    check_positive_int("chunk_size", chunk_size)
    b, h, n, _ = q.shape
    nk = k.shape[2]
    dev = q.device
    blocks, ok = _sea_blocks(q, k, num_blocks, top_k, causal, num_features, seed, estimator)
    # Block c holds the positions j with floor(j C / n_k) = c: ceil(c n_k / C) .. ceil((c + 1) n_k / C) - 1.
    starts = torch.div(torch.arange(num_blocks + 1, device=dev) * nk + num_blocks - 1, num_blocks,
                       rounding_mode="floor")
    width = int((starts[1:] - starts[:-1]).max())
    if causal:
        seg = segment_ids(nk, num_blocks, dev)
        own = seg[torch.arange(n, device=dev).clamp_max(nk - 1)].expand(b, h, n)[..., None]
        blocks = torch.cat([blocks, own], dim=-1)
        ok = torch.cat([ok, (torch.arange(n, device=dev) < nk).expand(b, h, n)[..., None]], dim=-1)
    out = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        bl, okc = blocks[:, :, start:stop], ok[:, :, start:stop]
        lo, hi = starts[bl], starts[bl + 1]
        idx = lo[..., None] + torch.arange(width, device=dev)  # [b, h, c, t, width]
        valid = okc[..., None] & (idx < hi[..., None])
        if causal:
            valid = valid & (idx <= torch.arange(start, stop, device=dev)[:, None, None])
        out.append(attend_selected(q[:, :, start:stop], k, v, idx.flatten(-2), valid.flatten(-2), scale)[0])
    return propagate_nonfinite(torch.cat(out, dim=2), q, k, v, causal)  # as dense attention


# ---------------------------------------------------------------------------------------------- decoding
class RetrievalDecoder:
    """Incremental decoding with IceFormer, RetrievalAttention or Loki over a growing KV cache and a
    :class:`KeyIndex`.

    ``prefill(k, v)`` stores the prompt's keys/values ``[batch, heads, n, d]`` and builds the index (the build
    time is the caller's to measure); ``step(q, k, v)`` appends one token's key/value ``[batch, heads, 1, d]``
    (optional) and returns the attention of ``q [batch, heads, 1, d]`` (or several queries, all placed after
    every cached key) ``[batch, heads, m, dv]``. IceFormer (``method="iceformer"``) indexes every key;
    RetrievalAttention (``method="retrieval"``) keeps the first ``num_sink`` and last ``window`` keys out of
    the index (attended exactly), and a key enters the index when it leaves the window. Loki
    (``method="loki"``) reuses the same selection in its low-rank key space: the index holds ``k P_r`` (``basis
    [heads, d, d]`` or ``[batch, heads, d, d]`` orthogonal, calibrated offline, e.g. ``pca_basis``; ``rank`` r
    leading columns) and is searched with ``q P_r``; attention then runs in full dimension over the retrieved
    keys (a step equals row i of ``loki_attention(causal=True)`` with ``index="exact"``). Every index ranks its
    candidates by the exact inner product of what it holds. Heads must match (expand GQA k/v first).
    ``index_params`` go to :class:`KeyIndex` (e.g. ``ef_search``, ``num_probes``).
    """

    def __init__(self, method: str = "iceformer", *, top_k: int = 64, num_sink: int = 4, window: int = 64,
                 index: str = "auto", scale: float | None = None, basis: torch.Tensor | None = None,
                 rank: int | None = None, **index_params):
        if method not in ("iceformer", "retrieval", "loki"):
            raise ValueError(f"method must be 'iceformer', 'retrieval' or 'loki', got {method!r}")
        _check_retrieval(top_k, num_sink, window)
        if method == "loki":
            if not isinstance(basis, torch.Tensor) or basis.dim() not in (3, 4) or basis.shape[-1] != basis.shape[-2]:
                raise ValueError("method='loki' needs basis= ([heads, d, d] or [batch, heads, d, d], orthogonal, "
                                 "e.g. attnkit.ops.approx.pca_basis(calibration_keys))")
            rank = basis.shape[-1] if rank is None else check_positive_int("rank", rank)
            self._proj = basis[..., :rank]
        else:
            self._proj = None
        self.method, self.top_k, self.scale = method, top_k, scale
        self.num_sink, self.window = (num_sink, window) if method == "retrieval" else (0, 0)
        self.index = KeyIndex(index, **index_params)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self._indexed = 0  # keys num_sink .. num_sink + _indexed - 1 are in the index
        self._train_queries: torch.Tensor | None = None  # prefill queries for the next index add (kind "graph")
        self._row_base = None  # (capacity, [b, h, 1, 1] offsets of each head's rows in the flat cache)
        # [b, h]: a non-finite key or value was appended (the index skips it): later outputs are NaN, as in dense
        # attention, instead of finite outputs computed as if it were absent
        self._nonfinite: torch.Tensor | None = None

    def _reserve(self, extra: int) -> None:
        need = self.length + extra
        if need > self.k.shape[2]:  # grow by doubling: amortised O(1) per appended token
            cap = max(need, 2 * self.k.shape[2])
            grow = lambda t: torch.cat([t, t.new_empty(*t.shape[:2], cap - t.shape[2], t.shape[3])], dim=2)  # noqa: E731
            self.k, self.v = grow(self.k), grow(self.v)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append keys/values ``[batch, heads, m, d]`` to the cache and move keys leaving the static set into
        the index."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k, v must be [batch, heads, m, dim] with equal leading dims, got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        if self.k is None:
            self.k, self.v = k.new_empty(*k.shape[:2], 0, k.shape[3]), v.new_empty(*v.shape[:2], 0, v.shape[3])
        elif k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
            raise ValueError(f"k is {tuple(k.shape)} but the cache holds [batch, heads, ., dim] = "
                             f"{tuple(self.k.shape[:2])}, {self.k.shape[3]}")
        m = k.shape[2]
        bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)).all(-1)
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        self._reserve(m)
        self.k[:, :, self.length:self.length + m] = k
        self.v[:, :, self.length:self.length + m] = v
        self.length += m
        target = max(self.length - self.window - self.num_sink, 0)
        if target > self._indexed:
            lo = self.num_sink + self._indexed
            queries, self._train_queries = self._train_queries, None
            self.index.add(self._project(self.k[:, :, lo:self.num_sink + target]),
                           queries=None if queries is None else self._project(queries))
            self._indexed = target

    def prefill(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> RetrievalDecoder:
        """Store the prompt's keys/values ``[batch, heads, n, d]``. ``q``: the prompt's queries, which train
        RetrievalAttention's attention-aware index (``index="graph"``: built from the queries' nearest keys, not
        from the keys alone); the other index kinds ignore them."""
        self._train_queries = q
        self.append(k, v)
        return self

    def retrieve(self, q: torch.Tensor) -> torch.Tensor:
        """Cache positions ``[batch, heads, m, top_k]`` (``-1``: none) of the keys each query ``q [batch, heads,
        m, d]`` retrieves from the index (the static set not included)."""
        if not self._indexed:
            return torch.full((*q.shape[:3], self.top_k), -1, dtype=torch.long, device=q.device)
        slots = self.index.search(self._project(q), min(self.top_k, self._indexed))
        # index slots are positions after the sinks; every backend ranks its candidates by the exact q . k
        return torch.where(slots >= 0, slots + self.num_sink, slots) if self.num_sink else slots

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Loki's low-rank key space ``x P_r`` (identity for the other methods)."""
        return x if self._proj is None else x @ self._proj.to(x.dtype)

    def static_positions(self) -> torch.Tensor:
        """Cache positions of the static set (RetrievalAttention; empty for IceFormer)."""
        dev = self.k.device if self.k is not None else None
        if self.method != "retrieval" or self.k is None:
            return torch.empty(0, dtype=torch.long, device=dev)
        return torch.cat([torch.arange(min(self.num_sink, self.length), device=dev),
                          torch.arange(self.num_sink + self._indexed, self.length, device=dev)])

    def step(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        if k is not None:
            self.append(k, v)
        if self.k is None or self.length == 0:
            raise ValueError("the cache is empty: call prefill(k, v) or pass this step's k, v")
        if q.dim() != 4 or q.shape[:2] != self.k.shape[:2] or q.shape[3] != self.k.shape[3]:
            raise ValueError(f"q must be [batch, heads, m, dim] matching the cache {tuple(self.k.shape[:2])}, "
                             f"dim {self.k.shape[3]}; got {tuple(q.shape)}")
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        # One softmax over the retrieved keys and the static set: they are disjoint, so this equals the log-sum-exp
        # merge of the two partial attentions (which retrieval_attention computes apart; tested equal) at half
        # the small ops, which dominate a decode step.
        parts = [self.retrieve(q)] if self._indexed else []
        if self.method == "retrieval":
            parts.append(self.static_positions().expand(*q.shape[:3], -1))
        idx = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        # Gather from the whole (contiguous) capacity buffers viewed as [b h cap, d] rows: positions < length, no
        # copy of the cache; one row index serves keys and values.
        b, h, m, d = q.shape
        cap = self.k.shape[2]
        if self._row_base is None or self._row_base[0] != cap:
            self._row_base = (cap, torch.arange(b * h, device=q.device).view(b, h, 1, 1) * cap)
        rows = (idx.clamp_min(0) + self._row_base[1]).flatten()
        kc = self.k.view(-1, d).index_select(0, rows).view(b, h, m, -1, d)
        vc = self.v.view(-1, self.v.shape[-1]).index_select(0, rows).view(b, h, m, -1, self.v.shape[-1])
        s = (kc @ (q * scale).unsqueeze(-1)).squeeze(-1)  # [b, h, m, w]
        p = torch.softmax(upcast(s).masked_fill(idx < 0, float("-inf")), dim=-1)
        out = (p.unsqueeze(-2).to(vc.dtype) @ vc.masked_fill((idx < 0)[..., None], 0.0)).squeeze(-2)
        poisoned = self._nonfinite[..., None] | ~torch.isfinite(q).all(-1)  # [b, h, m]
        return out.masked_fill(poisoned[..., None], float("nan"))


def _flops_topk(batch, heads, q_len, kv_len, head_dim, top_k):
    return batch * heads * 4 * q_len * min(top_k, kv_len) * head_dim


def retrieval_flops(*, batch, heads, q_len, kv_len, head_dim, causal=False, top_k=64, num_sink=0, window=0,
                    index="exact", **_):
    """Forward FLOPs: the selection (exact: ``2 n n_k d``; an index: ~``2 n sqrt(n_k) d`` probe work) plus the
    attention over ``top_k`` (+ static) keys."""
    sel = 2 * q_len * kv_len * head_dim if index == "exact" else 2 * q_len * 8 * math.sqrt(kv_len) * head_dim
    half = 0.5 if causal and index == "exact" else 1.0
    return batch * heads * sel * half + _flops_topk(batch, heads, q_len, kv_len, head_dim,
                                                    top_k + num_sink + window)
