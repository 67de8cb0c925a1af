"""Registration with transformers (``register``) and in-place conversion of an existing model (``convert``).

Part of :mod:`attnkit.integrations.transformers`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnkit.errors import NotSupportedError
from attnkit.integrations.transformers._common import CHILD, DISPATCH_NAME, _interfaces, _spec_key
from attnkit.integrations.transformers.attention import AttnkitAttention

# ------------------------------------------------------------------------------------------------------------
# Registration with transformers
# ------------------------------------------------------------------------------------------------------------

_SOFTMAX = AttnkitAttention("softmax")


def _make_attention_function(spec: tuple[str, dict[str, Any]] | None):
    """The function transformers calls. ``spec=None``: the dispatcher (each layer's own ``attnkit_attention``,
    exact softmax where there is none); otherwise ``(mechanism, params)`` for every layer."""

    def attnkit_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, sliding_window: int | None = None,
                                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        for unsupported in ("position_bias", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotSupportedError(f"attnkit attention does not take {unsupported}= (this model needs it); "
                                        f"keep the model's own attn_implementation")
        att = getattr(module, CHILD, None)
        if spec is None:
            att = att if isinstance(att, AttnkitAttention) else _SOFTMAX
        else:
            # parameters from register(), overridden by the model config's ``attnkit_params`` dict
            params = {**spec[1], **(getattr(getattr(module, "config", None), "attnkit_params", None) or {})}
            if not isinstance(att, AttnkitAttention) or att.spec != _spec_key(spec[0], params):
                att = _attach(module, spec[0], params, label=type(module).__name__)
        out = att.hf_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             sliding_window=sliding_window, is_causal=is_causal, softcap=kwargs.get("softcap"),
                             position_ids=kwargs.get("position_ids"))
        return out.transpose(1, 2).contiguous(), None

    return attnkit_attention_forward


def _register_name(name: str, spec) -> str:
    attention_interface, mask_interface, sdpa_mask = _interfaces()
    attention_interface.register(name, _make_attention_function(spec))
    mask_interface.register(name, sdpa_mask)  # boolean masks, None when SDPA's is_causal would do
    return name


def register(mechanism: str = "softmax", *, name: str | None = None, **params: Any) -> str:
    """Register attnkit ``mechanism`` (built with ``params``) with transformers; returns the name to pass as
    ``attn_implementation`` (default ``"attnkit_<mechanism>"``; registering a name again replaces it).

    Every attention layer of a model using the name runs the mechanism; parameters of the mechanism are
    created on each layer's first call (as the layer's ``attnkit_attention`` child). A model config's
    ``attnkit_params`` dict (e.g. ``LlamaConfig(..., attnkit_params={"window": 64})``) overrides ``params`` for
    that model. To choose layers, or to create trainable parameters before training, use :func:`convert`.

    Example::

        name = attnkit.integrations.transformers.register("softmax")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    """
    if mechanism != "softmax":
        AttnkitAttention(mechanism, params=params)  # validates the name and its kind now, not at the first call
    elif params:
        raise ValueError(f"mechanism 'softmax' takes no parameters, got {sorted(params)}")
    if name is None:
        name = f"attnkit_{mechanism}"
    if not isinstance(name, str) or not name or name == DISPATCH_NAME:
        raise ValueError(f"name must be a non-empty string other than {DISPATCH_NAME!r} (used by convert), "
                         f"got {name!r}")
    return _register_name(name, (mechanism, dict(params)))


# ------------------------------------------------------------------------------------------------------------
# Conversion of an existing model
# ------------------------------------------------------------------------------------------------------------

def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of a transformers model that call the attention interface, in model order: modules
    with a ``config`` that carries ``_attn_implementation`` and an ``is_causal`` attribute (Llama, Mistral,
    GPT-2, ViT and the other models written against ``AttentionInterface``)."""
    found = []
    for path, m in model.named_modules():
        cfg = getattr(m, "config", None)
        if ("Attention" in type(m).__name__ and hasattr(m, "is_causal") and cfg is not None
                and hasattr(cfg, "_attn_implementation")):
            found.append((path, m))
    return found


