"""What a benchmark run measures: the configuration, the selection of mechanisms and their lengths.

The selection comes from the registry, so a newly registered family shows up in `attnkit bench` without
touching this module. Each *variant* is one line of the report: a registered mechanism, the SDPA baseline or
a FlexAttention peer, in one causal mode.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnkit.registry import Mechanism, list_mechanisms

__all__ = ["BenchConfig", "Variant", "default_config", "quick_config", "all_config", "select_variants",
           "default_selection", "is_quadratic", "ALL_LENS", "FAMILY_REPRESENTATIVES",
           "make_inputs", "INPUT_KINDS", "STRUCTURES", "STRUCTURE_WORDS",
           "DTYPES", "SDPA", "QUADRATIC_LENS", "SUBQUADRATIC_LENS"]

DTYPES = ("float32", "float16", "bfloat16", "float64")
SDPA = "sdpa"  # name of the built-in baseline: torch.nn.functional.scaled_dot_product_attention

# Default lengths: 512..16,384 for everything, longer for mechanisms whose cost is sub-quadratic.
QUADRATIC_LENS = (512, 1024, 2048, 4096, 8192, 16384)
SUBQUADRATIC_LENS = QUADRATIC_LENS + (32768, 65536)
QUICK_LENS = (256, 512, 1024, 2048)
# `attnkit bench --all`: every record at a few lengths (short, the decision's 4K, long).
ALL_LENS = (512, 4096, 16384)
# The default run shows one mechanism of every family: those marked ``in_default_bench``, and for a family
# without one, this representative (else its first record by name).
FAMILY_REPRESENTATIVES = {"longctx": "s2_attention", "mixers": "aft_simple"}

# n^2, N², L*L, n·n ... in a complexity string such as "O(n^2 d)"; "O(n d^2)" is linear in n.
_QUADRATIC = re.compile(r"\b[nNLT]\s*(\^|\*\*)\s*2|[nNLT]²|\b([nNLT])\s*[*·×]\s*\2\b")

# FlexAttention compiles per length (the mask's closure holds the length): ~15-40 s each on 2 CPU cores, so
# the default run measures it at one length; explicit --seq-lens measure it at every length given.
FLEX_DEFAULT_LENS = (16384,)


def is_quadratic(complexity: str) -> bool:
    """Whether a registry complexity string is quadratic in the sequence length."""
    return bool(_QUADRATIC.search(complexity or ""))


@dataclass
class BenchConfig:
    """One benchmark run. ``None`` fields mean "the embedded default" (see `default_config`)."""

    mechanisms: list[str] | None = None  # names or family names; None: those with ``in_default_bench``
    seq_lens: list[int] | None = None  # None: per-family defaults (QUADRATIC_LENS / SUBQUADRATIC_LENS)
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    causal: str = "default"  # "off", "on", "both", or "default" (off, plus causal for the linear family)
    backward: bool = False  # time forward + backward
    repeats: int = 5  # timed calls per cell (fewer when a cell would exceed cell_budget_s)
    warmup: int = 1  # untimed calls before timing (the first one is traced for memory)
    cell_budget_s: float = 1.5  # time spent on the timed calls of one cell
    max_call_s: float = 6.0  # skip a cell whose predicted single call is longer than this
    time_budget_s: float = 170.0  # the whole run; remaining cells are skipped (and reported) beyond it
    flex: bool = True  # FlexAttention peers for mechanisms with a sparsity pattern
    # Backends to measure each selected mechanism through (``name@engine`` lines, ``attnkit backends``), and the
    # libraries' own kernels as peers (``natten[...]``, ``fla[...]``) where installed on the device.
    engines: list[str] | None = None
    peers: bool = True
    memory: bool = True  # trace peak memory (one extra traced call per cell)
    error_rows: int = 256  # query rows sampled for the error against exact softmax
    seed: int = 0
    inputs: str = "clustered"  # "clustered" (peaked, content-based attention) or "gaussian" (i.i.d. N(0, 1))
    # Errors of approximations and masks against full softmax on random, low-rank, clustered and local inputs.
    structured_errors: bool = True
    # Lengths those errors are measured at (None: 1K, 4K and 16K, or every explicit --seq-lens length <= 16K).
    structured_lens: list[int] | None = None
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-mechanism overrides
    quick: bool = False
    all: bool = False  # `attnkit bench --all`

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


INPUT_KINDS = ("clustered", "gaussian")
# Inputs the error of approximations is measured on (besides the timing inputs): ``random`` is ``gaussian``.
STRUCTURES = ("random", "low_rank", "clustered", "local")
STRUCTURE_WORDS = {
    "random": "i.i.d. N(0, 1): no structure; exact attention is nearly uniform, its output ~ mean(v)",
    "low_rank": "q, k, v in a rank-4 subspace: the score and value matrices are low rank (what Linformer and "
                "Nystrom assume)",
    "clustered": "16 clusters per head: each query attends mostly to its cluster's keys (content-based, peaked)",
    "local": "q, k carry positional phases: each query attends to its ~16 neighbours (what windows assume)",
}


def make_inputs(kind: str, shape: tuple[int, int, int, int], generator: torch.Generator, *,
                num_clusters: int = 16, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic ``q, k, v`` of ``shape [batch, heads, seq, dim]`` (float32, CPU).

    ``gaussian`` (or ``random``): i.i.d. N(0, 1). At long lengths exact softmax of such inputs is nearly uniform
    and its output is about mean(v), a vector of tiny norm, so every approximation's *relative* error looks huge;
    there is no low-rank structure to exploit, and a random projection of the length-n axis (Linformer) mixes n
    independent values, so its error grows with n.
    ``clustered``: each token belongs to one of ``num_clusters`` clusters per head; queries and keys are their
    cluster's centre plus noise, with centres scaled so that a same-cluster logit exceeds the others by about 4
    (attention is peaked on the query's cluster, as content-based attention is), and values are a per-cluster
    vector plus noise (the exact output is about the cluster's value). Approximations that capture the structure
    score low errors here, as they would on real, peaked attention.
    ``low_rank``: q, k and v are random combinations of ``rank`` directions (logits of standard deviation ~2.5):
    ``QK^T`` and ``V`` have rank ``rank``.
    ``local``: q and k carry sinusoidal phases of their position (random frequencies up to pi/8), so
    ``q_i . k_j`` depends on ``i - j`` and peaks at ``i = j`` (a logit gap of about 8 over distant keys): each query
    attends to its ~16 neighbours; values are random.
    """
    if kind in ("gaussian", "random"):
        q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
        return q, k, v
    b, h, n, d = shape
    if kind == "low_rank":
        basis = torch.linalg.qr(torch.randn(d, rank, generator=generator))[0].T  # [rank, d], orthonormal rows
        s = (2.5 * d**0.5 / rank**0.5) ** 0.5

        def low(scale: float) -> torch.Tensor:
            return (scale * torch.randn(b, h, n, rank, generator=generator)) @ basis

        return low(s), low(s), low(d**0.5 / rank**0.5)
    if kind == "local":
        half = d // 2
        freqs = torch.rand(b, h, 1, half, generator=generator) * (torch.pi / 8)
        phase = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1) * freqs
        amp = (16.0 / d**0.5) ** 0.5  # q_i . k_i / sqrt(d) = amp^2 * half / sqrt(d) = 8
        feats = torch.cat([phase.cos(), phase.sin()], dim=-1) * amp
        if feats.shape[-1] < d:
            feats = torch.cat([feats, torch.zeros(b, h, n, d - feats.shape[-1])], dim=-1)
        noise = 0.05
        q = feats + noise * torch.randn(shape, generator=generator)
        k = feats + noise * torch.randn(shape, generator=generator)
        return q, k, torch.randn(shape, generator=generator)
    if kind != "clustered":
        raise ValueError(f"inputs must be one of {', '.join(INPUT_KINDS + STRUCTURES[1:2] + STRUCTURES[3:])}, "
                         f"got {kind!r}")
    centres = torch.nn.functional.normalize(torch.randn(b, h, num_clusters, d, generator=generator), dim=-1)
    centres = centres * (4.0 * d**0.5) ** 0.5  # |c|^2 / sqrt(d) = 4: the same-cluster logit gap
    values = torch.randn(b, h, num_clusters, d, generator=generator)
    label = torch.randint(0, num_clusters, (b, h, n), generator=generator)
    pick = label[..., None].expand(b, h, n, d)
    noise = 0.5

    def member(table: torch.Tensor) -> torch.Tensor:
        return table.gather(2, pick) + noise * torch.randn(shape, generator=generator)

    return member(centres), member(centres), member(values)


