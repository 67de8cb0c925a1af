"""Text the package ships (``sample_text``, ``byte_sequences``), measuring (``perplexity``,
``attention_errors``) and training (``distill``, ``finetune``, ``attention_transfer``).

Part of :mod:`attnkit.integrations.transformers`."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from attnkit.integrations.transformers._common import CHILD
from attnkit.integrations.transformers.attention import AttnkitAttention, _recording
from attnkit.integrations.transformers.convert import attention_modules, convert, converted_layers

# ------------------------------------------------------------------------------------------------------------
# Data: text the package ships
# ------------------------------------------------------------------------------------------------------------

_TEXT_MODULES = (
    "attnkit", "attnkit.registry", "attnkit.patterns", "attnkit.score_mods", "attnkit.feature_maps",
    "attnkit.normalizations", "attnkit.cache", "attnkit.functional.exact", "attnkit.functional.linear",
    "attnkit.ops.neighborhood", "attnkit.quality.tasks",
)


def sample_text() -> str:
    """English text that ships with attnkit: the docstrings of its main modules and their public functions and
    classes, in a fixed order (about 45 kB). Deterministic; nothing is downloaded."""
    import importlib

    parts: list[str] = []
    for name in _TEXT_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", [])):
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__doc__:
                parts.append(inspect.getdoc(obj))
    return "\n\n".join(p for p in parts if p)


def byte_sequences(text: str, seq_len: int, *, stride: int | None = None) -> torch.Tensor:
    """``text`` as UTF-8 byte ids (vocabulary 256) cut into windows ``[num, seq_len]`` (``int64``) every
    ``stride`` bytes (default ``seq_len``: no overlap)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if data.numel() < seq_len:
        raise ValueError(f"text has {data.numel()} bytes, fewer than seq_len={seq_len}")
    return data.unfold(0, seq_len, stride).contiguous()


# ------------------------------------------------------------------------------------------------------------
# Measuring and training
# ------------------------------------------------------------------------------------------------------------

def _check_ids(data: torch.Tensor, name: str = "data") -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.long:
        raise TypeError(f"{name} must be token ids [num_sequences, seq_len] (torch.long), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")


def _check_inputs(data: torch.Tensor) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or not (data.dtype == torch.long
                                                                   or data.is_floating_point()):
        raise TypeError(f"data must be token ids [num_sequences, seq_len] (torch.long) or images [num, channels, "
                        f"height, width] (floating), got {getattr(data, 'dtype', type(data).__name__)} "
                        f"{tuple(getattr(data, 'shape', ()))}")


def _run(model: nn.Module, batch: torch.Tensor) -> Any:
    """One forward pass: token ids go in as ``input_ids`` (no cache), floating tensors as ``pixel_values``."""
    if batch.dtype == torch.long:
        return model(input_ids=batch, use_cache=False)
    return model(pixel_values=batch.to(next(model.parameters()).dtype))


def _chunks(data: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, data.shape[0], batch_size):
        yield data[i:i + batch_size]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, *, batch_size: int = 16) -> float:
    """``exp`` of the mean next-token cross-entropy of a causal LM on ``data [num, seq_len]``."""
    _check_ids(data)
    was, dev = model.training, _device(model)
    model.eval()
    total, count = 0.0, 0
    try:
        for ids in _chunks(data, batch_size):
            ids = ids.to(dev)
            total += float(_lm_loss(model(input_ids=ids).logits, ids, "sum"))
            count += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        model.train(was)
    return math.exp(total / count)


