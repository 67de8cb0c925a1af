"""The ``attnkit`` command line: ``attnkit list`` and ``attnkit bench``.

Subcommands live in the ``COMMANDS`` table; adding one (say ``attnkit quality``) is one more `Command`
entry whose ``add_arguments`` and ``run`` may be given as ``"module:function"`` strings, imported only
when that subcommand is used.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["main", "build_parser", "Command", "COMMANDS"]


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args) -> exit code`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | str
    run: Callable[[argparse.Namespace], int] | str
    description: str = ""


def _resolve(target: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# -- attnkit list -------------------------------------------------------------------------------------------
def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", help="show only this family (e.g. exact, linear, approx, neighborhood)")
    p.add_argument("--kind", choices=("attention", "mixer"),
                   help="show only attention mechanisms ((q, k, v) -> out) or token mixers (x -> x)")
    p.add_argument("--json", action="store_true", help="print the records as JSON")


def _json_default(value: Any) -> Any:
    return "..." if value is not None and type(value).__name__ == "_Unstated" else str(value)


def _run_list(args: argparse.Namespace) -> int:
    from attnkit.registry import REQUIRED, list_mechanisms, source_kind

    mechanisms = list_mechanisms()
    families = sorted({m.family for m in mechanisms})
    if args.family is not None:
        if args.family not in families:
            import difflib

            close = difflib.get_close_matches(args.family, families, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"attnkit list: error: no family {args.family!r}; families: {', '.join(families) or '(none)'}"
                  f"{hint}", file=sys.stderr)
            return 2
        mechanisms = [m for m in mechanisms if m.family == args.family]
    if getattr(args, "kind", None):
        mechanisms = [m for m in mechanisms if m.kind == args.kind]
    if args.json:
        records = []
        for m in mechanisms:
            params = m.parameters()
            records.append({
                "name": m.name, "kind": m.kind, "family": m.family, "paper": m.paper, "exact": m.exact,
                "complexity": m.complexity, "causal": m.causal, "devices": list(m.devices), "source": m.source,
                "summary": m.summary,
                "in_default_bench": m.in_default_bench, "bench_params": dict(m.bench_params),
                "needs": list(m.needs), "required": [k for k, d in params.items() if d is REQUIRED],
                "optional": {k: d for k, d in params.items() if d is not REQUIRED}})
        print(json.dumps(records, indent=1, default=_json_default))
        return 0
    if not mechanisms:
        print("no mechanisms registered")
        return 0
    header = ("name", "kind", "family", "exact", "complexity", "causal", "source", "devices")
    rows = [(m.name + ("*" if m.in_default_bench else ""), m.kind, m.family, "exact" if m.exact else "approx",
             m.complexity, "yes" if m.causal else "no", source_kind(m.source), ",".join(m.devices))
            for m in mechanisms]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip())
    wrap = 120
    for m, r in zip(mechanisms, rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        lines = [("params", m.describe_parameters()), ("paper", m.paper)]
        if source_kind(m.source) == "deviation":
            lines.append(("source", m.source))
        for label, text in lines:
            for i, line in enumerate(textwrap.wrap(text, wrap - 12) or [""]):
                print(f"    {label + ':' if i == 0 else '':8}{line}")
    kinds = {k: sum(m.kind == k for m in mechanisms) for k in ("attention", "mixer")}
    print(f"\n{len(mechanisms)} mechanisms ({kinds['attention']} attention: (q, k, v) -> out [batch, heads, seq, "
          f"dim]; {kinds['mixer']} token mixers: x -> x [batch, seq, channels], built with dim=channels); "
          "* = in the default `attnkit bench` selection. source: where the definition came from (paper = checked "
          "against the full paper; paper+catalogue = the paper where reachable, the catalogue's reading elsewhere; "
          "deviation = differs from the paper, said how; docs/faithfulness.md). Shape parameters (dim, num_heads, "
          "head_dim, seq_len) are "
          "filled in by attnkit.nn.MultiheadAttention; a mixer takes the MultiheadAttention's place whole.")
    return 0


# -- attnkit backends ---------------------------------------------------------------------------------------
def _backends_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--operation", choices=("attention", "neighborhood", "linear", "gated", "delta"),
                   help="show only the backends of this operation")
    p.add_argument("--json", action="store_true", help="print the records as JSON")


def _run_backends(args: argparse.Namespace) -> int:
    from attnkit.backends.base import backends, format_table

    records = backends(args.operation)
    print(json.dumps(records, indent=1) if args.json else format_table(records))
    return 0


# -- attnkit bench ------------------------------------------------------------------------------------------
# `attnkit bench --quick` on 2 CPU cores (the run's own budget is 18 s; set-up and report add the rest).
QUICK_RUN_S = 20
# The default run on 2 CPU cores: a 170 s measuring budget plus compilation and the report.
DEFAULT_RUN_MIN = 4

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _length(text: str) -> int:
    t = text.strip().lower()
    mult = 1024 if t.endswith("k") else 1
    try:
        value = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"sequence lengths are positive integers such as 512,4096,16K; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"sequence lengths must be positive, got {text!r}")
    return value


def _length_list(text: str) -> list[int]:
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of lengths such as 512,4096,16K")
    return sorted({_length(x) for x in items})


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from attnkit.bench.workloads import DTYPES

    p.add_argument("--mechanisms", type=_name_list, action="extend", metavar="NAMES",
                   help="comma-separated mechanism names, family names or 'all' (default: the registry's "
                        "representative ones); the SDPA baseline is always measured")
    p.add_argument("--seq-lens", type=_length_list, metavar="LENGTHS",
                   help="comma-separated sequence lengths, e.g. 512,2048,16K (default: 512..16K, up to 64K "
                        "for sub-quadratic mechanisms)")
    p.add_argument("--batch", type=_positive_int, default=None, help="batch size (default 1)")
    p.add_argument("--heads", type=_positive_int, default=None, help="attention heads (default 4)")
    p.add_argument("--head-dim", type=_positive_int, default=None, help="head dimension (default 64)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="floating type (default float32)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--causal", nargs="?", const="on", choices=("off", "on", "both"), default=None,
                   help="causal attention: on (bare --causal), off or both (default: off, plus causal for "
                        "linear attention)")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--inputs", choices=("clustered", "gaussian"), default=None,
                   help="synthetic q, k, v: clustered (peaked, content-based attention; default) or gaussian "
                        "(i.i.d.; exact output ~ mean(v), so relative errors are uninformative)")
    p.add_argument("--repeats", type=_positive_int, default=None, help="timed calls per cell (default 5)")
    p.add_argument("--out", default="attnkit-report", metavar="DIR",
                   help="output folder (default ./attnkit-report/)")
    p.add_argument("--quick", action="store_true", help=f"a ~{QUICK_RUN_S} s run: lengths 256..2048, no FlexAttention")
    p.add_argument("--all", action="store_true",
                   help="every registered record (attention and mixers) at lengths 512, 4K, 16K within a 600 s "
                        "budget; the report names why each record or cell was left out")
    p.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="stop measuring after this long, reporting the rest as skipped (default 170, quick 18, "
                        "--all 600); compilation time is not counted (it is reported apart)")
    p.add_argument("--max-call", type=_positive_float, default=None, metavar="SECONDS",
                   help="skip a cell predicted to take longer than this per call (default 6)")
    p.add_argument("--param", action="append", default=[], metavar="MECH.NAME=VALUE",
                   help="override a mechanism's benchmark parameter, e.g. performer.num_features=128")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-flex", action="store_true", help="do not run the FlexAttention peers")
    p.add_argument("--engines", type=_name_list, metavar="NAMES",
                   help="also measure each selected mechanism through these backends (e.g. flex,tiled,natten,fla,"
                        "flash; see `attnkit backends`), one line per mechanism@engine")
    p.add_argument("--no-peers", action="store_true",
                   help="do not run NATTEN's and fla's own kernels as peers (run on CUDA where installed)")
    p.add_argument("--no-memory", action="store_true", help="do not trace peak memory")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="measure nothing: rewrite the report (tables, plots) from a results.json into --out")


def _bench_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import torch

    from attnkit.bench.workloads import all_config, default_config, parse_param_overrides, quick_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"argument --device: {device!r} is not a device; use cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available here (no GPU, or a CPU-only torch); "
                     "use --device cpu")
    try:
        params = parse_param_overrides(args.param)
    except ValueError as exc:
        parser.error(f"argument --param: {exc}")
    _check_param_overrides(params, args, parser)
    overrides: dict[str, Any] = {"device": device, "params": params}
    for key in ("batch", "heads", "head_dim", "dtype", "repeats", "seq_lens", "mechanisms", "inputs"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.causal is not None:
        overrides["causal"] = args.causal
    if args.backward:
        overrides["backward"] = True
    if args.time_budget is not None:
        overrides["time_budget_s"] = args.time_budget
    if args.max_call is not None:
        overrides["max_call_s"] = args.max_call
    if args.no_flex:
        overrides["flex"] = False
    if args.engines:
        _check_engines(args.engines, parser)
        overrides["engines"] = args.engines
    if args.no_peers:
        overrides["peers"] = False
    if args.no_memory:
        overrides["memory"] = False
    if args.quick and args.all:
        parser.error("argument --all: not allowed with --quick (--all already picks its lengths and budget)")
    if args.all and args.mechanisms:
        parser.error("argument --all: not allowed with --mechanisms (--all selects every record)")
    if args.quick:
        return quick_config(**overrides)
    return all_config(**overrides) if args.all else default_config(**overrides)


def _check_engines(engines: list[str], parser: argparse.ArgumentParser) -> None:
    """Every ``--engines`` name is a registered backend (``attnkit backends``): a usage error otherwise."""
    from attnkit.backends import list_backends

    known = sorted({b.name for b in list_backends()})
    for name in engines:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            parser.error(f"argument --engines: unknown backend {name!r}"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; known backends: {', '.join(known)} (see `attnkit backends`)")


def _check_param_overrides(params: dict[str, dict[str, Any]], args: argparse.Namespace,
                           parser: argparse.ArgumentParser) -> None:
    """``--param`` names a registered mechanism and parameters its factory takes, with values of the type of
    its default: checked by building it once at a small shape, before anything is measured (usage error)."""
    import inspect

    from attnkit.bench.workloads import shape_params
    from attnkit.registry import mechanism_info

    for name, given in params.items():
        try:
            m = mechanism_info(name)
        except KeyError as exc:
            parser.error(f"argument --param: {exc}")
        defaults = dict(m.bench_params)
        try:
            sig = inspect.signature(m.factory)
            defaults.update({k: p.default for k, p in sig.parameters.items()
                             if p.default is not inspect.Parameter.empty and k not in defaults})
        except (TypeError, ValueError):
            pass
        for key, value in given.items():
            want = defaults.get(key)
            if isinstance(want, (bool, int, float)) and isinstance(value, str):
                parser.error(f"argument --param: {name}.{key}={value!r} does not parse as "
                             f"{type(want).__name__} (its default is {want!r})")
        heads, head_dim = args.heads or 2, args.head_dim or 16
        try:
            m.build(causal=False, **{**m.bench_params, **given},
                    **shape_params(m, heads=heads, head_dim=head_dim, seq_len=64))
        except (TypeError, ValueError) as exc:
            parser.error(f"argument --param: mechanism {name!r} does not accept "
                         f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: {exc}")


def _check_out(out: str | os.PathLike, parser: argparse.ArgumentParser, option: str = "--out") -> None:
    """The output folder ``out`` (of ``option``) can be created and written: checked before any work, as one
    line (a file where the folder should be, a folder without write permission, a read-only disk)."""
    import tempfile

    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:  # one line (no usage block: the options were fine, the folder is not)
        print(f"attnkit {parser.prog.split()[-1]}: error: argument {option}: cannot write to {str(out)!r}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None


class _Interrupts:
    """Ctrl-C during a run that writes a report: the first raises ``KeyboardInterrupt`` (the run stops and writes
    what it gathered); while the report is written (``writing()``), and after the first, Ctrl-C is noted and
    deferred, so a second press never leaves a half-written or missing report. A third press, when the report
    is not being written, exits at once (code 130). After an interrupted run Ctrl-C stays ignored: the command
    only returns its exit code."""

    def __init__(self, command: str):
        self.command, self.count, self._writing, self._old = command, 0, False, None

    def _handler(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1 and not self._writing:
            raise KeyboardInterrupt
        if self.count >= 3 and not self._writing:
            raise SystemExit(130)
        print(f"attnkit {self.command}: interrupted; finishing the report first", file=sys.stderr, flush=True)

    def __enter__(self) -> _Interrupts:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            # interrupted: the command is on its way out (exit code 130); a further Ctrl-C in that last moment
            # would only turn a clean exit into a kill by the signal
            signal.signal(signal.SIGINT, signal.SIG_IGN if self.count else self._old)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self._writing = True
        try:
            yield
        finally:
            self._writing = False


def _rewrite_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from attnkit.bench import report as rep
    from attnkit.bench.runner import SCHEMA

    try:
        with open(args.from_results) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        parser.error(f"argument --from-results: cannot read {args.from_results!r}: {exc}")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        parser.error(f"argument --from-results: {args.from_results!r} is not an attnkit bench results.json "
                     f"(schema {SCHEMA})")
    with _Interrupts("bench") as interrupts, interrupts.writing():
        written = rep.write_report(doc, args.out, plots=not args.no_plots)
    print(rep.terminal_summary(doc))
    if written["plot_error"]:
        print(f"\nattnkit bench: {written['plot_error']}", file=sys.stderr)
    print(f"\nReport: {args.out}/report.html and report.md")
    return 130 if interrupts.count else 0


def _run_bench(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    if args.from_results:
        _check_out(args.out, parser)
        return _rewrite_report(args, parser)
    config = _bench_config(args, parser)
    _check_out(args.out, parser)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from attnkit.bench.workloads import select_variants

    try:
        variants = select_variants(config)
    except ValueError as exc:
        parser.error(f"argument --mechanisms: {exc}")
    from attnkit.bench import report as rep
    from attnkit.bench.runner import run_benchmark

    if not any(v.kind == "mechanism" for v in variants):
        print("attnkit bench: no registered mechanism selected (none marked for the default bench yet?): "
              "measuring the SDPA baseline only; see `attnkit list`", file=sys.stderr)
    labels = ", ".join(v.label for v in variants)
    print(f"attnkit bench: {len(variants)} variants ({labels}); writing to {args.out}/", file=sys.stderr)

    def save_partial(doc: dict[str, Any]) -> None:
        rep.write_json(doc, args.out)

    with _Interrupts("bench") as interrupts:
        doc = run_benchmark(config, variants=variants, progress=not args.no_progress, on_cell=save_partial)
        with interrupts.writing():
            written = rep.write_report(doc, args.out, plots=not args.no_plots)
    doc["interrupted"] = doc["interrupted"] or interrupts.count > 0
    print(rep.terminal_summary(doc))
    if written["plot_error"]:
        print(f"\nattnkit bench: {written['plot_error']}", file=sys.stderr)
    print(f"\nReport: {args.out}/report.html and report.md; data: results.json, results.csv")
    if doc["interrupted"]:
        print("attnkit bench: interrupted; the results gathered so far were written", file=sys.stderr)
        return 130
    measured = [c for c in doc["results"] if c["kind"] != "baseline"]
    if measured and not any(c["status"] == "ok" for c in measured) \
            and any(c["status"] in ("failed", "oom") for c in measured):
        print("attnkit bench: every cell of the selected mechanisms failed (see the messages in the report)",
              file=sys.stderr)
        return 1
    return 0


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("list", "list the registered attention mechanisms", _list_arguments, _run_list,
                "Every registered mechanism with its family, paper, exact or approximate, complexity and causal "
                "support."),
        Command("backends", "list the kernels (backends) installed and usable here", _backends_arguments,
                _run_backends, "Every backend of attention, neighborhood and linear attention with what it supports "
                "(devices, dtypes, head dims, patterns, score modifiers, normalisations), whether it is installed "
                "and usable on this machine, and its rank in engine='auto'."),
        Command("bench", "benchmark mechanisms against SDPA and write a report", _bench_arguments, _run_bench,
                "Time, peak memory, FLOPs, error against exact softmax and speed of light of the registered "
                "mechanisms across sequence lengths, with SDPA and FlexAttention measured in the same run; "
                "writes results.json, results.csv, report.md, report.html (a decision table first: which "
                "mechanism to pick per length and accuracy class) and PNG plots. The default run (one mechanism "
                f"of every family) takes about {DEFAULT_RUN_MIN} minutes on 2 CPU cores, --quick about "
                f"{QUICK_RUN_S} seconds, --all (every record) 10 minutes."),
        Command("quality", "train small models per mechanism on synthetic tasks and compare quality",
                "attnkit.quality.cli:add_arguments", "attnkit.quality.cli:run",
                "Trains a small model (the Zoology/Based block: [short causal conv -> mixer] + MLP) with each "
                "mechanism on freshly generated MQAR, ListOps, copy or in-context regression data for a fixed number "
                "of steps at each learning rate of a grid; reports the best accuracy (or MSE) against state size "
                "and training time in quality.json and a Quality section of report.md / report.html, with the "
                "accuracy vs state size plot."),
        Command("analyze", "look inside the attention of models saved by `attnkit quality --save`",
                "attnkit.analysis.cli:add_arguments", "attnkit.analysis.cli:run",
                "Runs each checkpoint on generated examples of its task and writes attention heatmaps, per-head "
                "entropy and mean attention distance, attention rollout, the rank-collapse curve and head "
                "importance (loss change when a head is ablated) into report.md / report.html."),
        Command("kvcache", "judge KV-cache policies by recall on a model saved by `attnkit quality --save`",
                "attnkit.kvpolicy.cli:add_arguments", "attnkit.kvpolicy.cli:run",
                "Prefills the MQAR context exactly, lets each KV-cache policy (window, random, FastGen, ZipVL's "
                "cumulative mass, ActQKV's probe query) keep part of it at several budgets, and reports recall "
                "accuracy and output error against the full cache, with a plot against KV bytes."),
    )
}


def build_parser() -> argparse.ArgumentParser:
    from attnkit._version import __version__

    parser = argparse.ArgumentParser(prog="attnkit", description="attnkit: attention mechanisms behind one API.")
    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS.values():
        p = sub.add_parser(c.name, help=c.help, description=c.description or c.help)
        _resolve(c.add_arguments)(p)
        p.set_defaults(_command=c, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnkit`` console script; returns the exit code.

    Errors of the environment the user controls (a path that cannot be read or written, a full disk) end as one
    line ``attnkit <command>: error: ...`` with exit code 2, Ctrl-C outside a run's own handling with 130: never a
    traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help(sys.stderr)
        return 2
    name = args._command.name
    try:
        return int(_resolve(args._command.run)(args) or 0)
    except KeyboardInterrupt:
        print(f"attnkit {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        what = os.strerror(exc.errno) if exc.errno else str(exc)
        where = f" {str(exc.filename)!r}" if exc.filename else ""
        hint = {errno.ENOSPC: " (the disk is full: free space or choose another --out)",
                errno.EACCES: " (no permission: choose another path)",
                errno.EROFS: " (read-only file system: choose another path)"}.get(exc.errno or 0, "")
        print(f"attnkit {name}: error: cannot use{where}: {what}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
