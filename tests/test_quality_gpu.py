"""``attnkit quality`` on any device (issue 24): device choice, bf16 autocast choice, device-sized batches, and the
Zoology preset (tiny on the CPU; the full preset is a GPU run, see docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.cli import main
from attnkit.quality import device as qdev
from attnkit.quality import presets
from attnkit.quality.model import QualityModel, parse_mechanism
from attnkit.quality.tasks import get_task
from attnkit.quality.train import QualityConfig, evaluate, make_eval_data, train_one


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA reported present (two devices) without touching a GPU: only for the pure choices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# ---- device --------------------------------------------------------------------------------------------------
def test_resolve_device_auto_and_cpu(no_cuda):
    assert qdev.resolve_device("auto") == "cpu"
    assert qdev.resolve_device(None) == "cpu"
    assert qdev.resolve_device("cpu") == "cpu"


def test_resolve_device_auto_prefers_cuda(fake_cuda):
    assert qdev.resolve_device("auto") == "cuda"
    assert qdev.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"--device cuda:2: only 2 CUDA device\(s\)"):
        qdev.resolve_device("cuda:2")


@pytest.mark.parametrize("name,match", [("cuda", "CUDA is not available here.*--device cpu"),
                                        ("cuda:0", "CUDA is not available"),
                                        ("gpu7", "is not a device; use cpu, cuda"),
                                        ("meta", "runs on cpu or cuda")])
def test_resolve_device_errors_name_the_flag_and_the_fix(no_cuda, name, match):
    with pytest.raises(ValueError, match=match):
        qdev.resolve_device(name)


def test_cli_cuda_unavailable_is_a_usage_error(no_cuda, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["quality", "--device", "cuda", "--out", str(tmp_path), "--quick", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device cuda: CUDA is not available here" in err and "--device cpu" in err


def test_cli_build_config_sizes_the_batch_to_the_device(fake_cuda):
    from attnkit.cli import build_parser
    from attnkit.quality.cli import build_config

    parser = build_parser()
    args = parser.parse_args(["quality", "--mechanisms", "softmax"])
    cfg = build_config(args, parser)
    assert cfg.device == "cuda" and cfg.batch == 256 and cfg.precision == "auto"  # mqar, 128 tokens
    args = parser.parse_args(["quality", "--mechanisms", "softmax", "--device", "cpu"])
    assert build_config(args, parser).batch == 32  # the CPU default is unchanged
    args = parser.parse_args(["quality", "--mechanisms", "softmax", "--batch", "8", "--precision", "fp32"])
    cfg = build_config(args, parser)
    assert cfg.batch == 8 and cfg.precision == "fp32"


def test_device_batch():
    assert qdev.device_batch(7, "cuda", seq_len=512) == 7
    assert qdev.device_batch(None, "cpu", seq_len=512) == 32
    assert qdev.device_batch(None, "cuda", seq_len=128) == 256
    assert qdev.device_batch(None, "cuda", seq_len=512) == 256  # Zoology's batch at its longest sequence
    assert qdev.device_batch(None, "cuda", seq_len=1024) == 128  # capped at 131072 tokens a step
    assert qdev.device_batch(None, "cuda", seq_len=10**6) == 32  # never below the CPU default


# ---- precision -----------------------------------------------------------------------------------------------
def test_autocast_choice_is_a_pure_function_of_mechanism_device_and_precision():
    bf16 = torch.bfloat16
    assert qdev.autocast_dtype("softmax", "cuda") is bf16
    assert qdev.autocast_dtype("gated_deltanet", "cuda") is bf16
    assert qdev.autocast_dtype("linear:taylor@qk_dim=16", "cuda") is bf16
    assert qdev.autocast_dtype("softmax", "cpu") is None  # the CPU keeps float32 (the published CPU numbers)
    assert qdev.autocast_dtype("hrrformer", "cuda") is None and "tolerance" in qdev.precision_reason("hrrformer")
    assert qdev.autocast_dtype("hrrformer@num_heads=2", "cuda") is None
    assert qdev.autocast_dtype("softmax", "cuda", "fp32") is None
    assert qdev.autocast_dtype("hrrformer", "cpu", "bf16") is bf16
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        qdev.autocast_dtype("softmax", "cuda", "fp16")


def test_records_with_a_wide_tolerance_stay_float32(monkeypatch):
    """The rule, not only the list: a record whose tests need tolerance_scale > 1 is kept in float32."""
    monkeypatch.setattr(qdev, "FLOAT32_MECHANISMS", {})
    assert qdev.autocast_dtype("hrrformer", "cuda") is None  # hrr's record: tolerance_scale=4.0
    assert qdev.precision_reason("softmax") is None
    d = qdev.describe_precision(["softmax", "hrrformer"], "cuda", "auto")
    assert d["bf16"] == ["softmax"] and list(d["fp32"]) == ["hrrformer"]


def test_config_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        QualityConfig(precision="half").check()


def _tiny(**kw):
    base = dict(mechanisms=["softmax"], task_params={"mqar": {"seq_len": 16, "num_kv_pairs": 2, "vocab_size": 32}},
                embed_dim=16, steps=3, batch=4, lrs=[1e-2], eval_examples=4, warmup=1)
    return QualityConfig(**{**base, **kw})


def test_evaluate_runs_the_forward_under_autocast():
    task = get_task("mqar")
    cfg = _tiny()
    params = task.params(**cfg.task_params["mqar"])
    model = QualityModel(parse_mechanism("softmax"), vocab_size=task.vocab_size(params), num_outputs=32,
                         embed_dim=16, max_seq_len=16, causal=True)
    seen = []
    model.readout.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    data = make_eval_data(task, params, cfg)
    evaluate(model, task, params, data)
    evaluate(model, task, params, data, autocast=torch.bfloat16)
    assert seen == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("precision,expected", [("auto", "fp32"), ("bf16", "bf16"), ("fp32", "fp32")])
def test_train_one_records_its_precision(precision, expected):
    task = get_task("mqar")
    cfg = _tiny(precision=precision)
    rec = train_one(parse_mechanism("softmax"), task, task.params(**cfg.task_params["mqar"]), cfg)
    assert rec["precision"] == expected and rec["device"] == "cpu" and rec["batch"] == 4
    assert torch.isfinite(torch.tensor(rec["final_loss"]))


# ---- the Zoology preset --------------------------------------------------------------------------------------
def test_zoology_preset_is_the_papers_grid():
    p = presets.ZOOLOGY
    assert p.widths == (64, 128, 256) and p.settings == ((256, 16), (512, 64)) and p.vocab_size == 8192
    assert p.eval_examples == 3000 and p.num_layers == 2 and p.batch == 256
    assert set(p.lrs) <= {1e-4, 4.6e-4, 2.2e-3, 1e-2}  # np.logspace(-4, -2, 4), rounded
    labels = [e.label for e in p.mechanisms]
    assert labels == ["attention", "based", "taylor", "elu", "gla", "gated delta rule", "mamba scan", "mega",
                      "long conv", "sliding window"]
    runs = presets.zoology_configs(p)
    assert len(runs) == 2 * 3 * 2  # settings x widths x head groupings (taylor trains with heads of 16)
    for seq_len, pairs, width, head_dim, cfg in runs:
        assert cfg.task_params["mqar"] == {"seq_len": seq_len, "num_kv_pairs": pairs, "vocab_size": 8192,
                                           "power_a": 0.01}
        assert cfg.embed_dim == width and cfg.num_heads == (1 if head_dim is None else width // head_dim)
    assert sum(len(cfg.mechanisms) for *_, cfg in runs) == 2 * 3 * 10
    # a rough GPU estimate exists and is stated in the docs
    assert 10 * 60 < presets.estimate_gpu_seconds(p) < 60 * 60


@pytest.mark.parametrize("entry", [e for e in presets.ZOOLOGY_MECHANISMS], ids=lambda e: e.label)
def test_every_zoology_entry_builds_at_the_smallest_width_and_runs_causally(entry):
    spec = parse_mechanism(entry.entry)
    heads = 1 if entry.head_dim is None else 64 // entry.head_dim
    torch.manual_seed(0)
    model = QualityModel(spec, vocab_size=64, num_outputs=64, embed_dim=64, num_heads=heads, max_seq_len=32,
                         causal=True)
    x = torch.randint(0, 64, (2, 32))
    y = model(x)
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 1) % 64
    y2 = model(x2)
    assert y.shape == (2, 32, 64)
    torch.testing.assert_close(y[:, :20], y2[:, :20])  # no position looks ahead


def _fake_doc():
    rows = []
    for w, accs in ((64, (0.99, 0.5, 0.1)), (128, (1.0, 0.8, None))):
        for label, acc in zip(("attention", "based", "sliding window"), accs):
            rows.append({"label": label, "entry": label, "seq_len": 256, "num_kv_pairs": 16, "width": w,
                         "status": "ok" if acc is not None else "failed", "message": "" if acc else "boom",
                         "accuracy": acc})
    preset = presets._preset_json(presets.ZOOLOGY)
    return {"schema": presets.SCHEMA, "preset": preset, "device": "cuda", "precision": "auto", "rows": rows,
            "interrupted": False, "elapsed_s": 1.0, "machine": {}}


def test_zoology_tables_and_figure(tmp_path):
    doc = _fake_doc()
    [(title, header, body)] = presets.zoology_tables(doc)
    assert "256 tokens, 16 key-value pairs" in title and header[2:] == ["d=64", "d=128"]
    assert body == [["attention", "attention", "99.0", "100.0"], ["based", "based", "50.0", "80.0"],
                    ["sliding window", "sliding window", "10.0", "failed"]]
    written = presets.write_zoology_report(doc, tmp_path)
    assert written["png"] is not None and (tmp_path / "zoology.png").stat().st_size > 5000
    md = (tmp_path / "zoology.md").read_text()
    assert "| attention | attention | 99.0 | 100.0 |" in md and "![MQAR accuracy vs model width](zoology.png)" in md
    assert "sliding window (d=128, 256 tokens): failed: boom" in md
    assert json.loads((tmp_path / "zoology.json").read_text())["rows"] == doc["rows"]


def test_cli_zoology_preset_tiny_on_cpu(tmp_path, capsys):
    out = tmp_path / "z"
    code = main(["quality", "--preset", "zoology", "--quick", "--device", "cpu", "--mechanisms",
                 "attention,taylor,long conv", "--widths", "16,32", "--steps", "6", "--eval-examples", "16",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    doc = json.loads((out / "zoology.json").read_text())
    assert [(r["label"], r["width"]) for r in doc["rows"]] == [
        ("attention", 16), ("long conv", 16), ("taylor", 16), ("attention", 32), ("long conv", 32), ("taylor", 32)]
    assert all(r["status"] == "ok" and 0 <= r["accuracy"] <= 1 for r in doc["rows"])
    assert {r["num_heads"] for r in doc["rows"] if r["label"] == "taylor"} == {1, 2}  # heads of 16
    assert all(r["precision"] == "fp32" and r["batch"] == 16 for r in doc["rows"])
    assert (out / "zoology.png").exists()
    text = capsys.readouterr().out
    assert "accuracy (%) by model width" in text and "d=32" in text


@pytest.mark.parametrize("argv,match", [
    (["--preset", "zoology", "--task", "listops"], "--task: not with --preset zoology"),
    (["--preset", "zoology", "--mechanisms", "nope"], "choose among attention, based"),
    (["--preset", "zoology", "--widths", "24", "--mechanisms", "taylor"], "not a multiple of its head_dim 16"),
    (["--widths", "64"], "--widths: only with --preset zoology"),
    (["--preset", "zoology", "--widths", "0"], "positive model widths"),
])
def test_cli_zoology_bad_options(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["quality", "--out", str(tmp_path), "--device", "cpu", *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("entry", [e for e in presets.ZOOLOGY_MECHANISMS], ids=lambda e: e.label)
def test_every_zoology_entry_trains_under_bf16_autocast(entry):
    """CPU bf16 autocast stands in for CUDA's: each entry of the preset trains a few steps and records bf16."""
    task = get_task("mqar")
    cfg = _tiny(mechanisms=[entry.entry], embed_dim=32, num_heads=1 if entry.head_dim is None else 32 // entry.head_dim,
                precision="bf16")
    rec = train_one(parse_mechanism(entry.entry), task, task.params(**cfg.task_params["mqar"]), cfg)
    assert rec["precision"] == "bf16" and torch.isfinite(torch.tensor(rec["final_loss"]))
