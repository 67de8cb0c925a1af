"""What the parts of the transformers integration share: the names it registers, the lazy import of
transformers' interfaces, the hand-over of a recurrent state layer from the cache to the attention, the key of a
(mechanism, params) spec.

Part of :mod:`attnkit.integrations.transformers`."""

from __future__ import annotations

from typing import Any

import torch

# The name ``convert`` sets: each layer runs its own ``attnkit_attention`` (exact softmax where it has none).
DISPATCH_NAME = "attnkit"
# The child module ``convert`` (and the named implementations) add to a transformers attention module.
CHILD = "attnkit_attention"


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "attnkit.integrations.transformers needs transformers (with AttentionInterface and "
            "AttentionMaskInterface); install it with `pip install 'attnkit[hf]'`"
        ) from exc
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


# (state layer, the key tensor its ``update`` returned): the model passes that very tensor to the attention next
_ACTIVE_STATE_LAYER: list[tuple[Any, torch.Tensor]] = []


def _take_state_layer(key: torch.Tensor) -> Any:
    """The state layer whose ``update`` returned ``key`` (identity, so a stale entry is never used)."""
    if not _ACTIVE_STATE_LAYER:
        return None
    layer, returned = _ACTIVE_STATE_LAYER.pop()
    return layer if returned is key else None


def _spec_key(mechanism: str, params: dict[str, Any]) -> tuple:
    return (mechanism, tuple(sorted((k, repr(v)) for k, v in params.items())))
