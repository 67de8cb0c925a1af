"""Synthetic tasks of the quality benchmark: generated from a seed, nothing downloaded.

Every generator returns a :class:`TaskBatch` of ``batch`` examples of length ``seq_len``:

- ``inputs``: token ids ``[batch, seq_len]`` (``int64``), or real vectors ``[batch, seq_len, input_dim]``
  (in-context regression);
- ``targets``: what the model predicts at each position, ``[batch, seq_len]`` (class ids, or real values for
  regression), or ``[batch]`` for a task that classifies the whole sequence (ListOps);
- ``mask``: ``[batch, seq_len]`` bool, the positions that are scored (for ListOps: the non-padding tokens that
  are pooled).

Tasks:

- :func:`mqar`: multi-query associative recall exactly as in Zoology (Arora et al., "Zoology: Measuring and
  Improving Recall in Efficient Language Models", 2023), used by Based ("Simple linear attention language models
  balance the recall-throughput tradeoff", 2024) and ReBased ("Linear Transformers with Learnable Kernel
  Functions are Better In-Context Models", 2024).
- :func:`listops`: nested ``MIN MAX MED SM`` expressions of Long Range Arena (Tay et al., 2020; ListOps of
  Nangia & Bowman, 2018) at shorter lengths; :func:`evaluate_listops` is the reference interpreter.
- :func:`copy_task`: copy a span after a separator; ``selective=True`` is the selective copy of Mamba (Gu & Dao,
  2023): the tokens to copy are scattered among blanks.
- :func:`icl_regression`: in-context linear regression (Garg et al., 2022; "In-Context Linear Regression
  Demystified", 2025): ``y = w . x`` with a fresh ``w`` per sequence.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "TaskBatch", "Task", "TASKS", "get_task", "mqar", "listops", "evaluate_listops", "listops_tokens",
    "copy_task", "icl_regression", "IGNORE",
]

IGNORE = -100  # target of an unscored position (as in Zoology and torch.nn.functional.cross_entropy)


@dataclass
class TaskBatch:
    """A batch of examples; see the module docstring for the shapes."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# -- MQAR -----------------------------------------------------------------------------------------------------
def mqar(batch: int, *, seq_len: int = 64, num_kv_pairs: int = 8, vocab_size: int = 128, power_a: float = 0.01,
         random_non_queries: bool = True, seed: int = 0) -> TaskBatch:
    """Multi-query associative recall as defined by Zoology's ``multiquery_ar``.

    The first ``2 * num_kv_pairs`` tokens are key-value pairs (keys drawn without replacement from
    ``[1, vocab_size // 2)``, values from ``[vocab_size // 2, vocab_size)``). Each key is queried once later, at
    position ``2 * num_kv_pairs + 2 * gap`` where the ``gap``s are drawn without replacement from
    ``0 .. (seq_len - 2 * num_kv_pairs) // 2 - 1`` with probability proportional to ``(gap + 1) ** (power_a - 1)``
    (a power law: most queries come soon after the context, ``power_a = 1`` is uniform). The target at a query
    position is the key's value; every other position is unscored (``IGNORE``). With ``random_non_queries`` the
    remaining positions hold random tokens of the whole vocabulary instead of 0.

    Returns ``inputs [batch, seq_len]`` int64, ``targets [batch, seq_len]`` (values or ``IGNORE``), ``mask``
    ``targets != IGNORE``.
    """
    _check_positive("batch", batch)
    _check_positive("seq_len", seq_len, 4)
    _check_positive("num_kv_pairs", num_kv_pairs)
    _check_positive("vocab_size", vocab_size, 4)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even for MQAR (pairs of tokens), got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must exceed seq_len for MQAR (as in Zoology), got vocab_size={vocab_size}, "
                         f"seq_len={seq_len}; raise --vocab-size")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR needs seq_len >= 4 * num_kv_pairs (the pairs and as many query slots), got "
                         f"seq_len={seq_len}, num_kv_pairs={num_kv_pairs}")
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(f"num_kv_pairs={num_kv_pairs} exceeds the {vocab_size // 2 - 1} distinct keys of "
                         f"vocab_size={vocab_size}")
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    g = _generator(seed)
    context = 2 * num_kv_pairs
    key_vocab = vocab_size // 2
    # Distinct keys and values per example: the first num_kv_pairs of a random permutation.
    keys = torch.rand(batch, key_vocab - 1, generator=g).argsort(dim=1)[:, :num_kv_pairs] + 1
    values = torch.rand(batch, vocab_size - key_vocab, generator=g).argsort(dim=1)[:, :num_kv_pairs] + key_vocab
    space = (seq_len - context) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(batch, space), num_kv_pairs, replacement=False, generator=g)

    seq = torch.zeros(batch, seq_len + 1, dtype=torch.int64)
    seq[:, 0:context:2] = keys
    seq[:, 1:context:2] = values
    query_pos = context + 2 * gaps  # position of each query key in the (unshifted) sequence
    seq.scatter_(1, query_pos, keys)
    labels = torch.full((batch, seq_len + 1), IGNORE, dtype=torch.int64)
    labels.scatter_(1, query_pos + 1, values)
    # Language-model shift: the input at t predicts the label of t + 1, so a query key's target is its value.
    inputs, targets = seq[:, :-1].clone(), labels[:, 1:].clone()
    if random_non_queries:
        filler = torch.randint(vocab_size, inputs.shape, generator=g)
        inputs = torch.where(inputs == 0, filler, inputs)
    return TaskBatch(inputs, targets, targets != IGNORE)


