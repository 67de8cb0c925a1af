"""Registry records of the exact family: dense softmax, sparse patterns, other normalisations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit._checks import check_qkv
from attnkit.functional.exact import attention
from attnkit.registry import Mechanism, register


def _dense_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
                 density: float = 1.0, **_: Any) -> float:
    # QK^T and PV: 2 multiply-adds per (query, key, channel) pair each.
    if causal:
        density = density * (q_len + 1) / (2 * q_len) if q_len == kv_len else density
    return 4.0 * batch * heads * q_len * kv_len * head_dim * density


def _pattern_mechanism(name: str, paper: str, make: Callable[..., P.Pattern], summary: str,
                       bench_params: dict, in_default_bench: bool = False, small_params: dict | None = None,
                       dynamic: bool = False, complexity: str = "O(n * w * d)",
                       varlen: bool = False, fast: Callable[..., Any] | None = None, source: str = "") -> Mechanism:
    """A mechanism that is exact softmax attention restricted to a pattern (tiled engine).

    ``make(**params)`` builds the pattern; with ``dynamic=True`` it is ``make(seq_len=, heads=, causal=,
    **params)`` and is called per input shape (grids read from the length, one window per head), its result
    cached. ``varlen``: the pattern is a ``cu_seqlens`` packing, run through ``attention(cu_seqlens=)``.
    ``fast(q, k, v, causal=, **params)``: a specialised exact path (None where it does not apply)."""

    def pattern_for(seq_len: int | None = None, causal: bool = False, heads: int = 8, **params) -> P.Pattern:
        if dynamic:
            return make(seq_len=seq_len, heads=heads, causal=causal, **params)
        p = make(**params)
        return P.causal() & p if causal else p

    def factory(causal: bool = False, **params):
        cache: dict = {}
        if not dynamic:
            cache[None] = pattern_for(causal=causal, **params)  # bad parameters fail here, at build time

        def pattern_at(kv_len: int, heads: int) -> P.Pattern:
            key = None if not dynamic else (kv_len, heads)
            if key not in cache:
                if len(cache) > 16:
                    cache.clear()
                cache[key] = pattern_for(kv_len, causal, heads, **params)
            return cache[key]

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            check_qkv(q, k, v)
            if fast is not None:
                out = fast(q, k, v, causal=causal, **params)
                if out is not None:
                    return out
            if varlen:
                cu = _regular_cu_seqlens(k.shape[2], params.get("doc_len", 64), k.device)
                return attention(q, k, v, pattern=P.causal() if causal else None, cu_seqlens=cu)
            return attention(q, k, v, pattern=pattern_at(k.shape[2], q.shape[1]))

        run.pattern = None if dynamic else cache[None]  # type: ignore[attr-defined]
        run.pattern_at = pattern_at  # type: ignore[attr-defined]
        return run

    def reference(built, q, k, v, **_):
        return attention(q, k, v, pattern=built.pattern_at(k.shape[2], q.shape[1]), engine="reference")

    def flops(batch, heads, q_len, kv_len, head_dim, causal=False, **params):
        density = pattern_for(kv_len, causal, heads, **params).density(q_len, kv_len, heads=heads) \
            if dynamic else pattern_for(causal=causal, **params).density(q_len, kv_len)
        return _dense_flops(batch, heads, q_len, kv_len, head_dim, density=density)

    return Mechanism(
        name=name, family="exact", paper=paper, exact=True, complexity=complexity, causal=True,
        factory=factory, summary=summary, bench_params=bench_params, in_default_bench=in_default_bench,
        flops=flops, extras={"pattern": pattern_for}, reference=reference, small_params=small_params or {},
        source=source,
    )


def _regular_cu_seqlens(n: int, doc_len: int, device=None) -> torch.Tensor:
    """Documents of ``doc_len`` tokens (the last one shorter) packed into ``n`` tokens."""
    from attnkit.ops.exact.variants import cu_seqlens_from_lengths

    lengths = [doc_len] * (n // doc_len) + ([n % doc_len] if n % doc_len else [])
    return cu_seqlens_from_lengths(lengths, device=device)


def _reference_of(fn_kwargs: Callable[[Any], dict]):
    """A record's ``reference``: the same call on the reference engine (``fn_kwargs(built)``: its arguments)."""

    def reference(built, q, k, v, **_):
        return attention(q, k, v, engine="reference", **fn_kwargs(built))

    return reference


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

        run.pattern, run.normalization = pattern, norm  # type: ignore[attr-defined]
        return run

    return factory


