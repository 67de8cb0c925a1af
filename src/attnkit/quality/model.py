"""The small model the quality benchmark trains, the mechanism specs it accepts, and their state sizes.

A *mechanism spec* is either a registry name (``attnkit list``), built through
``attnkit.nn.MultiheadAttention(embed_dim, num_heads, mechanism=name, causal=...)``, or ``linear:<feature map>``
(e.g. ``linear:taylor``): kernelized linear attention ``attnkit.functional.linear.linear_attention`` with a feature
map of ``attnkit.feature_maps`` (the linear family's own registry entries are used when they exist; the spec
form reaches every feature map meanwhile).

State size (the x-axis of Based's recall / memory trade-off, Arora et al. 2024): what one head must keep to
produce the next token, in elements: the KV cache ``2 * seq_len * head_dim`` for softmax (and every mechanism
that attends over the whole prefix), ``2 * window * head_dim`` for a sliding window, ``features * d_v`` for
linear attention (the recurrent state ``S``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.nn import recording as _recording

__all__ = ["QualityModel", "FeatureMapAttention", "ShortConv", "MechanismSpec", "parse_mechanism", "state_size",
           "QUALITY_PARAMS", "LINEAR_PREFIX"]

LINEAR_PREFIX = "linear:"

# Parameters of registry mechanisms for the short sequences of the quality tasks (their benchmark defaults
# are sized for 512..64K tokens, where e.g. a 256-token window is no restriction at all at 64 tokens).
QUALITY_PARAMS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 16},
    "dilated": {"window": 8, "dilation": 2},
    "block_local": {"block_size": 16},
    "longformer": {"window": 16, "num_global": 4},
    "fixed": {"block_size": 16, "num_summary": 4},
    "strided": {"stride": 8},
    "hyper": {"block_size": 16, "sample_size": 16},
    "linformer": {"proj_len": 16},
    "nystrom": {"num_landmarks": 16},
    "soft": {"num_landmarks": 16},
    "routing": {"num_clusters": 4},
    "loki": {"top_k": 16, "rank": 8},
    "mra": {"block_size": 8, "num_refined": 2},
    "linear:favor": {"num_features": 32},
    "linear:trig": {"num_features": 32},
    "linear:dijiang": {"num_features": 32},
}


@dataclass(frozen=True)
class MechanismSpec:
    """A parsed ``--mechanisms`` entry: ``name`` as given, ``family``, ``causal`` support, ``feature_map`` for
    ``linear:<map>`` specs, and ``params`` (quality defaults updated with the user's overrides)."""

    name: str
    family: str
    causal: bool
    feature_map: str | None
    params: dict[str, Any]
    paper: str = ""
    base: str = ""  # the name without ``@`` parameters (defaults to ``name``)
    kind: str = "attention"  # the registry record's kind: "attention" or "mixer" (a token mixer over channels)

    @property
    def mechanism(self) -> str:
        """The registry name (or ``linear:<map>``) without the ``@`` parameters."""
        return self.base or self.name


def _variant(name: str) -> tuple[str, dict[str, Any]]:
    """``"sliding_window@window=8+..."`` -> ``("sliding_window", {"window": 8, ...})``."""
    import ast

    base, at, rest = name.partition("@")
    params: dict[str, Any] = {}
    if at:
        for item in rest.split("+"):
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"mechanism variant {name!r}: expected NAME@PARAM=VALUE[+PARAM=VALUE], "
                                 f"e.g. sliding_window@window=8")
            try:
                params[key.strip()] = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError):
                params[key.strip()] = raw.strip()
    return base, params


