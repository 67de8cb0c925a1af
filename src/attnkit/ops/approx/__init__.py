"""Approximate attention (issue 5): low-rank (Linformer), landmark (Nystromformer, SOFT), hashing (YOSO,
HyperAttention), clustering (Routing), multi-resolution (MRA) and low-rank top-k selection (Loki), each with
a plain reference, plus :func:`approximation_error` to measure any of them against exact softmax."""

from attnkit.ops.approx.error import ApproximationError, approximation_error, exact_softmax
from attnkit.ops.approx.hyper import hyper_attention, hyper_reference
from attnkit.ops.approx.linformer import linformer_attention, linformer_reference
from attnkit.ops.approx.loki import loki_attention, loki_reference, pca_basis
from attnkit.ops.approx.mra import mra_attention, mra_reference
from attnkit.ops.approx.nystrom import nystrom_attention, nystrom_reference
from attnkit.ops.approx.pinv import newton_raphson_pinv, newton_schulz_pinv
from attnkit.ops.approx.routing import kmeans_centroids, routing_attention, routing_reference
from attnkit.ops.approx.soft import gaussian_kernel_attention, soft_attention, soft_reference
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
]
