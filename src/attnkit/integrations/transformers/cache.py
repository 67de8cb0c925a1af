"""A transformers cache that holds recurrent states only (``state_cache``).

Part of :mod:`attnkit.integrations.transformers`."""

from __future__ import annotations

from typing import Any

import torch

from attnkit.errors import NotSupportedError
from attnkit.integrations.transformers._common import _ACTIVE_STATE_LAYER, _interfaces
from attnkit.ops.linear.state import LinearAttentionState

# ------------------------------------------------------------------------------------------------------------
# A transformers cache that holds recurrent states only
# ------------------------------------------------------------------------------------------------------------

_STATE_CLASSES: tuple[type, type] | None = None


def _state_classes() -> tuple[type, type]:
    """``(StateLayer, StateCache)``, defined on first use (transformers is optional)."""
    global _STATE_CLASSES
    if _STATE_CLASSES is not None:
        return _STATE_CLASSES
    _interfaces()
    from transformers.cache_utils import Cache, CacheLayerMixin

    class StateLayer(CacheLayerMixin):
        """One layer's :class:`~attnkit.ops.linear.state.LinearAttentionState` (``S [batch, heads, m, d_v]``,
        ``z``) and the number of tokens it has seen; ``update`` stores no keys or values."""

        is_sliding = False
        is_croppable = False

        def __init__(self, **kwargs: Any):
            super().__init__()
            self.state: LinearAttentionState | None = None
            self.seen = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device, self.is_initialized = key_states.device, True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            _ACTIVE_STATE_LAYER[:] = [(self, key_states)]
            return key_states, value_states  # the attention sees the new tokens; the past is in the state

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, self.seen  # keys are the new tokens, at absolute positions seen, seen + 1, ...

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.state, self.seen = None, 0

        def _map(self, fn) -> None:
            if self.state is not None:
                self.state = LinearAttentionState(fn(self.state.S), fn(self.state.z), self.state.offset)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._map(lambda t: t[indices])

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove:
                raise NotSupportedError("a recurrent state cannot drop tokens; use the model's default cache")

        @property
        def nbytes(self) -> int:
            return 0 if self.state is None else self.state.nbytes

    class StateCache(Cache):
        """A transformers ``Cache`` whose layers hold only attnkit's recurrent states: O(1) memory in the sequence
        length. Every attention layer must run causal kernelized linear attention (``attnkit.convert(model,
        "hedgehog")`` and the other ``linear`` family mechanisms)."""

        def __init__(self) -> None:
            super().__init__(layer_class_to_replicate=StateLayer)

        @property
        def nbytes(self) -> int:
            """Bytes held by all the layers' states."""
            return sum(layer.nbytes for layer in self.layers)

    _STATE_CLASSES = (StateLayer, StateCache)
    return _STATE_CLASSES


def state_cache() -> Any:
    """A transformers cache that keeps only attnkit's recurrent state per layer (``S [batch, heads, m, d_v]`` and
    ``z [batch, heads, m]``), for a model whose attention layers were all converted to causal linear attention:
    ``model.generate(ids, cache=attnkit.integrations.transformers.state_cache())`` decodes with memory constant in
    the sequence length, where the default cache grows with every key and value. Beam search reorders the states.
    ``.nbytes``: the memory held."""
    return _state_classes()[1]()
