"""Registry records of the linear family.

- kernelized linear attention with one feature map each (below: ``_linear_mechanism``), plus Fastmax, the
  learned maps (GMM / generative / FastFood RKS, EcoFormer, weighted DiJiang) and Cottention;
- the gated engine: ``gla``, ``deltanet``, ``gated_deltanet`` (``gated_attention.py``);
- variants with an extra term: ``galerkin``, ``fourier_attention``, ``essa``, ``lln_diag``, ``focused_dwc``,
  ``kernel_rpe_fft``;
- token mixers (``kind="mixer"``, built with ``dim=``): ``retention``, ``ttt_linear``, ``ttt_mlp``,
  ``titans_mac|mag|mal``, ``transnormer_norm|diag|llm``, ``efficientvit_msa`` (modules in ``attnkit.nn.linear``).

Every record has a ``reference`` (materialised, looped or autograd form) that the conformance suite compares with.

Every feature-map factory returns a :class:`KernelizedAttention` (an ``nn.Module``: feature maps may own
parameters or random projections), a callable ``(q, k, v) -> out`` on ``[batch, heads, seq, dim]`` tensors that runs
:func:`attnkit.linear_attention` in parallel mode (non-causal) or chunked mode (causal). Parameters split
into the engine's (``chunk_size``, ``decay``, ``normalize``, ``mode``, ``eps``) and the feature map's (for
example ``num_features`` of ``performer``); ``attnkit.get("performer", num_features=128, causal=True)``.

Each feature-map record's ``extras`` carries ``feature_dim(head_dim, **params)`` and ``state_bytes(head_dim, value_dim,
dtype, **params)``: the size of one head's recurrent state (``S [m, d_v]`` plus ``z [m]``), the x-axis of
Based's recall / memory trade-off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnkit import feature_maps as fmaps
from attnkit.nn.linear import ENGINE_PARAMS, KernelizedAttention
from attnkit.nn.linear_cottention import CottentionAttention, cottention_reference
from attnkit.ops.linear._common import retention_decay
from attnkit.ops.linear.chunked import chunked_flops
from attnkit.ops.linear.gated import gated_chunked_flops
from attnkit.ops.linear.gated_attention import DeltaNetAttention, GatedLinearAttention, gated_reference
from attnkit.ops.linear.reference import linear_attention_reference
from attnkit.registry import SHAPE_PARAMS, Mechanism, register

__all__ = ["KernelizedAttention", "retention_decay", "ENGINE_PARAMS"]

def _kernel_reference(built: KernelizedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      **_: Any) -> torch.Tensor:
    """The registry reference of every feature-map record: the materialised quadratic form with the same map."""
    return linear_attention_reference(q, k, v, feature_map=built.feature_map, causal=built.causal,
                                      decay=built.engine.get("decay"),
                                      normalize=built.engine.get("normalize", "denominator"),
                                      eps=built.engine.get("eps", 1e-6))


def _split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    engine = {k: params.pop(k) for k in list(params) if k in ENGINE_PARAMS}
    return engine, params


def _make_map(map_name: str, map_params: dict[str, Any], shapes: dict[str, Any],
              map_needs: tuple[str, ...]) -> fmaps.FeatureMap:
    kwargs = dict(map_params)
    for key in map_needs:  # shape arguments the map's constructor takes (head_dim, num_heads)
        if key in shapes and key not in kwargs:
            kwargs[key] = shapes[key]
    try:
        return fmaps.get(map_name, **kwargs)
    except TypeError as exc:
        raise TypeError(f"feature map {map_name!r}: {exc}") from None


def _linear_mechanism(name: str, map_name: str, paper: str, summary: str, *,
                      map_defaults: dict[str, Any] | None = None, engine_defaults: dict[str, Any] | None = None,
                      needs: tuple[str, ...] = (), bench_params: dict[str, Any] | None = None,
                      in_default_bench: bool = False, max_bench_len: int | None = None,
                      decay_for: Callable[[int], torch.Tensor] | None = None,
                      map_causal: bool = False, small_params: dict[str, Any] | None = None,
                      source: str = "") -> Mechanism:
    """A mechanism: linear attention with feature map ``map_name`` (``needs``: shape arguments its
    constructor takes; ``decay_for(num_heads)``: a default per-head decay, causal only; ``map_causal``: the
    map's constructor takes ``causal`` too, because its statistics must not see later tokens)."""
    map_defaults = dict(map_defaults or {})
    engine_defaults = dict(engine_defaults or {})
    all_needs = tuple(sorted(set(needs) | ({"num_heads"} if decay_for else set())))

    def factory(causal: bool = False, **params: Any) -> KernelizedAttention:
        shapes = {k: params.pop(k) for k in list(params) if k in SHAPE_PARAMS}
        engine, map_params = _split({**engine_defaults, **map_defaults, **params})
        if decay_for is not None and causal and "decay" not in engine:
            if "num_heads" not in shapes:
                raise TypeError(f"{name} needs num_heads (for its per-head decay) or an explicit decay=")
            engine["decay"] = decay_for(shapes["num_heads"])
        if map_causal:
            map_params.setdefault("causal", causal)
        fm = _make_map(map_name, map_params, shapes, needs)
        return KernelizedAttention(fm, causal=causal, **engine)

    def feature_dim(head_dim: int, **params: Any) -> int:
        _, map_params = _split({**map_defaults, **params})
        map_params = {k: v for k, v in map_params.items() if k not in SHAPE_PARAMS}
        return _make_map(map_name, map_params, {"head_dim": head_dim}, needs).feature_dim(head_dim)

    def state_bytes(head_dim: int, value_dim: int | None = None, dtype: torch.dtype = torch.float32,
                    **params: Any) -> int:
        """Bytes of one head's recurrent state ``S [m, d_v]`` plus ``z [m]``."""
        dv = head_dim if value_dim is None else value_dim
        return feature_dim(head_dim, **params) * (dv + 1) * torch.empty((), dtype=dtype).element_size()

    def flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
              **params: Any) -> float:
        """Matmul FLOPs of the forward: feature projections (random-feature and learnable maps) plus the
        linear attention itself (``phi(K)^T [V, 1]`` and ``phi(Q) S``, or the chunked engine's count)."""
        m = feature_dim(head_dim, **params)
        dv1 = head_dim + 1
        merged = {**engine_defaults, **params}
        if causal:
            decayed = merged.get("decay") is not None or decay_for is not None
            per_head = chunked_flops(q_len, m, head_dim, int(merged.get("chunk_size", 64)), decay=decayed)
        else:
            per_head = 2.0 * kv_len * m * dv1 + 2.0 * q_len * m * dv1
        if map_name in ("favor", "trig", "dijiang", "hedgehog"):
            proj = m // 2 if map_name in ("trig", "hedgehog") else m
            per_head += 2.0 * (q_len + kv_len) * head_dim * proj
        return float(batch * heads * per_head)

    complexity = "O(n m d) (m features)"
    return Mechanism(
        name=name, family="linear", paper=paper, exact=False, complexity=complexity, causal=True,
        factory=factory, summary=summary, needs=all_needs, bench_params=dict(bench_params or {}),
        in_default_bench=in_default_bench, max_bench_len=max_bench_len, flops=flops,
        extras={"feature_map": map_name, "feature_dim": feature_dim, "state_bytes": state_bytes},
        reference=_kernel_reference, small_params=dict(small_params or {}), source=source,
    )


