"""Chunked mode: causal linear attention as intra-chunk quadratic products plus an inter-chunk state
(Lightning Attention-2, Qin et al. 2024; the "chunkwise" form of GLA/RetNet), organised for batched matmuls.

With chunks of ``c`` tokens, ``Q_t, K_t`` the features and ``V_t`` the values (with a column of ones that
carries the denominator) of chunk ``t``, ``lambda`` the decay:

    O_t = [(Q_t K_t^T) * D] V_t + Lambda Q_t S_{t-1},      D_ij = lambda^(i-j) [j <= i],  Lambda = diag(lambda^(i+1))
    S_t = lambda^c S_{t-1} + (Gamma K_t)^T V_t,            Gamma = diag(lambda^(c-1-j))

The sequence is cut into blocks of several chunks that fit in cache. Per block, five batched matmuls cover all
chunks of all heads at once: ``Q K^T``, ``A V``, the per-chunk ``K^T V``, the exclusive prefix over chunks (a
matmul with a small lower-triangular matrix holding ``lambda^(c (t-1-s))``) and ``Q S``; the carried state
enters as the prefix's initial term. Blocks run in sequence, so memory is linear in tokens and no state per
chunk of the whole sequence is ever materialised.

Without decay and without gradients a faster path runs head by head on contiguous chunk views and forms the
prefix by an in-place cumulative sum (see ``_plain_forward``).

FLOPs (matmuls, per batch x head): ``2 n c (m + d_v + 1)`` intra-chunk plus ``4 n m (d_v + 1)`` for the state
(``m`` features, ``d_v + 1`` value columns), plus, with decay, ``2 n nb m (d_v + 1)`` for the in-block prefix
matmul with ``nb`` chunks per block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.feature_maps import CosformerFeatureMap, FeatureMap, _RandomFeatureMap
from attnkit.ops.linear._common import decay_powers, features, values_with_ones

__all__ = ["chunked_forward", "chunked_flops", "BLOCK_TOKENS"]

# Tokens per block: a block's q/k/v features and chunk products should stay in cache (about 1-2 MB per head).
BLOCK_TOKENS = 1024
# Accelerators: bytes of intermediates one block may take (blocks as long as this allows, fewer launches), and
# the block length with decay (its in-block prefix is a matmul quadratic in chunks per block).
DEVICE_BLOCK_BYTES = 1 << 30
DEVICE_DECAY_BLOCK = 4096
# Fast path: compute features head by head right before their matmuls (parameter-free maps), so they are read
# from cache; off, features of all heads of a block are computed at once.
PER_HEAD_FEATURES = True


def chunked_flops(n: int, m: int, dv: int, chunk_size: int, *, decay: bool = False) -> float:
    """Matmul FLOPs of the chunked forward for one (batch, head) at ``n`` tokens (see module docstring):
    ``Q K^T`` and ``A [V, 1]`` within chunks, ``K^T [V, 1]`` per chunk and ``Q S`` for the carried state; with
    ``decay`` also the in-block prefix matmul (without decay the prefix is a cumulative sum, not a matmul)."""
    c = min(chunk_size, n)
    flops = 2.0 * n * c * (m + dv + 1) + 4.0 * n * m * (dv + 1)
    if decay:
        flops += 2.0 * n * max(1, BLOCK_TOKENS // c) * m * (dv + 1)
    return flops


def chunked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fm: FeatureMap, *,
                    log_decay: torch.Tensor | None, s0: torch.Tensor | None, offset: int, chunk_size: int,
                    finalize: Callable[[torch.Tensor], torch.Tensor],
                    block_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [b, h, n, d]``, ``k, v [b, h_kv, n, *]``, ``s0 [b, h, m, d_v + 1]`` or None, ``log_decay [h]`` or
    None. Returns ``out [b, h, n, d_v]`` (through ``finalize``) and the extended state ``[b, h, m, d_v + 1]``."""
    # The head-by-head path trades kernel launches for cache locality: a CPU choice; accelerators batch heads.
    if log_decay is None and q.device.type == "cpu" and not _needs_grad(q, k, v, fm):
        return _plain_forward(q, k, v, fm, s0=s0, offset=offset, chunk_size=chunk_size, finalize=finalize,
                              block_tokens=block_tokens)
    return _batched_forward(q, k, v, fm, log_decay=log_decay, s0=s0, offset=offset, chunk_size=chunk_size,
                            finalize=finalize, block_tokens=block_tokens)


