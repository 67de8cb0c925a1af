"""attnkit inside Hugging Face ``transformers`` models: attention by name, in-place conversion, attention transfer.

transformers looks up a model's attention function by name (``config._attn_implementation``) in
``AttentionInterface``, and the function that builds the mask for it in ``AttentionMaskInterface``. This module
registers attnkit there:

- :func:`register` ``(mechanism, **params) -> name``: any registered attnkit mechanism (``attnkit list``) as
  ``attn_implementation=name``, for ``AutoModelForCausalLM.from_config(cfg, attn_implementation=name)`` or an
  existing model's ``model.set_attn_implementation(name)``. ``register("softmax")`` reproduces the model's own
  eager / sdpa attention (tested to float tolerance), masks included.
- :func:`convert` ``(model, mechanism=, layers=)``: swap the attention of chosen layers in place, keeping every
  weight (the mechanism's own parameters, e.g. Hedgehog feature maps, are added to the attention modules as
  ``attnkit_attention``); the other layers keep exact softmax attention.
- :func:`distill`: attention transfer (Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions
  with Softmax Mimicry", ICLR 2024: its attention-distillation loss, the cross-entropy between softmax and linear
  attention weights; and LoLCATs, Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models",
  2024: its attention-transfer loss, the MSE between attention outputs): every converted layer's mechanism learns
  to mimic that layer's softmax attention on the same queries and keys, while the model runs on softmax outputs
  (so each layer is trained on exact inputs). :func:`finetune` then optionally trains the converted model on
  next-token prediction.
- :func:`attention_errors` (per-layer relative error of the attention output against softmax), :func:`perplexity`,
  and :func:`attention_transfer`, which runs the whole recipe and reports both before and after.
- :func:`sample_text` / :func:`byte_sequences`: English text that ships with the package (attnkit's own
  docstrings) as byte tokens (vocabulary 256), so nothing is downloaded.

Masks follow ``sdpa_attention_forward`` exactly: the mask function registered for attnkit's names is
transformers' ``sdpa_mask``, so an attention function receives ``None`` (no padding: causal for ``q_len > 1``
when the module is causal, with keys cropped to ``q_len`` if there are more, as SDPA's top-left ``is_causal``
does; every key for ``q_len == 1``) or a boolean mask ``[batch, 1, q_len, kv_len]`` (``True``: attend). A float
mask passed by the caller is additive, as in eager attention. Mechanisms other than ``"softmax"`` run with the
mask's structure (causal or bidirectional); a padding mask raises ``NotSupportedError``, and a sliding-window mask
is replaced by the mechanism's own pattern (the mechanism replaces the model's attention).

Decoding (``generate``) uses the model's own cache for keys and values; causal kernelized linear attention
(the ``linear`` family) also keeps its recurrent state (``LinearAttentionState``, as in
``attnkit.RecurrentStateCache``) on the layer, so each new token costs O(1) in the sequence length. With every
layer converted to such a mechanism, ``generate(..., cache=state_cache())`` keeps only those states: memory
O(1) in the sequence length too.

Shapes: transformers passes ``query [batch, heads, q_len, head_dim]``, ``key, value [batch, kv_heads, kv_len,
head_dim]`` (grouped-query attention when ``kv_heads < heads``); the functions return ``[batch, q_len, heads,
head_dim]`` as transformers expects.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit._checks import repeat_kv
from attnkit.cache import _on_device
from attnkit.errors import NotSupportedError
from attnkit.ops.exact.api import attention
from attnkit.ops.exact.variants import grid_shape
from attnkit.ops.linear.api import linear_attention
from attnkit.ops.linear.mechanisms import KernelizedAttention
from attnkit.ops.linear.state import LinearAttentionState
from attnkit.registry import mechanism_info

__all__ = [
    "DISPATCH_NAME", "AttnkitAttention", "register", "convert", "attention_modules", "converted_layers",
    "distill", "finetune", "perplexity", "attention_errors", "attention_transfer", "TransferReport",
    "sample_text", "byte_sequences", "state_cache",
]

# The name ``convert`` sets: each layer runs its own ``attnkit_attention`` (exact softmax where it has none).
DISPATCH_NAME = "attnkit"
# The child module ``convert`` (and the named implementations) add to a transformers attention module.
CHILD = "attnkit_attention"


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "attnkit.integrations.transformers needs transformers (with AttentionInterface and "
            "AttentionMaskInterface); install it with `pip install 'attnkit[hf]'`"
        ) from exc
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


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


def _dropout_advice(module: nn.Module) -> str:
    """What turns a built model's attention dropout off: the model reads it from the attention module at every
    call (GPT-2: ``attn_dropout.p``; Llama, ViT, ...: the float ``attention_dropout``), not from its config."""
    if isinstance(getattr(module, "attn_dropout", None), nn.Dropout):
        fix = (f"for m in model.modules(): if isinstance(m, {type(module).__name__}): m.attn_dropout.p = 0.0")
    elif isinstance(getattr(module, "attention_dropout", None), (int, float)):
        fix = (f"for m in model.modules(): if isinstance(m, {type(module).__name__}): m.attention_dropout = 0.0")
    else:
        fix = None
    return ("call model.eval() (no dropout at inference), or turn the attention dropout off on the built model"
            + (f" (the config is read only when the model is built): `{fix}`" if fix else "")
            + ", or build the model from a config with attention dropout 0 (attn_pdrop / attention_dropout / "
              "attention_probs_dropout_prob)")


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
            raise NotSupportedError(
                f"attnkit attention has no attention-weight dropout (got dropout={dropout} in training mode); "
                f"{_dropout_advice(module)}"
            )
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


# ------------------------------------------------------------------------------------------------------------
# A transformers cache that holds recurrent states only
# ------------------------------------------------------------------------------------------------------------

# (state layer, the key tensor its ``update`` returned): the model passes that very tensor to the attention next
_ACTIVE_STATE_LAYER: list[tuple[Any, torch.Tensor]] = []


def _take_state_layer(key: torch.Tensor) -> Any:
    """The state layer whose ``update`` returned ``key`` (identity, so a stale entry is never used)."""
    if not _ACTIVE_STATE_LAYER:
        return None
    layer, returned = _ACTIVE_STATE_LAYER.pop()
    return layer if returned is key else None


_STATE_CLASSES: tuple[type, type] | None = None


def _state_classes() -> tuple[type, type]:
    """``(StateLayer, StateCache)``, defined on first use (transformers is optional)."""
    global _STATE_CLASSES
    if _STATE_CLASSES is not None:
        return _STATE_CLASSES
    _interfaces()
    from transformers.cache_utils import Cache, CacheLayerMixin

    class StateLayer(CacheLayerMixin):
        """One layer's :class:`~attnkit.ops.linear.state.LinearAttentionState` (``S [batch, heads, m, d_v]``,
        ``z``) and the number of tokens it has seen; ``update`` stores no keys or values."""

        is_sliding = False
        is_croppable = False

        def __init__(self, **kwargs: Any):
            super().__init__()
            self.state: LinearAttentionState | None = None
            self.seen = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device, self.is_initialized = key_states.device, True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            _ACTIVE_STATE_LAYER[:] = [(self, key_states)]
            return key_states, value_states  # the attention sees the new tokens; the past is in the state

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, self.seen  # keys are the new tokens, at absolute positions seen, seen + 1, ...

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.state, self.seen = None, 0

        def _map(self, fn) -> None:
            if self.state is not None:
                self.state = LinearAttentionState(fn(self.state.S), fn(self.state.z), self.state.offset)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._map(lambda t: t[indices])

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove:
                raise NotSupportedError("a recurrent state cannot drop tokens; use the model's default cache")

        @property
        def nbytes(self) -> int:
            return 0 if self.state is None else self.state.nbytes

    class StateCache(Cache):
        """A transformers ``Cache`` whose layers hold only attnkit's recurrent states: O(1) memory in the sequence
        length. Every attention layer must run causal kernelized linear attention (``attnkit.convert(model,
        "hedgehog")`` and the other ``linear`` family mechanisms)."""

        def __init__(self) -> None:
            super().__init__(layer_class_to_replicate=StateLayer)

        @property
        def nbytes(self) -> int:
            """Bytes held by all the layers' states."""
            return sum(layer.nbytes for layer in self.layers)

    _STATE_CLASSES = (StateLayer, StateCache)
    return _STATE_CLASSES