_MECHANISMS = [
    _linear_mechanism(
        "linear_elu", "elu", "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
        "phi(x) = elu(x) + 1; m = d", in_default_bench=True,
        source="paper",
    ),
    _linear_mechanism(
        "performer", "favor", "Rethinking Attention with Performers (FAVOR+)",
        "positive orthogonal random features, unbiased for the softmax kernel; m = num_features",
        map_defaults={"num_features": 256}, bench_params={"num_features": 256}, in_default_bench=True,
        source="paper",
    ),
    _linear_mechanism(
        "trig_rf", "trig", "Rethinking Attention with Performers (trigonometric random features)",
        "[sin, cos] random features, unbiased but signed; m = 2 num_features; no denominator, RMS output",
        map_defaults={"num_features": 128}, engine_defaults={"normalize": "rms"},
        bench_params={"num_features": 128},
        source="paper",
    ),
    _linear_mechanism(
        "cosformer", "cosformer", "cosFormer: Rethinking Softmax in Attention",
        "relu features re-weighted by cos(pi (i - j) / 2M), split into cos and sin parts; m = 2d",
        source="paper",
    ),
    _linear_mechanism(
        "efficientvit", "relu", "EfficientViT: Multi-Scale Linear Attention for High-Resolution Dense Prediction",
        "phi(x) = relu(x) with an eps-guarded denominator; m = d",
        source="paper",
    ),
    _linear_mechanism(
        "focused", "focused", "FLatten Transformer: Vision Transformer using Focused Linear Attention",
        "norm-preserving power p of relu(x) (sharper weights); m = d", map_defaults={"p": 3.0},
        source="paper",
    ),
    _linear_mechanism(
        "based", "taylor",
        "Simple linear attention language models balance the recall-throughput tradeoff (Based)",
        "2nd-order Taylor of exp(q.k/sqrt(d)): 1 + s + s^2/2; m = 1 + d + d(d+1)/2 (large: short lengths)",
        max_bench_len=8192,
        source="paper",
    ),
    _linear_mechanism(
        "rebased", "rebased", "Linear Transformers with Learnable Kernel Functions are Better In-Context Models",
        "learnable (gamma layernorm(x) + beta)^2 kernel; m = d(d+1)/2", needs=("head_dim", "num_heads"),
        max_bench_len=8192,
        source="paper",
    ),
    _linear_mechanism(
        "hedgehog", "hedgehog",
        "Linear Self-Attention Approximation via Trainable Feedforward Kernel / Hedgehog",
        "trainable feed-forward map with [softmax(u), softmax(-u)] output; m = 2 d", needs=("head_dim", "num_heads"),
        source="paper+catalogue",
    ),
    _linear_mechanism(
        "dijiang", "dijiang", "DiJiang: Efficient Large Language Models through Compact Kernelization",
        "DCT + quasi-Monte-Carlo positive features for the softmax kernel; m = num_features",
        map_defaults={"num_features": 256}, bench_params={"num_features": 256},
        source="paper",
    ),
    _linear_mechanism(
        "lln", "lln", "Linear Log-Normal Attention with Unbiased Concentration",
        "exp features with moment-matched temperatures (whole-call statistics; prefix statistics when causal); "
        "m = d", map_causal=True,
        source="paper",
    ),
    _linear_mechanism(
        "lightning", "identity", "Lightning Attention-2 / The Devil in Linear Transformer (TransNormer)",
        "phi(x) = x with a per-head decayed state (1 - 2^(-5-h) when causal), no denominator, RMS output",
        engine_defaults={"normalize": "rms"}, decay_for=retention_decay,
        source="paper",
    ),
]



