"""Head masking and rank collapse on real modules.

- :func:`ablate_heads`, :func:`head_importance`: zero chosen heads' outputs before the output projection of
  ``attnkit.nn.MultiheadAttention`` layers and measure the change of a loss (head importance by pruning, as in
  Michel et al. and "How Does Attention Work in Vision Transformers?").
- :func:`rank_collapse_curve`: Dong et al., "Attention is Not All You Need" (2021): the relative residual
  ``||res(X_l)|| / ||X_l||`` after each of a stack of attention layers, with or without skip connections.
- :func:`layer_inputs`: the hidden states entering each attention module of a model (the rank-collapse curve of a
  trained model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .diagnostics import relative_residual

__all__ = ["attention_modules", "ablate_heads", "head_importance", "rank_collapse_curve", "layer_inputs"]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """attnkit's attention modules of ``model`` (``attnkit.nn.MultiheadAttention`` and every module marked
    ``records_attention``) by qualified name, in order."""
    return {name or type(m).__name__: m for name, m in model.named_modules()
            if getattr(m, "records_attention", False)}


def _resolve(model: nn.Module, key: str | nn.Module) -> nn.Module:
    if isinstance(key, nn.Module):
        return key
    mods = attention_modules(model)
    if key not in mods:
        raise ValueError(f"no attnkit.nn.MultiheadAttention named {key!r} in the model; its attention modules are "
                         f"{list(mods)}")
    return mods[key]


@contextlib.contextmanager
def ablate_heads(model: nn.Module, heads: Mapping[str | nn.Module, Sequence[int]]) -> Iterator[None]:
    """Within the block, the listed heads of each layer contribute nothing: their slice of the input of
    ``out_proj`` is zeroed. ``heads``: ``{layer name or module: [head indices]}``."""
    hooks = []
    try:
        for key, idx in heads.items():
            module = _resolve(model, key)
            if getattr(module, "is_mixer", False):
                raise ValueError(f"layer {key!r} runs the token mixer {module.mechanism!r} (no attention heads to "
                                 f"mask); mask heads of attention layers")
            hd, nh = module.head_dim, module.num_heads
            bad = [h for h in idx if not 0 <= h < nh]
            if bad:
                raise ValueError(f"heads {bad} out of range for a layer with {nh} heads")
            keep = torch.ones(nh * hd)
            for h in idx:
                keep[h * hd:(h + 1) * hd] = 0

            def pre_hook(_mod, args, keep=keep):
                (x,) = args
                return (x * keep.to(device=x.device, dtype=x.dtype),)

            hooks.append(module.out_proj.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for h in hooks:
            h.remove()


def head_importance(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], *,
                    layers: Sequence[str] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """``loss(with head h of layer l ablated) - loss`` for every head: ``{layer: [heads]}``. ``loss_fn(model)``
    evaluates the model (e.g. on a fixed batch) and returns a scalar."""
    mods = attention_modules(model)
    names = list(mods) if layers is None else list(layers)
    with torch.no_grad():
        base = float(loss_fn(model))
        jobs = [(name, h) for name in names for h in range(_resolve(model, name).num_heads)]
        if progress:
            from tqdm.auto import tqdm

            jobs = tqdm(jobs, desc="head importance", unit="head", leave=False)
        out = {name: torch.zeros(_resolve(model, name).num_heads, dtype=torch.float64) for name in names}
        for name, h in jobs:
            with ablate_heads(model, {name: [h]}):
                out[name][h] = float(loss_fn(model)) - base
    return out


def rank_collapse_curve(layers: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, *,
                        skip: bool = False, mlp: Sequence[Callable] | None = None) -> torch.Tensor:
    """Relative residual ``||res(X_l)|| / ||X_l||`` of ``x [batch, tokens, dim]`` after each layer (index 0 is the
    input): ``[len(layers) + 1, batch]``. Each step is ``X <- layer(X)`` (pure attention, Dong et al.'s SAN) or
    ``X <- X + layer(X)`` with ``skip=True``; ``mlp`` adds ``X <- X + mlp_l(X)`` after each layer."""
    curve = [relative_residual(x)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            y = layer(x)
            x = x + y if skip else y
            if mlp is not None:
                x = x + mlp[i](x)
            curve.append(relative_residual(x))
    return torch.stack(curve)


def layer_inputs(model: nn.Module, *args, **kwargs) -> dict[str, torch.Tensor]:
    """Run ``model(*args, **kwargs)`` and return the hidden state ``[batch, tokens, dim]`` entering each
    attention module, by name, plus ``"output"`` (the model's output when it is a tensor)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in attention_modules(model).items():
        hooks.append(module.register_forward_pre_hook(
            lambda _m, a, name=name: seen.setdefault(name, a[0].detach())))
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(out, torch.Tensor):
        seen["output"] = out.detach()
    return seen
