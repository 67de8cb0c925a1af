"""Issue 27: the report decides (fastest per accuracy class, memory, error on structured inputs), timing under
load is recorded and flagged, the SDPA baseline is never missing beside a measured cell, `--all` covers the
registry. Fakes keep it fast (tests/test_bench_fakes.py)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import attnkit
from attnkit.bench import BenchConfig, run_benchmark, select_variants
from attnkit.bench import report as rep
from attnkit.bench.runner import CELL_FIELDS
from attnkit.bench.workloads import STRUCTURES, all_config, default_selection, make_inputs
from test_bench_fakes import registered


def tiny(**kw) -> BenchConfig:
    base = dict(seq_lens=[16, 32], heads=2, head_dim=8, repeats=3, cell_budget_s=0.5, time_budget_s=60,
                flex=False, memory=False, error_rows=8)
    base.update(kw)
    return BenchConfig(**base)


def test_cells_record_load_class_and_structured_errors():
    with registered("fake_exact", "fake_band", "fake_mean"):
        doc = run_benchmark(tiny(mechanisms=["fake_exact", "fake_band", "fake_mean"]), progress=False)
    cells = {(c["label"], c["seq_len"]): c for c in doc["results"]}
    for c in doc["results"]:
        assert set(c) == set(CELL_FIELDS)
        assert isinstance(c["load"], float) and c["load"] >= 0
        assert c["unstable"] in (True, False) and c["reruns"] in (0, 1)
    assert cells[("sdpa", 32)]["accuracy_class"] == "exact"
    assert cells[("fake_exact", 32)]["accuracy_class"] == "exact" and cells[("fake_exact", 32)]["errors"] is None
    band, mean = cells[("fake_band", 32)], cells[("fake_mean", 32)]
    # The band is exact for its own mask (the check) but a different model: its errors are against full softmax.
    assert band["accuracy_class"] == "masked" and band["exact_check"] == "ok"
    assert set(band["errors"]) == set(STRUCTURES) and band["errors"]["random"] > 0.05
    assert band["errors"]["local"] < band["errors"]["random"]  # a window is what local inputs need
    assert mean["accuracy_class"] == "approx" and set(mean["errors"]) == set(STRUCTURES)
    assert mean["errors"]["clustered"] > 0.1


def test_structured_inputs_have_their_structure():
    g = torch.Generator().manual_seed(0)
    q, k, v = make_inputs("low_rank", (1, 2, 64, 16), g)
    assert int(torch.linalg.matrix_rank(q[0, 0])) == 4 and int(torch.linalg.matrix_rank(v[0, 0])) == 4
    q, k, v = make_inputs("local", (1, 2, 256, 32), g)
    p = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)
    idx = torch.arange(256)
    near = (idx[:, None] - idx[None, :]).abs() <= 32
    assert float((p * near).sum(-1).mean()) > 0.8  # most of each query's attention within 32 positions
    with pytest.raises(ValueError, match="inputs must be one of"):
        make_inputs("nope", (1, 1, 4, 4), g)


def test_unstable_cells_are_re_run_and_flagged():
    with registered("fake_jitter"):
        doc = run_benchmark(tiny(mechanisms=["fake_jitter"], seq_lens=[16], repeats=4), progress=False)
    jitter = next(c for c in doc["results"] if c["mechanism"] == "fake_jitter")
    assert jitter["reruns"] == 1 and jitter["unstable"] is True
    assert jitter["time_max_s"] > 1.5 * jitter["time_min_s"]
    text = rep.terminal_summary(doc)
    assert re.search(r"fake_jitter\s.*~", text) and "unstable" in text
    header, rows = rep.full_table(doc)
    row = next(r for r in rows if r[0] == "fake_jitter")
    assert row[header.index("stable")] == "UNSTABLE" and row[header.index("load")] != "-"


def test_baseline_skipped_for_time_is_measured_when_others_ran():
    """The 16K summary lost its SDPA ratio when the baseline's prediction did not fit but the cheaper variants
    ran: the baseline is now measured after them, outside the budget, and their ratios derived."""
    with registered("fake_mean"):
        cfg = tiny(mechanisms=["fake_mean"], seq_lens=[16, 64], max_call_s=1e-9)
        variants = select_variants(cfg)
        for v in variants:
            if v.name == "fake_mean":
                v.seq_lens = [64]  # no history: not predicted, so it runs at 64 while the baseline is skipped
        doc = run_benchmark(cfg, variants=variants, progress=False)
    cells = {(c["label"], c["seq_len"]): c for c in doc["results"]}
    base = cells[("sdpa", 64)]
    assert base["status"] == "ok" and "after the other variants" in base["message"]
    assert cells[("fake_mean", 64)]["vs_sdpa"] == pytest.approx(cells[("fake_mean", 64)]["time_s"] / base["time_s"])
    assert sum(1 for c in doc["results"] if c["label"] == "sdpa" and c["seq_len"] == 64) == 1


def _cell(label, n, time_s, mem, cls, exact=True, errors=None, error=0.0, kind="mechanism", family="f"):
    return {"label": label, "mechanism": label, "seq_len": n, "status": "ok", "time_s": time_s,
            "peak_memory_bytes": mem, "accuracy_class": cls, "errors": errors, "error": error, "kind": kind,
            "family": family, "exact": exact, "causal": False, "unstable": False, "density": None,
            "error_reference": "softmax", "exact_check": "ok" if exact else None}


def _doc(cells):
    return {"config": {"inputs": "clustered", "dtype": "float32"}, "results": cells, "variants": []}


def test_decision_picks_per_class_with_memory_and_structured_error():
    GiB = 2**30
    n = 16384
    doc = _doc([
        _cell("sdpa", n, 1.0, 3 * GiB, "exact", kind="baseline", family="torch"),
        _cell("tiled", n, 1.5, 0.2 * GiB, "exact", family="exact"),
        _cell("chunked", n, 1.2, 0.9 * GiB, "exact", family="exact"),
        _cell("sliding_window", n, 0.05, 0.1 * GiB, "masked", errors={"clustered": 0.7}, family="exact"),
        _cell("nystrom", n, 0.1, 0.1 * GiB, "approx", exact=False, errors={"clustered": 0.2}, family="approx"),
        _cell("linformer", n, 0.08, 0.1 * GiB, "approx", exact=False, errors={"clustered": 0.9}, family="approx"),
        _cell("aft_simple", n, 0.01, 0.1 * GiB, "mixer", family="mixers"),
    ])
    picks = {need: p[n]["label"] for need, _, p in rep.decision_cells(doc)}
    assert picks["exact, fastest"] == "sdpa"
    assert picks["exact, under 1 GiB"] == "chunked"  # sdpa needs 3 GiB
    assert picks["exact, least memory"] == "tiled"
    assert picks["masked (different model), fastest"] == "sliding_window"  # never in an exact row
    assert picks["approximate, fastest"] == "linformer"
    assert picks["approximate, lowest error on clustered inputs"] == "nystrom"
    assert picks["token mixer, fastest"] == "aft_simple"
    header, rows = rep.decision_table(doc)
    assert header == ["need (pick this if ...)", "n = 16K"]
    assert any("sliding_window" in r[1] and "err 0.7 clustered" in r[1] for r in rows)
    families = dict((r[0], r[1]) for r in rep.family_table(doc)[1])
    assert families["approx"].startswith("linformer") and families["exact"].startswith("sliding_window")


def test_first_screen_of_the_html_answers_the_two_questions(tmp_path):
    """"Which mechanism for 16K tokens, exact, under 1 GB" and "which approximation has the lowest error at 4K
    on clustered inputs" are answered by the first table of report.html, before any other table."""
    GiB = 2**30
    cells = []
    for n in (4096, 16384):
        s = (n / 4096) ** 2
        cells += [
            _cell("sdpa", n, 0.1 * s, 0.5 * GiB * s, "exact", kind="baseline", family="torch"),
            _cell("softmax", n, 0.12 * s, 0.1 * GiB, "exact", family="exact"),
            _cell("nystrom", n, 0.01, 0.05 * GiB, "approx", exact=False, errors={"clustered": 0.05}),
            _cell("performer", n, 0.02, 0.05 * GiB, "approx", exact=False, errors={"clustered": 0.4}),
        ]
    doc = _doc(cells)
    doc.update(schema="attnkit-bench/1", machine={"cpu": "cpu", "torch_threads": 2, "torch": "2"},
               memory_method="m", interrupted=False, elapsed_s=1.0)
    doc["config"].update(device="cpu", batch=1, heads=4, head_dim=64, backward=False, error_rows=8,
                         max_call_s=6, time_budget_s=170, mechanisms=None, seq_lens=None, causal="default")
    for c in doc["results"]:
        c.update({k: c.get(k) for k in CELL_FIELDS})
    doc["variants"] = [{"name": x, "label": x, "kind": "baseline" if x == "sdpa" else "mechanism", "family": "f",
                        "exact": x in ("sdpa", "softmax"), "causal": False, "seq_lens": [4096, 16384]}
                       for x in ("sdpa", "softmax", "nystrom", "performer")]
    rep.write_report(copy.deepcopy(doc), tmp_path, plots=False)
    page = (tmp_path / "report.html").read_text()
    first = page[page.index("<table"):page.index("</table>")]
    assert page.index("Which mechanism to pick") < page.index("Time per call")
    row_exact = re.search(r"exact, under 1 GiB.*?</tr>", first, flags=re.S).group(0)
    cols = re.findall(r"<td>(.*?)</td>", row_exact, flags=re.S)  # the length columns: 4K, 16K
    assert len(cols) == 2 and "softmax" in cols[1] and "sdpa" not in cols[1]  # 16K: sdpa needs 8 GiB
    row_err = re.search(r"lowest error on clustered inputs.*?</tr>", first, flags=re.S).group(0)
    assert "nystrom" in re.findall(r"<td>(.*?)</td>", row_err, flags=re.S)[0]  # the 4K column
    assert "overflow-x:auto" in page  # wide tables scroll inside the page (All measurements at 1400 px)
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Which mechanism to pick") < md.index("## Time per call")