def _cottention_factory(causal: bool = False, num_heads: int | None = None, chunk_size: int = 64,
                        init: float = 0.5, **shapes: Any) -> CottentionAttention:
    if num_heads is None:
        raise TypeError("cottention needs num_heads (one learnable length exponent per head)")
    return CottentionAttention(num_heads, causal=causal, chunk_size=chunk_size, init=init)


def _gated_flops(vector_gate: bool, delta: bool) -> Callable[..., float]:
    def flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
              chunk_size: int = 32 if delta else 64, **params: Any) -> float:
        """Matmul FLOPs of the chunked engine (``gated_chunked_flops``), twice when bidirectional."""
        one = gated_chunked_flops(q_len, head_dim, head_dim, chunk_size, vector_gate=vector_gate, delta=delta)
        return float(batch * heads * one * (1 if causal else 2))

    return flops


def _matrix_state_bytes(extra_column: bool = False) -> Callable[..., int]:
    def state_bytes(head_dim: int, value_dim: int | None = None, dtype: torch.dtype = torch.float32,
                    **params: Any) -> int:
        """Bytes of one head's recurrent state ``S [d_k, d_v]`` (plus the denominator column when kept)."""
        dv = head_dim if value_dim is None else value_dim
        return head_dim * (dv + int(extra_column)) * torch.empty((), dtype=dtype).element_size()

    return state_bytes


def _gated_factory(cls: type, **fixed: Any) -> Callable[..., Any]:
    def factory(causal: bool = False, head_dim: int | None = None, **params: Any):
        if head_dim is None:
            raise TypeError(f"{cls.__name__} needs head_dim (its gate projections act on keys)")
        params = {k: v for k, v in params.items() if k not in SHAPE_PARAMS}
        return cls(head_dim, causal=causal, **fixed, **params)

    return factory


