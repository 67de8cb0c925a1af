"""Decoding caches: prefill a prompt, then generate one token at a time.

Every cache implements one protocol, used by :class:`attnkit.nn.MultiheadAttention` (``forward(x, cache=...)``):

* ``positions(n, lengths=None) -> [batch, n]``: the absolute positions of the next ``n`` tokens (rotary
  embeddings rotate new queries and keys there; stored keys are already rotated);
* ``attend(q, k, v, *, pattern, score_mod, normalization, scale, lengths) -> out``: append the new keys and
  values ``[batch, kv_heads, n, dim]`` and attend the new queries ``[batch, heads, n, dim]`` to everything the
  cache holds, with the layer's pattern evaluated at absolute positions;
* ``nbytes``: memory held by the cache.

Caches:

* :class:`KVCache`: the standard cache. Preallocated, grows by doubling, grouped-query (stores ``kv_heads``),
  and a batch of different lengths (``lengths=``: right-padded prompts; each element appends at its own end).
  Prefill + N steps equals one full causal pass.
* :class:`SlidingWindowCache`: keeps only the last ``window`` tokens; exact for patterns that look back at most
  ``window`` positions (``causal() & sliding_window(w, 0)`` with ``w <= window``). Memory O(window).
* :class:`AdaptiveKVCache`: FastGen ("Model Tells You What to Discard: Adaptive KV Cache Compression for
  LLMs", Ge et al., 2024). Prefill is exact; the prompt's attention profile picks per (batch, kv head) the
  cheapest policy (special tokens, punctuation, frequent "heavy hitters", local window, full) whose recovery
  ratio reaches ``threshold``; only the kept keys/values are stored, and every generated token is compressed by
  its head's policy too (local heads evict beyond their window, special-token heads keep special tokens only...).
  See :func:`choose_policies`.
* :class:`RecurrentStateCache`: the O(1) state of causal linear attention (``attnkit.ops.linear``), used by
  :class:`attnkit.nn.LinearMultiheadAttention` through the same ``forward(x, cache=...)`` interface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnkit import patterns as P
from attnkit._checks import default_scale
from attnkit.functional.exact import attention
from attnkit.normalizations import resolve
from attnkit.ops.exact.reference import attention_weights
from attnkit.ops.linear.state import LinearAttentionState

__all__ = [
    "KVCache", "SlidingWindowCache", "AdaptiveKVCache", "RecurrentStateCache", "choose_policies", "POLICIES",
    "policy_keep_mask",
]


def _check_matches(name: str, k: torch.Tensor, v: torch.Tensor, held_k: torch.Tensor | None,
                   held_v: torch.Tensor | None) -> None:
    """New keys/values must have the held ones' batch, kv heads, dims, dtype and device (a cache never casts
    or reshapes silently)."""
    if held_k is None:
        return
    if (k.shape[0], k.shape[1], k.shape[3]) != (held_k.shape[0], held_k.shape[1], held_k.shape[3]) \
            or v.shape[-1] != held_v.shape[-1]:
        raise ValueError(f"{name}: new keys {tuple(k.shape)} / values {tuple(v.shape)} do not match the cache "
                         f"[batch={held_k.shape[0]}, kv_heads={held_k.shape[1]}, *, dim={held_k.shape[3]}] "
                         f"(values dim={held_v.shape[-1]}); call reset() before a new sequence")
    if k.dtype != held_k.dtype or v.dtype != held_v.dtype or k.device != held_k.device:
        raise TypeError(f"{name}: new keys are {k.dtype} on {k.device}, the cache holds {held_k.dtype} on "
                        f"{held_k.device}; call reset() or cast the inputs")


def _check_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if q.shape[2] != k.shape[2] or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"new q, k, v must have the same batch and length and k, v the same heads: got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}), both >= 1")


def _as_lengths(lengths, batch: int, n: int, device) -> torch.Tensor:
    """Valid new tokens per batch element, ``[batch]`` long (default: all ``n``)."""
    if lengths is None:
        return torch.full((batch,), n, dtype=torch.long, device=device)
    try:
        raw = lengths.to(device) if isinstance(lengths, torch.Tensor) else torch.as_tensor(lengths, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"lengths must be a sequence or tensor of ints (new tokens per batch element), got "
                        f"{lengths!r}") from exc
    raw = raw.reshape(-1)
    if raw.dtype == torch.bool or raw.is_complex():
        raise TypeError(f"lengths must be integers (new tokens per batch element), got {raw.dtype}")
    if raw.is_floating_point():
        if not bool((torch.isfinite(raw) & (raw == raw.round())).all()):
            raise ValueError(f"lengths must be whole numbers of tokens, got {raw.tolist()} (a fractional or "
                             f"non-finite length would be truncated); pass integers")
    t = raw.to(torch.long)
    if t.numel() != batch:
        raise ValueError(f"lengths must have one entry per batch element ({batch}), got {t.numel()}")
    if bool((t < 0).any()) or bool((t > n).any()):
        raise ValueError(f"lengths must lie in [0, {n}] (the number of new tokens), got {t.tolist()}")
    return t


def _on_device(t: torch.Tensor):
    """``get(device)``: ``t`` on ``device``, copied once per device (engines may evaluate a pattern's predicate on
    the CPU to plan tiles and on the accelerator to mask them)."""
    copies = {t.device: t}

    def get(device: torch.device) -> torch.Tensor:
        if device not in copies:
            copies[device] = t.to(device)
        return copies[device]

    return get


def _at_positions(pattern: P.Pattern | None, causal_default: bool, start: torch.Tensor,
                  valid_end: torch.Tensor, kv_len: int) -> P.Pattern:
    """The layer's pattern for new queries at absolute positions ``start[b] + i`` over cached keys
    ``0 .. valid_end[b] - 1`` (a batch of different lengths). Patterns are position-based with
    bottom-right alignment, so evaluating them with ``q_len = kv_len`` and ``q_idx = position`` is exact."""

    start_on, end_on = _on_device(start), _on_device(valid_end)

    def fn(b, h, qi, ki):
        pos = start_on(ki.device)[b] + qi
        ok = ki < end_on(ki.device)[b]
        if pattern is not None:
            ok = ok & pattern.allowed(b, h, pos, ki, kv_len, kv_len)
        elif causal_default:
            ok = ok & (ki <= pos)
        return ok

    head = pattern.head_dependent if pattern is not None else False
    return P.custom(fn, batch_dependent=True, head_dependent=head)


class KVCache:
    """A growing key/value cache ``k, v [batch, kv_heads, capacity, dim]`` for autoregressive decoding.

    Args:
        capacity: initial number of positions preallocated (grows by doubling when exceeded).

    Buffers are allocated on the first ``append``/``attend`` with the batch, heads, dtype and device of the keys.
    ``lengths [batch]`` counts the tokens held per batch element: prompts of different lengths are passed
    right-padded with ``lengths=`` and each element then appends at its own end (padding is overwritten).
    """

    def __init__(self, capacity: int = 256):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """The longest sequence held (0 when empty)."""
        return 0 if self.lengths is None else int(self.lengths.max())

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the key and value buffers."""
        return kv_nbytes(self.k, self.v)

    def reset(self) -> None:
        self.k = self.v = self.lengths = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``k, v [batch, kv_heads, seq_len, dim]`` (positions beyond ``lengths[b]`` are padding)."""
        if self.k is None:
            raise ValueError("the cache is empty; call attend()/append() first")
        n = self.seq_len
        return self.k[:, :, :n], self.v[:, :, :n]

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        """Absolute positions ``[batch, n]`` of the next ``n`` tokens (``[1, n]`` while the cache is empty)."""
        start = torch.zeros(1, dtype=torch.long) if self.lengths is None else self.lengths
        return start.view(-1, 1) + torch.arange(n, device=start.device)

    def _allocate(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        b, hkv, _, d = k.shape
        if self.k is None:
            cap = max(self.capacity, needed)
            self.k = k.new_zeros(b, hkv, cap, d)
            self.v = v.new_zeros(b, hkv, cap, v.shape[-1])
            self.lengths = torch.zeros(b, dtype=torch.long, device=k.device)
            return
        _check_matches(type(self).__name__, k, v, self.k, self.v)
        cap = self.k.shape[2]
        if needed > cap:
            new_cap = max(needed, 2 * cap)
            for name in ("k", "v"):
                old = getattr(self, name)
                buf = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
                buf[:, :, :cap] = old
                setattr(self, name, buf)

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> torch.Tensor:
        """Write ``k, v [batch, kv_heads, n, dim]`` after each element's last token; ``lengths`` (``[batch]``)
        says how many of the ``n`` are real (right padding). Returns the start positions ``[batch]``."""
        n = k.shape[2]
        valid = _as_lengths(lengths, k.shape[0], n, k.device)
        start = torch.zeros(k.shape[0], dtype=torch.long, device=k.device) if self.lengths is None \
            else self.lengths.clone()
        self._allocate(k, v, int(start.max()) + n)
        if bool((start == start[0]).all()):
            s = int(start[0])
            self.k[:, :, s:s + n] = k
            self.v[:, :, s:s + n] = v
        else:  # every element writes at its own end
            idx = (start.view(-1, 1, 1, 1) + torch.arange(n, device=k.device).view(1, 1, -1, 1))
            self.k.scatter_(2, idx.expand(-1, k.shape[1], -1, k.shape[3]), k)
            self.v.scatter_(2, idx.expand(-1, v.shape[1], -1, v.shape[3]), v)
        self.lengths = start + valid
        return start

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: P.Pattern | None = None,
               causal: bool = True, score_mod=None, normalization="softmax", scale: float | None = None,
               lengths=None) -> torch.Tensor:
        """Append ``k, v`` and attend ``q [batch, heads, n, dim]`` (the new tokens) to the whole cache.

        ``pattern`` is the layer's pattern (``None``: ``causal`` decides between causal and full); query ``i``
        of element ``b`` sits at position ``lengths_before[b] + i``. Returns ``[batch, heads, n, dim_v]``.
        """
        _check_new(q, k, v)
        n = q.shape[2]
        start = self.append(k, v, lengths)
        uniform = bool((start == start[0]).all()) and bool((self.lengths == self.lengths[0]).all())
        if uniform and int(self.lengths[0]) == int(start[0]) + n:
            kk, vv = self.get()
            # bottom-right alignment: the n queries are the last n of seq_len positions
            pat = pattern if pattern is not None else (P.causal() if causal else None)
            if n == 1 and isinstance(pat, P._Band) and pat.lo == -math.inf and pat.hi >= 0:
                pat = None  # one query at the last position sees every key: sdpa's fast path
            return attention(q, kk, vv, pattern=pat, score_mod=score_mod, normalization=normalization, scale=scale)
        if score_mod is not None:
            raise ValueError("score_mod with a batch of different lengths is not supported (score modifiers see "
                             "bottom-right aligned positions); pad the prompts to one length")
        kv_len = int((start + n).max())
        kk, vv = self.k[:, :, :kv_len], self.v[:, :, :kv_len]
        pat = _at_positions(pattern, causal, start, self.lengths, kv_len)
        return attention(q, kk, vv, pattern=pat, normalization=normalization, scale=scale)


def _lookback(pattern: P.Pattern | None) -> float:
    """How far back (in positions) a pattern may look: finite for bands and their intersections."""
    if isinstance(pattern, P._Band):
        return -pattern.lo
    if isinstance(pattern, P._And) and not isinstance(pattern, P._Or):
        return min(_lookback(pattern.a), _lookback(pattern.b))
    return math.inf


class SlidingWindowCache:
    """Keeps the keys/values of the last ``window`` tokens only: memory ``O(window)`` however long the
    generation ("Longformer"/Mistral-style local decoders). Exact for layer patterns that never look back more
    than ``window`` positions, e.g. ``causal() & sliding_window(window, 0)`` or ``sliding_window(window - 1, 0)``;
    other patterns raise ``ValueError``. Batch elements share one length (no ``lengths=``)."""

    def __init__(self, window: int):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.seen = 0  # tokens processed so far (the absolute position of the next one)

    @property
    def nbytes(self) -> int:
        return kv_nbytes(self.k, self.v)

    @property
    def seq_len(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reset(self) -> None:
        self.k = self.v = None
        self.seen = 0

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        return (self.seen + torch.arange(n)).view(1, -1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: P.Pattern | None = None,
               causal: bool = True, score_mod=None, normalization="softmax", scale: float | None = None,
               lengths=None) -> torch.Tensor:
        """Attend the new queries to the kept window plus the new tokens, then keep the last ``window``."""
        _check_new(q, k, v)
        if lengths is not None:
            raise ValueError("SlidingWindowCache holds one length for the whole batch; use KVCache for lengths=")
        if _lookback(pattern) > self.window:
            raise ValueError(
                f"SlidingWindowCache(window={self.window}) is exact only for patterns looking back at most "
                f"{self.window} positions (e.g. causal() & sliding_window({self.window}, 0)); the layer has "
                f"pattern={pattern!r}. Use KVCache, or a layer built with such a pattern"
            )
        _check_matches("SlidingWindowCache", k, v, self.k, self.v)
        kk = k if self.k is None else torch.cat([self.k, k], dim=2)
        vv = v if self.v is None else torch.cat([self.v, v], dim=2)
        out = attention(q, kk, vv, pattern=pattern, score_mod=score_mod, normalization=normalization, scale=scale)
        # keep copies (not views of the concatenation) so the old buffers are freed
        self.k, self.v = kk[:, :, -self.window:].clone(), vv[:, :, -self.window:].clone()
        self.seen += k.shape[2]
        return out


# ----------------------------------------------------------------------------------------------------------------
# FastGen: adaptive KV cache compression
# ----------------------------------------------------------------------------------------------------------------

POLICIES = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")
_COMPONENTS = ("special", "punct", "frequent", "local", "full")


def _as_position_mask(x, batch: int, n: int, device, name: str) -> torch.Tensor:
    """A bool mask ``[batch, n]`` from None (empty), a bool mask ``[n]``/``[batch, n]`` or index lists."""
    if x is None:
        return torch.zeros(batch, n, dtype=torch.bool, device=device)
    t = torch.as_tensor(x, device=device)
    if t.dtype == torch.bool:
        if t.shape[-1] != n or t.dim() not in (1, 2):
            raise ValueError(f"{name} as a mask must be [n] or [batch, n] with n={n}, got {tuple(t.shape)}")
        return t.expand(batch, n).clone() if t.dim() == 1 else t.expand(batch, n).clone()
    t = t.long().reshape(-1)
    if bool((t < 0).any()) or bool((t >= n).any()):
        raise ValueError(f"{name} indices must lie in [0, {n}), got {t.tolist()}")
    m = torch.zeros(n, dtype=torch.bool, device=device)
    m[t] = True
    return m.expand(batch, n).clone()


def policy_keep_mask(policy: str, attn: torch.Tensor, *, special: torch.Tensor, punct: torch.Tensor,
                     local_ratio: float, frequent_ratio: float, per_query: bool) -> torch.Tensor:
    """The keys a FastGen policy keeps.

    Args:
        policy: components joined by ``+`` from ``special punct frequent local full``.
        attn: the prompt's causal attention ``[batch, heads, n, n]`` (averaged over the query heads of a kv head).
        special, punct: ``[batch, n]`` bool masks of special-token and punctuation positions.
        local_ratio, frequent_ratio: the local window and the number of heavy hitters as fractions of ``n``.
        per_query: ``True``: the mask ``[batch, heads, n, n]`` as seen by every prompt query (the local window
            slides with the query: used to profile); ``False``: the kept set ``[batch, heads, n]`` at the end of
            the prompt (what the compressed cache stores).
    """
    parts = policy.split("+")
    bad = [p for p in parts if p not in _COMPONENTS]
    if bad:
        raise ValueError(f"unknown policy component(s) {bad} in {policy!r}; use {'+'.join(_COMPONENTS[:-1])} or "
                         f"'full' joined by '+'")
    b, h, n, _ = attn.shape
    dev = attn.device
    keep = torch.zeros(b, h, n, dtype=torch.bool, device=dev)
    if "full" in parts:
        keep[:] = True
    if "special" in parts:
        keep |= special[:, None, :]
    if "punct" in parts:
        keep |= punct[:, None, :]
    if "frequent" in parts:
        count = max(1, math.ceil(frequent_ratio * n))
        score = attn.sum(dim=2)  # accumulated attention received by each key
        top = score.topk(min(count, n), dim=-1).indices
        keep.scatter_(-1, top, True)
    if not per_query:
        if "local" in parts:
            keep[..., n - max(1, math.ceil(local_ratio * n)):] = True
        return keep
    qi = torch.arange(n, device=dev).view(-1, 1)
    ki = torch.arange(n, device=dev).view(1, -1)
    mask = keep[:, :, None, :] & (ki <= qi)
    if "local" in parts:
        r = max(1, math.ceil(local_ratio * n))
        mask = mask | ((ki <= qi) & (ki > qi - r))
    return mask


def choose_policies(attn: torch.Tensor, *, threshold: float = 0.95, policies: Sequence[str] = POLICIES,
                    special=None, punct=None, local_ratio: float = 0.3,
                    frequent_ratio: float = 0.3) -> tuple[list[list[str]], torch.Tensor, torch.Tensor]:
    """FastGen's profiling: per (batch, head) the first policy in ``policies`` (ordered cheapest first) whose
    recovery ratio reaches ``threshold``; the last policy is the fallback.

    The recovery ratio of a policy is the attention mass its kept keys receive, averaged over the prompt's
    queries: ``mean_i sum_{j kept for i} A_ij`` (1 for ``full``).

    Args:
        attn: the prompt's causal attention ``[batch, heads, n, n]`` (rows sum to 1).
        threshold: the recovery ratio ``T`` to reach, in ``[0, 1]``.
        special, punct: positions of special tokens and punctuation (index lists or bool masks ``[n]`` /
            ``[batch, n]``); ``special`` defaults to position 0 (the start token).

    Returns:
        ``(names [batch][heads], keep [batch, heads, n] bool: the kept set at the end of the prompt,
        recovery [batch, heads] of the chosen policies)``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be a square attention map [batch, heads, n, n], got {tuple(attn.shape)}")
    if not policies:
        raise ValueError("policies must name at least one policy, e.g. attnkit.cache.POLICIES")
    for name, r in (("local_ratio", local_ratio), ("frequent_ratio", frequent_ratio)):
        if not 0.0 < r <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {r}")
    b, h, n, _ = attn.shape
    special = _as_position_mask([0] if special is None else special, b, n, attn.device, "special")
    punct = _as_position_mask(punct, b, n, attn.device, "punct")
    attn = attn.detach().float()
    chosen = torch.full((b, h), len(policies) - 1, dtype=torch.long, device=attn.device)
    recovery = torch.ones(b, h, device=attn.device)
    done = torch.zeros(b, h, dtype=torch.bool, device=attn.device)
    keeps = []
    for i, pol in enumerate(policies):
        kw = dict(special=special, punct=punct, local_ratio=local_ratio, frequent_ratio=frequent_ratio)
        mask = policy_keep_mask(pol, attn, per_query=True, **kw)
        rec = (attn * mask).sum(-1).mean(-1)  # [b, h]
        take = ~done & ((rec >= threshold - 1e-6) | (i == len(policies) - 1))
        chosen[take], recovery[take] = i, rec[take]
        done |= take
        keeps.append(policy_keep_mask(pol, attn, per_query=False, **kw))
    keep = torch.stack(keeps).gather(0, chosen[None, :, :, None].expand(1, b, h, n))[0]
    names = [[policies[int(chosen[bi, hi])] for hi in range(h)] for bi in range(b)]
    return names, keep, recovery