@torch.no_grad()
def attention_errors(model: nn.Module, data: torch.Tensor, *, batch_size: int = 16) -> dict[str, float]:
    """Per converted layer, the relative error ``||o - o_softmax|| / ||o_softmax||`` of its attention output
    against exact softmax attention on the same queries, keys and values, over ``data [num, seq_len]``. The model
    runs on the softmax outputs meanwhile, so each layer is measured on exact inputs (no compounding). ``data``
    may also be images ``[num, channels, height, width]`` for a vision model (ViT)."""
    _check_inputs(data)
    if not converted_layers(model):
        raise ValueError("the model has no converted layer; call attnkit.convert(model, mechanism=...) first")
    was, dev = model.training, _device(model)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    try:
        for ids in _chunks(data, batch_size):
            with _recording("compare") as rec:
                _run(model, ids.to(dev))
            for label, vals in rec.values.items():
                s = torch.stack(vals).pow(2).sum(0)
                sums[label] = sums.get(label, 0) + s
    finally:
        model.train(was)
    return {label: float((s[0] / s[1].clamp_min(1e-30)).sqrt()) for label, s in sums.items()}


def _batches(data: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield data[torch.randint(0, data.shape[0], (min(batch_size, data.shape[0]),), generator=g)]


@contextlib.contextmanager
def _only_training(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def distill(model: nn.Module, data: torch.Tensor, *, steps: int = 100, lr: float = 1e-2, batch_size: int = 8,
            loss: str = "hedgehog", seed: int = 0, progress: bool = True) -> list[float]:
    """Attention transfer: train the converted layers' mechanism parameters (e.g. Hedgehog feature maps) to
    mimic each layer's softmax attention; every other weight is frozen. Returns the loss of each step.

    Args:
        data: token ids ``[num, seq_len]``; random batches of ``batch_size`` rows are drawn (``seed``).
        loss: ``"hedgehog"``: cross-entropy between the softmax attention weights and the linear attention
            weights ``phi(q).phi(k) / sum`` (Hedgehog's loss; materialises ``seq_len^2`` weights per head: use
            short sequences); ``"mse"``: mean squared error of the attention outputs over the teacher's mean
            square (LoLCATs' attention transfer; any trainable mechanism).

    The model runs on the softmax outputs (the teacher) during distillation, so every layer learns from exact
    inputs, as in both papers. ``data`` may also be images ``[num, channels, height, width]`` for a vision
    model (ViT; bidirectional attention).
    """
    _check_inputs(data)
    if loss not in ("hedgehog", "mse"):
        raise ValueError(f"loss must be 'hedgehog' or 'mse', got {loss!r}")
    layers = converted_layers(model)
    params = [p for layer in layers for p in layer.parameters()]
    if not params:
        raise ValueError("the converted layers have no trainable parameters; convert with a trainable mechanism "
                         "(e.g. 'hedgehog' or 'rebased') first")
    was, dev = model.training, _device(model)
    model.eval()  # no dropout: the teacher is the model as used
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    try:
        with _only_training(model, params):
            for ids in tqdm(_batches(data, batch_size, steps, seed), total=steps, desc="distill", disable=not progress):
                with _recording("distill", loss) as rec:
                    _run(model, ids.to(dev))
                total = sum(torch.stack(v).sum() for v in rec.values.values()) / max(len(rec.values), 1)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                losses.append(float(total.detach()))
    finally:
        model.train(was)
    return losses


def finetune(model: nn.Module, data: torch.Tensor, *, steps: int = 100, lr: float = 1e-3, batch_size: int = 8,
             parameters: Iterable[nn.Parameter] | None = None, seed: int = 0, progress: bool = True) -> list[float]:
    """Train a causal LM on next-token prediction over ``data [num, seq_len]`` (random batches); returns the loss
    of each step. ``parameters``: what trains (default: every parameter of the model); the others are frozen.

    Used to pre-train a tiny model on :func:`sample_text`, and after :func:`distill` to fine-tune the converted
    model (LoLCATs fine-tunes the attention layers; pass their parameters)."""
    _check_ids(data)
    params = list(model.parameters()) if parameters is None else list(parameters)
    if not params:
        raise ValueError("parameters is empty: nothing to train")
    was, dev = model.training, _device(model)
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    try:
        with _only_training(model, params):
            for ids in tqdm(_batches(data, batch_size, steps, seed), total=steps, desc="finetune",
                            disable=not progress):
                ids = ids.to(dev)
                loss = _lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        model.train(was)
    return losses


@dataclass
class TransferReport:
    """What :func:`attention_transfer` measured (perplexities on the evaluation data; errors per layer)."""

    mechanism: str
    perplexity_softmax: float
    perplexity_converted: float
    perplexity_distilled: float
    perplexity_finetuned: float | None = None
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)
    error_finetuned: dict[str, float] = field(default_factory=dict)
    distill_losses: list[float] = field(default_factory=list)
    finetune_losses: list[float] = field(default_factory=list)

    def table(self) -> str:
        """A plain-text summary: perplexities, then the per-layer attention-output error."""
        lines = [f"mechanism {self.mechanism!r}",
                 f"perplexity  softmax {self.perplexity_softmax:.3f}  converted {self.perplexity_converted:.3f}  "
                 f"distilled {self.perplexity_distilled:.3f}"
                 + ("" if self.perplexity_finetuned is None else f"  fine-tuned {self.perplexity_finetuned:.3f}"),
                 "layer                                   error before  after distill"
                 + ("  after fine-tune" if self.error_finetuned else "")]
        for label, before in self.error_before.items():
            row = f"{label:<40}{before:>12.4f}{self.error_after.get(label, float('nan')):>15.4f}"
            if self.error_finetuned:
                row += f"{self.error_finetuned.get(label, float('nan')):>17.4f}"
            lines.append(row)
        return "\n".join(lines)


def attention_transfer(model: nn.Module, train: torch.Tensor, eval: torch.Tensor, *, mechanism: str = "hedgehog",
                       layers: Sequence[int] | None = None, distill_steps: int = 100, distill_lr: float = 1e-2,
                       loss: str = "hedgehog", finetune_steps: int = 0, finetune_lr: float = 1e-3,
                       batch_size: int = 8, seed: int = 0, progress: bool = True,
                       **params: Any) -> TransferReport:
    """The whole recipe on a causal LM: perplexity with its softmax attention; :func:`convert` the chosen
    ``layers`` to ``mechanism``; per-layer error and perplexity; :func:`distill` (``distill_steps``); error and
    perplexity again; then, if ``finetune_steps``, :func:`finetune` the converted layers' attention modules
    (projections and mechanism) and measure once more. ``train`` / ``eval``: token ids ``[num, seq_len]``."""
    _check_ids(train, "train")
    _check_ids(eval, "eval")
    ppl_soft = perplexity(model, eval, batch_size=batch_size)
    convert(model, mechanism, layers=layers, **params)
    report = TransferReport(mechanism, ppl_soft, perplexity(model, eval, batch_size=batch_size), float("nan"))
    report.error_before = attention_errors(model, eval, batch_size=batch_size)
    report.distill_losses = distill(model, train, steps=distill_steps, lr=distill_lr, batch_size=batch_size,
                                    loss=loss, seed=seed, progress=progress)
    report.error_after = attention_errors(model, eval, batch_size=batch_size)
    report.perplexity_distilled = perplexity(model, eval, batch_size=batch_size)
    if finetune_steps:
        owners = [m for _, m in attention_modules(model) if isinstance(getattr(m, CHILD, None), AttnkitAttention)
                  and getattr(m, CHILD).mechanism != "softmax"]
        params_ft = [p for m in owners for p in m.parameters()]
        report.finetune_losses = finetune(model, train, steps=finetune_steps, lr=finetune_lr,
                                          batch_size=batch_size, parameters=params_ft, seed=seed + 1,
                                          progress=progress)
        report.error_finetuned = attention_errors(model, eval, batch_size=batch_size)
        report.perplexity_finetuned = perplexity(model, eval, batch_size=batch_size)
    return report
