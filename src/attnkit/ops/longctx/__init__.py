"""Long-context inference kernels: S2-Attention, KV selection policies and Block-Attention's re-rotated passage caches
(Star Attention is :mod:`attnkit.functional.star`; the modules are :mod:`attnkit.nn.longctx`; the cache that
applies a selection policy is :mod:`attnkit.selective_cache`).

The paged KV cache is :class:`attnkit.PagedKVCache` (``attnkit.paged_cache``).
"""

from .rag import rerotate_keys
from .s2 import s2_kv_fraction, s2_pattern
from .selection import (
    avl_text_keep,
    avl_text_scores,
    avl_vision_tiers,
    cumulative_mass,
    modality_mask,
    probe_query_mask,
    span_index_mask,
    span_mask,
    token_type_mask,
    trim_visual_features,
)

__all__ = ["s2_pattern", "s2_kv_fraction",
           "rerotate_keys", "cumulative_mass", "modality_mask", "probe_query_mask",
           "span_index_mask", "span_mask", "token_type_mask", "trim_visual_features",
           "avl_vision_tiers", "avl_text_scores", "avl_text_keep"]
