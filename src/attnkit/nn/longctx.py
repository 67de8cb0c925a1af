"""Model-level long-context methods as token mixers ``x [batch, seq, dim] -> [batch, seq, dim]``.

- :class:`BlockTransformerMixer` -- "Block Transformer: Global-to-Local Language Modeling for Fast Inference"
  (Ho et al. 2024), Sec. 2: an embedder pools each block of ``block_size`` tokens into one embedding, a block
  decoder runs causal attention over block embeddings (global, coarse), and a token decoder attends only within
  the block, prefixed by the context embedding of the preceding blocks: the token decoder's KV never exceeds
  ``block_size + 1`` entries.
- :class:`RecurrentAttentionMixer` -- "Recurrent Attention Networks for Long-text Modeling" (Li et al. 2023),
  Sec. 3: the document is cut into windows; self-attention runs in each window together with a Global
  Perception Cell (GPC) token carried from the previous window (the GPC output of window ``w`` is the memory
  input of window ``w + 1``), run in the parallel form (cells first, then all windows' tokens at once), and
  the memory review (tokens attend over every window's cell).
- :class:`TokenTypeMixer` -- Neural Attention Search (NAtS), Sec. 3: a learned per-token type (Global, Local,
  Sliding-window) from a linear scorer, relaxed with a straight-through Gumbel-softmax in training, whose mask
  (``token_type_mask``) decides which KV entries can be evicted at inference.

Each has ``reference(x)``: the same computation written as an explicit loop over blocks / windows / rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit import patterns as P
from attnkit.functional.exact import attention
from attnkit.ops.longctx.selection import token_type_mask, token_type_rule

__all__ = ["BlockTransformerMixer", "RecurrentAttentionMixer", "TokenTypeMixer"]


def _check_x(x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be [batch, seq, {dim}], got {getattr(x, 'shape', type(x).__name__)}")


class _Heads(nn.Module):
    """Q/K/V/O projections for ``num_heads`` heads."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.h = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def split(self, x: torch.Tensor):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, h * d))


