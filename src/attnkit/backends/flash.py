"""The ``flash`` backend: FlashAttention-2 (``flash-attn``, ``attnkit[flash]``) for the patterns it has built in.

"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (Dao, 2023). Its
``flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size=(left, right), softcap, alibi_slopes,
deterministic, return_attn_probs)`` takes ``[batch, seq, heads, dim]`` in float16/bfloat16 on CUDA, head dims up to
256, fewer key/value heads (GQA) natively, causal masks and windows aligned bottom-right (as attnkit), and
``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)`` for packed
sequences ``[total, heads, dim]``. attnkit maps onto it:

* ``full()``, ``causal()``, ``sliding_window(l, r)`` and their intersections: a window ``(left, right)``;
* ``document(ids)`` (alone or with one of the above), when every segment is one contiguous run and
  ``q_len == kv_len``: the varlen call with ``cu_seqlens`` at the run boundaries;
* score modifiers ``alibi(h)`` (``alibi_slopes``), ``softcap(c)`` (``softcap``), and ``softcap`` then ``alibi``
  (the order the kernel applies them).

Anything else is refused with the reason; the package is imported the first time the backend runs.
"""

from __future__ import annotations

import math

import torch

from attnkit.backends.base import import_optional

__all__ = ["flash_reasons", "flash_run", "band_of", "split_document"]

_INF = math.inf


def band_of(pattern) -> tuple[float, float] | None:
    """``(lo, hi)`` if ``pattern`` is ``lo <= kv_idx - p <= hi`` (full, causal, windows and their intersections)."""
    from attnkit import patterns as P

    if pattern is None or isinstance(pattern, P._Full):
        return (-_INF, _INF)
    if isinstance(pattern, P._Band):
        return (pattern.lo, pattern.hi)
    if type(pattern) is P._And:
        a, b = band_of(pattern.a), band_of(pattern.b)
        if a is not None and b is not None:
            return (max(a[0], b[0]), min(a[1], b[1]))
    return None


def _and_leaves(pattern) -> list:
    from attnkit import patterns as P

    if type(pattern) is P._And:
        return _and_leaves(pattern.a) + _and_leaves(pattern.b)
    return [pattern]


def split_document(pattern):
    """``(document_pattern, (lo, hi))`` if ``pattern`` is one document pattern intersected with bands (or alone)."""
    from attnkit import patterns as P

    leaves = _and_leaves(pattern)
    docs = [p for p in leaves if isinstance(p, P._Document)]
    if len(docs) != 1:
        return None
    lo, hi = -_INF, _INF
    for p in leaves:
        if p is docs[0]:
            continue
        band = band_of(p)
        if band is None:
            return None
        lo, hi = max(lo, band[0]), min(hi, band[1])
    return docs[0], (lo, hi)


def _runs(doc, batch: int, length: int) -> tuple[torch.Tensor, int] | None:
    """``cu_seqlens`` (int32, CPU) over the flattened ``batch * length`` tokens and the longest run, or None if
    some segment id occurs in more than one run (then documents are not contiguous sequences)."""
    cache = doc.__dict__.setdefault("_flash_runs", {})
    key = (batch, length)
    if key not in cache:
        ids = doc.segment_ids.detach().to("cpu").reshape(-1, length).expand(batch, length)
        bounds, ok = [0], True
        for row in range(batch):
            r = ids[row]
            starts = torch.nonzero(r[1:] != r[:-1]).reshape(-1) + 1
            run_ids = r[torch.cat([torch.zeros(1, dtype=torch.long), starts])]
            ok = ok and run_ids.unique().numel() == run_ids.numel()
            bounds.extend((starts + row * length).tolist())
            bounds.append((row + 1) * length)
        cu = torch.tensor(bounds, dtype=torch.int32)
        cache[key] = (cu, int((cu[1:] - cu[:-1]).max())) if ok else None
    return cache[key]


def _mods(score_mod):
    """``(alibi_module | None, softcap | 0.0)`` if the modifier is one the kernel has built in, else None."""
    from attnkit import score_mods as S

    if score_mod is None:
        return None, 0.0
    mods = list(score_mod.mods) if isinstance(score_mod, S._Compose) else [score_mod]
    kinds = [type(m) for m in mods]
    if kinds == [S._Alibi]:
        return mods[0], 0.0
    if kinds == [S._Softcap]:
        return None, mods[0].cap
    if kinds == [S._Softcap, S._Alibi]:
        return mods[1], mods[0].cap
    return False


def _window(band: tuple[float, float]) -> tuple[bool, tuple[int, int]]:
    lo, hi = band
    if lo == -_INF and hi == 0:
        return True, (-1, -1)
    left = -1 if lo == -_INF else int(-lo)
    right = -1 if hi == _INF else int(hi)
    return False, (left, right)


def flash_reasons(call) -> list[str]:
    why = []
    if call["norm"].name != "softmax":
        why.append(f"normalization {call['norm'].name!r} (FlashAttention computes softmax only)")
    if call["head_dim"] != call["head_dim_v"]:
        why.append(f"value head dim {call['head_dim_v']} != query head dim {call['head_dim']}")
    if _mods(call["score_mod"]) is False:
        why.append(f"score_mod {call['score_mod']!r} (flash-attn has alibi, softcap, and softcap then alibi)")
    pattern = call["pattern"]
    band = band_of(pattern)
    if band is not None:
        lo, hi = band
        if lo > hi or (lo > 0) or (hi < 0 and hi != -_INF):
            why.append(f"pattern {pattern!r}: windows that exclude the query's own position are not expressible")
        return why
    doc = split_document(pattern)
    if doc is None:
        why.append(f"pattern {pattern!r} (flash-attn runs full, causal, windows and contiguous documents)")
        return why
    if call["q_len"] != call["kv_len"]:
        why.append("document pattern with q_len != kv_len (the varlen call packs equal-length sequences)")
    elif _runs(doc[0], call["batch"], call["kv_len"]) is None:
        why.append("document segments are not contiguous runs (varlen sequences must be)")
    if call["return_lse"]:
        why.append("return_lse with documents (the varlen log-sum-exp layout differs between flash-attn versions)")
    return why


def flash_run(q, k, v, *, pattern, score_mod, scale, return_lse=False):
    """Run flash-attn on attnkit's ``[B, H, L, D]`` tensors (reasons already checked)."""
    fa = import_optional("flash_attn", "flash")
    alibi, cap = _mods(score_mod)
    slopes = None if alibi is None else alibi.slopes.to(device=q.device, dtype=torch.float32)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, L, H, D]: flash-attn's layout
    band = band_of(pattern)
    if band is not None:
        causal, window = _window(band)
        res = fa.flash_attn_func(qt, kt, vt, dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=window,
                                 softcap=cap, alibi_slopes=slopes, return_attn_probs=return_lse)
        if return_lse:
            out, lse = res[0], res[1]
            return out.transpose(1, 2), lse.float()
        return res.transpose(1, 2)
    doc, band = split_document(pattern)
    b, n = q.shape[0], q.shape[2]
    cu, longest = _runs(doc, b, n)
    cu = cu.to(q.device)
    causal, window = _window(band)
    flat = [t.reshape(b * n, t.shape[2], t.shape[3]) for t in (qt, kt, vt)]
    out = fa.flash_attn_varlen_func(*flat, cu, cu, longest, longest, dropout_p=0.0, softmax_scale=scale,
                                    causal=causal, window_size=window, softcap=cap, alibi_slopes=slopes)
    return out.reshape(b, n, q.shape[1], v.shape[-1]).transpose(1, 2)
