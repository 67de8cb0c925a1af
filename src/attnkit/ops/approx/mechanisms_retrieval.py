"""Registers the approx family's retrieval and structured-selection methods (issue 17): IceFormer,
RetrievalAttention, SEA, BOAT, SG-Former, Select-and-Pack, Combiner's Logsparse/Axial/Mixture bases.
Imported by :mod:`attnkit.ops.approx.mechanisms`; factories return
:class:`~attnkit.ops.approx._common.ApproxAttention` (``reference``, ``attention_matrix``)."""

from __future__ import annotations

import math

from attnkit.ops.approx import retrieval
from attnkit.ops.approx.mechanisms import FAMILY, _fn_factory
from attnkit.registry import Mechanism, register


def _ref(built, q, k, v, **_):
    return built.reference(q, k, v)


def _flops_sea(*, batch, heads, q_len, kv_len, head_dim, causal=False, num_blocks=64, top_k=8, num_features=64,
               **_):
    estimate = 2 * (q_len + kv_len) * head_dim * num_features + 2 * q_len * num_blocks * num_features
    width = math.ceil(kv_len / num_blocks) * (top_k + (1 if causal else 0))
    return batch * heads * (estimate + 4 * q_len * min(width, kv_len) * head_dim)


register(Mechanism(
    name="iceformer", family=FAMILY,
    paper="IceFormer: Accelerated Inference with Long-Sequence Transformers on CPUs",
    exact=False, complexity="O(n (search + k d))", causal=True,
    factory=_fn_factory("iceformer", retrieval.iceformer_attention, retrieval.iceformer_reference, True),
    summary="each query attends to its top-k keys by q.k from a nearest-neighbour index (MIPS -> NN; index= "
            "exact | ivf (torch) | faiss HNSW; decoding: RetrievalDecoder)",
    bench_params={"top_k": 64, "index": "ivf"}, small_params={"top_k": 8, "index": "exact"},
    reference=_ref, flops=retrieval.retrieval_flops, max_bench_len=16384))

register(Mechanism(
    name="retrieval_attention", family=FAMILY,
    paper="RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval",
    exact=False, complexity="O(n (search + (k + s + w) d))", causal=True,
    factory=_fn_factory("retrieval_attention", retrieval.retrieval_attention, retrieval.retrieval_reference,
                        True),
    summary="static set (sink tokens + recent window) attended exactly, top-k of the rest retrieved from a key "
            "index, the two merged by log-sum-exp (decoding: RetrievalDecoder)",
    bench_params={"top_k": 64, "num_sink": 4, "window": 64, "index": "ivf"},
    small_params={"top_k": 6, "num_sink": 2, "window": 4, "index": "exact"},
    reference=_ref, flops=retrieval.retrieval_flops, max_bench_len=16384))

register(Mechanism(
    name="sea", family=FAMILY, paper="SEA: Sparse Linear Attention with Estimated Attention Mask",
    exact=False, complexity="O(n (C m + k n/C d))", causal=True,
    factory=_fn_factory("sea", retrieval.sea_attention, retrieval.sea_reference, True),
    summary="random-feature linear-attention estimate of the block-compressed attention, top-k blocks "
            "interpolated to a key mask, exact sparse softmax on it (untrained estimator: FAVOR+)",
    bench_params={"num_blocks": 128, "top_k": 8}, small_params={"num_blocks": 6, "top_k": 2},
    reference=_ref, flops=_flops_sea))
