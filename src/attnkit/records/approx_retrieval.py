"""Registers the approx family's retrieval and structured-selection methods (issue 17): IceFormer,
RetrievalAttention, SEA, BOAT, SG-Former, Select-and-Pack, Combiner's Logsparse, Axial and Mixture bases.
Imported by :mod:`attnkit.records.approx`; factories return
:class:`~attnkit.ops.approx._common.ApproxAttention` (``reference``, ``attention_matrix``), Select-and-Pack an
``nn.Module`` with its gate."""

from __future__ import annotations

import math
from typing import Any

from attnkit.ops.approx import boat, combiner_bases, retrieval, sgformer
from attnkit.records.approx import FAMILY, _fn_factory, _no_extra_shapes
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
    reference=_ref, flops=retrieval.retrieval_flops, max_bench_len=16384, source="paper"))

register(Mechanism(
    name="retrieval_attention", family=FAMILY,
    paper="RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval",
    exact=False, complexity="O(n (search + (k + s + w) d))", causal=True,
    factory=_fn_factory("retrieval_attention", retrieval.retrieval_attention, retrieval.retrieval_reference,
                        True),
    summary="static set (sink tokens + recent window) attended exactly, top-k of the rest retrieved from a key "
            "index, the two merged by log-sum-exp (decoding: RetrievalDecoder); index='graph' is the paper's "
            "attention-aware index, built from the queries' nearest keys (prefill(k, v, q=...))",
    bench_params={"top_k": 64, "num_sink": 4, "window": 64, "index": "ivf"},
    small_params={"top_k": 6, "num_sink": 2, "window": 4, "index": "exact"},
    reference=_ref, flops=retrieval.retrieval_flops, max_bench_len=16384,
    source="deviation: by default (index='ivf') keys are retrieved from an index over the keys alone; index='gra"
           "ph' with prefill(k, v, q=...) is the paper's attention-aware index built from the queries' nearest keys"))

register(Mechanism(
    name="sea", family=FAMILY, paper="SEA: Sparse Linear Attention with Estimated Attention Mask",
    exact=False, complexity="O(n (C m + k n/C d))", causal=True,
    factory=_fn_factory("sea", retrieval.sea_attention, retrieval.sea_reference, True),
    summary="linear-attention estimate of the block-compressed attention, top-k blocks interpolated to a key "
            "mask, exact sparse softmax on it; estimator= a SEAEstimator distilled from the teacher's attention "
            "(sea_distillation_step, the paper's training), default the untrained FAVOR+ estimate",
    bench_params={"num_blocks": 128, "top_k": 8}, small_params={"num_blocks": 6, "top_k": 2},
    reference=_ref, flops=_flops_sea,
    source="deviation: by default (estimator=None) the attention estimate is an untrained FAVOR+ random-feature "
           "linear attention; the paper's estimator distilled from a teacher's attention is estimator=SEAEstimat"
           "or trained with sea_distillation_step (a one-convolution decoder, not the paper's deeper CNN)"))


def _flops_boat(*, batch, heads, q_len, kv_len, head_dim, causal=False, cluster_size=64, window=64, **_):
    levels = max(0, math.ceil(math.log2(max(kv_len / cluster_size, 1))))
    clustering = levels * 6 * kv_len * head_dim  # power iterations and projections per level
    return batch * heads * (clustering + 4 * q_len * max(cluster_size, window) * head_dim)


def _flops_sgformer(*, batch, heads, q_len, kv_len, head_dim, causal=False, region_size=64, rates=(1, 4, 16),
                    fractions=None, **_):
    fractions = fractions or (1 / len(rates),) * len(rates)
    kept = kv_len * sum(f / r for f, r in zip(fractions, rates, strict=True))
    significance = 2 * q_len * math.ceil(kv_len / region_size) * head_dim
    return batch * heads * (significance + 4 * q_len * kept * head_dim)


def _select_pack_factory(*, num_heads: int, head_dim: int, threshold: float = 0.0, causal: bool = False,
                         chunk_size: int = 256, scale: float | None = None, seed: int = 0, **shape: Any):
    _no_extra_shapes(shape)
    from attnkit.ops.approx._common import refuse_causal

    refuse_causal("select_pack", causal, "tokens are selected from the whole image")
    from attnkit.nn.approx import SelectPackAttention

    return SelectPackAttention(num_heads, head_dim, threshold=threshold, chunk_size=chunk_size, scale=scale,
                               seed=seed)


def _flops_select_pack(*, batch, heads, q_len, kv_len, head_dim, causal=False, **_):
    # About half the tokens pass an untrained gate at threshold 0: a quarter of the dense pairs.
    return batch * heads * (2 * kv_len * head_dim + 4 * (q_len / 2) * (kv_len / 2) * head_dim)