_MECHANISMS += [
    Mechanism(
        name="cottention", family="linear", kind="attention", exact=False, causal=True,
        paper="Cottention: Linear Transformers With Cosine Attention (cosine weights, sec. 3; learnable length "
              "scale L^sigmoid(m_h))",
        complexity="O(n d^2)", factory=_cottention_factory, needs=("num_heads",), reference=cottention_reference,
        summary="cosine-similarity weights N(q).N(k) in [-1, 1], no denominator; output divided by "
                "L^sigmoid(m_h) (L keys attended, m_h learnable per head)",
        flops=lambda batch, heads, q_len, kv_len, head_dim, causal=False, **p: float(
            batch * heads * (chunked_flops(q_len, head_dim, head_dim, 64) if causal
                             else 4.0 * (q_len + kv_len) * head_dim * (head_dim + 1))),
        extras={"feature_map": "cosine", "state_bytes": _matrix_state_bytes(True)},
        source="paper",
    ),
    Mechanism(
        name="gla", family="linear", kind="attention", exact=False, causal=True,
        paper="Gated Linear Attention Transformers with Hardware-Efficient Training (GLA, eq. 3-4; chunkwise form "
              "with secondary chunking, sec. 4)",
        complexity="O(n d^2)", factory=_gated_factory(GatedLinearAttention), needs=("head_dim",),
        reference=gated_reference, flops=_gated_flops(True, False), extras={"state_bytes": _matrix_state_bytes()},
        summary="S_t = diag(a_t) S_{t-1} + k_t v_t^T with data-dependent a_t = sigmoid(k_t W + b)^(1/16) per key "
                "dim; RMS norm per head; bidirectional scan when non-causal",
                source="paper",
    ),
    Mechanism(
        name="deltanet", family="linear", kind="attention", exact=False, causal=True,
        paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length (DeltaNet, eq. 1; WY/UT "
              "chunkwise form, sec. 3)",
        complexity="O(n d^2)", factory=_gated_factory(DeltaNetAttention), needs=("head_dim",),
        reference=gated_reference, flops=_gated_flops(False, True), extras={"state_bytes": _matrix_state_bytes()},
        summary="delta rule S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T on unit k and unit q (SiLU then "
                "L2 norm) scaled by "
                "d^-1/2; beta_t = "
                "sigmoid(k_t.w + b); RMS norm per head; bidirectional scan when non-causal",
                source="paper",
    ),
    Mechanism(
        name="gated_deltanet", family="linear", kind="attention", exact=False, causal=True,
        paper="Gated Delta Networks: Improving Mamba2 with Delta Rule (eq. 10; chunkwise WY form)",
        complexity="O(n d^2)", factory=_gated_factory(DeltaNetAttention, gated=True), needs=("head_dim",),
        reference=gated_reference, flops=_gated_flops(False, True), extras={"state_bytes": _matrix_state_bytes()},
        summary="gated delta rule S_t = a_t S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, Mamba2's gate a_t = "
                "exp(-exp(A_log) softplus(k_t.w_a + b_a)) (A ~ U(1, 16), softplus(b_a) in [1e-3, 0.1]: a_t starts "
                "near 1; decay='sigmoid': a_t = sigmoid(k_t.w_a + b_a))",
                source="paper",
    ),
]



def _retention_factory(dim: int | None = None, causal: bool = False, num_heads: int | None = None,
                       mode: str = "chunked", chunk_size: int = 64, **shapes: Any) -> nn.Module:
    from attnkit.nn.linear import RetentionLayer

    if dim is None:
        raise TypeError("retention is a token mixer: pass dim= (the channels of x [batch, seq, dim])")
    return RetentionLayer(dim, num_heads, causal=causal, mode=mode, chunk_size=chunk_size)


def _retention_reference(built: nn.Module, x: torch.Tensor, **params: Any) -> torch.Tensor:
    from attnkit.nn.linear import retention_reference

    return retention_reference(built, x)


def _mixer_flops(per_head: Callable[[int, int, bool], float], projections: int) -> Callable[..., float]:
    """Mixer FLOPs for ``dim = heads * head_dim`` channels: ``per_head(n, head_dim, causal)`` per head plus
    ``projections`` dense ``dim x dim`` layers on every token."""
    def flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
              **params: Any) -> float:
        dim = heads * head_dim
        return float(batch * (heads * per_head(q_len, head_dim, causal) + projections * 2.0 * q_len * dim * dim))

    return flops


_MECHANISMS.append(Mechanism(
    name="retention", family="linear", kind="mixer", exact=False, causal=True,
    paper="Retentive Network: A Successor to Transformer for Large Language Models (multi-scale retention, eq. "
          "5-9) / ViR: Vision Retention Networks (bidirectional)",
    complexity="O(n d^2); parallel O(n^2 d)", factory=_retention_factory, needs=("dim",),
    reference=_retention_reference,
    summary="per-head decays 1 - 2^(-5-h), (QK^T * D)V in parallel, recurrent or chunked form, GroupNorm per "
            "head, swish gate; bidirectional gamma^|n-m| when non-causal",
    flops=_mixer_flops(lambda n, d, causal: chunked_flops(n, d, d, 64, decay=True) * (1 if causal else 2), 5),
    source="paper",
))



def _ttt_factory(model: str) -> Callable[..., nn.Module]:
    def factory(dim: int | None = None, causal: bool = False, num_heads: int | None = None, mini_batch: int = 16,
                **params: Any) -> nn.Module:
        from attnkit.nn.linear import TTTLayer

        if dim is None:
            raise TypeError("ttt layers are token mixers: pass dim= (the channels of x [batch, seq, dim])")
        params = {k: v for k, v in params.items() if k not in SHAPE_PARAMS}
        return TTTLayer(dim, num_heads, model=model, mini_batch=mini_batch, causal=causal, **params)

    return factory


def _ttt_reference(built: nn.Module, x: torch.Tensor, **params: Any) -> torch.Tensor:
    from attnkit.nn.linear import ttt_layer_reference

    return ttt_layer_reference(built, x)


