"""The public functional API over the dispatch (``attnkit.backends``): exact attention with patterns, score
modifiers and normalisations (``exact``), neighborhood attention (``neighborhood``), kernelized linear attention
(``linear``) and Star Attention (``star``). Each function checks its inputs, asks the dispatch which engine runs
the call, and calls that engine's kernel in ``attnkit.ops``."""

from attnkit.functional.exact import attention, not_supported_reasons
from attnkit.functional.linear import linear_attention
from attnkit.functional.neighborhood import NeighborhoodBias, neighborhood, neighborhood_bias
from attnkit.functional.star import star_attention, star_attention_distributed, star_pattern

__all__ = ["attention", "not_supported_reasons", "linear_attention", "neighborhood", "NeighborhoodBias",
           "neighborhood_bias", "star_attention", "star_attention_distributed", "star_pattern"]
