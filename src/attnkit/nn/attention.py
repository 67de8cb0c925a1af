"""``MultiheadAttention``: projections, optional rotary embeddings, and any registered mechanism."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnkit import patterns as P
from attnkit.functional.exact import attention
from attnkit.nn import recording as _capture
from attnkit.registry import mechanism_info
from attnkit.rotary import RotaryEmbedding, apply_rotary
from attnkit.score_mods import ScoreMod

__all__ = ["MultiheadAttention"]


def _check_dtype(module: nn.Module, t: torch.Tensor, name: str) -> None:
    """Inputs in the dtype of the module's weights: a clear TypeError instead of torch's matmul dtype error."""
    w = module.q_proj.weight
    if t.dtype != w.dtype and not torch.is_autocast_enabled(t.device.type):  # autocast casts the inputs itself
        raise TypeError(f"{name} is {t.dtype} but {type(module).__name__}'s weights are {w.dtype}; pass "
                        f"{name}.to({w.dtype}) or convert the module with .to({t.dtype})")


class MultiheadAttention(nn.Module):
    """Multi-head (or grouped-query) attention over ``[batch, seq, embed_dim]`` inputs.

    Args:
        embed_dim: model width; split into ``num_heads`` heads of ``embed_dim // num_heads`` channels unless
            ``head_dim`` is given.
        num_heads: query heads.
        head_dim: channels per head, independent of ``num_heads`` ("Low-Rank Bottleneck in Multi-head Attention
            Models", Bhojanapalli et al., 2020: ``head_dim >= seq_len`` lets each head's logit matrix reach full
            rank); the projections map ``embed_dim -> num_heads * head_dim`` and back.
        kv_heads: key/value heads (``num_heads`` by default; fewer gives GQA, 1 gives MQA).
        mechanism: a registered mechanism name (``attnkit list``). ``"softmax"`` runs ``attnkit.attention`` with
            ``pattern``, ``score_mod`` and ``normalization``; other names are built with
            ``attnkit.get(mechanism, causal=causal, **mechanism_kwargs)`` (plus the shapes they need). A token
            mixer (kind ``"mixer"`` in ``attnkit list``: ``x [batch, seq, channels] -> same``, with its own
            projections) takes the layer's place whole: it is built with ``dim=embed_dim`` (and ``num_heads``
            where it takes them), and ``forward(x)`` returns ``mixer(x)`` (no q/k/v projections of this layer).
            Mixers of 2-D grids (``[batch, height, width, channels]``) are refused, naming their
            ``attnkit.nn`` module.
        pattern, score_mod, normalization: for ``mechanism="softmax"`` (see ``attnkit.attention``).
        causal: autoregressive masking (combined with ``pattern`` by ``&``).
        rotary: apply rotary position embeddings to queries and keys.
        max_seq_len: passed to mechanisms that need a fixed length (e.g. Linformer).
        bias: whether the projections have biases.

    ``forward(x, context=None, *, cache=None, lengths=None, cu_seqlens=None)``: ``x [batch, q_len, embed_dim]``;
    ``context [batch, kv_len, embed_dim]`` for cross-attention (defaults to ``x``). Returns
    ``[batch, q_len, embed_dim]``. ``cu_seqlens [num_docs + 1]``: ``x`` holds documents packed along the sequence
    (varlen, "Efficient Sequence Packing without Cross-contamination"): attention stays inside each document and
    rotary positions restart at 0 in each, so every document's output equals running it alone.

    Decoding (``mechanism="softmax"`` self-attention): pass an ``attnkit.KVCache`` (or ``SlidingWindowCache``,
    ``AdaptiveKVCache``) as ``cache=``: the first call prefills the prompt, later calls feed the new tokens
    (``x [batch, 1, embed_dim]`` per step). New keys/values are appended, queries attend to the whole cache
    with the layer's pattern at absolute positions, and rotary embeddings rotate at those positions, so prefill +
    N steps equals one full causal pass. ``lengths [batch]``: valid tokens of a right-padded ``x`` (a batch of
    prompts of different lengths; ``KVCache`` only). ``step(x_t, cache)`` is ``forward(x_t, cache=cache)``.
    """

    records_attention = True  # attnkit.analysis.capture names and records it

    def __init__(self, embed_dim: int, num_heads: int, *, kv_heads: int | None = None, mechanism: str = "softmax",
                 pattern: P.Pattern | None = None, score_mod: ScoreMod | None = None,
                 normalization: str = "softmax", causal: bool = False, rotary: bool = False,
                 max_seq_len: int | None = None, bias: bool = False,
                 mechanism_kwargs: dict[str, Any] | None = None, head_dim: int | None = None):
        super().__init__()
        kv_heads = num_heads if kv_heads is None else kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kv_heads", kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} (or pass head_dim=)")
        if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if num_heads % kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of kv_heads={kv_heads}")
        self.embed_dim, self.num_heads, self.kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.mechanism, self.causal = mechanism, causal
        self.is_mixer = False
        if mechanism != "softmax":
            info = mechanism_info(mechanism)
            if info.kind == "mixer":
                if pattern is not None or score_mod is not None or rotary:
                    raise ValueError(f"pattern, score_mod and rotary apply to attention mechanisms; {mechanism!r} "
                                     f"is a token mixer (x -> x) with its own projections")
                self._build_mixer(info, dict(mechanism_kwargs or {}), max_seq_len)
                return
        inner = num_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim) if rotary else None
        self.score_mod = score_mod
        self.normalization = normalization
        mechanism_kwargs = dict(mechanism_kwargs or {})
        if mechanism == "softmax":
            if mechanism_kwargs:
                raise ValueError("mechanism_kwargs apply to registered mechanisms; use pattern/score_mod for softmax")
            self.pattern = (P.causal() & pattern if pattern is not None else P.causal()) if causal else pattern
            self.inner = None
        else:
            if pattern is not None or score_mod is not None:
                raise ValueError(f"pattern and score_mod apply to mechanism='softmax', not {mechanism!r}")
            info = mechanism_info(mechanism)
            shapes = {"num_heads": num_heads, "head_dim": self.head_dim, "seq_len": max_seq_len, "dim": embed_dim}
            for need in info.needs:
                if shapes[need] is None:
                    raise ValueError(f"mechanism {mechanism!r} needs {need}; pass max_seq_len=")
                mechanism_kwargs.setdefault(need, shapes[need])
            self.pattern = None
            self.inner = info.build(causal=causal, **mechanism_kwargs)  # an nn.Module is registered as a child

    def _build_mixer(self, info: Any, kwargs: dict[str, Any], max_seq_len: int | None) -> None:
        """A token mixer in this layer's place (``x [batch, seq, embed_dim] -> same``)."""

        probe = None
        if info.example_inputs is not None:
            probe = info.example_inputs(batch=1, seq_len=4, dtype=torch.float32, seed=0, heads=self.num_heads,
                                        head_dim=self.head_dim)
        if probe is not None and probe[0].dim() != 3:
            built_cls = None
            try:
                with torch.random.fork_rng(devices=[]):
                    built_cls = type(info.build(dim=8, **dict(info.small_params)))
            except Exception:
                pass
            # Named by its module rather than looked up in ``attnkit.nn`` (which imports this file).
            alt = (f"attnkit.nn.{built_cls.__name__}(dim=...)" if built_cls is not None
                   and built_cls.__module__.startswith("attnkit.nn.") else f"attnkit.get({info.name!r}, dim=...)")
            raise ValueError(
                f"mechanism {info.name!r} is a token mixer over {probe[0].dim() - 2}-D grids (x of "
                f"{probe[0].dim()} dimensions, [batch, height, width, channels]); MultiheadAttention maps "
                f"sequences [batch, seq, embed_dim]. Use {alt} on the grid directly "
                f"(see `attnkit list --kind mixer`)")
        params = info.parameters()
        kwargs.setdefault("dim", self.embed_dim)
        if "num_heads" in params and "num_heads" not in kwargs:
            kwargs["num_heads"] = self.num_heads
        if max_seq_len is not None and "max_len" in params and "max_len" not in kwargs:
            kwargs["max_len"] = max_seq_len
        self.is_mixer = True
        self.pattern = None
        self.score_mod, self.normalization, self.rotary = None, "softmax", None
        self.q_proj = self.k_proj = self.v_proj = self.out_proj = None
        self.inner = info.build(causal=self.causal, **kwargs)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)  # [batch, heads, seq, head_dim]

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding at absolute ``positions [batch | 1, seq]`` (per-element positions in a ragged batch)."""
        cos, sin = self.rotary.angles(positions.reshape(-1).to(x.device))
        shape = (positions.shape[0], 1, positions.shape[1], cos.shape[-1])
        return apply_rotary(x, cos.view(shape), sin.view(shape))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, cache: Any = None,
                lengths: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [batch, seq, {self.embed_dim}], got {tuple(x.shape)}")
        if self.is_mixer:
            if context is not None or cache is not None or lengths is not None or cu_seqlens is not None:
                raise ValueError(f"mechanism {self.mechanism!r} is a token mixer (self-mixing x -> x): context=, "
                                 f"cache=, lengths= and cu_seqlens= apply to attention mechanisms")
            out = self.inner(x)
            return out[0] if isinstance(out, tuple) else out
        _check_dtype(self, x, "x")
        if context is not None:
            _check_dtype(self, context, "context")
        if cu_seqlens is not None:
            return self._forward_varlen(x, context, cache, cu_seqlens)
        if cache is not None:
            return self._forward_cached(x, context, cache, lengths)
        if lengths is not None:
            raise ValueError("lengths= applies to decoding with a cache; pass cache=attnkit.KVCache() (or mask "
                             "padding with pattern=attnkit.patterns.key_padding(lengths))")
        context = x if context is None else context
        q = self._split(self.q_proj(x), self.num_heads)
        k = self._split(self.k_proj(context), self.kv_heads)
        v = self._split(self.v_proj(context), self.kv_heads)
        if self.rotary is not None:
            # Bottom-right alignment: the queries are the last q_len of kv_len positions.
            q = self.rotary(q, offset=k.shape[2] - q.shape[2])
            k = self.rotary(k)
        if self.inner is None:
            out = attention(q, k, v, pattern=self.pattern, score_mod=self.score_mod,
                            normalization=self.normalization)
        else:
            out = self.inner(q, k, v)
        if _capture.is_active():  # attnkit.analysis.capture is recording
            out = _capture.record_attention(self, q, k, v, out)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _forward_varlen(self, x: torch.Tensor, context, cache, cu_seqlens: torch.Tensor) -> torch.Tensor:
        from attnkit.ops.exact.variants import check_cu_seqlens, position_ids

        if context is not None or cache is not None or self.inner is not None:
            raise ValueError("cu_seqlens= packs self-attention of mechanism='softmax' (no context, cache or other "
                             "mechanism)")
        cu = check_cu_seqlens(cu_seqlens.to(x.device), x.shape[1])
        q = self._split(self.q_proj(x), self.num_heads)
        k = self._split(self.k_proj(x), self.kv_heads)
        v = self._split(self.v_proj(x), self.kv_heads)
        if self.rotary is not None:
            pos = position_ids(cu)[None]  # restart at 0 in every document
            q, k = self._rotate(q, pos), self._rotate(k, pos)
        out = attention(q, k, v, pattern=self.pattern, score_mod=self.score_mod, normalization=self.normalization,
                        cu_seqlens=cu)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def step(self, x: torch.Tensor, cache: Any, *, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding call: ``forward(x, cache=cache)`` (``x [batch, n_new, embed_dim]``, usually ``n_new=1``)."""
        return self.forward(x, cache=cache, lengths=lengths)

    def _forward_cached(self, x: torch.Tensor, context, cache: Any, lengths) -> torch.Tensor:
        if self.inner is not None:
            raise ValueError(f"cache= runs mechanism='softmax' (exact attention over cached keys); mechanism "
                             f"{self.mechanism!r} has no cache path")
        if context is not None:
            raise ValueError("cache= is for self-attention decoding; for cross-attention project the context once "
                             "and call attnkit.attention on it")
        if not hasattr(cache, "attend") or not hasattr(cache, "positions"):
            raise TypeError(f"cache must be an attnkit cache (KVCache, SlidingWindowCache, AdaptiveKVCache), got "
                            f"{type(cache).__name__}")
        b, n, _ = x.shape
        q = self._split(self.q_proj(x), self.num_heads)
        k = self._split(self.k_proj(x), self.kv_heads)
        v = self._split(self.v_proj(x), self.kv_heads)
        if self.rotary is not None:
            pos = cache.positions(n, lengths)  # absolute positions of the new tokens [batch | 1, n]
            q, k = self._rotate(q, pos), self._rotate(k, pos)
        out = cache.attend(q, k, v, pattern=self.pattern, causal=self.causal, score_mod=self.score_mod,
                           normalization=self.normalization, lengths=lengths)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))