for _name, _model, _inner_flops in (("linear", "linear_ln", lambda n, d: 10.0 * n * d * d),
                                   ("mlp", "mlp", lambda n, d: 40.0 * n * d * d)):
    _MECHANISMS.append(Mechanism(
        name=f"ttt_{_name}", family="linear", kind="mixer", exact=False, causal=True,
        paper="Learning to (Learn at Test Time): RNNs with Expressive Hidden States (TTT-" + _name.upper()
              + ", mini-batch inner loop and dual form, sec. 2.7); full batch: Learning to (Learn at Test Time)",
        complexity="O(n (b + d) d)", factory=_ttt_factory(_model), needs=("dim",),
        reference=_ttt_reference,
        summary=("inner model x + LN(x W)" if _name == "linear" else "inner MLP gelu(x W1) W2")
        + " trained at test time on ||f(k; W) - v||^2 with learnable W_0 and per-token "
                "rates; mini-batch gradients at the batch start, dual form; full batch when non-causal",
        flops=_mixer_flops(lambda n, d, causal, f=_inner_flops: f(n, d) + 4.0 * n * 16 * d, 4),
        source="paper",
    ))



def _titans_factory(arrangement: str) -> Callable[..., nn.Module]:
    def factory(dim: int | None = None, causal: bool = False, num_heads: int | None = None, **params: Any):
        from attnkit.nn.linear import TitansLayer

        if dim is None:
            raise TypeError(f"titans_{arrangement} is a token mixer: pass dim= (the channels of x [batch, seq, dim])")
        params = {k: v for k, v in params.items() if k not in SHAPE_PARAMS}
        return TitansLayer(dim, num_heads, arrangement=arrangement, causal=causal, **params)

    return factory


def _titans_reference(built: nn.Module, x: torch.Tensor, **params: Any) -> torch.Tensor:
    from attnkit.ops.linear.titans import titans_memory_reference

    return built(x, memory_fn=titans_memory_reference)


_TITANS = {
    "mac": "memory as context: per segment, attention over [persistent, memory read, segment], then memory update "
           "with its output and a memory gate",
    "mag": "memory as a gate: sliding-window attention with persistent tokens, gated by the neural memory's output",
    "mal": "memory as a layer: the neural memory, then sliding-window attention with persistent tokens",
}
for _arr, _summary in _TITANS.items():
    _MECHANISMS.append(Mechanism(
        name=f"titans_{_arr}", family="linear", kind="mixer", exact=False, causal=True,
        paper="Titans: Learning to Memorize at Test Time (neural memory eq. 10-15, chunk-parallel training sec. 3.2; "
              f"{_arr.upper()} sec. 4)",
        complexity="O(n (c + w + h) d)",
        factory=_titans_factory(_arr), needs=("dim",), reference=_titans_reference,
        small_params={"window": 8, "chunk_size": 8},
        summary=_summary + "; MLP memory with momentum and forgetting gates",
        flops=_mixer_flops(lambda n, d, causal: (4.0 * n * 16 * 4 * d + 40.0 * n * d * d + 4.0 * n * 64 * d)
                           * (1 if causal else 2), 6),
        source="paper",
    ))



def _variant(name: str, build: Callable[..., nn.Module], needs: tuple[str, ...], paper: str, summary: str,
             complexity: str = "O(n d^2)", causal: bool = True, quadratic: bool = False,
             source: str = "") -> Mechanism:
    from attnkit.nn.linear_variants import variant_reference

    def factory(causal: bool = False, **params: Any) -> nn.Module:
        shapes = {k: params.pop(k) for k in list(params) if k in SHAPE_PARAMS}
        missing = [k for k in needs if k not in shapes]
        if missing:
            raise TypeError(f"{name} needs {', '.join(missing)}")
        return build(causal=causal, **{k: shapes[k] for k in needs}, **params)

    def flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
              **params: Any) -> float:
        per_head = 4.0 * q_len * kv_len * head_dim if quadratic and not causal else \
            chunked_flops(q_len, head_dim, head_dim, 64) if causal else 4.0 * (q_len + kv_len) * head_dim * head_dim
        return float(batch * heads * per_head)

    return Mechanism(name=name, family="linear", kind="attention", exact=False, causal=causal, paper=paper,
                     complexity=complexity, factory=factory, needs=needs, reference=variant_reference,
                     summary=summary, flops=flops, source=source)


def _build_galerkin(kind: str) -> Callable[..., nn.Module]:
    from attnkit.nn.linear_variants import GalerkinAttention

    return lambda causal=False, head_dim=None, **p: GalerkinAttention(head_dim, kind=kind, causal=causal, **p)


def _build_essa(causal=False, **p):
    from attnkit.nn.linear_variants import ESSAttention

    if causal:
        raise ValueError("essa has no causal form")
    return ESSAttention(**p)


def _build_lln_diag(causal=False, **p):
    from attnkit.nn.linear_variants import LLNDiagAttention

    return LLNDiagAttention(causal=causal, **p)


def _build_focused_dwc(causal=False, head_dim=None, num_heads=None, **p):
    from attnkit.nn.linear_variants import FocusedDWCAttention

    return FocusedDWCAttention(head_dim, num_heads, causal=causal, **p)


