"""Transformer-VQ: softmax attention over vector-quantised keys, in linear time with a compressed cache.

Lingle, "Transformer-VQ: Linear-Time Transformers via Vector Quantization", ICLR 2024. Each key is replaced by
its nearest code of a codebook ``C [S, d]``: ``K^ = Delta C`` with ``Delta [n, S]`` one-hot. Then

    exp(Q K^T) V = exp(Q C^T) (Delta^T V),

so attention to any set of quantised keys only needs, per code, the count of keys and the sum of their
values. The causal form runs over blocks of ``block_size`` tokens: inside its block a query attends
exactly (softmax over the quantised keys, causal mask); all earlier blocks enter through the compressed
cache ``U = sum_past Delta^T V [S, dv]`` and counts ``L = sum_past Delta^T 1 [S]``, with logit
``q.c_s + log L_s`` for code ``s``; the two parts merge by log-sum-exp (the paper also keeps the previous
block uncompressed: same output, only the reach of the straight-through key gradient differs). The
non-causal form uses the cache of every other block. Both are *exactly* softmax attention over ``K^`` (the
defining invariant; the reference materialises it), in O(n (S + block_size) d) time and O(S dv) cache memory.

Gradients: ``q``, ``v`` and the codebook (when it requires grad) get the exact gradient of attention over
``K^``. Keys get the straight-through gradient ``dL/dk = dL/dk^`` from the pairs inside a block (where the
paper attends to the quantised keys directly); the compressed cache passes none to the keys it summarises
(per-key gradients through ``U`` would cost O(n S d dv)). The paper also trains keys towards their codes
with a commitment loss: :func:`vq_commitment_loss`. Codebooks come from the caller (``codebook=``), from
:func:`vq_codebook` (k-means on calibration keys), or from :class:`attnkit.nn.TransformerVQAttention`
(EMA k-means, as in the paper). The paper's gated attention unit is a block design outside this function.
"""

from __future__ import annotations

import math

import torch

from attnkit.ops.approx._common import (
    causal_mask,
    check_positive_int,
    masked_attention_lse,
    merge_lse,
    prepare,
    randint,
    upcast,
)

__all__ = ["vq_attention", "vq_reference", "vq_assign", "vq_codebook", "vq_quantize", "vq_commitment_loss"]


def _check_codebook(codebook: torch.Tensor | None, heads: int, d: int) -> torch.Tensor:
    """``codebook [S, d]`` or ``[heads, S, d]`` -> ``[1 | heads, S, d]``."""
    if codebook is None:
        raise ValueError(
            "transformer_vq needs codebook= ([S, head_dim] or [heads, S, head_dim]): fit one with "
            "attnkit.ops.approx.vq_codebook(calibration_keys, S), or use attnkit.nn.TransformerVQAttention "
            "(learned by EMA k-means)")
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if codebook.dim() == 2:
        codebook = codebook[None]
    if codebook.dim() != 3 or codebook.shape[-1] != d or codebook.shape[0] not in (1, heads):
        raise ValueError(f"codebook must be [S, {d}] or [{heads}, S, {d}] (S codes of the head dim), got "
                         f"{tuple(codebook.shape)}")
    if codebook.shape[1] < 1:
        raise ValueError("codebook must hold at least one code")
    return codebook


def vq_assign(k: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index ``[b, h, n]`` of the nearest code (Euclidean) of each key ``k [b, h, n, d]``; ``codebook
    [S, d]`` or ``[h, S, d]``. Computed in at least float32 so every dtype picks alike."""
    c = _check_codebook(codebook, k.shape[1], k.shape[-1])
    kk, cc = upcast(k.detach()), upcast(c.detach()).to(upcast(k).dtype)
    # argmin |k - c|^2 = argmin (|c|^2 - 2 k.c)
    dist = (cc * cc).sum(-1)[:, None, :] - 2 * kk @ cc.transpose(-1, -2)
    return dist.argmin(dim=-1)


def _gather_codes(c: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Codes ``c [1 | h, S, d]`` at ``idx [b, h, n]`` -> ``[b, h, n, d]`` (differentiable in ``c``)."""
    b, h, n = idx.shape
    c = c.expand(h, -1, -1)
    flat = (idx + torch.arange(h, device=idx.device)[:, None] * c.shape[1]).reshape(b, h * n)
    return c.reshape(-1, c.shape[-1])[flat].reshape(b, h, n, -1)


def vq_quantize(k: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K^, idx)``: the quantised keys ``[b, h, n, d]`` (values of the codebook) and their code indices."""
    idx = vq_assign(k, codebook)
    c = _check_codebook(codebook, k.shape[1], k.shape[-1]).to(k.dtype)
    return _gather_codes(c, idx), idx


def vq_commitment_loss(k: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The paper's commitment loss ``mean |k - sg(K^)|^2`` (a scalar), which pulls keys towards their codes."""
    khat, _ = vq_quantize(k, codebook.detach())
    return (k - khat).square().sum(-1).mean()


def vq_codebook(k: torch.Tensor, codebook_size: int, *, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """A ``[h, S, d]`` codebook by k-means (``iterations`` Lloyd steps from ``S`` seeded keys) on calibration
    keys ``k [b, h, n, d]`` (batch and positions pooled per head). Empty clusters keep their code."""
    check_positive_int("codebook_size", codebook_size)
    check_positive_int("iterations", iterations, minimum=0)
    x = upcast(k.detach()).transpose(0, 1).reshape(k.shape[1], -1, k.shape[-1])  # [h, b n, d]
    total = x.shape[1]
    idx = randint(total, (codebook_size,), seed, x.device) if codebook_size > total else \
        torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[:codebook_size].to(x.device)
    c = x[:, idx].clone()
    for _ in range(iterations):
        assign = vq_assign(x[None], c)[0]  # [h, b n]
        onehot = torch.nn.functional.one_hot(assign, codebook_size).to(x.dtype)  # [h, bn, S]
        sums, counts = onehot.transpose(-1, -2) @ x, onehot.sum(1)
        c = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], c)
    return c.to(k.dtype)