def test_pareto_places_masks_by_error_against_full_attention(tmp_path):
    pytest.importorskip("matplotlib")
    with registered("fake_exact", "fake_band", "fake_mean"):
        doc = run_benchmark(tiny(mechanisms=["fake_exact", "fake_band", "fake_mean"], seq_lens=[32]),
                            progress=False)
    from attnkit.bench import plots

    assert plots.pareto_length(doc) == 32
    band = next(c for c in doc["results"] if c["mechanism"] == "fake_band")
    assert rep.cell_error(band, doc) == band["errors"]["clustered"] > 1e-3  # not in the exact band
    assert "error_vs_time.png" in plots.make_plots(doc, tmp_path)


def test_default_selection_has_one_mechanism_of_every_family():
    mechs = attnkit.list_mechanisms()
    chosen = default_selection(mechs)
    assert {m.family for m in chosen} == {m.family for m in mechs}
    assert {"softmax", "s2_attention", "aft_simple"} <= {m.name for m in chosen}


def test_all_covers_every_record_or_names_why():
    cfg = all_config()
    variants = select_variants(cfg)
    covered = {v.name for v in variants if v.kind == "mechanism"}
    assert covered == {m.name for m in attnkit.list_mechanisms()}
    assert cfg.seq_lens == [512, 4096, 16384] and cfg.time_budget_s == 600
    for v in variants:
        assert v.seq_lens or v.unsupported, v.label
    # families interleaved: the first variants after the baselines span every family
    first = [v.family for v in variants if v.kind != "baseline"][:6]
    assert len(set(first)) == len({m.family for m in attnkit.list_mechanisms()})
    from attnkit.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--all", "--quick"])