_DENSE_REFERENCE = _reference_of(lambda built: {"pattern": built.pattern, "normalization": built.normalization})


register(Mechanism(
    name="softmax", family="exact", paper="Attention Is All You Need (via torch SDPA)", exact=True,
    complexity="O(n^2 d)", causal=True, factory=_dense_factory(), in_default_bench=True,
    summary="dense softmax attention; dispatches to torch scaled_dot_product_attention", flops=_dense_flops,
    reference=_DENSE_REFERENCE,
    extras={"pattern": lambda seq_len=None, causal=False, **_: P.causal() if causal else P.full()},
    source="paper",
))

register(_pattern_mechanism(
    "sliding_window", "Local Self-Attention over Long Text for Efficient Document Retrieval",
    lambda window=256: P.sliding_window(window), "exact softmax over keys within `window` positions",
    {"window": 256}, in_default_bench=True, small_params={"window": 5},
    source="paper",
))
register(_pattern_mechanism(
    "dilated", "Generating Long Sequences with Sparse Transformers (dilated window)",
    lambda window=64, dilation=4: P.dilated(window, dilation), "every `dilation`-th key within the window",
    {"window": 64, "dilation": 4}, small_params={"window": 3, "dilation": 2},
    source="paper",
))
register(_pattern_mechanism(
    "block_local", "Block-Attention for Efficient RAG / Local Self-Attention over Long Text",
    lambda block_size=256: P.block_local(block_size), "attention within fixed blocks", {"block_size": 256},
    small_params={"block_size": 8},
    source="paper",
))
register(_pattern_mechanism(
    "strided", "Generating Long Sequences with Sparse Transformers",
    lambda stride=128: P.strided(stride, causal=False), "local window plus every stride-th key (union of heads)",
    {"stride": 128}, small_params={"stride": 5},
    source="paper",
))
register(_pattern_mechanism(
    "fixed", "Generating Long Sequences with Sparse Transformers",
    lambda block_size=128, num_summary=16: P.fixed(block_size, num_summary, causal=False),
    "own block plus the summary positions of every block", {"block_size": 128, "num_summary": 16},
    small_params={"block_size": 8, "num_summary": 2},
    source="paper",
))
register(_pattern_mechanism(
    "longformer", "Longformer-style sliding window with global tokens",
    lambda window=256, num_global=16: P.sliding_window(window) | P.global_tokens(range(num_global), strict=False),
    "sliding window plus global tokens", {"window": 256, "num_global": 16},
    small_params={"window": 4, "num_global": 2},
    source="paper+catalogue",
))

for _norm, _paper, _summary, _source in [
    ("sigmoid", "Theory, Analysis, and Best Practices for Sigmoid Self-Attention", "sigmoid(s - log n), no row sum",
     "paper"),
    ("relu", "Replacing softmax with ReLU in Vision Transformers", "relu(s) / n", "paper"),
    ("softplus", "Softplus Attention with Re-weighting Boosts Length Extrapolation in LLMs",
     "softplus(s) normalised per row", "paper+catalogue"),
]:
    register(Mechanism(
        name=f"{_norm}_attention", family="exact", paper=_paper, exact=True, complexity="O(n^2 d)", causal=True,
        factory=_dense_factory(_norm), summary=_summary, flops=_dense_flops, max_bench_len=8192,
        reference=_DENSE_REFERENCE, source=_source,
    ))

