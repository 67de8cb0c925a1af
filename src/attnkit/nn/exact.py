"""Modules of exact-attention variants whose papers change scores, projections or tokens (issue 16).

Attention-kind modules map ``(q, k, v) [batch, heads, seq, dim] -> [batch, heads, q_len, dim_v]``; token
modules map ``x [batch, seq, dim] -> [batch, seq, dim]``. Each has a plain materialised reference
(``reference(...)``) beside its fast path; the fast paths run through ``attnkit.attention`` wherever the paper's
operator is softmax attention on transformed inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnkit import patterns as P
from attnkit import score_mods as S
from attnkit._checks import check_qkv, repeat_kv
from attnkit.functional.exact import attention
from attnkit.ops.exact.variants import add_registers, grid_shape, strip_registers
from attnkit.rotary import RotaryEmbedding

from .attention import MultiheadAttention

__all__ = [
    "SelectiveAttention", "QueryKeyPositionAttention", "coca_attention", "coca_reference",
    "GatedPositionalAttention", "NeuralAttention", "KolmogorovArnoldAttention", "FourierKArAt", "CarrierTokenAttention",
    "RegisterAttention", "PointTransformerLayer", "RelationalAttention", "GEMSelfSelfAttention",
    "EntityAwareAttention", "MultiHeadEmbeddingAttention", "PayBetterAttention", "LowRankContextPooling",
    "SubSampledAttention", "BirdEyeAttention",
]


def _positions(q_len: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions (bottom-right aligned) and key positions."""
    return torch.arange(kv_len - q_len, kv_len, device=device), torch.arange(kv_len, device=device)


def _causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    pq, pk = _positions(q_len, kv_len, device)
    return pk.view(1, -1) <= pq.view(-1, 1)


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# C6 selective attention
# ---------------------------------------------------------------------------------------------------------

class SelectiveAttention(nn.Module):
    """Selective attention ("Selective Attention: Enhancing Transformer through Principled Context Control",
    Zhang et al., 2024, Sec. 3): each query gets an inverse temperature ``tau_i = tau_tok(q_i) + tau_pos(p_i)``
    with ``tau_tok = tanh(u_h . q_i)`` (content) and ``tau_pos = 1 + alpha_h log(1 + p)`` (position, against
    attention dilution), and each value a temperature ``1 + tanh(w_h . v_j)``: ``softmax(tau_i q_i . k_j /
    sqrt(d)) (tau_v v)``. All new parameters start at 0, so it starts as plain attention. Since it only rescales q
    and v, every engine runs it. The position term matches the authors' released code (umich-sota/
    selective_attention: causal logits times ``1 + sigma log(n_i)``, ``n_i = i + 1`` keys, ``sigma =
    exp(-exp(beta)) > 0`` one per layer there; a free ``alpha_h`` per head here, 0 at the start). The token and
    value gates are the catalogue's sum form: not checked against the paper's text (not reachable offline).
    ``q [batch, heads, q_len, dim]``, ``k, v [batch, heads, kv_len, dim]``."""

    def __init__(self, num_heads: int, head_dim: int, *, causal: bool = False, value_temperature: bool = True):
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.token = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.alpha = nn.Parameter(torch.zeros(num_heads))
        self.value = nn.Parameter(torch.zeros(num_heads, head_dim)) if value_temperature else None

    def temperatures(self, q: torch.Tensor, v: torch.Tensor, kv_len: int):
        pq, _ = _positions(q.shape[2], kv_len, q.device)
        tau = torch.tanh(torch.einsum("bhld,hd->bhl", q, self.token.to(q.dtype)))
        tau = tau + 1 + self.alpha.to(q.dtype).view(1, -1, 1) * torch.log1p(pq.to(q.dtype)).view(1, 1, -1)
        tv = None if self.value is None else 1 + torch.tanh(torch.einsum("bhld,hd->bhl", v, self.value.to(v.dtype)))
        return tau, tv

    def _check(self, q, k, v):
        check_qkv(q, k, v)
        if q.shape[1] != self.num_heads or v.shape[1] != self.num_heads:
            raise ValueError(f"SelectiveAttention(num_heads={self.num_heads}) got q with {q.shape[1]} and v with "
                             f"{v.shape[1]} heads")

    def forward(self, q, k, v):
        self._check(q, k, v)
        tau, tv = self.temperatures(q, v, k.shape[2])
        v = v if tv is None else v * tv[..., None]
        return attention(q * tau[..., None], k, v, pattern=P.causal() if self.causal else None,
                         scale=q.shape[-1] ** -0.5)

    def reference(self, q, k, v):
        self._check(q, k, v)
        tau, tv = self.temperatures(q, v, k.shape[2])
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) * tau[..., None]
        w = _masked_softmax(s, _causal_mask(q.shape[2], k.shape[2], q.device) if self.causal else None)
        return w @ (v if tv is None else v * tv[..., None])


# ---------------------------------------------------------------------------------------------------------
# C11 Bird-Eye attention re-weighting
# ---------------------------------------------------------------------------------------------------------

