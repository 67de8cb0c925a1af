"""Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization" (CVPR 2021): relevance
propagated by LRP through every layer, then combined with attention gradients.

:func:`attnkit.analysis.relevance` implements the rule of the authors' follow-up ("Generic Attention-model
Explainability", 2021), which weights the gradient by the attention *probabilities*. This module implements the
first paper's rule, which weights it by the LRP *relevance* of the probabilities:

* propagation rules (Sec. 3): layers with weights by LRP-alpha-beta (Eq. 5, ``alpha = 1, beta = 0``: positive
  contributions only, bias ignored); products of two tensors (``A V``, ``Q K^T``) by ``R_u = u * d(Z)/du *
  R / Z`` for each operand (Eq. 7), each halved so that the two together conserve the relevance; sums (skip
  connections) by the same rule followed by the normalisation of Eq. 10, which keeps ``sum R_u + sum R_v = sum
  R``; LayerNorm, GELU, softmax and dropout pass relevance through unchanged (as the authors' code does);
* the map (Eq. 13-14): per block ``A_bar = I + E_h[(grad A * R_A)^+]``, with ``R_A`` the relevance of the
  attention probabilities and ``grad A`` their gradient of the explained class score; ``C`` is the product of
  the ``A_bar`` over the blocks, the later block on the left (as the authors' code multiplies; Eq. 14 writes
  the product from block 1 to block B). Row ``i`` of ``C`` gives the relevance of each input token for output
  token ``i`` (the [CLS] row for a classifier).

LRP needs every layer's rule, so it runs on a model written for it: :class:`LRPClassifier`, a pre-norm encoder
with a [CLS] classifier (the paper's ViT layout). :func:`lrp_relevance` takes the per-block gradients and
relevances of any model that provides them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["lrp_linear", "lrp_product", "lrp_add", "lrp_relevance", "LRPClassifier"]

_EPS = 1e-9


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with ``b`` pushed away from 0 by ``1e-9`` (keeping its sign) and 0 where ``b == 0``."""
    den = torch.where(b >= 0, b + _EPS, b - _EPS)
    return torch.where(b == 0, torch.zeros_like(a), a / den)


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """LRP-alpha-beta through ``y = x W^T`` (Eq. 5; ``beta = alpha - 1``): ``x [..., in]``, ``weight [out, in]``,
    ``relevance [..., out]`` -> ``[..., in]``. Positive contributions are ``x+ W+`` and ``x- W-``, negative ones
    ``x+ W-`` and ``x- W+``; each group distributes ``R`` in proportion to its terms. With ``alpha = 1`` the
    relevance is conserved per output (where any contribution is positive)."""
    beta = alpha - 1.0
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)

    def share(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        s = _safe_div(relevance, F.linear(xp, w1) + F.linear(xn, w2))
        return xp * (s @ w1) + xn * (s @ w2)

    out = alpha * share(wp, wn)
    if beta:
        out = out - beta * share(wn, wp)
    return out


def lrp_product(equation: str, a: torch.Tensor, b: torch.Tensor,
                relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of both operands of ``Z = einsum(equation, a, b)`` (Eq. 7: ``R_u = u * d<Z, R / Z>/du``), each
    halved, so that ``sum R_a + sum R_b = sum R`` for a bilinear product."""
    a_ = a.detach().requires_grad_(True)
    b_ = b.detach().requires_grad_(True)
    with torch.enable_grad():
        z = torch.einsum(equation, a_, b_)
        ga, gb = torch.autograd.grad(z, (a_, b_), _safe_div(relevance, z.detach()))
    return a_.detach() * ga / 2, b_.detach() * gb / 2


def lrp_add(u: torch.Tensor, v: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of both terms of ``Z = u + v`` (a skip connection): ``R_u = u R / Z`` (Eq. 7), then rescaled so
    that ``sum R_u = |sum R_u| / (|sum R_u| + |sum R_v|) * sum R`` (and likewise for ``v``; Eq. 10, sums per
    sample), which conserves the relevance and keeps the larger term the larger share."""
    s = _safe_div(relevance, u + v)
    ru, rv = u * s, v * s
    dims = tuple(range(1, relevance.dim()))
    su, sv, total = ru.sum(dims, keepdim=True), rv.sum(dims, keepdim=True), relevance.sum(dims, keepdim=True)
    share_u = _safe_div(su.abs(), su.abs() + sv.abs()) * total
    share_v = _safe_div(sv.abs(), su.abs() + sv.abs()) * total
    return ru * _safe_div(share_u, su), rv * _safe_div(share_v, sv)


def lrp_relevance(attention_gradients: Sequence[torch.Tensor], attention_relevances: Sequence[torch.Tensor], *,
                  start_layer: int = 0) -> torch.Tensor:
    """Chefer et al.'s map ``C [batch, n, n]`` (float64) from per-block ``grad A`` and ``R_A`` ``[batch, heads, n,
    n]`` in forward order (Eq. 13-14): ``A_bar_b = I + E_h[(grad A_b * R_A_b)^+]``, ``C = A_bar_B ... A_bar_s``
    from block ``start_layer``. With zero gradients ``C = I``."""
    if len(attention_gradients) != len(attention_relevances) or not attention_gradients:
        raise ValueError(f"need one gradient per relevance, at least one block; got {len(attention_gradients)} "
                         f"gradients and {len(attention_relevances)} relevances")
    if not 0 <= start_layer < len(attention_gradients):
        raise ValueError(f"start_layer must be in [0, {len(attention_gradients)}), got {start_layer}")
    c = None
    for g, r in list(zip(attention_gradients, attention_relevances))[start_layer:]:
        if g.shape != r.shape or g.dim() != 4 or g.shape[-1] != g.shape[-2]:
            raise ValueError(f"gradients and relevances must be [batch, heads, n, n] of one shape, got "
                             f"{tuple(g.shape)} and {tuple(r.shape)}")
        cam = (g.detach().double() * r.detach().double()).clamp(min=0).mean(dim=1)
        a_bar = cam + torch.eye(cam.shape[-1], dtype=torch.float64, device=cam.device)
        c = a_bar if c is None else a_bar @ c
    return c


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, keep: dict) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        keep["x_in"] = x
        ln1 = self.norm1(x)
        keep["ln1"] = ln1
        q, k, v = self.qkv(ln1).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # [b, h, n, d] each
        keep["q"], keep["k"], keep["v"] = q, k, v
        a = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * (c // h) ** -0.5, dim=-1)
        keep["attn"] = a
        ctx = torch.einsum("bhij,bhjd->bhid", a, v).transpose(1, 2).reshape(b, n, c)
        keep["ctx"] = ctx
        att = self.proj(ctx)
        keep["att"] = att
        x = x + att
        keep["x_mid"] = x
        ln2 = self.norm2(x)
        keep["ln2"] = ln2
        hid = F.gelu(self.fc1(ln2))
        keep["hid"] = hid
        mlp = self.fc2(hid)
        keep["mlp"] = mlp
        return x + mlp

    def relprop(self, r: torch.Tensor, keep: dict) -> torch.Tensor:
        b, n, c = r.shape
        h = self.num_heads
        r_skip, r_mlp = lrp_add(keep["x_mid"], keep["mlp"], r)
        r_mlp = lrp_linear(keep["hid"], self.fc2.weight, r_mlp)  # GELU: relevance passes unchanged
        r_ln2 = lrp_linear(keep["ln2"], self.fc1.weight, r_mlp)  # LayerNorm: likewise
        r = r_skip + r_ln2
        r_skip, r_att = lrp_add(keep["x_in"], keep["att"], r)
        r_ctx = lrp_linear(keep["ctx"], self.proj.weight, r_att).view(b, n, h, c // h).transpose(1, 2)
        r_a, r_v = lrp_product("bhij,bhjd->bhid", keep["attn"], keep["v"], r_ctx)
        keep["attn_relevance"] = r_a
        r_q, r_k = lrp_product("bhid,bhjd->bhij", keep["q"], keep["k"], r_a)  # softmax: unchanged
        r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * c)
        r_ln1 = lrp_linear(keep["ln1"], self.qkv.weight, r_qkv)
        return r_skip + r_ln1


class LRPClassifier(nn.Module):
    """A pre-norm transformer encoder classifier that can be explained by Chefer et al.'s method: token
    embeddings ``x [batch, n, dim]`` (token 0 is the [CLS] token) -> ``logits [batch, num_classes]`` from the
    final LayerNorm of token 0, as in ViT.

    :meth:`explain` returns the relevance map ``C [batch, n, n]`` of :func:`lrp_relevance` for a target class,
    with what it was computed from (``gradients``, ``relevances`` per block, ``input_relevance [batch, n, dim]``
    and ``block_totals``, the total relevance entering each block from the top, for conservation checks)."""

    def __init__(self, dim: int, num_heads: int, depth: int, num_classes: int, mlp_ratio: float = 2.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._keep: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"LRPClassifier takes x [batch, n, dim], got shape {tuple(x.shape)}")
        self._keep = [{} for _ in self.blocks]
        for blk, keep in zip(self.blocks, self._keep):
            x = blk(x, keep)
        self._pooled = self.norm(x)[:, 0]
        return self.head(self._pooled)

    def explain(self, x: torch.Tensor, target: int | torch.Tensor, *, start_layer: int = 0) -> dict:
        """Forward, the gradient of the target logit with respect to every attention map, then the LRP pass
        from the one-hot target (the authors' start) down to the input."""
        x = x.detach()
        with torch.enable_grad():
            logits = self(x)
            b = logits.shape[0]
            target = torch.as_tensor(target, device=logits.device).expand(b)
            one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
            grads = torch.autograd.grad((logits * one_hot).sum(), [k["attn"] for k in self._keep])
        with torch.no_grad():
            r = lrp_linear(self._pooled, self.head.weight, one_hot)  # final LayerNorm: unchanged
            r_tokens = torch.zeros(*x.shape[:2], r.shape[-1], dtype=r.dtype, device=r.device)
            r_tokens[:, 0] = r  # the [CLS] pooling sends all relevance to token 0
            totals = []
            for blk, keep in zip(reversed(self.blocks), reversed(self._keep)):
                totals.append(r_tokens.sum(dim=(1, 2)))
                r_tokens = blk.relprop(r_tokens, keep)
        relevances = [k["attn_relevance"] for k in self._keep]
        return {"map": lrp_relevance(grads, relevances, start_layer=start_layer), "gradients": list(grads),
                "relevances": relevances, "input_relevance": r_tokens, "block_totals": totals[::-1],
                "logits": logits.detach()}
