"""Long generations under KV-cache policies: the bytes each policy holds and the attention it recalls, against
tokens generated (issue 25: the policies compress what is generated, not only the prompt).

A model from :mod:`attnkit.quality` (randomly initialised or trained; learned positions, no short convolution)
generates token by token with one cache per layer. Every cache is wrapped in a :class:`RecordingCache`, which
also keeps every key and value the layer produced, so that at every step it measures

* ``bytes``: what the policy holds (``held_bytes``: entries held, low-bit ones as codes + scales);
* ``recall``: the attention mass that dense softmax attention of the step's queries puts on the entries the
  policy holds (itself included), averaged over batch and heads: 1 for the full cache;
* ``error`` (with ``check=True``): the largest difference between the cache's output and dense attention over
  every key under the policy's mask (held entries at the precision held): the cache computes exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnkit._checks import default_scale, repeat_kv

__all__ = ["RecordingCache", "held_bytes", "held_mask", "generate", "default_caches"]


def held_mask(cache: Any, batch: int, kv_heads: int, seen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(held, low) [batch, kv_heads, seen]`` bool: the positions ``cache`` holds now, and those held at low
    precision (ZipVL)."""
    none = torch.zeros(batch, kv_heads, seen, dtype=torch.bool, device=device)
    if seen == 0:
        return none, none
    if hasattr(cache, "held_precision"):
        prec = cache.held_precision()
        return prec > 0, prec == 1
    if hasattr(cache, "held_positions"):
        return cache.held_positions(), none
    if hasattr(cache, "window"):  # SlidingWindowCache
        held = none.clone()
        held[..., max(0, seen - cache.window):] = True
        return held, none
    return ~none, none


def held_bytes(cache: Any) -> int:
    """Bytes of the entries a cache holds (a full ``KVCache``: its tokens, not its preallocated capacity)."""
    if hasattr(cache, "held_bytes"):
        return int(cache.held_bytes)
    if getattr(cache, "lengths", None) is not None and getattr(cache, "k", None) is not None:
        k, v = cache.k, cache.v
        per = k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()
        return int(cache.lengths.sum()) * k.shape[1] * per
    return int(cache.nbytes)


class RecordingCache:
    """Delegates to ``inner`` (any attnkit cache) and records, per ``attend``, the bytes held, the attention
    recall and (``check=True``) the output's distance from dense attention under the held mask. Attributes not
    defined here are the inner cache's."""

    def __init__(self, inner: Any, *, check: bool = False):
        self.inner, self.check = inner, check
        self.all_k: torch.Tensor | None = None
        self.all_v: torch.Tensor | None = None
        self.bytes: list[int] = []
        self.recall: list[float] = []
        self.error: list[float] = []

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        return self.inner.positions(n, lengths)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        seen = 0 if self.all_k is None else self.all_k.shape[2]
        per_step = hasattr(self.inner, "last_attended")  # selects while attending (ActQKV's retrieval)
        held, low = held_mask(self.inner, b, hkv, seen, k.device) if seen and not per_step else (None, None)
        out = self.inner.attend(q, k, v, **kwargs)
        if seen and per_step:
            held, low = self.inner.last_attended(), torch.zeros(b, hkv, seen, dtype=torch.bool, device=k.device)
        self.all_k = k if self.all_k is None else torch.cat([self.all_k, k], 2)
        self.all_v = v if self.all_v is None else torch.cat([self.all_v, v], 2)
        if seen:  # decoding steps (the prompt is exact)
            kk, vv = self.all_k, self.all_v
            qpos = torch.arange(seen, seen + n, device=q.device)
            kpos = torch.arange(seen + n, device=q.device)
            causal = kpos.view(1, -1) <= qpos.view(-1, 1)  # [n, seen + n]
            mask = torch.cat([held, torch.ones(b, hkv, n, dtype=torch.bool, device=q.device)], 2)
            mask = repeat_kv(mask[:, :, None, :].expand(b, hkv, n, seen + n), h) & causal
            s = (q.double() @ repeat_kv(kk, h).double().transpose(-1, -2)) * default_scale(q, kwargs.get("scale"))
            dense = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
            self.recall.append(float((dense * mask).sum(-1).mean()))
            if self.check:
                ke, ve = kk, vv
                if low.any():
                    from attnkit.ops.longctx.selection import dequantize, quantize

                    bits = self.inner.low_bits
                    lo = torch.cat([low, torch.zeros(b, hkv, n, dtype=torch.bool, device=q.device)], 2)[..., None]
                    ke = torch.where(lo, dequantize(*quantize(kk, bits)).to(kk.dtype), kk)
                    ve = torch.where(lo, dequantize(*quantize(vv, bits)).to(vv.dtype), vv)
                s = (q.double() @ repeat_kv(ke, h).double().transpose(-1, -2)) * default_scale(q, kwargs.get("scale"))
                ref = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ repeat_kv(ve, h).double()
                self.error.append(float((out.double() - ref).abs().max()))
        self.bytes.append(held_bytes(self.inner))
        return out


