"""The attention module ``convert`` adds to each transformers attention layer (``AttnkitAttention``), and the
masks transformers passes read as attnkit patterns.

Part of :mod:`attnkit.integrations.transformers`."""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit._checks import repeat_kv
from attnkit.cache import _on_device
from attnkit.errors import NotSupportedError
from attnkit.functional.exact import attention
from attnkit.functional.linear import linear_attention
from attnkit.integrations.transformers._common import _spec_key, _take_state_layer
from attnkit.nn.linear import KernelizedAttention
from attnkit.ops.exact.variants import grid_shape
from attnkit.ops.linear.state import LinearAttentionState
from attnkit.registry import mechanism_info

# ------------------------------------------------------------------------------------------------------------
# Masks: what transformers passes, read as attnkit patterns
# ------------------------------------------------------------------------------------------------------------

@dataclass
class _MaskInfo:
    """``kind``: ``full`` | ``causal`` (bottom-right) | ``window`` (causal, ``window`` tokens incl. the query) |
    ``mask`` (a general boolean mask, e.g. padding) | ``bias`` (a float additive mask with real biases)."""

    kind: str
    crop: int | None = None  # keep only the first ``crop`` keys (SDPA's top-left is_causal with more keys)
    # ``full`` for one query of a causal layer: the same as bottom-right causal (mechanisms then run causally)
    one_causal_query: bool = False
    window: int | None = None
    allowed: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    pattern: Any = None  # the mask as an attnkit pattern, built once and shared by every layer (and its tile plan)


_memo: tuple[Any, tuple, _MaskInfo] | None = None  # (weakref to the mask, key, info): one mask serves every layer


def _analyse(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, causal: bool,
             sliding_window: int | None) -> _MaskInfo:
    global _memo
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if causal and q_len > 1:
            return _MaskInfo("causal", crop=q_len if kv_len > q_len else None)
        return _MaskInfo("full", one_causal_query=causal and q_len == 1)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise TypeError(
            f"attention_mask must be None or a 4-D tensor [batch, 1 | heads, q_len, kv_len], got "
            f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}; build the model with an attnkit name from "
            f"attnkit.integrations.transformers.register() so that transformers builds an SDPA-style mask"
        )
    batch, heads = query.shape[0], query.shape[1]
    if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads) or tuple(mask.shape[2:]) != (q_len,
                                                                                                  kv_len):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, but the attention has batch {batch}, {heads} heads, "
            f"{q_len} queries and {kv_len} keys: expected [{batch} or 1, {heads} or 1, {q_len}, {kv_len}]; pass "
            f"one mask row per input sequence (a mask of another batch is not cut or broadcast)"
        )
    try:  # in-place edits of the mask bump its version: the memo is per (tensor, version), never stale
        version = mask._version
    except RuntimeError:  # an inference-mode tensor has no version counter: analyse it every call
        version = None
    memo_key = (q_len, kv_len, causal, sliding_window, version)
    if version is not None and _memo is not None and _memo[0]() is mask and _memo[1] == memo_key:
        return _memo[2]
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | blocked).all()):
            info = _MaskInfo("bias", bias=mask)
            _memo = (weakref.ref(mask), memo_key, info)
            return info
        allowed = ~blocked
    pos = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
    kidx = torch.arange(kv_len, device=mask.device)[None, :]
    tril = kidx <= pos
    if q_len == 1 and bool(allowed.all()):
        info = _MaskInfo("full", one_causal_query=causal)
    elif bool(allowed.all()):
        info = _MaskInfo("full")
    elif bool((allowed == tril).all()):
        info = _MaskInfo("causal")
    elif sliding_window and bool((allowed == (tril & (pos - kidx < sliding_window))).all()):
        info = _MaskInfo("window", window=int(sliding_window))
    else:
        info = _MaskInfo("mask", allowed=allowed)
    _memo = (weakref.ref(mask), memo_key, info)
    return info


def _mask_pattern(allowed: torch.Tensor) -> P.Pattern:
    """A boolean mask ``[batch | 1, heads | 1, q_len, kv_len]`` (raw indices) as an attnkit pattern."""
    per_b, per_h = allowed.shape[0] > 1, allowed.shape[1] > 1
    get = _on_device(allowed)

    def fn(b, h, qi, ki):
        return get(ki.device)[b if per_b else 0, h if per_h else 0, qi, ki]

    return P.custom(fn, batch_dependent=per_b, head_dependent=per_h)