def default_config(**overrides: Any) -> BenchConfig:
    """The embedded default of `attnkit bench`: about 4 minutes on 2 CPU cores (``attnkit.cli.DEFAULT_RUN_MIN``)."""
    return BenchConfig(**overrides)


def quick_config(**overrides: Any) -> BenchConfig:
    """`attnkit bench --quick`: about 20 seconds (``attnkit.cli.QUICK_RUN_S``; short lengths, no compilation)."""
    base = dict(seq_lens=list(QUICK_LENS), repeats=3, cell_budget_s=0.3, max_call_s=1.5, time_budget_s=18.0,
                flex=False, quick=True, structured_lens=[1024])
    base.update(overrides)
    return BenchConfig(**base)


def all_config(**overrides: Any) -> BenchConfig:
    """`attnkit bench --all`: every registered record (attention and mixers) at ``ALL_LENS`` within a 10-minute
    budget (lengths in increasing order, so every record is measured at the shortest length first)."""
    base = dict(mechanisms=["all"], seq_lens=list(ALL_LENS), repeats=3, cell_budget_s=0.5, max_call_s=3.0,
                time_budget_s=600.0, flex=False, all=True, structured_lens=[4096])
    base.update(overrides)
    return BenchConfig(**base)


@dataclass
class Variant:
    """One line of the report: what is called, in which causal mode, at which lengths."""

    name: str  # registry name, "sdpa", "flex[<name>]", "<name>@<engine>", "natten[<name>]" or "fla[<name>]"
    kind: str  # "baseline", "mechanism", "flex", "engine" (a mechanism through one backend) or "peer"
    causal: bool
    family: str
    exact: bool
    complexity: str
    paper: str
    seq_lens: list[int]
    params: dict[str, Any] = field(default_factory=dict)
    mechanism: Mechanism | None = None  # the registry record (for "flex", the mechanism whose pattern it runs)
    unsupported: str = ""  # why this variant cannot run at all (reported, not dropped)
    engine: str = ""  # kind "engine": the backend; kind "peer": the library ("natten", "fla")

    @property
    def label(self) -> str:
        return self.name + (" causal" if self.causal else "")

    @property
    def pattern_fn(self) -> Callable[..., Any] | None:
        if self.mechanism is None:
            return None
        return self.mechanism.extras.get("pattern")


