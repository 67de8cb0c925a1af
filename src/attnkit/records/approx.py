"""Registers the approx family: low-rank, landmark, hashing, sampling and clustering approximations of
softmax attention (issue 5). Each factory returns a callable ``(q, k, v) -> out``; the parameter-free ones
return an :class:`~attnkit.ops.approx._common.ApproxAttention`, which also exposes ``reference`` and
``attention_matrix``; Linformer returns an ``nn.Module``."""

from __future__ import annotations

import math
from typing import Any

from attnkit.ops.approx import combiner, hyper, loki, mra, nystrom, routing, soft, yoso
from attnkit.ops.approx._common import ApproxAttention, refuse_causal
from attnkit.registry import SHAPE_PARAMS, Mechanism, register


def _built_reference(built: Any, q, k, v, **_: Any):
    """The record's reference: the method's own materialised reference (its ``ref`` function or module method),
    with the built object's parameters and weights."""
    return built.reference(q, k, v)


def _no_extra_shapes(shape: dict[str, Any]) -> None:
    unknown = set(shape) - SHAPE_PARAMS
    if unknown:
        raise TypeError(f"unexpected parameters: {sorted(unknown)}")


def _fn_factory(name: str, fn, ref, has_causal: bool):
    def factory(*, causal: bool = False, **params: Any) -> ApproxAttention:
        shape = {key: params.pop(key) for key in list(params) if key in SHAPE_PARAMS}
        _no_extra_shapes(shape)
        if not has_causal:
            refuse_causal(name, causal, "see `attnkit list`")
        # Fail on unknown parameters now rather than at the first call.
        import inspect

        allowed = set(inspect.signature(fn).parameters) - {"q", "k", "v"}
        unknown = set(params) - allowed
        if unknown:
            raise TypeError(f"{name}: unknown parameters {sorted(unknown)}; accepted: {sorted(allowed)}")
        return ApproxAttention(name, fn, ref, causal=causal, **params)

    return factory


def _linformer_factory(*, seq_len: int, num_heads: int | None = None, proj_len: int = 256,
                       sharing: str = "headwise", causal: bool = False, scale: float | None = None,
                       **shape: Any):
    _no_extra_shapes(shape)
    refuse_causal("linformer", causal, "projecting the sequence axis mixes future tokens into every key")
    from attnkit.nn.approx import LinformerAttention

    return LinformerAttention(seq_len, proj_len, num_heads=num_heads, sharing=sharing, scale=scale)


def _transformer_vq_factory(*, num_heads: int, head_dim: int, codebook_size: int = 256, block_size: int = 256,
                            causal: bool = False, decay: float = 0.99, scale: float | None = None, seed: int = 0,
                            **shape: Any):
    _no_extra_shapes(shape)
    from attnkit.nn.approx import TransformerVQAttention

    # In eval mode, so repeated calls (approximation_error, benchmarks) see one codebook; .train() turns on
    # the EMA codebook updates (a MultiheadAttention in training mode does).
    return TransformerVQAttention(num_heads, head_dim, codebook_size, block_size=block_size, causal=causal,
                                  decay=decay, scale=scale, seed=seed).eval()


def _sparsek_factory(*, num_heads: int, head_dim: int, top_k: int = 64, window: int = 0, causal: bool = False,
                     chunk_size: int = 128, scale: float | None = None, seed: int = 0, **shape: Any):
    _no_extra_shapes(shape)
    from attnkit.nn.approx import SparseKAttention

    return SparseKAttention(num_heads, head_dim, top_k, window=window, causal=causal, chunk_size=chunk_size,
                            scale=scale, seed=seed)


# ---- forward FLOP counts (multiply-adds count 2) -------------------------------------------------------

def _flops_linformer(*, batch, heads, q_len, kv_len, head_dim, causal=False, proj_len=256, **_):
    k = proj_len
    return batch * heads * (2 * 2 * k * kv_len * head_dim + 4 * q_len * k * head_dim)


def _landmark_flops(batch, heads, q_len, kv_len, d, m, iters, per_iter):
    per_head = 2 * q_len * m * d + 2 * m * m * d + 2 * m * kv_len * d  # three kernels
    per_head += iters * per_iter * m ** 3  # iterative pseudo-inverse
    per_head += 2 * m * kv_len * d + 2 * m * m * d + 2 * q_len * m * d  # right-to-left product with V
    return batch * heads * per_head


def _flops_nystrom(*, batch, heads, q_len, kv_len, head_dim, causal=False, num_landmarks=64,
                   pinv_iterations=6, **_):
    return _landmark_flops(batch, heads, q_len, kv_len, head_dim, num_landmarks, pinv_iterations, 8)


def _flops_soft(*, batch, heads, q_len, kv_len, head_dim, causal=False, num_landmarks=64,
                newton_iterations=20, **_):
    return _landmark_flops(batch, heads, q_len, kv_len, head_dim, num_landmarks, newton_iterations, 4)


