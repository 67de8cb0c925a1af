"""``attnkit quality``: options and entry point (imported only when the subcommand runs)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from attnkit.cli import _check_out, _Interrupts, _positive_float, _positive_int

__all__ = ["add_arguments", "run"]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _lrs(text: str) -> list[float]:
    out = []
    for item in _names(text):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected learning rates such as 1e-3,3e-3, got {item!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0, got {item}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("expected one or more learning rates, e.g. 1e-3,3e-3,1e-2")
    return out


def _seeds(text: str) -> list[int]:
    try:
        out = [int(x) for x in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer seeds such as 0,1,2, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected one or more integer seeds, e.g. 0,1,2")
    return out


def _widths(text: str) -> list[int]:
    try:
        out = [int(x) for x in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected model widths such as 64,128, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive model widths such as 64,128, got {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from attnkit.quality.tasks import TASKS
    from attnkit.quality.train import DEFAULT_LRS, DEFAULT_MECHANISMS

    p.add_argument("--task", type=_names, default=None, metavar="TASKS",
                   help=f"comma-separated tasks: {', '.join(TASKS)} (default mqar)")
    p.add_argument("--mechanisms", type=_names, action="extend", metavar="NAMES",
                   help="comma-separated registry names (`attnkit list`; token mixers too) or linear:<feature map>, "
                        "each optionally with parameters: sliding_window@window=8, linear:favor@num_features=64, "
                        "linear:taylor@qk_dim=16 (queries/keys projected to 16 per head, as Based); 'all': every "
                        f"registered mechanism (default: {','.join(DEFAULT_MECHANISMS)})")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="sequence length (task default: mqar 128, "
                   "listops 128, copy 64, icl-regression 32)")
    p.add_argument("--num-kv-pairs", type=_positive_int, default=None, help="MQAR key-value pairs (default 8)")
    p.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="MQAR vocabulary (default 256; keys take the lower half, values the upper) or copy "
                        "data tokens (default 16)")
    p.add_argument("--power-a", type=_positive_float, default=None,
                   help="MQAR power law of query distances (default 0.01 as Zoology; 1 = uniform)")
    p.add_argument("--task-param", action="append", default=[], metavar="TASK.NAME=VALUE",
                   help="any generator parameter, e.g. listops.max_depth=6 or icl-regression.dim=4")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps per mechanism and learning rate (default 600)")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="examples per step (default 32 on the CPU, up to 256 on CUDA)")
    p.add_argument("--lr", type=_lrs, default=None, metavar="LRS",
                   help="peak learning rates to sweep, comma-separated; each mechanism reports the best "
                        f"(default {','.join(f'{x:g}' for x in DEFAULT_LRS)}, the range of Zoology's sweep)")
    p.add_argument("--embed-dim", type=_positive_int, default=None, help="model width (default 64)")
    p.add_argument("--heads", type=_positive_int, default=None, help="attention heads (default 1, as Zoology)")
    p.add_argument("--layers", type=_positive_int, default=None,
                   help="blocks of [short conv, mixer] + MLP (default 2)")
    p.add_argument("--no-conv", action="store_true",
                   help="no short convolution before the mixers (learned positions instead): shows what the "
                        "convolution of the Zoology/Based block contributes")
    p.add_argument("--conv-kernel", type=_positive_int, default=None,
                   help="width of the short causal convolution (default 3, as Zoology)")
    p.add_argument("--eval-examples", type=_positive_int, default=None, help="held-out examples (default 512)")
    p.add_argument("--seed", type=_seeds, default=None, metavar="SEEDS",
                   help="seeds of data and initialisation, comma-separated (default 0); with several the report "
                        "gives the mean and the spread")
    p.add_argument("--sweep", choices=["state"], default=None,
                   help="state: train each mechanism at several state sizes (feature dimension, window, softmax's "
                        "sequence length) and plot accuracy against state bytes (Based Fig. 2)")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write one checkpoint per trained (task, mechanism) into DIR "
                        "(attnkit.quality.load_checkpoint rebuilds the model)")
    p.add_argument("--jobs", type=_positive_int, default=None,
                   help="training processes, one thread each (default: 2 on CPU when there are 2+ cores, else 1)")
    p.add_argument("--param", action="append", default=[], metavar="MECH.NAME=VALUE",
                   help="override a mechanism parameter, e.g. sliding_window.window=8 or linear:favor.num_features=64")
    p.add_argument("--device", default="auto", metavar="{cpu,cuda,auto}",
                   help="cpu, cuda (or cuda:N) or auto: cuda when available (default auto); on CUDA the batch "
                        "grows to 256 examples (at most 131072 tokens a step) unless --batch is given")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto (default): bf16 autocast on CUDA except the mechanisms that need float32 "
                        "(attnkit.quality.device.FLOAT32_MECHANISMS), float32 on the CPU; fp32; bf16")
    p.add_argument("--preset", choices=["zoology"], default=None,
                   help="zoology: MQAR at Zoology's scale (sequences 256 and 512, 16 and 64 key-value pairs, "
                        "widths 64-256, ten mechanisms), a table of accuracy by width and zoology.png (Zoology "
                        "Fig. 2); sized for a GPU (see docs/benchmarks.md); --steps/--batch/--lr/--widths "
                        "shrink it")
    p.add_argument("--widths", type=_widths, default=None, metavar="W1,W2",
                   help="--preset zoology: model widths (default 64,128,256)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the models are small, and one thread does not stall when "
                        "other processes share the cores)")
    p.add_argument("--out", default="attnkit-report", metavar="DIR",
                   help="output folder, shared with `attnkit bench` (default ./attnkit-report/)")
    p.add_argument("--quick", action="store_true",
                   help="a ~1 min run: 300 steps at one learning rate, softmax, sliding_window@window=8 and "
                        "linear:taylor@qk_dim=8, MQAR with 32 tokens and 4 pairs")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _split_params(items: list[str], what: str, parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """``["a.b=1"]`` -> ``{"a": {"b": 1}}``; the name may contain ':' (linear:favor.num_features=64)."""
    from attnkit.bench.workloads import parse_param_overrides

    try:
        return parse_param_overrides(items)
    except ValueError as exc:
        parser.error(f"argument {what}: {exc}")


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The :class:`~attnkit.quality.train.QualityConfig` of parsed options (errors through ``parser``)."""
    import torch

    from attnkit.quality.model import parse_mechanism
    from attnkit.quality.tasks import TASKS
    from attnkit.quality.train import QualityConfig, mechanism_overrides

    tasks = args.task or ["mqar"]
    for t in tasks:
        if t not in TASKS:
            parser.error(f"argument --task: unknown task {t!r}; choose from {', '.join(TASKS)}")
    from attnkit.quality.device import device_batch, resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"argument {exc}")
    dev = torch.device(device)
    task_params = _split_params(args.task_param, "--task-param", parser)
    for name in task_params:
        if name not in TASKS:
            parser.error(f"argument --task-param: unknown task {name!r}; choose from {', '.join(TASKS)}")
    for t in tasks:
        tp = task_params.setdefault(t, {})
        defaults = TASKS[t].defaults
        for opt, key in (("seq_len", "seq_len"), ("num_kv_pairs", "num_kv_pairs"), ("vocab_size", "vocab_size"),
                         ("power_a", "power_a")):
            value = getattr(args, opt)
            if value is not None and key in defaults:
                tp.setdefault(key, value)
        if args.quick and t == "mqar":  # a smaller recall problem that softmax learns in the quick budget
            for key, value in (("seq_len", 32), ("num_kv_pairs", 4), ("vocab_size", 64)):
                tp.setdefault(key, value)
        try:
            TASKS[t].params(**tp)
        except ValueError as exc:
            parser.error(f"argument --task-param: {exc}")
        try:  # two examples: the generator checks its parameters together, before anything trains
            TASKS[t].sample(2, 0, TASKS[t].params(**tp))
        except (TypeError, ValueError) as exc:
            parser.error(f"task {t!r} with {', '.join(f'{k}={v!r}' for k, v in tp.items()) or 'its defaults'}: "
                         f"{exc} (set by --seq-len, --num-kv-pairs, --vocab-size or --task-param)")
    if args.batch is None:  # sized to the device (32 on the CPU, up to 256 on CUDA)
        seq = max(int(TASKS[t].params(**task_params[t]).get("seq_len", 64)) for t in tasks)
        args.batch = device_batch(None, dev.type, seq_len=seq)
    overrides: dict[str, Any] = {"tasks": tasks, "task_params": task_params, "device": device,
                                 "precision": args.precision,
                                 "params": _split_params(args.param, "--param", parser), "sweep": args.sweep,
                                 "save_dir": args.save,
                                 "jobs": args.jobs or (min(2, os.cpu_count() or 1) if dev.type == "cpu" else 1)}
    if args.quick:
        overrides.update(steps=300, warmup=30, eval_examples=256, lrs=[1e-2],
                         mechanisms=["softmax", "sliding_window@window=8", "linear:taylor@qk_dim=8"])
    if args.no_conv:
        overrides["conv_kernel"] = 0
    elif args.conv_kernel is not None:
        overrides["conv_kernel"] = args.conv_kernel
    if args.mechanisms is not None and "all" in args.mechanisms:
        from attnkit.registry import list_mechanisms

        names = [m.name for m in list_mechanisms()]
        args.mechanisms = [n for m in args.mechanisms for n in (names if m == "all" else [m])]
    for opt, key in (("steps", "steps"), ("batch", "batch"), ("lr", "lrs"), ("embed_dim", "embed_dim"),
                     ("heads", "num_heads"), ("layers", "num_layers"), ("eval_examples", "eval_examples"),
                     ("mechanisms", "mechanisms"), ("seed", "seeds")):
        value = getattr(args, opt)
        if value is not None:
            overrides[key] = value
    config = QualityConfig(**overrides)
    try:
        config.check()
        specs = {m: parse_mechanism(m, mechanism_overrides(config, m)) for m in config.mechanisms}
    except ValueError as exc:
        parser.error(str(exc))
    _check_overridden(config, specs, task_params[tasks[0]], parser)
    unknown = set(config.params) - set(config.mechanisms) - {m.partition("@")[0] for m in config.mechanisms}
    if unknown:
        parser.error(f"argument --param: {', '.join(sorted(unknown))} not among the selected mechanisms")
    return config


