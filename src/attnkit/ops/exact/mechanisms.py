"""Registry records of the exact family: dense softmax, sparse patterns, other normalisations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit.registry import Mechanism, register

from .api import attention


def _dense_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
                 density: float = 1.0, **_: Any) -> float:
    # QK^T and PV: 2 multiply-adds per (query, key, channel) pair each.
    if causal:
        density = density * (q_len + 1) / (2 * q_len) if q_len == kv_len else density
    return 4.0 * batch * heads * q_len * kv_len * head_dim * density


def _pattern_mechanism(name: str, paper: str, make: Callable[..., P.Pattern], summary: str,
                       bench_params: dict, in_default_bench: bool = False) -> Mechanism:
    """A mechanism that is exact softmax attention restricted to a pattern (tiled engine)."""

    def pattern_for(seq_len: int | None = None, causal: bool = False, **params) -> P.Pattern:
        p = make(**params)
        return P.causal() & p if causal else p

    def factory(causal: bool = False, **params):
        pattern = pattern_for(causal=causal, **params)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(q, k, v, pattern=pattern)

        run.pattern = pattern  # type: ignore[attr-defined]
        return run

    def flops(batch, heads, q_len, kv_len, head_dim, causal=False, **params):
        density = pattern_for(causal=causal, **params).density(q_len, kv_len)
        return _dense_flops(batch, heads, q_len, kv_len, head_dim, density=density)

    return Mechanism(
        name=name, family="exact", paper=paper, exact=True, complexity="O(n * w * d)", causal=True,
        factory=factory, summary=summary, bench_params=bench_params, in_default_bench=in_default_bench,
        flops=flops, extras={"pattern": pattern_for},
    )


def _dense_factory(normalization: str = "softmax", **fixed):
    def factory(causal: bool = False, **params):
        norm = params.pop("normalization", normalization)
        if norm == "sinkhorn" or (isinstance(norm, str) and norm.startswith("sinkhorn")):
            from attnkit.normalizations import sinkhorn

            norm = sinkhorn(params.pop("iterations", 3))
        if params:
            raise TypeError(f"unexpected parameters {sorted(params)}")
        pattern = P.causal() if causal else None

        def run(q, k, v):
            return attention(q, k, v, pattern=pattern, normalization=norm)

        run.pattern = pattern  # type: ignore[attr-defined]
        return run

    return factory


register(Mechanism(
    name="softmax", family="exact", paper="Attention Is All You Need (via torch SDPA)", exact=True,
    complexity="O(n^2 d)", causal=True, factory=_dense_factory(), in_default_bench=True,
    summary="dense softmax attention; dispatches to torch scaled_dot_product_attention", flops=_dense_flops,
    extras={"pattern": lambda seq_len=None, causal=False, **_: P.causal() if causal else P.full()},
))

register(_pattern_mechanism(
    "sliding_window", "Local Self-Attention over Long Text for Efficient Document Retrieval",
    lambda window=256: P.sliding_window(window), "exact softmax over keys within `window` positions",
    {"window": 256}, in_default_bench=True,
))
register(_pattern_mechanism(
    "dilated", "Generating Long Sequences with Sparse Transformers (dilated window)",
    lambda window=64, dilation=4: P.dilated(window, dilation), "every `dilation`-th key within the window",
    {"window": 64, "dilation": 4},
))
register(_pattern_mechanism(
    "block_local", "Block-Attention for Efficient RAG / Local Self-Attention over Long Text",
    lambda block_size=256: P.block_local(block_size), "attention within fixed blocks", {"block_size": 256},
))
register(_pattern_mechanism(
    "strided", "Generating Long Sequences with Sparse Transformers",
    lambda stride=128: P.strided(stride, causal=False), "local window plus every stride-th key (union of heads)",
    {"stride": 128},
))
register(_pattern_mechanism(
    "fixed", "Generating Long Sequences with Sparse Transformers",
    lambda block_size=128, num_summary=16: P.fixed(block_size, num_summary, causal=False),
    "own block plus the summary positions of every block", {"block_size": 128, "num_summary": 16},
))
register(_pattern_mechanism(
    "longformer", "Longformer-style sliding window with global tokens",
    lambda window=256, num_global=16: P.sliding_window(window) | P.global_tokens(range(num_global), strict=False),
    "sliding window plus global tokens", {"window": 256, "num_global": 16},
))

for _norm, _paper, _summary in [
    ("sigmoid", "Theory, Analysis, and Best Practices for Sigmoid Self-Attention", "sigmoid(s - log n), no row sum"),
    ("relu", "Replacing softmax with ReLU in Vision Transformers", "relu(s) / n"),
    ("softplus", "Softplus Attention with Re-weighting Boosts Length Extrapolation in LLMs",
     "softplus(s) normalised per row"),
]:
    register(Mechanism(
        name=f"{_norm}_attention", family="exact", paper=_paper, exact=True, complexity="O(n^2 d)", causal=True,
        factory=_dense_factory(_norm), summary=_summary, flops=_dense_flops, max_bench_len=8192,
    ))

register(Mechanism(
    name="sinkhorn", family="exact", paper="Sinkformers: Transformers with Doubly Stochastic Attention",
    exact=True, complexity="O(T n^2 + n^2 d), O(n^2) memory", causal=False, factory=_dense_factory("sinkhorn"),
    summary="doubly stochastic attention by log-domain Sinkhorn iterations (dense reference engine)",
    flops=_dense_flops, max_bench_len=2048,
))


def _alibi_factory(causal: bool = False, num_heads: int | None = None):
    if num_heads is None:
        raise TypeError("alibi needs num_heads")
    mod = S.alibi(num_heads)
    pattern = P.causal() if causal else None

    def run(q, k, v):
        return attention(q, k, v, pattern=pattern, score_mod=mod)

    return run


register(Mechanism(
    name="alibi", family="exact", paper="Train Short, Test Long (ALiBi); cited by KERPLE", exact=True,
    complexity="O(n^2 d)", causal=True, factory=_alibi_factory, needs=("num_heads",), flops=_dense_flops,
    summary="softmax with linear distance penalties per head (tiled engine)", max_bench_len=8192,
))
