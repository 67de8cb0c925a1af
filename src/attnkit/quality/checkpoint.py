"""Checkpoints of the quality benchmark: ``attnkit quality --save DIR`` writes one file per trained (task,
mechanism), holding the weights and everything needed to rebuild the model; :func:`load_checkpoint` rebuilds it.

File ``DIR/<task>--<mechanism>.pt`` (``torch.save`` of plain data, loadable with ``weights_only=True``)::

    {"format": "attnkit-quality-checkpoint/1",
     "state_dict": {...},                      # QualityModel weights (and buffers)
     "info": {"spec": {...},                   # MechanismSpec fields: name, family, causal, feature_map, params,
                                               #   paper, base, kind
              "model": {...},                  # QualityModel keyword arguments (shape, conv_kernel, causal, pool)
              "task": "mqar", "task_params": {...},
              "training": {...},               # steps, batch, lr (the best of the sweep), seed, weight_decay, ...
              "metric": "accuracy", "value": 0.99, "state_bytes": ..., "attnkit_version": "..."}}

A checkpoint of a registry mechanism (or token mixer) needs that mechanism registered when it is loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "checkpoint_name", "model_kwargs"]

FORMAT = "attnkit-quality-checkpoint/1"


def checkpoint_name(task: str, mechanism: str) -> str:
    """The file name of a (task, mechanism) checkpoint: unsafe characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{task}--{mechanism}") + ".pt"


def model_kwargs(task: Any, params: dict[str, Any], config: Any) -> dict[str, Any]:
    """The keyword arguments of :class:`attnkit.quality.model.QualityModel` (besides the spec) for ``task`` (a
    :class:`attnkit.quality.tasks.Task`) and ``config`` (a :class:`attnkit.quality.train.QualityConfig`)."""
    return {"vocab_size": task.vocab_size(params), "input_dim": task.input_dim(params),
            "num_outputs": task.num_outputs(params), "embed_dim": config.embed_dim, "num_heads": config.num_heads,
            "num_layers": config.num_layers, "mlp_ratio": config.mlp_ratio, "max_seq_len": int(params["seq_len"]),
            "causal": task.causal, "pool": task.kind == "sequence", "conv_kernel": config.conv_kernel}


def save_checkpoint(out_dir: str | os.PathLike, *, spec: Any, task: Any, task_params: dict[str, Any], config: Any,
                    state_dict: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
    """Write the checkpoint of one trained model into ``out_dir``; returns its path."""
    from dataclasses import asdict

    from attnkit._version import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "spec": asdict(spec), "model": model_kwargs(task, task_params, config), "task": task.name,
        "task_params": dict(task_params),
        "training": {"steps": config.steps, "batch": config.batch, "lr": record.get("lr"),
                     "seed": record.get("seeds", [config.seeds[0]])[0], "weight_decay": config.weight_decay,
                     "warmup": config.warmup, "lrs": list(config.lrs)},
        "metric": record.get("metric"), "value": record.get("value"), "state_bytes": record.get("state_bytes"),
        "attnkit_version": __version__,
    }
    path = out / checkpoint_name(task.name, spec.name)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                "info": info}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu"
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint written by ``attnkit quality --save``: ``(model, info)``, the model in
    eval mode with its trained weights, ``info`` as described in the module docstring.

    Raises ``ValueError`` for a file that is not such a checkpoint.
    """
    from attnkit.quality.model import MechanismSpec, QualityModel

    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not an attnkit quality checkpoint (expected format {FORMAT!r}); write one with "
                         f"`attnkit quality --save DIR`")
    info = blob["info"]
    model = QualityModel(MechanismSpec(**info["spec"]), **info["model"])
    model.load_state_dict(blob["state_dict"])
    if map_location is not None:
        model.to(map_location)
    model.eval()
    return model, info
