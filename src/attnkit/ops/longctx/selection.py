"""KV selection and compression at decoding time: which cached keys a query still needs.

Each *policy* maps an attention profile to a keep mask over candidate positions; the caches that apply them are in
:mod:`attnkit.selective_cache`: :class:`~attnkit.selective_cache.SelectiveKVCache` applies one to the prompt
(exact attention over the prompt, then only what the policy keeps is stored at full precision; for ZipVL the rest is
stored at low precision) and, with ``interval=``, to every block of generated tokens;
:class:`~attnkit.selective_cache.TokenTypeKVCache` evicts by NAtS's token types at every step;
:class:`~attnkit.selective_cache.ActQKVCache` retrieves per step with ActQKV's dynamic cut-off
(:class:`CutoffAllocator`). Policies, each from its paper:

- :func:`cumulative_mass` -- ZipVL (He et al. 2024), Sec. 3.2: per (batch, kv head), the smallest set of tokens
  whose normalised attention mass reaches ``tau``; the others are kept at ``low_bits`` (mixed precision, Sec. 3.3)
  or dropped.
- :func:`token_type_mask` -- Neural Attention Search (NAtS), Sec. 3: Global tokens stay, Local tokens are dropped
  once a later Global token arrives, Sliding-window tokens are seen by the next ``window`` tokens only
  (``TokenTypeKVCache`` evicts by the same rule while prefilling and decoding).
- :func:`span_index_mask` -- the catalogue's reading of Ltri-LLM (abstract only: the span detection from triangular
  attention patterns, by NMS, and the voted index vectors could not be read here; see docs/long-context.md): the
  context is cut into spans, each represented by its mean key; a query retrieves its ``top_spans`` best spans plus
  a local window.
- :func:`probe_query_mask` -- ActQKV, Sec. 3: a probe query built from the window's tokens with the largest
  activation bias (distance from the window's mean query) retrieves the ``cutoff`` best keys.
- :func:`modality_mask` -- the catalogue's reading of A-VL (abstract only): visual tokens keep their most-attended
  ``visual_ratio``; text tokens a recent window. The paper's rule is :func:`avl_vision_tiers`,
  :func:`avl_text_scores` and :func:`avl_text_keep`, applied while decoding by
  :class:`~attnkit.selective_cache.AdaptiveVLCache`.
- :func:`trim_visual_features` -- "Efficient LLaMA-3.2-Vision by Trimming Cross-attended Visual Features":
  the top ``keep_ratio`` of image features by cross-attention mass (over text queries and heads) of one layer,
  the same indices reused by the later cross-attention layers.
- :func:`span_mask` -- Self-Selected Attention Span: the model-chosen spans as a mask (an empty annotation means
  full attention). Only the abstract was reachable: the annotation format the model is fine-tuned to emit and the
  paper's blocked span encoding are not known here (docs/long-context.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnkit._checks import repeat_kv

__all__ = ["cumulative_mass", "token_type_mask", "span_index_mask", "probe_query_mask", "modality_mask",
           "avl_vision_tiers", "avl_text_scores", "avl_text_keep",
           "trim_visual_features", "span_mask", "quantize", "dequantize", "normalized_entropy", "CutoffAllocator"]


def _check_fraction(name: str, x: float, *, low_open: bool = False) -> float:
    if not isinstance(x, (int, float)) or not (0.0 < x <= 1.0 if low_open else 0.0 <= x <= 1.0):
        raise ValueError(f"{name} must lie in {'(0' if low_open else '[0'}, 1], got {x!r}")
    return float(x)


# -- policies: profile [batch, kv_heads, n_q, n] -> keep [batch, kv_heads, n] --------------------------------------
def cumulative_mass(profile: torch.Tensor, tau: float) -> torch.Tensor:
    """ZipVL's adaptive selection: the minimal set of keys whose attention mass (summed over the profile's query
    rows, normalised to 1) reaches ``tau``; ``tau = 1`` keeps every key."""
    tau = _check_fraction("tau", tau)
    mass = profile.sum(dim=-2)
    mass = mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    if tau >= 1.0:
        return torch.ones_like(mass, dtype=torch.bool)
    order = torch.argsort(mass, dim=-1, descending=True)
    sorted_mass = mass.gather(-1, order)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass of the strictly better keys
    take_sorted = before < tau  # keep until the mass reaches tau (the key that crosses it included)
    keep = torch.zeros_like(take_sorted)
    return keep.scatter(-1, order, take_sorted)


GLOBAL, LOCAL, SLIDING = 0, 1, 2


def token_type_mask(types: torch.Tensor, window: int) -> torch.Tensor:
    """NAtS's mask ``[..., n, n]`` (query, key) for token types ``[..., n]`` (0 Global, 1 Local, 2 Sliding): a
    query sees key ``j <= i`` when ``j`` is Global; Local and no Global token in ``(j, i)``; or Sliding and
    ``i - j < window``. The key itself (``j = i``) is always visible."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n = types.shape[-1]
    i = torch.arange(n, device=types.device).view(-1, 1)
    j = torch.arange(n, device=types.device).view(1, -1)
    t = types.unsqueeze(-2)  # [..., 1, n] type of the key
    is_global = (types == GLOBAL).to(torch.long)
    # Global tokens at positions <= p; a Global strictly between j and i exists iff count(i - 1) - count(j) > 0
    # (the Global token that evicts a Local one still sees it: eviction follows its own step)
    count = is_global.cumsum(-1)
    before_i = count - is_global
    global_after = (before_i.unsqueeze(-1) - count.unsqueeze(-2)) > 0  # [..., i, j]
    return token_type_rule(t, global_after, i, j, window)