_MECHANISMS += [
    _variant("galerkin", _build_galerkin("galerkin"), ("head_dim",),
             "Choose a Transformer: Fourier or Galerkin (Galerkin-type attention, eq. 2.5)",
             "Q (LN(K)^T LN(V)) / n, no softmax; causal: 1/(i+1) over the prefix", source="paper"),
    _variant("fourier_attention", _build_galerkin("fourier"), ("head_dim",),
             "Choose a Transformer: Fourier or Galerkin (Fourier-type attention, eq. 2.4)",
             "(LN(Q) LN(K)^T) V / n, no softmax (computed in the linear order; the same product)",
             complexity="O(n d^2)", source="paper"),
    _variant("essa", _build_essa, (),
             "ESSAformer: Efficient Transformer for Hyperspectral Image Super-resolution (SCC-kernel ESSA)",
             "centred squared normalised q, k (SCC kernel); V + q_hat (k_hat^T V) / sqrt(n); non-causal",
             causal=False, source="paper"),
    _variant("lln_diag", _build_lln_diag, (),
             "Linear Log-Normal Attention with Unbiased Concentration (LLN averaged with block-diagonal softmax)",
             "(LLN + block-diagonal softmax with blocks of d tokens) / 2; prefix statistics when causal",
             complexity="O(n d^2 + n b d)", source="paper"),
    _variant("focused_dwc", _build_focused_dwc, ("head_dim", "num_heads"),
             "FLatten Transformer: Vision Transformer using Focused Linear Attention (eq. 8: + DWC(V))",
             "focused linear attention plus a depthwise convolution of V over the sequence (5 taps; causal: "
             "left-padded)", source="paper"),
]



def _transnormer_factory(kind: str) -> Callable[..., nn.Module]:
    def factory(dim: int | None = None, causal: bool = False, num_heads: int | None = None, **params: Any):
        from attnkit.nn.linear import TransNormerLayer, TransNormerLLMLayer

        if dim is None:
            raise TypeError("transnormer layers are token mixers: pass dim= (the channels of x [batch, seq, dim])")
        params = {k: v for k, v in params.items() if k not in SHAPE_PARAMS}
        if kind == "llm":
            return TransNormerLLMLayer(dim, num_heads, causal=causal, **params)
        return TransNormerLayer(dim, num_heads, kind=kind, causal=causal, **params)

    return factory


def _transnormer_reference(built: nn.Module, x: torch.Tensor, **params: Any) -> torch.Tensor:
    from attnkit.nn.linear import transnormer_reference

    return transnormer_reference(built, x)


_MECHANISMS += [
    Mechanism(
        name="transnormer_norm", family="linear", kind="mixer", exact=False, causal=True,
        paper="The Devil in Linear Transformer (TransNormer: NormAttention, sec. 4.1)", complexity="O(n d^2)",
        factory=_transnormer_factory("norm"), needs=("dim",), reference=_transnormer_reference,
        summary="1 + elu linear attention without denominator, RMS norm after (bounded gradients)",
        flops=_mixer_flops(lambda n, d, causal: chunked_flops(n, d, d, 64) if causal else 4.0 * n * d * (d + 1), 4),
        source="paper",
    ),
    Mechanism(
        name="transnormer_diag", family="linear", kind="mixer", exact=False, causal=True,
        paper="The Devil in Linear Transformer (TransNormer: DiagAttention, sec. 4.2)", complexity="O(n b d)",
        factory=_transnormer_factory("diag"), needs=("dim",), reference=_transnormer_reference,
        small_params={"block": 8},
        summary="softmax attention within non-overlapping blocks (early layers, against attention dilution)",
        flops=_mixer_flops(lambda n, d, causal: 4.0 * n * 64 * d / (2 if causal else 1), 4),
        source="paper",
    ),
    Mechanism(
        name="transnormer_llm", family="linear", kind="mixer", exact=False, causal=True,
        paper="Scaling TransNormer to 175 Billion Parameters (TransNormerLLM: LRPE with decay, SRMSNorm, output "
              "gate, sec. 3)", complexity="O(n d^2)",
        factory=_transnormer_factory("llm"), needs=("dim",), reference=_transnormer_reference,
        summary="q_s R(theta(s-t)) k_t lambda_h^(s-t) with learnable per-head decays (gated engine), SRMSNorm, "
                "sigmoid output gate",
        flops=_mixer_flops(lambda n, d, causal: gated_chunked_flops(n, d, d, 64) * (1 if causal else 2), 5),
        source="paper",
    ),
]



def _fastmax_factory(causal: bool = False, order: int = 2, temperature: float = 1.0, chunk_size: int = 64,
                     **shapes: Any) -> KernelizedAttention:
    from attnkit.ops.linear.fastmax import FastmaxFeatureMap

    fm = FastmaxFeatureMap(order=order, temperature=temperature, causal=causal)
    return KernelizedAttention(fm, causal=causal, chunk_size=chunk_size)


