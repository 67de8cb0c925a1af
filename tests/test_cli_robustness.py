"""Every `attnkit` subcommand under bad conditions (issue 28): missing input files, output folders that cannot be
written (a file in the way, no permission), a full disk (the writer raises ``OSError(ENOSPC)``), Ctrl-C once and
twice, and checkpoints that are truncated, random, of other content or ask for more than they hold.

What must hold: one line ``attnkit <command>: error: ...`` and exit code 2 for what the user controls (never a
traceback), output paths checked before any training or measuring, no partial ``.tmp`` file left behind, and
after Ctrl-C an exit within seconds with a valid report (or none), never a hang.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from attnkit.cli import COMMANDS, main
from attnkit.quality import load_checkpoint
from test_bench_fakes import registered

SRC = str(pathlib.Path(__file__).resolve().parents[1] / "src")
TINY_QUALITY = ["quality", "--quick", "--steps", "2", "--mechanisms", "softmax", "--jobs", "1", "--no-plots",
                "--no-progress"]
TINY_BENCH = ["bench", "--mechanisms", "fake_exact", "--seq-lens", "16", "--heads", "2", "--head-dim", "8",
              "--repeats", "1", "--no-progress", "--no-flex", "--no-plots", "--no-memory"]
ONE_LINE_ERROR = re.compile(r"^attnkit [a-z]+: error: .+$")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` -> (exit code, stderr); a ``SystemExit`` (argparse, ``_check_out``) is an exit code."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and one error line (progress lines such as "writing to ..." may precede it)."""
    lines = [x for x in err.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and ONE_LINE_ERROR.match(lines[0]), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """A real checkpoint of `attnkit quality --save` (softmax on MQAR, 2 steps)."""
    base = tmp_path_factory.mktemp("ckpt")
    assert main(TINY_QUALITY + ["--out", str(base / "report"), "--save", str(base / "ck")]) == 0
    (path,) = (base / "ck").glob("*.pt")
    return path


@pytest.fixture
def bad_checkpoints(checkpoint, tmp_path) -> dict[str, pathlib.Path]:
    data = checkpoint.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "random": os.urandom(4096),
        "text": b"not a checkpoint\n",
        "empty": b"",
    }
    out = {}
    for name, blob in files.items():
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(blob)
    torch.save({"format": "something-else", "weights": torch.zeros(3)}, tmp_path / "other.pt")
    out["other"] = tmp_path / "other.pt"
    blob = torch.load(checkpoint, weights_only=True)
    blob["info"]["model"].update(vocab_size=131072, embed_dim=131072)  # ~64 GiB of embedding, in a small file
    torch.save(blob, tmp_path / "oversized.pt")
    out["oversized"] = tmp_path / "oversized.pt"
    blob = torch.load(checkpoint, weights_only=True)
    blob["info"]["model"]["num_layers"] += 1  # sizes within bounds, weights of another model
    torch.save(blob, tmp_path / "mismatched.pt")
    out["mismatched"] = tmp_path / "mismatched.pt"
    return out


# ------------------------------------------------------------------------------------------------------------
# Every subcommand is covered
# ------------------------------------------------------------------------------------------------------------

# What each subcommand reads and writes (what the tests below exercise); a new subcommand must be added here.
COVERED = {
    "list": {"inputs": False, "outputs": False},
    "backends": {"inputs": False, "outputs": False},
    "bench": {"inputs": True, "outputs": True},  # --from-results; --out
    "quality": {"inputs": False, "outputs": True},  # --out, --save
    "analyze": {"inputs": True, "outputs": True},
    "kvcache": {"inputs": True, "outputs": True},
}


