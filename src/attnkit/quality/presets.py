"""``attnkit quality --preset zoology``: MQAR at the scale of Zoology's Fig. 2, accuracy against model width.

Arora, Eyuboglu, Timalsina et al., "Zoology: Measuring and Improving Recall in Efficient Language Models" (ICLR
2024), Sec. 4 and Fig. 2: multi-query associative recall (MQAR) with vocabulary 8,192, sequence lengths 64-512 with
4-64 key-value pairs (256 tokens: 16 pairs, 512 tokens: 64 pairs, the two hardest settings, are the preset's),
two-layer models of width 64-512 (the preset: 64, 128, 256), queries at power-law distances (``power_a`` 0.01),
100,000 training examples for 64 epochs and 3,000 held-out ones, each model at the best learning rate of a sweep
``np.logspace(-4, -2, 4)``. Fig. 2: attention solves MQAR at every width; the gated convolutions (H3, Hyena,
RWKV, RetNet) need width growing with the number of pairs; Based (Taylor linear attention) follows attention
closely as the width grows.

What the preset keeps and what it changes (so that it fits a GPU budget):

- tasks, widths, vocabulary, 3,000 held-out examples, the two-layer [short conv -> mixer] + MLP block, 1 head;
- training: :data:`ZOOLOGY_STEPS` steps of :data:`ZOOLOGY_BATCH` freshly drawn examples (our generator draws new
  examples every step instead of 64 passes over 100,000: 2,000 x 256 = 512,000 examples, about 5 epochs' worth),
  AdamW with warm-up and cosine decay, and the upper two learning rates of Zoology's sweep (2.2e-3, 1e-2: the
  lower ones do not converge in this budget);
- mechanisms (:data:`ZOOLOGY_MECHANISMS`): registry names for softmax, Based, Taylor, elu, GLA, the gated delta
  rule, a Mamba-style selective scan, Mega, a CKConv long convolution and a sliding window.

:func:`run_zoology` returns a JSON-ready document; :func:`write_zoology_report` writes ``zoology.json``,
``zoology.md`` (one table of accuracy by width per setting) and ``zoology.png`` (accuracy against width, one
line per mechanism, one panel per setting, as Zoology Fig. 2).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["ZooEntry", "ZoologyPreset", "ZOOLOGY_MECHANISMS", "ZOOLOGY", "ZOOLOGY_STEPS", "ZOOLOGY_BATCH",
           "ZOOLOGY_LRS", "quick_zoology", "zoology_configs", "run_zoology", "zoology_tables", "write_zoology_report",
           "estimate_gpu_seconds", "SCHEMA"]

SCHEMA = "attnkit-quality-zoology/1"


@dataclass(frozen=True)
class ZooEntry:
    """One line of the figure: ``label`` (as the paper names it), the quality ``entry`` (registry name or
    ``linear:<map>``, with ``@`` parameters), and ``head_dim``: train with ``width // head_dim`` heads (``None``:
    the preset's single head)."""

    label: str
    entry: str
    note: str = ""
    head_dim: int | None = None


ZOOLOGY_MECHANISMS: tuple[ZooEntry, ...] = (
    ZooEntry("attention", "softmax", "softmax attention, 1 head (Zoology's MHA baseline)"),
    ZooEntry("based", "linear:taylor@qk_dim=16",
             "Based's linear attention: 2nd-order Taylor map of queries/keys projected to 16 (Based's feature dim)"),
    ZooEntry("taylor", "based", "registry `based`: the Taylor map on the whole head; heads of 16 keep its "
             "feature dimension at 153", head_dim=16),
    ZooEntry("elu", "linear_elu", "linear attention with elu+1 features (Katharopoulos et al.)"),
    ZooEntry("gla", "gla", "gated linear attention (Yang et al.), data-dependent vector decay"),
    ZooEntry("gated delta rule", "gated_deltanet", "gated DeltaNet (Yang et al.), chunkwise WY form"),
    ZooEntry("mamba scan", "mamba_nd@state_size=16+expand=1",
             "Mamba-ND's selective scan (one direction: causal), state 16 per channel"),
    ZooEntry("mega", "mega@ema_dim=16+chunk_size=128", "Mega: damped EMA + single-head attention in chunks of 128"),
    ZooEntry("long conv", "ckconv@ref_len=512", "CKConv: a continuous (MLP-generated) kernel as long as the input"),
    ZooEntry("sliding window", "sliding_window@window=64", "softmax attention over the last 64 tokens"),
)