def _sinkhorn_reference(built: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> torch.Tensor:
    """Sinkformers, Eq. 4, in the linear domain, independent of the engine's log-domain code: K = exp(S), then
    T alternate normalisations of rows and columns (rows first, so T = 1 is softmax)."""
    from attnkit._checks import repeat_kv

    h = q.shape[1]
    kk, vv = repeat_kv(k, h).double(), repeat_kv(v, h).double()
    s = q.double() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
    mat = torch.exp(s - s.amax(dim=(-1, -2), keepdim=True))  # one shift per matrix: cancels in every step
    for t in range(built.normalization.iterations):
        mat = mat / mat.sum(dim=-1 if t % 2 == 0 else -2, keepdim=True)
    return (mat @ vv).to(q.dtype)


register(Mechanism(
    name="sinkhorn", family="exact", paper="Sinkformers: Transformers with Doubly Stochastic Attention",
    exact=True, complexity="O(T n^2 + n^2 d), O(n^2) memory", causal=False, factory=_dense_factory("sinkhorn"),
    summary="doubly stochastic attention by log-domain Sinkhorn iterations (dense reference engine)",
    flops=_dense_flops, max_bench_len=2048, reference=_sinkhorn_reference,
    source="paper",
))


def _alibi_factory(causal: bool = False, num_heads: int | None = None):
    if num_heads is None:
        raise TypeError("alibi needs num_heads")
    mod = S.alibi(num_heads)
    pattern = P.causal() if causal else None

    def run(q, k, v):
        return attention(q, k, v, pattern=pattern, score_mod=mod)

    run.pattern, run.score_mod = pattern, mod  # type: ignore[attr-defined]
    return run


register(Mechanism(
    name="alibi", family="exact", paper="Train Short, Test Long (ALiBi); cited by KERPLE", exact=True,
    complexity="O(n^2 d)", causal=True, factory=_alibi_factory, needs=("num_heads",), flops=_dense_flops,
    summary="softmax with linear distance penalties per head (tiled engine)", max_bench_len=8192,
    reference=_reference_of(lambda built: {"pattern": built.pattern, "score_mod": built.score_mod}),
    source="paper",
))


# ---------------------------------------------------------------------------------------------------------
# Pattern variants (issue 16): grids, per-head patterns, hierarchical and packed documents
# ---------------------------------------------------------------------------------------------------------

def _variants():
    from attnkit.ops.exact import variants

    return variants


def _functional_variants():
    from attnkit.functional import variants

    return variants


def _grid(seq_len: int, shape) -> tuple[int, ...]:
    from attnkit.ops.exact.variants import grid_shape

    return tuple(shape) if shape is not None else grid_shape(seq_len)


def _axial(seq_len, heads, causal, axis=-1, shape=None):
    return P.axial(_grid(seq_len, shape), axis, causal=causal)


def _halo(seq_len, heads, causal, block=8, halo=3, shape=None):
    p = P.halo(_grid(seq_len, shape), block, halo)
    return P.causal() & p if causal else p


def _multi_scale(seq_len, heads, causal, window=16, windows=None):
    # Guo et al.'s schedule in one layer: scales doubling from `window`, the last head global.
    windows = windows if windows is not None else [window * 2 ** h for h in range(heads - 1)] + [None]
    return P.per_head_window(windows, causal=causal)


def _hepos(seq_len, heads, causal, stride=4):
    p = P.head_strides(stride)
    return P.causal() & p if causal else p


def _hdt(seq_len, heads, causal, sentence_len=16, sentences=8):
    from attnkit.ops.exact.variants import hdt_layout

    # A regular document long enough, cut to seq_len tokens (a prefix of the layout is a valid layout).
    per_sec = 1 + sentences * (sentence_len + 1)
    sections = max(1, -(-seq_len // per_sec))
    levels, group_ids, _ = hdt_layout([[sentence_len] * sentences] * sections)
    p = P.hierarchical(levels[:seq_len], group_ids[:, :seq_len])
    return P.causal() & p if causal else p


def _block_attention(seq_len, heads, causal, block_size=512, final_len=512):
    final = min(final_len, seq_len)
    rest = seq_len - final
    lengths = [block_size] * (rest // block_size) + ([rest % block_size] if rest % block_size else []) + [final]
    return P.block_attention(lengths)


def _varlen(seq_len, heads, causal, doc_len=1024):
    from attnkit.ops.exact.variants import varlen_pattern

    return varlen_pattern(_regular_cu_seqlens(seq_len, doc_len), causal=causal)


for _rec in [
    _pattern_mechanism(
        "axial", "Axial Attention in Multidimensional Transformers (Ho et al., 2019), Sec. 3", _axial,
        "attention along one axis of a grid (rows by default; the flat sequence read as a near-square grid)",
        {"axis": -1}, dynamic=True, complexity="O(n * sqrt(n) * d)",
        fast=lambda q, k, v, causal, axis=-1, shape=None: _variants().axial_attention(
            q, k, v, _grid(k.shape[2], shape), axis, causal=causal) if q.shape[2] == k.shape[2] else None,
            source="paper"),
    _pattern_mechanism(
        "halo", "Scaling Local Self-Attention for Parameter Efficient Visual Backbones (HaloNet), Sec. 3.1", _halo,
        "blocked local attention: each b x b block attends to its block plus a halo, borders cut",
        {"block": 8, "halo": 3}, small_params={"block": 2, "halo": 1}, dynamic=True,
        complexity="O(n * (b + 2h)^2 * d)", source="paper"),
    _pattern_mechanism(
        "multi_scale_heads", "Multi-Scale Self-Attention for Text Classification (Guo et al., 2020), Sec. 3",
        _multi_scale, "per-head window sizes (doubling from `window`, the last head global); exact per-head tiles",
        {"window": 64}, small_params={"window": 2}, dynamic=True, complexity="O(n * sum_h w_h * d)", source="paper"),
    _pattern_mechanism(
        "hepos", "Efficient Attentions for Long Document Summarization (Hepos), Sec. 3.2", _hepos,
        "head h attends to keys j with j % stride == h % stride (non-causal: gathered keys, 1/stride of the work)",
        {"stride": 4}, small_params={"stride": 2}, dynamic=True, complexity="O(n^2 d / stride)",
        fast=lambda q, k, v, causal, stride=4: None if causal else _functional_variants().head_strided_attention(
            q, k, v, stride), source="paper"),
    _pattern_mechanism(
        "hdt", "HDT: Hierarchical Document Transformer (He et al., 2024), Sec. 3.2", _hdt,
        "hierarchical anchor mask: tokens see their sentence, anchors their siblings and parent",
        {"sentence_len": 16, "sentences": 8}, small_params={"sentence_len": 4, "sentences": 2}, dynamic=True,
        complexity="O(n * s * d)", source="paper"),
    _pattern_mechanism(
        "block_attention", "Block-Attention for Efficient RAG (Sun et al., 2024), Sec. 2", _block_attention,
        "passages attend causally within themselves, the final block causally to everything",
        {"block_size": 512, "final_len": 512}, small_params={"block_size": 8, "final_len": 8}, dynamic=True,
        complexity="O(sum_t L_t^2 d + L_final n d)", source="paper"),
    _pattern_mechanism(
        "varlen", "Efficient Sequence Packing without Cross-contamination (Krell et al., 2021)", _varlen,
        "packed documents (cu_seqlens): block-diagonal attention, cross-document tiles skipped",
        {"doc_len": 1024}, small_params={"doc_len": 10}, dynamic=True, varlen=True,
        complexity="O(sum_s L_s^2 d)",
        fast=lambda q, k, v, causal, doc_len=1024: _variants().varlen_attention(
            q, k, v, _regular_cu_seqlens(k.shape[2], doc_len, k.device), causal=causal)
        if q.shape[2] == k.shape[2] else None, source="paper"),
]:
    register(_rec)


def _gsa_factory(causal: bool = False, ratio: int = 4, shape=None):
    from attnkit.functional.variants import sub_sampled_attention

    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"gsa(ratio) must be a positive int, got {ratio!r}")

    def run(q, k, v):
        return sub_sampled_attention(q, k, v, ratio, shape)

    run.ratio, run.shape = ratio, shape  # type: ignore[attr-defined]
    return run


def _gsa_reference(built, q, k, v, **_):
    from attnkit.functional.variants import sub_sampled_attention_reference

    return sub_sampled_attention_reference(q, k, v, built.ratio, built.shape)


register(Mechanism(
    name="gsa", family="exact", paper="Twins: Revisiting the Design of Spatial Attention in Vision Transformers "
    "(global sub-sampled attention, Sec. 3.2)", exact=False, complexity="O(n^2 d / r^2)", causal=False,
    factory=_gsa_factory, summary="every query attends to one mean-pooled key/value per r x r window of the grid",
    bench_params={"ratio": 4}, small_params={"ratio": 2}, reference=_gsa_reference,
    flops=lambda batch, heads, q_len, kv_len, head_dim, ratio=4, **_: _dense_flops(
        batch, heads, q_len, -(-kv_len // ratio ** 2), head_dim),
        source="paper",
))


# ---------------------------------------------------------------------------------------------------------
# Normalisations, score modifiers and modules (issue 16, catalogue C3-C21)
# ---------------------------------------------------------------------------------------------------------

register(Mechanism(
    name="standardized_attention", family="exact", exact=True, complexity="O(n^2 d), O(n) memory", causal=True,
    paper="Normalized Attention Without Probability Cage (Richter & Wattenhofer, 2020), Sec. 3",
    factory=_dense_factory("standardize"), flops=_dense_flops, max_bench_len=8192, reference=_DENSE_REFERENCE,
    summary="logits standardised per row over visible keys (no simplex); two-pass statistics in the tiled engine",
    source="paper",
))


def _lssa_factory(causal: bool = False, base: float = 512.0, power: float = 2.0):
    from attnkit.normalizations import softplus

    pattern = P.causal() if causal else None
    # lambda = log(n_i) / log(base), n_i the keys row i attends: i + 1 under the causal mask, every key otherwise
    mod, norm = S.length_scale(base, per_row=causal), softplus(power)

    def run(q, k, v):
        return attention(q, k, v, pattern=pattern, score_mod=mod, normalization=norm)

    run.pattern, run.score_mod, run.normalization = pattern, mod, norm  # type: ignore[attr-defined]
    return run


register(Mechanism(
    name="lssar", family="exact", exact=True, complexity="O(n^2 d), O(n) memory", causal=True,
    paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models (LSSA(R))",
    factory=_lssa_factory, flops=_dense_flops, max_bench_len=8192, bench_params={"base": 512.0, "power": 2.0},
    small_params={"base": 16.0, "power": 2.0},
    reference=_reference_of(lambda built: {"pattern": built.pattern, "score_mod": built.score_mod,
                                           "normalization": built.normalization}),
    summary="softplus + l1 normalisation, log-length logit scale, power re-weighting (power=1: LSSA)",
    source="paper+catalogue",  # the length scale from the paper; the re-weighting's power form from the catalogue
))


def _module_reference(built, *inputs, **_):
    return built.reference(*inputs)


def _module_factory(cls, *shape_args: str, **fixed):
    """``factory(causal=False, **params)`` building ``cls(*shape params, causal=causal, **params)``."""

    def factory(causal: bool = False, **params):
        kwargs = {**fixed, **params}
        missing = [a for a in shape_args if a not in kwargs]
        if missing:
            raise TypeError(f"missing shape parameters {missing}")
        if causal:
            kwargs["causal"] = True
        return cls(**kwargs)

    return factory


def _nn():
    import attnkit.nn.exact as E

    return E


def _lazy(name: str):
    return lambda *a, **kw: getattr(_nn(), name)(*a, **kw)


def _coca_factory(causal: bool = False, base: float = 10000.0):
    def run(q, k, v):
        return _nn().coca_attention(q, k, v, causal=causal, base=base)

    run.causal, run.base = causal, base  # type: ignore[attr-defined]
    return run


def _quadratic(name, paper, factory, summary, *, needs=(), causal=True, small=None, bench=None, kind="attention",
               example_inputs=None, exact=True, reference=_module_reference, max_len=4096, flops=_dense_flops,
               tolerance_scale=1.0, source=""):
    register(Mechanism(
        name=name, family="exact", paper=paper, exact=exact, complexity="O(n^2 d)", causal=causal, factory=factory,
        summary=summary, needs=needs, bench_params=bench or {}, small_params=small or {}, reference=reference,
        kind=kind, example_inputs=example_inputs, max_bench_len=max_len, flops=flops,
        tolerance_scale=tolerance_scale, source=source,
    ))


_quadratic("selective_attention", "Selective Attention: Enhancing Transformer through Principled Context Control "
           "(Zhang et al., 2024), Sec. 3", _module_factory(_lazy("SelectiveAttention"), "num_heads", "head_dim"),
           "per-query temperature (token + log-position) and value temperature; runs on any engine",
           needs=("num_heads", "head_dim"), max_len=16384, source="paper+catalogue")
_quadratic("bird_eye", "Bird-Eye Transformers for Text Generation Models (Sha et al., 2022); rule from the authors' "
           "code (github.com/shalei120/fairseq-1, fairseq/modules/multihead_attention.py, BET)",
           _module_factory(_lazy("BirdEyeAttention"), "num_heads", "head_dim"),
           "second pass re-weights logits by a key importance sigmoid(w.[k_j; o_j]) from the first pass's output; "
           "own key masked", needs=("num_heads", "head_dim"), source="paper")
_quadratic("qk_position", "Improve Transformer Models with Better Relative Position Embeddings (Huang et al., "
           "2020), method 4", _module_factory(_lazy("QueryKeyPositionAttention"), "num_heads", "head_dim"),
           "relative embeddings interacting with queries and keys, gathered per logit (O(n) memory, tiled)",
           needs=("num_heads", "head_dim"), small={"max_distance": 4}, bench={"max_distance": 16}, source="paper")
register(Mechanism(
    name="coca", family="exact", paper="Cure the headache of Transformers via Collinear Constrained Attention "
    "(CoCA), Sec. 3", exact=True, complexity="O(n^2 d)", causal=True, factory=_coca_factory, flops=_dense_flops,
    summary="keys collinear with the query in every RoPE plane; factored into q', k' for any engine",
    reference=lambda built, q, k, v, **_: _nn().coca_reference(q, k, v, causal=built.causal, base=built.base),
    source="paper",
))
_quadratic("gpsa", "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases, Eq. 5",
           _module_factory(_lazy("GatedPositionalAttention"), "num_heads"),
           "gated mix of content softmax and a learned positional softmax (soft convolution at init)",
           needs=("num_heads",), source="paper")
_quadratic("neural_attention", "Neural Attention: A Novel Mechanism for Enhanced Expressive Power in Transformer "
           "Models", _module_factory(_lazy("NeuralAttention"), "head_dim"),
           "MLP on each (query, key) pair as the logit; chunked over queries with recomputation",
           needs=("head_dim",), small={"hidden": 8, "chunk": 16}, bench={"hidden": 16, "chunk": 64}, max_len=2048,
           flops=lambda batch, heads, q_len, kv_len, head_dim, hidden=16, **_: 2.0 * batch * heads * q_len * kv_len
           * hidden * (head_dim + 3) + _dense_flops(batch, heads, q_len, kv_len, head_dim) / 2, source="paper")
_quadratic("karat", "Kolmogorov-Arnold Attention: Is Learnable Attention Better For Vision Transformers?",
           _module_factory(_lazy("KolmogorovArnoldAttention"), "num_heads"),
           "one learnable Fourier function per head on the logits, l1 row normalisation (softmax-like at init); "
           "deviation: the paper's operator mixes the row (see fourier_karat)",
           needs=("num_heads",), small={"grid": 4, "chunk": 16}, bench={"grid": 8, "chunk": 64}, max_len=4096,
           source="deviation: one learnable Fourier function per head on each logit, l1-normalised per row; the "
                  "paper's operator mixes the whole row (that is fourier_karat)")
_quadratic("fourier_karat", "Kolmogorov-Arnold Attention: Is Learnable Attention Better For Vision Transformers? "
           "(Fourier KArAt, Sec. 4, Eq. 2, Algorithm 2)",
           _module_factory(_lazy("FourierKArAt"), "num_heads", "seq_len"),
           "the paper's modular KArAt: rank-r Fourier KAN operator on each logit row, projected back by W, in place "
           "of softmax; fixed length, not causal",
           needs=("num_heads", "seq_len"), causal=False, small={"rank": 4, "grid": 3, "chunk": 16},
           bench={"rank": 12, "grid": 3, "chunk": 64}, max_len=1024,
           flops=lambda batch, heads, q_len, kv_len, head_dim, rank=12, grid=3, **_: 4.0 * batch * heads * q_len
           * kv_len * (head_dim + rank * grid + rank / 2), source="paper")


def _points_inputs(*, batch, seq_len, dtype, seed, heads, head_dim):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, heads * head_dim, generator=g)
    # coordinates on a 1/16 grid: exact in every dtype, so the k-NN sets agree across precisions
    pos = torch.randint(0, 64, (batch, seq_len, 3), generator=g) / 16
    return x.to(dtype), pos.to(dtype)


def _typed_inputs(*, batch, seq_len, dtype, seed, heads, head_dim):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, heads * head_dim, generator=g)
    types = (torch.rand(batch, seq_len, generator=g) < 0.3).long()
    return x.to(dtype), types


# Where each module's definition came from (Mechanism.source; docs/faithfulness.md).
_MODULE_SOURCES = {
    "carrier_tokens": "paper", "registers": "paper", "relational_attention": "paper", "gem": "paper",
    "multi_head_embedding": "paper", "point_transformer": "paper", "gsa_conv": "paper", "luke": "paper",
    # C19: the paper's body was not reachable; its abstract (arXiv 2403.01643v2) fixes which projections each
    # variant keeps (Super: W^Q, W^K, W^O and W^A); W^A's sharing and causal mask follow secondary readings.
    "optimised_attention": "paper+catalogue", "efficient_attention": "paper+catalogue",
    "super_attention": "paper+catalogue",
}
for _name, _cls, _paper, _summary, _kw in [
    ("carrier_tokens", "CarrierTokenAttention", "FasterViT: Fast Vision Transformers with Hierarchical Attention "
     "(HAT), Sec. 3.2", "window attention with per-window carrier tokens that attend globally", {
         "small": {"window": 6, "carriers": 2}, "bench": {"window": 64, "carriers": 2}, "causal": False,
         "max_len": 16384}),
    ("registers", "RegisterAttention", "Vision Transformers Need Registers (Darcet et al., 2024)",
     "self-attention with learnable register tokens, dropped at the output", {"causal": False}),
    ("relational_attention", "RelationalAttention", "Disentangling and Integrating Relational and Sensory "
     "Information in Transformer Architectures (DAT), Sec. 3", "relational heads: attention-weighted learned "
     "relations plus symbols", {}),
    ("gem", "GEMSelfSelfAttention", "Grounding Everything: Emerging Localization Properties in Vision-Language "
     "Transformers (GEM), Sec. 3", "q-q, k-k and v-v self-self attention ensemble (training-free path)",
     {"causal": False, "exact": False}),
    ("multi_head_embedding", "MultiHeadEmbeddingAttention", "Pit One Against Many: Leveraging Attention-head "
     "Embeddings for Parameter-efficient Multi-head Attention", "one shared projection plus a vector per head", {}),
    ("optimised_attention", "PayBetterAttention", "You Need to Pay Better Attention (Optimised attention)",
     "no value projection per head (folded into the output map)", {"fixed": {"variant": "optimised"}}),
    ("efficient_attention", "PayBetterAttention", "You Need to Pay Better Attention (Efficient attention)",
     "no key or value projection: half the parameters", {"fixed": {"variant": "efficient"}}),
    ("super_attention", "PayBetterAttention", "You Need to Pay Better Attention (Super attention)",
     "optimised attention (no value projection) with a learned sequence-mixing matrix on the values",
     {"fixed": {"variant": "super", "seq_len": 256}, "bench": {"seq_len": 2048}, "max_len": 2048}),
    ("point_transformer", "PointTransformerLayer", "Point Transformer (Zhao et al., 2021), Eq. 3",
     "vector attention over k-NN point neighbourhoods with relative-position MLPs",
     {"causal": False, "small": {"k": 8}, "bench": {"k": 16}, "inputs": _points_inputs, "max_len": 2048}),
    ("gsa_conv", "SubSampledAttention", "Twins: Revisiting the Design of Spatial Attention in Vision Transformers "
     "(GSA with its strided-conv reduction), Sec. 3.2", "every token attends to one conv-reduced token per r x r "
     "window", {"causal": False, "exact": False, "small": {"ratio": 2}, "bench": {"ratio": 4}, "max_len": 16384}),
    ("luke", "EntityAwareAttention", "LUKE: Deep Contextualized Entity Representations with Entity-aware "
     "Self-attention, Sec. 3.2", "four query matrices chosen by the (word, entity) types of each pair",
     {"causal": False, "inputs": _typed_inputs}),
]:
    _fixed = _kw.get("fixed", {})
    _needs = _kw.get("needs", ("dim",))
    _quadratic(_name, _paper, _module_factory(_lazy(_cls), *_needs, **_fixed), _summary, needs=_needs,
               causal=_kw.get("causal", True), small=_kw.get("small"), bench=_kw.get("bench"), kind="mixer",
               example_inputs=_kw.get("inputs"), exact=_kw.get("exact", True), max_len=_kw.get("max_len", 4096),
               source=_MODULE_SOURCES[_name])
