"""A decoding cache that keeps, per (batch, kv head), what a KV selection policy selects from the prompt (the
policies are kernels in :mod:`attnkit.ops.longctx.selection`); same protocol as :mod:`attnkit.cache`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit import patterns as P
from attnkit._checks import default_scale
from attnkit.cache import _check_new, _on_device, pack_kept
from attnkit.functional.exact import attention
from attnkit.normalizations import resolve
from attnkit.ops.exact.reference import attention_weights
from attnkit.ops.longctx.selection import dequantize, quantize

__all__ = ["SelectiveKVCache"]


# -- the cache ---------------------------------------------------------------------------------------------------
class SelectiveKVCache:
    """A decoding cache that keeps, per (batch, kv head), what ``policy`` selects from the prompt.

    Args:
        policy: ``policy(profile, q, k) -> keep [batch, kv_heads, n]`` where ``profile [batch, kv_heads, n_probe, n]``
            is the prompt's softmax attention for its last ``probe`` queries (averaged over each kv head's query
            heads). E.g. ``lambda p, q, k: cumulative_mass(p, 0.9)``.
        probe: prompt queries whose attention forms the profile.
        low_bits: None drops what the policy does not keep; an int stores it quantised to that many bits
            (ZipVL's mixed precision) instead.
        window: keep the last ``window`` prompt tokens whatever the policy says (0: none).

    The prompt (first ``attend``) is exact; later tokens are always kept. ``kept_fraction`` is the fraction of
    prompt entries kept at full precision; ``nbytes`` the bytes actually held (full-precision entries, plus codes
    and per-token scales of the low-precision ones).
    """

    def __init__(self, policy: Callable[..., torch.Tensor], *, probe: int = 16, low_bits: int | None = None,
                 window: int = 0):
        if probe < 1:
            raise ValueError(f"probe must be >= 1, got {probe}")
        if low_bits is not None and not 1 <= low_bits <= 8:
            raise ValueError(f"low_bits must be None or lie in [1, 8], got {low_bits}")
        self.policy, self.probe, self.low_bits, self.window = policy, probe, low_bits, window
        self.k = self.v = self.valid = None
        self.low = None  # (codes_k, scale_k, zero_k, codes_v, scale_v, zero_v, mask)
        self.seen = self.prompt_len = 0
        self.kept: torch.Tensor | None = None

    @property
    def kept_fraction(self) -> float:
        if self.kept is None:
            return 1.0
        return float(self.kept.sum()) / (self.kept.numel() * max(self.prompt_len, 1))

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        total = self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        if self.low is not None:  # codes (one uint8 per element: not bit-packed) and per-token scales/zeros
            total += sum(t.numel() * t.element_size() for t in self.low[:6])
        return total

    def positions(self, n: int, lengths=None) -> torch.Tensor:
        return (self.seen + torch.arange(n)).view(1, -1)

    def _select(self, q, k, v, pattern, scale) -> None:
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        pat = pattern if pattern is not None else P.causal()
        rows = min(self.probe, n)
        w = attention_weights(q[:, :, n - rows:], k, pattern=pat, score_mod=None,
                              normalization=resolve("softmax"), scale=default_scale(q, scale))
        profile = w.view(b, hkv, h // hkv, rows, n).mean(2)
        keep = self.policy(profile, q, k).to(torch.bool)
        if keep.shape != (b, hkv, n):
            raise ValueError(f"policy returned a keep mask of shape {tuple(keep.shape)}, expected {(b, hkv, n)}")
        if self.window:
            keep[..., max(0, n - self.window):] = True
        self.kept = keep.sum(-1)
        self.prompt_len = n
        if self.low_bits is not None:
            ck, sk, zk = quantize(k, self.low_bits)
            cv, sv, zv = quantize(v, self.low_bits)
            self.low = (ck, sk, zk, cv, sv, zv, ~keep)
        self.k, self.v, self.valid, self.order = pack_kept(k, v, keep)

    def _prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt keys/values as attended after selection, and their validity ``[b, hkv, m]``."""
        if self.low is None:
            return self.k, self.v, self.valid
        ck, sk, zk, cv, sv, zv, low = self.low
        k = dequantize(ck, sk, zk).to(self.k.dtype)
        v = dequantize(cv, sv, zv).to(self.v.dtype)
        # full-precision entries overwrite their dequantised copies
        k = k.scatter(2, self.order[..., None].expand(-1, -1, -1, k.shape[-1]), self.k)
        v = v.scatter(2, self.order[..., None].expand(-1, -1, -1, v.shape[-1]), self.v)
        return k, v, torch.ones_like(low)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: P.Pattern | None = None,
               causal: bool = True, score_mod=None, normalization="softmax", scale: float | None = None,
               lengths=None) -> torch.Tensor:
        _check_new(q, k, v)
        if lengths is not None or score_mod is not None or resolve(normalization).name != "softmax":
            raise ValueError("SelectiveKVCache supports softmax attention over one length per batch, without "
                             "score_mod or lengths=")
        n = q.shape[2]
        if self.k is None:
            out = attention(q, k, v, pattern=pattern if pattern is not None else P.causal() if causal else None,
                            scale=scale)
            self._select(q, k, v, pattern, scale)
            self.seen = n
            self.new_k, self.new_v = k[:, :, :0], v[:, :, :0]
            return out
        if (k.shape[0], k.shape[1], k.dtype) != (self.k.shape[0], self.k.shape[1], self.k.dtype):
            raise ValueError(f"new keys {tuple(k.shape)} {k.dtype} do not match the cache's batch/kv heads/dtype "
                             f"{tuple(self.k.shape[:2])} {self.k.dtype}")
        self.new_k = torch.cat([self.new_k, k], dim=2)
        self.new_v = torch.cat([self.new_v, v], dim=2)
        self.seen += n
        pk, pv, pvalid = self._prompt_kv()
        base = pk.shape[2]
        kk, vv = torch.cat([pk, self.new_k], 2), torch.cat([pv, self.new_v], 2)
        valid = torch.cat([pvalid, pvalid.new_ones(*pvalid.shape[:2], self.new_k.shape[2])], 2)
        get, g = _on_device(valid), q.shape[1] // k.shape[1]
        new_before = self.new_k.shape[2] - n

        def fn(b, h, qi, ki):  # selected prompt entries, and the new tokens causally
            return get(ki.device)[b, h // g, ki] & (ki <= base + new_before + qi)

        return attention(q, kk, vv, pattern=P.custom(fn), scale=scale)