def test_memory_tracer_prints_nothing_through_the_progress_bar(capfd):
    """The profiler's C++ warning about a block allocated before tracing printed through the progress bar."""
    from attnkit.bench import measure

    held = [torch.randn(512, 512)]

    def fn():
        held.pop()  # frees a block allocated before the tracing started
        return torch.randn(8)

    _, peak = measure.peak_memory(fn, torch.device("cpu"))
    err = capfd.readouterr().err
    assert peak is not None and "profil" not in err.lower() and "Memory block" not in err


def test_gpu_check_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    """benchmarks/gpu_check.sh printed two tracebacks, exited 0 and left an untracked gpu-check/ folder."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available() or shutil.which("bash") is None:
        pytest.skip("checks the machine without a GPU")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu-check"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no usable CUDA GPU" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()
    assert "gpu-check/" in (root / ".gitignore").read_text().split()


def test_coverage_names_why_each_record_was_left_out():
    with registered("fake_exact", "fake_failing", "fake_mean"):
        doc = run_benchmark(tiny(mechanisms=["fake_exact", "fake_failing", "fake_mean"], seq_lens=[16]),
                            progress=False)
        causal = run_benchmark(tiny(mechanisms=["fake_exact", "fake_mean"], seq_lens=[16], causal="on"),
                               progress=False)
    summary, left = rep.coverage(doc)
    assert summary == "2 of 3 selected records measured at least once"
    assert left == ["fake_failing: RuntimeError: this mechanism is broken on purpose"]
    assert "Coverage: 2 of 3" in rep.terminal_summary(doc)
    summary, left = rep.coverage(causal)
    assert summary.startswith("1 of 2") and left == ["fake_mean: no causal form"]


def test_decoding_state_plot_for_causal_linear_attention(tmp_path):
    pytest.importorskip("matplotlib")
    from attnkit.bench import plots

    doc = run_benchmark(tiny(mechanisms=["linear_elu"], seq_lens=[32]), progress=False)
    cells = {c["label"]: c for c in doc["results"]}
    kv, state = cells["sdpa causal"]["state_bytes"], cells["linear_elu causal"]["state_bytes"]
    assert kv == 2 * 32 * 8 * 4 * 2 and state > 0  # K and V of 32 tokens, 2 heads, head dim 8, float32
    assert cells["linear_elu causal"]["errors"]["clustered"] > 0
    assert "state_vs_error.png" in plots.make_plots(doc, tmp_path)


def test_compile_time_is_kept_out_of_the_budget():
    from attnkit.bench.runner import _Run

    run = _Run(tiny(), [], progress=False, on_cell=None)
    run.start -= 100.0  # 100 s ago ...
    run.compile_total_s = 90.0  # ... of which 90 s compiling
    assert 10.0 <= run.elapsed_s() < 11.0
    doc = {"config": {"backward": False, "device": "cpu", "dtype": "float32", "batch": 1, "heads": 4,
                      "head_dim": 64}, "machine": {"cpu": "x", "torch_threads": 2, "torch": "2"},
           "interrupted": False, "elapsed_s": 100.0, "compile_s": 90.0, "results": []}
    assert "1m40s (of which 1m30s compiling, outside the budget)" in rep.headline(doc)


def test_decision_table_keeps_the_lengths_a_reader_asks_about():
    lens = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    doc = _doc([_cell("sdpa", n, 1e-3 * n, n, "exact", kind="baseline") for n in lens])
    chosen = rep.decision_lengths(doc)
    assert len(chosen) == rep.DECISION_COLUMNS and {512, 4096, 16384, 65536} <= set(chosen)
    assert rep.decision_lengths(_doc([_cell("sdpa", n, 1.0, 1, "exact") for n in lens[:3]])) == lens[:3]
