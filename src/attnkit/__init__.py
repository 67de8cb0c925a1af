"""attnkit: the spectrum of attention mechanisms behind one PyTorch API.

Layout is ``[batch, heads, seq, dim]`` everywhere, as in ``torch.nn.functional.scaled_dot_product_attention``.
"""

from attnkit.registry import Mechanism, get, list_mechanisms, mechanism_info, register

__version__ = "0.1.0"

__all__ = ["Mechanism", "get", "list_mechanisms", "mechanism_info", "register", "__version__"]