class BlockTransformerMixer(nn.Module):
    """Block Transformer's global-to-local mixing in one layer (see the module docstring). ``causal=True``: the
    block decoder shows block ``b`` only blocks ``< b`` and the token decoder is causal within the block."""

    def __init__(self, dim: int, num_heads: int = 2, block_size: int = 4, causal: bool = True):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.dim, self.block_size, self.causal = dim, block_size, causal
        self.embed = nn.Linear(dim, dim)  # embedder: mean-pooled block -> block embedding
        self.block_attn, self.token_attn = _Heads(dim, num_heads), _Heads(dim, num_heads)
        self.start = nn.Parameter(torch.zeros(dim))  # context of the first block (no preceding blocks)

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """Context embeddings ``[batch, num_blocks, dim]``: for block ``b``, the block decoder's output over the
        embeddings of blocks ``< b`` (shifted by one block, as the paper's prefix)."""
        b, n, c = x.shape
        L = self.block_size
        nb = -(-n // L)
        pad = nb * L - n
        xp = F.pad(x, (0, 0, 0, pad))
        counts = torch.full((nb,), float(L), device=x.device, dtype=x.dtype)
        counts[-1] = L - pad
        emb = self.embed(xp.view(b, nb, L, c).sum(2) / counts.view(1, -1, 1))
        q, k, v = self.block_attn.split(emb)
        g = self.block_attn.merge(attention(q, k, v, pattern=P.causal() if self.causal else None))
        if not self.causal:
            return g
        return torch.cat([self.start.expand(b, 1, c), g[:, :-1]], dim=1)  # block b sees blocks < b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.dim)
        b, n, c = x.shape
        if n == 0:  # no tokens: an empty output (no block to summarise)
            return x.new_zeros(x.shape)
        L = self.block_size
        nb = -(-n // L)
        pad = nb * L - n
        ctx = self._context(x)  # [b, nb, c]
        tokens = torch.cat([ctx.unsqueeze(2), F.pad(x, (0, 0, 0, pad)).view(b, nb, L, c)], dim=2)  # [b,nb,L+1,c]
        flat = tokens.view(b * nb, L + 1, c)
        q, k, v = self.token_attn.split(flat)
        valid = torch.ones(nb, L + 1, dtype=torch.bool, device=x.device)
        if pad:
            valid[-1, L + 1 - pad:] = False
        vmask = valid.repeat(b, 1)  # [b * nb, L + 1]

        def fn(bi, h, qi, ki):
            ok = vmask.to(ki.device)[bi, ki]
            return ok & (ki <= qi) if self.causal else ok

        o = self.token_attn.merge(attention(q, k, v, pattern=P.custom(fn, head_dependent=False)))
        return o.view(b, nb, L + 1, c)[:, :, 1:].reshape(b, nb * L, c)[:, :n]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Block by block: block ``i`` attends (softmax, materialised) over ``[context_i; block_i]``."""
        _check_x(x, self.dim)
        ctx = self._context(x)
        outs = []
        for i, s in enumerate(range(0, x.shape[1], self.block_size)):
            seq = torch.cat([ctx[:, i:i + 1], x[:, s:s + self.block_size]], dim=1)
            q, k, v = self.token_attn.split(seq)
            sc = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if self.causal:
                m = seq.shape[1]
                sc = sc.masked_fill(torch.ones(m, m, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            outs.append(self.token_attn.merge(torch.softmax(sc, -1) @ v)[:, 1:])
        return torch.cat(outs, dim=1)


class RecurrentAttentionMixer(nn.Module):
    """RAN: windowed self-attention with a recurrent Global Perception Cell token (see the module docstring).
    Windows are bidirectional, so there is no causal form.

    Window ``t`` attends over ``[c_{t-1}; x_window]``; the cell's own output updates it, ``c_t = LayerNorm(c_{t-1}
    + o_cell)``, and ``c_{t-1}`` is a key/value of every token of window ``t``.

    ``forward`` runs the parallel form: the recurrence only needs each window's cell row, an O(window d)
    attention of one query, so the cells are computed first (sequentially, O(n d) in all) and then every
    window's token rows in one batched attention (the O(n window d) bulk, parallel over windows). The paper's
    claim that RAN's recurrence still allows parallel processing rests on this split.

    ``memory_review=True`` (the paper's default; Li et al. 2023, Sec. 3, "memory review"): the token outputs
    attend over the memory of every window's cell output ``[c_1 .. c_T]`` (so early tokens see the whole
    document), with a residual through a gated linear unit of the projected query and a LayerNorm:
    ``y = LN(W_o softmax(Q C_k^T / sqrt(d)) C_v + GLU(Q))``, ``Q = Y W_q``. Not carried over from the paper:
    the per-window rotary positions and the input/cell normalisations of the authors' layer. ``last_gpc``:
    the final cell ``[batch, dim]``, the document representation."""

    def __init__(self, dim: int, num_heads: int = 2, window: int = 16, causal: bool = False,
                 memory_review: bool = True):
        super().__init__()
        if causal:
            raise ValueError("RecurrentAttentionMixer has no causal form: its windows are bidirectional (RAN, "
                             "Sec. 3)")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.dim, self.window, self.memory_review = dim, window, bool(memory_review)
        self.attn = _Heads(dim, num_heads)
        self.gpc0 = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim)
        if self.memory_review:
            self.review_q = nn.Linear(dim, dim)
            self.review_kv = nn.Linear(dim, 2 * dim)
            self.review_o = nn.Linear(dim, dim)
            self.review_glu = nn.Linear(dim, 2 * dim)
            self.review_norm = nn.LayerNorm(dim)

    def _review(self, y: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Memory review: ``y [b, n, d]`` attends over ``cells [b, T, d]`` (materialised: T is n / window)."""
        q = self.review_q(y)
        k, v = self.review_kv(cells).chunk(2, dim=-1)
        a = torch.softmax((q @ k.transpose(-1, -2)) * self.dim ** -0.5, dim=-1)
        lin, gate = self.review_glu(q).chunk(2, dim=-1)
        return self.review_norm(self.review_o(a @ v) + lin * torch.sigmoid(gate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.dim)
        b, n, c = x.shape
        w, h = self.window, self.attn.h
        nw = -(-n // w)
        q, k, v = self.attn.split(x)  # every token's projections at once: [b, h, n, dh]
        gpc = self.gpc0.expand(b, -1)
        cell_kv, cells = [], []
        for t in range(nw):  # the recurrence: one query row per window
            qc, kc, vc = self.attn.split(gpc[:, None])
            keys = torch.cat([kc, k[:, :, t * w:(t + 1) * w]], dim=2)
            vals = torch.cat([vc, v[:, :, t * w:(t + 1) * w]], dim=2)
            cell_kv.append((kc, vc))
            gpc = self.norm(gpc + self.attn.merge(attention(qc, keys, vals))[:, 0])
            cells.append(gpc)
        self.last_gpc = gpc  # the document representation
        # every full window's token rows in one batched attention over [c_{t-1}; window t]; a shorter last window
        # in a call of its own
        full = n // w
        parts = []
        if full:
            def windows(t_):
                return t_[:, :, :full * w].reshape(b, h, full, w, -1).transpose(1, 2).reshape(b * full, h, w, -1)

            kc = torch.stack([p_[0] for p_ in cell_kv[:full]], 1).reshape(b * full, h, 1, -1)
            vc = torch.stack([p_[1] for p_ in cell_kv[:full]], 1).reshape(b * full, h, 1, -1)
            o = attention(windows(q), torch.cat([kc, windows(k)], 2), torch.cat([vc, windows(v)], 2))
            parts.append(o.reshape(b, full, h, w, -1).transpose(1, 2).reshape(b, h, full * w, -1))
        if n > full * w:
            kc, vc = cell_kv[-1]
            s0 = full * w
            parts.append(attention(q[:, :, s0:], torch.cat([kc, k[:, :, s0:]], 2), torch.cat([vc, v[:, :, s0:]], 2)))
        o = torch.cat(parts, dim=2)
        y = self.attn.merge(o)
        return self._review(y, torch.stack(cells, 1)) if self.memory_review else y

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The recurrence as written: window by window, each window's attention materialised over ``[cell;
        window]``, then the memory review."""
        _check_x(x, self.dim)
        gpc = self.gpc0.expand(x.shape[0], -1)
        outs, cells = [], []
        for s in range(0, x.shape[1], self.window):
            seq = torch.cat([gpc.unsqueeze(1), x[:, s:s + self.window]], dim=1)
            q, k, v = self.attn.split(seq)
            o = self.attn.merge(torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1) @ v)
            gpc = self.norm(gpc + o[:, 0])
            outs.append(o[:, 1:])
            cells.append(gpc)
        y = torch.cat(outs, dim=1)
        return self._review(y, torch.stack(cells, 1)) if self.memory_review else y


class TokenTypeMixer(nn.Module):
    """NAtS attention with learned token types (see the module docstring). ``types(x)`` gives the hard types
    ``[batch, seq]`` (0 Global, 1 Local, 2 Sliding) used at inference to evict KV entries."""

    def __init__(self, dim: int, num_heads: int = 2, window: int = 8, causal: bool = True, tau: float = 1.0):
        super().__init__()
        if not causal:
            raise ValueError("TokenTypeMixer is causal only: NAtS's types decide which past KV entries survive")
        self.dim, self.window, self.tau = dim, window, tau
        self.attn = _Heads(dim, num_heads)
        self.scorer = nn.Linear(dim, 3)

    def types(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer(x).argmax(-1)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, seq]`` float mask; hard in eval, straight-through Gumbel-softmax in training (the mask
        is linear in the one-hot types, so gradients reach the scorer)."""
        logits = self.scorer(x)
        if self.training:
            onehot = F.gumbel_softmax(logits, tau=self.tau, hard=True)
        else:
            onehot = F.one_hot(logits.argmax(-1), 3).to(x.dtype)
        masks = torch.stack([token_type_mask(torch.full(x.shape[:2], t, device=x.device), self.window)
                             for t in range(3)], dim=-1).to(x.dtype)  # [b, i, j, type]: visible if j had type
        # rows of a Local key depend on the Global tokens between: evaluate with the hard types for that rule
        hard = token_type_mask(logits.argmax(-1), self.window).to(x.dtype)
        soft = (masks * onehot.unsqueeze(1)).sum(-1)  # [b, i, j]
        return soft + (hard - soft).detach()

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """``x [batch, seq, dim] -> [batch, seq, dim]``. ``cache``: a :class:`~attnkit.selective_cache.
        TokenTypeKVCache` (eval only): the first call prefills, later calls decode the new tokens; entries are evicted
        as their types allow, and the output equals the full call's rows."""
        _check_x(x, self.dim)
        q, k, v = self.attn.split(x)
        if cache is not None:
            if self.training:
                raise ValueError("TokenTypeMixer decodes with a cache in eval mode only (hard types); call .eval()")
            if getattr(cache, "window", None) != self.window or not hasattr(cache, "held_positions"):
                raise ValueError(f"cache must be TokenTypeKVCache(window={self.window}) (the mixer's window), got "
                                 f"{cache!r}")
            return self.attn.merge(cache.attend(q, k, v, types=self.types(x)))
        if not self.training:  # hard types: exact masked attention, tiled (no n x n matrix)
            types = self.types(x)
            w = self.window
            glob = (types == 0).to(torch.long)
            count = glob.cumsum(-1)

            def fn(b, h, qi, ki):
                t = types.to(ki.device)[b, ki]
                c = count.to(ki.device)
                global_between = (c[b, qi] - glob.to(ki.device)[b, qi] - c[b, ki]) > 0
                return token_type_rule(t, global_between, qi, ki, w)

            return self.attn.merge(attention(q, k, v, pattern=P.custom(fn, head_dependent=False)))
        # training: the relaxed mask is a dense [batch, n, n] matrix (short training sequences only)
        m = self._mask(x)  # [b, n, n] in {0, 1} (values), differentiable
        sc = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        sc = sc + torch.log(m.unsqueeze(1).clamp_min(1e-30))  # log 0 -> a very negative bias: masked
        return self.attn.merge(torch.softmax(sc, -1) @ v)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Row by row: query ``i`` attends to the keys its NAtS mask keeps (hard types)."""
        _check_x(x, self.dim)
        q, k, v = self.attn.split(x)
        m = token_type_mask(self.types(x), self.window)  # [b, n, n]
        out = torch.zeros_like(q)
        for i in range(x.shape[1]):
            sc = (q[:, :, i:i + 1] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            sc = sc.masked_fill(~m[:, None, i:i + 1], float("-inf"))
            out[:, :, i:i + 1] = torch.softmax(sc, -1) @ v
        return self.attn.merge(out)