def _bias_mod(bias: torch.Tensor) -> S.ScoreMod:
    per_b, per_h = bias.shape[0] > 1, bias.shape[1] > 1
    get = _on_device(bias)

    def fn(score, b, h, qi, ki):
        return score + get(score.device)[b if per_b else 0, h if per_h else 0, qi, ki].to(score.dtype)

    return S.custom(fn)


def _softmax(q, k, v, info: _MaskInfo, scaling: float | None, softcap: float | None) -> torch.Tensor:
    """Exact softmax attention with the model's mask (the reference every other mechanism is compared with)."""
    if info.crop is not None:
        k, v = k[:, :, :info.crop], v[:, :, :info.crop]
    pattern = {"full": None, "causal": P.causal(), "bias": None}.get(info.kind)
    if info.kind == "window":
        pattern = P.causal() & P.sliding_window(info.window - 1, 0)
    elif info.kind == "mask":
        if info.pattern is None:
            info.pattern = _mask_pattern(info.allowed)
        pattern = info.pattern
    mods = [S.softcap(softcap)] if softcap else []
    if info.kind == "bias":
        mods.append(_bias_mod(info.bias))
    return attention(q, k, v, pattern=pattern, score_mod=mods or None, scale=scaling)


# ------------------------------------------------------------------------------------------------------------
# The attention module added to each transformers attention layer
# ------------------------------------------------------------------------------------------------------------