def _setup(q, k, v, codebook, block_size, scale):
    k, v, scale = prepare(q, k, v, scale)
    check_positive_int("block_size", block_size)
    c = _check_codebook(codebook, q.shape[1], q.shape[-1]).to(q.dtype)
    return k, v, scale, c, vq_assign(k, c)


def vq_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, codebook: torch.Tensor | None = None,
                 block_size: int = 256, causal: bool = False, scale: float | None = None,
                 return_attention: bool = False):
    """Plain reference: quadratic softmax attention over the quantised keys ``K^`` (float64), with the
    straight-through key gradient on same-block pairs, as :func:`vq_attention`."""
    k, v, scale, c, idx = _setup(q, k, v, codebook, block_size, scale)
    n, nk = q.shape[2], k.shape[2]
    khat = _gather_codes(c.double(), idx)
    same = (torch.arange(n, device=q.device)[:, None] // block_size
            == torch.arange(nk, device=q.device)[None, :] // block_size)
    q64 = q.double()
    s = q64 @ khat.transpose(-1, -2) * scale
    # Zero in value; carries dL/dk^ to k for pairs inside a block (straight-through estimator).
    ste = k.double() - k.double().detach()
    s = s + torch.where(same, q64 @ ste.transpose(-1, -2) * scale, torch.zeros((), dtype=s.dtype, device=s.device))
    mask = causal_mask(n, nk, q.device) if causal else None
    out, _ = masked_attention_lse(s, v.double(), mask)
    if not return_attention:
        return out.to(q.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return out.to(q.dtype), torch.softmax(s, dim=-1).nan_to_num(0.0)


def _block_table(idx: torch.Tensor, v: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code value sums ``[b, h, S, dv]`` and counts ``[b, h, S]`` of keys with codes ``idx [b, h, m]``."""
    b, h, _, dv = v.shape
    table = torch.zeros(b, h, num_codes, dv, dtype=v.dtype, device=v.device)
    table = table.scatter_add(2, idx[..., None].expand(-1, -1, -1, dv), v)
    counts = torch.zeros(b, h, num_codes, dtype=v.dtype, device=v.device)
    counts = counts.scatter_add(2, idx, torch.ones_like(idx, dtype=v.dtype))
    return table, counts


def vq_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, codebook: torch.Tensor | None = None,
                 block_size: int = 256, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Transformer-VQ attention. ``q [b, h, n, d]``, ``k [b, hkv, n_k, d]``, ``v [b, hkv, n_k, dv]``,
    ``codebook [S, d]`` or ``[h, S, d]`` -> ``[b, h, n, dv]``.

    Equals softmax attention over the quantised keys (causal: ``j <= i``, top-left aligned), computed block
    by block: exact inside the block, compressed cache (per-code value sums and counts) for the others.
    """
    k, v, scale, c, idx = _setup(q, k, v, codebook, block_size, scale)
    b, h, n, _ = q.shape
    nk, dv, num_codes = k.shape[2], v.shape[-1], c.shape[1]
    acc = upcast(v).dtype
    # Quantised keys with the straight-through gradient to k inside a block.
    khat = _gather_codes(c, idx) + (k - k.detach())
    vacc = v.to(acc)
    total = counts_total = None
    if not causal:
        total, counts_total = _block_table(idx, vacc, num_codes)
    cache = torch.zeros(b, h, num_codes, dv, dtype=acc, device=v.device)
    counts = torch.zeros(b, h, num_codes, dtype=acc, device=v.device)
    outs = []
    num_blocks = math.ceil(n / block_size)
    ct = c.transpose(-1, -2)
    for t in range(num_blocks):
        q0, q1 = t * block_size, min((t + 1) * block_size, n)
        k0, k1 = min(t * block_size, nk), min((t + 1) * block_size, nk)
        if k1 > k0:
            own_table, own_counts = _block_table(idx[..., k0:k1], vacc[:, :, k0:k1], num_codes)
        if q1 > q0:
            qs = q[:, :, q0:q1]
            if not causal:
                cache, counts = total, counts_total
                if k1 > k0:
                    cache, counts = total - own_table, counts_total - own_counts
            # Compressed part: one logit per code, q.c_s + log(count_s); its value is the mean value per code.
            # Codes with no key get a finite -1e30 rather than -inf, so a row whose cache is empty merges
            # with weight 0 and no NaN in the log-sum-exp backward.
            logits = upcast(qs @ ct * scale) + torch.where(
                counts > 0, torch.log(counts.clamp_min(1)), -1e30)[:, :, None, :]
            o, lse = masked_attention_lse(logits, cache / counts.clamp_min(1)[..., None])
            if k1 > k0:
                s = qs @ khat[:, :, k0:k1].transpose(-1, -2) * scale
                mask = causal_mask(n, nk, q.device)[q0:q1, k0:k1] if causal else None
                o2, lse2 = masked_attention_lse(s, vacc[:, :, k0:k1], mask)
                o, lse = merge_lse(o, lse, o2, lse2)
            outs.append(o)
        if causal and k1 > k0:
            cache, counts = cache + own_table, counts + own_counts
    return torch.cat(outs, dim=2).to(v.dtype)