def parse_mechanism(name: str, overrides: dict[str, Any] | None = None) -> MechanismSpec:
    """Resolve ``name``: a registry name or ``linear:<feature map>``, optionally with parameters after ``@``
    (``sliding_window@window=8``, ``linear:favor@num_features=64+ortho=False``) so one run can sweep a
    parameter; ``overrides`` come last. Raises ``ValueError`` naming the choices.

    Defaults for the short sequences of the tasks: the registry record's ``small_params`` where it defines them
    (over its ``bench_params``), else :data:`QUALITY_PARAMS`, else the factory's own defaults (benchmark
    parameters are sized for long sequences). ``linear:<map>`` specs also take ``qk_dim``: the width queries and
    keys are projected to per head before the feature map (Based's "feature dimension"; values keep the head
    dimension), which sets the recurrent state ``feature_dim(qk_dim) x head_dim``."""
    base, inline = _variant(name)
    if base.startswith(LINEAR_PREFIX):
        from attnkit.feature_maps import FEATURE_MAPS

        params = {**QUALITY_PARAMS.get(base, {}), **inline, **(overrides or {})}
        fm = base[len(LINEAR_PREFIX):]
        if fm not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map in {name!r}; use linear:<map> with one of "
                             f"{', '.join(sorted(FEATURE_MAPS))}")
        qk_dim = params.get("qk_dim")
        if qk_dim is not None and (isinstance(qk_dim, bool) or not isinstance(qk_dim, int) or qk_dim < 1):
            raise ValueError(f"mechanism {name!r}: qk_dim must be a positive int, got {qk_dim!r}")
        _check_params(name, FEATURE_MAPS[fm].__init__, {k: v for k, v in params.items() if k != "qk_dim"},
                      skip=("self", "head_dim", "num_heads"), extra=("qk_dim",))
        return MechanismSpec(name, "linear", True, fm, params, "Katharopoulos et al., 2020 (feature map " + fm + ")",
                             base)
    from attnkit.registry import mechanism_info

    try:
        info = mechanism_info(base)
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]}; or linear:<feature map> (e.g. linear:taylor)") from None
    user = {**inline, **(overrides or {})}
    _check_params(name, info.factory, user, skip=("causal", *info.needs))
    if info.small_params:
        params = {**info.bench_params, **info.small_params, **user}
    elif base in QUALITY_PARAMS:
        params = {**info.bench_params, **QUALITY_PARAMS[base], **user}
    else:
        params = user  # the factory's defaults: benchmark parameters are sized for long sequences
    return MechanismSpec(name, info.family, info.causal, None, params, info.paper, base, info.kind)


def _no_params() -> None:
    pass


def _check_params(name: str, fn: Any, params: dict[str, Any], *, skip: tuple[str, ...],
                  extra: tuple[str, ...] = ()) -> None:
    """Refuse parameters ``fn`` does not take (unless it takes ``**kwargs``), listing the ones it does."""
    if fn is nn.Module.__init__:  # a feature map without constructor parameters
        fn = _no_params
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [k for k in sig.parameters if k not in skip] + list(extra)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"mechanism {name!r} takes no parameter {', '.join(unknown)}; its parameters: "
                         f"{', '.join(accepted) or '(none)'}")