def _flops_yoso(*, batch, heads, q_len, kv_len, head_dim, causal=False, tau=8, num_hashes=32, **_):
    hashing = 2 * (q_len + kv_len) * head_dim * tau * num_hashes
    tables = 2 * num_hashes * (q_len + kv_len) * (head_dim + 1)
    return batch * heads * (hashing + tables)


def _hyper_rect_flops(q_len, kv_len, d, block_size, sample_size, num_bits):
    if kv_len <= block_size:
        return 4 * q_len * kv_len * d
    return 2 * (q_len + kv_len) * d * num_bits + 4 * q_len * (block_size + sample_size) * d


def _flops_hyper(*, batch, heads, q_len, kv_len, head_dim, causal=False, block_size=256, sample_size=256,
                 num_bits=7, min_seq_len=4096, **_):
    def causal_cost(n):
        if n <= min_seq_len:
            return 2 * n * n * head_dim
        half = n // 2
        return (causal_cost(half) + causal_cost(n - half)
                + _hyper_rect_flops(n - half, half, head_dim, block_size, sample_size, num_bits))

    per_head = (causal_cost(q_len) if causal
                else _hyper_rect_flops(q_len, kv_len, head_dim, block_size, sample_size, num_bits))
    return batch * heads * per_head


def _flops_routing(*, batch, heads, q_len, kv_len, head_dim, causal=False, num_clusters=8,
                   kmeans_iterations=2, **_):
    clustering = (kmeans_iterations + 1) * 2 * (q_len + kv_len) * num_clusters * head_dim
    attend = 4 * q_len * (kv_len / num_clusters) * head_dim * (0.5 if causal else 1.0)  # balanced clusters
    return batch * heads * (clustering + attend)


def _flops_mra(*, batch, heads, q_len, kv_len, head_dim, causal=False, block_size=32, num_refined=4, **_):
    nbq, nbk = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    coarse = 4 * nbq * nbk * head_dim
    refined = 4 * q_len * min(num_refined, nbk) * block_size * head_dim
    return batch * heads * (coarse + refined)


def _flops_loki(*, batch, heads, q_len, kv_len, head_dim, causal=False, top_k=64, rank=None, **_):
    r = head_dim if rank is None else rank
    if top_k >= kv_len:
        return 4.0 * batch * heads * q_len * kv_len * head_dim * (0.5 if causal else 1.0)
    basis = 2 * kv_len * head_dim ** 2 + 10 * head_dim ** 3
    low_rank = 2 * (q_len + kv_len) * head_dim * r + 2 * q_len * kv_len * r * (0.5 if causal else 1.0)
    return batch * heads * (basis + low_rank + 4 * q_len * top_k * head_dim)


def _flops_transformer_vq(*, batch, heads, q_len, kv_len, head_dim, causal=False, codebook_size=256,
                          block_size=256, **_):
    assign = 2 * kv_len * codebook_size * head_dim
    compressed = 4 * q_len * codebook_size * head_dim  # q C^T and the product with the per-code values
    own = 4 * q_len * min(block_size, kv_len) * head_dim * (0.5 if causal else 1.0)
    return batch * heads * (assign + compressed + own)


def _flops_combiner(*, batch, heads, q_len, kv_len, head_dim, causal=False, block_size=128, **_):
    regions = math.ceil(kv_len / block_size)
    summaries = 4 * kv_len * head_dim
    attend = 4 * q_len * (min(block_size, kv_len) + regions) * head_dim * (0.5 if causal else 1.0)
    return batch * heads * (summaries + attend)


def _flops_sparsek(*, batch, heads, q_len, kv_len, head_dim, causal=False, top_k=64, window=0, **_):
    # Support ~ top_k keys (plus the window); the selection's elementwise work is not counted.
    return batch * heads * (2 * kv_len * head_dim + 4 * q_len * min(top_k + window, kv_len) * head_dim)


FAMILY = "approx"

register(Mechanism(
    name="linformer", family=FAMILY, paper="Linformer: Self-Attention with Linear Complexity",
    exact=False, complexity="O(n k d)", causal=False, factory=_linformer_factory, needs=("seq_len", "num_heads"),
    summary="learned projections E, F of the sequence axis of keys/values (module; untrained weights in "
            "benchmarks, so its error there is that of a random projection)",
    bench_params={"proj_len": 256}, in_default_bench=True, flops=_flops_linformer, reference=_built_reference,
    source="paper"))

register(Mechanism(
    name="nystrom", family=FAMILY,
    paper="Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention",
    exact=False, complexity="O(n m d + m^3)", causal=False,
    factory=_fn_factory("nystrom", nystrom.nystrom_attention, nystrom.nystrom_reference, False),
    summary="segment-mean landmarks, iterative Moore-Penrose pseudo-inverse (conv skip: nn.NystromAttention)",
    bench_params={"num_landmarks": 64}, small_params={"num_landmarks": 8}, in_default_bench=True,
    flops=_flops_nystrom, reference=_built_reference, source="paper"))

