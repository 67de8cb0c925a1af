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

import contextlib
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
    try:
        torch.save({"format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                    "info": info}, tmp)
        tmp.replace(path)
    except BaseException:  # a full disk, Ctrl-C: no partial .pt.tmp is left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def _not_a_checkpoint(path: Any, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid attnkit quality checkpoint ({why}); write one with "
                      f"`attnkit quality --save DIR`")


def _check_sizes(path: Any, model_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """The model's sizes fit in what the file's tensors hold, checked before anything is allocated: every
    integer size is at most the number of stored elements, and so are the embedding (vocabulary x width) and
    one width x width projection."""
    held = sum(t.numel() for t in state_dict.values())
    sizes = {k: v for k, v in model_kwargs.items() if isinstance(v, int) and not isinstance(v, bool)}
    for key, value in sizes.items():
        if value < 0 or value > max(held, 1):
            raise _not_a_checkpoint(path, f"its config asks for {key}={value}, but the file's tensors hold only "
                                          f"{held} numbers")
    width = sizes.get("embed_dim", 0)
    for what, need in (("vocab_size x embed_dim", sizes.get("vocab_size", 0) * width),
                       ("num_layers x embed_dim^2 (each block's MLP)", sizes.get("num_layers", 0) * width * width)):
        if need > held:
            raise _not_a_checkpoint(path, f"its config asks for {what} = {need} weights, but the file's tensors "
                                          f"hold only {held} numbers")


def _check_weights(path: Any, want: dict[str, torch.Tensor], have: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise _not_a_checkpoint(path, f"its weights are not those of the model of its config: "
                                      f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                                      f"(e.g. {extra[:2]})")
    for key, t in want.items():
        if tuple(t.shape) != tuple(have[key].shape):
            raise _not_a_checkpoint(path, f"weight {key!r} has shape {tuple(have[key].shape)} in the file but "
                                          f"{tuple(t.shape)} in the model of its config")


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu"
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint written by ``attnkit quality --save``: ``(model, info)``, the model in
    eval mode with its trained weights, ``info`` as described in the module docstring.

    Raises ``ValueError`` naming the file for a file that is not such a checkpoint (truncated, random bytes,
    other content, sizes its tensors cannot hold, weights of another model), ``OSError`` when it cannot be read.
    The file is read with ``torch.load(weights_only=True)``: plain data only, no code runs.
    """
    from attnkit.quality.model import MechanismSpec, QualityModel

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch's (and pickle's, zipfile's) many types for a file that is not a checkpoint
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
        raise _not_a_checkpoint(path, f"torch.load cannot read it (truncated, or not a torch file): "
                                      f"{type(exc).__name__}: {first[:120]}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not an attnkit quality checkpoint (expected format {FORMAT!r}); write one with "
                         f"`attnkit quality --save DIR`")
    info, state_dict = blob.get("info"), blob.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state_dict.items()):
        raise _not_a_checkpoint(path, "'state_dict' is not a dict of named tensors")
    if not isinstance(info, dict) or not isinstance(info.get("spec"), dict) or not isinstance(info.get("model"),
                                                                                              dict):
        raise _not_a_checkpoint(path, "'info' lacks the 'spec' and 'model' dicts")
    if not isinstance(info.get("task"), str) or not isinstance(info.get("task_params", {}), dict):
        raise _not_a_checkpoint(path, "'info' lacks its 'task' name or 'task_params' dict")
    _check_sizes(path, info["model"], state_dict)
    def build(device: str | None) -> torch.nn.Module:
        try:
            with torch.device(device) if device else contextlib.nullcontext():
                return QualityModel(MechanismSpec(**info["spec"]), **info["model"])
        except KeyError as exc:
            if "no mechanism" in str(exc):  # a mechanism not registered here
                raise ValueError(f"{path}: its mechanism is not available here: "
                                 f"{str(exc).strip(chr(39)).split(';')[0]}") from None
            raise _not_a_checkpoint(path, f"its config does not build a model: KeyError {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise _not_a_checkpoint(path, f"its config does not build a model: "
                                          f"{(str(exc).splitlines() or [''])[0]}") from None

    # First on the meta device (no memory): the model of the config must hold exactly the file's tensors, so a
    # config that asks for more than the file holds is refused before anything is allocated.
    try:
        shell = build("meta")
    except ValueError:
        raise
    except Exception:  # a mechanism that cannot be built on the meta device: the size bounds above hold
        shell = None
    if shell is not None:
        _check_weights(path, shell.state_dict(), state_dict)
    model = build(None)
    _check_weights(path, model.state_dict(), state_dict)
    model.load_state_dict(state_dict)
    if map_location is not None:
        model.to(map_location)
    model.eval()
    return model, info
