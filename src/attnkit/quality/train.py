"""Training and scoring: one small model per mechanism on freshly generated data, a fixed budget of steps.

``run_quality(config)`` returns a JSON-ready document (schema :data:`SCHEMA`): per task and mechanism the
metric (accuracy, or normalised MSE for regression), the state size, training time, parameters and the loss
curve. Data are seeded: training batch ``i`` and the held-out evaluation set are the same for every mechanism.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from attnkit.quality.model import MechanismSpec, QualityModel, parse_mechanism, state_size
from attnkit.quality.tasks import Task, TaskBatch, get_task

__all__ = ["QualityConfig", "run_quality", "train_one", "evaluate", "loss_and_metric", "DEFAULT_MECHANISMS",
           "SCHEMA", "mechanism_overrides", "make_eval_data"]

SCHEMA = "attnkit-quality/1"

# Softmax (KV cache), a sliding window (fixed cache) and linear attention with feature maps of growing state:
# ELU (Katharopoulos et al.), FAVOR+ (Performer), Taylor (Based) and ReBased.
DEFAULT_MECHANISMS = ("softmax", "sliding_window", "linear:elu", "linear:favor", "linear:taylor", "linear:rebased")


@dataclass
class QualityConfig:
    """One ``attnkit quality`` run. ``task_params`` maps a task name to generator overrides; ``params`` maps a
    mechanism spec to parameter overrides (``--param sliding_window.window=8``)."""

    tasks: Sequence[str] = ("mqar",)
    mechanisms: Sequence[str] = DEFAULT_MECHANISMS
    task_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    embed_dim: int = 64
    num_heads: int = 2
    num_layers: int = 2
    mlp_ratio: int = 2
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 60
    eval_examples: int = 512
    seed: int = 0
    device: str = "cpu"
    curve_points: int = 40

    def check(self) -> None:
        for name in ("embed_dim", "num_heads", "num_layers", "mlp_ratio", "steps", "batch", "eval_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.tasks:
            raise ValueError("no task selected; choose from mqar, listops, copy, selective-copy, icl-regression")
        if not self.mechanisms:
            raise ValueError("no mechanism selected; see `attnkit list` or use linear:<feature map>")


def mechanism_overrides(config: QualityConfig, name: str) -> dict[str, Any]:
    """``config.params`` for the mechanism entry ``name``: those given for its base name (before ``@``) except
    the ones the entry sets after ``@``, then those given for the entry itself."""
    from attnkit.quality.model import _variant

    base, inline = _variant(name)
    shared = {k: v for k, v in config.params.get(base, {}).items() if k not in inline}
    return {**shared, **(config.params.get(name, {}) if name != base else {})}


def _seed(base: int, split: int, index: int) -> int:
    """Disjoint seeds for training batches (split 0) and the evaluation set (split 1)."""
    return (base * 10_000_019 + index) * 2 + split


def loss_and_metric(task: Task, out: torch.Tensor, batch: TaskBatch, params: dict[str, Any]
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss and metric sums of one batch: ``(loss, {"correct"|"sq_err": ..., "count": ...})``.

    Token tasks: cross-entropy over the scored positions; sequence tasks: cross-entropy of the pooled
    prediction; regression: MSE over the scored positions, plus the squared error of each sequence's last
    scored position (``last_sq_err``, ``last_count``).
    """
    if task.kind == "sequence":
        loss = F.cross_entropy(out.float(), batch.targets)
        correct = (out.detach().argmax(-1) == batch.targets).sum()
        return loss, {"correct": float(correct), "count": float(batch.targets.numel())}
    m = batch.mask
    if task.kind == "token":
        logits = out[m].float()
        target = batch.targets[m]
        loss = F.cross_entropy(logits, target)
        correct = (logits.detach().argmax(-1) == target).sum()
        return loss, {"correct": float(correct), "count": float(target.numel())}
    pred = out.squeeze(-1).float()
    err = (pred - batch.targets) ** 2
    loss = err[m].mean()
    err = err.detach()
    last = m.shape[1] - 1 - m.flip(1).to(torch.int64).argmax(dim=1)  # last scored position of each sequence
    last_err = err.gather(1, last[:, None])
    return loss, {"sq_err": float(err[m].sum()), "count": float(m.sum()), "last_sq_err": float(last_err.sum()),
                  "last_count": float(last_err.numel())}


def _y_variance(params: dict[str, Any]) -> float:
    return float(params["dim"]) + float(params.get("noise_std", 0.0)) ** 2


