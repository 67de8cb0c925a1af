"""The `attnkit` command line end to end: `list`, `bench` on a tiny configuration, and bad options."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import pytest
import torch

from attnkit.bench.runner import CELL_FIELDS, SCHEMA, STATUSES
from attnkit.cli import COMMANDS, main
from test_bench_fakes import PAPER, registered


def test_list_shows_every_mechanism_with_its_facts(capsys):
    with registered() as fakes:
        assert main(["list"]) == 0
        out = capsys.readouterr().out
        header = out.splitlines()[0].split()
        assert header == ["name", "kind", "family", "exact", "complexity", "causal", "source", "devices"]
        lines = out.splitlines()
        for m in fakes:
            i = next(i for i, x in enumerate(lines) if x.split() and x.split()[0].rstrip("*") == m.name)
            line, block = lines[i], "\n".join(lines[i:i + 4])
            assert m.family in line and m.complexity in line and PAPER in block
            assert line.split()[1] == "attention"
            assert ("exact" if m.exact else "approx") in line.split()[3]
            assert ("yes" if m.causal else "no") in line.split()
            assert line.split()[-1] == "cpu,cuda"
            assert line.split()[-2] == ("deviation" if m.source.startswith("deviation:") else m.source)
            assert "params:" in block and "causal=False" in block
            # a deviation says what it does instead, in full, under the record
            assert ("source: " + m.source[:40] in block) == m.source.startswith("deviation:")
        assert main(["list", "--json"]) == 0
        records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert records["fake_mean"]["exact"] is False and records["fake_mean"]["causal"] is False
        assert records["fake_band"]["paper"] == PAPER and records["fake_band"]["in_default_bench"]
        assert records["fake_band"]["source"] == "paper+catalogue"
        assert records["fake_mean"]["source"].startswith("deviation: the mean of the values")
        assert main(["list", "--family", "fakes_approx", "--json"]) == 0
        assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["fake_mean"]
        assert main(["list", "--family", "nope"]) == 2
        assert "no family 'nope'" in capsys.readouterr().err


def test_list_shows_kind_parameters_devices():
    """`attnkit list` says what a mixer is and what each mechanism takes (issue 27)."""
    import attnkit
    from attnkit.registry import REQUIRED

    assert main(["list", "--kind", "mixer", "--json"]) == 0
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["list", "--json"])
    records = {r["name"]: r for r in json.loads(buf.getvalue())}
    assert len(records) == len(attnkit.list_mechanisms())
    mixers = [r for r in records.values() if r["kind"] == "mixer"]
    assert len(mixers) >= 40 and all("dim" in r["required"] for r in mixers)
    assert records["sliding_window"]["optional"]["window"] == 256 and records["sliding_window"]["required"] == []
    assert records["linformer"]["required"] == ["seq_len", "num_heads"]
    assert records["linformer"]["optional"]["proj_len"] == 256
    assert all(r["devices"] == ["cpu", "cuda"] and "causal" in r["optional"] for r in records.values())
    assert attnkit.mechanism_info("aft_local").parameters()["dim"] is REQUIRED
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["list", "--kind", "mixer"]) == 0
    text = buf.getvalue()
    assert "token mixers: x -> x" in text and "aft_local" in text and "required: dim" in text
    assert "\nsliding_window" not in text


def test_list_family_suggests_a_close_name(capsys):
    assert main(["list", "--family", "mixer"]) == 2
    assert "did you mean 'mixers'?" in capsys.readouterr().err


def test_bench_mechanisms_suggests_close_names(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--mechanisms", "performr,slidng_window", "--quick", "--no-progress"])
    err = capsys.readouterr().err
    assert "Did you mean 'performr' -> 'performer'" in err and "'slidng_window' -> 'sliding_window'" in err


def test_bench_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "report"
    requested = ["fake_exact", "fake_band", "fake_mean", "fake_failing"]
    with registered(*requested):
        code = main(["bench", "--mechanisms", ",".join(requested), "--seq-lens", "16,32", "--heads", "2",
                     "--head-dim", "8", "--repeats", "2", "--out", str(out), "--no-progress", "--no-flex"])
    assert code == 0
    term = capsys.readouterr().out
    assert "Median time per call" in term and "fake_band" in term and "FAILED" in term
    for name in ("results.json", "results.csv", "report.md", "report.html", "time_vs_length.png",
                 "memory_vs_length.png", "error_vs_time.png", "speed_of_light.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == SCHEMA and doc["complete"] and not doc["interrupted"]
    assert {"cpu", "torch_threads", "torch", "git_commit"} <= set(doc["machine"])
    assert doc["config"]["seq_lens"] == [16, 32] and doc["config"]["heads"] == 2
    for c in doc["results"]:
        assert set(c) == set(CELL_FIELDS) and c["status"] in STATUSES
        if c["status"] == "ok":
            assert c["time_min_s"] <= c["time_s"] <= c["time_max_s"] and c["flops"] > 0
            assert c["error"] is not None and c["vs_sdpa"] is not None
    seen = {(c["mechanism"], c["seq_len"]) for c in doc["results"]}
    for name in requested + ["sdpa"]:
        assert {(name, 16), (name, 32)} <= seen, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(doc["results"]) and list(rows[0]) == list(CELL_FIELDS)
    md = (out / "report.md").read_text()
    assert "![time_vs_length.png](time_vs_length.png)" in md and "fake_failing: FAILED" in md
    assert "allocation tracer" in md and "<img src='error_vs_time.png'" in (out / "report.html").read_text()


@pytest.mark.parametrize("argv, message", [
    (["bench", "--seq-lens", "12,abc"], "sequence lengths are positive integers"),
    (["bench", "--seq-lens", "0"], "sequence lengths must be positive"),
    (["bench", "--heads", "0"], "expected a positive integer"),
    (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["bench", "--causal", "sometimes"], "invalid choice: 'sometimes'"),
    (["bench", "--mechanisms", "no_such_thing"], "unknown mechanism(s) 'no_such_thing'; known mechanisms"),
    (["bench", "--param", "oops"], "MECHANISM.NAME=VALUE"),
    (["bench", "--param", "performr.num_features=8"], "no mechanism named 'performr'; did you mean 'performer'"),
    (["bench", "--param", "performer.num_featurs=8"], "mechanism 'performer' does not accept num_featurs=8"),
    (["bench", "--param", "performer.num_features=8x"], "performer.num_features='8x' does not parse as int"),
    (["bench", "--param", "sliding_window.window=-3"], "mechanism 'sliding_window' does not accept window=-3"),
    (["bench", "--device", "tpu"], "'tpu' is not a device; use cpu, cuda or cuda:N"),
    (["bench", "--time-budget", "-3"], "expected a positive number of seconds"),
    (["bench", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_options_exit_non_zero_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path)] if argv[0] == "bench" else argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_cuda_requested_without_cuda(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


def _probe_arguments(parser):
    parser.add_argument("--level", type=int, default=0)


def _probe_run(args):
    return 7 + args.level


def test_subcommand_table_accepts_lazy_entries():
    # A later subcommand (e.g. `attnkit quality`) is one table entry, possibly "module:function" strings.
    assert {"list", "bench"} <= set(COMMANDS)
    from attnkit.cli import Command, build_parser

    COMMANDS["_probe"] = Command("_probe", "probe", f"{__name__}:_probe_arguments", f"{__name__}:_probe_run")
    try:
        parser = build_parser()
        assert "_probe" in parser.format_help()
        assert main(["_probe", "--level", "3"]) == 7 + 3
    finally:
        del COMMANDS["_probe"]


@pytest.mark.skipif(shutil.which("attnkit") is None, reason="console script not installed")
def test_console_script_runs():
    res = subprocess.run(["attnkit", "list"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("name")
    res = subprocess.run(["attnkit", "bench", "--heads", "-1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--heads" in res.stderr


def test_bench_keeps_the_quality_section_of_an_existing_report(tmp_path):
    from attnkit.quality.report import BEGIN, END

    out = tmp_path / "report"
    out.mkdir()
    section = f"{BEGIN}\n## Quality\nkept table\n{END}"
    (out / "report.md").write_text(f"# old report\n\n{section}\n")
    (out / "report.html").write_text(f"<html><body>old {section}</body></html>")
    with registered("fake_exact"):
        code = main(["bench", "--mechanisms", "fake_exact", "--seq-lens", "16", "--heads", "2", "--head-dim", "8",
                     "--repeats", "1", "--out", str(out), "--no-progress", "--no-flex", "--no-plots"])
    assert code == 0
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "old report" not in md and md.count("kept table") == 1 and "fake_exact" in md
    assert html.count("kept table") == 1 and html.index("kept table") < html.lower().rindex("</body>")


def test_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv in (["bench", "--mechanisms", "softmax", "--seq-lens", "16"], ["bench", "--from-results", "x.json"]):
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--out", str(blocker / "report"), "--no-progress"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("attnkit bench: error: argument --out: cannot write to"), err


def test_a_run_whose_every_cell_failed_exits_non_zero(tmp_path, capsys):
    with registered("fake_failing"):
        code = main(["bench", "--mechanisms", "fake_failing", "--seq-lens", "16", "--heads", "2", "--head-dim", "8",
                     "--repeats", "1", "--out", str(tmp_path / "r"), "--no-progress", "--no-flex", "--no-plots"])
    assert code == 1 and "every cell of the selected mechanisms failed" in capsys.readouterr().err
    assert (tmp_path / "r" / "results.json").is_file()  # the report is still written


def test_run_times_are_stated_once(capsys):
    """README, `attnkit bench --help` and the configs state the same quick and default run times (issue 27: the
    quick run was "15 s", "1 min" and measured 16.5 s)."""
    from pathlib import Path

    from attnkit.cli import DEFAULT_RUN_MIN, QUICK_RUN_S

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"`attnkit bench --quick` is a {QUICK_RUN_S}-second smoke run" in readme
    assert f"about {DEFAULT_RUN_MIN} minutes on 2 CPU cores" in readme
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"a ~{QUICK_RUN_S} s run" in text and f"about {DEFAULT_RUN_MIN} minutes" in text
    assert f"--quick about {QUICK_RUN_S} seconds" in text
