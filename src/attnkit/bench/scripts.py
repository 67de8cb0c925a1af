"""Scaffolding shared by the benchmark scripts in ``benchmarks/``: their common options, the machine header
each prints first, and the JSON file each may write."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from attnkit.bench.machine import describe_machine

__all__ = ["script_parser", "machine_header", "write_json"]


def script_parser(description: str, *, head_dim: int, repeats: int | None,
                  repeats_help: str | None = None, quick_help: str = "small sizes: checks that the script runs",
                  ) -> argparse.ArgumentParser:
    """A parser with ``--quick --threads --repeats --heads --head-dim --json``; scripts add their own options."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, default=repeats,
                    help=repeats_help or f"timed calls per measurement (default {repeats})")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=head_dim)
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return ap


def machine_header(title: str, device: torch.device | None = None) -> dict[str, Any]:
    """Describe the machine (after the script has set its threads), print the header line, return the record."""
    machine = describe_machine(device or torch.device("cpu"))
    print(f"# attnkit {title} benchmark\n{machine['cpu']}, {machine['torch_threads']} threads, "
          f"torch {machine['torch']}, attnkit {machine['attnkit']} ({machine.get('git_commit')}), "
          f"load {machine.get('load_average')}")
    return machine


def write_json(path: Path | None, results: Any, *, default: Any = float) -> None:
    """Write ``results`` to ``path`` when the script was given ``--json``."""
    if path is None:
        return
    path.write_text(json.dumps(results, indent=2, default=default))
    print(f"\nwrote {path}")
