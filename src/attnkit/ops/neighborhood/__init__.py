"""Neighborhood attention in 1, 2 and 3 spatial dimensions: NA, dilated NA, causal NA and strided (GNA) NA.

Papers: "Neighborhood Attention Transformer", "Faster Neighborhood Attention", "Generalized Neighborhood
Attention" (and DiNAT for dilation). Semantics in ``windows``; the explicit-mask reference in ``reference``;
the tiled fast path in ``engine``; the speed-of-light model in ``speed``.
"""

from attnkit.ops.neighborhood.api import NeighborhoodBias, neighborhood, neighborhood_bias
from attnkit.ops.neighborhood.pattern import NeighborhoodPattern, neighborhood_pattern
from attnkit.ops.neighborhood.reference import neighborhood_reference
from attnkit.ops.neighborhood.speed import neighborhood_speed_of_light

__all__ = ["neighborhood", "neighborhood_pattern", "NeighborhoodPattern", "neighborhood_reference",
           "NeighborhoodBias", "neighborhood_bias", "neighborhood_speed_of_light"]