register(Mechanism(
    name="soft", family=FAMILY, paper="Softmax-free Linear Transformers",
    exact=False, complexity="O(n m d + m^3)", causal=False,
    factory=_fn_factory("soft", soft.soft_attention, soft.soft_reference, False),
    summary="softmax-free Gaussian-kernel attention, Nystrom landmarks, Newton-Raphson pseudo-inverse "
            "(approximates its own kernel, not softmax)",
    bench_params={"num_landmarks": 64}, small_params={"num_landmarks": 8}, flops=_flops_soft,
    reference=_built_reference, source="paper"))

register(Mechanism(
    name="yoso", family=FAMILY,
    paper="You Only Sample (Almost) Once: Linear Cost Self-Attention Via Bernoulli Sampling",
    exact=False, complexity="O(n m (tau d + d_v))", causal=True,
    factory=_fn_factory("yoso", yoso.yoso_attention, yoso.yoso_reference, True),
    summary="LSH collision probability (1 - arccos(q.k)/pi)^tau as attention weight, estimated by hashing "
            "(approximates its own kernel, not softmax)",
    # no registry reference: hashing is discontinuous, so a half-precision input flips hash bits (tests/test_approx*)
    bench_params={"tau": 8, "num_hashes": 32, "normalize": True}, flops=_flops_yoso, source="paper"))

register(Mechanism(
    name="hyper", family=FAMILY, paper="HyperAttention: Long-context Attention in Near-Linear Time",
    exact=False, complexity="O(n (b + s) d)", causal=True,
    factory=_fn_factory("hyper", hyper.hyper_attention, hyper.hyper_reference, True),
    summary="sorted-LSH block-diagonal exact part + uniformly sampled residual; causal by recursion",
    bench_params={"block_size": 256, "sample_size": 256}, in_default_bench=True, flops=_flops_hyper,
    reference=_built_reference, source="paper"))

register(Mechanism(
    name="routing", family=FAMILY,
    paper="Efficient Content-Based Sparse Attention with Routing Transformers",
    exact=False, complexity="O(n^1.5 d)", causal=True,
    factory=_fn_factory("routing", routing.routing_attention, routing.routing_reference, True),
    summary="k-means clusters of queries/keys, exact softmax within each cluster "
            "(learned EMA centroids: nn.RoutingAttention)",
    bench_params={"num_clusters": 128}, small_params={"num_clusters": 4}, flops=_flops_routing,
    reference=_built_reference, source="paper"))

register(Mechanism(
    name="mra", family=FAMILY, paper="Multi Resolution Analysis (MRA) for Approximate Self-Attention",
    exact=False, complexity="O(n r b d + (n/b)^2 d)", causal=False,
    factory=_fn_factory("mra", mra.mra_attention, mra.mra_reference, False),
    summary="block-averaged coarse attention, top blocks refined to exact (MRA-2)",
    bench_params={"block_size": 32, "num_refined": 8}, flops=_flops_mra, reference=_built_reference, source="paper"))

register(Mechanism(
    name="loki", family=FAMILY, paper="Loki: Low-Rank Keys for Efficient Sparse Attention",
    exact=False, complexity="O(n^2 r + n k d)", causal=True,
    factory=_fn_factory("loki", loki.loki_attention, loki.loki_reference, True),
    summary="top-k keys by low-rank (PCA) scores, then exact attention over them",
    bench_params={"top_k": 256, "rank": 16}, flops=_flops_loki, reference=_built_reference, source="paper"))

register(Mechanism(
    name="transformer_vq", family=FAMILY,
    paper="Transformer-VQ: Linear-Time Transformers via Vector Quantization",
    exact=False, complexity="O(n (S + b) d)", causal=True, factory=_transformer_vq_factory,
    needs=("num_heads", "head_dim"),
    summary="keys quantised to a codebook; exact softmax over them by blocks plus a compressed per-code cache "
            "(module; EMA k-means codebook, random until trained or fit())",
    bench_params={"codebook_size": 256, "block_size": 256}, flops=_flops_transformer_vq, reference=_built_reference,
    source="paper"))

register(Mechanism(
    name="combiner", family=FAMILY,
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
    exact=False, complexity="O(n (b + n/b) d)", causal=True,
    factory=_fn_factory("combiner", combiner.combiner_attention, combiner.combiner_reference, True),
    summary="Combiner-Fixed: exact attention inside the block, every other block through one summary "
            "(full support; learned within-block scorer: nn.CombinerAttention)",
    bench_params={"block_size": 128}, flops=_flops_combiner, reference=_built_reference, source="paper"))

register(Mechanism(
    name="sparsek", family=FAMILY,
    paper="Sparser is Faster and Less is More: Efficient Sparse Attention for Long-Range Transformers",
    exact=False, complexity="O(n (k + c) d + n^2 / c)", causal=True, factory=_sparsek_factory,
    needs=("num_heads", "head_dim"),
    summary="learned key scorer + differentiable SPARSEK top-k mask per query, attention over the selected keys "
            "(module; untrained scorer in benchmarks)",
    bench_params={"top_k": 256}, flops=_flops_sparsek, source="paper"))

# Issue 17: retrieval (IceFormer, RetrievalAttention, SEA) and structured-selection records are in
# attnkit.records.approx_retrieval (its own entry in attnkit.registry.FAMILY_MODULES).