def call_with_accepted(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments it accepts (all of them if it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})


def _lengths_for(m: Mechanism, config: BenchConfig) -> list[int]:
    if config.seq_lens is not None:
        lens = list(config.seq_lens)
    else:
        lens = list(QUADRATIC_LENS if is_quadratic(m.complexity) else SUBQUADRATIC_LENS)
    if m.max_bench_len is not None:
        lens = [n for n in lens if n <= m.max_bench_len]
    return lens


def default_selection(mechanisms: Sequence[Mechanism]) -> list[Mechanism]:
    """The default run's mechanisms: those marked ``in_default_bench`` plus one representative of every family
    that has none (``FAMILY_REPRESENTATIVES``, else the family's first record), so every family shows."""
    chosen = [m for m in mechanisms if m.in_default_bench]
    covered = {m.family for m in chosen}
    for family in sorted({m.family for m in mechanisms} - covered):
        members = sorted((m for m in mechanisms if m.family == family), key=lambda m: m.name)
        pick = next((m for m in members if m.name == FAMILY_REPRESENTATIVES.get(family)), members[0])
        chosen.append(pick)
    return chosen


def resolve_names(requested: Sequence[str] | None, mechanisms: Sequence[Mechanism]) -> list[Mechanism]:
    """Map names, family names or ``all`` to registry records; ``ValueError`` lists what is known."""
    by_name = {m.name: m for m in mechanisms}
    if requested is None:
        return default_selection(mechanisms)
    families = sorted({m.family for m in mechanisms})
    chosen: dict[str, Mechanism] = {}
    unknown = []
    for item in requested:
        if item == SDPA:
            continue  # the baseline is always measured
        if item == "all":
            chosen.update(by_name)
        elif item in by_name:
            chosen[item] = by_name[item]
        elif item in families:
            chosen.update({m.name: m for m in mechanisms if m.family == item})
        else:
            unknown.append(item)
    if unknown:
        import difflib

        candidates = sorted(by_name) + families + ["all", SDPA]
        close = [f"{u!r} -> {' or '.join(map(repr, difflib.get_close_matches(u, candidates, n=2, cutoff=0.6)))}"
                 for u in unknown if difflib.get_close_matches(u, candidates, n=1, cutoff=0.6)]
        hint = f". Did you mean {'; '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown mechanism(s) {', '.join(map(repr, unknown))}; known mechanisms: "
            f"{', '.join(sorted(by_name)) or '(none registered)'}; families: {', '.join(families) or '(none)'}; "
            f"'all' selects every mechanism, 'sdpa' is the built-in baseline (see `attnkit list`){hint}"
        )
    return list(chosen.values())


