"""``attnkit analyze CHECKPOINT``: the analysis report of a model saved by ``attnkit quality --save``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", type=Path, metavar="CHECKPOINT",
                   help="a .pt file written by `attnkit quality --save DIR` (or a directory of them)")
    p.add_argument("--out", type=Path, default=Path("attnkit-analysis"),
                   help="report directory (one subdirectory per checkpoint; default ./attnkit-analysis)")
    p.add_argument("--batch", type=int, default=8, help="examples of the checkpoint's task to analyze (default 8)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the generated examples")
    p.add_argument("--no-head-importance", action="store_true",
                   help="skip head importance (one extra forward per head)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _task_loss(model, batch, pool: bool):
    def loss_fn(m) -> torch.Tensor:
        out = m(batch.inputs, batch.mask) if pool else m(batch.inputs)
        if batch.targets.dtype.is_floating_point:  # regression: mean squared error over the scored positions
            err = (out.squeeze(-1) - batch.targets).square()
            return err[batch.mask].mean() if not pool else err.mean()
        if pool:
            return F.cross_entropy(out, batch.targets)
        return F.cross_entropy(out[batch.mask], batch.targets[batch.mask])

    return loss_fn


def run(args: argparse.Namespace) -> int:
    from attnkit.analysis.report import analyze
    from attnkit.quality import load_checkpoint
    from attnkit.quality.tasks import get_task

    parser = args._parser
    if args.batch < 1:
        parser.error(f"argument --batch: must be >= 1, got {args.batch}")
    files: list[Path] = []
    for path in args.checkpoints:
        if path.is_dir():
            files += sorted(path.glob("*.pt"))
        elif path.is_file():
            files.append(path)
        else:
            parser.error(f"argument CHECKPOINT: {path} does not exist")
    if not files:
        parser.error("no checkpoints (*.pt) found; write them with `attnkit quality --save DIR`")
    from attnkit.cli import _check_out

    _check_out(args.out, parser)
    iterator = files
    if not args.no_progress and len(files) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc="analyze", unit="checkpoint")
    failed: list[Path] = []
    for path in iterator:
        try:
            model, info = load_checkpoint(path)
            try:
                task = get_task(info["task"])
                batch = task.sample(args.batch, args.seed, info["task_params"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: its task {info['task']!r} with parameters {info['task_params']} does "
                                 f"not generate examples here: {e}") from None
        except (ValueError, OSError) as e:  # reported, and the other checkpoints go on
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"
            print(f"attnkit analyze: error: {msg}", file=sys.stderr)
            failed.append(path)
            continue
        pool = bool(info["model"].get("pool"))
        inputs = (batch.inputs, batch.mask) if pool else (batch.inputs,)
        spec = info["spec"]
        desc = (f"Checkpoint {path.name}: {spec['name']} trained on {info['task']} "
                f"({info.get('metric')} {info.get('value')}); {args.batch} generated examples, seed {args.seed}.")
        out = args.out / path.stem
        summary = analyze(model, inputs, out, title=f"attnkit analyze: {spec['name']} on {info['task']}",
                          description=desc, plots=not args.no_plots, progress=not args.no_progress,
                          loss_fn=None if args.no_head_importance else _task_loss(model, batch, pool))
        print(f"{path.name}: {len(summary['layers'])} attention layers -> {out}/report.html")
    if failed:
        print(f"attnkit analyze: {len(failed)} of {len(files)} checkpoints could not be read: "
              f"{', '.join(str(p) for p in failed)}", file=sys.stderr)
        return 2
    return 0
