"""attnkit: the spectrum of attention mechanisms behind one PyTorch API.

Layout is ``[batch, heads, seq, dim]`` everywhere, as in ``torch.nn.functional.scaled_dot_product_attention``.
"""

from attnkit import feature_maps, normalizations, patterns, score_mods
from attnkit._version import __version__
from attnkit.backends import list_backends
from attnkit.backends.dispatch import explain
from attnkit.cache import AdaptiveKVCache, KVCache, RecurrentStateCache, SlidingWindowCache
from attnkit.errors import NotSupportedError
from attnkit.functional.exact import attention, not_supported_reasons
from attnkit.functional.linear import delta_rule_attention, gated_linear_attention, linear_attention
from attnkit.functional.neighborhood import neighborhood
from attnkit.ops.approx.error import ApproximationError, approximation_error
from attnkit.ops.exact.weights import attention_lse, attention_weights
from attnkit.ops.linear import LinearAttentionState
from attnkit.paged_cache import PagedKVCache
from attnkit.registry import Mechanism, get, list_mechanisms, mechanism_info, register


def convert(model, mechanism: str = "hedgehog", **kwargs):
    """Swap a Hugging Face transformers model's attention to an attnkit mechanism in place, keeping its weights
    (see :func:`attnkit.integrations.transformers.convert`; needs ``attnkit[hf]``)."""
    from attnkit.integrations.transformers import convert as _convert

    return _convert(model, mechanism, **kwargs)


__all__ = [
    "ApproximationError", "LinearAttentionState", "Mechanism", "NotSupportedError", "approximation_error",
    "attention", "feature_maps", "get", "linear_attention", "list_mechanisms", "mechanism_info", "neighborhood",
    "normalizations", "not_supported_reasons", "patterns", "register", "score_mods", "__version__",
    "KVCache", "SlidingWindowCache", "AdaptiveKVCache", "RecurrentStateCache",
    "attention_weights", "attention_lse", "PagedKVCache",
    "gated_linear_attention", "delta_rule_attention",
    "list_backends", "explain",
    "convert",
]
