"""Pieces shared by the approximate-attention methods: seeded random draws, exact attention with its
log-sum-exp, the log-sum-exp merge of partial results, and segment means (landmarks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit._checks import check_qkv, default_scale, repeat_kv


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
            ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Validate ``q, k, v``; expand grouped k/v heads to the query heads; resolve the scale."""
    check_qkv(q, k, v)
    return repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), default_scale(q, scale)


def propagate_nonfinite(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        causal: bool) -> torch.Tensor:
    """``out [b, h, n, dv]`` with NaN in every row that dense softmax attention would make NaN: rows whose query
    has a non-finite component, and rows that see a key or value with one (every row; ``j <= i`` when
    ``causal``, top-left aligned). For mechanisms that select keys (top-k, LSH, clusters): a NaN key would
    otherwise drop out of the selection and leave a finite output computed as if it were absent (issue 28).
    ``k, v [b, h or hkv, n_k, d]``. Elementwise work only (no host sync)."""
    if out.numel() == 0:
        return out
    h = q.shape[1]
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # [b, hkv, n_k]
    bad = repeat_kv(bad[..., None], h)[..., 0] if bad.shape[1] != h else bad
    n, nk = q.shape[2], k.shape[2]
    if nk == 0:
        seen = torch.zeros(bad.shape[0], h, n, dtype=torch.bool, device=out.device)
    elif causal:
        rows = torch.arange(n, device=out.device).clamp_max(nk - 1)
        seen = (bad.cumsum(-1) > 0).index_select(-1, rows)
    else:
        seen = bad.any(-1, keepdim=True).expand(-1, -1, n)
    poisoned = seen | ~torch.isfinite(q).all(-1)
    return out.masked_fill(poisoned[..., None], float("nan"))


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every row (last axis) that holds a non-finite value set to 0: what selection-based mechanisms
    compute with, so that such a key or value cannot reach rows that never see it (as ``0 * NaN`` in a shared
    product); :func:`propagate_nonfinite` then puts NaN exactly where dense attention has it."""
    return x.masked_fill(~torch.isfinite(x).all(-1, keepdim=True), 0.0)


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def randn(shape: tuple[int, ...], seed: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal draws fixed by ``seed`` (drawn on the CPU so every device sees the same numbers),
    on ``like``'s device, in ``dtype`` (default ``like``'s)."""
    g = torch.Generator().manual_seed(int(seed))
    draws = torch.randn(shape, generator=g, dtype=torch.float64)
    return draws.to(device=like.device, dtype=dtype or like.dtype)