class BirdEyeAttention(nn.Module):
    """Bird-eye self-attention ("Bird-Eye Transformers for Text Generation Models", Sha et al., 2022; BET).

    The paper's rule as the authors implemented it (github.com/shalei120/fairseq-1,
    ``fairseq/modules/multihead_attention.py``, ``--choose BET-dec``; the paper's own text was not reachable,
    only its abstract): a first, ordinary pass ``o = softmax(q k^T / sqrt(d)) v`` (causal for a decoder), whose
    heads are mixed by the layer's output projection (``first_proj`` here, an ``[h d, h d]`` linear map that
    starts as the identity), gives every key ``j`` an importance ``beta_j = sigmoid(w . [k_j ; o_j] + c)`` (one
    ``w [2 d]``, ``c`` for all heads; ``o_j`` is head ``h``'s slice of the mixed output at token ``j``). The
    second pass re-weights the logits, ``s_ij = beta_j q_i . k_j / sqrt(d)``, and masks each token's own key
    (the "information collector" that over-weights tokens similar to itself), except token 0's; its output
    ``softmax(s) v`` is the layer's (the repository then applies a second output projection, the caller's).
    ``exclude_self=False`` is the repository's ``=dm`` ablation (no diagonal mask).

    Since ``beta_j q_i . k_j = q_i . (beta_j k_j)``, the second pass is plain attention with re-scaled keys and a
    mask, so every engine runs both passes. Self-attention only: ``q_len == kv_len``.
    ``q [batch, heads, n, dim]``, ``k, v [batch, kv_heads, n, dim]`` -> ``[batch, heads, n, dim]``."""

    def __init__(self, num_heads: int, head_dim: int, *, causal: bool = False, exclude_self: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.causal, self.exclude_self = num_heads, head_dim, causal, exclude_self
        self.gate = nn.Linear(2 * head_dim, 1)
        self.first_proj = nn.Linear(num_heads * head_dim, num_heads * head_dim)
        with torch.no_grad():
            self.first_proj.weight.copy_(torch.eye(num_heads * head_dim))
            self.first_proj.bias.zero_()

    def _check(self, q, k, v):
        check_qkv(q, k, v)
        if q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"BirdEyeAttention(num_heads={self.num_heads}, head_dim={self.head_dim}) got q of "
                             f"shape {tuple(q.shape)}")
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"BirdEyeAttention is self-attention: every key needs its token's first-pass output, "
                             f"so q_len must equal kv_len (got {q.shape[2]} and {k.shape[2]})")

    def importance(self, first: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``beta [batch, heads, n]`` from the first pass's output ``[batch, heads, n, dim]`` and the keys."""
        b, h, n, d = first.shape
        mixed = self.first_proj(first.transpose(1, 2).reshape(b, n, h * d).to(self.first_proj.weight.dtype))
        mixed = mixed.view(b, n, h, d).transpose(1, 2).to(first.dtype)
        cat = torch.cat([repeat_kv(k, h), mixed], dim=-1)
        return torch.sigmoid(self.gate(cat.to(self.gate.weight.dtype))).squeeze(-1).to(first.dtype)

    def _mask(self, n: int, device) -> torch.Tensor | None:
        i, j = torch.arange(n, device=device).view(-1, 1), torch.arange(n, device=device).view(1, -1)
        ok = (j <= i) if self.causal else torch.ones(n, n, dtype=torch.bool, device=device)
        return ok & ((j != i) | (i == 0)) if self.exclude_self else ok

    def forward(self, q, k, v):
        self._check(q, k, v)
        h = q.shape[1]
        first = attention(q, k, v, pattern=P.causal() if self.causal else None)
        beta = self.importance(first, k)
        if self.exclude_self:
            causal = self.causal
            pattern = P.custom(lambda b_, h_, i, j: ((j <= i) | (not causal)) & ((j != i) | (i == 0)),
                               batch_dependent=False, head_dependent=False)
        else:
            pattern = P.causal() if self.causal else None
        return attention(q, repeat_kv(k, h) * beta[..., None], repeat_kv(v, h), pattern=pattern,
                         scale=q.shape[-1] ** -0.5)

    def reference(self, q, k, v):
        """Both passes materialised, as the repository computes them (logits times ``beta``, then the masks)."""
        self._check(q, k, v)
        h, n = q.shape[1], q.shape[2]
        kk, vv = repeat_kv(k, h), repeat_kv(v, h)
        s = (q @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        first = _masked_softmax(s, _causal_mask(n, n, q.device) if self.causal else None) @ vv
        beta = self.importance(first, k)
        return _masked_softmax(s * beta[:, :, None, :], self._mask(n, q.device)) @ vv


# ---------------------------------------------------------------------------------------------------------
# C8 query-key-position interaction
# ---------------------------------------------------------------------------------------------------------

class QueryKeyPositionAttention(nn.Module):
    """Relative position embeddings that interact with queries and keys ("Improve Transformer Models with Better
    Relative Position Embeddings", Huang et al., 2020, method 4): ``e_ij = (q_i . k_j + q_i . a_ij + k_j . a_ij)
    / sqrt(d)`` with ``a_ij = table[clip(p_i - j, -K, K) + K]``. The position terms are ``q @ table.T`` and
    ``k @ table.T`` (O(n K d)) gathered per logit by a score modifier, so the tiled engine runs it in O(n) memory;
    the reference builds the ``[q_len, kv_len, d]`` embeddings."""

    def __init__(self, num_heads: int, head_dim: int, *, max_distance: int = 16, causal: bool = False):
        super().__init__()
        if max_distance < 1:
            raise ValueError(f"max_distance must be >= 1, got {max_distance}")
        self.max_distance, self.causal = max_distance, causal
        self.table = nn.Parameter(torch.randn(2 * max_distance + 1, head_dim) * head_dim ** -0.5)

    def forward(self, q, k, v):
        check_qkv(q, k, v)
        scale = q.shape[-1] ** -0.5
        table = self.table.to(q.dtype)
        qa = (q @ table.T) * scale
        ka = (repeat_kv(k, q.shape[1]) @ table.T) * scale
        mod = S.query_key_position(qa, ka, self.max_distance)
        return attention(q, k, v, pattern=P.causal() if self.causal else None, score_mod=mod, scale=scale)

    def reference(self, q, k, v):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        pq, pk = _positions(q.shape[2], k.shape[2], q.device)
        r = (pq.view(-1, 1) - pk.view(1, -1)).clamp(-self.max_distance, self.max_distance) + self.max_distance
        a = self.table.to(q.dtype)[r]  # [q_len, kv_len, d]: the explicit n x n x d embeddings
        s = q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, a) + torch.einsum("bhjd,ijd->bhij", k, a)
        w = _masked_softmax(s / math.sqrt(q.shape[-1]),
                            _causal_mask(q.shape[2], k.shape[2], q.device) if self.causal else None)
        return w @ v


# ---------------------------------------------------------------------------------------------------------
# C9 CoCA
# ---------------------------------------------------------------------------------------------------------

def _coca_angles(dim: int, positions: torch.Tensor, base: float):
    return RotaryEmbedding(dim, base).to(positions.device).angles(positions)


def coca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   base: float = 10000.0) -> torch.Tensor:
    """Collinear constrained attention ("Cure the headache of Transformers via Collinear Constrained Attention",
    Zhu et al., 2023, Sec. 3), the paper's definition: in every RoPE plane ``p`` the key is the query scaled by
    ``t_jp = relu(k_jp) >= 0`` (``k``'s first ``dim / 2`` channels play ``W_t x_j``), so ``s_ij = sum_p t_jp
    ||q_ip||^2 cos((p_i - j) theta_p) / sqrt(d)``. Factored exactly as ``q'_i = RoPE_i([||q_ip||^2, 0])`` and
    ``k'_j = RoPE_j([t_jp, 0])`` (rotate-half layout), so any engine runs it with O(n d) memory.
    ``q, k [batch, heads, seq, dim]`` (``dim`` even), ``v [batch, heads, kv_len, dim_v]``."""
    check_qkv(q, k, v)
    d = q.shape[-1]
    if d % 2:
        raise ValueError(f"coca_attention needs an even head dim (RoPE planes), got {d}")
    h = d // 2
    pq, pk = _positions(q.shape[2], k.shape[2], q.device)
    norm2 = q[..., :h].square() + q[..., h:].square()
    t = torch.relu(k[..., :h])
    cq, sq = (x.to(q.dtype) for x in _coca_angles(d, pq, base))
    ck, sk = (x.to(q.dtype) for x in _coca_angles(d, pk, base))
    q2 = torch.cat([norm2 * cq, norm2 * sq], dim=-1)
    k2 = torch.cat([t * ck, t * sk], dim=-1)
    return attention(q2, k2, v, pattern=P.causal() if causal else None, scale=d ** -0.5)


