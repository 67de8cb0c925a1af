"""Neighborhood attention in 1, 2 and 3 spatial dimensions: NA, dilated NA, causal NA and strided (GNA) NA.

Papers: "Neighborhood Attention Transformer", "Faster Neighborhood Attention", "Generalized Neighborhood
Attention" (and DiNAT for dilation). Semantics in ``attnkit.patterns.windows`` (the pattern in
``attnkit.patterns.spatial``); the public function in ``attnkit.functional.neighborhood``; the explicit-mask
reference in ``reference``; the tiled fast path in ``engine``; the speed-of-light model in ``speed``.
"""

from attnkit.ops.neighborhood.reference import neighborhood_reference
from attnkit.ops.neighborhood.speed import neighborhood_speed_of_light
from attnkit.patterns.spatial import NeighborhoodPattern, neighborhood_pattern

__all__ = ["neighborhood_pattern", "NeighborhoodPattern", "neighborhood_reference",
           "neighborhood_speed_of_light"]