def _check_overridden(config, specs: dict, task_params: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """Mechanisms given ``--param`` (or ``name@k=v``) are built once in a one-layer model before anything is
    trained: an unknown parameter or a value of the wrong type is a usage error, not a failed row."""
    from attnkit.errors import NotSupportedError
    from attnkit.quality.model import QualityModel

    for name, spec in specs.items():
        if not spec.params:
            continue
        try:
            QualityModel(spec, vocab_size=8, num_outputs=2, embed_dim=config.embed_dim, num_heads=config.num_heads,
                         num_layers=1, max_seq_len=int(task_params.get("seq_len", 64)), causal=spec.causal)
        except NotSupportedError:
            pass  # reported per task as n/a
        except (TypeError, ValueError) as exc:
            given = ", ".join(f"{k}={v!r}" for k, v in spec.params.items())
            parser.error(f"argument --param: mechanism {name!r} does not accept {given}: "
                         f"{str(exc).splitlines()[0]}")


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    if args.preset == "zoology":
        from attnkit.quality.presets import run_zoology_cli

        _check_out(args.out, parser)  # before anything trains
        return run_zoology_cli(args, parser)
    if args.widths is not None:
        parser.error("argument --widths: only with --preset zoology (use --embed-dim for one width)")
    config = build_config(args, parser)
    _check_out(args.out, parser)  # before anything trains
    if args.save is not None:
        _check_out(args.save, parser, "--save")
    import torch

    torch.set_num_threads(args.threads)
    from attnkit.quality import report as rep
    from attnkit.quality.train import run_quality

    print(f"attnkit quality: tasks {', '.join(config.tasks)}; mechanisms {', '.join(config.mechanisms)}"
          f"{' (state sweep)' if config.sweep else ''}; {config.steps} steps x learning rates "
          f"{', '.join(f'{x:g}' for x in config.lrs)} x seeds {', '.join(map(str, config.seeds))}; "
          f"writing to {args.out}/", file=sys.stderr)

    def save_partial(doc: dict[str, Any]) -> None:
        rep.write_quality_json(doc, args.out)

    with _Interrupts("quality") as interrupts:
        doc = run_quality(config, progress=not args.no_progress, on_result=save_partial)
        with interrupts.writing():
            written = rep.write_quality_report(doc, args.out, plots=not args.no_plots)
    doc["interrupted"] = doc["interrupted"] or interrupts.count > 0
    print(rep.terminal_summary(doc))
    if written["plot_error"]:
        print(f"\nattnkit quality: {written['plot_error']}", file=sys.stderr)
    print(f"\nReport: {args.out}/report.html and report.md (section Quality); data: quality.json")
    if doc["interrupted"]:
        print("attnkit quality: interrupted; the results gathered so far were written", file=sys.stderr)
        return 130
    results = [r for t in doc["tasks"] for r in t["results"]]
    if results and all(r["status"] == "failed" for r in results):
        print("attnkit quality: every run failed (see the notes in the report)", file=sys.stderr)
        return 1
    return 0
