"""Where and in what precision ``attnkit quality`` trains: the device, bf16 autocast, batch sizes.

Pure functions (no GPU needed to test them):

- :func:`resolve_device` ``("auto" | "cpu" | "cuda" | "cuda:N")`` -> a device string, or a ``ValueError`` that names
  ``--device`` and the fix when CUDA is asked for and absent;
- :func:`autocast_dtype` ``(mechanism, device_type, precision)`` -> ``torch.bfloat16`` or ``None`` (float32): on
  CUDA the forward runs under ``torch.autocast(dtype=torch.bfloat16)`` except for the mechanisms of
  :data:`FLOAT32_MECHANISMS` and the records whose tolerance is wider than the default (``tolerance_scale > 1``:
  their own tests show bf16 loses more than the usual bits); the CPU trains in float32 (bf16 autocast is slower
  there and changes the numbers of the published CPU runs);
- :func:`device_batch` ``(batch, device_type, ...)`` -> the examples per step on that device.

Why bf16 is safe for the others: the linear, gated and delta-rule kernels (``ops/linear/gated.py``) and the scans,
EMAs and FFT convolutions of the mixers (``ops/mixers/_common.compute_dtype``) accumulate in float32 for half
inputs; the losses are computed in float32 (``train.loss_and_metric``); weights and optimizer states stay float32
(autocast casts per op, it does not convert the model).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DEVICES", "PRECISIONS", "FLOAT32_MECHANISMS", "resolve_device", "autocast_dtype", "precision_reason",
           "device_batch", "describe_precision", "CUDA_BATCH", "CUDA_TOKENS_PER_STEP"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")

# Mechanisms kept in float32 under ``precision="auto"`` on CUDA, with the reason. (Records with
# ``tolerance_scale > 1`` are added by :func:`precision_reason`.)
FLOAT32_MECHANISMS: dict[str, str] = {
    "hrrformer": "its record's bf16 tolerance is 4x the default (tolerance_scale=4.0): the binding's FFT round trip "
           "loses bits that recall needs",
}

# On CUDA the CPU default of 32 examples per step leaves an H200 idle: the batch grows to CUDA_BATCH, capped so
# that a step holds at most CUDA_TOKENS_PER_STEP tokens (activation memory grows with tokens x width).
CUDA_BATCH = 256  # Zoology's MQAR batch size
CUDA_TOKENS_PER_STEP = 256 * 512


def resolve_device(name: str | None) -> str:
    """``"auto"`` (or ``None``): ``"cuda"`` when available, else ``"cpu"``; ``"cpu"``, ``"cuda"`` and ``"cuda:N"``
    as given, after checking that CUDA (and device ``N``) exists. Raises ``ValueError`` naming ``--device`` and
    the fix otherwise."""
    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: attnkit quality runs on cpu or cuda; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return str(dev)


def _base(mechanism: str) -> str:
    return mechanism.partition("@")[0]


def precision_reason(mechanism: str) -> str | None:
    """Why ``mechanism`` (an entry such as ``"hrrformer@num_heads=2"``) trains in float32 under ``precision="auto"``
    on CUDA, or ``None`` when bf16 autocast is safe for it."""
    base = _base(mechanism)
    if base in FLOAT32_MECHANISMS:
        return FLOAT32_MECHANISMS[base]
    if base.startswith("linear:"):
        return None
    from attnkit.registry import mechanism_info

    try:
        info = mechanism_info(base)
    except KeyError:
        return None
    if info.tolerance_scale > 1:
        return (f"its record's tolerance is {info.tolerance_scale:g}x the default (tolerance_scale): its tests "
                f"show it loses more than bf16's usual bits")
    return None


def autocast_dtype(mechanism: str, device_type: str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of training ``mechanism`` on a device of type ``device_type`` (``"cpu"``/``"cuda"``):
    ``torch.bfloat16`` or ``None`` (no autocast: float32).

    ``precision``: ``"fp32"`` never autocasts; ``"bf16"`` always does (CUDA and CPU, for experiments);
    ``"auto"`` autocasts on CUDA only, except the mechanisms :func:`precision_reason` names."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device_type != "cuda" or precision_reason(mechanism) is not None:
        return None
    return torch.bfloat16


def device_batch(batch: int | None, device_type: str, *, seq_len: int, cpu_default: int = 32,
                 cuda_batch: int = CUDA_BATCH, tokens_per_step: int = CUDA_TOKENS_PER_STEP) -> int:
    """Examples per training step: ``batch`` when given; else ``cpu_default`` on the CPU, and on CUDA
    ``cuda_batch`` capped so that ``batch * seq_len <= tokens_per_step`` (at least ``cpu_default``, and never
    below 1)."""
    if batch is not None:
        return int(batch)
    if device_type != "cuda":
        return int(cpu_default)
    fit = max(1, tokens_per_step // max(1, int(seq_len)))
    return max(1, min(cuda_batch, max(min(cpu_default, cuda_batch), fit)))


def describe_precision(mechanisms: list[str], device_type: str, precision: str) -> dict[str, Any]:
    """``{"bf16": [...], "fp32": {name: reason}}`` for a report: which entries autocast and why the others not."""
    out: dict[str, Any] = {"bf16": [], "fp32": {}}
    for m in mechanisms:
        if autocast_dtype(m, device_type, precision) is not None:
            out["bf16"].append(m)
        else:
            reason = precision_reason(m) if precision == "auto" and device_type == "cuda" else None
            out["fp32"][m] = reason or ("--precision fp32" if precision == "fp32" else f"{device_type}: float32")
    return out