def pack_kept(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """The entries ``keep [batch, kv_heads, n]`` selects, packed per (batch, kv head) to the longest kept set:
    ``(k, v [batch, kv_heads, stored, dim], valid [batch, kv_heads, stored], order)``, kept positions first in
    position order (``order`` indexes the original positions). Entries past a head's kept count (``valid``
    False) are padding: copies of dropped entries that a cache must mask (never attend to)."""
    order = kept_order(keep)
    return (gather_seq(k, order), gather_seq(v, order), keep.gather(2, order), order)


def kept_order(keep: torch.Tensor) -> torch.Tensor:
    """Indices ``[batch, kv_heads, stored]`` (``stored`` = the longest kept set) of the kept entries of ``keep
    [batch, kv_heads, n]`` in position order, followed by dropped ones as padding."""
    n = keep.shape[2]
    stored = int(keep.sum(-1).max()) if keep.numel() else 0
    # stable order: the sort key puts dropped positions last
    key = (~keep).to(torch.long) * n + torch.arange(n, device=keep.device)
    return torch.argsort(key, dim=-1)[..., :stored]


def gather_seq(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``t [b, h, n]`` or ``[b, h, n, d]`` gathered at ``order [b, h, m]`` along the sequence axis."""
    if t.dim() == 3:
        return t.gather(2, order)
    return t.gather(2, order[..., None].expand(-1, -1, -1, t.shape[-1]))


def kv_nbytes(k: torch.Tensor | None, v: torch.Tensor | None) -> int:
    """Bytes allocated by key and value buffers ``k [..., dk]``, ``v [..., dv]`` (0 when ``k`` is None)."""
    if k is None:
        return 0
    return k.numel() * k.element_size() + v.numel() * v.element_size()


def kv_entry_bytes(k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes of one (key, value) entry of ``k [..., dk]``, ``v [..., dv]``."""
    return k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()


class PackedKVStore:
    """The bookkeeping shared by caches that store entries packed per (batch, kv head) (see :func:`pack_kept`):
    ``k, v [batch, kv_heads, stored, dim]``, ``valid [batch, kv_heads, stored]``, ``pos`` (the absolute position of
    each stored entry, same shape) and ``seen`` (tokens processed so far); all None / 0 before the first ``attend``.
    """

    k: torch.Tensor | None
    v: torch.Tensor | None
    valid: torch.Tensor | None
    pos: torch.Tensor | None
    seen: int

    @property
    def held(self) -> torch.Tensor | None:
        """Entries held now per (batch, kv head) ``[batch, kv_heads]`` (None before the prompt)."""
        return None if self.valid is None else self.valid.sum(-1)

    @property
    def held_bytes(self) -> int:
        """Bytes of the held keys and values (what a paged store would hold; ``nbytes`` adds the padding)."""
        if self.k is None:
            return 0
        return int(self.valid.sum()) * kv_entry_bytes(self.k, self.v)

    @property
    def nbytes(self) -> int:
        return kv_nbytes(self.k, self.v)

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        return (self.seen + torch.arange(n)).view(1, -1)

    def held_positions(self) -> torch.Tensor:
        """``[batch, kv_heads, seen]`` bool: the absolute positions each head holds now."""
        if self.pos is None:
            raise ValueError("the cache is empty; call attend() first")
        b, h, _ = self.pos.shape
        out = torch.zeros(b, h, self.seen + 1, dtype=torch.bool, device=self.pos.device)
        idx = torch.where(self.valid, self.pos, torch.full_like(self.pos, self.seen))
        return out.scatter_(2, idx, True)[..., :self.seen]


def _parts(policy: str) -> frozenset[str]:
    return frozenset(policy.split("+"))


class AdaptiveKVCache(PackedKVStore):
    """FastGen adaptive KV cache (Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for
    LLMs", ICLR 2024, Sec. 3 and Algorithm 1).

    Prompt encoding: the first ``attend`` (the prompt, uniform length) is exact; its attention map, averaged over
    the query heads of each kv head, picks each (batch, kv head)'s policy ``C`` with :func:`choose_policies`, and
    only what ``C`` keeps is stored. Token generation (Algorithm 1, generation phase): each new token attends to the
    head's compressed cache plus itself, is appended, and the head's policy compresses the cache again
    ``K_C, V_C = f(K, V, C)``:

    * ``special`` / ``punct``: only special-token / punctuation positions stay (generated tokens are marked with
      :meth:`mark_next`; unmarked ones are neither);
    * ``local``: the last ``ceil(local_ratio * L)`` positions stay (``L`` = tokens so far);
    * ``frequent``: the ``ceil(frequent_ratio * L)`` held keys with the largest accumulated attention (the
      prompt's attention summed over its queries, plus the attention every generated query gives them; averaged
      over the query heads of the kv head), as a heavy-hitter set;
    * a hybrid keeps the union of its components; ``full`` keeps everything.

    An evicted entry never returns. Entries are packed per (batch, kv head) to the longest held set, with a
    validity mask (padding is never attended).

    Attributes after the prompt: ``policies [batch][kv_heads]`` names, ``recovery [batch, kv_heads]``,
    ``kept_fraction`` (kept prompt entries / prompt entries), ``kept [batch, kv_heads]`` prompt counts; at any
    time ``held [batch, kv_heads]`` (entries held now), ``held_bytes`` (their keys and values),
    :meth:`held_positions` (which absolute positions each head holds).
    """

    def __init__(self, *, threshold: float = 0.95, policies: Sequence[str] = POLICIES, special=None, punct=None,
                 local_ratio: float = 0.3, frequent_ratio: float = 0.3):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        for name, r in (("local_ratio", local_ratio), ("frequent_ratio", frequent_ratio)):
            if not 0.0 < r <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {r}")
        for pol in policies:
            policy_keep_mask(pol, torch.zeros(1, 1, 1, 1), special=torch.zeros(1, 1, dtype=torch.bool),
                             punct=torch.zeros(1, 1, dtype=torch.bool), local_ratio=1.0, frequent_ratio=1.0,
                             per_query=False)  # validates the names
        self.threshold, self.policy_order = threshold, tuple(policies)
        self.special, self.punct = special, punct
        self.local_ratio, self.frequent_ratio = local_ratio, frequent_ratio
        self.reset()

    def reset(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # [batch, kv_heads, stored]
        self.pos: torch.Tensor | None = None  # absolute position of each stored entry [batch, kv_heads, stored]
        self.score: torch.Tensor | None = None  # accumulated attention of each stored entry (float64)
        self.is_special: torch.Tensor | None = None  # [batch, seen] bool
        self.is_punct: torch.Tensor | None = None
        self._marks: tuple | None = None
        self.seen = 0
        self.prompt_len = 0
        self.policies: list[list[str]] = []
        self.recovery: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None

    @property
    def kept_fraction(self) -> float:
        """Kept prompt entries over prompt entries (1.0 before the prompt)."""
        if self.kept is None:
            return 1.0
        return float(self.kept.sum()) / (self.kept.numel() * self.prompt_len)

    def mark_next(self, special=False, punct=False) -> None:
        """Say which of the next ``attend``'s tokens are special tokens / punctuation (a bool, or one bool per new
        token, or ``[batch, n]``); FastGen's special and punctuation heads keep exactly those. Applies to the next
        call only (unmarked generated tokens are neither)."""
        self._marks = (special, punct)

    def _new_marks(self, b: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        marks, self._marks = self._marks, None
        out = []
        for i, name in enumerate(("special", "punct")):
            x = False if marks is None else marks[i]
            t = torch.as_tensor(x, dtype=torch.bool, device=device)
            if t.dim() == 1:
                t = t.view(1, -1)
            if t.dim() > 2 or (t.dim() == 2 and (t.shape[-1] != n or t.shape[0] not in (1, b))):
                raise ValueError(f"mark_next({name}=...) must be a bool, {n} bools or [batch={b}, {n}] bools for "
                                 f"the {n} new tokens, got shape {tuple(t.shape)}")
            t = t.expand(b, n)
            out.append(t.clone())
        return out[0], out[1]

    def _compress(self, q, k, v, pattern, scale) -> None:
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        pat = pattern if pattern is not None else P.causal()
        w = attention_weights(q, k, pattern=pat, score_mod=None, normalization=resolve("softmax"),
                              scale=default_scale(q, scale))
        w = w.view(b, hkv, h // hkv, n, n).mean(2)  # one profile per kv head
        special = _as_position_mask([0] if self.special is None else self.special, b, n, q.device, "special")
        punct = _as_position_mask(self.punct, b, n, q.device, "punct")
        marked_s, marked_p = self._new_marks(b, n, q.device)
        self.is_special, self.is_punct = special | marked_s, punct | marked_p
        self.policies, keep, self.recovery = choose_policies(
            w, threshold=self.threshold, policies=self.policy_order, special=self.is_special, punct=self.is_punct,
            local_ratio=self.local_ratio, frequent_ratio=self.frequent_ratio)
        self.kept = keep.sum(-1)
        pos = torch.arange(n, device=q.device).expand(b, hkv, n)
        score = w.detach().double().sum(2)  # accumulated attention received by each key over the prompt
        order = kept_order(keep)
        self.k, self.v, self.valid = gather_seq(k, order), gather_seq(v, order), keep.gather(2, order)
        self.pos, self.score = gather_seq(pos, order), gather_seq(score, order)
        self.prompt_len = n
        # per (batch, kv head) components of the chosen policy, as masks [b, hkv] for the generation phase
        parts = [[_parts(name) for name in row] for row in self.policies]
        self._has = {c: torch.tensor([[c in p or "full" in p for p in row] for row in parts], device=q.device)
                     for c in _COMPONENTS}

    def _step(self, q, k, v, special, punct, scale) -> torch.Tensor:
        """One generated token: attend to the held entries plus itself, accumulate the attention each key
        receives, append, then apply each head's policy (FastGen Algorithm 1, generation phase)."""
        b, h, _, _ = q.shape
        hkv = k.shape[1]
        p = self.seen
        kk, vv = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        valid = torch.cat([self.valid, self.valid.new_ones(b, hkv, 1)], 2)
        pos = torch.cat([self.pos, self.pos.new_full((b, hkv, 1), p)], 2)
        score = torch.cat([self.score, self.score.new_zeros(b, hkv, 1)], 2)
        get, g = _on_device(valid), h // hkv

        def fn(bi, hi, qi, ki):
            return get(ki.device)[bi, hi // g, ki]

        pat = P.custom(fn)
        out = attention(q, kk, vv, pattern=pat, scale=scale)
        w = attention_weights(q, kk, pattern=pat, score_mod=None, normalization=resolve("softmax"),
                              scale=default_scale(q, scale))  # [b, h, 1, m]
        score = score + w.detach().double().view(b, hkv, g, -1).mean(2)
        self.is_special = torch.cat([self.is_special, special], 1)
        self.is_punct = torch.cat([self.is_punct, punct], 1)
        self.seen = length = p + 1
        has = self._has
        safe = pos.clamp(min=0)
        keep = valid & has["full"][..., None]
        keep |= valid & has["special"][..., None] & self.is_special[:, None, :].expand(-1, hkv, -1).gather(2, safe)
        keep |= valid & has["punct"][..., None] & self.is_punct[:, None, :].expand(-1, hkv, -1).gather(2, safe)
        window = max(1, math.ceil(self.local_ratio * length))
        keep |= valid & has["local"][..., None] & (pos > p - window)
        count = min(max(1, math.ceil(self.frequent_ratio * length)), kk.shape[2])
        top = score.masked_fill(~valid, -math.inf).topk(count, dim=-1).indices
        heavy = torch.zeros_like(valid).scatter_(2, top, True)
        keep |= valid & has["frequent"][..., None] & heavy
        order = kept_order(keep)
        self.k, self.v, self.valid = gather_seq(kk, order), gather_seq(vv, order), keep.gather(2, order)
        self.pos, self.score = gather_seq(pos, order), gather_seq(score, order)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: P.Pattern | None = None,
               causal: bool = True, score_mod=None, normalization="softmax", scale: float | None = None,
               lengths=None) -> torch.Tensor:
        _check_new(q, k, v)
        if lengths is not None:
            raise ValueError("AdaptiveKVCache holds one length for the whole batch; use KVCache for lengths=")
        if resolve(normalization).name != "softmax" or score_mod is not None:
            raise ValueError("AdaptiveKVCache profiles softmax attention: use normalization='softmax' and no "
                             "score_mod")
        if pattern is not None and _lookback(pattern) != math.inf:
            raise ValueError("AdaptiveKVCache compresses a full causal cache; for a windowed layer use "
                             "SlidingWindowCache")
        n = q.shape[2]
        if self.k is None:
            out = attention(q, k, v, pattern=pattern if pattern is not None else P.causal() if causal else None,
                            scale=scale)
            self._compress(q, k, v, pattern, scale)
            self.seen = n
            return out
        _check_matches("AdaptiveKVCache", k, v, self.k, self.v)
        special, punct = self._new_marks(q.shape[0], n, q.device)
        outs = [self._step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], special[:, i:i + 1],
                           punct[:, i:i + 1], scale) for i in range(n)]
        return torch.cat(outs, 2)


class RecurrentStateCache:
    """The decoding state of causal linear attention: ``S [batch, heads, m, d_v]`` and ``z [batch, heads, m]``
    (a :class:`attnkit.ops.linear.state.LinearAttentionState`), constant in the sequence length. Used by
    :class:`attnkit.nn.LinearMultiheadAttention` as ``forward(x, cache=RecurrentStateCache())``."""

    def __init__(self):
        self.state: LinearAttentionState | None = None

    @property
    def seen(self) -> int:
        return 0 if self.state is None else self.state.offset

    @property
    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes

    def reset(self) -> None:
        self.state = None

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        return (self.seen + torch.arange(n)).view(1, -1)