ZOOLOGY_STEPS = 2000
ZOOLOGY_BATCH = 256
ZOOLOGY_LRS = (2.2e-3, 1e-2)  # the upper two of np.logspace(-4, -2, 4) = 1e-4, 4.6e-4, 2.2e-3, 1e-2


@dataclass(frozen=True)
class ZoologyPreset:
    """The grid: ``settings`` ``[(seq_len, num_kv_pairs)]`` x ``widths`` x ``mechanisms``, each trained at every
    learning rate of ``lrs`` (the best is reported), ``steps`` steps of ``batch`` examples."""

    widths: tuple[int, ...] = (64, 128, 256)
    settings: tuple[tuple[int, int], ...] = ((256, 16), (512, 64))
    vocab_size: int = 8192
    mechanisms: tuple[ZooEntry, ...] = ZOOLOGY_MECHANISMS
    steps: int = ZOOLOGY_STEPS
    batch: int = ZOOLOGY_BATCH
    lrs: tuple[float, ...] = ZOOLOGY_LRS
    warmup: int = 100
    eval_examples: int = 3000
    num_layers: int = 2
    seeds: tuple[int, ...] = (0,)
    power_a: float = 0.01
    extra: dict[str, Any] = field(default_factory=dict)  # other QualityConfig fields

    def check(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be positive ints, got {list(self.widths)}")
        if not self.settings:
            raise ValueError("settings must hold one or more (seq_len, num_kv_pairs)")
        if not self.mechanisms:
            raise ValueError("no mechanism selected")
        for e in self.mechanisms:
            for w in self.widths:
                if e.head_dim is not None and w % e.head_dim:
                    raise ValueError(f"{e.label}: width {w} is not a multiple of its head_dim {e.head_dim}")


ZOOLOGY = ZoologyPreset()


def quick_zoology(**changes: Any) -> ZoologyPreset:
    """A CPU-sized preset for tests and ``--quick``: widths 16 and 32, 64 tokens with 4 pairs, vocabulary 128,
    60 steps of 16 examples at one learning rate, 64 held-out examples, every mechanism."""
    base = ZoologyPreset(widths=(16, 32), settings=((64, 4),), vocab_size=128, steps=60, batch=16, lrs=(1e-2,),
                         warmup=6, eval_examples=64)
    return replace(base, **changes)


def zoology_configs(preset: ZoologyPreset, *, device: str = "cpu", precision: str = "auto", jobs: int = 1
                    ) -> list[tuple[int, int, int, int | None, Any]]:
    """The :class:`~attnkit.quality.train.QualityConfig` runs of ``preset``: ``[(seq_len, num_kv_pairs, width,
    head_dim, config)]``, one per (setting, width, head grouping); ``config.mechanisms`` the entries of that
    grouping."""
    from attnkit.quality.train import QualityConfig

    preset.check()
    groups: dict[int | None, list[str]] = {}
    for e in preset.mechanisms:
        groups.setdefault(e.head_dim, []).append(e.entry)
    out = []
    for seq_len, pairs in preset.settings:
        for width in preset.widths:
            for head_dim, entries in groups.items():
                heads = 1 if head_dim is None else width // head_dim
                cfg = QualityConfig(
                    tasks=("mqar",), mechanisms=tuple(entries),
                    task_params={"mqar": {"seq_len": seq_len, "num_kv_pairs": pairs, "vocab_size": preset.vocab_size,
                                          "power_a": preset.power_a}},
                    embed_dim=width, num_heads=heads, num_layers=preset.num_layers, steps=preset.steps,
                    batch=preset.batch, lrs=tuple(preset.lrs), warmup=min(preset.warmup, preset.steps // 2),
                    eval_examples=preset.eval_examples, seeds=tuple(preset.seeds), device=device,
                    precision=precision, jobs=jobs, **preset.extra)
                cfg.check()
                out.append((seq_len, pairs, width, head_dim, cfg))
    return out


def estimate_gpu_seconds(preset: ZoologyPreset, ms_per_step: float = 12.0) -> float:
    """A rough wall time on one GPU: training runs x steps x ``ms_per_step`` (an assumption, not a measurement:
    a 2-layer model of width <= 256 at 256 x 512 tokens a step is launch-bound, ~10-15 ms a step in bf16)."""
    runs = len(preset.settings) * len(preset.widths) * len(preset.mechanisms) * len(preset.lrs) * len(preset.seeds)
    return runs * preset.steps * ms_per_step / 1000.0


def run_zoology(preset: ZoologyPreset = ZOOLOGY, *, device: str = "cpu", precision: str = "auto", jobs: int = 1,
                progress: bool = True, on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the grid of ``preset``; returns ``{"schema", "preset", "machine", "rows": [...], "interrupted",
    "elapsed_s"}`` with one row per (setting, width, mechanism): ``label, entry, seq_len, num_kv_pairs, width,
    num_heads, status, message, accuracy, lr, lr_sweep, train_s, precision``."""
    import torch

    from attnkit.bench.machine import describe_machine
    from attnkit.quality.train import run_quality

    labels = {e.entry: e.label for e in preset.mechanisms}
    doc: dict[str, Any] = {"schema": SCHEMA, "preset": _preset_json(preset),
                           "machine": describe_machine(torch.device(device)), "device": device,
                           "precision": precision, "rows": [], "interrupted": False, "elapsed_s": 0.0}
    start = time.perf_counter()
    for seq_len, pairs, width, _head_dim, cfg in zoology_configs(preset, device=device, precision=precision,
                                                                  jobs=jobs):
        part = run_quality(cfg, progress=progress)
        for r in part["tasks"][0]["results"] if part["tasks"] else []:
            doc["rows"].append({
                "label": labels.get(r["mechanism"], r["mechanism"]), "entry": r["mechanism"], "seq_len": seq_len,
                "num_kv_pairs": pairs, "width": width, "num_heads": cfg.num_heads, "status": r["status"],
                "message": r.get("message", ""), "accuracy": r.get("value"), "lr": r.get("lr"),
                "lr_sweep": [{"lr": s["lr"], "mean": s["mean"], "status": s["status"]} for s in r.get("lr_sweep", [])],
                "train_s": r.get("sweep_train_s", r.get("train_s")), "precision": r.get("precision"),
                "batch": cfg.batch, "num_parameters": r.get("num_parameters")})
        doc["elapsed_s"] = time.perf_counter() - start
        if on_result is not None:
            on_result(doc)
        if part["interrupted"]:
            doc["interrupted"] = True
            break
    doc["elapsed_s"] = time.perf_counter() - start
    return doc


def _preset_json(preset: ZoologyPreset) -> dict[str, Any]:
    d = asdict(preset)
    d["mechanisms"] = [asdict(e) for e in preset.mechanisms]
    return d


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok" or row["accuracy"] is None:
        return row["status"]
    return f"{100 * row['accuracy']:.1f}"


def zoology_tables(doc: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``[(title, header, rows)]``: per setting, one row per mechanism, accuracy (%) per width."""
    rows = doc["rows"]
    settings = list(dict.fromkeys((r["seq_len"], r["num_kv_pairs"]) for r in rows))
    widths = sorted({r["width"] for r in rows})
    order = [e["label"] for e in doc.get("preset", {}).get("mechanisms", [])]
    labels = list(dict.fromkeys([lab for lab in order if any(r["label"] == lab for r in rows)]
                                + [r["label"] for r in rows]))
    out = []
    for seq_len, pairs in settings:
        by = {(r["label"], r["width"]): r for r in rows if (r["seq_len"], r["num_kv_pairs"]) == (seq_len, pairs)}
        header = ["mechanism", "entry"] + [f"d={w}" for w in widths]
        body = []
        for label in labels:
            entry = next((r["entry"] for r in rows if r["label"] == label), "")
            body.append([label, entry] + [_cell(by.get((label, w))) for w in widths])
        out.append((f"MQAR, {seq_len} tokens, {pairs} key-value pairs: accuracy (%) by model width", header, body))
    return out


def _panels(doc: dict[str, Any]) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    panels = []
    for seq_len, pairs in dict.fromkeys((r["seq_len"], r["num_kv_pairs"]) for r in doc["rows"]):
        order = [e["label"] for e in doc.get("preset", {}).get("mechanisms", [])]
        series: dict[str, list[tuple[float, float]]] = {lab: [] for lab in order}
        for r in doc["rows"]:
            if (r["seq_len"], r["num_kv_pairs"]) == (seq_len, pairs) and r["status"] == "ok":
                series.setdefault(r["label"], []).append((r["width"], r["accuracy"]))
        panels.append((f"{seq_len} tokens, {pairs} KV pairs", series))
    return panels


def write_zoology_report(doc: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Write ``zoology.json``, ``zoology.md`` and (``plots``) ``zoology.png`` into ``out_dir``; returns
    ``{"json", "md", "png", "plot_error"}`` (paths, ``png`` ``None`` without a plot, ``plot_error`` the reason)."""
    from attnkit import reporting

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoology.json").write_text(json.dumps(doc, indent=1, default=str))
    png, plot_error = None, None
    if plots and doc["rows"]:
        try:
            reporting.line_panels(out / "zoology.png", _panels(doc), xlabel="model width", ylabel="MQAR accuracy",
                                  title="MQAR accuracy vs model width (Zoology Fig. 2 setting)", logx=True,
                                  ylim=(0.0, 1.02), percent=True)
            png = out / "zoology.png"
        except reporting.MissingMatplotlib as exc:
            plot_error = str(exc)
    p = doc["preset"]
    lines = ["# attnkit quality --preset zoology", "",
             f"MQAR (Zoology, Arora et al. 2024, Fig. 2 setting): vocabulary {p['vocab_size']}, "
             f"{p['num_layers']} layers of [short conv -> mixer] + MLP; {p['steps']} steps of {p['batch']} "
             f"examples, best of learning rates {', '.join(f'{x:g}' for x in p['lrs'])}; "
             f"{p['eval_examples']} held-out examples; device {doc['device']}, precision {doc['precision']}; "
             f"{doc['elapsed_s']:.0f} s.", ""]
    if doc["interrupted"]:
        lines += ["**Interrupted**: the tables hold the runs finished before Ctrl-C.", ""]
    for title, header, body in zoology_tables(doc):
        lines += [f"## {title}", "", reporting.md_table(header, body), ""]
    failed = [r for r in doc["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["Runs that did not train:", ""]
        lines += [f"- {r['label']} (d={r['width']}, {r['seq_len']} tokens): {r['status']}: {r['message']}"
                  for r in failed]
        lines.append("")
    lines += ["Mechanisms:", ""] + [f"- **{e['label']}** (`{e['entry']}`): {e['note']}" for e in p["mechanisms"]]
    if png is not None:
        lines += ["", "![MQAR accuracy vs model width](zoology.png)"]
    (out / "zoology.md").write_text("\n".join(lines) + "\n")
    return {"json": out / "zoology.json", "md": out / "zoology.md", "png": png, "plot_error": plot_error}


def terminal_tables(doc: dict[str, Any]) -> str:
    from attnkit import reporting

    return "\n\n".join(f"{title}\n{reporting.text_table(header, body)}" for title, header, body in zoology_tables(doc))


def preset_from_args(args: Any, parser: Any) -> ZoologyPreset:
    """The preset of ``attnkit quality --preset zoology`` with the options that shrink it (``--quick``,
    ``--widths``, ``--steps``, ``--batch``, ``--lr``, ``--seq-len``/``--num-kv-pairs``, ``--vocab-size``,
    ``--eval-examples``, ``--layers``, ``--seed``, ``--mechanisms`` (labels or entries of the preset))."""
    from attnkit.quality.device import device_batch

    preset = quick_zoology() if args.quick else ZOOLOGY
    changes: dict[str, Any] = {}
    if args.widths is not None:
        changes["widths"] = tuple(args.widths)
    if args.seq_len is not None or args.num_kv_pairs is not None:
        seq = args.seq_len or preset.settings[0][0]
        pairs = args.num_kv_pairs or min(p for _, p in preset.settings)
        changes["settings"] = ((seq, pairs),)
    for opt, key in (("steps", "steps"), ("vocab_size", "vocab_size"), ("eval_examples", "eval_examples"),
                     ("layers", "num_layers")):
        if getattr(args, opt) is not None:
            changes[key] = getattr(args, opt)
    if args.lr is not None:
        changes["lrs"] = tuple(args.lr)
    if args.seed is not None:
        changes["seeds"] = tuple(args.seed)
    if args.mechanisms is not None:
        known = {e.label: e for e in preset.mechanisms} | {e.entry: e for e in preset.mechanisms}
        unknown = [m for m in args.mechanisms if m not in known]
        if unknown:
            parser.error(f"argument --mechanisms: with --preset zoology choose among "
                         f"{', '.join(e.label for e in preset.mechanisms)} (or their entries); got "
                         f"{', '.join(unknown)}")
        changes["mechanisms"] = tuple(dict.fromkeys(known[m] for m in args.mechanisms))
    for opt in ("task", "embed_dim", "heads", "sweep", "save", "power_a"):
        if getattr(args, opt, None) not in (None, [], False):
            parser.error(f"argument --{opt.replace('_', '-')}: not with --preset zoology (it sets the task and "
                         f"widths; use --widths)")
    if args.task_param or args.param:
        parser.error("arguments --task-param/--param: not with --preset zoology")
    preset = replace(preset, **changes)
    import torch

    dev = torch.device(args.device_resolved)
    if args.batch is not None:
        batch = args.batch
    elif dev.type == "cuda":
        batch = device_batch(None, "cuda", seq_len=max(s for s, _ in preset.settings))
    else:
        batch = preset.batch if args.quick else device_batch(None, "cpu", seq_len=0)
    preset = replace(preset, batch=batch)
    try:
        preset.check()
    except ValueError as exc:
        parser.error(str(exc))
    return preset


def run_zoology_cli(args: Any, parser: Any) -> int:
    """``attnkit quality --preset zoology``: run, print the tables, write the report next to ``--out``."""
    import sys

    import torch

    from attnkit.quality.device import resolve_device

    try:
        args.device_resolved = resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"argument {exc}")
    preset = preset_from_args(args, parser)
    torch.set_num_threads(args.threads)
    est = estimate_gpu_seconds(preset)
    print(f"attnkit quality --preset zoology: {len(preset.mechanisms)} mechanisms x widths "
          f"{','.join(map(str, preset.widths))} x settings "
          f"{', '.join(f'{s} tokens/{p} pairs' for s, p in preset.settings)}; {preset.steps} steps of "
          f"{preset.batch} x learning rates {', '.join(f'{x:g}' for x in preset.lrs)} on {args.device_resolved} "
          f"(rough GPU estimate {est / 60:.0f} min); writing to {args.out}/", file=sys.stderr)
    jobs = args.jobs or 1

    def save_partial(doc: dict[str, Any]) -> None:
        write_zoology_report(doc, args.out, plots=False)

    doc = run_zoology(preset, device=args.device_resolved, precision=args.precision, jobs=jobs,
                      progress=not args.no_progress, on_result=save_partial)
    written = write_zoology_report(doc, args.out, plots=not args.no_plots)
    print(terminal_tables(doc))
    if written["plot_error"]:
        print(f"\nattnkit quality: {written['plot_error']}", file=sys.stderr)
    print(f"\nReport: {written['md']}" + (f" and {written['png']}" if written["png"] else "")
          + f"; data: {written['json']}")
    if doc["interrupted"]:
        print("attnkit quality: interrupted; the results gathered so far were written", file=sys.stderr)
        return 130
    if doc["rows"] and all(r["status"] != "ok" for r in doc["rows"]):
        print("attnkit quality: every run failed (see zoology.md)", file=sys.stderr)
        return 1
    return 0
