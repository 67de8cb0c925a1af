"""Diagnostics computed from attention matrices (CATALOGUE-FULL.md section H).

Attention arguments are probabilities ``[batch, heads, q_len, kv_len]`` (rows summing to 1, or 0 for masked
rows); a list of them, one per layer in forward order, for the diagnostics that compose layers.

- :func:`rollout`, :func:`attention_flow`: Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (2020),
  Sec. 3: ``A~_l = r I + (1 - r) mean_h A_l`` (rows renormalised), rollout ``R = A~_L ... A~_1``; flow is the
  max-flow through the layer graph whose edge capacities are the ``A~_l`` entries.
- :func:`relevance`: Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization" (2021),
  Eq. 13-14 with the gradient-weighted attention ``E_h[(grad A * A)^+]`` as the relevance of ``A`` (the rule of
  their follow-up "Generic Attention-model Explainability", Eq. 5-6): ``R <- R + A_bar R`` from ``R = I``.
- :func:`entropy`, :func:`head_entropy`: ``H_i = -sum_j a_ij log a_ij`` (Clark et al., "What Does BERT Look
  At?", Sec. 3; "Attention Entropy is a Key Factor", Sec. 3).
- :func:`attention_distance`, :func:`distance_histogram`, :func:`offset_head_score`: mean attention distance per
  head and offset-local heads ("Teaching Matters", Sec. 4), attention-against-distance histograms ("How Does
  Attention Work in Vision Transformers?").
- :func:`special_token_attention`, :func:`offset_attention`, :func:`head_distances`, :func:`cluster_heads`:
  Clark et al. Sec. 3-6 (attention to [CLS]/[SEP], to fixed offsets; Jensen-Shannon distance between heads).
- :func:`token_residual`, :func:`relative_residual`: Dong, Cordonnier & Loukas, "Attention is Not All You Need:
  Pure Attention Loses Rank Doubly Exponentially with Depth" (2021), Eq. 2: ``res(X) = X - 1 x^T`` with
  ``x = argmin ||X - 1 x^T||`` (the column mean in the Frobenius norm).
- :func:`joint_qk_embedding`: AttentionViz (Yeh et al. 2023), Sec. 4.1: keys translated onto the query centroid
  and ``q * c``, ``k / c`` scaled to equal mean norms (both leave softmax attention unchanged), then projected
  jointly (PCA; t-SNE / UMAP when scikit-learn / umap-learn is installed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["rollout", "attention_flow", "relevance", "entropy", "head_entropy", "attention_distance",
           "distance_histogram", "offset_head_score", "special_token_attention", "offset_attention",
           "js_distance", "head_distances", "cluster_heads", "token_residual", "relative_residual",
           "joint_qk_embedding", "grid_positions"]


def _check_attention(a: torch.Tensor, name: str = "attention") -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor [batch, heads, q_len, kv_len], got {type(a).__name__}")
    if a.dim() == 3:
        a = a.unsqueeze(0)
    if a.dim() != 4:
        raise ValueError(f"{name} must be [batch, heads, q_len, kv_len] (or [heads, q_len, kv_len]), "
                         f"got shape {tuple(a.shape)}")
    return a


def _square_layers(attentions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(attentions, torch.Tensor):
        attentions = [attentions]
    if not len(attentions):
        raise ValueError("attentions must hold at least one layer's [batch, heads, n, n] matrix")
    out = [_check_attention(a, f"attentions[{i}]") for i, a in enumerate(attentions)]
    n = out[0].shape[-1]
    for i, a in enumerate(out):
        if a.shape[-2:] != (n, n) or a.shape[0] != out[0].shape[0]:
            raise ValueError(f"attentions[{i}] has shape {tuple(a.shape)}; composing layers needs square "
                             f"[batch, heads, {n}, {n}] self-attention matrices of one batch size")
    return out


def _reduce_heads(a: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return a.mean(dim=1)
    if how == "max":
        return a.amax(dim=1)
    if how == "min":
        return a.amin(dim=1)
    raise ValueError(f"head_reduce must be 'mean', 'max' or 'min', got {how!r}")


def _with_residual(a: torch.Tensor, residual: float, head_reduce: str) -> torch.Tensor:
    """``r I + (1 - r) A_bar`` with rows renormalised: ``[batch, n, n]`` in float64."""
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1] (the weight of the skip connection), got {residual}")
    a_bar = _reduce_heads(a.detach().to(torch.float64), head_reduce)
    eye = torch.eye(a.shape[-1], dtype=torch.float64, device=a.device)
    m = residual * eye + (1.0 - residual) * a_bar
    return m / m.sum(dim=-1, keepdim=True).clamp_min(1e-300)


def rollout(attentions: Sequence[torch.Tensor], *, residual: float = 0.5, head_reduce: str = "mean") -> torch.Tensor:
    """Attention rollout ``R = A~_L ... A~_1`` ``[batch, n, n]`` (float64): ``R[b, i, j]`` is how much output token
    ``i`` of the last layer draws on input token ``j``. ``attentions``: per layer ``[batch, heads, n, n]``, first
    layer first. Rows of ``R`` sum to 1."""
    layers = _square_layers(attentions)
    r = None
    for a in layers:
        m = _with_residual(a, residual, head_reduce)
        r = m if r is None else torch.matmul(m, r)
    return r


def attention_flow(attentions: Sequence[torch.Tensor], *, residual: float = 0.5, head_reduce: str = "mean",
                   outputs: Sequence[int] | None = None, batch_index: int = 0,
                   progress: bool = False) -> torch.Tensor:
    """Attention flow ``[len(outputs), n]``: the max-flow from input token ``j`` to output token ``i`` through the
    layer graph (nodes ``(layer, token)``, edge ``(l-1, j) -> (l, i)`` of capacity ``A~_l[i, j]``).

    Needs networkx (``pip install attnkit[analysis]``). ``L * n^2`` edges and one max-flow per (output, input)
    pair: meant for the few output tokens you ask for (``outputs``, default all) of short sequences.
    """
    try:
        import networkx as nx
    except ImportError as e:  # pragma: no cover - networkx is in the dev and analysis extras
        raise ImportError("attention_flow needs networkx: pip install 'attnkit[analysis]'") from e
    layers = _square_layers(attentions)
    mats = [_with_residual(a[batch_index:batch_index + 1], residual, head_reduce)[0] for a in layers]
    n, depth = mats[0].shape[-1], len(mats)
    graph = nx.DiGraph()
    for l, m in enumerate(mats, start=1):
        cap = m.cpu().tolist()
        for i in range(n):
            for j in range(n):
                if cap[i][j] > 0:
                    graph.add_edge((l - 1, j), (l, i), capacity=cap[i][j])
    outputs = list(range(n)) if outputs is None else [int(o) % n for o in outputs]
    result = torch.zeros(len(outputs), n, dtype=torch.float64)
    pairs = [(r, i, j) for r, i in enumerate(outputs) for j in range(n)]
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="attention flow", unit="pair")
    for r, i, j in pairs:
        src, dst = (0, j), (depth, i)
        if src in graph and dst in graph:
            result[r, j] = nx.maximum_flow_value(graph, src, dst)
    return result


def relevance(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Chefer et al.'s relevance map ``[batch, n, n]`` (float64): from ``R = I``, for each layer in forward
    order ``R <- R + E_h[(grad A * A)^+] R``. ``gradients[l]`` is ``d score / d A_l`` of the class score being
    explained (``attnkit.analysis.capture(model, grad=True)`` gives both); None counts as zero. Row ``i`` says
    which input tokens support the prediction at token ``i`` (the [CLS] row for a classifier)."""
    layers = _square_layers(attentions)
    if len(gradients) != len(layers):
        raise ValueError(f"gradients has {len(gradients)} entries for {len(layers)} attention layers")
    b, _, n, _ = layers[0].shape
    r = torch.eye(n, dtype=torch.float64, device=layers[0].device).expand(b, n, n).clone()
    for a, g in zip(layers, gradients):
        if g is None:
            continue
        g = _check_attention(g, "gradient")
        if g.shape != a.shape:
            raise ValueError(f"a gradient of shape {tuple(g.shape)} for attention of shape {tuple(a.shape)}")
        a_bar = (g.detach().double() * a.detach().double()).clamp_min(0).mean(dim=1)
        r = r + torch.matmul(a_bar, r)
    return r