def coca_reference(q, k, v, *, causal: bool = False, base: float = 10000.0) -> torch.Tensor:
    """CoCA by its naive construction: the per-pair key ``k_ij = t_j (.) q_i`` (per plane), then
    ``RoPE_i(q_i) . RoPE_j(k_ij)`` on an explicit ``[q_len, kv_len, d]`` tensor."""
    from attnkit.rotary import apply_rotary

    d = q.shape[-1]
    h = d // 2
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    pq, pk = _positions(q.shape[2], k.shape[2], q.device)
    t = torch.relu(k[..., :h])
    t = torch.cat([t, t], dim=-1)  # one factor per plane, both coordinates
    kij = t[:, :, None] * q[:, :, :, None]  # [b, h, i, j, d]
    cq, sq = (x.to(q.dtype) for x in _coca_angles(d, pq, base))
    ck, sk = (x.to(q.dtype) for x in _coca_angles(d, pk, base))
    rq = apply_rotary(q, cq, sq)
    rk = apply_rotary(kij, ck, sk)  # rotated at the key's position j
    s = torch.einsum("bhid,bhijd->bhij", rq, rk) / math.sqrt(d)
    w = _masked_softmax(s, _causal_mask(q.shape[2], k.shape[2], q.device) if causal else None)
    return w @ v


# ---------------------------------------------------------------------------------------------------------
# C10 ConViT gated positional self-attention
# ---------------------------------------------------------------------------------------------------------

class _GridBias(S.ScoreMod):
    """``v_pos^h . r_ij`` with ``r_ij = (|d|^2, d_1, d_2)``, ``d = pos_j - pos_i`` on a row-major 2-D grid."""

    head_dependent = True

    def __init__(self, v_pos: nn.Parameter, cols: int):
        super().__init__()
        self.v_pos, self.cols = v_pos, cols

    def forward(self, score, b, h, q_idx, kv_idx, q_len, kv_len):
        p = q_idx + (kv_len - q_len)
        d1 = (torch.div(kv_idx, self.cols, rounding_mode="floor") - torch.div(p, self.cols, rounding_mode="floor"))
        d2 = torch.remainder(kv_idx, self.cols) - torch.remainder(p, self.cols)
        d1, d2 = d1.to(score.dtype), d2.to(score.dtype)
        vp = self.v_pos.to(score.dtype)[h]  # [..., 3] after indexing by head
        return score + vp[..., 0] * (d1 * d1 + d2 * d2) + vp[..., 1] * d1 + vp[..., 2] * d2