def _weights_cross_entropy(fm, q: torch.Tensor, k: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Hedgehog's attention-distillation loss: cross-entropy between the softmax weights ``softmax(q.k / sqrt(d))``
    and the linear attention weights ``phi(q).phi(k) / sum``. ``k`` keeps its ``kv_heads``: the features of a
    grouped key are computed once, as in the forward pass (:func:`attnkit.feature_maps.hedgehog_distillation_loss`
    is the same for equal head counts)."""
    pq, pk = fm(q, k)
    h = q.shape[1]
    logits = q @ repeat_kv(k, h).transpose(-1, -2) * q.shape[-1] ** -0.5
    a = pq @ repeat_kv(pk, h).transpose(-1, -2)
    if causal:
        n, s = logits.shape[-2:]
        keep = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n)
        logits = logits.masked_fill(~keep, float("-inf"))
        a = a * keep
    teacher = torch.softmax(logits.float(), -1)
    student = a.float() / a.float().sum(-1, keepdim=True).clamp_min(1e-12)
    return -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1).mean()


class _Recorder:
    """What :func:`_recording` collects while the model runs: per-layer errors or distillation losses."""

    def __init__(self, what: str, loss: str = "mse"):
        self.what, self.loss = what, loss
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, label: str, value: torch.Tensor) -> None:
        self.values.setdefault(label, []).append(value)


_RECORDER: _Recorder | None = None


@contextlib.contextmanager
def _recording(what: str, loss: str = "mse") -> Iterator[_Recorder]:
    global _RECORDER
    prev, _RECORDER = _RECORDER, _Recorder(what, loss)
    try:
        yield _RECORDER
    finally:
        _RECORDER = prev


# Causal mechanisms whose default layout follows the sequence length (a near-square grid of n tokens): in a
# transformers model they get a fixed layout from the model's maximum length instead, so that a token's place
# does not move as the sequence grows, and decoding over the cache equals the full pass. gpsa: ConViT's grid,
# ``cols`` wide (rows as needed).
_CAUSAL_LAYOUT: dict[str, Any] = {"gpsa": lambda seq_len: {"cols": grid_shape(seq_len)[1]}}
# Causal mechanisms (in families that otherwise decode over a cache) whose output at a position depends on the
# whole length: cached decoding is refused with the reason (measured: logits off by 7e-4 to 0.17 against the full
# pass on a 2-layer Llama).
_LENGTH_DEPENDENT: dict[str, str] = {
    "axial": "the grid of its axes is a near-square factorisation of the current length",
    "sigmoid_attention": "its bias -log(n) follows the number of keys",
    "relu_attention": "it divides by the number of keys n",
}


def _dropout_advice(module: nn.Module, dropout: float) -> str:
    """Why attention dropout is refused and how to turn it off, on a built model as well as from its config
    (a built model keeps the probability in its layers: changing the config afterwards does nothing)."""
    where = [f"{name}.p" for name, child in module.named_children() if isinstance(child, nn.Dropout)]
    where += [name for name, value in vars(module).items()
              if "dropout" in name and isinstance(value, float) and not name.startswith("_")]
    built = (f"on this built model set `m.{where[0]} = 0.0` for every {type(module).__name__} m in "
             f"model.modules()" if where else "on a built model set the attention layers' dropout probability to 0")
    return (f"attnkit attention has no attention-weight dropout (got dropout={dropout}): call model.eval(), or "
            f"{built}, or build the model from a config whose attention dropout is 0 (attention_dropout / attn_pdrop "
            f"/ attention_probs_dropout_prob); changing the config of a built model does not change its layers")


class AttnkitAttention(nn.Module):
    """One layer's attnkit mechanism, called by transformers through the registered attention function.

    Args:
        mechanism: a registered attention-kind mechanism (``attnkit list``); ``"softmax"`` is exact attention
            with the model's mask (padding, sliding window, additive float masks).
        num_heads, head_dim: query heads and head dimension (filled from the first call when ``None``).
        seq_len: for mechanisms that need a fixed length (Linformer).
        label: a name for reports (``convert`` uses the module's path in the model).
        params: the mechanism's parameters (``attnkit.get(mechanism, **params)``).

    The mechanism is built per causality (``causal`` for decoder layers) on first use, or eagerly by
    :func:`convert`, as a child module, so its parameters train and move with the model.
    """

    def __init__(self, mechanism: str = "softmax", *, num_heads: int | None = None, head_dim: int | None = None,
                 seq_len: int | None = None, label: str = "", params: dict[str, Any] | None = None):
        super().__init__()
        self.mechanism, self.params = mechanism, dict(params or {})
        self.num_heads, self.head_dim, self.seq_len, self.label = num_heads, head_dim, seq_len, label
        self.record = None
        if mechanism != "softmax":
            self.record = mechanism_info(mechanism)
            if self.record.kind != "attention":
                raise ValueError(
                    f"mechanism {mechanism!r} is a token mixer (kind={self.record.kind!r}), not an attention "
                    f"mechanism over (q, k, v); choose one with kind 'attention' from `attnkit list`"
                )
        elif self.params:
            raise ValueError(f"mechanism 'softmax' takes no parameters, got {sorted(self.params)}")
        self.built = nn.ModuleDict()  # "causal" / "bidirectional" -> module-valued mechanisms
        self._fns: dict[str, Any] = {}  # the same for plain callables (pattern mechanisms)
        self._state: LinearAttentionState | None = None
        self._last_key: torch.Tensor | None = None
        self._warned = False

    @property
    def spec(self) -> tuple:
        return _spec_key(self.mechanism, self.params)

    def extra_repr(self) -> str:
        return f"mechanism={self.mechanism!r}, params={self.params}"

    def mechanism_module(self, causal: bool, device: torch.device | None = None) -> Any:
        """The built mechanism for ``causal`` (building it on first use)."""
        key = "causal" if causal else "bidirectional"
        if key in self.built:
            return self.built[key]
        if key in self._fns:
            return self._fns[key]
        params = dict(self.params)
        if causal and self.mechanism in _CAUSAL_LAYOUT and self.seq_len and not set(params) & {"shape", "cols"}:
            params.update(_CAUSAL_LAYOUT[self.mechanism](self.seq_len))
        shapes = {"num_heads": self.num_heads, "head_dim": self.head_dim, "seq_len": self.seq_len}
        for need in self.record.needs:
            if need not in shapes or shapes[need] is None:
                raise ValueError(f"mechanism {self.mechanism!r} needs {need}; pass {need}= to convert/register")
            params.setdefault(need, shapes[need])
        inner = self.record.build(causal=causal, **params)
        if isinstance(inner, nn.Module):
            self.built[key] = inner.to(device) if device is not None else inner
        else:
            self._fns[key] = inner
        return inner

    def reset_state(self) -> None:
        """Forget the carried recurrent state (decoding starts again from the model's cache)."""
        self._state, self._last_key = None, None

    # -- the transformers entry point ---------------------------------------------------------------------
    def hf_forward(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, *, dropout: float = 0.0, scaling: float | None = None,
                   sliding_window: int | None = None, is_causal: bool | None = None, softcap: float | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, heads, q_len, d]`` queries -> ``[batch, heads, q_len, d_v]`` (transformers' layout is the
        caller's business)."""
        if dropout:
            raise NotSupportedError(_dropout_advice(module, dropout))
        causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
        info = _analyse(query, key, attention_mask, causal, sliding_window)
        state_layer = _take_state_layer(key)
        if state_layer is not None and not (
                self.record is not None and self._causal_of(info, query) and _RECORDER is None
                and isinstance(self.mechanism_module(True, query.device), KernelizedAttention)):
            raise NotSupportedError(
                f"state_cache() holds recurrent states only, but this layer runs {self.mechanism!r} (or is being "
                f"measured against softmax); convert every attention layer to a causal linear mechanism, or "
                f"generate with the model's default cache")
        if self.num_heads is None:
            self.num_heads, self.head_dim = query.shape[1], query.shape[-1]
        if self.record is None:
            return _softmax(query, key, value, info, scaling, softcap)
        if softcap:
            raise NotSupportedError(f"attention logit softcapping applies to 'softmax', not {self.mechanism!r}")
        rec = _RECORDER
        if rec is None:
            return self._mechanism(query, key, value, info, scaling, position_ids, module.training, state_layer)
        teacher = _softmax(query, key, value, info, scaling, None)
        if rec.what == "distill" and rec.loss == "hedgehog":
            rec.add(self.label, self._hedgehog_loss(query, key, info, scaling))
            return teacher
        student = self._mechanism(query, key, value, info, scaling, position_ids, module.training)
        if rec.what == "distill":
            # LoLCATs' attention-output MSE, relative to the teacher's scale so layers weigh alike
            t = teacher.detach().float()
            rec.add(self.label, (student.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        else:
            diff = (student.detach().float() - teacher.float()).norm()
            rec.add(self.label, torch.stack([diff, teacher.float().norm()]))
        return teacher

    def _hedgehog_loss(self, q, k, info: _MaskInfo, scaling) -> torch.Tensor:
        inner = self.mechanism_module(self._causal_of(info, q), q.device)
        fm = getattr(inner, "feature_map", None)
        if fm is None:
            raise NotSupportedError(
                f"loss='hedgehog' trains a feature map; mechanism {self.mechanism!r} has none (use loss='mse')")
        if info.kind in ("mask", "bias", "window"):
            raise NotSupportedError("loss='hedgehog' supports causal or bidirectional masks only; distill on "
                                    "unpadded sequences no longer than the model's sliding window, or use loss='mse'")
        return _weights_cross_entropy(fm, self._scaled(q, scaling), k, causal=self._causal_of(info, q))

    @staticmethod
    def _causal_of(info: _MaskInfo, q: torch.Tensor) -> bool:
        return info.kind in ("causal", "window") or info.one_causal_query

    @staticmethod
    def _scaled(q: torch.Tensor, scaling: float | None) -> torch.Tensor:
        # attnkit mechanisms scale scores by head_dim^-1/2; fold the model's own scale into the queries
        d = q.shape[-1]
        if scaling is None or math.isclose(scaling * math.sqrt(d), 1.0, rel_tol=1e-9):
            return q
        return q * (scaling * math.sqrt(d))

    def _mechanism(self, q, k, v, info: _MaskInfo, scaling, position_ids, training: bool,
                   state_layer: Any = None) -> torch.Tensor:
        if info.kind in ("mask", "bias"):
            raise NotSupportedError(
                f"mechanism {self.mechanism!r} runs causal or bidirectional attention only, but the model passed "
                f"a {'padding (or static-cache)' if info.kind == 'mask' else 'float'} mask; use prompts of equal "
                f"length without padding (attention_mask=None) and the default dynamic cache, or mechanism "
                f"'softmax'"
            )
        if info.crop is not None:
            k, v = k[:, :, :info.crop], v[:, :, :info.crop]
        if info.kind == "window" and not getattr(self, "_warned_window", False):
            # said once per layer, never silently: the mechanism's own pattern replaces the model's window
            warnings.warn(f"mechanism {self.mechanism!r} replaces the model's sliding window ({info.window} tokens) "
                          f"with its own causal pattern; use mechanism 'softmax' (or a windowed mechanism such as "
                          f"'sliding_window') to keep the window", RuntimeWarning, stacklevel=3)
            self._warned_window = True
        causal = self._causal_of(info, q)
        q = self._scaled(q, scaling)
        decoding = causal and q.shape[2] != k.shape[2]  # new queries against the model's cache
        if decoding and (self.record.family not in ("exact", "linear") or self.mechanism in _LENGTH_DEPENDENT):
            # measured: their causal outputs over a cache differ from the full pass (clusters, blocks, landmarks
            # and windows are formed over the whole call; a grid or a -log n bias follows the length), so
            # decoding step by step would change the model
            raise NotSupportedError(self._no_cached_decoding(
                f"its causal output over a cache differs from the full pass ({self.record.family} family: "
                f"{_LENGTH_DEPENDENT.get(self.mechanism, 'its structure is formed over the whole sequence')})"))
        inner = self.mechanism_module(causal, q.device)
        if isinstance(inner, KernelizedAttention) and causal:
            return self._linear(inner, q, k, v, position_ids, training, state_layer)
        if self.record.family not in ("exact", "linear", "neighborhood") or (
                self.record.family == "exact" and isinstance(inner, nn.Module)):
            # other families and the exact family's modules may not take grouped keys: repeat them
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        if not decoding:
            return inner(q, k, v)
        try:
            return inner(q, k, v)
        except (NotSupportedError, ValueError) as exc:
            # the mechanism needs as many queries as keys (a state argument, a whole-sequence pattern): its own
            # advice (state=, initial_state=) is out of reach through transformers' generate
            reason = (str(exc).splitlines() or [type(exc).__name__])[0].split(";")[0]  # not its state= advice
            raise NotSupportedError(self._no_cached_decoding(
                f"it needs as many queries as keys, got {q.shape[2]} new queries and {k.shape[2]} keys ({reason})"
            )) from exc

    def _no_cached_decoding(self, why: str) -> str:
        """Advice a transformers user can act on when this layer cannot decode over the model's cache."""
        return (f"mechanism {self.mechanism!r} cannot decode step by step over the model's cache: {why}. Generate "
                f"with use_cache=False (model.generate(ids, use_cache=False): every step recomputes the whole "
                f"sequence), or, for decoding in constant memory, convert every attention layer to a kernelized "
                f"linear mechanism (e.g. attnkit.convert(model, 'hedgehog')) and pass "
                f"cache=attnkit.integrations.transformers.state_cache()")

    def _linear(self, inner: KernelizedAttention, q, k, v, position_ids, training: bool,
                layer: Any = None) -> torch.Tensor:
        """Causal linear attention over the model's cache, continuing the layer's recurrent state (kept in
        inference mode only: ``training`` is the transformers module's flag)."""
        fm, engine = inner.feature_map, inner.engine
        q_len, kv_len = q.shape[2], k.shape[2]
        past = kv_len - q_len  # cached tokens before the new ones (all of them unless the cache is windowed)
        start = past
        if position_ids is not None and position_ids.numel():
            first = position_ids.reshape(-1, position_ids.shape[-1])[:, 0]
            if bool((first == first[0]).all()):
                start = int(first[0])
        if layer is not None:  # a StateCache: it holds the state, the model passed only the new keys and values
            if not fm.token_local:
                raise NotSupportedError(f"feature map {fm.name!r} is not token-local as configured: it cannot use "
                                        f"state_cache(); generate with use_cache=False")
            st = layer.state if layer.seen else None
            out, st = linear_attention(q, k, v, feature_map=fm, causal=True, state=st, return_state=True, **engine)
            layer.state, layer.seen = st.detach(), st.offset
            return out
        keep = fm.token_local and not (training and torch.is_grad_enabled())  # generate runs without grad
        if past == 0 and start == 0:
            if not keep:
                self.reset_state()
                return inner(q, k, v)
            out, self._state = linear_attention(q, k, v, feature_map=fm, causal=True, return_state=True, **engine)
            self._state, self._last_key = self._state.detach(), k[:, :, -1].detach().clone()
            return out
        if not fm.token_local:
            raise NotSupportedError(
                f"feature map {fm.name!r} is not token-local as configured, so mechanism {self.mechanism!r} cannot "
                f"carry a state across decoding steps; generate with use_cache=False"
            )
        st = self._state
        ok = (st is not None and st.offset == start and past > 0 and self._last_key is not None
              and self._last_key.shape == k[:, :, past - 1].shape and torch.equal(self._last_key, k[:, :, past - 1]))
        if not ok:
            if past != start:
                raise NotSupportedError(
                    f"mechanism {self.mechanism!r}: the layer's recurrent state does not continue this call (position "
                    f"{start}) and the cache holds only {past} earlier tokens; decode from the start with this model"
                )
            if not self._warned:
                warnings.warn(f"attnkit {self.mechanism!r}: the cache was reordered or replaced; rebuilding the "
                              f"recurrent state from the {past} cached tokens (O(n) once)", stacklevel=3)
                self._warned = True
            zeros = q.new_zeros(q.shape[0], q.shape[1], past, q.shape[-1])  # the state needs keys only
            _, st = linear_attention(zeros, k[:, :, :past], v[:, :, :past], feature_map=fm, causal=True,
                                     return_state=True, **engine)
        out, st = linear_attention(q, k[:, :, past:], v[:, :, past:], feature_map=fm, causal=True, state=st,
                                   return_state=True, **engine)
        if keep:
            self._state, self._last_key = st.detach(), k[:, :, -1].detach().clone()
        return out
