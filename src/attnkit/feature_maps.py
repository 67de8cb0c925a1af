"""Feature maps of kernelized linear attention: objects that know their output dimension and state size.

A feature map ``phi`` turns queries and keys ``[batch, heads, seq, d]`` into features ``[batch, heads, seq, m]``
so that attention weights are ``phi(q_i) . phi(k_j)`` (normalised by their sum, or not). The recurrent state of
causal linear attention is ``S [batch, heads, m, d_v]`` plus the denominator ``z [batch, heads, m]``, so
``state_bytes(d, d_v)`` is the x-axis of Based's recall / memory trade-off.

Every map is an ``nn.Module`` (learnable ones own parameters; random-feature ones own buffers) with

- ``forward(q, k, *, q_offset=0, k_offset=0) -> (phi_q, phi_k)``: both at once, because some maps (log-normal)
  derive their temperatures from the statistics of both; offsets are absolute positions of the first token
  (cosFormer re-weights by position, so a carried state needs them);
- ``feature_dim(head_dim) -> int`` and ``state_bytes(head_dim, value_dim, dtype) -> int``;
- ``nonnegative``: the kernel ``phi(x) . phi(y)`` is >= 0 for every input, so the denominator cannot change
  sign (true of every map but identity, trig and cosine; Taylor and ReBased have signed features but a
  non-negative kernel);
- ``token_local``: features of a token depend only on that token and its position, so an engine may compute
  them block by block and a state may be carried across calls.

Build by name with :func:`get` (``attnkit.feature_maps.get("favor", num_features=128)``); names:
``elu relu identity favor trig cosformer focused taylor rebased hedgehog dijiang cosine lln``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeatureMap",
    "EluFeatureMap",
    "ReluFeatureMap",
    "IdentityFeatureMap",
    "FavorFeatureMap",
    "TrigFeatureMap",
    "CosformerFeatureMap",
    "FocusedFeatureMap",
    "TaylorFeatureMap",
    "RebasedFeatureMap",
    "HedgehogFeatureMap",
    "DiJiangFeatureMap",
    "CosineFeatureMap",
    "LogNormalFeatureMap",
    "FEATURE_MAPS",
    "get",
    "hedgehog_distillation_loss",
]


class FeatureMap(nn.Module):
    """Base class. Subclasses implement :meth:`phi` (one tensor) or override :meth:`forward` (both)."""

    name: str = "feature_map"
    nonnegative: bool = True

    @property
    def token_local(self) -> bool:
        return True

    def feature_dim(self, head_dim: int) -> int:
        """Number of features ``m`` produced from a head dimension ``head_dim``."""
        raise NotImplementedError

    def state_bytes(self, head_dim: int, value_dim: int | None = None,
                    dtype: torch.dtype = torch.float32) -> int:
        """Bytes of one head's recurrent state: ``S [m, d_v]`` plus ``z [m]``."""
        m = self.feature_dim(head_dim)
        dv = head_dim if value_dim is None else value_dim
        return m * (dv + 1) * torch.empty((), dtype=dtype).element_size()

    def phi(self, x: torch.Tensor, *, is_query: bool, offset: int = 0) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def call(self, k: torch.Tensor, q: torch.Tensor | None = None, *, causal: bool = False, offset: int = 0):
        """Scope of one attention call over the keys ``k [batch, kv_heads, n_k, d]`` (and the queries ``q``,
        ``causal`` or not, first position ``offset``), inside which an engine may compute features block by
        block: random maps count one call (``redraw_interval``) and stabilised maps (FAVOR+) fix one key shift
        for the whole call. Yields the scope's dict; for a stabilised map ``ctx["stabilised"]`` is set and
        ``fm.call_key_shift(ctx)`` ``[batch, kv_heads, 1, 1]`` is the constant subtracted from every key's
        log-features (it cancels in a normalised output); a caller carrying a state may raise
        ``ctx["key_shift"]`` after reading it (never lower it)."""
        prev = self.__dict__.get("_call")
        ctx = self._begin_call(k, q, causal, offset)
        self.__dict__["_call"] = ctx
        try:
            yield ctx
        finally:
            self.__dict__["_call"] = prev

    def _begin_call(self, k: torch.Tensor, q: torch.Tensor | None = None, causal: bool = False,
                    offset: int = 0) -> dict:
        return {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, q_offset: int = 0,
                k_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [b, h, n, d]``, ``k [b, h_kv, n_k, d]`` -> ``phi_q [b, h, n, m]``, ``phi_k [b, h_kv, n_k, m]``."""
        return self.phi(q, is_query=True, offset=q_offset), self.phi(k, is_query=False, offset=k_offset)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _check_dim(fm: FeatureMap, head_dim: int | None, x: torch.Tensor) -> None:
    if head_dim is not None and x.shape[-1] != head_dim:
        raise ValueError(
            f"feature map {fm.name!r} was built for head_dim={head_dim} but got inputs with last dimension "
            f"{x.shape[-1]}; build it with head_dim={x.shape[-1]}"
        )


class EluFeatureMap(FeatureMap):
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al., "Transformers are RNNs", 2020). ``m = d``; phi > 0."""

    name = "elu"

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def phi(self, x, *, is_query, offset=0):
        # elu(x) + 1 = exp(min(x, 0)) + relu(x): the same values (exp(x) below 0, x + 1 above) in about half
        # the time of F.elu (expm1) plus an add on CPU; relu's zero slope at 0 keeps elu's derivative there.
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.exp(x.clamp_max(0)) + F.relu(x)  # exp's backward reads its output: nothing in place
        return x.clamp_max(0).exp_().add_(F.relu(x))


class ReluFeatureMap(FeatureMap):
    """``phi(x) = relu(x)`` (EfficientViT, Cai et al. 2023). ``m = d``; phi >= 0 (denominator may be 0: eps)."""

    name = "relu"

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def phi(self, x, *, is_query, offset=0):
        return F.relu(x)


class IdentityFeatureMap(FeatureMap):
    """``phi(x) = x``: plain (signed) linear attention, used unnormalised with decay and an output norm
    (TransNormerLLM / Lightning Attention, retention). ``m = d``."""

    name = "identity"
    nonnegative = False

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def phi(self, x, *, is_query, offset=0):
        return x


def _gaussian_orthogonal(m: int, d: int, generator: torch.Generator, orthogonal: bool) -> torch.Tensor:
    """``[m, d]`` rows distributed as N(0, I_d); with ``orthogonal`` they come in blocks of ``d`` exactly
    orthogonal rows whose norms are chi_d distributed (Performer, Choromanski et al. 2021, sec. 4.2)."""
    if not orthogonal:
        return torch.randn(m, d, generator=generator, dtype=torch.float64)
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        qmat = qmat * torch.sign(torch.diagonal(r))[None, :]  # uniform (Haar) orientation
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


class _RandomFeatureMap(FeatureMap):
    """Shared machinery: a seeded projection ``W [m, d]`` drawn lazily at the first call (so ``head_dim`` may
    be omitted), redrawn by :meth:`redraw` or every ``redraw_interval`` training calls."""

    def __init__(self, head_dim: int | None = None, num_features: int = 256, *, seed: int = 0,
                 orthogonal: bool = True, redraw_interval: int | None = None):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.head_dim = head_dim
        self.num_features = int(num_features)
        self.seed = int(seed)
        self.orthogonal = orthogonal
        self.redraw_interval = redraw_interval
        self._calls = 0
        self._draws = 0
        self.register_buffer("weight", None, persistent=True)
        if head_dim is not None:
            self.redraw(keep_seed=True)

    def _draw(self, d: int, generator: torch.Generator) -> torch.Tensor:
        return _gaussian_orthogonal(self.num_features, d, generator, self.orthogonal)

    def redraw(self, *, keep_seed: bool = False) -> None:
        """Draw a new projection (seed ``seed + number of previous draws``, so runs are reproducible)."""
        if self.head_dim is None:
            raise ValueError(f"{self.name}: head_dim is unknown until the first call; pass head_dim=")
        if not keep_seed:
            self._draws += 1
        g = torch.Generator().manual_seed(self.seed + self._draws)
        w = self._draw(self.head_dim, g)
        device = self.weight.device if self.weight is not None else None
        self.weight = w.to(device=device, dtype=torch.float32)

    def _projection(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            self.head_dim = x.shape[-1]
            self.redraw(keep_seed=True)
        _check_dim(self, self.head_dim, x)
        return self.weight.to(device=x.device, dtype=x.dtype)

    def _begin_call(self, k: torch.Tensor, q: torch.Tensor | None = None, causal: bool = False,
                    offset: int = 0) -> dict:
        if self.training and self.redraw_interval and self._calls and self._calls % self.redraw_interval == 0:
            self.redraw()
        self._calls += 1
        return {}

    def forward(self, q, k, *, q_offset=0, k_offset=0):
        if self.__dict__.get("_call") is None:  # a call of its own (engines open one scope for all blocks)
            with self.call(k):
                return super().forward(q, k, q_offset=q_offset, k_offset=k_offset)
        return super().forward(q, k, q_offset=q_offset, k_offset=k_offset)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, head_dim={self.head_dim}, num_features={self.num_features}, "
                f"seed={self.seed}, orthogonal={self.orthogonal}")


def _positive_exponent(x: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
    """``W x' - |x'|^2 / 2 - log(m) / 2`` with ``x' = x d^-1/4``: the exponent of positive random features, so
    that ``exp`` of it is ``exp(W x' - |x'|^2 / 2) / sqrt(m)``. The scales are folded into the small ``W^T``
    and the per-token shift, so the ``[..., m]`` result is touched once."""
    d = x.shape[-1]
    proj = x @ (w.T * d**-0.25)
    shift = (x * x).sum(-1, keepdim=True) * (0.5 * d**-0.5) + 0.5 * math.log(m)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return proj - shift
    return proj.sub_(shift)


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)``, in place when no gradient is recorded (``x`` is a temporary of the caller)."""
    return torch.exp(x) if torch.is_grad_enabled() and x.requires_grad else x.exp_()


class _PositiveRandomFeatureMap(_RandomFeatureMap):
    """Positive random features ``exp(W x' - |x'|^2 / 2) / sqrt(m)`` (``x' = x d^-1/4``), stabilised as the
    Performer paper does (Choromanski et al. 2021, sec. 4 / its reference code): the keys' exponents minus one
    maximum over all keys of the call (a per-(batch, head) factor ``e^-c``; ``attnkit.linear_attention`` keeps
    it in a carried state and raises it, rescaling the state, when later keys need more), each query's minus a
    per-query shift (Performer: the query's own maximum; here chosen against the keys, so that the denominator
    cannot underflow when q and the keys peak on different features: see ``_pair``). Both factors cancel in
    the normalised output ``phi(q) S / phi(q) z``; without them ``exp`` underflows to 0 for every feature once
    ``|x|^2 / (2 sqrt(d))`` passes ~87 (float32), e.g. for q, k of 5x unit scale at d = 64, and the output
    collapses to zeros. Keys more than ~e^87 below the largest key still vanish in float32 (then a causal row
    that sees only such keys gets 0, and ``linear_attention`` warns). ``stabilize=False`` gives the unshifted
    (unbiased) kernel estimate, for unnormalised use."""

    def __init__(self, head_dim: int | None = None, num_features: int = 256, *, seed: int = 0,
                 orthogonal: bool = True, redraw_interval: int | None = None, stabilize: bool = True):
        super().__init__(head_dim, num_features, seed=seed, orthogonal=orthogonal,
                         redraw_interval=redraw_interval)
        self.stabilize = bool(stabilize)

    def feature_dim(self, head_dim: int) -> int:
        return self.num_features

    def _exponent(self, x: torch.Tensor) -> torch.Tensor:
        return _positive_exponent(x, self._projection(x), self.num_features)

    def _begin_call(self, k: torch.Tensor, q: torch.Tensor | None = None, causal: bool = False,
                    offset: int = 0) -> dict:
        ctx = super()._begin_call(k, q, causal, offset)  # a redraw happens before the statistics are taken
        if self.stabilize and k.shape[2] > 0:
            # statistics on first use: from the features themselves when one forward sees the whole call
            # (parallel / recurrent modes), else in one pass over the keys (blocks, carried states)
            ctx.update(stabilised=True, causal=causal, keys=k, offset=offset)
        return ctx

    def call_key_shift(self, ctx: dict, ek: torch.Tensor | None = None, offset: int | None = None):
        """The key shift ``[b, h_kv, 1, 1]`` of the call whose scope is ``ctx`` (computed once, on first use;
        from ``ek``, the key exponents of a forward, when they cover the whole call)."""
        if "key_shift" not in ctx:
            k = ctx["keys"]
            with torch.no_grad():
                if ek is not None and ek.shape == k.shape[:3] + (self.num_features,) and offset == ctx["offset"]:
                    kmax = ek.amax(-2, keepdim=True)
                else:  # token blocks bound the memory of the [.., block, m] exponents
                    w, m = self._projection(k), self.num_features
                    step = max(1, (1 << 22) // max(1, k.shape[0] * k.shape[1] * m))
                    kmax = torch.stack([_positive_exponent(k[:, :, i:i + step], w, m).amax(-2, keepdim=True)
                                        for i in range(0, k.shape[2], step)]).amax(0)
            ctx["key_features_max"], ctx["key_shift"] = kmax, kmax.amax(-1, keepdim=True)
        return ctx["key_shift"]

    def key_shift(self, k: torch.Tensor) -> torch.Tensor | None:
        """The key shift a call over ``k`` alone would use, ``[b, h_kv, 1, 1]`` (None when not stabilised):
        for callers that combine several calls (sequence parallelism: the maximum over the ranks)."""
        if not self.stabilize or k.shape[2] == 0:
            return None
        with torch.no_grad():
            w = self._projection(k)
            step = max(1, (1 << 22) // max(1, k.shape[0] * k.shape[1] * self.num_features))
            return torch.stack([_positive_exponent(k[:, :, i:i + step], w, self.num_features).amax((-2, -1),
                                                                                                  keepdim=True)
                                for i in range(0, k.shape[2], step)]).amax(0)

    def forward(self, q, k, *, q_offset=0, k_offset=0):
        if not self.stabilize:
            return super().forward(q, k, q_offset=q_offset, k_offset=k_offset)
        if self.__dict__.get("_call") is None:  # a call of its own
            with self.call(k):
                return self._pair(q, k, q_offset, k_offset)
        return self._pair(q, k, q_offset, k_offset)

    def _pair(self, q: torch.Tensor, k: torch.Tensor, q_offset: int, k_offset: int):
        """Both features with the call's shifts. Causal self-attention (same positions for q and k): a query's
        shift is ``max_r (a_r + b_r) - c`` with ``b`` its own key's exponents (always visible), so that product
        is 1 and the denominator >= 1; otherwise against the keys' per-feature maxima (see ``_query_shift``).
        Either way at most 60 below the query's own maximum (query features <= e^60: no overflow)."""
        ctx = self.__dict__["_call"]
        eq, ek = self._exponent(q), self._exponent(k)
        b, h, n, m = eq.shape
        hk = ek.shape[1]
        if not ctx.get("stabilised"):  # a scope opened on other keys (empty): this forward's own statistics
            ctx = {"stabilised": True, "keys": k, "offset": k_offset}
        c = self.call_key_shift(ctx, ek.detach(), k_offset)
        aligned = ctx.get("causal") and ek.shape[2] == n and q_offset == k_offset and ek.shape[0] == b \
            and h % hk == 0 and c.shape[:2] == (b, hk)
        with torch.no_grad():
            if aligned:
                diag = (eq.view(b, hk, h // hk, n, m) + ek[:, :, None]).amax(-1, keepdim=True) - c[:, :, None]
                shift = torch.maximum(diag.view(b, h, n, 1), eq.amax(-1, keepdim=True) - 60.0)
            else:
                shift = self._query_shift(eq, ctx, q_offset)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        c = c.to(ek.dtype)
        shift = shift.to(eq.dtype)
        if grad:
            return torch.exp(eq - shift), torch.exp(ek - c)
        return eq.sub_(shift).exp_(), ek.sub_(c).exp_()

    def phi(self, x, *, is_query, offset=0):
        proj = self._exponent(x)
        if self.stabilize:
            ctx = self.__dict__.get("_call") or {}
            with torch.no_grad():
                shift = self._query_shift(proj, ctx, offset) if is_query else self._key_shift(proj, ctx)
            shift = shift.to(proj.dtype)
            proj = proj - shift if torch.is_grad_enabled() and proj.requires_grad else proj.sub_(shift)
        return _exp(proj)

    def _key_shift(self, proj: torch.Tensor, ctx: dict) -> torch.Tensor:
        if not ctx.get("stabilised"):
            return proj.amax((-2, -1), keepdim=True)
        return self.call_key_shift(ctx)

    def _query_shift(self, proj: torch.Tensor, ctx: dict, offset: int) -> torch.Tensor:
        """Per query: ``max_r (a_r + K_r - c)`` with ``K_r`` the largest exponent of feature ``r`` among the
        call's keys and ``c`` the key shift, so that its best-matching key contributes ``exp(0) = 1`` to the
        denominator (a plain per-query maximum can leave every product ``phi(q)_r phi(k)_r`` underflowing when q
        and the keys peak on different features); at most ``60`` below the query's own maximum, so no feature
        of the query exceeds ``e^60``."""
        if ctx.get("stabilised"):
            self.call_key_shift(ctx)
        kmax, c = ctx.get("key_features_max"), ctx.get("key_shift")
        if kmax is None or kmax.shape[0] != proj.shape[0] or proj.shape[1] % kmax.shape[1]:
            return proj.amax(-1, keepdim=True)
        # max(max_r (a_r + rel_r), own - 60) == max_r (a_r + max(rel_r, -60)): one pass over [.., n, m]
        rel = (kmax - c).clamp_min(-60.0).repeat_interleave(proj.shape[1] // kmax.shape[1], dim=1)  # [b, h, 1, m]
        return (proj + rel.to(proj.dtype)).amax(-1, keepdim=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stabilize={self.stabilize}"


class FavorFeatureMap(_PositiveRandomFeatureMap):
    """FAVOR+ positive orthogonal random features (Choromanski et al., "Rethinking Attention with Performers",
    2021, eq. of Lemma 1: positive random features for the softmax kernel).

    ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x * d^-1/4``, so that
    ``E[phi(q) . phi(k)] = exp(q . k / sqrt(d))``: the softmax kernel, estimated without bias. ``m =
    num_features``. ``stabilize=True`` (default) subtracts a per-query shift and the keys' largest exponent
    (one per batch and head; Performer sec. 4), factors that cancel in the normalised output only; pass
    ``stabilize=False`` for the unnormalised kernel estimate.
    """

    name = "favor"


class TrigFeatureMap(_RandomFeatureMap):
    """Trigonometric random features (Performer's baseline, Rahimi & Recht):
    ``phi(x) = [sin(W x'), cos(W x')] * exp(|x'|^2 / 2) / sqrt(m)``, ``x' = x d^-1/4``; unbiased for
    ``exp(q . k / sqrt(d))`` but signed (denominators can cross zero) and of higher variance. ``2 m`` features.
    """

    name = "trig"
    nonnegative = False

    def feature_dim(self, head_dim: int) -> int:
        return 2 * self.num_features

    def phi(self, x, *, is_query, offset=0):
        w = self._projection(x)
        x = x * x.shape[-1] ** -0.25
        proj = x @ w.T
        half_sq = 0.5 * (x * x).sum(-1, keepdim=True)
        _check_trig_amplitude(half_sq, "q" if is_query else "k")
        amp = torch.exp(half_sq) * self.num_features ** -0.5
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1) * amp


def _check_trig_amplitude(half_sq: torch.Tensor, name: str) -> None:
    """The trigonometric estimator's amplitude ``exp(|x'|^2 / 2)`` is unbounded (and, unlike positive features, no
    shift can be taken out of signed features without changing the estimate): a query's and a key's amplitudes
    multiply, so each must stay below ``sqrt`` of the dtype's largest value (``|x'|^2 / 2 <= 40`` in float32, i.e.
    ``|x|^2 <= 80 sqrt(d)``) or the features and products overflow to inf and NaN (issue 28: NaN at 5x unit
    inputs). Beyond it a clear error instead of a NaN output (one reduction and a host sync per call)."""
    if half_sq.numel() == 0:
        return
    limit = 0.5 * math.log(torch.finfo(half_sq.dtype).max) - 4.0
    worst = float(half_sq.detach().amax())
    if worst > limit:  # NaN inputs compare False: they propagate as in dense attention
        raise ValueError(
            f"trig random features overflow: |{name}|^2 / (2 sqrt(d)) reaches {worst:.1f} > {limit:.1f} in "
            f"{half_sq.dtype} (their amplitude is exp(|x|^2 / (2 sqrt(d))); unit-scale inputs give about "
            f"sqrt(d) / 2); normalise q and k (LayerNorm, or scale them down), compute in float64, or use the "
            f"stabilised positive features of 'performer' (feature_map='favor')"
        )


def _dct_matrix(d: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C [d, d]`` (``C @ C.T = I``) in float64."""
    n = torch.arange(d, dtype=torch.float64)
    c = torch.cos(math.pi / d * (n[None, :] + 0.5) * n[:, None]) * math.sqrt(2.0 / d)
    c[0] /= math.sqrt(2.0)
    return c


class DiJiangFeatureMap(_PositiveRandomFeatureMap):
    """DiJiang's frequency-domain kernelization (Chen et al., "DiJiang: Efficient Large Language Models through
    Compact Kernelization", 2024): ``phi(x) = D exp(T C x' - |x'|^2/2)`` with ``C`` the orthonormal DCT,
    ``T [m, d]`` quasi-Monte-Carlo Gaussian samples (a scrambled Sobol sequence through the Gaussian inverse
    CDF) and ``D`` the weights, here the equal weights ``1/sqrt(m)``. Positive; estimates ``exp(q.k/sqrt(d))``
    with lower variance than i.i.d. Monte Carlo at equal ``m``. ``orthogonal`` is ignored (QMC instead).
    Stabilised like FAVOR+ (``stabilize``).
    """

    name = "dijiang"

    def _draw(self, d: int, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        sobol = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed)
        u = sobol.draw(self.num_features, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
        t = math.sqrt(2.0) * torch.special.erfinv(2 * u - 1)  # QMC samples of N(0, I)
        return t @ _dct_matrix(d)  # W = T C


class CosformerFeatureMap(FeatureMap):
    """cosFormer (Qin et al., "cosFormer: Rethinking Softmax in Attention", 2022):
    ``phi(x_i) = [relu(x_i) cos(pi i / 2M), relu(x_i) sin(pi i / 2M)]`` so that
    ``phi(q_i) . phi(k_j) = relu(q_i) . relu(k_j) cos(pi (i - j) / 2M)``. ``2 d`` features; ``i`` is the
    absolute position. ``max_len`` (``M``) must bound every position; when ``None`` the call's own length is
    used, which is fine for one-shot calls but not for carried states (then the map is not token-local).
    """

    name = "cosformer"

    def __init__(self, max_len: int | None = None):
        super().__init__()
        self.max_len = max_len

    @property
    def token_local(self) -> bool:
        return self.max_len is not None

    def feature_dim(self, head_dim: int) -> int:
        return 2 * head_dim

    def _weights(self, n: int, offset: int, M: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if offset + n > M:
            raise ValueError(
                f"cosformer: position {offset + n - 1} exceeds max_len={M}; build the feature map with "
                f"max_len >= the longest sequence (state offset included)"
            )
        pos = torch.arange(offset, offset + n, device=x.device, dtype=torch.float64)
        angle = (math.pi / 2) * pos / M
        return torch.cos(angle).to(x.dtype)[:, None], torch.sin(angle).to(x.dtype)[:, None]

    def phi(self, x, *, is_query, offset=0, M=None):
        M = M if M is not None else self.max_len
        c, s = self._weights(x.shape[-2], offset, M, x)
        r = F.relu(x)
        return torch.cat([r * c, r * s], dim=-1)

    def forward(self, q, k, *, q_offset=0, k_offset=0):
        M = self.max_len if self.max_len is not None else max(q_offset + q.shape[-2], k_offset + k.shape[-2])
        return (self.phi(q, is_query=True, offset=q_offset, M=M),
                self.phi(k, is_query=False, offset=k_offset, M=M))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, max_len={self.max_len}"


class FocusedFeatureMap(FeatureMap):
    """Focused linear attention (Han et al., "FLatten Transformer", 2023): ``r = relu(x)``,
    ``phi(x) = r^p * ||r|| / ||r^p||`` (elementwise power ``p``): keeps the norm, sharpens the direction.
    ``m = d``. The paper's depthwise convolution on V is a module concern, not part of the map."""

    name = "focused"

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def phi(self, x, *, is_query, offset=0):
        r = F.relu(x) + self.eps
        rp = r**self.p
        # an all-non-positive row (possible with eps=0) has r = 0: its features are 0, not 0/0
        tiny = torch.finfo(rp.dtype).tiny
        return rp * (r.norm(dim=-1, keepdim=True) / rp.norm(dim=-1, keepdim=True).clamp_min(tiny))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, p={self.p}"


def _outer_features(x: torch.Tensor, compact: bool, diag_w: float, off_w: float) -> torch.Tensor:
    """``vec(x x^T)`` weighted so that ``f(x) . f(y) = w^2 (x . y)^2`` with ``diag_w = w``: the full ``d^2``
    vector, or (``compact``) its ``d (d + 1) / 2`` upper triangle with off-diagonal terms scaled by sqrt(2)."""
    d = x.shape[-1]
    outer = x[..., :, None] * x[..., None, :]
    if not compact:
        return outer.flatten(-2) * diag_w
    i, j = torch.triu_indices(d, d, device=x.device)
    # built in x's dtype: a float32 sqrt(2) would cost float64 inputs half their digits
    w = torch.full(i.shape, off_w, dtype=x.dtype, device=x.device).masked_fill_(i == j, diag_w)
    return outer[..., i, j] * w


class TaylorFeatureMap(FeatureMap):
    """Second-order Taylor features of Based (Arora et al., "Simple linear attention language models balance the
    recall-throughput tradeoff", 2024): ``phi(x) = [1, x', x' x'^T / sqrt(2)]`` with ``x' = x sqrt(scale)``, so
    ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = scale * q . k`` (``scale`` defaults to ``d^-1/2``).
    ``compact=True`` keeps the ``d (d+1) / 2`` distinct quadratic terms (same kernel, 1 + d + d(d+1)/2
    features instead of the paper's 1 + d + d^2). The kernel is > 0 for every input.
    """

    name = "taylor"

    def __init__(self, scale: float | None = None, compact: bool = True):
        super().__init__()
        self.scale = scale
        self.compact = compact

    def feature_dim(self, head_dim: int) -> int:
        quad = head_dim * (head_dim + 1) // 2 if self.compact else head_dim * head_dim
        return 1 + head_dim + quad

    def phi(self, x, *, is_query, offset=0):
        scale = x.shape[-1] ** -0.5 if self.scale is None else self.scale
        x = x * math.sqrt(scale)
        quad = _outer_features(x, self.compact, 0.5**0.5, 1.0)
        return torch.cat([torch.ones_like(x[..., :1]), x, quad], dim=-1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, scale={self.scale}, compact={self.compact}"


class RebasedFeatureMap(FeatureMap):
    """ReBased (Aksenov et al., "Linear Transformers with Learnable Kernel Functions are Better In-Context
    Models", 2024): ``x~ = gamma * layernorm(x) + beta`` (learnable, separate for q and k), kernel
    ``(q~ . k~)^2`` through ``phi(x) = vec(x~ x~^T)``; ``d (d+1) / 2`` features (compact, same kernel).
    ``num_heads`` gives per-head ``gamma, beta``; otherwise they are shared by every head.
    """

    name = "rebased"

    def __init__(self, head_dim: int, num_heads: int | None = None, *, eps: float = 1e-5):
        super().__init__()
        shape = (head_dim,) if num_heads is None else (num_heads, 1, head_dim)
        self.head_dim = head_dim
        self.eps = eps
        self.gamma_q = nn.Parameter(torch.ones(shape))
        self.beta_q = nn.Parameter(torch.zeros(shape))
        self.gamma_k = nn.Parameter(torch.ones(shape))
        self.beta_k = nn.Parameter(torch.zeros(shape))

    def feature_dim(self, head_dim: int) -> int:
        return head_dim * (head_dim + 1) // 2

    def phi(self, x, *, is_query, offset=0):
        _check_dim(self, self.head_dim, x)
        g, b = (self.gamma_q, self.beta_q) if is_query else (self.gamma_k, self.beta_k)
        if g.dim() == 3 and g.shape[0] != x.shape[1]:
            # grouped-query keys: use the parameters of the first query head of each group
            g, b = g[:: g.shape[0] // x.shape[1]], b[:: b.shape[0] // x.shape[1]]
        xt = F.layer_norm(x, (x.shape[-1],), eps=self.eps) * g.to(x.dtype) + b.to(x.dtype)
        return _outer_features(xt, True, 1.0, 2.0**0.5)


class HedgehogFeatureMap(FeatureMap):
    """Learnable feed-forward feature map (Hedgehog, Zhang et al. 2024; "Linear Self-Attention Approximation via
    Trainable Feedforward Kernel", Yorsh et al.): ``u = x W + b`` (``W [d, f]``, identity-initialised when
    ``f == d``), ``phi(x) = [softmax(u), softmax(-u)]``: ``2 f`` positive features, trained (e.g. by
    distillation against softmax attention, :func:`hedgehog_distillation_loss`). ``num_heads`` gives each head
    its own layer; q and k share it (as in Hedgehog).
    """

    name = "hedgehog"

    def __init__(self, head_dim: int, feature_dim: int | None = None, num_heads: int | None = None):
        super().__init__()
        f = head_dim if feature_dim is None else feature_dim
        self.head_dim, self.features = head_dim, f
        w = torch.eye(head_dim, f) if f == head_dim else torch.randn(head_dim, f) * head_dim**-0.5
        if num_heads is not None:
            w = w.expand(num_heads, head_dim, f).clone()
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros((f,) if num_heads is None else (num_heads, 1, f)))

    def feature_dim(self, head_dim: int) -> int:
        return 2 * self.features

    def phi(self, x, *, is_query, offset=0):
        _check_dim(self, self.head_dim, x)
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if w.dim() == 3 and w.shape[0] != x.shape[1]:
            step = w.shape[0] // x.shape[1]
            w, b = w[::step], b[::step]
        u = x @ w + b
        return torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], dim=-1)


def hedgehog_distillation_loss(fm: FeatureMap, q: torch.Tensor, k: torch.Tensor, *,
                               causal: bool = False) -> torch.Tensor:
    """Cross-entropy between softmax attention weights (teacher, ``q.k / sqrt(d)``) and the linear
    attention weights ``phi(q).phi(k) / sum`` of ``fm`` (Hedgehog's distillation objective). Quadratic in the
    sequence length: for training the map on short sequences."""
    pq, pk = fm(q, k)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    a = pq @ pk.transpose(-1, -2)
    if causal:
        n, s = logits.shape[-2:]
        keep = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n)
        logits = logits.masked_fill(~keep, float("-inf"))
        a = a * keep
    teacher = torch.softmax(logits, -1)
    student = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1).mean()


class CosineFeatureMap(FeatureMap):
    """Cosine attention (Cottention, Mongaras et al. 2024): ``phi(x) = x / ||x||``, so weights are cosine
    similarities in [-1, 1], used without a denominator (``normalize="none"``) and a length scale. ``m = d``."""

    name = "cosine"
    nonnegative = False

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def phi(self, x, *, is_query, offset=0):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


class LogNormalFeatureMap(FeatureMap):
    """Linear Log-Normal attention (Nahshan et al., "Linear Log-Normal Attention with Unbiased Concentration"):
    ``phi_q(q) = exp(alpha q - max_feat)``, ``phi_k(k) = exp(beta k - max_global)`` with temperatures from
    moment matching: ``s = sqrt((sq^2 sk^2 - b) / (2a))``, ``alpha = s / sq``, ``beta = s / sk`` (``a = 0.1486``,
    ``b = -0.3549``; ``sq, sk`` the standard deviations of q and k, without gradient). The shifts cancel in the
    normalised output. With fixed ``alpha``/``beta`` and ``stabilize=False`` the map is token-local (needed to
    carry a state across calls); otherwise the statistics are those of the whole call. ``m = d``.

    ``causal=True`` (what causal attention needs): the statistics of position ``i`` are those of the prefix
    ``0..i`` (running mean and variance of q and k over positions and features), so ``alpha_i`` and ``beta_i``
    never see later tokens, and the keys' global max shift (which would) is dropped; features are exponentials of
    moderate numbers (``|beta k|`` of a few units for standardised keys) computed in at least float32.
    """

    name = "lln"
    A, B = 0.1486, -0.3549

    def __init__(self, alpha: float | None = None, beta: float | None = None, *, stabilize: bool = True,
                 causal: bool = False):
        super().__init__()
        self.alpha, self.beta, self.stabilize, self.causal = alpha, beta, stabilize, causal

    @property
    def token_local(self) -> bool:
        return self.alpha is not None and self.beta is not None and not (self.stabilize and not self.causal)

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    @staticmethod
    def _std(x: torch.Tensor, causal: bool) -> torch.Tensor:
        """Standard deviation over positions and features: ``[b, h, 1, 1]``, or with ``causal`` the prefix
        statistics ``[b, h, n, 1]`` (running sums in float64: long prefixes would cancel in float32)."""
        if not causal:
            return x.float().std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        x = x.double()
        count = x.shape[-1] * torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=x.dtype)[:, None]
        s1 = x.sum(-1, keepdim=True).cumsum(-2)
        s2 = (x * x).sum(-1, keepdim=True).cumsum(-2)
        var = (s2 - s1 * s1 / count).clamp_min(0) / (count - 1).clamp_min(1)
        return var.sqrt().float().clamp_min(1e-6)

    def temperatures(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha [b, h, 1 or n, 1]``, ``beta [b, h_kv, 1 or n, 1]`` by moment matching (per position from the
        prefix when ``causal``), or the fixed ones."""
        with torch.no_grad():
            sq, sk = self._std(q, self.causal), self._std(k, self.causal)
            if sk.shape[1] != sq.shape[1]:
                sk_q = sk.repeat_interleave(sq.shape[1] // sk.shape[1], dim=1)
                sq_k = sq.view(sq.shape[0], sk.shape[1], -1, *sq.shape[2:]).mean(2)
            else:
                sk_q, sq_k = sk, sq
            st_q = ((sq**2 * sk_q**2 - self.B) / (2 * self.A)).sqrt()
            st_k = ((sq_k**2 * sk**2 - self.B) / (2 * self.A)).sqrt()
            alpha = st_q / sq if self.alpha is None else torch.full_like(sq, self.alpha)
            beta = st_k / sk if self.beta is None else torch.full_like(sk, self.beta)
        return alpha.to(q.dtype), beta.to(k.dtype)

    def forward(self, q, k, *, q_offset=0, k_offset=0):
        if self.causal and q.shape[-2] != k.shape[-2]:
            raise ValueError(f"lln causal=True needs as many queries as keys (prefix statistics), got "
                             f"{q.shape[-2]} and {k.shape[-2]}")
        alpha, beta = self.temperatures(q, k)
        aq = alpha * q
        bk = beta * k
        # Per-query shift (cancels between numerator and denominator); the key shift is global so it cancels too.
        aq = aq - aq.amax(-1, keepdim=True).detach()
        if self.stabilize and not self.causal:
            bk = bk - bk.amax(dim=(-2, -1), keepdim=True).detach()
        return torch.exp(aq), torch.exp(bk)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, alpha={self.alpha}, beta={self.beta}, stabilize={self.stabilize}, "
                f"causal={self.causal}")


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    cls.name: cls
    for cls in (EluFeatureMap, ReluFeatureMap, IdentityFeatureMap, FavorFeatureMap, TrigFeatureMap,
                CosformerFeatureMap, FocusedFeatureMap, TaylorFeatureMap, RebasedFeatureMap,
                HedgehogFeatureMap, DiJiangFeatureMap, CosineFeatureMap, LogNormalFeatureMap)
}


def get(name: str | FeatureMap, **params) -> FeatureMap:
    """The feature map called ``name`` built with ``params`` (a :class:`FeatureMap` is returned as is)."""
    if isinstance(name, FeatureMap):
        if params:
            raise ValueError("params cannot be given with a FeatureMap instance; configure the instance instead")
        return name
    if not isinstance(name, str):
        raise TypeError(f"feature_map must be a name or a FeatureMap, got {type(name).__name__}")
    try:
        cls = FEATURE_MAPS[name]
    except KeyError:
        raise ValueError(
            f"unknown feature map {name!r}; choose one of {', '.join(sorted(FEATURE_MAPS))} "
            f"or pass an attnkit.feature_maps.FeatureMap instance"
        ) from None
    return cls(**params)