def _is_sparse(m: Mechanism, causal: bool, params: Mapping[str, Any], probe_len: int = 256) -> bool:
    """Whether a mechanism's pattern leaves out some (query, key) pairs (else FlexAttention is no peer)."""
    try:
        pattern = call_with_accepted(m.extras["pattern"], probe_len, causal=causal, **params)
        return float(pattern.density(probe_len, probe_len)) < 1.0
    except Exception:
        return True  # let the run report what fails


def _causal_modes(m: Mechanism | None, mode: str) -> list[bool]:
    if mode == "off":
        return [False]
    if mode == "on":
        return [True]
    if mode == "both":
        return [False, True]
    # default: non-causal, plus causal for the linear family (where causal and non-causal differ in kind)
    if m is not None and m.family == "linear" and m.causal:
        return [False, True]
    return [False]


def select_variants(config: BenchConfig, mechanisms: Sequence[Mechanism] | None = None) -> list[Variant]:
    """The variants of a run: the SDPA baseline in each causal mode used, the selected mechanisms and the
    FlexAttention peers of those that carry a sparsity pattern (``extras["pattern"]``)."""
    if mechanisms is None:
        mechanisms = list_mechanisms()
    chosen = resolve_names(config.mechanisms, mechanisms)
    variants: list[Variant] = []
    for m in chosen:
        params = {**dict(m.bench_params), **config.params.get(m.name, {})}
        for causal in _causal_modes(m, config.causal):
            why = "" if (m.causal or not causal) else "no causal form"
            variants.append(Variant(m.name, "mechanism", causal, m.family, m.exact, m.complexity, m.paper,
                                    _lengths_for(m, config), params, m, why))
            if config.flex and "pattern" in m.extras and not why and _is_sparse(m, causal, params):
                lens = _lengths_for(m, config)
                if config.seq_lens is None:
                    lens = [n for n in lens if n in FLEX_DEFAULT_LENS]
                variants.append(Variant(f"flex[{m.name}]", "flex", causal, "torch", True, m.complexity,
                                        "FlexAttention (PyTorch), with the pattern of " + m.name, lens, params, m))
            if not why:
                variants.extend(_backend_variants(m, causal, params, config))
    causal_modes = sorted({v.causal for v in variants}) or _causal_modes(None, config.causal)
    # The baseline runs at every length some quadratic-cost variant uses (it is quadratic itself).
    base_lens: set[int] = set()
    for v in variants:
        base_lens.update(v.seq_lens if (config.seq_lens is not None or is_quadratic(v.complexity))
                         else [n for n in v.seq_lens if n <= max(QUADRATIC_LENS)])
    if not base_lens:
        base_lens = set(config.seq_lens or QUADRATIC_LENS)
    baselines = [Variant(SDPA, "baseline", c, "torch", True, "O(n^2 d)",
                         "torch.nn.functional.scaled_dot_product_attention", sorted(base_lens))
                 for c in causal_modes]
    if config.all:
        variants = _round_robin(variants)
    return baselines + variants