def state_cache() -> Any:
    """A transformers cache that keeps only attnkit's recurrent state per layer (``S [batch, heads, m, d_v]`` and
    ``z [batch, heads, m]``), for a model whose attention layers were all converted to causal linear attention:
    ``model.generate(ids, cache=attnkit.integrations.transformers.state_cache())`` decodes with memory constant in
    the sequence length, where the default cache grows with every key and value. Beam search reorders the states.
    ``.nbytes``: the memory held."""
    return _state_classes()[1]()


# ------------------------------------------------------------------------------------------------------------
# Registration with transformers
# ------------------------------------------------------------------------------------------------------------

_SOFTMAX = AttnkitAttention("softmax")


def _spec_key(mechanism: str, params: dict[str, Any]) -> tuple:
    return (mechanism, tuple(sorted((k, repr(v)) for k, v in params.items())))


def _make_attention_function(spec: tuple[str, dict[str, Any]] | None):
    """The function transformers calls. ``spec=None``: the dispatcher (each layer's own ``attnkit_attention``,
    exact softmax where there is none); otherwise ``(mechanism, params)`` for every layer."""

    def attnkit_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, sliding_window: int | None = None,
                                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        for unsupported in ("position_bias", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotSupportedError(f"attnkit attention does not take {unsupported}= (this model needs it); "
                                        f"keep the model's own attn_implementation")
        att = getattr(module, CHILD, None)
        if spec is None:
            att = att if isinstance(att, AttnkitAttention) else _SOFTMAX
        else:
            # parameters from register(), overridden by the model config's ``attnkit_params`` dict
            params = {**spec[1], **(getattr(getattr(module, "config", None), "attnkit_params", None) or {})}
            if not isinstance(att, AttnkitAttention) or att.spec != _spec_key(spec[0], params):
                att = _attach(module, spec[0], params, label=type(module).__name__)
        out = att.hf_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             sliding_window=sliding_window, is_causal=is_causal, softcap=kwargs.get("softcap"),
                             position_ids=kwargs.get("position_ids"))
        return out.transpose(1, 2).contiguous(), None

    return attnkit_attention_forward


