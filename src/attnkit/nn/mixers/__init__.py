"""attnkit.nn modules of the mixers family: attention-free and convolutional token mixers (issue 12).

Every module maps ``x [batch, seq, dim]`` (1-D) or ``x [batch, height, width, dim]`` (2-D papers) to the same
shape, exposes ``forward`` (the fast path) and ``reference`` (the plain computation with the same weights), and
the recurrent ones a causal ``step``. The math lives in :mod:`attnkit.ops.mixers`; each class names its paper
and the equations it implements. One file per kind of mixer: ``aft``, ``scan``, ``channel``, ``conv``,
``spatial``, ``pooling``.
"""

from attnkit.nn.mixers.aft import AFTConv, AFTFull, AFTLocal, AFTSimple, SwiftFormerMixer
from attnkit.nn.mixers.channel import XCA, ChannelGroupAttention, LambdaLayer
from attnkit.nn.mixers.conv import CKConv, ConvBERTMixer, DynamicConv, LightConv, SMPConv
from attnkit.nn.mixers.pooling import Extractor, HrrformerMixer, PoNetMixer
from attnkit.nn.mixers.scan import SCAN_ORDERS, MambaND, Mega  # noqa: F401 (SCAN_ORDERS: attnkit.nn.mixers.SCAN_ORDERS)
from attnkit.nn.mixers.spatial import (
    LKCA,
    AdaptiveFrequencyFilter,
    LargeKernelAttention,
    MetaMixer,
    ParCNetV2Mixer,
    SpectralGating,
)

__all__ = [
    "AFTFull", "AFTSimple", "AFTLocal", "AFTConv", "Mega", "XCA", "ChannelGroupAttention", "LambdaLayer",
    "LightConv", "DynamicConv", "ConvBERTMixer", "SwiftFormerMixer", "LargeKernelAttention", "LKCA",
    "ParCNetV2Mixer", "AdaptiveFrequencyFilter", "SpectralGating", "PoNetMixer", "HrrformerMixer", "CKConv",
    "SMPConv", "MambaND", "MetaMixer", "Extractor",
]