def _needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fm: FeatureMap) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in (q, k, v)) or any(p.requires_grad for p in fm.parameters())


def _per_head_features_ok(fm: FeatureMap) -> bool:
    """Whether ``fm.phi`` of one head's slice equals that head's part of ``fm(q, k)``: token-local maps without
    per-head parameters, random projections (which count calls to redraw) or a joint ``forward``."""
    if not fm.token_local or isinstance(fm, _RandomFeatureMap) or next(fm.parameters(), None) is not None:
        return False
    return type(fm).forward is FeatureMap.forward or isinstance(fm, CosformerFeatureMap)


def _plain_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fm: FeatureMap, *, s0: torch.Tensor | None,
                   offset: int, chunk_size: int, finalize: Callable[..., torch.Tensor],
                   block_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """No decay, no gradients (inference). Per block of tokens and head by head: the head's features (computed
    right there for parameter-free maps, so they are still in cache; else for all heads of the block at once),
    four matmuls over the block's chunks on contiguous views into reused workspaces (``K^T [V, 1]``,
    ``Q K^T`` masked by a multiply, ``A [V, 1]``, ``Q S``), the exclusive prefix of the chunk states as an
    in-place cumulative sum that starts from the carried state (no state per chunk beyond the block), and the
    normalised output written straight into the result. Grouped-query keys and values are read from their kv
    head, never repeated."""
    b, h, n, _ = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    group = h // hk
    dv1 = dv + 1
    c = max(1, min(chunk_size, n))
    # One head at a time holds a block: twice the batched path's tokens for 64 features (measured best on
    # 2 threads at 8K-64K tokens), fewer for wide maps so a head's block stays about the same size in cache.
    base = 2 * (block_tokens or BLOCK_TOKENS)
    wide = base * 64 // max(64, fm.feature_dim(q.shape[-1]))
    block = c * max(1, min(base, wide) // c)
    full = None
    if not fm.token_local:  # features depend on the whole call (e.g. log-normal statistics): compute once
        full = fm(q, k, q_offset=offset, k_offset=offset)
    per_head = PER_HEAD_FEATURES and _per_head_features_ok(fm)
    out = torch.empty(b, h, n, dv, dtype=getattr(finalize, "dtype", q.dtype), device=q.device)
    state = None if s0 is None else s0.clone()  # [b, h, m, d_v + 1], updated head by head
    for start in range(0, n, block):
        end = min(start + block, n)
        L = end - start
        nb = -(-L // c)
        pad = nb * c - L  # zero features for the padding: they add nothing; padded rows are not written out
        if per_head:  # computed head by head below, right before use (in cache)
            m = fm.feature_dim(q.shape[-1])
        else:
            if full is None:
                pq, pk = fm(q[:, :, start:end], k[:, :, start:end], q_offset=offset + start,
                            k_offset=offset + start)
            else:
                pq, pk = full[0][:, :, start:end], full[1][:, :, start:end]
            m = pq.shape[-1]
            if pad:
                pq, pk = F.pad(pq, (0, 0, 0, pad)), F.pad(pk, (0, 0, 0, pad))
            pq, pk = pq.contiguous(), pk.contiguous()
        if state is None:
            state = q.new_zeros(b, h, m, dv1)
            first = True
        else:
            first = False
        # [V, 1] for one kv head: the ones column carries the denominator through the same matmuls.
        # Workspaces reused by every head of the block (fresh large allocations cost page faults).
        v1 = q.new_zeros(nb * c, dv1)
        v1[:, dv] = 1
        a_buf = q.new_empty(nb, c, c)
        o_buf = q.new_empty(nb, c, dv1)
        kv_buf = q.new_empty(nb, m, dv1)
        mask = torch.ones(c, c, dtype=q.dtype, device=q.device).tril_()  # mul_ by a mask: tril_ is slow batched
        for bi in range(b):
            for hj in range(hk):
                v1[:L, :dv].copy_(v[bi, hj, start:end])
                V = v1.view(nb, c, dv1)
                if per_head:
                    kf = fm.phi(k[bi:bi + 1, hj:hj + 1, start:end], is_query=False, offset=offset + start)[0, 0]
                    K = (F.pad(kf, (0, 0, 0, pad)) if pad else kf.contiguous()).view(nb, c, m)
                else:
                    K = pk[bi, hj].view(nb, c, m)
                Kt = K.transpose(1, 2)
                kv = torch.bmm(Kt, V, out=kv_buf)  # [nb, m, d_v + 1]: per-chunk state increments
                heads = range(hj * group, (hj + 1) * group)
                fold = group == 1  # one query head per kv head: fold the carried state into the prefix
                if fold:
                    s = state[bi, hj * group]
                    if not first:
                        kv[0].add_(s)
                    if nb > 1:
                        kv[:-1].cumsum_(0)  # kv[t] = state before the block + increments of chunks 0..t
                elif nb > 1:
                    kv[:-1].cumsum_(0)  # increments of chunks 0..t (the carried state is added per head)
                for hi in heads:
                    if per_head:
                        qf = fm.phi(q[bi:bi + 1, hi:hi + 1, start:end], is_query=True, offset=offset + start)[0, 0]
                        Q = (F.pad(qf, (0, 0, 0, pad)) if pad else qf.contiguous()).view(nb, c, m)
                    else:
                        Q = pq[bi, hi].view(nb, c, m)
                    o = torch.bmm(Q, Kt, out=a_buf).mul_(mask)  # [nb, c, c]: intra-chunk weights, causal
                    o = torch.bmm(o, V, out=o_buf)  # [nb, c, d_v + 1]
                    s = state[bi, hi]
                    if fold:
                        if not first:
                            o[0].addmm_(Q[0], s)  # chunk 0: the state before the block
                        if nb > 1:
                            o[1:].baddbmm_(Q[1:], kv[:-1])  # later chunks: that state plus earlier chunks
                            s.copy_(kv[-2]).add_(kv[-1])
                        else:
                            s.copy_(kv[0])
                    else:
                        if not first:
                            o.view(nb * c, dv1).addmm_(Q.view(nb * c, m), s)  # the state before the block
                        if nb > 1:
                            o[1:].baddbmm_(Q[1:], kv[:-1])  # the block's earlier chunks
                            s.add_(kv[-2])
                        s.add_(kv[-1])
                    finalize(o.view(nb * c, dv1)[:L], out=out[bi, hi, start:end])
    return out, state


def _batched_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fm: FeatureMap, *,
                     log_decay: torch.Tensor | None, s0: torch.Tensor | None, offset: int, chunk_size: int,
                     finalize: Callable[[torch.Tensor], torch.Tensor],
                     block_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay: all heads of a block batched; the exclusive prefix over chunks is a matmul with a decayed
    lower-triangular matrix."""
    b, h, n, _ = q.shape
    dv1 = v.shape[-1] + 1
    B = b * h
    c = max(1, min(chunk_size, n))
    if block_tokens is None:
        # CPU: blocks that stay in cache. Accelerators: as few blocks as memory allows (each block is ~15 kernel
        # launches; at 16K tokens 1K-token blocks were 16x the launches of one). With decay the in-block prefix
        # is an nb x nb matmul, so blocks stay at DEVICE_DECAY_BLOCK tokens.
        if q.device.type == "cpu":
            block_tokens = BLOCK_TOKENS
        else:
            per_token = B * (c + 2 * (q.shape[-1] + dv1)) * 4 + B * q.shape[-1] * dv1 * 4 // c
            block_tokens = max(BLOCK_TOKENS, min(n, DEVICE_BLOCK_BYTES // max(1, per_token)))
            if log_decay is not None:
                block_tokens = min(block_tokens, DEVICE_DECAY_BLOCK)
    block = c * max(1, block_tokens // c)
    ld = None if log_decay is None else log_decay.repeat(b)  # [B], row r = (batch r // h, head r % h)

    full = None
    if not fm.token_local:  # features depend on the whole call (e.g. log-normal statistics): compute once
        full = features(fm, q, k, offset, offset)
    # Blocks as one split per tensor: slicing each block out of the whole tensor made autograd add a gradient
    # of the whole tensor's size per block (quadratic backward: 16K tokens took 9.6x the time of 4K).
    qs, ks, vs = (t.split(block, dim=2) for t in (q, k, v))
    fqs = fks = None
    if full is not None:
        fqs, fks = full[0].split(block, dim=2), full[1].split(block, dim=2)

    # Decay tables that depend only on the chunk size: intra-chunk D [B, c, c], query weights [B, c].
    if ld is not None:
        i = torch.arange(c, device=q.device)
        d_intra = decay_powers(ld, (i[:, None] - i[None, :]).clamp_min(0)).tril()
        q_w = decay_powers(ld, i + 1)[..., None]  # Lambda: decay^(i+1)

    s = None if s0 is None else s0.reshape(B, -1, dv1)
    outs = []
    for j, start in enumerate(range(0, n, block)):
        end = min(start + block, n)
        L = end - start
        if full is None:
            pq, pk = features(fm, qs[j], ks[j], offset + start, offset + start)
        else:
            pq, pk = fqs[j], fks[j]
        m = pq.shape[-1]
        v1 = values_with_ones(vs[j], h)
        pq, pk, v1 = (t.reshape(B, L, t.shape[-1]) for t in (pq, pk, v1))
        nb = -(-L // c)
        pad = nb * c - L
        if pad:  # zero features contribute nothing; padded rows are dropped below
            pq, pk, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (pq, pk, v1))
        Q = pq.reshape(B * nb, c, m)
        K = pk.reshape(B * nb, c, m)
        V = v1.reshape(B * nb, c, dv1)

        a = torch.bmm(Q, K.transpose(1, 2))  # [B nb, c, c]
        if ld is None:
            a = a.tril_()
        else:
            a = a.view(B, nb, c, c).mul_(d_intra[:, None]).view(B * nb, c, c)
        o = torch.bmm(a, V)  # [B nb, c, d_v + 1]

        if ld is not None:
            # Gamma: decay from each key to the end of its chunk (the last chunk may be short).
            p = torch.arange(nb * c, device=q.device)
            chunk_end = torch.clamp((p // c + 1) * c, max=L)
            K = K * decay_powers(ld, (chunk_end - 1 - p).clamp_min(0)).view(B * nb, c, 1)
        kv = torch.bmm(K.transpose(1, 2), V).view(B, nb, m * dv1)  # per-chunk increments

        # Exclusive prefix over the block's chunks (plus the carried state): the state before each chunk.
        if nb > 1:
            t_idx = torch.arange(nb, device=q.device)
            if ld is None:
                # no decay: the exclusive prefix is a cumulative sum (O(nb) work, not an nb x nb matmul)
                prev = torch.cat([kv.new_zeros(B, 1, kv.shape[-1]), kv[:, :-1].cumsum(1)], dim=1)
            else:
                tri = decay_powers(ld, (c * (t_idx[:, None] - 1 - t_idx[None, :])).clamp_min(0))
                tri = tri * torch.ones(nb, nb, dtype=kv.dtype, device=q.device).tril_(-1)
                prev = torch.matmul(tri, kv)  # [B, nb, m (d_v + 1)]
            if s is not None:
                w = None if ld is None else decay_powers(ld, c * t_idx)[..., None]
                prev = prev + (s.reshape(B, 1, -1) if w is None else w * s.reshape(B, 1, -1))
        else:
            prev = s.reshape(B, 1, -1) if s is not None else None

        if prev is not None:
            qd = Q if ld is None else (Q.view(B, nb, c, m) * q_w[:, None]).view(B * nb, c, m)
            o = o.baddbmm_(qd, prev.reshape(B * nb, m, dv1))
        # State after the block's last real token: decay the state before the last chunk by its length.
        r = L - (nb - 1) * c
        last_prev = prev[:, -1] if prev is not None else 0
        if ld is not None and prev is not None:
            last_prev = decay_powers(ld, torch.tensor(r, device=q.device))[:, None] * last_prev
        s = (kv[:, -1] + last_prev).reshape(B, m, dv1)
        outs.append(finalize(o.view(B, nb * c, dv1)[:, :L]))

    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return out.reshape(b, h, n, -1), s.reshape(b, h, -1, dv1)
