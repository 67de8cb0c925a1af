"""Decoding caches that apply the KV selection policies of :mod:`attnkit.ops.longctx.selection` (same protocol as
:mod:`attnkit.cache`: ``positions``, ``attend``, ``nbytes``, plus ``held_bytes``):

- :class:`SelectiveKVCache` -- a policy applied to the prompt and (``interval=``) to each block of generated tokens:
  ZipVL (mixed precision, sparse prefill), ActQKV's probe query, any ``policy(profile, q, k) -> keep``;
- :class:`TokenTypeKVCache` -- NAtS's token-type eviction, prefill and decoding;
- :class:`ActQKVCache` -- ActQKV's per-step retrieval with the dynamic cut-off of a shared
  :class:`~attnkit.ops.longctx.selection.CutoffAllocator`;
- :class:`AdaptiveVLCache` -- A-VL's core/secondary/minor vision caches and its text eviction, prefill and decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnkit import patterns as P
from attnkit._checks import default_scale
from attnkit.cache import PackedKVStore, _check_new, _on_device, gather_seq, kept_order, kv_entry_bytes, kv_nbytes
from attnkit.functional.exact import attention
from attnkit.normalizations import resolve
from attnkit.ops.exact.reference import attention_weights
from attnkit.ops.longctx.selection import (
    GLOBAL,
    SLIDING,
    CutoffAllocator,
    _avl_top,
    avl_text_keep,
    avl_text_scores,
    avl_vision_tiers,
    dequantize,
    normalized_entropy,
    quantize,
    token_type_rule,
)

__all__ = ["SelectiveKVCache", "TokenTypeKVCache", "ActQKVCache", "AdaptiveVLCache"]


# -- the cache ---------------------------------------------------------------------------------------------------
class SelectiveKVCache:
    """A decoding cache that keeps, per (batch, kv head), what ``policy`` selects, for the prompt and (with
    ``interval``) for the generated tokens too.

    Args:
        policy: ``policy(profile, q, k) -> keep [batch, kv_heads, m]`` where ``profile [batch, kv_heads, rows, m]``
            is the softmax attention that the last ``rows <= probe`` queries give the ``m`` candidate tokens
            (averaged over each kv head's query heads), ``q`` those queries and ``k`` the candidates' keys. E.g.
            ``lambda p, q, k: cumulative_mass(p, 0.9)`` (ZipVL).
        probe: queries whose attention forms the profile.
        low_bits: None drops what the policy does not keep; an int stores it quantised to that many bits instead
            (ZipVL's mixed precision, Sec. 3.3): each entry is held once, at full precision or as codes.
        window: keep the last ``window`` tokens of every selected block (the prompt, each generated block) at full
            precision whatever the policy says (0: none).
        interval: None keeps every generated token at full precision; an int ``m`` selects each block of ``m``
            generated tokens once it is complete, with the same policy, from the attention of the last ``probe``
            queries (decode-time selection; until then the block's tokens are held at full precision).
        sparse_prefill: ZipVL's sparse prefill: the prompt's queries attend only to the selected (important) keys,
            and each to itself, causally, instead of to every key. The selection comes first, from the last
            ``probe`` queries (ZipVL's probe approximation). Our reading of "attention solely on those important
            tokens": every query still gets an output; only the keys are restricted.

    The prompt (first ``attend``) is exact unless ``sparse_prefill``. Every later output equals dense attention
    over the tokens held, each at the precision held (:meth:`held_precision`). ``kept_fraction``: prompt entries
    kept at full precision;
    ``nbytes``: the bytes held (full-precision entries, plus codes and per-token scales/zeros of the low-bit ones;
    each buffer packed to its longest head).
    """

    def __init__(self, policy: Callable[..., torch.Tensor], *, probe: int = 16, low_bits: int | None = None,
                 window: int = 0, interval: int | None = None, sparse_prefill: bool = False):
        if probe < 1:
            raise ValueError(f"probe must be >= 1, got {probe}")
        if low_bits is not None and not 1 <= low_bits <= 8:
            raise ValueError(f"low_bits must be None or lie in [1, 8], got {low_bits}")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"interval must be None or an int >= 1, got {interval!r}")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.policy, self.probe, self.low_bits, self.window = policy, probe, low_bits, window
        self.interval, self.sparse_prefill = interval, bool(sparse_prefill)
        self.reset()

    def reset(self) -> None:
        self.hi: dict[str, torch.Tensor] | None = None  # full precision: k, v, valid, pos
        self.lo: dict[str, torch.Tensor] | None = None  # low bit: codes/scale/zero of k and v, valid, pos
        self.new: dict[str, torch.Tensor] | None = None  # generated tokens not selected yet: k, v, pos
        self.queries: torch.Tensor | None = None  # the last `probe` queries [batch, heads, <= probe, dim]
        self.seen = self.prompt_len = 0
        self.kept: torch.Tensor | None = None

    @property
    def k(self) -> torch.Tensor | None:
        """The full-precision keys held (prompt and selected blocks), packed ``[batch, kv_heads, m, dim]``."""
        return None if self.hi is None else self.hi["k"]

    @property
    def kept_fraction(self) -> float:
        if self.kept is None:
            return 1.0
        return float(self.kept.sum()) / (self.kept.numel() * max(self.prompt_len, 1))

    @property
    def nbytes(self) -> int:
        if self.hi is None:
            return 0
        parts = [self.hi["k"], self.hi["v"], self.new["k"], self.new["v"]]
        if self.lo is not None:  # codes (one uint8 per element: not bit-packed) and per-token scales/zeros
            parts += [self.lo[name] for name in ("ck", "sk", "zk", "cv", "sv", "zv")]
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def held_bytes(self) -> int:
        """Bytes of the entries held (``nbytes`` without the padding of heads that hold fewer)."""
        if self.hi is None:
            return 0
        k, v = self.hi["k"], self.hi["v"]
        full = k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()
        total = (int(self.hi["valid"].sum()) + self.new["pos"].numel()) * full
        if self.lo is not None:
            lo = self.lo
            per = sum(lo[name].shape[-1] * lo[name].element_size() for name in ("ck", "sk", "zk", "cv", "sv", "zv"))
            total += int(lo["valid"].sum()) * per
        return total

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        return (self.seen + torch.arange(n)).view(1, -1)

    def held_precision(self) -> torch.Tensor:
        """``[batch, kv_heads, seen]`` int8: 2 where a position is held at full precision, 1 at ``low_bits``, 0
        where it was dropped."""
        if self.hi is None:
            raise ValueError("the cache is empty; call attend() first")
        b, hkv = self.hi["pos"].shape[:2]
        out = torch.zeros(b, hkv, self.seen + 1, dtype=torch.int8, device=self.hi["pos"].device)
        for store, level in ((self.lo, 1), (self.hi, 2)):
            if store is not None:
                idx = torch.where(store["valid"], store["pos"], torch.full_like(store["pos"], self.seen))
                out.scatter_(2, idx, level)
        out[..., self.new["pos"][0, 0]] = 2
        return out[..., :self.seen]

    # -- storage -------------------------------------------------------------------------------------------------
    @staticmethod
    def _append(store: dict | None, block: dict) -> dict:
        """``store`` with ``block`` appended, repacked so that no head holds padding beyond its longest set."""
        if store is not None:
            block = {name: torch.cat([store[name], t], 2) for name, t in block.items()}
        order = kept_order(block["valid"])
        return {name: gather_seq(t, order) for name, t in block.items()}

    def _store(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> None:
        """Hold ``keep`` at full precision and the rest at ``low_bits`` (or drop it)."""
        order = kept_order(keep)
        block = {"k": gather_seq(k, order), "v": gather_seq(v, order), "valid": keep.gather(2, order),
                 "pos": pos.gather(2, order)}
        self.hi = self._append(self.hi, block)
        if self.low_bits is None:
            return
        order = kept_order(~keep)  # only the entries not kept are quantised: each entry is held once
        ck, sk, zk = quantize(gather_seq(k, order), self.low_bits)
        cv, sv, zv = quantize(gather_seq(v, order), self.low_bits)
        block = {"ck": ck, "sk": sk, "zk": zk, "cv": cv, "sv": sv, "zv": zv, "valid": (~keep).gather(2, order),
                 "pos": pos.gather(2, order)}
        self.lo = self._append(self.lo, block)

    def _held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values, validity and positions of everything held: full precision, dequantised, unselected."""
        ks, vs = [self.hi["k"]], [self.hi["v"]]
        valid, pos = [self.hi["valid"]], [self.hi["pos"]]
        if self.lo is not None:
            lo = self.lo
            ks.append(dequantize(lo["ck"], lo["sk"], lo["zk"]).to(self.hi["k"].dtype))
            vs.append(dequantize(lo["cv"], lo["sv"], lo["zv"]).to(self.hi["v"].dtype))
            valid.append(lo["valid"])
            pos.append(lo["pos"])
        ks.append(self.new["k"])
        vs.append(self.new["v"])
        valid.append(torch.ones_like(self.new["pos"], dtype=torch.bool))
        pos.append(self.new["pos"])
        return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(valid, 2), torch.cat(pos, 2)

    def _keep(self, profile: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b, hkv, _, m = profile.shape
        keep = self.policy(profile, q, k).to(torch.bool)
        if keep.shape != (b, hkv, m):
            raise ValueError(f"policy returned a keep mask of shape {tuple(keep.shape)}, expected {(b, hkv, m)}")
        if self.window:
            keep[..., max(0, m - self.window):] = True
        return keep

    def _select_prompt(self, q, k, v, pattern, scale) -> None:
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        pat = pattern if pattern is not None else P.causal()
        rows = min(self.probe, n)
        w = attention_weights(q[:, :, n - rows:], k, pattern=pat, score_mod=None,
                              normalization=resolve("softmax"), scale=default_scale(q, scale))
        keep = self._keep(w.view(b, hkv, h // hkv, rows, n).mean(2), q, k)
        self.kept = keep.sum(-1)
        self.prompt_len = n
        pos = torch.arange(n, device=k.device).expand(b, hkv, n)
        self._store(k, v, pos, keep)
        return keep

    def _select_block(self, scale) -> None:
        """Decode-time selection of the generated block: its profile is the attention that the last ``probe``
        queries give it among everything held (each query sees what was held causally before it)."""
        m = self.interval
        q = self.queries
        b, h, rows, _ = q.shape
        hkv = self.hi["k"].shape[1]
        kk, _, valid, pos = self._held()
        qpos = torch.arange(self.seen - rows, self.seen, device=q.device)
        ok = valid[:, :, None, :] & (pos[:, :, None, :] <= qpos.view(1, 1, -1, 1))  # [b, hkv, rows, all]
        g = h // hkv
        get = _on_device(ok)
        w = attention_weights(q, kk, pattern=P.custom(lambda bi, hi, qi, ki: get(ki.device)[bi, hi // g, qi, ki]),
                              score_mod=None, normalization=resolve("softmax"), scale=default_scale(q, scale))
        block = slice(kk.shape[2] - self.new["k"].shape[2], kk.shape[2] - self.new["k"].shape[2] + m)
        profile = w.view(b, hkv, g, rows, -1).mean(2)[..., block]
        new = self.new
        keep = self._keep(profile, q, new["k"][:, :, :m])
        self._store(new["k"][:, :, :m], new["v"][:, :, :m], new["pos"][..., :m], keep)
        self.new = {name: t[:, :, m:] for name, t in new.items()}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: P.Pattern | None = None,
               causal: bool = True, score_mod=None, normalization="softmax", scale: float | None = None,
               lengths=None) -> torch.Tensor:
        _check_new(q, k, v)
        if lengths is not None or score_mod is not None or resolve(normalization).name != "softmax":
            raise ValueError("SelectiveKVCache supports softmax attention over one length per batch, without "
                             "score_mod or lengths=")
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        if self.hi is None:
            if self.sparse_prefill:
                if not causal or pattern is not None:
                    raise ValueError("sparse_prefill applies to the causal prompt: pass no pattern")
                keep = self._select_prompt(q, k, v, pattern, scale)
                g, get = h // hkv, _on_device(keep)

                def important(bi, hi, qi, ki):  # important keys, and the query's own key, causally
                    return (get(ki.device)[bi, hi // g, ki] | (ki == qi)) & (ki <= qi)

                out = attention(q, k, v, pattern=P.custom(important), scale=scale)
            else:
                out = attention(q, k, v, pattern=pattern if pattern is not None else P.causal() if causal else None,
                                scale=scale)
                self._select_prompt(q, k, v, pattern, scale)
            self.seen = n
            self.new = {"k": k[:, :, :0], "v": v[:, :, :0], "pos": self.hi["pos"][..., :0]}
            self.queries = q[:, :, n - min(self.probe, n):]
            return out
        held_k = self.hi["k"]
        if (k.shape[0], k.shape[1], k.shape[3], k.dtype) != (held_k.shape[0], held_k.shape[1], held_k.shape[3],
                                                             held_k.dtype):
            raise ValueError(f"new keys {tuple(k.shape)} {k.dtype} do not match the cache's batch/kv heads/dim/dtype "
                             f"{tuple(held_k.shape)} {held_k.dtype}; call reset() before a new sequence")
        outs = []
        step = n if self.interval is None else 1  # with decode-time selection, one token at a time
        for s in range(0, n, step):
            qs, ks, vs = q[:, :, s:s + step], k[:, :, s:s + step], v[:, :, s:s + step]
            m = qs.shape[2]
            new_pos = torch.arange(self.seen, self.seen + m, device=k.device).expand(b, hkv, m)
            self.new = {"k": torch.cat([self.new["k"], ks], 2), "v": torch.cat([self.new["v"], vs], 2),
                        "pos": torch.cat([self.new["pos"], new_pos], 2)}
            kk, vv, valid, pos = self._held()
            qpos = torch.arange(self.seen, self.seen + m, device=q.device)
            ok = valid[:, :, None, :] & (pos[:, :, None, :] <= qpos.view(1, 1, -1, 1))
            g, get = h // hkv, _on_device(ok)

            def fn(bi, hi, qi, ki, get=get, g=g):  # held entries, and the new tokens causally
                return get(ki.device)[bi, hi // g, qi, ki]

            outs.append(attention(qs, kk, vv, scale=scale, pattern=P.custom(fn)))
            self.seen += m
            self.queries = torch.cat([self.queries, qs], 2)[:, :, -self.probe:]
            if self.interval is not None and self.new["k"].shape[2] >= self.interval:
                self._select_block(scale)
        return torch.cat(outs, 2)


class TokenTypeKVCache(PackedKVStore):
    """NAtS's evicting KV cache (Deng & Lindauer, "Neural Attention Search", Sec. 3): every token carries a type
    (0 Global, 1 Local, 2 Sliding window) and its entry lives exactly as long as :func:`token_type_rule` lets a
    later query see it: Global entries stay; a Local entry is evicted once a later Global token has been processed
    (that Global token itself still sees it); a Sliding entry is evicted when it falls out of the next ``window``
    tokens. Prompt chunks and generated tokens follow the same rule, so the output of every call equals dense
    attention under :func:`token_type_mask`.

    ``attend(q, k, v, *, types)``: ``types [batch, n]`` (one type per token, as :class:`TokenTypeMixer` predicts)
    or ``[batch, kv_heads, n]`` (one per head). Entries are packed per (batch, kv head) with a validity mask;
    ``held [batch, kv_heads]``, ``held_bytes``, :meth:`held_positions` report what is held.
    """

    def __init__(self, window: int):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.k = self.v = self.valid = self.pos = self.type = self.gcount = None
        self.globals_seen: torch.Tensor | None = None  # Global tokens processed so far [batch, kv_heads]
        self.seen = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, types: torch.Tensor,
               pattern: P.Pattern | None = None, causal: bool = True, score_mod=None, normalization="softmax",
               scale: float | None = None, lengths=None) -> torch.Tensor:
        """Attend the new tokens to the held entries and to each other under NAtS's rule, then evict what no
        later query can see. Returns ``[batch, heads, n, dim_v]``."""
        _check_new(q, k, v)
        if lengths is not None or score_mod is not None or resolve(normalization).name != "softmax":
            raise ValueError("TokenTypeKVCache supports softmax attention over one length per batch, without "
                             "score_mod or lengths=")
        if not causal or pattern is not None:
            raise ValueError("TokenTypeKVCache applies NAtS's causal token-type mask; pass no pattern")
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        types = torch.as_tensor(types, device=k.device).long()
        if types.dim() == 2 and types.shape == (b, n):
            types = types[:, None, :].expand(b, hkv, n)
        if types.shape != (b, hkv, n) or bool(((types < GLOBAL) | (types > SLIDING)).any()):
            raise ValueError(f"types must be [batch={b}, n={n}] or [batch, kv_heads={hkv}, n] with values 0 "
                             f"(Global), 1 (Local), 2 (Sliding), got {tuple(types.shape)}")
        if self.k is None:
            empty = k.new_zeros(b, hkv, 0, 1).long()[..., 0]
            self.k, self.v = k[:, :, :0], v[:, :, :0]
            self.valid = empty.bool()
            self.pos = self.type = self.gcount = empty
            self.globals_seen = torch.zeros(b, hkv, dtype=torch.long, device=k.device)
        elif (k.shape[0], k.shape[1], k.shape[3], k.dtype) != (self.k.shape[0], self.k.shape[1], self.k.shape[3],
                                                               self.k.dtype):
            raise ValueError(f"new keys {tuple(k.shape)} {k.dtype} do not match the cache "
                             f"{tuple(self.k.shape)} {self.k.dtype}; call reset() before a new sequence")
        p0 = self.seen
        new_pos = torch.arange(p0, p0 + n, device=k.device).expand(b, hkv, n)
        is_global = (types == GLOBAL).long()
        new_gcount = self.globals_seen[..., None] + is_global.cumsum(-1)  # Globals at positions <= each new token
        kk, vv = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        valid = torch.cat([self.valid, torch.ones_like(types, dtype=torch.bool)], 2)
        pos, typ = torch.cat([self.pos, new_pos], 2), torch.cat([self.type, types], 2)
        gcount = torch.cat([self.gcount, new_gcount], 2)
        # query i (position p0 + i) sees key j when valid and the rule allows it; Globals strictly between them:
        # G(p_i - 1) - G(p_j) > 0
        g_before_q = (new_gcount - is_global)[..., :, None]  # [b, hkv, n, 1]
        between = (g_before_q - gcount[..., None, :]) > 0
        mask = valid[..., None, :] & token_type_rule(typ[..., None, :], between, new_pos[..., :, None],
                                                     pos[..., None, :], self.window)
        g = h // hkv
        get = _on_device(mask)
        out = attention(q, kk, vv, scale=scale,
                        pattern=P.custom(lambda bi, hi, qi, ki: get(ki.device)[bi, hi // g, qi, ki]))
        # evict: keep what the next query (position p0 + n) can see
        self.seen = p0 + n
        self.globals_seen = new_gcount[..., -1]
        nxt = torch.full_like(pos, self.seen)
        keep = valid & token_type_rule(typ, (self.globals_seen[..., None] - gcount) > 0, nxt, pos, self.window)
        order = kept_order(keep)
        self.k, self.v, self.valid = gather_seq(kk, order), gather_seq(vv, order), keep.gather(2, order)
        self.pos, self.type, self.gcount = pos.gather(2, order), typ.gather(2, order), gcount.gather(2, order)
        return out



class ActQKVCache:
    """ActQKV decoding for one layer: the whole KV stays stored (the paper offloads it), and each decoding step
    attends to a retrieved subset: the ``init`` first tokens, the last ``window`` tokens, and the ``k`` context keys
    that the step's query (averaged over each kv head's query heads) scores highest, where ``k`` is this layer's
    dynamic cut-off from a shared :class:`CutoffAllocator` (from the normalised entropy of those scores). The
    prompt is exact. :meth:`last_attended` is what the last step attended to (what retrieval brings to the
    accelerator); ``held_bytes`` its keys and values; ``nbytes`` everything stored.

    Only the decode-time cut-off is modelled here; the prefill probe query (activation bias) is
    :func:`probe_query_mask`."""

    def __init__(self, allocator: CutoffAllocator, layer: int, *, window: int = 16, init: int = 1):
        if window < 1 or init < 0:
            raise ValueError(f"window must be >= 1 and init >= 0, got {window}, {init}")
        self.allocator, self.layer, self.window, self.init = allocator, layer, window, init
        self.k = self.v = None
        self.seen = 0
        self._held: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return kv_nbytes(self.k, self.v)

    @property
    def held_bytes(self) -> int:
        """Bytes of the keys and values the last decoding step attended to (all of them before the first step)."""
        if self.k is None:
            return 0
        per = kv_entry_bytes(self.k, self.v)
        count = self.k.shape[0] * self.k.shape[1] * self.seen if self._held is None else int(self._held.sum()) + \
            self._held.shape[0] * self._held.shape[1]
        return count * per

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        return (self.seen + torch.arange(n)).view(1, -1)

    def last_attended(self) -> torch.Tensor:
        """``[batch, kv_heads, seen - 1]``: the earlier positions the last decoding step attended to (the retrieved
        set; the step's own token comes on top)."""
        if self._held is None:
            raise ValueError("no decoding step yet: attend() the prompt, then one token")
        return self._held

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: P.Pattern | None = None,
               causal: bool = True, score_mod=None, normalization="softmax", scale: float | None = None,
               lengths=None) -> torch.Tensor:
        _check_new(q, k, v)
        if lengths is not None or score_mod is not None or resolve(normalization).name != "softmax":
            raise ValueError("ActQKVCache supports softmax attention over one length per batch, without score_mod "
                             "or lengths=")
        if self.k is None:
            self.k, self.v, self.seen = k, v, k.shape[2]
            return attention(q, k, v, pattern=pattern if pattern is not None else P.causal() if causal else None,
                             scale=scale)
        if q.shape[2] != 1:
            raise ValueError("ActQKVCache decodes one token per call (the cut-off is chosen per step)")
        b, h, _, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        n = self.seen
        j = torch.arange(n, device=k.device)
        fixed = (j < self.init) | (j >= n - self.window)  # [n]
        scores = (q.view(b, hkv, g, d).mean(2).unsqueeze(2) @ self.k.transpose(-1, -2)).squeeze(2)  # [b, hkv, n]
        cand = scores.masked_fill(fixed, -math.inf)
        count = int((~fixed).sum())
        entropy = float(normalized_entropy(scores[..., ~fixed]).mean()) if count else 0.0
        top = min(self.allocator.allocate(self.layer, entropy), count)
        keep = fixed.expand(b, hkv, n).clone()
        if top:
            keep.scatter_(-1, cand.topk(top, dim=-1).indices, True)
        self._held = keep
        self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        self.seen = n + 1
        mask = torch.cat([keep, keep.new_ones(b, hkv, 1)], 2)
        get = _on_device(mask)
        return attention(q, self.k, self.v, scale=scale,
                         pattern=P.custom(lambda bi, hi, qi, ki: get(ki.device)[bi, hi // g, ki]))


# -- A-VL ----------------------------------------------------------------------------------------------------------
class AdaptiveVLCache(PackedKVStore):
    """A-VL's decoding cache (Zhang et al., "A-VL: Adaptive Attention for Large Vision-Language Models", AAAI 2025):
    modality-specific adaptive attention, for one layer. Source of the rule: the paper's method (adaptive text-aware
    vision attention; adaptive text attention) as summarised from its full text, with the details (counts, scores,
    update schedule, eviction) from the authors' repository (github.com/2147483647-2/A-VL,
    ``src/transformers/src/transformers/models/llama/modeling_llama.py``); the code here is ours.

    The prompt is ``system | image | text``: ``is_visual [batch, n_prompt]`` marks one contiguous image block per
    row (tokens before it are the system prompt, kept whole; tokens after it, and every generated token, are text).

    *Vision* (``drop_rate``, ``compute_rate``, ``interval``): after the exact prefill, the attention of the last
    prompt token (averaged over all heads) ranks the image tokens: the best ``int((1 - drop_rate) * n_img)`` are
    held (secondary), the rest dropped (minor); the best ``int((1 - compute_rate) * n_img)`` of the held are the
    core. With ``interval = K > 0``, decoding step ``t`` (1, 2, ...) computes with the core image tokens only,
    except when ``t % K == 0``: then it computes with every held image token and its attention (averaged over all
    heads) picks the new core among them. ``interval`` None: every step computes with every held image token.

    *Text* (``text_rate``; None keeps all text): each kv head scores its text entries by
    :func:`~attnkit.ops.longctx.selection.avl_text_scores` (from its query heads' mean attention) and, after the
    prefill and after each step, holds ``budget = max(round((1 - text_rate) * T), text_init)`` of them (``T``: text
    tokens seen so far) by :func:`~attnkit.ops.longctx.selection.avl_text_keep` (the last ``budget // 2`` and the
    best-scored rest). Eviction is per kv head; the image tiers are shared by all heads, as in the repository.

    The prompt's output is exact causal attention. Each later output equals dense attention over the positions of
    :meth:`computed_mask` (held entries, less the non-core image tokens between updates). ``nbytes``: bytes of the
    buffers (packed to the longest head); ``held_bytes``: bytes of the entries held.
    """

    def __init__(self, is_visual: torch.Tensor, *, drop_rate: float = 0.5, compute_rate: float = 0.7,
                 interval: int | None = 3, text_rate: float | None = 0.5, text_init: int = 1):
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"interval must be None or an int >= 1, got {interval!r}")
        if text_rate is not None and not 0.0 <= text_rate <= 1.0:
            raise ValueError(f"text_rate must be None or lie in [0, 1], got {text_rate!r}")
        if text_init < 0:
            raise ValueError(f"text_init must be >= 0, got {text_init}")
        vis = torch.as_tensor(is_visual).to(torch.bool)
        if vis.dim() != 2:
            raise ValueError(f"is_visual must be [batch, n_prompt], got shape {tuple(vis.shape)}")
        self.bounds = []
        for row in vis:
            idx = row.nonzero().flatten()
            if idx.numel() and int(idx[-1] - idx[0]) + 1 != idx.numel():
                raise ValueError("is_visual must mark one contiguous image block per row (A-VL's system | image | "
                                 "text prompt); split a prompt with several images into one cache per image block")
            first = int(idx[0]) if idx.numel() else 0
            self.bounds.append((first, int(idx[-1]) + 1 if idx.numel() else 0))
        avl_vision_tiers(torch.zeros(1), torch.zeros(1, dtype=torch.bool), drop_rate=drop_rate,
                         compute_rate=compute_rate)  # checks the rates
        self.is_visual, self.drop_rate, self.compute_rate = vis, drop_rate, compute_rate
        self.interval, self.text_rate, self.text_init = interval, text_rate, text_init
        self.reset()

    def reset(self) -> None:
        self.k = self.v = self.pos = self.valid = self.score = None
        self.core: list[torch.Tensor] = []  # per batch row: core positions (long)
        self.counts: list[tuple[int, int]] = []  # per batch row: (secondary, core) counts
        self.seen = self.step = 0
        self.last_computed: torch.Tensor | None = None

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def held_mask(self) -> torch.Tensor:
        """``[batch, kv_heads, seen]`` bool: the positions held."""
        return self.held_positions()

    def computed_mask(self) -> torch.Tensor:
        """``[batch, kv_heads, seen]`` bool: the positions the last decoding step computed with."""
        if self.last_computed is None:
            raise ValueError("no decoding step yet; call attend() with a generated token first")
        return self.last_computed

    def last_attended(self) -> torch.Tensor:
        """:meth:`computed_mask` without the last token's own position, ``[batch, kv_heads, seen - 1]``: the protocol
        of :mod:`attnkit.kvpolicy.generation` for caches that select per step (one token per call)."""
        return self.computed_mask()[..., :-1]

    def _compact(self, keep: torch.Tensor) -> None:
        order = kept_order(keep & self.valid)
        self.k, self.v = gather_seq(self.k, order), gather_seq(self.v, order)
        self.pos, self.score = gather_seq(self.pos, order), gather_seq(self.score, order)
        self.valid = (keep & self.valid).gather(2, order)

    def _is_text(self) -> torch.Tensor:
        ends = torch.tensor([e for _, e in self.bounds], device=self.pos.device).view(-1, 1, 1)
        return self.valid & (self.pos >= ends)

    def _evict_text(self, attn: torch.Tensor, prefill: bool) -> None:
        """Update the text scores from ``attn [b, hkv, rows, m]`` (aligned with the buffers) and evict."""
        b, hkv, _, m = attn.shape
        text = self._is_text()
        keep = torch.ones(b, hkv, m, dtype=torch.bool, device=attn.device)
        for bi in range(b):
            t_seen = self.seen - self.bounds[bi][1]
            budget = max(round((1 - self.text_rate) * t_seen), self.text_init)
            for hi in range(hkv):
                cols = text[bi, hi].nonzero().flatten()  # position order: the newest column is the last
                if not cols.numel():
                    continue
                a = attn[bi, hi][:, cols] if not prefill else attn[bi, hi][-cols.numel():, cols]
                old = None if prefill else self.score[bi, hi, cols[:-1]].view(1, -1)
                new = avl_text_scores(a.unsqueeze(0), self.text_rate, old)[0]
                self.score[bi, hi, cols] = new.to(self.score.dtype)
                kept = avl_text_keep(new.view(1, -1), budget)[0]
                keep[bi, hi, cols[~kept]] = False
        self._compact(keep)

    # -- attention ---------------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: P.Pattern | None = None,
               causal: bool = True, score_mod=None, normalization="softmax", scale: float | None = None,
               lengths=None) -> torch.Tensor:
        _check_new(q, k, v)
        plain_causal = pattern is None and causal or pattern is not None and repr(pattern) == repr(P.causal())
        if lengths is not None or score_mod is not None or resolve(normalization).name != "softmax" \
                or not plain_causal:
            raise ValueError("AdaptiveVLCache supports causal softmax attention without pattern, score_mod or "
                             "lengths=")
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        g, sc = h // hkv, default_scale(q, scale)
        if self.k is None:
            if b != self.is_visual.shape[0] or n != self.is_visual.shape[1]:
                raise ValueError(f"the prompt has batch {b} and {n} tokens; is_visual is "
                                 f"{tuple(self.is_visual.shape)}: give one flag per prompt token")
            out = attention(q, k, v, pattern=P.causal(), scale=scale)
            w = attention_weights(q, k, pattern=P.causal(), score_mod=None, normalization=resolve("softmax"),
                                  scale=sc)  # [b, h, n, n]
            self.k, self.v = k, v
            self.pos = torch.arange(n, device=k.device).expand(b, hkv, n).contiguous()
            self.valid = torch.ones(b, hkv, n, dtype=torch.bool, device=k.device)
            self.score = torch.zeros(b, hkv, n, dtype=torch.float32, device=k.device)
            self.seen = n
            keep = torch.ones(b, hkv, n, dtype=torch.bool, device=k.device)
            for bi in range(b):
                vis = self.is_visual[bi].to(k.device)
                n_img = int(vis.sum())
                secondary, core = avl_vision_tiers(w[bi, :, -1].float().mean(0), vis, drop_rate=self.drop_rate,
                                                   compute_rate=self.compute_rate)
                self.counts.append((int((1 - self.drop_rate) * n_img), int((1 - self.compute_rate) * n_img)))
                self.core.append(core.nonzero().flatten())
                keep[bi] &= (~vis | secondary).view(1, n)
            self._compact(keep)  # the minor image tokens go first: the text scores are per held entry
            if self.text_rate is not None:
                full = w.view(b, hkv, g, n, n).mean(2)  # positions; the buffers hold them in order
                aligned = torch.stack([torch.stack([full[bi, hi][:, self.pos[bi, hi]] for hi in range(hkv)])
                                       for bi in range(b)])  # [b, hkv, n, m]
                self._evict_text(aligned, prefill=True)
            return out
        if (k.shape[0], k.shape[1], k.shape[3], k.dtype) != (self.k.shape[0], self.k.shape[1], self.k.shape[3],
                                                             self.k.dtype):
            raise ValueError(f"new keys {tuple(k.shape)} {k.dtype} do not match the cache's batch/kv heads/dim/dtype "
                             f"{tuple(self.k.shape)} {self.k.dtype}; call reset() before a new sequence")
        outs = []
        for s in range(n):  # one generated token at a time: the policy acts after every step
            outs.append(self._decode(q[:, :, s:s + 1], k[:, :, s:s + 1], v[:, :, s:s + 1], g, sc))
        return torch.cat(outs, 2)

    def _decode(self, q, k, v, g, sc) -> torch.Tensor:
        b, h = q.shape[:2]
        hkv = k.shape[1]
        self.step += 1
        self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        self.pos = torch.cat([self.pos, torch.full((b, hkv, 1), self.seen, device=k.device)], 2)
        self.valid = torch.cat([self.valid, torch.ones(b, hkv, 1, dtype=torch.bool, device=k.device)], 2)
        self.score = torch.cat([self.score, self.score.new_zeros(b, hkv, 1)], 2)
        self.seen += 1
        update = self.interval is None or self.step % self.interval == 0
        compute = self.valid.clone()
        if not update:  # between updates, only the core image tokens take part
            for bi, (start, end) in enumerate(self.bounds):
                img = (self.pos[bi] >= start) & (self.pos[bi] < end)
                compute[bi] &= ~img | torch.isin(self.pos[bi], self.core[bi])
        kk, vv = self.k.repeat_interleave(g, 1), self.v.repeat_interleave(g, 1)
        ok = compute.repeat_interleave(g, 1).unsqueeze(2)  # [b, h, 1, m]
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        logits = (q.to(work) @ kk.to(work).transpose(-1, -2)) * sc
        w = torch.softmax(logits.masked_fill(~ok, float("-inf")), dim=-1)
        out = (w @ vv.to(work)).to(q.dtype)
        self.last_computed = torch.zeros(b, hkv, self.seen + 1, dtype=torch.bool, device=q.device)
        self.last_computed.scatter_(2, torch.where(compute, self.pos, torch.full_like(self.pos, self.seen)), True)
        self.last_computed = self.last_computed[..., :self.seen]
        if self.interval is not None and update:  # a new core among the held image tokens
            for bi, (start, end) in enumerate(self.bounds):
                by_pos = torch.zeros(self.seen, dtype=work, device=q.device)
                for hi in range(h):
                    by_pos.index_add_(0, self.pos[bi, hi // g], torch.where(self.valid[bi, hi // g], w[bi, hi, 0],
                                                                            torch.zeros_like(w[bi, hi, 0])))
                img = torch.zeros(self.seen, dtype=torch.bool, device=q.device)
                img[start:end] = True
                img &= self.held_mask()[bi].any(0)
                _, core = _avl_top(by_pos / h, img, *self.counts[bi])
                self.core[bi] = core.nonzero().flatten()
        if self.text_rate is not None:
            self._evict_text(w.view(b, hkv, g, 1, -1).mean(2), prefill=False)
        return out
