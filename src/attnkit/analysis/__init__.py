"""Look inside attention: capture the attention of a model, and the diagnostics of the analysis papers.

``capture`` records attention matrices while a model runs; the functions of :mod:`.diagnostics` compute rollout
and flow, relevance, entropy, attention distance, head statistics, the rank-collapse residual and joint q/k
embeddings from them; :mod:`.lrp` is Chefer et al.'s LRP-based relevance (a model written for LRP);
:mod:`.heads` masks heads; :mod:`.report` writes ``attnkit analyze``'s report.
"""

from attnkit.nn.recording import AttentionRecord, Capture, capture, probe_attention_matrix

from .diagnostics import (
    attention_distance,
    attention_flow,
    cluster_heads,
    distance_histogram,
    entropy,
    grid_positions,
    head_distances,
    head_entropy,
    joint_qk_embedding,
    js_distance,
    offset_attention,
    offset_head_score,
    relative_residual,
    relevance,
    rollout,
    special_token_attention,
    token_residual,
)
from .heads import ablate_heads, attention_modules, head_importance, layer_inputs, rank_collapse_curve
from .lrp import LRPClassifier, lrp_add, lrp_linear, lrp_product, lrp_relevance

__all__ = [
    "AttentionRecord", "Capture", "capture", "probe_attention_matrix",
    "attention_distance", "attention_flow", "cluster_heads", "distance_histogram", "entropy", "grid_positions",
    "head_distances", "head_entropy", "joint_qk_embedding", "js_distance", "offset_attention",
    "offset_head_score", "relative_residual", "relevance", "rollout", "special_token_attention", "token_residual",
    "ablate_heads", "attention_modules", "head_importance", "layer_inputs", "rank_collapse_curve",
    "LRPClassifier", "lrp_add", "lrp_linear", "lrp_product", "lrp_relevance",
]
