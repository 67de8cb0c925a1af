"""Registry records of the long-context family: Star Attention (phase 1 + phase 2) and S2-Attention."""

from __future__ import annotations

from typing import Any

import torch

from attnkit.functional.exact import attention
from attnkit.functional.star import star_attention, star_pattern
from attnkit.nn.longctx import BlockTransformerMixer, RecurrentAttentionMixer, TokenTypeMixer
from attnkit.ops.longctx.s2 import s2_pattern
from attnkit.registry import Mechanism, register


def _star_factory(causal: bool = False, block_size: int = 1024, anchor_size: int | None = None,
                  num_query: int = 0):
    star_pattern(block_size, anchor_size)  # validates the parameters now, not at the first call

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return star_attention(q, k, v, block_size=block_size, anchor_size=anchor_size, num_query=num_query,
                              causal=causal)

    return run


def _star_reference(built: Any, q, k, v, *, causal: bool = False, block_size: int = 1024,
                    anchor_size: int | None = None, num_query: int = 0, **_: Any) -> torch.Tensor:
    """The paper's two phases as one explicit mask, written out position by position."""
    from attnkit import patterns as P

    n = q.shape[2]
    ctx = n - min(num_query, n)
    anchor = block_size if anchor_size is None else anchor_size
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if causal and j > i:
                continue
            if i >= ctx:  # phase 2: a query token sees the whole cache
                mask[i, j] = j < n
            else:  # phase 1: same block, or the anchor; context tokens never see the query tokens
                mask[i, j] = j < ctx and (i // block_size == j // block_size or j < anchor)
    return attention(q, k, v, pattern=P.custom(lambda b, h, qi, ki: mask.to(qi.device)[qi, ki],
                                              batch_dependent=False, head_dependent=False), engine="reference")


def _s2_factory(causal: bool = False, num_heads: int = 8, stride: int = 8, window: int = 64, offsets=None):
    pattern = s2_pattern(num_heads, stride, window, offsets=offsets, causal=causal)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, pattern=pattern)

    run.pattern = pattern  # type: ignore[attr-defined]
    return run


def _star_full_pattern(seq_len: int, causal: bool = False, block_size: int = 1024, anchor_size: int | None = None,
                       num_query: int = 0, **_: Any):
    """Both phases as one pattern over ``seq_len`` tokens (the benchmark's exactness check): context rows see the
    anchor and their block among the context keys, query rows see everything (causally)."""
    from attnkit import patterns as P

    ctx = seq_len - min(num_query, seq_len)
    query_rows = P.custom(lambda b, h, qi, ki: (qi >= ctx) & (ki >= 0), batch_dependent=False, head_dependent=False)
    context = star_pattern(block_size, anchor_size, causal=causal) & P._KeyBelow(ctx, f"context({ctx})")
    return context | (P.causal() & query_rows if causal else query_rows)


def _s2_reference(built: Any, q, k, v, **_: Any) -> torch.Tensor:
    return attention(q, k, v, pattern=built.pattern, engine="reference")


register(Mechanism(
    name="star_attention", family="longctx",
    paper="Star Attention: Efficient LLM Inference over Long Sequences (Acharya et al. 2024), Sec. 2, Fig. 1",
    # exact=False: the model is a full-attention LLM and phase 1 approximates its attention over the context
    # (the paper's claim is accuracy close to full attention, not equality); phase 2 alone is exact.
    exact=False, complexity="O(n * 2b * d) phase 1, O(n * d) per query token", causal=True,
    factory=_star_factory, reference=_star_reference,
    summary="approximates full causal attention: phase 1, each context block attends causally to the anchor block "
            "and itself; phase 2, the last num_query tokens attend to everything (exact, merged by log-sum-exp "
            "across hosts)",
    bench_params={"block_size": 1024}, small_params={"block_size": 8, "num_query": 4},
    extras={"pattern": _star_full_pattern},
    source="paper",
))

register(Mechanism(
    name="s2_attention", family="longctx",
    paper="Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention Heads "
          "(S2-Attention, Lin et al. 2024), Sec. 3",
    exact=True, complexity="O(n^2 d)", causal=True, needs=("num_heads",),
    factory=_s2_factory, reference=_s2_reference,
    summary="head h attends to keys j with (j + o_h) mod S == 0 plus a shared local window; heads' shards "
            "together cover the context, each head stores ~1/S of the KV (the mask is exact; the paper's O(n^2 d / S) "
            "needs its per-head gather kernel, not here)",
    bench_params={"stride": 8, "window": 64}, small_params={"stride": 4, "window": 4},
    extras={"pattern": lambda seq_len=None, causal=False, num_heads=8, stride=8, window=64, offsets=None, **_:
            s2_pattern(num_heads, stride, window, offsets=offsets, causal=causal)},
            source="paper",
))


def _module_reference(built: Any, x: torch.Tensor, **_: Any) -> torch.Tensor:
    return built.reference(x)


register(Mechanism(
    name="block_transformer", family="longctx", kind="mixer",
    paper="Block Transformer: Global-to-Local Language Modeling for Fast Inference (Ho et al. 2024), Sec. 2",
    exact=True, complexity="O((n/L)^2 d + n L d)", causal=True, needs=("dim",),
    factory=lambda causal=False, dim=64, **p: BlockTransformerMixer(dim, causal=causal, **p),
    reference=_module_reference,
    summary="block embeddings attend causally to earlier blocks (global); tokens attend within their block "
            "prefixed by the context embedding (local, KV <= block_size + 1)",
    bench_params={"block_size": 16, "num_heads": 4}, small_params={"block_size": 4, "num_heads": 2},
    source="paper",
))

register(Mechanism(
    name="recurrent_attention_network", family="longctx", kind="mixer",
    paper="Recurrent Attention Networks for Long-text Modeling (Li et al. 2023), Sec. 3",
    exact=True, complexity="O(n w d)", causal=False, needs=("dim",),
    factory=lambda causal=False, dim=64, **p: RecurrentAttentionMixer(dim, causal=causal, **p),
    reference=_module_reference,
    summary="windowed self-attention with a Global Perception Cell token carried from window to window; parallel "
            "form (cells first, all windows' tokens in one batch); memory review: tokens attend over every "
            "window's cell (memory_review=False: the windowed core)",
    bench_params={"window": 256, "num_heads": 4}, small_params={"window": 8, "num_heads": 2},
    # The parallel form and memory review follow the authors' code; per-window rotary and their norms are left out.
    source="paper+catalogue",
))

register(Mechanism(
    name="neural_attention_search", family="longctx", kind="mixer",
    paper="Neural Attention Search (NAtS), Sec. 3: learned Global / Local / Sliding-window token types",
    exact=True, complexity="O(n * live tokens * d) at inference", causal=True, needs=("dim",),
    factory=lambda causal=True, dim=64, **p: TokenTypeMixer(dim, causal=causal, **p),
    reference=_module_reference,
    summary="a scorer assigns each token a type (Global kept, Local evicted by the next Global, Sliding seen by "
            "the next w tokens); the mask decides which KV entries are evicted",
    bench_params={"window": 64, "num_heads": 4}, small_params={"window": 4, "num_heads": 2},
    source="paper+catalogue",
))