def _fastmax_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
                   order: int = 2, **params: Any) -> float:
    m = 1 + head_dim + (head_dim * (head_dim + 1) // 2 if order == 2 else 0)
    per_head = chunked_flops(q_len, m, head_dim, 64) if causal else 2.0 * (q_len + kv_len) * m * (head_dim + 1)
    return float(batch * heads * per_head)


_MECHANISMS.append(Mechanism(
    name="fastmax", family="linear", kind="attention", exact=False, causal=True,
    paper="FAST: Factorizable Attention for Speeding up Transformers (Fastmax, orders 1 and 2)",
    complexity="O(n d^3) (order 2)", factory=_fastmax_factory, reference=_kernel_reference,
    summary="mean-centred, max-norm-scaled q, k; score 1 + x (+ x^2/2) normalised over keys; prefix statistics "
            "when causal", flops=_fastmax_flops, max_bench_len=8192, extras={"feature_map": "fastmax"},
            source="paper",
))



def _multiscale_factory(dim: int | None = None, causal: bool = False, num_heads: int | None = None,
                        **params: Any) -> nn.Module:
    from attnkit.nn.linear import MultiScaleLinearAttention

    if dim is None:
        raise TypeError("efficientvit_msa is a token mixer: pass dim= (the channels of x [batch, seq, dim])")
    params = {k: v for k, v in params.items() if k not in SHAPE_PARAMS}
    return MultiScaleLinearAttention(dim, num_heads, causal=causal, **params)


def _multiscale_reference(built: nn.Module, x: torch.Tensor, **params: Any) -> torch.Tensor:
    from attnkit.nn.linear import multiscale_reference

    return multiscale_reference(built, x)


_MECHANISMS.append(Mechanism(
    name="efficientvit_msa", family="linear", kind="mixer", exact=False, causal=True,
    paper="EfficientViT: Lightweight Multi-Scale Attention for High-Resolution Dense Prediction (multi-scale "
          "linear attention, sec. 3.2)", complexity="O(n d^2) per scale",
    factory=_multiscale_factory, needs=("dim",), reference=_multiscale_reference,
    summary="ReLU linear attention on the original and on depthwise + grouped-1x1 aggregated q, k, v tokens "
            "(kernel 5), concatenated; 1-D over raster order",
    flops=_mixer_flops(lambda n, d, causal: 2 * (chunked_flops(n, d, d, 64) if causal else 4.0 * n * d * (d + 1)), 5),
    source="paper",
))



def _toeplitz_factory(causal: bool = False, num_heads: int | None = None, seq_len: int | None = None,
                      num_features: int = 64, feature_map: str = "favor", **shapes: Any) -> nn.Module:
    from attnkit.ops.linear.toeplitz import ToeplitzRPEAttention

    if num_heads is None or seq_len is None:
        raise TypeError("kernel_rpe_fft needs num_heads and seq_len (the relative-bias table covers 2 seq_len - 1 "
                        "offsets per head)")
    return ToeplitzRPEAttention(num_heads, seq_len, feature_map=feature_map, num_features=num_features,
                                causal=causal)


def _toeplitz_reference(built: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **p: Any):
    from attnkit.ops.linear.toeplitz import toeplitz_reference

    return toeplitz_reference(built, q, k, v)


def _toeplitz_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
                    num_features: int = 64, **params: Any) -> float:
    """FFTs of the ``m (d_v + 1)`` channel pairs (``~5 N log2 N`` each, ``N`` >= 3n) plus features and read-out."""
    size = 1 << (3 * q_len - 2).bit_length()
    pairs = num_features * (head_dim + 1)
    fft = 2 * 5.0 * size * max(1, size.bit_length() - 1) * pairs
    return float(batch * heads * (fft + 2.0 * q_len * pairs * 2 + 4.0 * q_len * head_dim * num_features))


_MECHANISMS.append(Mechanism(
    name="kernel_rpe_fft", family="linear", kind="attention", exact=False, causal=True,
    paper="Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding (Toeplitz RPE by FFT, "
          "eq. 6-8)", complexity="O(n log n m d)", factory=_toeplitz_factory, needs=("num_heads", "seq_len"),
    reference=_toeplitz_reference, flops=_toeplitz_flops, small_params={"num_features": 16}, max_bench_len=2048,
    bench_params={"num_features": 32},
    summary="Performer features with a learnable relative bias exp(b_{j-i}) (a Toeplitz matrix) applied by FFT "
            "over the sequence; b = 0 is plain kernelised attention",
            source="paper",
))



