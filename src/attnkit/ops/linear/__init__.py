"""Kernelized linear attention: feature maps (``attnkit.feature_maps``) run in parallel, chunked (Lightning
Attention-2) or recurrent mode, with optional per-head decay and three output normalisations; and the gated
engine (``gated``): per-token data-dependent decay (GLA) and the (gated) delta rule, recurrent and chunked."""

from attnkit.ops.linear.gated import (
    delta_rule_attention,
    delta_rule_reference,
    gated_linear_attention,
    gated_linear_attention_reference,
)
from attnkit.ops.linear.reference import linear_attention_reference
from attnkit.ops.linear.state import LinearAttentionState

__all__ = ["linear_attention_reference", "LinearAttentionState", "gated_linear_attention",
           "gated_linear_attention_reference", "delta_rule_attention", "delta_rule_reference"]