def _token_mask(ids: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
    return torch.isin(ids, torch.as_tensor(list(members), dtype=ids.dtype, device=ids.device)) if members else \
        torch.zeros_like(ids, dtype=torch.bool)


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: torch.Tensor, steps: int, make_cache: Callable[[int], Any], *,
             special_ids: Sequence[int] = (0,), punct_ids: Sequence[int] = (), temperature: float = 1.0,
             seed: int = 0, check: bool = False) -> dict[str, Any]:
    """Generate ``steps`` tokens after ``prompt [batch, n]`` with ``model`` (an :class:`attnkit.quality.model.
    QualityModel` with learned positions: ``conv_kernel=0``), one ``make_cache(layer)`` per layer.

    Sampling at ``temperature`` (0: greedy), seeded. FastGen caches are told which tokens are special
    (``special_ids``) and punctuation (``punct_ids``) through ``mark_next``. Returns ``{"tokens": [batch, n +
    steps], "bytes": [steps] (all layers), "recall": [steps] (mean over layers), "error": [steps] (max over
    layers, ``check=True``), "caches": the RecordingCaches}``.
    """
    if getattr(model, "conv_kernel", 0) or getattr(model, "pos", None) is None:
        raise ValueError("generate() decodes token by token: build the QualityModel with conv_kernel=0 (learned "
                         "positions; `attnkit quality --no-conv`)")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, n >= 1] token ids, got {tuple(prompt.shape)}")
    total = prompt.shape[1] + steps
    if total > model.max_seq_len:
        raise ValueError(f"prompt + steps = {total} exceeds the model's max_seq_len={model.max_seq_len}")
    model.eval()
    caches = [RecordingCache(make_cache(i), check=check) for i in range(len(model.blocks))]
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    tokens = prompt

    def forward(ids: torch.Tensor, start: int) -> torch.Tensor:
        for c in caches:
            if hasattr(c.inner, "mark_next"):
                c.inner.mark_next(special=_token_mask(ids, special_ids), punct=_token_mask(ids, punct_ids))
        x = model.embed(ids) + model.pos[start:start + ids.shape[1]]
        for block, cache in zip(model.blocks, caches):
            x = x + block.mixer(block.norm1(x), cache=cache)
            x = x + block.mlp(block.norm2(x))
        return model.readout(model.norm(x[:, -1]))

    logits = forward(prompt, 0)
    for t in range(steps):
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits.double() / temperature, -1), 1, generator=gen)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        logits = forward(nxt, prompt.shape[1] + t)
    steps_of = [len(c.recall) for c in caches]
    return {"tokens": tokens,
            "bytes": [sum(c.bytes[i + 1] for c in caches) for i in range(steps)],
            "recall": [sum(c.recall[i] for c in caches) / len(caches) for i in range(min(steps_of))],
            "error": [max(c.error[i] for c in caches) for i in range(min(steps_of))] if check else [],
            "caches": caches}


def default_caches(*, window: int = 32, interval: int = 64, num_layers: int = 2, budget: int = 64
                   ) -> dict[str, Callable[[int], Any]]:
    """``{label: make_cache(layer)}``: the full cache and each paper's policy at a typical setting (softmax
    models; NAtS needs a ``neural_attention_search`` model). ActQKV's dynamic cut-off shares ``budget`` retrieved
    keys per step among ``num_layers`` layers, plus a local ``window`` and the first token."""
    from attnkit.cache import AdaptiveKVCache, KVCache
    from attnkit.ops.longctx.selection import CutoffAllocator, cumulative_mass, probe_query_mask
    from attnkit.selective_cache import ActQKVCache, SelectiveKVCache

    def actqkv(p, q, k):
        return probe_query_mask(q, k, window=q.shape[2], num_probe=max(1, q.shape[2] // 4),
                                cutoff=max(1, math.ceil(0.5 * k.shape[2])))

    shared: dict[str, CutoffAllocator] = {}

    def actqkv_dynamic(i):  # one allocator per generation, shared by its layers (made for layer 0)
        if i == 0:
            shared["allocator"] = CutoffAllocator(num_layers, budget, k_min=4, history=16)
        return ActQKVCache(shared["allocator"], i, window=window, init=1)

    return {
        "full": lambda i: KVCache(),
        "FastGen T=0.9": lambda i: AdaptiveKVCache(threshold=0.9, local_ratio=0.1, frequent_ratio=0.1),
        "FastGen T=0.5": lambda i: AdaptiveKVCache(threshold=0.5, local_ratio=0.1, frequent_ratio=0.1),
        "ZipVL tau=0.9, 4-bit rest": lambda i: SelectiveKVCache(lambda p, q, k: cumulative_mass(p, 0.9),
                                                                low_bits=4, interval=interval),
        "ZipVL tau=0.9, dropped": lambda i: SelectiveKVCache(lambda p, q, k: cumulative_mass(p, 0.9),
                                                             interval=interval),
        "ActQKV 50%": lambda i: SelectiveKVCache(actqkv, interval=interval),
        f"ActQKV dynamic cut-off ({budget} keys / step)": actqkv_dynamic,
    }