def evaluate(model: QualityModel, task: Task, params: dict[str, Any], data: list[TaskBatch]) -> dict[str, float]:
    """The metric on held-out batches: ``{"accuracy"}`` or ``{"nmse", "nmse_all"}`` plus ``"eval_loss"``."""
    model.eval()
    sums: dict[str, float] = {}
    losses = []
    with torch.no_grad():
        for b in data:
            out = model(b.inputs, b.mask)
            loss, s = loss_and_metric(task, out, b, params)
            losses.append(float(loss))
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + v
    model.train()
    res = {"eval_loss": sum(losses) / len(losses)}
    if task.metric == "accuracy":
        res["accuracy"] = sums["correct"] / max(sums["count"], 1.0)
    else:
        var = _y_variance(params)
        res["nmse"] = sums["last_sq_err"] / max(sums["last_count"], 1.0) / var
        res["nmse_all"] = sums["sq_err"] / max(sums["count"], 1.0) / var
    return res


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_one(spec: MechanismSpec, task: Task, params: dict[str, Any], config: QualityConfig, *,
              eval_data: list[TaskBatch] | None = None,
              on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train a fresh :class:`QualityModel` with ``spec`` on ``task`` for ``config.steps`` steps; return the
    result record (metric, losses, time, state size)."""
    device = torch.device(config.device)
    seq_len = int(params["seq_len"])
    torch.manual_seed(config.seed)  # the same initialisation stream for every mechanism
    model = QualityModel(spec, vocab_size=task.vocab_size(params), input_dim=task.input_dim(params),
                         num_outputs=task.num_outputs(params), embed_dim=config.embed_dim,
                         num_heads=config.num_heads, num_layers=config.num_layers, mlp_ratio=config.mlp_ratio,
                         max_seq_len=seq_len, causal=task.causal, pool=task.kind == "sequence").to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "pos" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, config.steps, config.warmup))
    every = max(1, config.steps // max(1, config.curve_points))
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    train_s = 0.0
    first_loss = None
    for step in range(config.steps):
        batch = task.sample(config.batch, _seed(config.seed, 0, step), params).to(device)
        t0 = time.perf_counter()
        out = model(batch.inputs, batch.mask)
        loss, _ = loss_and_metric(task, out, batch, params)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        window.append(value)
        if (step + 1) % every == 0 or step + 1 == config.steps:
            curve.append((step + 1, sum(window) / len(window)))
            window = []
        if on_step is not None:
            on_step(step, value)
    if eval_data is None:
        eval_data = make_eval_data(task, params, config)
    t0 = time.perf_counter()
    metrics = evaluate(model, task, params, [b.to(device) for b in eval_data])
    eval_s = time.perf_counter() - t0
    head_dim = config.embed_dim // config.num_heads
    per_head, kind = state_size(spec, head_dim=head_dim, num_heads=config.num_heads, seq_len=seq_len)
    layers_heads = config.num_layers * config.num_heads
    return {
        "mechanism": spec.name, "family": spec.family, "paper": spec.paper, "status": "ok", "message": "",
        "params": {k: v for k, v in spec.params.items()},
        "metric": task.metric, "value": metrics[task.metric], **metrics,
        "first_loss": first_loss, "final_loss": curve[-1][1] if curve else None, "loss_curve": curve,
        "train_s": train_s, "eval_s": eval_s, "steps": config.steps,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "state_kind": kind, "state_per_head": per_head,
        "state_elements": None if per_head is None else per_head * layers_heads,
        "state_bytes": None if per_head is None else per_head * layers_heads * 4,
    }


def make_eval_data(task: Task, params: dict[str, Any], config: QualityConfig) -> list[TaskBatch]:
    """The held-out evaluation set (the same for every mechanism), in batches of ``config.batch``."""
    out, left, i = [], config.eval_examples, 0
    while left > 0:
        n = min(config.batch, left)
        out.append(task.sample(n, _seed(config.seed, 1, i), params))
        left, i = left - n, i + 1
    return out


def _failed(spec_name: str, status: str, message: str, task: Task) -> dict[str, Any]:
    return {"mechanism": spec_name, "status": status, "message": message, "metric": task.metric, "value": None}


def run_quality(config: QualityConfig, *, progress: bool = True,
                on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train every mechanism of ``config`` on every task; returns the results document (see module doc).

    A mechanism that cannot run a task (no causal form for a causal task, or an error) gets a record with
    ``status`` ``"n/a"`` or ``"failed"`` and the reason; the others go on. Ctrl-C stops the run and returns
    what was gathered with ``interrupted: true``.
    """
    from attnkit.bench.machine import describe_machine
    from attnkit.errors import NotSupportedError

    config.check()
    tasks = [get_task(t) for t in config.tasks]
    task_params = {t.name: t.params(**config.task_params.get(t.name, {})) for t in tasks}
    specs = [parse_mechanism(m, mechanism_overrides(config, m)) for m in config.mechanisms]
    device = torch.device(config.device)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "config": asdict(config) | {"tasks": list(config.tasks),
                                                      "mechanisms": list(config.mechanisms)},
        "machine": describe_machine(device), "tasks": [], "interrupted": False, "elapsed_s": 0.0,
    }
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * len(specs) * config.steps, unit="step", dynamic_ncols=True, leave=True)
    try:
        for task in tasks:
            params = task_params[task.name]
            entry = {"task": task.name, "kind": task.kind, "causal": task.causal, "metric": task.metric,
                     "summary": task.summary, "paper": task.paper, "params": params, "results": []}
            doc["tasks"].append(entry)
            eval_data = make_eval_data(task, params, config)
            for spec in specs:
                if bar is not None:
                    bar.set_description(f"{task.name}: {spec.name}")

                def tick(step: int, loss: float) -> None:
                    if bar is not None:
                        bar.update(1)
                        if step % 10 == 0:
                            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

                done_before = bar.n if bar is not None else 0
                try:
                    if task.causal and not spec.causal:
                        raise NotSupportedError(f"{spec.name} has no causal form; {task.name} is a causal task")
                    rec = train_one(spec, task, params, config, eval_data=eval_data, on_step=tick)
                except NotSupportedError as exc:
                    rec = _failed(spec.name, "n/a", str(exc).splitlines()[0], task)
                except (RuntimeError, ValueError, TypeError, FloatingPointError) as exc:
                    rec = _failed(spec.name, "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0]}", task)
                if bar is not None:  # keep the bar's total right when a mechanism stopped early
                    bar.update(done_before + config.steps - bar.n)
                rec.setdefault("family", spec.family)
                entry["results"].append(rec)
                doc["elapsed_s"] = time.perf_counter() - start
                if on_result is not None:
                    on_result(doc)
    except KeyboardInterrupt:
        doc["interrupted"] = True
    finally:
        if bar is not None:
            bar.close()
    doc["elapsed_s"] = time.perf_counter() - start
    return doc
