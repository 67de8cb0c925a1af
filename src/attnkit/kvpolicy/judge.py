"""Judge KV-cache policies on a trained model: recall accuracy and output error against the full cache, against
the KV bytes each policy holds (``attnkit kvcache``).

A model trained by ``attnkit quality`` on MQAR knows which keys matter (the pairs of its context). The sequence is
split at ``context_len`` (MQAR: the ``2 * num_kv_pairs`` pair tokens): the context is the prompt, prefilled
exactly; a policy then chooses, per layer, batch element and kv head, which context entries stay in the cache
from the prompt's attention profile (its last ``probe`` rows); every later token is a decoding step that attends
to the kept context and to all later tokens. That is what a compressing cache computes, evaluated in one forward
pass by giving each softmax layer the equivalent mask, so any policy runs on any batch at once.

The judge measures the compression of the context alone (the tokens after it are kept, whatever the policy); how
each policy also compresses generated tokens is measured by ``attnkit.kvpolicy.generation`` and
``benchmarks/bench_kv_generation.py``.

Policies (each from its paper, at several budgets): ``full``; ``window`` (StreamingLLM-style recent tokens);
``random`` (a baseline); ``fastgen`` (:func:`attnkit.cache.choose_policies`, recovery threshold);
``cumulative_mass`` (ZipVL, mass threshold ``tau``); ``probe_query`` (ActQKV, cut-off).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from attnkit import patterns as P
from attnkit.ops.exact.weights import attention_weights
from attnkit.ops.longctx.selection import cumulative_mass, probe_query_mask

__all__ = ["default_policies", "judge_policies"]

Policy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _budget_keep(score: torch.Tensor, fraction: float) -> torch.Tensor:
    keep = torch.zeros_like(score, dtype=torch.bool)
    top = max(1, math.ceil(fraction * score.shape[-1]))
    return keep.scatter(-1, score.topk(min(top, score.shape[-1]), dim=-1).indices, True)


def default_policies(fractions: Sequence[float] = (0.125, 0.25, 0.5, 0.75)) -> dict[str, list[tuple[str, Policy]]]:
    """``{policy: [(setting, fn(profile, q_ctx, k_ctx) -> keep [batch, kv_heads, ctx])]}`` at several budgets."""
    from attnkit.cache import choose_policies

    def window(f):
        return lambda p, q, k: _budget_keep(torch.arange(p.shape[-1], dtype=torch.float64).expand(
            *p.shape[:2], -1), f)

    def random(f):
        def fn(p, q, k):
            g = torch.Generator().manual_seed(0)
            return _budget_keep(torch.rand(*p.shape[:2], p.shape[-1], generator=g), f)
        return fn

    def fastgen(t):
        return lambda p, q, k: choose_policies(p, threshold=t)[1]

    def mass(t):
        return lambda p, q, k: cumulative_mass(p, t)

    def probe(f):
        return lambda p, q, k: probe_query_mask(q, k, window=min(16, q.shape[2]), num_probe=4,
                                                cutoff=max(1, math.ceil(f * k.shape[2])))

    return {
        "full": [("all", lambda p, q, k: torch.ones(*p.shape[:2], p.shape[-1], dtype=torch.bool))],
        "window": [(f"{f:g}", window(f)) for f in fractions],
        "random": [(f"{f:g}", random(f)) for f in fractions],
        "fastgen": [(f"T={t:g}", fastgen(t)) for t in (0.5, 0.8, 0.9, 0.95)],
        "cumulative_mass": [(f"tau={t:g}", mass(t)) for t in (0.5, 0.7, 0.9, 0.99)],
        "probe_query": [(f"{f:g}", probe(f)) for f in fractions],
    }


def _softmax_layers(model: nn.Module) -> dict[str, nn.Module]:
    from attnkit.nn.attention import MultiheadAttention

    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiheadAttention)}
    bad = [n for n, m in layers.items() if m.inner is not None]
    if not layers or bad:
        raise ValueError("KV-cache policies compress a softmax KV cache: the model needs attnkit.nn."
                         "MultiheadAttention layers with mechanism='softmax' (train one with `attnkit quality "
                         f"--mechanisms softmax --save DIR`); other layers: {bad}")
    return layers


def judge_policies(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                   context_len: int, policies: dict[str, list[tuple[str, Policy]]] | None = None, probe: int = 16,
                   progress: bool = True) -> list[dict[str, Any]]:
    """For every policy setting: ``accuracy`` at the scored positions after the context, ``output_error`` (relative
    Frobenius error of the logits there against the full cache), ``kept_fraction`` of the context entries, and
    ``kv_bytes`` (entries held at the end of the sequence x 2 x head_dim x element size, summed over layers and
    kv heads, per sequence)."""
    from attnkit.analysis import capture

    model.eval()
    layers = _softmax_layers(model)
    n = inputs.shape[1]
    if not 1 <= context_len < n:
        raise ValueError(f"context_len must lie in [1, {n - 1}], got {context_len}")
    policies = default_policies() if policies is None else policies
    scored = mask.clone()
    scored[:, :context_len] = False
    with torch.no_grad(), capture(model, store_qk=True) as cap:
        full = model(inputs)
    profiles = {}
    for rec in cap.records:
        mod = layers[rec.layer]
        q, k = rec.q[:, :, :context_len], rec.k[:, :, :context_len]
        rows = min(probe, context_len)
        w = attention_weights(q, k, pattern=P.causal(), queries=slice(context_len - rows, context_len))
        b, h = q.shape[:2]
        hkv = mod.kv_heads
        profiles[rec.layer] = (w.view(b, hkv, h // hkv, rows, context_len).mean(2).float(), q, k)

    def accuracy(logits):
        return float((logits.argmax(-1)[scored] == targets[scored]).float().mean()) if scored.any() else float("nan")

    base = full[scored]
    jobs = [(name, setting, fn) for name, settings in policies.items() for setting, fn in settings]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="kv policies", unit="setting", leave=False)
    results = []
    for name, setting, fn in jobs:
        keeps, saved = {}, {}
        for lname, mod in layers.items():
            prof, q, k = profiles[lname]
            keep = fn(prof if name != "fastgen" else _square_profile(q, k, mod.kv_heads), q, k).to(torch.bool)
            keeps[lname] = keep
            g = mod.num_heads // mod.kv_heads

            def allowed(b, h, qi, ki, keep=keep, g=g):
                kept = keep.to(ki.device)[b, h // g, ki.clamp(max=context_len - 1)]
                return (ki <= qi) & ((qi < context_len) | (ki >= context_len) | kept)

            saved[lname] = mod.pattern
            mod.pattern = P.custom(allowed)
        try:
            with torch.no_grad():
                logits = model(inputs)
        finally:
            for lname, mod in layers.items():
                mod.pattern = saved[lname]
        held = 0.0
        for lname, mod in layers.items():
            per_entry = 2 * mod.head_dim * full.element_size()
            held += float(keeps[lname].sum(-1).double().mean(0).sum()) * per_entry  # per sequence, all kv heads
            held += (n - context_len) * mod.kv_heads * per_entry
        kept = float(torch.stack([kp.float().mean() for kp in keeps.values()]).mean())
        out = logits[scored]
        results.append({"policy": name, "setting": setting, "accuracy": accuracy(logits),
                        "output_error": float((out - base).norm() / base.norm().clamp_min(1e-30)),
                        "kept_fraction": kept, "kv_bytes": held})
    return results


def _square_profile(q: torch.Tensor, k: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The prompt's full causal attention per kv head ``[batch, kv_heads, ctx, ctx]`` (FastGen profiles it)."""
    w = attention_weights(q, k, pattern=P.causal())
    b, h, n, _ = w.shape
    return w.view(b, kv_heads, h // kv_heads, n, n).mean(2).float()