def _register_name(name: str, spec) -> str:
    attention_interface, mask_interface, sdpa_mask = _interfaces()
    attention_interface.register(name, _make_attention_function(spec))
    mask_interface.register(name, sdpa_mask)  # boolean masks, None when SDPA's is_causal would do
    return name


def register(mechanism: str = "softmax", *, name: str | None = None, **params: Any) -> str:
    """Register attnkit ``mechanism`` (built with ``params``) with transformers; returns the name to pass as
    ``attn_implementation`` (default ``"attnkit_<mechanism>"``; registering a name again replaces it).

    Every attention layer of a model using the name runs the mechanism; parameters of the mechanism are
    created on each layer's first call (as the layer's ``attnkit_attention`` child). A model config's
    ``attnkit_params`` dict (e.g. ``LlamaConfig(..., attnkit_params={"window": 64})``) overrides ``params`` for
    that model. To choose layers, or to create trainable parameters before training, use :func:`convert`.

    Example::

        name = attnkit.integrations.transformers.register("softmax")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    """
    if mechanism != "softmax":
        AttnkitAttention(mechanism, params=params)  # validates the name and its kind now, not at the first call
    elif params:
        raise ValueError(f"mechanism 'softmax' takes no parameters, got {sorted(params)}")
    if name is None:
        name = f"attnkit_{mechanism}"
    if not isinstance(name, str) or not name or name == DISPATCH_NAME:
        raise ValueError(f"name must be a non-empty string other than {DISPATCH_NAME!r} (used by convert), "
                         f"got {name!r}")
    return _register_name(name, (mechanism, dict(params)))