def entropy(attention: torch.Tensor) -> torch.Tensor:
    """Entropy of each attention row, ``-sum_j a_ij log a_ij`` in nats (``0 log 0 = 0``): ``[..., q_len]``.
    Uniform attention over ``n`` keys gives ``log n``; one-hot gives 0."""
    a = attention.detach().to(torch.float64)
    return -torch.special.xlogy(a, a).sum(dim=-1)


def head_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Mean row entropy per head ``[heads]`` (averaged over batch and queries; rows that are all zero, i.e.
    fully masked, are left out)."""
    a = _check_attention(attention)
    ent = entropy(a)  # [b, h, q]
    valid = (a.detach().sum(dim=-1) > 0).to(torch.float64)
    return (ent * valid).sum(dim=(0, 2)) / valid.sum(dim=(0, 2)).clamp_min(1)


def grid_positions(shape: Sequence[int], device=None) -> torch.Tensor:
    """Row-major coordinates ``[prod(shape), len(shape)]`` of a grid of tokens (image patches: ``(h, w)``)."""
    axes = [torch.arange(s, dtype=torch.float64, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def _distances(q_len: int, kv_len: int, positions: torch.Tensor | None, q_positions: torch.Tensor | None,
               device) -> torch.Tensor:
    """``[q_len, kv_len]`` Euclidean distances between query and key positions (1-D indices by default, queries
    bottom-right aligned as in ``attnkit.attention``)."""
    if positions is None:
        positions = torch.arange(kv_len, dtype=torch.float64, device=device).unsqueeze(-1)
    positions = positions.to(device=device, dtype=torch.float64)
    if positions.dim() == 1:
        positions = positions.unsqueeze(-1)
    if positions.shape[0] != kv_len:
        raise ValueError(f"positions must give one coordinate row per key ({kv_len}), got {tuple(positions.shape)}")
    if q_positions is None:
        q_positions = positions[kv_len - q_len:]
    q_positions = q_positions.to(device=device, dtype=torch.float64)
    if q_positions.dim() == 1:
        q_positions = q_positions.unsqueeze(-1)
    return torch.cdist(q_positions, positions)


def attention_distance(attention: torch.Tensor, positions: torch.Tensor | None = None,
                       q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention distance per head ``[heads]``: ``mean_i sum_j a_ij ||p_i - p_j||`` ("Teaching Matters";
    ViT's "mean attention distance"). ``positions [kv_len, ndim]`` (e.g. :func:`grid_positions` of the patch
    grid; default token indices)."""
    a = _check_attention(attention).detach().to(torch.float64)
    dist = _distances(a.shape[2], a.shape[3], positions, q_positions, a.device)
    return (a * dist).sum(dim=-1).mean(dim=(0, 2))