# -- ListOps -------------------------------------------------------------------------------------------------
LISTOPS_OPERATORS = ("MIN", "MAX", "MED", "SM")
# Vocabulary: 0 = padding, 1..10 = digits 0..9, then "[MIN" "[MAX" "[MED" "[SM", then "]".
LISTOPS_PAD = 0
LISTOPS_VOCAB = ["<pad>"] + [str(i) for i in range(10)] + ["[" + op for op in LISTOPS_OPERATORS] + ["]"]
_LISTOPS_ID = {tok: i for i, tok in enumerate(LISTOPS_VOCAB)}


def _apply(op: str, args: Sequence[int]) -> int:
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "MED":
        return int(statistics.median(args))  # as the original ListOps: int(np.median(...)), i.e. floored
    if op == "SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def _listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, leaf_p: float) -> Any:
    """A random expression tree: an int leaf or ``(op, [children])``; the root is always an operator."""
    if depth > 0 and (depth >= max_depth or rng.random() < leaf_p):
        return rng.randrange(10)
    op = rng.choice(LISTOPS_OPERATORS)
    n = rng.randint(2, max_args)
    return (op, [_listops_tree(rng, depth + 1, max_depth, max_args, leaf_p) for _ in range(n)])


def _tree_value(tree: Any) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    return _apply(op, [_tree_value(c) for c in children])


def _tree_tokens(tree: Any) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    out = ["[" + op]
    for c in children:
        out += _tree_tokens(c)
    return out + ["]"]


def evaluate_listops(tokens: Sequence[str] | str) -> int:
    """Reference interpreter: the value of a ListOps expression such as ``"[MAX 2 9 [MIN 4 7 ] 0 ]"``.

    Accepts a string (whitespace-separated tokens) or a token list; a stack machine independent of the generator.
    """
    if isinstance(tokens, str):
        tokens = tokens.split()
    stack: list[list[Any]] = []
    result: int | None = None
    for tok in tokens:
        if tok == "<pad>":
            continue
        if tok.startswith("["):
            stack.append([tok[1:]])
        elif tok == "]":
            if not stack:
                raise ValueError("unbalanced ListOps expression: ']' without an operator")
            op, *args = stack.pop()
            if not args:
                raise ValueError(f"ListOps operator {op} has no arguments")
            value = _apply(op, args)
            if stack:
                stack[-1].append(value)
            else:
                result = value
        elif tok.isdigit() and len(tok) == 1:
            if not stack:
                raise ValueError(f"ListOps digit {tok} outside an operator")
            stack[-1].append(int(tok))
        else:
            raise ValueError(f"unknown ListOps token {tok!r}")
    if stack or result is None:
        raise ValueError("unbalanced or empty ListOps expression")
    return result


def listops_tokens(ids: torch.Tensor) -> list[str]:
    """Token ids ``[seq]`` back to ListOps tokens (padding dropped)."""
    return [LISTOPS_VOCAB[i] for i in ids.tolist() if i != LISTOPS_PAD]