def test_every_subcommand_of_the_help_is_covered(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    listed = set(re.search(r"\{([a-z,]+)\}", out).group(1).split(",")) if "{" in out else set()
    listed |= {m for m in COMMANDS if re.search(rf"^\s+{m}\s", out, re.M)}
    assert listed == set(COMMANDS) == set(COVERED), (listed, set(COVERED))


@pytest.mark.parametrize("argv,needle", [
    (["list", "--family", "nosuch"], "no family 'nosuch'"),
    (["backends", "--operation", "nosuch"], "invalid choice"),
])
def test_commands_without_files_refuse_bad_options(argv, needle, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2 and needle in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------
# Missing input files
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["bench", "--from-results", "{missing}"], "--from-results"),
    (["analyze", "{missing}"], "does not exist"),
    (["kvcache", "{missing}"], "does not exist"),
    (["kvcache", "{dir}"], "is a directory"),
    (["analyze", "{dir}"], "no checkpoints"),
])
def test_missing_inputs_are_one_line(argv, needle, tmp_path, capsys):
    subs = {"missing": str(tmp_path / "nope.pt"), "dir": str(tmp_path)}
    argv = [a.format(**subs) for a in argv] + ["--out", str(tmp_path / "out")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------------------
# Output folders that cannot be written: refused before any work
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Training, measuring and judging fail the test if they start."""
    import attnkit.bench.runner
    import attnkit.kvpolicy.judge
    import attnkit.quality.train

    def boom(*a, **k):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(attnkit.quality.train, "run_quality", boom)
    monkeypatch.setattr(attnkit.bench.runner, "run_benchmark", boom)
    monkeypatch.setattr(attnkit.kvpolicy.judge, "judge_policies", boom)


def _cases(checkpoint):
    return [
        (TINY_BENCH + ["--out", "{bad}"], "--out"),
        (["bench", "--from-results", "{results}", "--out", "{bad}"], "--out"),
        (TINY_QUALITY + ["--out", "{bad}"], "--out"),
        (TINY_QUALITY + ["--out", "{good}", "--save", "{bad}"], "--save"),
        (["analyze", str(checkpoint), "--no-plots", "--no-progress", "--out", "{bad}"], "--out"),
        (["kvcache", str(checkpoint), "--no-plots", "--no-progress", "--out", "{bad}"], "--out"),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("how", ["file_in_the_way", "file_as_parent", "no_permission"])
def test_unwritable_outputs_are_refused_before_any_work(case, how, checkpoint, tmp_path, capsys, no_work):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    if how == "file_in_the_way":
        bad = blocker
    elif how == "file_as_parent":
        bad = blocker / "out"
    else:
        if os.name != "posix" or os.geteuid() == 0:
            pytest.skip("permissions do not bind root (or this OS)")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        bad = locked / "out"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"schema": __import__("attnkit.bench.runner").bench.runner.SCHEMA}))
    argv, option = _cases(checkpoint)[case]
    argv = [a.format(bad=bad, good=tmp_path / "good", results=results) for a in argv]
    with registered("fake_exact"):
        code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, f"argument {option}: cannot write to")


# ------------------------------------------------------------------------------------------------------------
# A full disk: one line, and no partial .tmp file
# ------------------------------------------------------------------------------------------------------------

def _full_disk(monkeypatch):
    real = pathlib.Path.write_text

    def write_text(self, data, *a, **k):
        real(self, data[: len(data) // 2], *a, **k)  # a partial file, as a disk filling up leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def _no_tmp(folder: pathlib.Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


@pytest.mark.parametrize("command", ["bench", "quality", "analyze", "kvcache"])
def test_full_disk_is_one_line_without_partial_files(command, checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = {
        "bench": TINY_BENCH + ["--out", str(out)],
        "quality": TINY_QUALITY + ["--out", str(out)],
        "analyze": ["analyze", str(checkpoint), "--no-plots", "--no-progress", "--no-head-importance",
                    "--batch", "2", "--out", str(out)],
        "kvcache": ["kvcache", str(checkpoint), "--no-plots", "--no-progress", "--batch", "2", "--out", str(out)],
    }[command]
    _full_disk(monkeypatch)
    with registered("fake_exact"):
        code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "No space left on device", "the disk is full")
    _no_tmp(out)


def test_full_disk_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch):
    real = torch.save

    def save(obj, f, *a, **k):
        pathlib.Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", save)
    code, err = run_cli(TINY_QUALITY + ["--out", str(tmp_path / "out"), "--save", str(tmp_path / "ck")], capsys)
    monkeypatch.setattr(torch, "save", real)
    assert_one_line_error(code, err, "No space left on device")
    assert list((tmp_path / "ck").iterdir()) == []  # no partial .pt.tmp, no .pt


def test_a_report_write_that_fails_keeps_the_previous_report(tmp_path, monkeypatch):
    from attnkit.reporting import write_text_atomic

    path = tmp_path / "report.md"
    write_text_atomic(path, "old report")
    _full_disk(monkeypatch)
    with pytest.raises(OSError):
        write_text_atomic(path, "new report " * 100)
    monkeypatch.undo()
    assert path.read_text() == "old report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: a ValueError naming the file, whatever the file holds
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["truncated", "random", "text", "empty", "other", "oversized", "mismatched"])
def test_bad_checkpoints_are_a_value_error_naming_the_file(kind, bad_checkpoints):
    path = bad_checkpoints[kind]
    with pytest.raises(ValueError) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)
    assert type(exc.value) is ValueError  # not torch's or pickle's exception types


def test_an_oversized_checkpoint_is_refused_before_allocating(bad_checkpoints, monkeypatch):
    import attnkit.quality.model as qm

    def boom(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(qm.QualityModel, "__init__", boom)
    with pytest.raises(ValueError, match=r"vocab_size=131072, but the file's tensors hold only \d+ numbers"):
        load_checkpoint(bad_checkpoints["oversized"])


def test_the_good_checkpoint_still_loads(checkpoint):
    model, info = load_checkpoint(checkpoint)
    assert info["task"] == "mqar" and not model.training


def test_analyze_reports_a_bad_file_and_goes_on(checkpoint, bad_checkpoints, tmp_path, capsys):
    out = tmp_path / "analysis"
    code, err = run_cli(["analyze", str(bad_checkpoints["truncated"]), str(checkpoint),
                         str(bad_checkpoints["oversized"]), "--no-plots", "--no-progress", "--no-head-importance",
                         "--batch", "2", "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert (out / checkpoint.stem / "report.md").is_file()  # the good one was analysed
    assert f"error: {bad_checkpoints['truncated']}" in err and f"error: {bad_checkpoints['oversized']}" in err
    assert "2 of 3 checkpoints could not be read" in err


@pytest.mark.parametrize("kind", ["truncated", "random", "oversized"])
def test_kvcache_bad_checkpoint_is_one_line(kind, bad_checkpoints, tmp_path, capsys):
    code, err = run_cli(["kvcache", str(bad_checkpoints[kind]), "--no-plots", "--no-progress", "--out",
                         str(tmp_path / "kv")], capsys)
    assert_one_line_error(code, err, str(bad_checkpoints[kind]))


def test_bench_unknown_engine_is_refused_with_a_suggestion(tmp_path, capsys):
    code, err = run_cli(TINY_BENCH + ["--engines", "tiled,flx", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown backend 'flx' (did you mean 'flex'?)" in err and "tiled" in err
    code, err = run_cli(TINY_BENCH + ["--engines", "nosuch", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown backend 'nosuch'" in err and "known backends:" in err
    assert not (tmp_path / "results.json").exists()


# ------------------------------------------------------------------------------------------------------------
# Ctrl-C: a subprocess, interrupted once or twice after its run starts; it must exit within seconds
# ------------------------------------------------------------------------------------------------------------

class _Proc:
    """``python -m attnkit.cli ARGS`` in its own process group (as a terminal's Ctrl-C reaches every process of
    the group: workers too), with stderr collected by a thread."""

    def __init__(self, args: list[str]):
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.p = subprocess.Popen([sys.executable, "-m", "attnkit.cli", *args], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.err: list[str] = []
        self.out = ""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stderr:
            self.err.append(line)

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while not any(text in x for x in self.err):
            if self.p.poll() is not None or time.monotonic() > end:
                self.kill()
                pytest.fail(f"never printed {text!r}: {''.join(self.err)[-2000:]}")
            time.sleep(0.05)

    def interrupt(self) -> None:
        os.killpg(self.p.pid, signal.SIGINT)

    def finish(self, timeout: float) -> tuple[int, float]:
        start = time.monotonic()
        try:
            self.out, _ = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"no exit within {timeout} s of Ctrl-C (a hang): {''.join(self.err)[-2000:]}")
        self._t.join(5)
        return self.p.returncode, time.monotonic() - start

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.communicate()


def _valid_bench_report(out: pathlib.Path) -> None:
    doc = json.loads((out / "results.json").read_text())
    assert doc["interrupted"] is True
    md = (out / "report.md").read_text()
    assert "interrupted" in md and md.rstrip().endswith("|")  # the whole table, not a prefix
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    _no_tmp(out)


BENCH_LONG = ["bench", "--mechanisms", "softmax", "--seq-lens", "64,128,256,512,1024,2048,4096", "--repeats",
              "200", "--heads", "2", "--head-dim", "16", "--no-flex", "--no-progress", "--time-budget", "120",
              "--threads", "1"]


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
@pytest.mark.parametrize("presses", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_bench_ctrl_c_leaves_a_valid_report(presses, tmp_path):
    out = tmp_path / "report"
    proc = _Proc(BENCH_LONG + ["--out", str(out)] + (["--no-plots"] if presses == 1 else []))
    proc.wait_for("variants")
    end = time.monotonic() + 120
    while not (out / "results.json").exists() and time.monotonic() < end:  # the first cell is measured
        time.sleep(0.05)
    proc.interrupt()
    if presses == 2:
        time.sleep(0.3)  # while the report is written (plots on: a few seconds)
        proc.interrupt()
    code, took = proc.finish(timeout=60)
    assert code == 130, "".join(proc.err)
    assert "Traceback" not in "".join(proc.err)
    assert took < 30
    _valid_bench_report(out)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
@pytest.mark.parametrize("presses", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_quality_with_workers_exits_promptly_after_ctrl_c(presses, tmp_path):
    """`attnkit quality --jobs 2` could hang forever after Ctrl-C (results written, no exit)."""
    out = tmp_path / "report"
    proc = _Proc(["quality", "--quick", "--steps", "400", "--jobs", "2", "--mechanisms",
                  "softmax,sliding_window@window=4,linear:taylor@qk_dim=8", "--no-plots", "--no-progress", "--out",
                  str(out)])
    proc.wait_for("writing to")
    time.sleep(4.0)  # the workers are up and training
    proc.interrupt()
    if presses == 2:
        time.sleep(0.2)
        proc.interrupt()
    code, took = proc.finish(timeout=60)
    assert code == 130 and "Traceback" not in "".join(proc.err), "".join(proc.err)
    assert took < 15, took
    if (out / "quality.json").exists():
        assert json.loads((out / "quality.json").read_text())["interrupted"] is True
    _no_tmp(out)


def test_bench_inputs_larger_than_memory_are_oom_cells(tmp_path, capsys, monkeypatch):
    """`--batch 100000` allocated the inputs before any check: a raw allocator error (or the OOM killer)."""
    import attnkit.bench.runner as runner

    monkeypatch.setattr(runner, "available_memory_bytes", lambda device: 1 << 10)  # 1 KiB free
    with registered("fake_exact"):
        code, err = run_cli(TINY_BENCH + ["--out", str(tmp_path)], capsys)
    assert code == 1 and "Traceback" not in err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["results"] and all(c["status"] == "oom" and "lower --batch" in c["message"] for c in doc["results"])


def test_quality_refuses_an_infinite_learning_rate(capsys):
    code, err = run_cli(TINY_QUALITY + ["--lr", "inf"], capsys)
    assert code == 2 and "finite and > 0" in err


@pytest.mark.parametrize("extra,needle", [
    (["--task-param", "mqar.seq_len=abc"], "seq_len must be an int"),
    (["--num-kv-pairs", "1000"], "MQAR needs seq_len >= 4 * num_kv_pairs"),
    (["--task", "copy", "--seq-len", "2"], "seq_len must be an int >= 32"),
])
def test_quality_task_parameters_are_checked_before_training(extra, needle, capsys, no_work):
    """These trained every mechanism and reported each run as failed (exit 1)."""
    code, err = run_cli(TINY_QUALITY + extra, capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["analyze", "kvcache"])
def test_ctrl_c_in_analyze_and_kvcache_is_one_line(command, checkpoint, tmp_path, capsys, monkeypatch):
    import attnkit.analysis.report
    import attnkit.kvpolicy.judge

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(attnkit.analysis.report, "analyze", interrupted)
    monkeypatch.setattr(attnkit.kvpolicy.judge, "judge_policies", interrupted)
    code, err = run_cli([command, str(checkpoint), "--no-plots", "--no-progress", "--out", str(tmp_path)], capsys)
    assert code == 130 and err.strip() == f"attnkit {command}: interrupted", err
