"""Select-and-Pack attention (SPA): a gate picks informative tokens, the picked tokens of every image are packed
into one sequence and attend within their own image, and the results are scattered back.

Zhang et al., "Context-Aware Token Selection and Packing for Enhanced Vision Transformer", 2024. A cheap gating
layer scores each token, ``u_j = mean_h (k_j^h . w_h) + c`` (supervised in the paper by selection labels from
the task); tokens with ``u_j > threshold`` are selected (a different number per image). The selected tokens of all
images are packed into one varlen sequence with a block-diagonal mask (catalogue B15: no cross-contamination), so
attention runs without padding, and the outputs are scattered back; unselected tokens get a zero attention output
(they only pass through the block's residual). Selected outputs are multiplied by a straight-through gate
``sigma(u) / stopgrad(sigma(u))`` (value 1), so the gate learns from the task loss.

Exact relative to per-image attention over the selected tokens; selecting every token gives full attention.
Cost O(sum_b n_b^2 d) over the selected tokens ``n_b``.
"""

from __future__ import annotations

import torch

from attnkit.ops.approx._common import grouped_attention_lse, masked_attention_lse, prepare, refuse_causal

__all__ = ["select_pack_attention", "select_pack_reference", "gate_scores"]


def gate_scores(k: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Token scores ``[b, n]`` of ``k [b, h, n, d]``: ``mean_h (k^h . w_h) + c`` with ``gate_weight [h, d]``."""
    if not isinstance(gate_weight, torch.Tensor) or gate_weight.shape != (k.shape[1], k.shape[-1]):
        raise ValueError(f"gate_weight must be a tensor [heads={k.shape[1]}, head_dim={k.shape[-1]}], got "
                         f"{getattr(gate_weight, 'shape', type(gate_weight).__name__)}")
    acc = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
    return torch.einsum("bhnd,hd->bn", k.to(acc), gate_weight.to(acc)) / k.shape[1] + gate_bias


def _setup(q, k, v, scores, keep, gate_weight, gate_bias, threshold, scale, causal):
    refuse_causal("select_pack", causal, "tokens are selected from the whole image")
    k, v, scale = prepare(q, k, v, scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"select_pack selects tokens of one sequence: q_len ({q.shape[2]}) must equal kv_len "
                         f"({k.shape[2]})")
    given = [x is not None for x in (scores, keep, gate_weight)]
    if sum(given) != 1:
        raise ValueError("select_pack needs exactly one of: keep= (bool [batch, seq]), scores= ([batch, seq], "
                         "selected where > threshold) or gate_weight= ([heads, head_dim], the linear gate)")
    b, n = q.shape[0], q.shape[2]
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != (b, n):
            raise ValueError(f"keep must be a bool tensor [batch={b}, seq={n}], got "
                             f"{getattr(keep, 'shape', type(keep).__name__)}")
        return k, v, scale, keep, None
    u = gate_scores(k, gate_weight, gate_bias) if scores is None else scores
    if u.shape != (b, n):
        raise ValueError(f"scores must be [batch={b}, seq={n}], got {tuple(u.shape)}")
    # a NaN score (a NaN key) selects its token: the NaN then propagates through attention as in dense attention,
    # instead of the token silently dropping out (issue 28)
    ud = u.detach()
    return k, v, scale, (ud > threshold) | torch.isnan(ud), u


def _gate(out: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    if u is None or not u.requires_grad:
        return out
    g = torch.sigmoid(u)
    return out * (g - g.detach() + 1).to(out.dtype)[:, None, :, None]


def select_pack_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: torch.Tensor | None = None,
                          scores: torch.Tensor | None = None, gate_weight: torch.Tensor | None = None,
                          gate_bias: torch.Tensor | float = 0.0, threshold: float = 0.0, causal: bool = False,
                          chunk_size: int = 256, scale: float | None = None) -> torch.Tensor:
    """Plain reference: image by image, softmax attention among its selected tokens (float64); zeros elsewhere."""
    k, v, scale, sel, u = _setup(q, k, v, scores, keep, gate_weight, gate_bias, threshold, scale, causal)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64, device=q.device)
    for i in range(q.shape[0]):
        idx = torch.nonzero(sel[i]).flatten()
        if idx.numel():
            s = q[i][:, idx].double() @ k[i][:, idx].double().transpose(-1, -2) * scale
            out[i][:, idx] = masked_attention_lse(s, v[i][:, idx].double())[0]
    return _gate(out, u).to(q.dtype)


def select_pack_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: torch.Tensor | None = None,
                          scores: torch.Tensor | None = None, gate_weight: torch.Tensor | None = None,
                          gate_bias: torch.Tensor | float = 0.0, threshold: float = 0.0, causal: bool = False,
                          chunk_size: int = 256, scale: float | None = None) -> torch.Tensor:
    """Select-and-Pack attention. ``q, k [b, h, n, d]``, ``v [b, h, n, dv]`` -> ``[b, h, n, dv]``. Selection:
    ``keep`` (bool ``[b, n]``), or ``scores [b, n] > threshold``, or the gate ``gate_weight [h, d]`` (+
    ``gate_bias``) ``> threshold``. The selected tokens of all images are packed into one sequence (no padding)
    and attend within their image."""
    k, v, scale, sel, u = _setup(q, k, v, scores, keep, gate_weight, gate_bias, threshold, scale, causal)
    b, h, n, _ = q.shape
    dv = v.shape[-1]
    img, tok = torch.nonzero(sel, as_tuple=True)  # packed order: image-major, so image ids ascend
    out = torch.zeros(b, h, n, dv, dtype=v.dtype, device=v.device)
    if img.numel() == 0:
        return _gate(out, u)

    def pack(x):  # [b, h, n, e] -> [1, h, N, e]
        return x[img, :, tok].transpose(0, 1).unsqueeze(0)

    groups = img.view(1, 1, -1).expand(1, h, -1)
    o, _ = grouped_attention_lse(pack(q), groups, pack(k), pack(v), groups, scale=scale, chunk_size=chunk_size)
    return _gate(_scatter(out, o[0].to(v.dtype), img, tok), u)


def _scatter(out: torch.Tensor, packed: torch.Tensor, img: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """``out[img[t], :, tok[t]] = packed[:, t]`` (autograd-friendly, out of place)."""
    b, h, n, dv = out.shape
    flat = out.transpose(1, 2).reshape(b * n, h, dv)
    flat = flat.index_copy(0, img * n + tok, packed.transpose(0, 1))
    return flat.view(b, n, h, dv).transpose(1, 2)