def token_type_rule(key_type: torch.Tensor, global_between: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    window: int) -> torch.Tensor:
    """NAtS's visibility of key ``k_pos`` (type ``key_type``) from query ``q_pos``, given whether a Global token
    lies strictly between them: the one rule behind :func:`token_type_mask` and the tiled mask of the module."""
    ok = (key_type == GLOBAL) | ((key_type == LOCAL) & ~global_between) | ((key_type == SLIDING)
                                                                          & (q_pos - k_pos < window))
    return (ok | (q_pos == k_pos)) & (k_pos <= q_pos)


def span_index_mask(q: torch.Tensor, k: torch.Tensor, *, span: int, top_spans: int, window: int) -> torch.Tensor:
    """Ltri-LLM's retrieval mask ``[batch, heads, n_q, n]`` for queries at the last ``n_q`` positions: spans of
    ``span`` consecutive keys (a partition of the context), each represented by its mean key; each query keeps its
    ``top_spans`` best-scoring causal spans and the last ``window`` keys. ``top_spans >= number of spans`` is full
    causal attention."""
    b, h, nq, d = q.shape
    n = k.shape[2]
    kk = repeat_kv(k, h)
    num_spans = -(-n // span)
    span_of = torch.arange(n, device=k.device) // span
    reps = torch.zeros(b, h, num_spans, d, dtype=k.dtype, device=k.device).index_add_(2, span_of, kk)
    reps = reps / torch.bincount(span_of, minlength=num_spans).to(k.dtype).view(1, 1, -1, 1)
    pos = torch.arange(nq, device=q.device) + (n - nq)
    span_start = torch.arange(num_spans, device=q.device) * span
    visible = span_start.view(1, -1) <= pos.view(-1, 1)  # [nq, spans]: spans that begin before the query
    score = (q @ reps.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    top = min(top_spans, num_spans)
    chosen = torch.zeros(b, h, nq, num_spans, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, score.topk(top, dim=-1).indices, True)
    chosen &= visible
    keep = chosen.gather(-1, span_of.view(1, 1, 1, -1).expand(b, h, nq, n))
    j = torch.arange(n, device=q.device).view(1, -1)
    local = (j > pos.view(-1, 1) - window) & (j <= pos.view(-1, 1))
    return (keep | local) & (j <= pos.view(-1, 1))


def probe_query_mask(q: torch.Tensor, k: torch.Tensor, *, window: int, num_probe: int, cutoff: int | None
                     ) -> torch.Tensor:
    """ActQKV's selection ``[batch, kv_heads, n]``: in the last ``window`` queries, the ``num_probe`` with the
    largest activation bias ``||q_i - mean(q)||`` are averaged into a probe query (per kv head, over its query
    heads); the ``cutoff`` keys it scores highest are kept (``None``: all)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    if cutoff is None or cutoff >= k.shape[2]:
        return torch.ones(b, hkv, k.shape[2], dtype=torch.bool, device=k.device)
    win = q[:, :, -window:]
    bias = (win - win.mean(dim=2, keepdim=True)).norm(dim=-1)  # [b, h, w]
    idx = bias.topk(min(num_probe, win.shape[2]), dim=-1).indices
    probe = win.gather(2, idx[..., None].expand(-1, -1, -1, d)).mean(2)  # [b, h, d]
    probe = probe.view(b, hkv, h // hkv, d).mean(2)
    score = (k @ probe.unsqueeze(-1)).squeeze(-1)  # [b, hkv, n]
    keep = torch.zeros_like(score, dtype=torch.bool)
    return keep.scatter(-1, score.topk(cutoff, dim=-1).indices, True)


def modality_mask(profile: torch.Tensor, is_visual: torch.Tensor, *, visual_ratio: float, text_window: int
                  ) -> torch.Tensor:
    """The catalogue's reading of A-VL as a keep mask ``[batch, kv_heads, n]``: of the visual tokens (``is_visual
    [batch, n]``), the most attended ``ceil(visual_ratio * count)`` by the profile's mass; of the text tokens, the
    last ``text_window``. The paper's rule (core / secondary / minor image caches, scored text eviction) is
    :class:`~attnkit.selective_cache.AdaptiveVLCache`."""
    visual_ratio = _check_fraction("visual_ratio", visual_ratio)
    b, hkv, _, n = profile.shape
    vis = is_visual.to(torch.bool).view(b, 1, n).expand(b, hkv, n)
    mass = profile.sum(-2).masked_fill(~vis, float("-inf"))
    keep = torch.zeros(b, hkv, n, dtype=torch.bool, device=profile.device)
    for bi in range(b):
        count = int(vis[bi, 0].sum())
        top = math.ceil(visual_ratio * count)
        if top:
            keep[bi].scatter_(-1, mass[bi].topk(top, dim=-1).indices, True)
    text_pos = torch.arange(n, device=profile.device)
    keep |= (~vis) & (text_pos >= n - text_window).view(1, 1, n)
    return keep


# -- A-VL (Zhang et al., "A-VL: Adaptive Attention for Large Vision-Language Models", AAAI 2025) ------------------
# The rule, read from the paper's method summary (Sec. "Adaptive Text-Aware Vision Attention" / "Adaptive Text
# Attention": core, secondary and minor vision caches; H2O-like text eviction) and from the authors' repository
# (github.com/2147483647-2/A-VL, src/transformers/src/transformers/models/llama/modeling_llama.py: the vision
# block under ``vision_adaptive_attention`` and ``TextPruneHistoryKVCache``). Our code, their rule.
def avl_vision_tiers(score: torch.Tensor, visual: torch.Tensor, *, drop_rate: float, compute_rate: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A-VL's vision tiers for one sequence: ``(secondary, core)``, each ``[n]`` bool.

    ``score [n]``: the attention the last query gives each position, averaged over all heads of the layer (the
    prefill's last prompt token; at an update step, the generated token). ``visual [n]``: the image tokens that are
    candidates (all of them at prefill, the secondary ones at an update). Of the ``n_img`` candidates, the
    ``int((1 - drop_rate) * n_img)`` best are the *secondary* cache (held; the rest, *minor*, are dropped), and the
    ``min(int((1 - compute_rate) * n_img), secondary)`` best of those the *core* cache (the only image tokens a
    decoding step computes with, between updates). ``n_img`` is the image's token count as first given (the
    repository's ``image_token_default_length``); :class:`~attnkit.selective_cache.AdaptiveVLCache` keeps both
    counts for the updates, whose candidates are the secondary tokens.
    """
    drop_rate = _check_fraction("drop_rate", drop_rate)
    compute_rate = _check_fraction("compute_rate", compute_rate)
    if score.dim() != 1 or visual.shape != score.shape:
        raise ValueError(f"score and visual must both be [n], got {tuple(score.shape)} and {tuple(visual.shape)}")
    visual = visual.to(torch.bool)
    n_img = int(visual.sum())
    return _avl_top(score, visual, int((1 - drop_rate) * n_img), int((1 - compute_rate) * n_img))


def _avl_top(score: torch.Tensor, visual: torch.Tensor, n_secondary: int, n_core: int):
    """The ``n_secondary`` best candidates and the ``min(n_core, n_secondary)`` best of them."""
    ranked = score.masked_fill(~visual, float("-inf")).argsort(descending=True, stable=True)
    n_secondary = min(n_secondary, int(visual.sum()))
    secondary = torch.zeros_like(visual)
    secondary[ranked[:n_secondary]] = True
    core = torch.zeros_like(visual)
    core[ranked[:min(n_core, n_secondary)]] = True
    return secondary, core


def avl_text_scores(attn: torch.Tensor, rate: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """A-VL's text-token scores ``[heads, t]`` (the repository's ``TextPruneHistoryKVCache``), per head.

    ``attn [heads, rows, t]``: the attention weights (softmax over the whole sequence, not renormalised) that the
    ``rows`` newest text queries give the ``t`` text columns held, the newest query being the last column. Row
    ``r`` is the query at column ``c = t - rows + r``: its own column's score is set to its weight on itself, and
    every earlier column ``j < c`` gains ``attn[r, j] - quantile(attn[r, :c + 1 if decoding else c], rate)`` (a
    token gains when its weight exceeds the row's ``rate``-quantile, loses otherwise). At prefill (``scores``
    None, ``rows = t``) the quantile is over the row's earlier columns ``:c``; while decoding (``rows = 1``) over
    all ``t`` columns, the new one included, as in the repository. ``scores [heads, t - rows]``: the scores so far.
    """
    rate = _check_fraction("rate", rate)
    h, rows, t = attn.shape
    a = attn.float()
    out = a.new_zeros(h, t)
    if scores is not None:
        if scores.shape != (h, t - rows):
            raise ValueError(f"scores must be [heads, t - rows] = {(h, t - rows)}, got {tuple(scores.shape)}")
        out[:, :t - rows] = scores.float()
    for r in range(rows):
        c = t - rows + r
        out[:, c] = a[:, r, c]
        if c == 0:
            continue
        ref = a[:, r, :c] if scores is None else a[:, r, :c + 1]
        out[:, :c] += a[:, r, :c] - torch.quantile(ref, rate, dim=1, keepdim=True)
    return out


def avl_text_keep(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """The text entries A-VL keeps, ``[heads, t]`` bool: all when ``t <= budget``; else the last
    ``budget // 2`` (recent) and, of the others, the ``budget - budget // 2`` with the highest
    :func:`avl_text_scores` (heavy hitters)."""
    h, t = scores.shape
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    keep = torch.ones(h, t, dtype=torch.bool, device=scores.device)
    if t <= budget:
        return keep
    recent = budget // 2
    keep.zero_()
    keep[:, t - recent:] = True
    hh = budget - recent
    if hh:
        keep.scatter_(1, scores[:, :t - recent].topk(hh, dim=1).indices, True)
    return keep


def trim_visual_features(cross_attention: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices of the image features to keep ``[batch, k]`` (ascending), ranked by the cross-attention mass
    ``cross_attention [batch, heads, n_text, n_image]`` summed over text queries and heads; reuse the same
    indices for every later cross-attention layer (``k.gather`` with them)."""
    keep_ratio = _check_fraction("keep_ratio", keep_ratio, low_open=True)
    mass = cross_attention.sum(dim=(1, 2))
    top = max(1, math.ceil(keep_ratio * mass.shape[-1]))
    return mass.topk(top, dim=-1).indices.sort(dim=-1).values


def span_mask(spans: Sequence[Sequence[tuple[int, int]]] | None, q_len: int, kv_len: int) -> torch.Tensor:
    """Self-Selected Attention Span: the model-annotated spans ``[(start, end), ...]`` per query row (end
    exclusive) as a ``[q_len, kv_len]`` mask, causal; no annotation (None or an empty list for a row) means that
    row attends to everything before it."""
    pos = torch.arange(q_len).view(-1, 1) + (kv_len - q_len)
    j = torch.arange(kv_len).view(1, -1)
    causal = j <= pos
    if not spans:
        return causal
    if len(spans) != q_len:
        raise ValueError(f"spans must give one list of (start, end) per query row ({q_len}), got {len(spans)}")
    mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i, row in enumerate(spans):
        if not row:
            mask[i] = True
        for s, e in row:
            mask[i, max(0, s):max(0, e)] = True
    return mask & causal


# -- quantisation (ZipVL's low-precision part) -------------------------------------------------------------------
def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantisation per token (last axis): ``(codes uint8, scale, zero)``; the error of
    :func:`dequantize` is at most ``scale / 2 = (max - min) / (2 (2^bits - 1))`` per element."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must lie in [1, 8], got {bits}")
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
    codes = torch.round((x - lo) / scale).clamp(0, 2 ** bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale + zero


# -- ActQKV's dynamic KV cut-off (decoding) -----------------------------------------------------------------------
def normalized_entropy(scores: torch.Tensor) -> torch.Tensor:
    """``H(softmax(scores)) / log(n)`` over the last axis, in ``[0, 1]``: ActQKV's information density of a layer's
    retrieval scores (1: flat, every key equally likely to matter; 0: one key)."""
    n = scores.shape[-1]
    if n < 2:
        return torch.zeros(scores.shape[:-1], dtype=torch.float64, device=scores.device)
    p = torch.softmax(scores.double(), -1)
    return -(p * torch.log(p + 1e-300)).sum(-1) / math.log(n)


class CutoffAllocator:
    """ActQKV's dynamic KV cut-off across layers ("Activation-aware Probe-Query", decoding stage; the rule of the
    authors' code): at every decoding step a total ``budget`` of retrieved keys is shared by the layers in order.
    Layer ``l`` receives ``round(w_l * remaining)`` keys, clamped to ``[k_min, k_max]``, with ``w_l = e_l / sum_{m >=
    l} e_m`` where ``e_m`` is layer ``m``'s mean normalised entropy (:func:`normalized_entropy`) over its last
    ``history`` steps; until every layer has ``history`` samples, ``w_l = 1 / (layers - l)`` (an equal split).
    Layers whose retrieval scores are flat (high entropy: information spread out) get more keys.

    One allocator is shared by the :class:`ActQKVCache` of every layer; ``allocate(layer, entropy)`` is called by
    layer 0, 1, ... in order at each step."""

    def __init__(self, num_layers: int, budget: int, *, k_min: int = 1, k_max: int | None = None,
                 history: int = 100):
        if num_layers < 1 or budget < 1 or k_min < 0 or history < 1:
            raise ValueError(f"num_layers, budget, history must be >= 1 and k_min >= 0, got {num_layers}, {budget}, "
                             f"{history}, {k_min}")
        if k_max is not None and k_max < k_min:
            raise ValueError(f"k_max ({k_max}) must be >= k_min ({k_min})")
        self.num_layers, self.budget, self.k_min, self.k_max, self.history = num_layers, budget, k_min, k_max, history
        self.samples: list[list[float]] = [[] for _ in range(num_layers)]
        self.remaining = float(budget)
        self.last: list[int] = [0] * num_layers

    def allocate(self, layer: int, entropy: float) -> int:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must lie in [0, {self.num_layers}), got {layer}")
        if layer == 0:
            self.remaining = float(self.budget)
        hist = self.samples[layer]
        hist.append(float(entropy))
        del hist[:-self.history]
        if all(len(s) >= self.history for s in self.samples):
            means = [sum(s) / len(s) for s in self.samples]
            total = sum(means[layer:])
            w = means[layer] / total if total > 0 else 1.0 / (self.num_layers - layer)
        else:
            w = 1.0 / (self.num_layers - layer)
        k = max(self.k_min, round(w * self.remaining))
        if self.k_max is not None:
            k = min(k, self.k_max)
        self.remaining -= k
        self.last[layer] = k
        return k
