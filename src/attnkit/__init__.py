"""attnkit: the spectrum of attention mechanisms behind one PyTorch API.

Layout is ``[batch, heads, seq, dim]`` everywhere, as in ``torch.nn.functional.scaled_dot_product_attention``.
"""

from attnkit import normalizations, patterns, score_mods
from attnkit.errors import NotSupportedError
from attnkit.ops.exact.api import attention, not_supported_reasons
from attnkit.registry import Mechanism, get, list_mechanisms, mechanism_info, register

__version__ = "0.1.0"

__all__ = [
    "Mechanism", "NotSupportedError", "attention", "get", "list_mechanisms", "mechanism_info",
    "normalizations", "not_supported_reasons", "patterns", "register", "score_mods", "__version__",
]