class GatedPositionalAttention(nn.Module):
    """ConViT's gated positional self-attention ("ConViT: Improving Vision Transformers with Soft Convolutional
    Inductive Biases", d'Ascoli et al., 2021, Eq. 5): ``A^h = (1 - sigmoid(l_h)) softmax(q k^T / sqrt(d)) +
    sigmoid(l_h) softmax(v_pos^h . r_ij)`` with ``r_ij = (|d|^2, d_1, d_2)`` for patch offset ``d``; ``v_pos^h``
    starts at ``-alpha (1, -2 D^h_1, -2 D^h_2)``, a soft convolution tap at offset ``D^h`` of strength
    ``alpha``, and the gate at ``l_h = 1``. Tokens lie on ``shape`` (default a near-square grid of the sequence),
    or, with ``cols``, row-major on a grid ``cols`` wide with as many rows as needed: a token's place then does
    not depend on the sequence length, so a causal model decodes over a cache exactly as its full pass (with the
    length-dependent default grid, earlier tokens move when the sequence grows).
    The positional map is attention with zero queries and a score modifier, so the tiled engine runs both."""

    def __init__(self, num_heads: int, *, causal: bool = False, shape: tuple[int, int] | None = None,
                 locality_strength: float = 1.0, cols: int | None = None):
        super().__init__()
        if cols is not None and (shape is not None or isinstance(cols, bool) or not isinstance(cols, int)
                                 or cols < 1):
            raise ValueError(f"GatedPositionalAttention: cols must be a positive int and exclusive with shape, got "
                             f"cols={cols!r}, shape={shape!r}")
        self.num_heads, self.causal, self.shape, self.cols = num_heads, causal, shape, cols
        self.gate = nn.Parameter(torch.ones(num_heads))
        side = math.ceil(math.sqrt(num_heads))
        centres = torch.tensor([[h // side - side // 2, h % side - side // 2] for h in range(num_heads)],
                               dtype=torch.float32)
        v_pos = -locality_strength * torch.cat([torch.ones(num_heads, 1), -2 * centres], dim=1)
        self.v_pos = nn.Parameter(v_pos)

    def _grid_cols(self, n: int) -> int:
        if self.cols is not None:
            return self.cols
        if self.shape is None:
            return grid_shape(n)[1]
        if self.shape[0] * self.shape[1] != n:
            raise ValueError(f"GatedPositionalAttention(shape={self.shape}) holds {self.shape[0] * self.shape[1]} "
                             f"tokens, the input has {n}")
        return self.shape[1]

    def forward(self, q, k, v):
        check_qkv(q, k, v)
        if q.shape[1] != self.num_heads:
            raise ValueError(f"GatedPositionalAttention(num_heads={self.num_heads}) got {q.shape[1]} heads")
        pattern = P.causal() if self.causal else None
        content = attention(q, k, v, pattern=pattern)
        bias = _GridBias(self.v_pos, self._grid_cols(k.shape[2]))
        position = attention(torch.zeros_like(q), k, v, pattern=pattern, score_mod=bias)
        g = torch.sigmoid(self.gate).to(q.dtype).view(1, -1, 1, 1)
        return (1 - g) * content + g * position

    def weights(self, q, k):
        """The gated attention matrix ``[batch, heads, q_len, kv_len]`` (rows renormalised)."""
        n, cols = k.shape[2], self._grid_cols(k.shape[2])
        pq, pk = _positions(q.shape[2], n, q.device)
        d1 = (pk // cols).view(1, -1) - (pq // cols).view(-1, 1)
        d2 = (pk % cols).view(1, -1) - (pq % cols).view(-1, 1)
        r = torch.stack([d1 * d1 + d2 * d2, d1, d2], dim=-1).to(q.dtype)  # [i, j, 3]
        mask = _causal_mask(q.shape[2], n, q.device) if self.causal else None
        content = _masked_softmax(q @ repeat_kv(k, q.shape[1]).transpose(-1, -2) / math.sqrt(q.shape[-1]), mask)
        position = _masked_softmax(torch.einsum("ijc,hc->hij", r, self.v_pos.to(q.dtype))[None], mask)
        g = torch.sigmoid(self.gate).to(q.dtype).view(1, -1, 1, 1)
        a = (1 - g) * content + g * position
        return a / a.sum(-1, keepdim=True)

    def reference(self, q, k, v):
        return self.weights(q, k) @ repeat_kv(v, q.shape[1])


# ---------------------------------------------------------------------------------------------------------
# C12 neural attention (MLP scores), C13 Kolmogorov-Arnold attention: chunked over queries
# ---------------------------------------------------------------------------------------------------------

class _ChunkedScores(nn.Module):
    """Attention whose logits come from a learned function of each (query, key) pair: evaluated one query chunk
    at a time (memory O(chunk * kv_len * hidden), recomputed in the backward by checkpointing), never the full
    ``[q_len, kv_len, hidden]`` tensor."""

    causal: bool
    chunk: int

    def pair_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights_from_scores(self, s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _masked_softmax(s, mask)

    def _rows(self, q, k, v, start: int):
        stop = min(start + self.chunk, q.shape[2])
        s = self.pair_scores(q[:, :, start:stop], k)
        mask = None
        if self.causal:
            pk = torch.arange(k.shape[2], device=q.device)
            pq = torch.arange(start, stop, device=q.device) + (k.shape[2] - q.shape[2])
            mask = pk.view(1, -1) <= pq.view(-1, 1)
        return self.weights_from_scores(s, mask) @ v

    def forward(self, q, k, v):
        check_qkv(q, k, v)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        outs = []
        for start in range(0, q.shape[2], self.chunk):
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                outs.append(checkpoint(self._rows, q, k, v, start, use_reentrant=False))
            else:
                outs.append(self._rows(q, k, v, start))
        return torch.cat(outs, dim=2)

    def reference(self, q, k, v):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        mask = _causal_mask(q.shape[2], k.shape[2], q.device) if self.causal else None
        return self.weights_from_scores(self.pair_scores(q, k), mask) @ v


class NeuralAttention(_ChunkedScores):
    """Neural attention ("Neural Attention: A Novel Mechanism for Enhanced Expressive Power in Transformer
    Models", 2025): the dot product is replaced by a feed-forward network on each (query, key) pair,
    ``s_ij = w_2 . act(W_q q_i + W_k k_j + W_p (q_i (.) k_j) + b_1) + b_2``, then softmax. The ``q (.) k`` input
    makes the bilinear form a special case (identity activation, ``W_p = I``, ``w_2 = 1 / sqrt(d)``: dot-product
    attention). Chunked over queries; ``q, k, v [batch, heads, seq, head_dim]``."""

    def __init__(self, head_dim: int, *, hidden: int = 16, chunk: int = 64, causal: bool = False,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "relu", "identity"):
            raise ValueError(f"activation must be 'gelu', 'relu' or 'identity', got {activation!r}")
        self.causal, self.chunk, self.activation = causal, chunk, activation
        self.w_q = nn.Parameter(torch.randn(hidden, head_dim) * head_dim ** -0.5)
        self.w_k = nn.Parameter(torch.randn(hidden, head_dim) * head_dim ** -0.5)
        self.w_p = nn.Parameter(torch.randn(hidden, head_dim) * head_dim ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden) * hidden ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(()))

    def pair_scores(self, q, k):
        dt = q.dtype
        a = q @ self.w_q.to(dt).T  # [b, h, i, u]
        c = k @ self.w_k.to(dt).T  # [b, h, j, u]
        prod = torch.einsum("bhid,ud,bhjd->bhiju", q, self.w_p.to(dt), k)
        hid = a[:, :, :, None] + c[:, :, None] + prod + self.b1.to(dt)
        if self.activation == "gelu":
            hid = F.gelu(hid)
        elif self.activation == "relu":
            hid = torch.relu(hid)
        return hid @ self.w2.to(dt) + self.b2.to(dt)


class KolmogorovArnoldAttention(_ChunkedScores):
    """Fourier Kolmogorov-Arnold attention ("Kolmogorov-Arnold Attention: Is Learnable Attention Better For
    Vision Transformers?", Maity et al., 2025, Sec. 3): the softmax is replaced by a learnable univariate
    function per head, ``phi_h(s) = c_h + sum_{g=1..G} a_hg cos(g s) + b_hg sin(g s)`` on the logits, then the
    row l1 normalisation ``w_ij = phi(s_ij) / sum_j |phi(s_ij)|``. The coefficients start as the least-squares
    fit of ``exp`` on ``[-2, 2]``, so at initialisation it is softmax attention for logits in that range.
    Deviation from the paper: its operator (Eq. 1-2) has a learnable unit ``phi_pq`` per (output, key position)
    pair summed over the row, with no normalisation by default; this record keeps one elementwise function per
    head (a diagonal operator) so that it runs at any length and causally. The paper's modular operator is
    :class:`FourierKArAt` (record ``fourier_karat``). Chunked over queries so memory stays linear."""

    def __init__(self, num_heads: int, *, grid: int = 8, chunk: int = 64, causal: bool = False):
        super().__init__()
        self.causal, self.chunk, self.grid = causal, chunk, grid
        x = torch.linspace(-2, 2, 401, dtype=torch.float64)
        g = torch.arange(1, grid + 1, dtype=torch.float64)
        basis = torch.cat([torch.ones(401, 1, dtype=torch.float64), torch.cos(x[:, None] * g),
                           torch.sin(x[:, None] * g)], dim=1)
        coef = torch.linalg.lstsq(basis, torch.exp(x)[:, None]).solution[:, 0].float()
        self.coef = nn.Parameter(coef.expand(num_heads, -1).clone())  # [heads, 1 + 2G]

    def phi(self, s: torch.Tensor) -> torch.Tensor:
        c = self.coef.to(s.dtype)
        shape = (1, -1) + (1,) * (s.dim() - 2)
        out = c[:, 0].view(shape).expand_as(s).clone()
        for g in range(1, self.grid + 1):  # one harmonic at a time: memory of one score tile
            out = out + c[:, g].view(shape) * torch.cos(g * s) + c[:, self.grid + g].view(shape) * torch.sin(g * s)
        return out

    def pair_scores(self, q, k):
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])

    def weights_from_scores(self, s, mask):
        w = self.phi(s)
        if mask is not None:
            w = w.masked_fill(~mask, 0.0)
        return w / w.abs().sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


class FourierKArAt(nn.Module):
    """The paper's Fourier KArAt ("Kolmogorov-Arnold Attention: Is Learnable Attention Better For Vision
    Transformers?", Sec. 4, Eq. 2, Algorithm 2): per head, each logit row ``A_k`` (``A = Q K^T / sqrt(d)``) goes
    through a rank-``rank`` Fourier KAN operator ``Phi: R^N -> R^rank`` with one learnable unit per (output,
    key position) pair and ``grid`` harmonics, then back to ``R^N`` by a learned ``W [N, rank]``; the result
    replaces the softmax row (:mod:`attnkit.ops.exact.karat`). ``l1_projection`` projects ``Phi(A_k)`` onto the
    simplex first (Algorithm 1; off by default, as the paper's best models). The operator is built for one length
    ``seq_len`` (the paper's limitation); sharing one module between layers is the paper's "universal"
    configuration, one per layer its "blockwise" one. Coefficients start ``N(0, 1)`` (the paper's Table 6);
    ``W`` starts ``N(0, 1 / (2 grid seq_len rank))`` (our choice: rows of ``sigma`` of order one).
    ``forward(q, k, v)`` on ``[batch, heads, seq_len, dim]``."""

    def __init__(self, num_heads: int, seq_len: int, *, rank: int = 12, grid: int = 3, l1_projection: bool = False,
                 chunk: int = 64):
        super().__init__()
        for name, val in (("num_heads", num_heads), ("seq_len", seq_len), ("rank", rank), ("grid", grid),
                          ("chunk", chunk)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.seq_len, self.rank, self.grid, self.l1_projection, self.chunk = seq_len, rank, grid, l1_projection, chunk
        self.coef_cos = nn.Parameter(torch.randn(num_heads, rank, seq_len, grid))
        self.coef_sin = nn.Parameter(torch.randn(num_heads, rank, seq_len, grid))
        self.proj = nn.Parameter(torch.randn(num_heads, seq_len, rank) * (2 * grid * seq_len * rank) ** -0.5)

    def _check_len(self, q: torch.Tensor) -> None:
        if q.dim() == 4 and q.shape[2] != self.seq_len:
            raise ValueError(f"FourierKArAt was built for seq_len={self.seq_len} tokens (its operator has one unit per "
                             f"key position), got {q.shape[2]}; build it for this length")

    def forward(self, q, k, v):
        from attnkit.ops.exact.karat import fourier_karat

        self._check_len(q)
        return fourier_karat(q, k, v, self.coef_cos, self.coef_sin, self.proj, l1_projection=self.l1_projection,
                             chunk=self.chunk)

    def reference(self, q, k, v):
        from attnkit.ops.exact.karat import fourier_karat_reference

        self._check_len(q)
        return fourier_karat_reference(q, k, v, self.coef_cos, self.coef_sin, self.proj,
                                       l1_projection=self.l1_projection)


# ---------------------------------------------------------------------------------------------------------
# Token modules: B11 carrier tokens, B12 registers
# ---------------------------------------------------------------------------------------------------------

def _mha_reference(mha: MultiheadAttention, x: torch.Tensor, pattern: P.Pattern | None = None) -> torch.Tensor:
    """``MultiheadAttention`` (softmax, no rotary) evaluated by the dense reference engine."""
    q = mha._split(mha.q_proj(x), mha.num_heads)
    k = mha._split(mha.k_proj(x), mha.kv_heads)
    v = mha._split(mha.v_proj(x), mha.kv_heads)
    pattern = pattern if pattern is not None else mha.pattern
    out = attention(q, k, v, pattern=pattern, engine="reference")
    b, _, n, _ = out.shape
    return mha.out_proj(out.transpose(1, 2).reshape(b, n, -1))


def _check_tokens(x: torch.Tensor, dim: int, name: str) -> None:
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name}: x must be [batch, seq, {dim}], got {tuple(x.shape)}")


def _mha_call(mha: MultiheadAttention, x: torch.Tensor, pattern: P.Pattern | None) -> torch.Tensor:
    """``MultiheadAttention``'s projections around ``attnkit.attention`` with a per-call pattern."""
    q = mha._split(mha.q_proj(x), mha.num_heads)
    k = mha._split(mha.k_proj(x), mha.kv_heads)
    v = mha._split(mha.v_proj(x), mha.kv_heads)
    out = attention(q, k, v, pattern=pattern)
    b, _, n, _ = out.shape
    return mha.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class CarrierTokenAttention(nn.Module):
    """FasterViT's hierarchical attention ("FasterViT: Fast Vision Transformers with Hierarchical Attention",
    Hatamizadeh et al., 2024, Sec. 3.2): tokens ``x [batch, seq, dim]`` in windows of ``window`` consecutive
    tokens (window-partition images first; the last window may be shorter) are summarised into ``carriers``
    carrier tokens each (average pooling, then a projection); the carrier tokens attend globally to each other
    (with a residual), then each window attends over its tokens and its own carriers. With each window's
    carriers laid out after its tokens, the local step is the pattern ``block_local(window + carriers)`` (the
    short last window's padding masked as keys): one block-sparse call, no per-window loop. Returns the tokens'
    outputs ``[batch, seq, dim]``."""

    def __init__(self, dim: int, num_heads: int = 2, *, window: int = 16, carriers: int = 1):
        super().__init__()
        if window < 1 or carriers < 1 or carriers > window:
            raise ValueError(f"need 1 <= carriers <= window, got window={window}, carriers={carriers}")
        self.dim, self.window, self.carriers = dim, window, carriers
        self.summarise = nn.Linear(dim, dim)
        self.global_attn = MultiheadAttention(dim, num_heads)
        self.local_attn = MultiheadAttention(dim, num_heads)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Carriers of windows ``x [batch, windows, w, dim]`` -> ``[batch, windows, carriers, dim]``."""
        b, nw, w, c = x.shape
        pooled = F.adaptive_avg_pool1d(x.reshape(b * nw, w, c).transpose(1, 2), self.carriers)
        return self.summarise(pooled.transpose(1, 2)).reshape(b, nw, self.carriers, c)

    def carrier_tokens(self, x: torch.Tensor, attend=None) -> torch.Tensor:
        """Pooled carriers of every window after their global attention ``[batch, windows, carriers, dim]``."""
        b, n, c = x.shape
        w = self.window
        full = n // w
        parts = [self._pool(x[:, : full * w].reshape(b, full, w, c))] if full else []
        if n % w:
            parts.append(self._pool(x[:, full * w:][:, None]))
        ct = torch.cat(parts, dim=1)
        flat = ct.reshape(b, -1, c)
        attend = attend or (lambda m, t: m(t))
        return (flat + attend(self.global_attn, flat)).reshape(ct.shape)

    def forward(self, x):
        _check_tokens(x, self.dim, "CarrierTokenAttention")
        b, n, c = x.shape
        w, cc = self.window, self.carriers
        ct = self.carrier_tokens(x)
        nw = ct.shape[1]
        pad = nw * w - n
        xp = F.pad(x, (0, 0, 0, pad)).reshape(b, nw, w, c)
        seq = torch.cat([xp, ct], dim=2).reshape(b, nw * (w + cc), c)
        pattern = P.block_local(w + cc)
        if pad:
            # The short last window: its tokens, then its carriers, then the padding (masked as keys).
            last = (nw - 1) * (w + cc)
            order = torch.cat([torch.arange(last), last + torch.arange(w - pad), last + w + torch.arange(cc),
                               last + torch.arange(w - pad, w)]).to(x.device)
            seq = seq[:, order]
            pattern = pattern & P.key_padding([seq.shape[1] - pad])
        y = _mha_call(self.local_attn, seq, pattern)
        if pad:
            y = y[:, torch.argsort(order)]
        return y.reshape(b, nw, w + cc, c)[:, :, :w].reshape(b, nw * w, c)[:, :n]

    def reference(self, x):
        """The local step run window by window (dense attention on each window's tokens and carriers)."""
        _check_tokens(x, self.dim, "CarrierTokenAttention")
        ct = self.carrier_tokens(x, attend=lambda m, t: _mha_reference(m, t, P.full()))
        outs = []
        for i in range(ct.shape[1]):
            tokens = x[:, i * self.window: (i + 1) * self.window]
            seq = torch.cat([tokens, ct[:, i]], dim=1)
            outs.append(_mha_reference(self.local_attn, seq, P.full())[:, : tokens.shape[1]])
        return torch.cat(outs, dim=1)


class RegisterAttention(nn.Module):
    """Self-attention with ``num_registers`` learnable register tokens ("Vision Transformers Need Registers",
    Darcet et al., 2024): registers are inserted after the first ``after`` tokens (the [CLS] token), take part in
    attention as ordinary tokens and are dropped from the output. ``x [batch, seq, dim] -> [batch, seq, dim]``."""

    def __init__(self, dim: int, num_heads: int = 2, *, num_registers: int = 4, after: int = 0):
        super().__init__()
        self.dim, self.after = dim, after
        self.registers = nn.Parameter(torch.randn(num_registers, dim) * 0.02)
        self.attn = MultiheadAttention(dim, num_heads)

    def forward(self, x):
        _check_tokens(x, self.dim, "RegisterAttention")
        y = self.attn(add_registers(x, self.registers, after=self.after))
        return strip_registers(y, self.registers.shape[0], after=self.after)

    def reference(self, x):
        y = _mha_reference(self.attn, add_registers(x, self.registers, after=self.after))
        return strip_registers(y, self.registers.shape[0], after=self.after)


# ---------------------------------------------------------------------------------------------------------
# C14 Point Transformer
# ---------------------------------------------------------------------------------------------------------

class PointTransformerLayer(nn.Module):
    """Vector self-attention on k-NN neighbourhoods ("Point Transformer", Zhao et al., 2021, Eq. 3):
    ``y_i = sum_{j in kNN(i)} softmax_j(gamma(phi(x_i) - psi(x_j) + delta_ij)) (.) (alpha(x_j) + delta_ij)`` with
    ``delta_ij = theta(p_i - p_j)`` (an MLP on relative coordinates) and a softmax per channel over the ``k``
    neighbours. ``forward(x [batch, n, dim], pos [batch, n, 3])``: O(n k d) after the neighbour search."""

    def __init__(self, dim: int, *, k: int = 16, pos_dim: int = 3):
        super().__init__()
        self.dim, self.k = dim, k
        self.phi, self.psi, self.alpha = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.theta = nn.Sequential(nn.Linear(pos_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.gamma = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def _check(self, x, pos):
        _check_tokens(x, self.dim, "PointTransformerLayer")
        if pos.dim() != 3 or pos.shape[:2] != x.shape[:2]:
            raise ValueError(f"pos must be [batch, n, coords] matching x {tuple(x.shape[:2])}, got {tuple(pos.shape)}")

    def neighbours(self, pos: torch.Tensor) -> torch.Tensor:
        """Indices ``[batch, n, k]`` of each point's ``k`` nearest points (itself included); equal distances are
        broken by the lower index (a stable sort), so every device picks the same set (``topk`` broke ties
        differently on CUDA and CPU: grid coordinates tie often)."""
        p = pos.detach().float()
        d = (p[:, :, None] - p[:, None]).square().sum(-1)
        return torch.sort(d, dim=-1, stable=True).indices[..., :min(self.k, pos.shape[1])]

    def forward(self, x, pos=None):
        if pos is None:  # a sequence: points on a line at their token index (k-NN = a local window)
            pos = torch.zeros(*x.shape[:2], self.theta[0].in_features, dtype=x.dtype, device=x.device)
            pos[..., 0] = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)
        self._check(x, pos)
        idx = self.neighbours(pos)  # [b, n, k]
        b, n, kk = idx.shape

        def gather(t):  # [b, n, c] -> [b, n, k, c]
            return torch.gather(t[:, None].expand(b, n, n, t.shape[-1]), 2, idx[..., None].expand(-1, -1, -1,
                                                                                                   t.shape[-1]))

        delta = self.theta(pos[:, :, None] - gather(pos))
        logits = self.gamma(self.phi(x)[:, :, None] - gather(self.psi(x)) + delta)
        return (torch.softmax(logits, dim=2) * (gather(self.alpha(x)) + delta)).sum(2)

    def reference(self, x, pos):
        """Every pair materialised ``[batch, n, n, dim]``; non-neighbours masked out of the per-channel softmax."""
        self._check(x, pos)
        idx = self.neighbours(pos)
        n = x.shape[1]
        member = torch.zeros(x.shape[0], n, n, dtype=torch.bool, device=x.device).scatter_(2, idx, True)
        delta = self.theta(pos[:, :, None] - pos[:, None])
        logits = self.gamma(self.phi(x)[:, :, None] - self.psi(x)[:, None] + delta)
        w = torch.softmax(logits.masked_fill(~member[..., None], float("-inf")), dim=2)
        return (w * (self.alpha(x)[:, None] + delta)).sum(2)


# ---------------------------------------------------------------------------------------------------------
# C15 relational heads, C16 GEM, C17 LUKE, C18 multi-head embeddings, C19 pay-better, C21 pooling
# ---------------------------------------------------------------------------------------------------------

def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _sinusoid(n: int, dim: int, device, dtype) -> torch.Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    out = torch.zeros(n, dim, device=device, dtype=torch.float64)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out.to(dtype)


class RelationalAttention(nn.Module):
    """Relational attention heads of the Dual-Attention Transformer ("Disentangling and Integrating Relational and
    Sensory Information in Transformer Architectures", Altabaa & Lafferty, 2024, Sec. 3):
    ``RA(x)_i = sum_j alpha_ij (r(x_i, x_j) W_r + s_j W_s)``, ``alpha = softmax(phi(x_i) . psi(x_j) / sqrt(d))``,
    with ``d_r`` learned inner-product relations ``r_ijl = <phi_l(x_i), psi_l(x_j)>`` and symbols ``s_j``
    (``"value"``: a projection of ``x_j``; ``"position"``: sinusoidal positional symbols). Fast path: since
    ``sum_j alpha_ij r_ijl = phi_l(x_i) . (sum_j alpha_ij psi_l(x_j))``, the relations ride along as extra value
    channels of one attention call (no ``[n, n, d_r]`` tensor). ``x [batch, seq, dim]``."""

    def __init__(self, dim: int, num_heads: int = 2, *, relations: int = 4, rel_dim: int = 8,
                 symbols: str = "value", causal: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if symbols not in ("value", "position"):
            raise ValueError(f"symbols must be 'value' or 'position', got {symbols!r}")
        self.dim, self.heads, self.relations, self.rel_dim = dim, num_heads, relations, rel_dim
        self.symbols, self.causal = symbols, causal
        self.q, self.k = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.rel_q = nn.Linear(dim, relations * rel_dim, bias=False)
        self.rel_k = nn.Linear(dim, relations * rel_dim, bias=False)
        self.w_r = nn.Linear(relations, dim, bias=False)
        self.w_s = nn.Linear(dim, dim, bias=False)

    def _parts(self, x):
        _check_tokens(x, self.dim, "RelationalAttention")
        b, n, _ = x.shape
        q, k = _heads(self.q(x), self.heads), _heads(self.k(x), self.heads)
        s = x if self.symbols == "value" else _sinusoid(n, self.dim, x.device, x.dtype).expand(b, n, self.dim)
        rq = self.rel_q(x).view(b, n, self.relations, self.rel_dim)
        rk = self.rel_k(x).view(b, n, self.relations, self.rel_dim)
        return q, k, self.w_s(s), rq, rk

    def forward(self, x):
        q, k, s, rq, rk = self._parts(x)
        b, n, _ = x.shape
        if n == 0:  # no tokens: an empty output
            return x.new_zeros(b, 0, self.dim)
        # values per head: the head's symbol channels and every relation's psi_l(x_j)
        vals = torch.cat([_heads(s, self.heads), rk.reshape(b, n, 1, -1).expand(b, n, self.heads, -1)
                          .transpose(1, 2)], dim=-1)
        out = attention(q, k, vals, pattern=P.causal() if self.causal else None)
        dh = self.dim // self.heads
        sym = out[..., :dh]
        pooled = out[..., dh:].reshape(b, self.heads, n, self.relations, self.rel_dim)
        rel = torch.einsum("bnld,bhnld->bhnl", rq, pooled)
        return _merge(sym) + self.w_r(rel.mean(1))

    def reference(self, x):
        """Relations ``r_ij`` materialised ``[batch, n, n, d_r]``, then the paper's sum per head."""
        q, k, s, rq, rk = self._parts(x)
        n = x.shape[1]
        mask = _causal_mask(n, n, x.device) if self.causal else None
        alpha = _masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), mask)  # [b, h, i, j]
        r = torch.einsum("bild,bjld->bijl", rq, rk)
        rel = torch.einsum("bhij,bijl->bhil", alpha, r).mean(1)
        return _merge(alpha @ _heads(s, self.heads)) + self.w_r(rel)


class GEMSelfSelfAttention(nn.Module):
    """GEM's self-self attention path ("Grounding Everything: Emerging Localization Properties in
    Vision-Language Transformers", Bousselham et al., 2024, Sec. 3): for each projection ``p`` of ``q, k, v`` the
    tokens are L2-normalised and clustered by ``iterations`` rounds of ``p <- normalise(softmax(p p^T / tau) p)``;
    the path's output is the ensemble ``mean_p softmax(p p^T / tau) v``, then the output projection. The score
    matrices ``p p^T`` are symmetric. ``x [batch, seq, dim]``."""

    def __init__(self, dim: int, num_heads: int = 2, *, iterations: int = 1, temperature: float = 0.1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.heads, self.iterations, self.tau = dim, num_heads, iterations, temperature
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, *, dense: bool = False):
        _check_tokens(x, self.dim, "GEMSelfSelfAttention")
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        outs = []
        for p in (q, k, v):
            p = F.normalize(p, dim=-1)
            for _ in range(self.iterations):
                p = F.normalize(self._attend(p, p, dense), dim=-1)
            outs.append(self._attend(p, v, dense))
        return self.out(_merge(sum(outs) / 3))

    def _attend(self, p, v, dense):
        if dense:
            return torch.softmax(p @ p.transpose(-1, -2) / self.tau, dim=-1) @ v
        return attention(p, p, v, scale=1.0 / self.tau)

    def reference(self, x):
        return self.forward(x, dense=True)


class EntityAwareAttention(nn.Module):
    """LUKE's entity-aware self-attention ("LUKE: Deep Contextualized Entity Representations with Entity-aware
    Self-attention", Yamada et al., 2020, Sec. 3.2): ``e_ij = (Q_{t_i t_j} x_i) . (K x_j) / sqrt(d)`` with four
    query matrices chosen by the token types of the pair (word = 0, entity = 1). Fast path: one attention call on
    doubled head dims, ``q~_i = [Q_{t_i 0} x_i ; Q_{t_i 1} x_i]`` and ``k~_j = [K x_j 1[t_j = 0] ; K x_j 1[t_j =
    1]]`` (so ``q~_i . k~_j`` picks the pair's matrix). ``forward(x [batch, seq, dim], types [batch, seq])``."""

    def __init__(self, dim: int, num_heads: int = 2):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.heads = dim, num_heads
        self.queries = nn.ModuleList([nn.Linear(dim, dim) for _ in range(4)])  # w2w, w2e, e2w, e2e
        self.k, self.v, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _check(self, x, types):
        _check_tokens(x, self.dim, "EntityAwareAttention")
        if types.shape != x.shape[:2] or types.dtype.is_floating_point:
            raise ValueError(f"types must be integer [batch, seq] = {tuple(x.shape[:2])}, got {tuple(types.shape)}")

    def forward(self, x, types=None):
        if types is None:  # no entities: every token a word (the word-to-word query matrix everywhere)
            types = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        self._check(x, types)
        ent = (types == 1)[:, None, :, None]  # [b, 1, n, 1]
        qs = [_heads(m(x), self.heads) for m in self.queries]
        q2 = torch.where(ent, torch.cat([qs[2], qs[3]], -1), torch.cat([qs[0], qs[1]], -1))
        k = _heads(self.k(x), self.heads)
        k2 = torch.cat([k * (~ent).to(k.dtype), k * ent.to(k.dtype)], dim=-1)
        out = attention(q2, k2, _heads(self.v(x), self.heads), scale=(self.dim // self.heads) ** -0.5)
        return self.out(_merge(out))

    def reference(self, x, types):
        """Four query passes, each masked to its (query type, key type) pairs, summed into one logit matrix."""
        self._check(x, types)
        k = _heads(self.k(x), self.heads)
        s = 0
        for idx, (a, b_) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            pair = ((types == a)[:, :, None] & (types == b_)[:, None, :])[:, None]
            s = s + (_heads(self.queries[idx](x), self.heads) @ k.transpose(-1, -2)) * pair
        w = torch.softmax(s / math.sqrt(self.dim // self.heads), dim=-1)
        return self.out(_merge(w @ _heads(self.v(x), self.heads)))


class MultiHeadEmbeddingAttention(nn.Module):
    """Multi-head embeddings ("Pit One Against Many: Leveraging Attention-head Embeddings for Parameter-efficient
    Multi-head Attention", Xue & Aletras, 2023): one shared ``W_Q, W_K, W_V`` (``dim x dim``) and a
    ``dim``-vector per head and projection, ``Q_h = X W_Q + e^Q_h`` (``mode="add"``) or ``(X W_Q) (.) e^Q_h``
    (``"mul"``): ``3 * heads * dim`` parameters beyond single-head attention. Head outputs are averaged and
    projected. ``x [batch, seq, dim]``."""

    def __init__(self, dim: int, num_heads: int = 2, *, mode: str = "add", causal: bool = False):
        super().__init__()
        if mode not in ("add", "mul"):
            raise ValueError(f"mode must be 'add' or 'mul', got {mode!r}")
        self.dim, self.heads, self.mode, self.causal = dim, num_heads, mode, causal
        self.w_q, self.w_k, self.w_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        init = torch.zeros if mode == "add" else torch.ones
        self.emb = nn.Parameter(init(3, num_heads, dim) + 0.02 * torch.randn(3, num_heads, dim))
        self.out = nn.Linear(dim, dim)

    def _project(self, x):
        _check_tokens(x, self.dim, "MultiHeadEmbeddingAttention")
        outs = []
        for i, w in enumerate((self.w_q, self.w_k, self.w_v)):
            base = w(x)[:, None]  # [b, 1, n, dim]
            e = self.emb[i].to(x.dtype)[None, :, None]  # [1, h, 1, dim]
            outs.append(base + e if self.mode == "add" else base * e)
        return outs

    def forward(self, x):
        q, k, v = self._project(x)
        o = attention(q, k, v, pattern=P.causal() if self.causal else None)
        return self.out(o.mean(1))

    def reference(self, x):
        q, k, v = self._project(x)
        n = x.shape[1]
        w = _masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dim),
                            _causal_mask(n, n, x.device) if self.causal else None)
        return self.out((w @ v).mean(1))


class PayBetterAttention(nn.Module):
    """Optimised, Efficient and Super attention ("You Need to Pay Better Attention: Rethinking the Mathematics of
    Attention Mechanism", Hosseini & Hosseini, 2024): per head ``h`` of ``dim / heads`` channels ``X_h``,

    - ``"optimised"``: ``softmax(Q_h K_h^T) X_h W^O_h`` (no value projection: ``W^V_h`` folds into the output
      map; 3/4 of the parameters);
    - ``"efficient"``: ``softmax((X W^Q)_h X_h^T) X_h W^O`` (no key or value projection; half the parameters);
    - ``"super"``: ``softmax(Q_h K_h^T) (W^A X)_h W^O``: as optimised (query and key projections kept, no value
      projection) with the values first mixed along the sequence from the left by a learned ``W^A [seq, seq]``
      (lower-triangular when causal), one matrix shared by all heads, so it needs a fixed ``seq_len``. The paper's
      abstract (arXiv 2403.01643v2) fixes the projections: Super attention has "one fewer matrix multiplication
      per head and 25% fewer parameters than standard SDPA" (Optimised: the same; Efficient: two and 50%), so it
      keeps ``W^K``; "a new linear transformation on the values, transforming them from the left" is ``W^A``.
      The paper's body was not reachable (issue 25): ``W^A`` shared by the heads and lower-triangular under a
      mask follow a section-by-section summary of its Sec. 3.3 and two public re-implementations. The
      initialisation (identity plus 0.01 noise) is ours.

    ``x [batch, seq, dim]``."""

    def __init__(self, dim: int, num_heads: int = 2, *, variant: str = "optimised", causal: bool = False,
                 seq_len: int | None = None):
        super().__init__()
        if variant not in ("optimised", "efficient", "super"):
            raise ValueError(f"variant must be 'optimised', 'efficient' or 'super', got {variant!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if variant == "super" and seq_len is None:
            raise ValueError("variant='super' mixes values along the sequence: pass seq_len")
        self.dim, self.heads, self.variant, self.causal, self.seq_len = dim, num_heads, variant, causal, seq_len
        self.w_q = nn.Linear(dim, dim, bias=False)
        # Optimised and Super keep the key projection (3/4 of MHA's projections); Efficient drops it (1/2)
        self.w_k = nn.Linear(dim, dim, bias=False) if variant in ("optimised", "super") else None
        self.w_o = nn.Linear(dim, dim)
        if variant == "super":
            self.w_a = nn.Parameter(torch.eye(seq_len) + 0.01 * torch.randn(seq_len, seq_len))

    def _parts(self, x):
        _check_tokens(x, self.dim, "PayBetterAttention")
        q = _heads(self.w_q(x), self.heads)
        k = _heads(self.w_k(x) if self.w_k is not None else x, self.heads)
        v = x
        if self.variant == "super":
            n = x.shape[1]
            if n > self.seq_len:
                raise ValueError(f"super attention was built for seq_len <= {self.seq_len}, got {n}")
            a = self.w_a[:n, :n].to(x.dtype)
            v = (torch.tril(a) if self.causal else a) @ x
        return q, k, _heads(v, self.heads)

    def forward(self, x):
        q, k, v = self._parts(x)
        return self.w_o(_merge(attention(q, k, v, pattern=P.causal() if self.causal else None)))

    def reference(self, x):
        q, k, v = self._parts(x)
        n = x.shape[1]
        w = _masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]),
                            _causal_mask(n, n, x.device) if self.causal else None)
        return self.w_o(_merge(w @ v))


class LowRankContextPooling(nn.Module):
    """Low-rank factorised multi-head attention pooling with a global context query ("Low Rank Factorization for
    Compact Multi-Head Self-Attention", Mehta et al., 2019): head ``r`` weighs the states ``h_i`` by
    ``a^r = softmax_i(c^T P_r Q_r^T h_i)`` with a learned context vector ``c`` and rank-``rank`` factors ``P_r,
    Q_r``, and returns ``sum_i a^r_i h_i``. ``h [batch, seq, dim]`` -> ``[batch, heads, dim]``; ``lengths
    [batch]`` masks right padding. One query per head, so it runs as exact attention with ``q_len = 1``."""

    def __init__(self, dim: int, num_heads: int = 4, *, rank: int = 8):
        super().__init__()
        self.dim, self.heads = dim, num_heads
        self.context = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.p = nn.Parameter(torch.randn(num_heads, dim, rank) * dim ** -0.5)
        self.q = nn.Parameter(torch.randn(num_heads, dim, rank) * dim ** -0.5)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        _check_tokens(h, self.dim, "LowRankContextPooling")
        query = torch.einsum("d,rdk->rk", self.context.to(h.dtype), self.p.to(h.dtype))  # c^T P_r
        keys = torch.einsum("bnd,rdk->brnk", h, self.q.to(h.dtype))  # Q_r^T h_i
        qb = query[None, :, None].expand(h.shape[0], -1, -1, -1)
        vals = h[:, None].expand(-1, self.heads, -1, -1)
        pattern = None if lengths is None else P.key_padding(lengths)
        return attention(qb, keys, vals, pattern=pattern, scale=1.0)[:, :, 0]

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("d,rdk,rek,bne->brn", self.context.to(h.dtype), self.p.to(h.dtype),
                              self.q.to(h.dtype), h)
        return torch.softmax(logits, dim=-1)


class SubSampledAttention(nn.Module):
    """Twins' global sub-sampled attention with its learned reduction ("Twins: Revisiting the Design of Spatial
    Attention in Vision Transformers", Chu et al., 2021, Sec. 3.2): keys and values come from one representative
    per ``ratio x ratio`` window of the token grid, made by a strided convolution (kernel = stride = ``ratio``)
    and a LayerNorm; every token queries all of them. ``x [batch, rows * cols, dim]`` on the grid ``shape``
    (default a near-square grid); O(n^2 / ratio^2 * d). Grids not divisible by ``ratio`` are zero-padded before
    the convolution."""

    def __init__(self, dim: int, num_heads: int = 2, *, ratio: int = 2, shape: tuple[int, int] | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.heads, self.ratio, self.shape = dim, num_heads, ratio, shape
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.reduce = nn.Conv2d(dim, dim, ratio, ratio)
        self.norm = nn.LayerNorm(dim)

    def _grid(self, n: int) -> tuple[int, int]:
        shape = self.shape or grid_shape(n)
        if shape[0] * shape[1] != n:
            raise ValueError(f"SubSampledAttention(shape={shape}) holds {shape[0] * shape[1]} tokens, got {n}")
        return shape

    def _reduced(self, x: torch.Tensor, explicit: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        rows, cols = self._grid(n)
        r = self.ratio
        img = x.transpose(1, 2).reshape(b, c, rows, cols)
        img = F.pad(img, (0, -cols % r, 0, -rows % r))
        if not explicit:
            red = self.reduce(img).flatten(2).transpose(1, 2)
        else:  # the convolution as a linear map of each window's unfolded pixels
            win = F.unfold(img, r, stride=r).transpose(1, 2)  # [b, windows, c * r * r]
            red = win @ self.reduce.weight.reshape(c, -1).T + self.reduce.bias
        return self.norm(red)

    def forward(self, x, *, dense: bool = False):
        _check_tokens(x, self.dim, "SubSampledAttention")
        q = _heads(self.q(x), self.heads)
        k, v = (_heads(t, self.heads) for t in self.kv(self._reduced(x, explicit=dense)).chunk(2, dim=-1))
        out = attention(q, k, v, engine="reference" if dense else "auto")
        return self.out(_merge(out))

    def reference(self, x):
        return self.forward(x, dense=True)