def _shapes(module: nn.Module) -> tuple[int | None, int | None]:
    cfg = module.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(module, "num_heads", None)
    head_dim = (getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
                or getattr(cfg, "head_dim", None))
    if head_dim is None and heads:
        head_dim = cfg.hidden_size // heads
    return heads, head_dim


def _attach(module: nn.Module, mechanism: str, params: dict[str, Any], *, label: str,
            seq_len: int | None = None) -> AttnkitAttention:
    heads, head_dim = _shapes(module)
    cfg = module.config
    seq_len = seq_len or getattr(cfg, "max_position_embeddings", None)
    if seq_len is None and getattr(cfg, "image_size", None) and getattr(cfg, "patch_size", None):
        seq_len = (int(cfg.image_size) // int(cfg.patch_size)) ** 2 + 1  # ViT: patches and the class token
    att = AttnkitAttention(mechanism, num_heads=heads, head_dim=head_dim, seq_len=seq_len, label=label,
                           params=params)
    weight = next(module.parameters(), None)
    if mechanism != "softmax":
        att.mechanism_module(bool(getattr(module, "is_causal", False)),
                             weight.device if weight is not None else None)
    module.add_module(CHILD, att)
    att.train(module.training)
    return att


def convert(model: nn.Module, mechanism: str = "hedgehog", *, layers: Sequence[int] | None = None,
            seq_len: int | None = None, **params: Any) -> nn.Module:
    """Swap the attention of ``model`` (a transformers model) to attnkit ``mechanism`` in place, keeping its
    weights; returns ``model``.

    Args:
        mechanism: a registered attention mechanism (``attnkit list``), e.g. ``"hedgehog"`` (trainable feature
            maps, for :func:`distill`), ``"performer"``, ``"sliding_window"``; ``"softmax"`` restores exact
            attention on the chosen layers.
        layers: indices into :func:`attention_modules` (model order; negative indices count from the end);
            ``None``: every attention layer. The other layers keep their current attnkit mechanism, or exact
            softmax.
        seq_len: for mechanisms that need a fixed length (default: the config's ``max_position_embeddings``, or a
            ViT's patches plus its class token).
        params: the mechanism's parameters (``attnkit.get(mechanism, **params)``).

    Each chosen module gets an ``attnkit_attention`` child (:class:`AttnkitAttention`) holding the mechanism and
    its parameters (on the module's device), and the model's ``attn_implementation`` becomes ``"attnkit"``.
    """
    _interfaces()  # ImportError with the install hint when transformers is missing
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (a torch.nn.Module), got {type(model).__name__}")
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"found no attention module calling transformers' AttentionInterface in "
                         f"{type(model).__name__}; convert works on transformers models (Llama, Mistral, GPT-2, "
                         f"ViT, ...)")
    if layers is None:
        chosen = list(range(len(mods)))
    else:
        chosen = []
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -len(mods) <= i < len(mods):
                raise ValueError(f"layers must hold ints in [-{len(mods)}, {len(mods)}) (the model has {len(mods)} "
                                 f"attention layers), got {i!r}")
            chosen.append(i % len(mods))
    for i in chosen:
        path, module = mods[i]
        _attach(module, mechanism, params, label=path, seq_len=seq_len)
    _register_name(DISPATCH_NAME, None)
    _set_implementation(model, DISPATCH_NAME)
    return model


def _set_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    if getattr(model, "config", None) is not None and model.config._attn_implementation != name:
        raise RuntimeError(f"could not switch {type(model).__name__} to attn_implementation={name!r}")


def converted_layers(model: nn.Module) -> list[AttnkitAttention]:
    """The :class:`AttnkitAttention` children of ``model`` that run a mechanism other than softmax."""
    return [m for m in model.modules() if isinstance(m, AttnkitAttention) and m.mechanism != "softmax"]