def listops(batch: int, *, seq_len: int = 128, min_len: int | None = None, max_depth: int = 4, max_args: int = 5,
            leaf_p: float = 0.6, seed: int = 0) -> TaskBatch:
    """ListOps expressions as in Long Range Arena: nested ``[MIN``, ``[MAX``, ``[MED`` (median, floored) and
    ``[SM`` (sum modulo 10) over digits; the target is the expression's value (10 classes).

    Trees are drawn with at most ``max_depth`` levels and ``2..max_args`` arguments per operator (an argument is
    a digit with probability ``leaf_p``), and redrawn until their length lies in ``[min_len, seq_len]``
    (``min_len`` defaults to ``seq_len // 4``); shorter expressions are right-padded with 0.

    Returns ``inputs [batch, seq_len]`` int64 (ids of :data:`LISTOPS_VOCAB`), ``targets [batch]`` in 0..9 and
    ``mask [batch, seq_len]`` (the non-padding tokens).
    """
    _check_positive("batch", batch)
    _check_positive("seq_len", seq_len, 4)
    _check_positive("max_depth", max_depth)
    _check_positive("max_args", max_args, 2)
    min_len = max(4, seq_len // 4) if min_len is None else _check_positive("min_len", min_len)
    if min_len > seq_len:
        raise ValueError(f"min_len={min_len} exceeds seq_len={seq_len}")
    if not 0 <= leaf_p < 1:
        raise ValueError(f"leaf_p must lie in [0, 1), got {leaf_p}")
    rng = random.Random(int(seed))
    inputs = torch.full((batch, seq_len), LISTOPS_PAD, dtype=torch.int64)
    targets = torch.empty(batch, dtype=torch.int64)
    for i in range(batch):
        for _ in range(10_000):
            tree = _listops_tree(rng, 0, max_depth, max_args, leaf_p)
            toks = _tree_tokens(tree)
            if min_len <= len(toks) <= seq_len:
                break
        else:
            raise ValueError(f"no ListOps expression of length {min_len}..{seq_len} was drawn with max_depth="
                             f"{max_depth}, max_args={max_args}, leaf_p={leaf_p}; widen the range or the trees")
        inputs[i, : len(toks)] = torch.tensor([_LISTOPS_ID[t] for t in toks])
        targets[i] = _tree_value(tree)
    return TaskBatch(inputs, targets, inputs != LISTOPS_PAD)


# -- copy ----------------------------------------------------------------------------------------------------
def copy_task(batch: int, *, seq_len: int = 64, num_tokens: int = 16, vocab_size: int = 16, selective: bool = False,
              seed: int = 0) -> TaskBatch:
    """Copy ``num_tokens`` data tokens (ids ``0..vocab_size - 1``) after a separator (id ``vocab_size + 1``).

    Plain copy: the data span is preceded by blanks (id ``vocab_size``) and sits right before the separator.
    ``selective=True``: the data tokens are scattered at random positions among blanks (selective copying,
    Mamba). In both, the separator and the following copies are teacher-forced: the input at the separator
    predicts the first data token, the input holding copy ``i`` predicts data token ``i + 1``. Layout:
    ``[context (seq_len - num_tokens), SEP, copy_1 .. copy_{num_tokens - 1}]``.

    Returns ``inputs [batch, seq_len]``, ``targets [batch, seq_len]`` (``IGNORE`` before the separator), ``mask``.
    """
    _check_positive("batch", batch)
    _check_positive("num_tokens", num_tokens)
    _check_positive("vocab_size", vocab_size, 2)
    _check_positive("seq_len", seq_len, 2 * num_tokens)
    g = _generator(seed)
    blank, sep = vocab_size, vocab_size + 1
    ctx = seq_len - num_tokens
    data = torch.randint(vocab_size, (batch, num_tokens), generator=g)
    inputs = torch.full((batch, seq_len), blank, dtype=torch.int64)
    if selective:
        pos = torch.rand(batch, ctx, generator=g).argsort(dim=1)[:, :num_tokens].sort(dim=1).values
    else:
        pos = torch.arange(ctx - num_tokens, ctx).expand(batch, num_tokens)
    inputs.scatter_(1, pos, data)
    inputs[:, ctx] = sep
    inputs[:, ctx + 1:] = data[:, :-1]
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.int64)
    targets[:, ctx:] = data
    return TaskBatch(inputs, targets, targets != IGNORE)