def randint(high: int, shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, high, shape, generator=g).to(device)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precisions to float32 for reductions (exp, log-sum-exp); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """``[q_len, kv_len]`` boolean, True where key j may be seen by query i (j <= i, top-left aligned as in
    ``scaled_dot_product_attention(is_causal=True)``)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= i


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """Exact softmax attention through ``scaled_dot_product_attention`` (GQA expanded)."""
    k, v, scale = prepare(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def masked_attention_lse(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention from (already scaled) ``scores [..., q, m]`` and ``v [..., m, dv]`` with an optional
    boolean ``mask`` (True = keep). Returns ``out [..., q, dv]`` and ``lse [..., q]``; rows with no kept key
    give ``out = 0`` and ``lse = -inf`` so they vanish in :func:`merge_lse`."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    scores = upcast(scores)
    lse = torch.logsumexp(scores, dim=-1)
    # exp(s - lse) with an empty row would be exp(nan); use a finite stand-in for those rows.
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe[..., None]).to(v.dtype)
    return p @ v, lse


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax partials over disjoint key sets: ``L = log(e^L1 + e^L2)``,
    ``o = e^(L1-L) o1 + e^(L2-L) o2``. Rows with both ``-inf`` stay zero."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe)[..., None].to(o1.dtype)
    w2 = torch.exp(lse2 - safe)[..., None].to(o2.dtype)
    return w1 * o1 + w2 * o2, lse


def segment_ids(n: int, m: int, device: torch.device) -> torch.Tensor:
    """Segment of each of ``n`` positions when cut into ``m`` contiguous, nearly equal segments
    (segment s holds positions ``floor(s n / m) .. floor((s+1) n / m) - 1``; none is empty when m <= n)."""
    return torch.div(torch.arange(n, device=device) * m, n, rounding_mode="floor")


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of ``m`` contiguous segments of ``x [..., n, d]`` along the sequence: ``[..., m, d]``.
    When ``m`` divides ``n`` this is the reshape-and-mean of the Nystromformer paper."""
    n = x.shape[-2]
    if n % m == 0:
        return x.unflatten(-2, (m, n // m)).mean(dim=-2)
    seg = segment_ids(n, m, x.device)
    counts = torch.bincount(seg, minlength=m).to(x.dtype)
    out = torch.zeros(*x.shape[:-2], m, x.shape[-1], dtype=x.dtype, device=x.device)
    out = out.index_add(-2, seg, x)
    return out / counts[:, None]


def dense_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> float:
    return 4.0 * batch * heads * q_len * kv_len * head_dim


class ApproxAttention:
    """A configured approximate mechanism: ``__call__(q, k, v)`` runs the fast path ``fn``;
    ``attention_matrix(q, k, v)`` returns the ``[batch, heads, q_len, kv_len]`` matrix the method implies
    (materialised by its reference ``ref``; small inputs only). Returned by the registry factories."""

    def __init__(self, name: str, fn, ref, **params):
        self.name, self.fn, self.ref, self.params = name, fn, ref, params

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        refuse_causal_decoding(self.name, bool(self.params.get("causal")), q, k)
        return self.fn(q, k, v, **self.params)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ref(q, k, v, **self.params)

    def attention_matrix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ref(q, k, v, return_attention=True, **self.params)[1]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"


def refuse_causal_decoding(name: str, causal: bool, q: torch.Tensor, k: torch.Tensor) -> None:
    """The approximations form their clusters, blocks, landmarks and selections over the call's own keys with
    causal masks aligned for ``q_len == kv_len``; a decoding call (fewer queries than keys) would silently see the
    wrong keys, so it is refused (``RetrievalDecoder`` and ``SparseKCache`` decode IceFormer, RetrievalAttention,
    Loki and SPARSEK)."""
    if causal and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4 \
            and q.shape[2] != k.shape[2]:
        from attnkit.errors import NotSupportedError

        raise NotSupportedError(
            f"{name} with causal=True takes as many queries as keys (got {q.shape[2]} queries for {k.shape[2]} "
            f"keys): its causal form is not defined for decoding over a cache; run the whole sequence, or decode "
            f"with attnkit.ops.approx.RetrievalDecoder / the SPARSEK cache where the method has one")


def refuse_causal(name: str, causal: bool, why: str) -> None:
    if causal:
        from attnkit.errors import NotSupportedError

        raise NotSupportedError(f"{name} has no causal form ({why}); use it with causal=False, or pick a "
                                f"mechanism with causal support (`attnkit list`)")


def chunked_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                          causal: bool = False, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention with its log-sum-exp, over chunks of queries (memory O(chunk x n_k)).
    ``q [.., n, d]``, ``k [.., n_k, d]`` (heads already matched) -> ``out [.., n, dv]``, ``lse [.., n]``."""
    n, nk = q.shape[-2], k.shape[-2]
    outs, lses = [], []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        s = q[..., start:stop, :] @ k.transpose(-1, -2) * scale
        mask = causal_mask(n, nk, q.device)[start:stop] if causal else None
        o, lse = masked_attention_lse(s, v, mask)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def grouped_attention_lse(q_s: torch.Tensor, gq: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor,
                          gk: torch.Tensor, *, scale: float, chunk_size: int,
                          qpos: torch.Tensor | None = None, kpos: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to equal groups, on inputs sorted by group.

    ``q_s [b, h, n, d]`` sorted so its groups ``gq [b, h, n]`` ascend; ``k_s``, ``v_s`` sorted so ``gk
    [b, h, n_k]`` ascends. Query i attends the keys of its own group (and, when positions ``qpos [b, h, n]``,
    ``kpos [b, h, n_k]`` are given, only keys with ``kpos <= qpos``). Each chunk of sorted queries reads the
    contiguous run of sorted keys whose groups it spans, so memory is O(chunk x run), never n x n_k.
    Returns ``out [b, h, n, dv]`` and ``lse [b, h, n]`` in sorted query order (empty rows: 0 and -inf).
    """
    n, nk = q_s.shape[2], k_s.shape[2]
    d, dv = k_s.shape[-1], v_s.shape[-1]
    gk = gk.contiguous()
    outs, lses = [], []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        g = gq[..., start:stop]
        lo = torch.searchsorted(gk, g[..., :1].contiguous(), right=False)  # [b, h, 1]
        hi = torch.searchsorted(gk, g[..., -1:].contiguous(), right=True)
        width = max(int((hi - lo).max()), 1)
        idx = lo + torch.arange(width, device=q_s.device)  # [b, h, w]
        valid = idx < hi
        idx = idx.clamp_max(nk - 1)
        kc = k_s.gather(2, idx[..., None].expand(-1, -1, -1, d))
        vc = v_s.gather(2, idx[..., None].expand(-1, -1, -1, dv))
        mask = valid[..., None, :] & (g[..., :, None] == gk.gather(-1, idx)[..., None, :])
        if qpos is not None:
            mask = mask & (kpos.gather(-1, idx)[..., None, :] <= qpos[..., start:stop, None])
        o, lse = masked_attention_lse(q_s[:, :, start:stop] @ kc.transpose(-1, -2) * scale, vc, mask)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def sort_by(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [b, h, n, d]`` in ``order [b, h, n]``."""
    return x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))


def unsort(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sort_by` for ``x [b, h, n, ...]`` (3 or 4 dims)."""
    idx = order if x.dim() == 3 else order[..., None].expand_as(x)
    return torch.empty_like(x).scatter_(2, idx, x)