def _build_feature_map(name: str, params: dict[str, Any], *, head_dim: int, num_heads: int):
    from attnkit.feature_maps import FEATURE_MAPS

    cls = FEATURE_MAPS[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = dict(params)
    for key, value in (("head_dim", head_dim), ("num_heads", num_heads)):
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    return cls(**kwargs)


def state_size(spec: MechanismSpec, *, head_dim: int, num_heads: int, seq_len: int, embed_dim: int | None = None
               ) -> tuple[int | None, str]:
    """Elements one head keeps between tokens, and what they are (``"kv cache"``, ``"window cache"``,
    ``"recurrent state"``); ``(None, reason)`` when not known.

    A token mixer (``kind="mixer"``) has no heads: its state is per layer, from its record's
    ``extras["state_size"](dim=embed_dim, seq_len=seq_len, **params)`` (``"mixer state"``), unknown without it."""
    if spec.kind == "mixer":
        from attnkit.registry import mechanism_info

        extras = mechanism_info(spec.mechanism).extras
        dim = embed_dim if embed_dim is not None else head_dim * num_heads
        fn = extras.get("state_size")
        if fn is not None:
            return int(fn(dim=dim, seq_len=seq_len, **spec.params)), "mixer state"
        if extras.get("state_bytes") is not None and spec.causal:  # the bench's convention: bytes per sequence
            from attnkit.bench.workloads import call_with_accepted

            try:
                nbytes = call_with_accepted(extras["state_bytes"], dim=dim, seq_len=seq_len, **spec.params)
                return int(nbytes) // 4, "mixer state"  # float32 elements
            except (TypeError, ValueError):
                pass
        return None, "unknown"
    fm_name = spec.feature_map
    if fm_name is None and spec.family == "linear":
        fm_name = spec.params.get("feature_map")
    if fm_name is not None:
        params = {k: v for k, v in spec.params.items() if k not in ("feature_map", "qk_dim")}
        qk = int(spec.params.get("qk_dim") or head_dim)
        try:
            fm = _build_feature_map(str(fm_name), params, head_dim=qk, num_heads=num_heads)
            return fm.feature_dim(qk) * head_dim, "recurrent state"
        except (KeyError, TypeError, ValueError):  # a registry entry whose parameters the map does not take
            return None, "unknown"
    if spec.family == "linear":  # a registered linear mechanism: its record knows its feature dimension
        from attnkit.registry import mechanism_info

        try:
            feature_dim = mechanism_info(spec.mechanism).extras.get("feature_dim")
        except KeyError:
            feature_dim = None
        try:
            if feature_dim is not None:
                return int(feature_dim(head_dim, **spec.params)) * head_dim, "recurrent state"
            # gated / delta-rule records declare the bytes of one head's state (float32 here)
            nbytes = mechanism_info(spec.mechanism).extras.get("state_bytes")
            if nbytes is not None:
                return int(nbytes(head_dim, dtype=torch.float32, **spec.params)) // 4, "recurrent state"
        except (KeyError, TypeError, ValueError):
            pass
        return None, "unknown"
    p = spec.params
    if spec.mechanism in ("sliding_window", "longformer"):
        window = min(int(p.get("window", seq_len)) + int(p.get("num_global", 0)), seq_len)
        return 2 * window * head_dim, "window cache"
    if spec.mechanism == "block_local":
        return 2 * min(int(p.get("block_size", seq_len)), seq_len) * head_dim, "window cache"
    return 2 * seq_len * head_dim, "kv cache"


class FeatureMapAttention(nn.Module):
    """Multi-head kernelized linear attention (Katharopoulos et al., "Transformers are RNNs", 2020) with any
    feature map of ``attnkit.feature_maps``: projections around ``attnkit.functional.linear.linear_attention``.

    ``qk_dim``: per-head width of queries and keys (default the head dimension). Based (Arora et al., 2024,
    Sec. 4) projects them to a small "feature dimension" (e.g. 16) before the Taylor map, so that the state
    ``feature_dim(qk_dim) x head_dim`` stays small; values keep ``embed_dim // num_heads``.

    ``forward(x)``: ``x [batch, seq, embed_dim]`` -> ``[batch, seq, embed_dim]``.
    """

    records_attention = True  # attnkit.analysis.capture names and records it

    def __init__(self, embed_dim: int, num_heads: int, *, feature_map: str, causal: bool = False,
                 feature_map_params: dict[str, Any] | None = None, bias: bool = False, qk_dim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.qk_dim = self.head_dim if qk_dim is None else int(qk_dim)
        self.causal = causal
        self.qkv = nn.Linear(embed_dim, num_heads * (2 * self.qk_dim + self.head_dim), bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.feature_map = _build_feature_map(feature_map, dict(feature_map_params or {}), head_dim=self.qk_dim,
                                              num_heads=num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from attnkit.functional.linear import linear_attention

        b, n, _ = x.shape
        h, dk = self.num_heads, self.qk_dim
        q, k, v = self.qkv(x).split([h * dk, h * dk, h * self.head_dim], dim=-1)
        q = q.view(b, n, h, dk).transpose(1, 2)  # (B, h, n, dk)
        k = k.view(b, n, h, dk).transpose(1, 2)
        v = v.view(b, n, h, self.head_dim).transpose(1, 2)
        out = linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal)
        if _recording.is_active():  # attnkit.analysis.capture is recording
            out = _recording.record_attention(self, q, k, v, out, fn=lambda q_, k_, v_: linear_attention(
                q_, k_, v_, feature_map=self.feature_map, causal=self.causal))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))


class ShortConv(nn.Module):
    """Short causal depthwise convolution over the sequence, as before every sequence mixer in Zoology (Arora et
    al., 2023, "BaseConv", kernel 3) and Based (Arora et al., 2024): ``y_t = x_t + sum_{i<kernel} w_i * x_{t-i}``
    per channel. The residual keeps each token; the kernel lets a position see its few predecessors (in MQAR:
    the value token sees its key), which is what a single linear-attention layer needs to store key -> value.

    ``forward(x)``: ``x [batch, seq, channels]`` -> same; output at ``t`` depends on inputs at ``<= t`` only.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))  # left padding only: causal
        return x + self.conv(y).transpose(1, 2)


class _Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(conv(norm(x)))``, then ``x + mlp(norm(x))`` (``conv`` optional)."""

    def __init__(self, mixer: nn.Module, embed_dim: int, mlp_ratio: int, conv_kernel: int | None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.conv = ShortConv(embed_dim, conv_kernel) if conv_kernel else None
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(embed_dim, mlp_ratio * embed_dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * embed_dim, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.conv is not None:
            h = self.conv(h)
        x = x + self.mixer(h)
        return x + self.mlp(self.norm2(x))


class _OnGrid(nn.Module):
    """A 2-D / 3-D token mixer on a 1-D sequence: ``x [batch, seq, dim]`` laid out row-major on the most balanced
    grid of ``seq`` tokens (``grid_shape``, as the neighborhood family does), mixed, and flattened back."""

    def __init__(self, mixer: nn.Module, ndim: int):
        super().__init__()
        self.mixer, self.ndim = mixer, ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from attnkit.records.neighborhood import grid_shape

        b, n, c = x.shape
        return self.mixer(x.reshape(b, *grid_shape(n, self.ndim), c)).reshape(b, n, c)


class QualityModel(nn.Module):
    """The Zoology / Based model: an embedding (tokens, or a linear map of real vectors), ``num_layers`` pre-norm
    residual blocks ``[short causal depthwise conv -> token mixer under test]`` + MLP, a final norm and a linear
    readout (Arora et al., "Zoology", 2023, Sec. 3 and App. E; Arora et al., "Based", 2024, Sec. 4). The same block
    for every mechanism, so the comparison is of the mixers alone.

    Positions: with the convolution the model has no positional embedding, as in Zoology's MQAR runs
    (``max_position_embeddings=0``: the convolution and causal masking carry order); without it
    (``conv_kernel=0``, ``attnkit quality --no-conv``) it adds learned absolute positions instead.

    Args:
        spec: the mechanism (:func:`parse_mechanism`): an attention record (through
            ``attnkit.nn.MultiheadAttention``), ``linear:<map>`` (:class:`FeatureMapAttention`) or a token mixer
            record (``kind="mixer"``, built by its factory with ``dim=embed_dim, causal=...``).
        vocab_size / input_dim: token vocabulary, or the width of real-valued inputs (exactly one of them).
        num_outputs: classes of the readout (1 for regression).
        embed_dim, num_heads, num_layers, mlp_ratio: model shape.
        max_seq_len: longest input (learned positions; also given to mechanisms that need a fixed length).
        causal: autoregressive mixing.
        pool: classify the whole sequence from the mean hidden state over ``mask`` (ListOps).
        conv_kernel: width of the short convolution before each mixer (0: none, learned positions instead).

    ``forward(inputs, mask=None)``: ``inputs [batch, seq]`` ids or ``[batch, seq, input_dim]``; returns
    ``[batch, seq, num_outputs]``, or ``[batch, num_outputs]`` when ``pool``.
    """

    def __init__(self, spec: MechanismSpec, *, vocab_size: int | None = None, input_dim: int | None = None,
                 num_outputs: int, embed_dim: int = 64, num_heads: int = 1, num_layers: int = 2,
                 mlp_ratio: int = 2, max_seq_len: int, causal: bool, pool: bool = False, conv_kernel: int = 3):
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError("give exactly one of vocab_size (token inputs) and input_dim (real-valued inputs)")
        if not 1 <= num_layers:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if isinstance(conv_kernel, bool) or not isinstance(conv_kernel, int) or conv_kernel < 0:
            raise ValueError(f"conv_kernel must be an int >= 0 (0: no convolution), got {conv_kernel!r}")
        if causal and not spec.causal:
            from attnkit.errors import NotSupportedError

            raise NotSupportedError(f"mechanism {spec.name!r} has no causal form and this task is causal; "
                                    f"choose one with causal support (`attnkit list`)")
        self.spec, self.causal, self.pool, self.conv_kernel = spec, causal, pool, conv_kernel
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, embed_dim) if vocab_size is not None else nn.Linear(input_dim,
                                                                                                  embed_dim)
        self.pos = None if conv_kernel else nn.Parameter(torch.randn(max_seq_len, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(self._mixer(spec, embed_dim, num_heads, max_seq_len, causal), embed_dim, mlp_ratio, conv_kernel)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.readout = nn.Linear(embed_dim, num_outputs)

    @staticmethod
    def _mixer(spec: MechanismSpec, embed_dim: int, num_heads: int, max_seq_len: int, causal: bool) -> nn.Module:
        if spec.feature_map is not None:
            params = {k: v for k, v in spec.params.items() if k != "qk_dim"}
            return FeatureMapAttention(embed_dim, num_heads, feature_map=spec.feature_map, causal=causal,
                                       feature_map_params=params, qk_dim=spec.params.get("qk_dim"))
        if spec.kind == "mixer":
            from attnkit.registry import mechanism_info

            info = mechanism_info(spec.mechanism)
            shapes = {"dim": embed_dim, "seq_len": max_seq_len, "num_heads": num_heads,
                      "head_dim": embed_dim // num_heads}
            mixer = info.build(causal=causal, **{k: shapes[k] for k in info.needs if k != "dim"},
                               **{**spec.params, "dim": embed_dim})
            if not isinstance(mixer, nn.Module):
                raise TypeError(f"mixer {spec.mechanism!r}: its factory returned {type(mixer).__name__}, not an "
                                f"nn.Module")
            spatial = int(info.extras.get("spatial", 1))
            return _OnGrid(mixer, spatial) if spatial > 1 else mixer
        from attnkit.nn import MultiheadAttention

        return MultiheadAttention(embed_dim, num_heads, mechanism=spec.mechanism, causal=causal,
                                  max_seq_len=max_seq_len, mechanism_kwargs=dict(spec.params) or None)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n = inputs.shape[1]
        if n > self.max_seq_len:
            raise ValueError(f"inputs have {n} positions, more than max_seq_len={self.max_seq_len}")
        x = self.embed(inputs)  # (B, n, D)
        if self.pos is not None:
            x = x + self.pos[:n]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.pool:
            if mask is None:
                x = x.mean(dim=1)
            else:
                w = mask.to(x.dtype).unsqueeze(-1)
                x = (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return self.readout(x)