# -- in-context linear regression ---------------------------------------------------------------------------
def icl_regression(batch: int, *, seq_len: int = 32, dim: int = 4, noise_std: float = 0.0,
                   layout: str = "paired", seed: int = 0) -> TaskBatch:
    """In-context linear regression: per sequence ``w ~ N(0, I_dim)``, ``x_i ~ N(0, I_dim)``,
    ``y_i = w . x_i + noise_std * eps``; the model predicts ``y_i`` from the earlier pairs and ``x_i``.

    ``layout="paired"`` (the default, as "In-Context Linear Regression Demystified"): tokens ``[x_i, y_i]`` for
    ``seq_len - 1`` points and a query ``[x_q, 0]``, only the query scored. ``layout="interleaved"`` (Garg et
    al., 2022): tokens ``[x_1, 0], [0, y_1], [x_2, 0], ...`` (``seq_len / 2`` points), every ``x`` token scored
    with its ``y`` (harder for a small model: it must first bring each ``y`` next to its ``x``).
    Inputs are ``[batch, seq_len, dim + 1]`` float32; ``targets [batch, seq_len]`` float32 (0 where unscored);
    ``mask`` the scored positions. ``Var(y) = dim`` (without noise), so MSE / dim is the normalised
    error (1 for predicting 0).
    """
    _check_positive("batch", batch)
    _check_positive("dim", dim)
    _check_positive("seq_len", seq_len, 2)
    if layout not in ("interleaved", "paired"):
        raise ValueError(f"layout must be 'interleaved' or 'paired', got {layout!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    g = _generator(seed)
    points = seq_len // 2 if layout == "interleaved" else seq_len
    w = torch.randn(batch, dim, generator=g)
    x = torch.randn(batch, points, dim, generator=g)
    y = torch.einsum("bnd,bd->bn", x, w) + noise_std * torch.randn(batch, points, generator=g)
    inputs = torch.zeros(batch, seq_len, dim + 1)
    targets = torch.zeros(batch, seq_len)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    if layout == "interleaved":
        n = 2 * points
        inputs[:, 0:n:2, :dim] = x
        inputs[:, 1:n:2, dim] = y
        targets[:, 0:n:2] = y
        mask[:, 0:n:2] = True
    else:
        inputs[:, :, :dim] = x
        inputs[:, :-1, dim] = y[:, :-1]
        targets[:, -1] = y[:, -1]
        mask[:, -1] = True
    return TaskBatch(inputs, targets, mask)


# -- task records --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """How the benchmark trains and scores on a generator.

    ``kind``: ``"token"`` (class per scored position), ``"sequence"`` (one class per example, read from the
    mean of the final hidden states over ``mask``) or ``"regression"`` (a real value per scored position).
    ``metric``: ``"accuracy"`` (higher is better) or ``"nmse"`` (MSE / Var(y), lower is better).
    """

    name: str
    generate: Callable[..., TaskBatch]
    kind: str
    causal: bool
    metric: str
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    paper: str = ""

    def params(self, **overrides: Any) -> dict[str, Any]:
        """The generator's parameters: the defaults with ``overrides`` (``None`` values ignored)."""
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"task {self.name!r} has no parameters {sorted(unknown)}; its parameters: "
                             f"{', '.join(sorted(self.defaults))}")
        return {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}

    def vocab_size(self, params: dict[str, Any]) -> int | None:
        """Input vocabulary (``None`` for real-valued inputs)."""
        if self.name == "mqar":
            return params["vocab_size"]
        if self.name == "listops":
            return len(LISTOPS_VOCAB)
        if self.name in ("copy", "selective-copy"):
            return params["vocab_size"] + 2
        return None

    def input_dim(self, params: dict[str, Any]) -> int | None:
        return params["dim"] + 1 if self.kind == "regression" else None

    def num_outputs(self, params: dict[str, Any]) -> int:
        """Classes of the readout (1 for regression)."""
        if self.kind == "regression":
            return 1
        if self.name == "listops":
            return 10
        return self.vocab_size(params)  # type: ignore[return-value]

    def sample(self, batch: int, seed: int, params: dict[str, Any]) -> TaskBatch:
        return self.generate(batch, seed=seed, **params)


def _selective_copy(batch: int, **kw: Any) -> TaskBatch:
    return copy_task(batch, selective=True, **kw)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("mqar", mqar, "token", True, "accuracy",
             {"seq_len": 128, "num_kv_pairs": 8, "vocab_size": 256, "power_a": 0.01},
             "multi-query associative recall: recall the value of each queried key",
             "Zoology (Arora et al., 2023); Based (Arora et al., 2024)"),
        Task("listops", listops, "sequence", False, "accuracy",
             {"seq_len": 128, "max_depth": 4, "max_args": 5},
             "value (0-9) of a nested MIN/MAX/MED/SUM_MOD expression", "Long Range Arena (Tay et al., 2020)"),
        Task("copy", copy_task, "token", True, "accuracy", {"seq_len": 64, "num_tokens": 16, "vocab_size": 16},
             "copy a span of tokens after a separator", "copying task (e.g. Jelassi et al., 2024)"),
        Task("selective-copy", _selective_copy, "token", True, "accuracy",
             {"seq_len": 64, "num_tokens": 16, "vocab_size": 16},
             "copy the tokens scattered among blanks, in order", "Mamba (Gu & Dao, 2023)"),
        Task("icl-regression", icl_regression, "regression", True, "nmse",
             {"seq_len": 32, "dim": 4, "noise_std": 0.0, "layout": "paired"},
             "predict y = w.x from earlier (x, y) pairs with a fresh w per sequence",
             "Garg et al., 2022; In-Context Linear Regression Demystified (2025)"),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; raises ``ValueError`` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