def _round_robin(variants: list[Variant]) -> list[Variant]:
    """Families interleaved (one variant of each in turn), so a run whose budget ends early has measured some
    of every family rather than all of the first families."""
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.mechanism.family if v.mechanism is not None else v.family, []).append(v)
    out: list[Variant] = []
    queues = list(groups.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


# The backend operation each family's mechanisms run through.
FAMILY_OPERATIONS = {"exact": "attention", "neighborhood": "neighborhood", "linear": "linear"}


def _backend_variants(m: Mechanism, causal: bool, params: dict[str, Any], config: BenchConfig) -> list[Variant]:
    """``name@engine`` for each requested backend of the mechanism's operation, and the libraries' own kernels
    (NATTEN for neighborhoods, fla for causal linear attention) as peers where they are installed."""
    from attnkit.backends import list_backends

    op = FAMILY_OPERATIONS.get(m.family)
    if op is None or (op == "neighborhood" and "pattern" not in m.extras):  # e.g. dformer_3d: groups, not windows
        return []
    lens = _lengths_for(m, config)
    out = []
    names = {b.name: b for b in list_backends(op)}
    for engine in config.engines or []:
        if engine in names:
            out.append(Variant(f"{m.name}@{engine}", "engine", causal, m.family, m.exact, m.complexity,
                               f"{m.paper} (through the {engine} backend)", lens, params, m, engine=engine))
    device = torch.device(config.device).type
    if config.peers and device == "cuda":
        if op == "neighborhood" and names["natten"].installed():
            out.append(Variant(f"natten[{m.name}]", "peer", causal, "natten", True, m.complexity,
                               "NATTEN's na*d on the same grid", lens, params, m, engine="natten"))
        if op == "linear" and causal and names["fla"].installed() and "feature_map" in m.extras \
                and params.get("decay") is None:
            out.append(Variant(f"fla[{m.name}]", "peer", causal, "fla", m.exact, m.complexity,
                               "fla chunk_linear_attn on the same features", lens, params, m, engine="fla"))
    return out


def parse_param_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["performer.num_features=128"]`` -> ``{"performer": {"num_features": 128}}`` (values as Python
    literals when they parse, strings otherwise)."""
    import ast

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, param = key.rpartition(".")  # parameters have no dots; names may (linear:favor, a.b)
        if not sep or not dot or not name or not param:
            raise ValueError(f"expected MECHANISM.NAME=VALUE (e.g. performer.num_features=128), got {item!r}")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(name, {})[param] = value
    return out


def shape_params(m: Mechanism, *, heads: int, head_dim: int, seq_len: int) -> Mapping[str, int]:
    """The shape arguments a factory declared in ``needs``."""
    known = {"num_heads": heads, "head_dim": head_dim, "seq_len": seq_len, "dim": heads * head_dim}
    return {k: known[k] for k in m.needs}