def distance_histogram(attention: torch.Tensor, bins: int | Sequence[float] = 16,
                       positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass against query-key distance, per head: ``(hist [heads, bins], edges [bins + 1])``. Each query
    row distributes its mass (1, or 0 if masked) over the bins, so a head's histogram sums to its number of
    (unmasked) query rows times the batch."""
    a = _check_attention(attention).detach().to(torch.float64)
    dist = _distances(a.shape[2], a.shape[3], positions, None, a.device)
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        edges = torch.linspace(0.0, float(dist.max()) + 1e-9, bins + 1, dtype=torch.float64, device=a.device)
    else:
        edges = torch.as_tensor(list(bins), dtype=torch.float64, device=a.device)
    which = (torch.bucketize(dist, edges, right=True) - 1).clamp(0, edges.numel() - 2)  # [q, k]
    hist = torch.zeros(a.shape[1], edges.numel() - 1, dtype=torch.float64, device=a.device)
    mass = a.sum(dim=0).reshape(a.shape[1], -1)  # [heads, q * k], summed over the batch
    hist.index_add_(1, which.reshape(-1), mass)
    return hist, edges


def offset_head_score(attention: torch.Tensor, max_offset: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset-local heads ("Teaching Matters"): per head, ``max_{delta != 0} mean_i 1[argmax_j a_ij - i = delta]``
    over ``0 < |delta| <= max_offset``. Returns ``(score [heads], delta [heads])``; a head that always attends
    the token at a fixed offset scores 1."""
    a = _check_attention(attention).detach()
    q_len, kv_len = a.shape[2], a.shape[3]
    qpos = torch.arange(q_len, device=a.device) + (kv_len - q_len)
    offs = a.argmax(dim=-1) - qpos  # [b, h, q]
    deltas = [d for d in range(-max_offset, max_offset + 1) if d != 0]
    scores = torch.stack([(offs == d).to(torch.float64).mean(dim=(0, 2)) for d in deltas], dim=-1)  # [h, D]
    best, which = scores.max(dim=-1)
    return best, torch.tensor(deltas, device=a.device)[which]


def special_token_attention(attention: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Average attention mass per head on the keys flagged in ``token_mask [batch, kv_len]`` (e.g. [CLS], [SEP],
    punctuation: Clark et al. Fig. 2): ``[heads]``."""
    a = _check_attention(attention).detach().to(torch.float64)
    if token_mask.shape != (a.shape[0], a.shape[3]):
        raise ValueError(f"token_mask must be [batch, kv_len] = {(a.shape[0], a.shape[3])}, "
                         f"got {tuple(token_mask.shape)}")
    m = token_mask.to(device=a.device, dtype=torch.float64)[:, None, None, :]
    return (a * m).sum(dim=-1).mean(dim=(0, 2))


def offset_attention(attention: torch.Tensor, offset: int) -> torch.Tensor:
    """Average attention per head from token ``i`` to token ``i + offset`` (Clark et al.: previous / next token
    heads; ``offset=-1`` is the previous token): ``[heads]``, over the queries whose target exists."""
    a = _check_attention(attention).detach().to(torch.float64)
    q_len, kv_len = a.shape[2], a.shape[3]
    qpos = torch.arange(q_len, device=a.device) + (kv_len - q_len)
    tgt = qpos + offset
    ok = (tgt >= 0) & (tgt < kv_len)
    if not ok.any():
        return torch.zeros(a.shape[1], dtype=torch.float64)
    vals = a[:, :, ok.nonzero().squeeze(-1), tgt[ok]]  # [b, h, valid]
    return vals.mean(dim=(0, 2))


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance ``sqrt(JSD(p, q))`` (natural log) between distributions on the last axis."""
    p, q = p.to(torch.float64), q.to(torch.float64)
    m = 0.5 * (p + q)
    kl = lambda a, b: (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(dim=-1)  # noqa: E731
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0).sqrt()


def head_distances(attention: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise distance between heads ``[H, H]``: the Jensen-Shannon distance of their rows, averaged over rows
    and batch (Clark et al. Sec. 6). A list of per-layer tensors stacks every layer's heads (layer-major)."""
    if not isinstance(attention, torch.Tensor):
        attention = torch.cat([_check_attention(a) for a in attention], dim=1)
    a = _check_attention(attention).detach().to(torch.float64)
    h = a.shape[1]
    out = torch.zeros(h, h, dtype=torch.float64)
    for i in range(h):
        out[i] = js_distance(a[:, i:i + 1], a).mean(dim=(0, 2)).cpu()
    return 0.5 * (out + out.T)


def cluster_heads(distances: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Agglomerative (average-linkage) clustering of heads from :func:`head_distances`: a label per head
    ``[H]``. Uses scipy (``pip install attnkit[analysis]``)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    d = distances.detach().double().cpu()
    if d.dim() != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances must be a square [H, H] matrix, got {tuple(d.shape)}")
    if not 1 <= num_clusters <= d.shape[0]:
        raise ValueError(f"num_clusters must be in [1, {d.shape[0]}], got {num_clusters}")
    if d.shape[0] == 1:
        return torch.zeros(1, dtype=torch.long)
    z = linkage(squareform(d.fill_diagonal_(0).numpy(), checks=False), method="average")
    return torch.as_tensor(fcluster(z, num_clusters, criterion="maxclust") - 1, dtype=torch.long)


def token_residual(x: torch.Tensor) -> torch.Tensor:
    """``res(X) = X - 1 x^T`` with ``x`` the mean token (the Frobenius-optimal rank-1 ``1 x^T``): same shape as
    ``x [..., tokens, dim]``."""
    return x - x.mean(dim=-2, keepdim=True)


def relative_residual(x: torch.Tensor) -> torch.Tensor:
    """``||res(X)||_F / ||X||_F`` per leading index (``x [..., tokens, dim]``): 0 when every token is the same
    (rank collapse), up to 1. Dong et al.'s diagnostic of token uniformity."""
    x = x.detach().to(torch.float64)
    num = token_residual(x).flatten(-2).norm(dim=-1)
    return num / x.flatten(-2).norm(dim=-1).clamp_min(1e-300)


def joint_qk_embedding(q: torch.Tensor, k: torch.Tensor, *, dim: int = 2, method: str = "pca",
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionViz's joint embedding of queries ``q [n_q, d]`` and keys ``k [n_k, d]`` (one head; flatten
    batches first). Keys are translated so their centroid is the queries' (softmax is invariant to adding one
    vector to every key), then ``q * c`` and ``k / c`` with ``c = sqrt(mean |k| / mean |q|)`` (dot products
    unchanged) so both clouds have the same mean norm. Returns ``(q_2d [n_q, dim], k_2d [n_k, dim])``.

    ``method``: "pca" (torch), "tsne" (scikit-learn) or "umap" (umap-learn) when installed."""
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must be [n, d] with the same d, got {tuple(q.shape)} and {tuple(k.shape)}")
    q, k = q.detach().to(torch.float64), k.detach().to(torch.float64)
    k = k - k.mean(dim=0) + q.mean(dim=0)
    c = math.sqrt(float(k.norm(dim=1).mean()) / max(float(q.norm(dim=1).mean()), 1e-300))
    q, k = q * c, k / c
    x = torch.cat([q, k])
    if method == "pca":
        x = x - x.mean(dim=0)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        y = x @ vh[:dim].T
    elif method == "tsne":
        from sklearn.manifold import TSNE

        y = torch.as_tensor(TSNE(dim, random_state=seed, perplexity=min(30.0, max(2.0, x.shape[0] / 4 - 1)))
                            .fit_transform(x.numpy()))
    elif method == "umap":
        import umap

        y = torch.as_tensor(umap.UMAP(n_components=dim, random_state=seed).fit_transform(x.numpy()))
    else:
        raise ValueError(f"method must be 'pca', 'tsne' or 'umap', got {method!r}")
    return y[: q.shape[0]], y[q.shape[0]:]
