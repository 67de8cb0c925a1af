"""``torch.nn`` modules: projections, positional embeddings and cache plumbing around attnkit's functions.

Each family keeps its modules in its own submodule; this package re-exports their ``__all__``.
"""

from attnkit.nn.approx import *  # noqa: F401,F403
from attnkit.nn.approx import __all__ as _approx_all
from attnkit.nn.attention import MultiheadAttention
from attnkit.nn.exact import *  # noqa: F401,F403
from attnkit.nn.exact import __all__ as _exact_all
from attnkit.nn.linear import *  # noqa: F401,F403
from attnkit.nn.linear import __all__ as _linear_all
from attnkit.nn.mixers import *  # noqa: F401,F403
from attnkit.nn.mixers import __all__ as _mixers_all
from attnkit.nn.neighborhood import *  # noqa: F401,F403
from attnkit.nn.neighborhood import __all__ as _neighborhood_all
from attnkit.rotary import RotaryEmbedding, apply_rotary

__all__ = ["MultiheadAttention", "RotaryEmbedding", "apply_rotary", *_linear_all, *_neighborhood_all, *_approx_all,
           *_exact_all, *_mixers_all]