def _learned_map_factory(kind: str) -> Callable[..., KernelizedAttention]:
    def factory(causal: bool = False, head_dim: int | None = None, chunk_size: int = 64, **params: Any):
        from attnkit.ops.linear.learned_maps import EcoHashFeatureMap, SpectralFeatureMap, WeightedDiJiangFeatureMap

        if head_dim is None:
            raise TypeError(f"{kind} needs head_dim (its map owns per-dimension parameters)")
        params = {k: v for k, v in params.items() if k not in SHAPE_PARAMS}
        if kind == "ecoformer":
            return KernelizedAttention(EcoHashFeatureMap(head_dim, **params), causal=causal, chunk_size=chunk_size)
        if kind == "dijiang_weighted":
            return KernelizedAttention(WeightedDiJiangFeatureMap(head_dim, **params), causal=causal,
                                       chunk_size=chunk_size)
        spectral = {"gmm_rks": "gmm", "generative_rks": "generative", "fastfood_rks": "fastfood"}[kind]
        fm = SpectralFeatureMap(head_dim, spectral=spectral, **params)
        return KernelizedAttention(fm, causal=causal, chunk_size=chunk_size, normalize="rms")

    return factory


def _map_flops(features: Callable[[int, dict], int], proj: Callable[[int, dict], float]) -> Callable[..., float]:
    def flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
              **params: Any) -> float:
        m = features(head_dim, params)
        att = chunked_flops(q_len, m, head_dim, 64) if causal else 2.0 * (q_len + kv_len) * m * (head_dim + 1)
        return float(batch * heads * (att + (q_len + kv_len) * proj(head_dim, params)))

    return flops


_MECHANISMS += [
    Mechanism(
        name="gmm_rks", family="linear", kind="attention", exact=False, causal=True,
        paper="On Learning the Transformer Kernel (KERNELIZED TRANSFORMER, GMM-RKS)", complexity="O(n m d)",
        factory=_learned_map_factory("gmm_rks"), needs=("head_dim",), reference=_kernel_reference,
        summary="random Fourier features with a learned Gaussian-mixture spectral distribution (reparameterised), "
                "RMS-normalised output (signed kernel)",
        flops=_map_flops(lambda d, p: 2 * p.get("num_features", 64), lambda d, p: 2.0 * d * p.get("num_features", 64)),
        extras={"feature_map": "spectral"},
        source="paper",
    ),
    Mechanism(
        name="generative_rks", family="linear", kind="attention", exact=False, causal=True,
        paper="On Learning the Transformer Kernel (KERNELIZED TRANSFORMER, generative RKS)", complexity="O(n m d)",
        factory=_learned_map_factory("generative_rks"), needs=("head_dim",), reference=_kernel_reference,
        summary="random Fourier features whose frequencies come from a learned MLP generator g(eps); RMS output",
        flops=_map_flops(lambda d, p: 2 * p.get("num_features", 64), lambda d, p: 2.0 * d * p.get("num_features", 64)),
        extras={"feature_map": "spectral"},
        source="paper",
    ),
    Mechanism(
        name="fastfood_rks", family="linear", kind="attention", exact=False, causal=True,
        paper="On Learning the Transformer Kernel (KERNELIZED TRANSFORMER, FastFood-RKS)", complexity="O(n m d)",
        factory=_learned_map_factory("fastfood_rks"), needs=("head_dim",), reference=_kernel_reference,
        summary="random Fourier features with FastFood frequencies S H G Pi H B and learned diagonals; RMS output",
        flops=_map_flops(lambda d, p: 2 * p.get("num_features", 64), lambda d, p: 2.0 * d * p.get("num_features", 64)),
        extras={"feature_map": "spectral"},
        source="paper",
    ),
    Mechanism(
        name="ecoformer", family="linear", kind="attention", exact=False, causal=True,
        paper="EcoFormer: Energy-Saving Attention with Linear Complexity (kernelised hashing to binary codes)",
        complexity="O(n b d)", factory=_learned_map_factory("ecoformer"), needs=("head_dim",),
        reference=_kernel_reference,
        summary="b-bit {0, 1} codes sign(A^T kbar(x)) from RBF kernels against anchors (straight-through "
                "gradient); linear attention with phi = code; hash learned self-supervised from the attention map "
                "by ecoformer_hash_step (the paper's training)",
        flops=_map_flops(lambda d, p: p.get("bits", 16),
                         lambda d, p: 3.0 * d * p.get("anchors", 32) + 2.0 * p.get("anchors", 32) * p.get("bits", 16)),
        extras={"feature_map": "ecohash"},
        source="paper",
    ),
    Mechanism(
        name="dijiang_weighted", family="linear", kind="attention", exact=False, causal=True,
        paper="DiJiang: Efficient Large Language Models through Compact Kernelization (weighted quasi-Monte-Carlo "
              "DCT features)", complexity="O(n m d)", factory=_learned_map_factory("dijiang_weighted"),
        needs=("head_dim",), reference=_kernel_reference, bench_params={"num_features": 256},
        small_params={"num_features": 32},
        summary="DCT + QMC positive features for the softmax kernel with learnable positive weights per frequency",
        flops=_map_flops(lambda d, p: p.get("num_features", 256), lambda d, p: 2.0 * d * p.get("num_features", 256)),
        extras={"feature_map": "dijiang_weighted"},
        source="paper",
    ),
]

for _m in _MECHANISMS:
    register(_m)

