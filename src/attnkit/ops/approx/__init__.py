"""Approximate attention (issue 5): low-rank (Linformer), landmark (Nystromformer, SOFT), hashing (YOSO,
HyperAttention), clustering (Routing), multi-resolution (MRA), low-rank top-k selection (Loki), vector-quantised
keys (Transformer-VQ), structured factorisation (Combiner) and learned top-k selection (SPARSEK, with its O(k)
decode cache); retrieval over a shared key index (IceFormer, RetrievalAttention, SEA; issue 17), feature-space
clusters (BOAT), significance-guided pooling (SG-Former) and token selection with packing (Select-and-Pack);
each with a plain reference, plus :func:`approximation_error` to measure any of them against exact softmax."""

from attnkit.ops.approx.boat import balanced_clusters, boat_attention, boat_reference
from attnkit.ops.approx.combiner import combiner_attention, combiner_reference
from attnkit.ops.approx.combiner_bases import (
    combiner_axial_attention,
    combiner_axial_reference,
    combiner_layout,
    combiner_logsparse_attention,
    combiner_logsparse_reference,
    combiner_mixture_attention,
    combiner_mixture_reference,
)
from attnkit.ops.approx.error import ApproximationError, approximation_error, exact_softmax
from attnkit.ops.approx.hyper import hyper_attention, hyper_reference
from attnkit.ops.approx.knn import KeyIndex, faiss_available, mips_augment, topk_recall
from attnkit.ops.approx.linformer import linformer_attention, linformer_reference
from attnkit.ops.approx.loki import loki_attention, loki_reference, pca_basis
from attnkit.ops.approx.mra import mra_attention, mra_reference
from attnkit.ops.approx.nystrom import nystrom_attention, nystrom_reference
from attnkit.ops.approx.pinv import newton_raphson_pinv, newton_schulz_pinv
from attnkit.ops.approx.retrieval import (
    RetrievalDecoder,
    SEAEstimator,
    attend_selected,
    iceformer_attention,
    iceformer_reference,
    retrieval_attention,
    retrieval_reference,
    sea_attention,
    sea_distillation_loss,
    sea_distillation_step,
    sea_reference,
    sea_teacher_blocks,
    select_topk,
)
from attnkit.ops.approx.routing import kmeans_centroids, routing_attention, routing_reference
from attnkit.ops.approx.select_pack import select_pack_attention, select_pack_reference
from attnkit.ops.approx.sgformer import sgformer_attention, sgformer_reference
from attnkit.ops.approx.soft import gaussian_kernel_attention, soft_attention, soft_reference
from attnkit.ops.approx.sparsek import (
    sparsek_attention,
    sparsek_mask,
    sparsek_reference,
    sparsek_scores,
    sparsek_threshold,
)
from attnkit.ops.approx.sparsek_cache import SparseKDecodeCache
from attnkit.ops.approx.transformer_vq import (
    vq_assign,
    vq_attention,
    vq_codebook,
    vq_commitment_loss,
    vq_quantize,
    vq_reference,
)
from attnkit.ops.approx.yoso import yoso_attention, yoso_expectation, yoso_reference

__all__ = [
    "ApproximationError", "approximation_error", "exact_softmax",
    "hyper_attention", "hyper_reference",
    "linformer_attention", "linformer_reference",
    "loki_attention", "loki_reference", "pca_basis",
    "mra_attention", "mra_reference",
    "nystrom_attention", "nystrom_reference",
    "newton_raphson_pinv", "newton_schulz_pinv",
    "kmeans_centroids", "routing_attention", "routing_reference",
    "gaussian_kernel_attention", "soft_attention", "soft_reference",
    "yoso_attention", "yoso_expectation", "yoso_reference",
    "combiner_attention", "combiner_reference", "combiner_layout",
    "combiner_logsparse_attention", "combiner_logsparse_reference", "combiner_axial_attention",
    "combiner_axial_reference", "combiner_mixture_attention", "combiner_mixture_reference",
    "sparsek_attention", "sparsek_reference", "sparsek_mask", "sparsek_threshold", "sparsek_scores",
    "vq_attention", "vq_reference", "vq_assign", "vq_codebook", "vq_quantize", "vq_commitment_loss",
    "SparseKDecodeCache",
    "KeyIndex", "faiss_available", "mips_augment", "topk_recall",
    "RetrievalDecoder", "attend_selected", "select_topk",
    "iceformer_attention", "iceformer_reference", "retrieval_attention", "retrieval_reference",
    "sea_attention", "sea_reference", "SEAEstimator", "sea_teacher_blocks", "sea_distillation_loss",
    "sea_distillation_step",
    "balanced_clusters", "boat_attention", "boat_reference",
    "sgformer_attention", "sgformer_reference",
    "select_pack_attention", "select_pack_reference",
]