register(Mechanism(
    name="boat", family=FAMILY, paper="BOAT: Bilateral Local Attention Vision Transformer",
    exact=False, complexity="O(n (c + w) d + n d^2 log(n / c))", causal=False,
    factory=_fn_factory("boat", boat.boat_attention, boat.boat_reference, False),
    summary="half the heads attend within image-space windows, half within balanced feature-space clusters "
            "(recursive median bisection on the principal direction)",
    bench_params={"cluster_size": 64, "window": 64}, small_params={"cluster_size": 8, "window": 6},
    reference=_ref, flops=_flops_boat, source="paper"))

register(Mechanism(
    name="sgformer", family=FAMILY,
    paper="SG-Former: Self-guided Transformer with Evolving Token Reallocation",
    exact=False, complexity="O(n n' d)", causal=False,
    factory=_fn_factory("sgformer", sgformer.sgformer_attention, sgformer.sgformer_reference, False),
    summary="key regions ranked by a coarse-attention significance map and pooled at rates (1, 4, 16): salient "
            "regions keep their tokens, minor ones are pooled; full-resolution queries",
    bench_params={"region_size": 64, "rates": (1, 4, 16)}, small_params={"region_size": 6, "rates": (1, 3)},
    reference=_ref, flops=_flops_sgformer, source="paper"))

register(Mechanism(
    name="select_pack", family=FAMILY,
    paper="Context-Aware Token Selection and Packing for Enhanced Vision Transformer",
    exact=False, complexity="O(sum_b n_b^2 d)", causal=False, factory=_select_pack_factory,
    needs=("num_heads", "head_dim"),
    summary="a linear gate selects tokens per image; the selected tokens of the batch are packed into one "
            "sequence with a block-diagonal mask, attended, and scattered back (unselected: zero output; "
            "module, untrained gate in benchmarks)",
    bench_params={"threshold": 0.0}, reference=_ref, flops=_flops_select_pack, source="paper"))


def _flops_combiner_logsparse(*, batch, heads, q_len, kv_len, head_dim, causal=False, **_):
    terms = (1 if causal else 2) * 2 * (math.ceil(math.log2(max(q_len, kv_len, 2))) + 1)  # direct + regions
    return batch * heads * (4 * kv_len * head_dim + 4 * q_len * terms * head_dim)


def _flops_combiner_axial(*, batch, heads, q_len, kv_len, head_dim, causal=False, block_size=128, **_):
    rows = math.ceil(max(q_len, kv_len) / block_size)
    return batch * heads * (4 * kv_len * head_dim + 4 * q_len * (2 * block_size + rows) * head_dim)


register(Mechanism(
    name="combiner_logsparse", family=FAMILY,
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
    exact=False, complexity="O(n log n d)", causal=True,
    factory=_fn_factory("combiner_logsparse", combiner_bases.combiner_logsparse_attention,
                        combiner_bases.combiner_logsparse_reference, True),
    summary="Combiner-Logsparse: keys at distances 0 and 2^t direct, the gaps between them through their mean "
            "key/value (full support, prefix sums)",
    bench_params={"chunk_size": 64}, small_params={"chunk_size": 16}, reference=_ref,
    flops=_flops_combiner_logsparse, source="paper"))

register(Mechanism(
    name="combiner_axial", family=FAMILY,
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
    exact=False, complexity="O(n (b + n/b) d)", causal=True,
    factory=_fn_factory("combiner_axial", combiner_bases.combiner_axial_attention,
                        combiner_bases.combiner_axial_reference, True),
    summary="Combiner-Axial: the query's row and column (rows of block_size) direct, the rest of every other "
            "column through its mean key/value (full support)",
    bench_params={"block_size": 128}, small_params={"block_size": 6}, reference=_ref,
    flops=_flops_combiner_axial, source="paper"))


def _flops_combiner_mixture(*, batch, heads, q_len, kv_len, head_dim, causal=False, block_size=128, **_):
    from attnkit.records.approx import _flops_combiner

    fixed = heads // 2
    return (_flops_combiner(batch=batch, heads=fixed, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                            causal=causal, block_size=block_size)
            + _flops_combiner_logsparse(batch=batch, heads=heads - fixed, q_len=q_len, kv_len=kv_len,
                                        head_dim=head_dim, causal=causal))


register(Mechanism(
    name="combiner_mixture", family=FAMILY,
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
    exact=False, complexity="O(n (b + n/b + log n) d)", causal=True,
    factory=_fn_factory("combiner_mixture", combiner_bases.combiner_mixture_attention,
                        combiner_bases.combiner_mixture_reference, True),
    summary="Combiner-Mixture: half the heads on Combiner-Fixed blocks, half on Combiner-Logsparse (full support "
            "in every head)",
    bench_params={"block_size": 128}, small_params={"block_size": 6}, reference=_ref,
    flops=_flops_combiner_mixture, source="paper+catalogue"))