# ------------------------------------------------------------------------------------------------------------
# Conversion of an existing model
# ------------------------------------------------------------------------------------------------------------

def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of a transformers model that call the attention interface, in model order: modules
    with a ``config`` that carries ``_attn_implementation`` and an ``is_causal`` attribute (Llama, Mistral,
    GPT-2, ViT and the other models written against ``AttentionInterface``)."""
    found = []
    for path, m in model.named_modules():
        cfg = getattr(m, "config", None)
        if ("Attention" in type(m).__name__ and hasattr(m, "is_causal") and cfg is not None
                and hasattr(cfg, "_attn_implementation")):
            found.append((path, m))
    return found


def _shapes(module: nn.Module) -> tuple[int | None, int | None]:
    cfg = module.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(module, "num_heads", None)
    head_dim = (getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
                or getattr(cfg, "head_dim", None))
    if head_dim is None and heads:
        head_dim = cfg.hidden_size // heads
    return heads, head_dim


def _attach(module: nn.Module, mechanism: str, params: dict[str, Any], *, label: str,
            seq_len: int | None = None) -> AttnkitAttention:
    heads, head_dim = _shapes(module)
    cfg = module.config
    seq_len = seq_len or getattr(cfg, "max_position_embeddings", None)
    if seq_len is None and getattr(cfg, "image_size", None) and getattr(cfg, "patch_size", None):
        seq_len = (int(cfg.image_size) // int(cfg.patch_size)) ** 2 + 1  # ViT: patches and the class token
    att = AttnkitAttention(mechanism, num_heads=heads, head_dim=head_dim, seq_len=seq_len, label=label,
                           params=params)
    weight = next(module.parameters(), None)
    if mechanism != "softmax":
        att.mechanism_module(bool(getattr(module, "is_causal", False)),
                             weight.device if weight is not None else None)
    module.add_module(CHILD, att)
    att.train(module.training)
    return att


def convert(model: nn.Module, mechanism: str = "hedgehog", *, layers: Sequence[int] | None = None,
            seq_len: int | None = None, **params: Any) -> nn.Module:
    """Swap the attention of ``model`` (a transformers model) to attnkit ``mechanism`` in place, keeping its
    weights; returns ``model``.

    Args:
        mechanism: a registered attention mechanism (``attnkit list``), e.g. ``"hedgehog"`` (trainable feature
            maps, for :func:`distill`), ``"performer"``, ``"sliding_window"``; ``"softmax"`` restores exact
            attention on the chosen layers.
        layers: indices into :func:`attention_modules` (model order; negative indices count from the end);
            ``None``: every attention layer. The other layers keep their current attnkit mechanism, or exact
            softmax.
        seq_len: for mechanisms that need a fixed length (default: the config's ``max_position_embeddings``, or a
            ViT's patches plus its class token).
        params: the mechanism's parameters (``attnkit.get(mechanism, **params)``).

    Each chosen module gets an ``attnkit_attention`` child (:class:`AttnkitAttention`) holding the mechanism and
    its parameters (on the module's device), and the model's ``attn_implementation`` becomes ``"attnkit"``.
    """
    _interfaces()  # ImportError with the install hint when transformers is missing
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (a torch.nn.Module), got {type(model).__name__}")
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"found no attention module calling transformers' AttentionInterface in "
                         f"{type(model).__name__}; convert works on transformers models (Llama, Mistral, GPT-2, "
                         f"ViT, ...)")
    if layers is None:
        chosen = list(range(len(mods)))
    else:
        chosen = []
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -len(mods) <= i < len(mods):
                raise ValueError(f"layers must hold ints in [-{len(mods)}, {len(mods)}) (the model has {len(mods)} "
                                 f"attention layers), got {i!r}")
            chosen.append(i % len(mods))
    for i in chosen:
        path, module = mods[i]
        _attach(module, mechanism, params, label=path, seq_len=seq_len)
    _register_name(DISPATCH_NAME, None)
    _set_implementation(model, DISPATCH_NAME)
    return model


def _set_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    if getattr(model, "config", None) is not None and model.config._attn_implementation != name:
        raise RuntimeError(f"could not switch {type(model).__name__} to attn_implementation={name!r}")


def converted_layers(model: nn.Module) -> list[AttnkitAttention]:
    """The :class:`AttnkitAttention` children of ``model`` that run a mechanism other than softmax."""
    return [m for m in model.modules() if isinstance(m, AttnkitAttention) and m.mechanism != "softmax"]


# ------------------------------------------------------------------------------------------------------------
# Data: text the package ships
# ------------------------------------------------------------------------------------------------------------

_TEXT_MODULES = (
    "attnkit", "attnkit.registry", "attnkit.patterns", "attnkit.score_mods", "attnkit.feature_maps",
    "attnkit.normalizations", "attnkit.cache", "attnkit.ops.exact.api", "attnkit.ops.linear.api",
    "attnkit.ops.neighborhood", "attnkit.quality.tasks",
)


def sample_text() -> str:
    """English text that ships with attnkit: the docstrings of its main modules and their public functions and
    classes, in a fixed order (about 45 kB). Deterministic; nothing is downloaded."""
    import importlib

    parts: list[str] = []
    for name in _TEXT_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", [])):
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__doc__:
                parts.append(inspect.getdoc(obj))
    return "\n\n".join(p for p in parts if p)


def byte_sequences(text: str, seq_len: int, *, stride: int | None = None) -> torch.Tensor:
    """``text`` as UTF-8 byte ids (vocabulary 256) cut into windows ``[num, seq_len]`` (``int64``) every
    ``stride`` bytes (default ``seq_len``: no overlap)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if data.numel() < seq_len:
        raise ValueError(f"text has {data.numel()} bytes, fewer than seq_len={seq_len}")
    return data.unfold(0, seq_len, stride).contiguous()


# ------------------------------------------------------------------------------------------------------------
# Measuring and training
# ------------------------------------------------------------------------------------------------------------

def _check_ids(data: torch.Tensor, name: str = "data") -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.long:
        raise TypeError(f"{name} must be token ids [num_sequences, seq_len] (torch.long), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")


def _check_inputs(data: torch.Tensor) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or not (data.dtype == torch.long
                                                                   or data.is_floating_point()):
        raise TypeError(f"data must be token ids [num_sequences, seq_len] (torch.long) or images [num, channels, "
                        f"height, width] (floating), got {getattr(data, 'dtype', type(data).__name__)} "
                        f"{tuple(getattr(data, 'shape', ()))}")


def _run(model: nn.Module, batch: torch.Tensor) -> Any:
    """One forward pass: token ids go in as ``input_ids`` (no cache), floating tensors as ``pixel_values``."""
    if batch.dtype == torch.long:
        return model(input_ids=batch, use_cache=False)
    return model(pixel_values=batch.to(next(model.parameters()).dtype))


def _chunks(data: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, data.shape[0], batch_size):
        yield data[i:i + batch_size]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, *, batch_size: int = 16) -> float:
    """``exp`` of the mean next-token cross-entropy of a causal LM on ``data [num, seq_len]``."""
    _check_ids(data)
    was, dev = model.training, _device(model)
    model.eval()
    total, count = 0.0, 0
    try:
        for ids in _chunks(data, batch_size):
            ids = ids.to(dev)
            total += float(_lm_loss(model(input_ids=ids).logits, ids, "sum"))
            count += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        model.train(was)
    return math.exp(total / count)


@torch.no_grad()
def attention_errors(model: nn.Module, data: torch.Tensor, *, batch_size: int = 16) -> dict[str, float]:
    """Per converted layer, the relative error ``||o - o_softmax|| / ||o_softmax||`` of its attention output
    against exact softmax attention on the same queries, keys and values, over ``data [num, seq_len]``. The model
    runs on the softmax outputs meanwhile, so each layer is measured on exact inputs (no compounding). ``data``
    may also be images ``[num, channels, height, width]`` for a vision model (ViT)."""
    _check_inputs(data)
    if not converted_layers(model):
        raise ValueError("the model has no converted layer; call attnkit.convert(model, mechanism=...) first")
    was, dev = model.training, _device(model)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    try:
        for ids in _chunks(data, batch_size):
            with _recording("compare") as rec:
                _run(model, ids.to(dev))
            for label, vals in rec.values.items():
                s = torch.stack(vals).pow(2).sum(0)
                sums[label] = sums.get(label, 0) + s
    finally:
        model.train(was)
    return {label: float((s[0] / s[1].clamp_min(1e-30)).sqrt()) for label, s in sums.items()}


def _batches(data: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield data[torch.randint(0, data.shape[0], (min(batch_size, data.shape[0]),), generator=g)]


@contextlib.contextmanager
def _only_training(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def distill(model: nn.Module, data: torch.Tensor, *, steps: int = 100, lr: float = 1e-2, batch_size: int = 8,
            loss: str = "hedgehog", seed: int = 0, progress: bool = True) -> list[float]:
    """Attention transfer: train the converted layers' mechanism parameters (e.g. Hedgehog feature maps) to
    mimic each layer's softmax attention; every other weight is frozen. Returns the loss of each step.

    Args:
        data: token ids ``[num, seq_len]``; random batches of ``batch_size`` rows are drawn (``seed``).
        loss: ``"hedgehog"``: cross-entropy between the softmax attention weights and the linear attention
            weights ``phi(q).phi(k) / sum`` (Hedgehog's loss; materialises ``seq_len^2`` weights per head: use
            short sequences); ``"mse"``: mean squared error of the attention outputs over the teacher's mean
            square (LoLCATs' attention transfer; any trainable mechanism).

    The model runs on the softmax outputs (the teacher) during distillation, so every layer learns from exact
    inputs, as in both papers. ``data`` may also be images ``[num, channels, height, width]`` for a vision
    model (ViT; bidirectional attention).
    """
    _check_inputs(data)
    if loss not in ("hedgehog", "mse"):
        raise ValueError(f"loss must be 'hedgehog' or 'mse', got {loss!r}")
    layers = converted_layers(model)
    params = [p for layer in layers for p in layer.parameters()]
    if not params:
        raise ValueError("the converted layers have no trainable parameters; convert with a trainable mechanism "
                         "(e.g. 'hedgehog' or 'rebased') first")
    was, dev = model.training, _device(model)
    model.eval()  # no dropout: the teacher is the model as used
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    try:
        with _only_training(model, params):
            for ids in tqdm(_batches(data, batch_size, steps, seed), total=steps, desc="distill", disable=not progress):
                with _recording("distill", loss) as rec:
                    _run(model, ids.to(dev))
                total = sum(torch.stack(v).sum() for v in rec.values.values()) / max(len(rec.values), 1)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                losses.append(float(total.detach()))
    finally:
        model.train(was)
    return losses


def finetune(model: nn.Module, data: torch.Tensor, *, steps: int = 100, lr: float = 1e-3, batch_size: int = 8,
             parameters: Iterable[nn.Parameter] | None = None, seed: int = 0, progress: bool = True) -> list[float]:
    """Train a causal LM on next-token prediction over ``data [num, seq_len]`` (random batches); returns the loss
    of each step. ``parameters``: what trains (default: every parameter of the model); the others are frozen.

    Used to pre-train a tiny model on :func:`sample_text`, and after :func:`distill` to fine-tune the converted
    model (LoLCATs fine-tunes the attention layers; pass their parameters)."""
    _check_ids(data)
    params = list(model.parameters()) if parameters is None else list(parameters)
    if not params:
        raise ValueError("parameters is empty: nothing to train")
    was, dev = model.training, _device(model)
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    try:
        with _only_training(model, params):
            for ids in tqdm(_batches(data, batch_size, steps, seed), total=steps, desc="finetune",
                            disable=not progress):
                ids = ids.to(dev)
                loss = _lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        model.train(was)
    return losses


@dataclass
class TransferReport:
    """What :func:`attention_transfer` measured (perplexities on the evaluation data; errors per layer)."""

    mechanism: str
    perplexity_softmax: float
    perplexity_converted: float
    perplexity_distilled: float
    perplexity_finetuned: float | None = None
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)
    error_finetuned: dict[str, float] = field(default_factory=dict)
    distill_losses: list[float] = field(default_factory=list)
    finetune_losses: list[float] = field(default_factory=list)

    def table(self) -> str:
        """A plain-text summary: perplexities, then the per-layer attention-output error."""
        lines = [f"mechanism {self.mechanism!r}",
                 f"perplexity  softmax {self.perplexity_softmax:.3f}  converted {self.perplexity_converted:.3f}  "
                 f"distilled {self.perplexity_distilled:.3f}"
                 + ("" if self.perplexity_finetuned is None else f"  fine-tuned {self.perplexity_finetuned:.3f}"),
                 "layer                                   error before  after distill"
                 + ("  after fine-tune" if self.error_finetuned else "")]
        for label, before in self.error_before.items():
            row = f"{label:<40}{before:>12.4f}{self.error_after.get(label, float('nan')):>15.4f}"
            if self.error_finetuned:
                row += f"{self.error_finetuned.get(label, float('nan')):>17.4f}"
            lines.append(row)
        return "\n".join(lines)


def attention_transfer(model: nn.Module, train: torch.Tensor, eval: torch.Tensor, *, mechanism: str = "hedgehog",
                       layers: Sequence[int] | None = None, distill_steps: int = 100, distill_lr: float = 1e-2,
                       loss: str = "hedgehog", finetune_steps: int = 0, finetune_lr: float = 1e-3,
                       batch_size: int = 8, seed: int = 0, progress: bool = True,
                       **params: Any) -> TransferReport:
    """The whole recipe on a causal LM: perplexity with its softmax attention; :func:`convert` the chosen
    ``layers`` to ``mechanism``; per-layer error and perplexity; :func:`distill` (``distill_steps``); error and
    perplexity again; then, if ``finetune_steps``, :func:`finetune` the converted layers' attention modules
    (projections and mechanism) and measure once more. ``train`` / ``eval``: token ids ``[num, seq_len]``."""
    _check_ids(train, "train")
    _check_ids(eval, "eval")
    ppl_soft = perplexity(model, eval, batch_size=batch_size)
    convert(model, mechanism, layers=layers, **params)
    report = TransferReport(mechanism, ppl_soft, perplexity(model, eval, batch_size=batch_size), float("nan"))
    report.error_before = attention_errors(model, eval, batch_size=batch_size)
    report.distill_losses = distill(model, train, steps=distill_steps, lr=distill_lr, batch_size=batch_size,
                                    loss=loss, seed=seed, progress=progress)
    report.error_after = attention_errors(model, eval, batch_size=batch_size)
    report.perplexity_distilled = perplexity(model, eval, batch_size=batch_size)
    if finetune_steps:
        owners = [m for _, m in attention_modules(model) if isinstance(getattr(m, CHILD, None), AttnkitAttention)
                  and getattr(m, CHILD).mechanism != "softmax"]
        params_ft = [p for m in owners for p in m.parameters()]
        report.finetune_losses = finetune(model, train, steps=finetune_steps, lr=finetune_lr,
                                          batch_size=batch_size, parameters=params_ft, seed=seed + 1,
                                          progress=progress)
        report.error_finetuned = attention_errors(model, eval, batch_size=batch_size)
        report.perplexity_finetuned = perplexity(model, eval, batch_size=batch_size)
    return report
