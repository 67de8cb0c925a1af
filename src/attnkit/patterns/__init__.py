"""Attention patterns: which (query, key) pairs may attend (see :mod:`attnkit.patterns.base` for the protocol).

``base``: the ``Pattern`` protocol, its tile classification, and the sequence patterns; ``grid``: grid,
per-head and hierarchical patterns;
``windows`` and ``spatial``: neighborhood attention's windows over a 1/2/3-D grid and their pattern.
Every name is re-exported here: ``attnkit.patterns.causal()``, ``attnkit.patterns.neighborhood(...)``.
"""

from attnkit.patterns.base import *  # noqa: F401,F403
from attnkit.patterns.base import (  # noqa: F401  (internal names other modules and tests use)
    _INF,
    _And,
    _as_pattern,
    _Band,
    _classify_by_evaluation,
    _Custom,
    _Document,
    _Full,
    _GlobalTokens,
    _KeyBelow,
    _Not,
    _Or,
)
from attnkit.patterns.base import __all__ as _base_all
from attnkit.patterns.grid import *  # noqa: F401,F403
from attnkit.patterns.grid import __all__ as _grid_all
from attnkit.patterns.grid import _Axial, _Halo, _HaloBlockMajor, _Hierarchical  # noqa: F401
from attnkit.patterns.spatial import neighborhood

__all__ = [*_base_all, *_grid_all, "neighborhood"]
