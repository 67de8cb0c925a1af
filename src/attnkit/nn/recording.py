"""Record the attention of a model while it runs: ``with attnkit.analysis.capture(model) as cap: model(x)``.

What is recorded, per attention module call (an :class:`AttentionRecord`):

- ``attnkit.nn.MultiheadAttention`` with ``mechanism="softmax"``: the exact probabilities, from
  ``attnkit.ops.exact.weights.attention_weights`` (same pattern, score modifier and normalisation).
- ``attnkit.nn.MultiheadAttention`` with any other registered mechanism: the matrix the mechanism applies to the
  values, read off by *probing* it with one-hot values (``out = A v`` for every mechanism that is linear in
  ``v``: landmark, low-rank, clustered, sparse and kernelised attention). For linear attention this is the
  normalised kernel weights ``phi(q_i) phi(k_j) / sum_l phi(q_i) phi(k_l)``. Mechanisms that are not linear in
  ``v`` (an RMS-normalised output) are detected (``A v`` differs from the output) and recorded with
  ``weights=None`` and a ``note``.
- ``torch.nn.MultiheadAttention``: its own averaged-off per-head weights (the call is made with
  ``need_weights=True, average_attn_weights=False``, so its second output is then the weights).

Filters keep memory bounded: ``layers`` (qualified module names, ``fnmatch`` patterns, or indices in the order the
attention modules appear in ``model``), ``heads`` and ``queries``; ``max_bytes`` refuses a record that would be
larger. ``grad=True`` keeps the recorded (unfiltered) matrices in the autograd graph: the module's output is
recomputed as ``A @ v`` from the recorded ``A`` (the same value), so ``record.weights.grad`` is the gradient of a
loss with respect to the attention matrix after ``backward()`` (Chefer et al.'s relevance needs it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["AttentionRecord", "Capture", "capture", "probe_attention_matrix", "is_active", "record_attention"]

_ACTIVE: list[Capture] = []


@dataclass
class AttentionRecord:
    """One call of one attention module.

    ``weights [batch, heads, queries, kv_len]`` (after the ``heads`` / ``queries`` filters; None when the
    mechanism has no attention matrix), ``kind`` ("probabilities", "probe" or "none"), ``q``/``k``
    ``[batch, heads, seq, dim]`` when ``store_qk=True``, and the ``heads``/``queries`` indices kept.
    """

    layer: str
    weights: torch.Tensor | None
    kind: str
    mechanism: str = ""
    heads: list[int] | None = None
    queries: list[int] | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    note: str = ""
    full: torch.Tensor | None = field(default=None, repr=False)  # unfiltered, in the graph (grad=True)


def is_active() -> bool:
    return bool(_ACTIVE)


def probe_attention_matrix(fn: Any, q: torch.Tensor, k: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """The matrix ``A [batch, heads, q_len, kv_len]`` that ``fn(q, k, v) = A v`` applies, for a mechanism linear in
    ``v``: ``fn`` is called with one-hot values, ``head_dim`` key columns at a time (``ceil(kv_len / dim)`` calls),
    under the same random seed each time so random-feature mechanisms use the same features. Differentiable in
    ``q`` and ``k``; ``O(q_len * kv_len)`` memory by nature."""
    b, kv_heads, kv_len, d = k.shape
    eye = torch.eye(kv_len, device=k.device, dtype=k.dtype)
    cols = []
    for start in range(0, kv_len, d):
        block = eye[:, start:start + d]
        if block.shape[1] < d:  # pad the last block to the head dim; the padded columns are dropped below
            block = torch.cat([block, block.new_zeros(kv_len, d - block.shape[1])], dim=1)
        v = block.expand(b, kv_heads, kv_len, d)
        with torch.random.fork_rng(devices=[] if q.device.type == "cpu" else [q.device]):
            torch.manual_seed(seed)
            out = fn(q, k, v)
        cols.append(out[..., : min(d, kv_len - start)])
    return torch.cat(cols, dim=-1)


class Capture:
    """The recorder returned by :func:`capture`; ``records`` is the list of :class:`AttentionRecord`."""

    def __init__(self, model: nn.Module | None = None, *, layers: Sequence[str | int] | None = None,
                 heads: Sequence[int] | None = None, queries: Sequence[int] | slice | None = None,
                 store_qk: bool = False, grad: bool = False, max_bytes: int = 1 << 30):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.model, self.layers, self.store_qk, self.grad, self.max_bytes = model, layers, store_qk, grad, max_bytes
        self.heads = None if heads is None else [int(h) for h in heads]
        self.queries = queries
        self.records: list[AttentionRecord] = []
        self._names: dict[int, str] = {}
        self._hooks: list[Any] = []

    # -- naming and filtering
    def _name(self, module: nn.Module) -> str:
        key = id(module)
        if key not in self._names:
            self._names[key] = f"{type(module).__name__}#{len(self._names)}"
        return self._names[key]

    def _wanted(self, name: str) -> bool:
        if self.layers is None:
            return True
        order = list(self._names.values())
        for sel in self.layers:
            if isinstance(sel, int):
                if sel < len(order) and order[sel] == name:
                    return True
            elif fnmatch.fnmatchcase(name, sel):
                return True
        return False

    def __enter__(self) -> Capture:
        if self.model is not None:
            for name, module in self.model.named_modules():
                if getattr(module, "records_attention", False) or isinstance(module, nn.MultiheadAttention):
                    self._names[id(module)] = name or type(module).__name__
                if isinstance(module, nn.MultiheadAttention):
                    self._hooks.append(module.register_forward_pre_hook(_torch_mha_pre_hook, with_kwargs=True))
                    self._hooks.append(module.register_forward_hook(self._torch_mha_hook))
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- recording
    def _filter(self, w: torch.Tensor) -> tuple[torch.Tensor, list[int] | None, list[int] | None]:
        heads = queries = None
        if self.heads is not None:
            bad = [h for h in self.heads if not -w.shape[1] <= h < w.shape[1]]
            if bad:
                raise ValueError(f"capture heads={self.heads}: the module has {w.shape[1]} heads")
            heads = [h % w.shape[1] for h in self.heads]
            w = w[:, heads]
        if self.queries is not None:
            idx = torch.arange(w.shape[2])[self.queries] if isinstance(self.queries, slice) else \
                torch.as_tensor(list(self.queries), dtype=torch.long) % w.shape[2]
            queries = idx.tolist()
            w = w[:, :, idx.to(w.device)]
        return w, heads, queries

    def _add(self, name: str, weights: torch.Tensor | None, kind: str, mechanism: str, q=None, k=None,
             note: str = "") -> None:
        full = weights if self.grad else None
        heads = queries = None
        if weights is not None:
            if self.grad:
                weights.retain_grad()
            else:
                weights = weights.detach()
            kept, heads, queries = self._filter(weights)
            size = kept.numel() * kept.element_size()
            if size > self.max_bytes:
                raise MemoryError(f"capture of {name!r} would hold {size / 2**20:.0f} MiB of attention weights "
                                  f"{tuple(kept.shape)} (max_bytes={self.max_bytes}); filter with layers=, heads= "
                                  f"or queries=, or raise max_bytes")
            weights = kept
        rec = AttentionRecord(name, weights, kind, mechanism, heads, queries, note=note, full=full)
        if self.store_qk and q is not None:
            rec.q, rec.k = q.detach(), k.detach()
        self.records.append(rec)

    def _torch_mha_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._name(module)
        if not self._wanted(name) or not isinstance(output, tuple) or output[1] is None:
            return
        w = output[1]
        self._add(name, w if w.dim() == 4 else w.unsqueeze(0), "probabilities", "torch.nn.MultiheadAttention")

    # -- queries
    def weights(self, layer: str | None = None) -> list[torch.Tensor]:
        """The recorded matrices, in call order (of ``layer`` only when given)."""
        return [r.weights for r in self.records if r.weights is not None and (layer is None or r.layer == layer)]

    def gradients(self) -> list[torch.Tensor | None]:
        """``d loss / d A`` of each record after ``backward()`` (``grad=True``), unfiltered."""
        if not self.grad:
            raise ValueError("gradients need capture(..., grad=True)")
        return [None if r.full is None else r.full.grad for r in self.records]


def _torch_mha_pre_hook(module: nn.Module, args: Any, kwargs: dict) -> tuple:
    kwargs = dict(kwargs)
    kwargs["need_weights"] = True
    kwargs["average_attn_weights"] = False
    return args, kwargs


def capture(model: nn.Module | None = None, *, layers: Sequence[str | int] | None = None,
            heads: Sequence[int] | None = None, queries: Sequence[int] | slice | None = None,
            store_qk: bool = False, grad: bool = False, max_bytes: int = 1 << 30) -> Capture:
    """A context manager recording the attention of every attnkit attention module (and
    ``torch.nn.MultiheadAttention`` inside ``model``) called within it. See the module docstring.

    Example::

        with attnkit.analysis.capture(model, heads=[0, 1], queries=slice(0, 64)) as cap:
            model(tokens)
        maps = cap.weights()      # one [batch, 2, 64, kv_len] tensor per attention call
    """
    return Capture(model, layers=layers, heads=heads, queries=queries, store_qk=store_qk, grad=grad,
                   max_bytes=max_bytes)


def _applies(w: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> bool:
    from attnkit._checks import repeat_kv

    with torch.no_grad():
        applied = torch.matmul(w.to(torch.float64), repeat_kv(v, w.shape[1]).to(torch.float64))
        return torch.allclose(applied, out.to(torch.float64), atol=1e-3, rtol=1e-2)


def record_attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, fn: Any = None) -> torch.Tensor:
    """Called by attnkit's attention modules (``records_attention = True``) after their mechanism ran, only while
    a capture is active. ``fn(q, k, v)``: the mechanism to probe (default: the module's ``inner`` mechanism, or
    the exact probabilities of its softmax path). Returns the output to use: ``out`` itself, or ``A @ v`` with
    the recorded ``A`` under ``grad=True``."""
    from attnkit._checks import repeat_kv

    for cap in list(_ACTIVE):
        name = cap._name(module)
        if not cap._wanted(name):
            continue
        mech = getattr(module, "mechanism", type(module).__name__)
        if not isinstance(mech, str):
            mech = type(module).__name__
        qq, kk = (q, k) if cap.grad else (q.detach(), k.detach())
        with torch.set_grad_enabled(cap.grad):
            if fn is not None:
                w = probe_attention_matrix(fn, qq, kk)
                kind = "probe"
            elif getattr(module, "inner", None) is None:
                from attnkit.ops.exact.weights import attention_weights

                w = attention_weights(qq, kk, pattern=module.pattern, score_mod=module.score_mod,
                                      normalization=module.normalization)
                kind = "probabilities"
            else:
                w = probe_attention_matrix(module.inner, qq, kk)
                kind = "probe"
        # a probe reads A off the mechanism's output, which is A v only for mechanisms linear in v; the softmax
        # path's probabilities are exact by construction and need no check
        if kind == "probe" and not _applies(w, v, out):
            cap._add(name, None, "none", mech, q, k, note="the mechanism is not linear in v (e.g. an RMS-normalised "
                     "output), so it applies no attention matrix")
            continue
        cap._add(name, w, kind, mech, q, k)
        if cap.grad:
            out = torch.matmul(w, repeat_kv(v, w.shape[1]).to(w.dtype)).to(out.dtype)
    return out
