"""The quality benchmark: task generators (shapes, determinism, defining properties), the model and its linear
attention layer against a plain reference, state sizes, a tiny training run, the report files and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.cli import main
from attnkit.errors import NotSupportedError
from attnkit.quality import report as qreport
from attnkit.quality.model import FeatureMapAttention, QualityModel, parse_mechanism, state_size
from attnkit.quality.tasks import (
    IGNORE,
    LISTOPS_PAD,
    TASKS,
    copy_task,
    evaluate_listops,
    icl_regression,
    listops,
    listops_tokens,
    mqar,
)
from attnkit.quality.train import QualityConfig, run_quality, train_one
from attnkit.testing import assert_close


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is as fast, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- MQAR --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len,pairs,vocab", [(16, 2, 20), (64, 8, 128), (64, 16, 100), (30, 7, 40)])
def test_mqar_shapes_and_every_answer_is_recoverable(seq_len, pairs, vocab):
    b = mqar(32, seq_len=seq_len, num_kv_pairs=pairs, vocab_size=vocab, seed=3)
    assert b.inputs.shape == b.targets.shape == b.mask.shape == (32, seq_len)
    assert b.inputs.dtype == b.targets.dtype == torch.int64 and b.mask.dtype == torch.bool
    assert int(b.inputs.min()) >= 0 and int(b.inputs.max()) < vocab
    context = 2 * pairs
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        keys, values = x[0:context:2], x[1:context:2]
        assert len(set(keys.tolist())) == pairs  # each key once in the context
        assert bool(((keys >= 1) & (keys < vocab // 2)).all()) and bool((values >= vocab // 2).all())
        pos = m.nonzero().flatten()
        assert len(pos) == pairs and int(pos.min()) >= context  # one query per key, after the context
        assert sorted(x[pos].tolist()) == sorted(keys.tolist())
        for p in pos.tolist():  # the answer is the value right after the key in the context
            i = keys.tolist().index(int(x[p]))
            assert int(y[p]) == int(values[i])
            assert (p - context) % 2 == 0
        assert bool((y[~m] == IGNORE).all())


def test_mqar_zoology_layout_without_random_fill():
    b = mqar(4, seq_len=16, num_kv_pairs=2, vocab_size=20, random_non_queries=False, seed=0)
    for x, m in zip(b.inputs, b.mask):
        filler = ~m
        filler[:4] = False
        assert bool((x[filler] == 0).all())  # Zoology's zeros where nothing is placed


def test_mqar_is_deterministic_per_seed_and_power_law_prefers_short_gaps():
    a, b, c = mqar(8, seed=1), mqar(8, seed=1), mqar(8, seed=2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    context = 16

    def mean_gap(power_a: float) -> float:
        m = mqar(256, seq_len=256, num_kv_pairs=8, vocab_size=512, power_a=power_a, seed=0).mask
        return float(((m.nonzero()[:, 1] - context) // 2).float().mean())

    assert mean_gap(0.01) < 0.7 * mean_gap(1.0)  # power law: queries close to the context; 1.0 is uniform


@pytest.mark.parametrize("kwargs,match", [
    ({"seq_len": 63}, "even"), ({"vocab_size": 64}, "vocab_size must exceed"), ({"num_kv_pairs": 17}, "4 \\*"),
    ({"power_a": 0.0}, "power_a"), ({"num_kv_pairs": 0}, "num_kv_pairs"),
])
def test_mqar_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mqar(2, **kwargs)


# -- ListOps -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[MIN 3 [MAX 1 8 ] 5 ]", 3), ("[MED 1 2 3 4 ]", 2), ("[MED 7 1 4 ]", 4),
    ("[SM 5 6 7 ]", 8), ("[SM [MAX 9 9 ] [MED 9 8 ] ]", 7), ("[MAX [SM [MIN 5 6 ] 9 ] 3 ]", 4),
])
def test_listops_interpreter_on_known_expressions(expr, value):
    assert evaluate_listops(expr) == value


@pytest.mark.parametrize("bad", ["[MAX 1 2", "1 2 ]", "[MAX ]", "[FOO 1 ]", ""])
def test_listops_interpreter_rejects_malformed(bad):
    with pytest.raises(ValueError):
        evaluate_listops(bad)


def test_listops_labels_match_the_reference_interpreter():
    b = listops(64, seq_len=48, seed=5)
    assert b.inputs.shape == b.mask.shape == (64, 48) and b.targets.shape == (64,)
    assert bool(((b.targets >= 0) & (b.targets <= 9)).all())
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        n = int(m.sum())
        assert 12 <= n <= 48 and bool((x[n:] == LISTOPS_PAD).all()) and bool(m[:n].all())
        assert evaluate_listops(listops_tokens(x)) == int(y)
    again = listops(64, seq_len=48, seed=5)
    assert torch.equal(again.inputs, b.inputs) and torch.equal(again.targets, b.targets)
    assert not torch.equal(listops(64, seq_len=48, seed=6).inputs, b.inputs)
    with pytest.raises(ValueError, match="min_len"):
        listops(2, seq_len=16, min_len=20)


# -- copy ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selective", [False, True])
def test_copy_targets_are_the_context_data_in_order(selective):
    vocab, k, n = 10, 6, 32
    b = copy_task(16, seq_len=n, num_tokens=k, vocab_size=vocab, selective=selective, seed=2)
    assert b.inputs.shape == b.targets.shape == (16, n)
    ctx = n - k
    for x, y in zip(b.inputs, b.targets):
        data = x[:ctx][x[:ctx] < vocab]  # the non-blank context tokens, in order
        assert len(data) == k
        assert torch.equal(y[ctx:], data) and bool((y[:ctx] == IGNORE).all())
        assert int(x[ctx]) == vocab + 1  # separator
        assert torch.equal(x[ctx + 1:], data[:-1])  # teacher forcing
        if not selective:
            assert bool((x[: ctx - k] == vocab).all())
    again = copy_task(4, seed=9, selective=selective).inputs
    assert torch.equal(copy_task(4, seed=9, selective=selective).inputs, again)


# -- in-context regression ------------------------------------------------------------------------------------
def test_icl_regression_answers_are_recoverable_by_least_squares():
    dim, n = 4, 40
    b = icl_regression(8, seq_len=n, dim=dim, layout="interleaved", seed=1)
    assert b.inputs.shape == (8, n, dim + 1) and b.targets.shape == b.mask.shape == (8, n)
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        xs, ys = x[0::2, :dim].double(), x[1::2, dim].double()
        assert torch.allclose(ys.float(), y[0::2]) and bool(m[0::2].all()) and not bool(m[1::2].any())
        w = torch.linalg.lstsq(xs[:-1], ys[:-1, None]).solution  # the earlier pairs determine w
        assert abs(float(xs[-1] @ w) - float(y[-2])) < 1e-3
    p = icl_regression(8, seq_len=12, dim=dim, layout="paired", seed=1)
    assert p.mask[:, -1].all() and int(p.mask.sum()) == 8 and bool((p.inputs[:, -1, dim] == 0).all())
    xs, ys = p.inputs[0, :-1, :dim].double(), p.inputs[0, :-1, dim].double()
    w = torch.linalg.lstsq(xs, ys[:, None]).solution
    assert abs(float(p.inputs[0, -1, :dim].double() @ w) - float(p.targets[0, -1])) < 1e-3
    assert torch.equal(icl_regression(2, seed=3).inputs, icl_regression(2, seed=3).inputs)
    with pytest.raises(ValueError, match="layout"):
        icl_regression(2, layout="zigzag")


def test_task_records_know_their_shapes():
    for task in TASKS.values():
        params = task.params(seq_len=32) if task.name != "listops" else task.params(seq_len=48)
        if task.name == "mqar":
            params = task.params(seq_len=32, num_kv_pairs=4, vocab_size=64)
        b = task.sample(3, 0, params)
        assert b.inputs.shape[:2] == (3, params["seq_len"])
    with pytest.raises(ValueError, match="no parameters"):
        TASKS["mqar"].params(depth=3)


# -- the linear attention layer against a plain reference -----------------------------------------------------
def _reference_linear(layer: FeatureMapAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Materialised kernel attention in float64: A_ij = phi(q_i).phi(k_j) (j <= i if causal), rows normalised."""
    layer = layer.double()
    b, n, e = x.shape
    h, d = layer.num_heads, layer.head_dim
    q, k, v = layer.qkv(x.double()).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    fq, fk = layer.feature_map(q, k)
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), 0.0)
    out = (a / a.sum(-1, keepdim=True)) @ v
    return layer.out_proj(out.transpose(1, 2).reshape(b, n, e))


@pytest.mark.parametrize("fm", ["elu", "taylor"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_feature_map_attention_matches_reference(fm, causal, dtype):
    torch.manual_seed(0)
    layer = FeatureMapAttention(24, 3, feature_map=fm, causal=causal)
    x = torch.randn(2, 13, 24)
    with torch.no_grad():
        expected = _reference_linear(_ref_copy(layer), x, causal)
    with torch.no_grad():
        actual = layer.to(dtype)(x.to(dtype))
    assert actual.dtype == dtype and actual.shape == x.shape
    assert_close(actual, expected, dtype=dtype, scale=1.0 if dtype == torch.float32 else 4.0)


def _ref_copy(layer: FeatureMapAttention) -> FeatureMapAttention:
    import copy

    return copy.deepcopy(layer)


def test_feature_map_attention_gradients_match_reference():
    torch.manual_seed(1)
    layer = FeatureMapAttention(16, 2, feature_map="elu", causal=True).double()
    ref = _ref_copy(layer)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    layer(x).square().sum().backward()
    _reference_linear(ref, x2, True).square().sum().backward()
    assert_close(x.grad, x2.grad, dtype=torch.float64)
    for (n, p), (_, r) in zip(layer.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, r.grad, dtype=torch.float64, msg=n)


# -- model ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["softmax", "sliding_window", "linear:elu", "linear:rebased"])
def test_causal_model_never_looks_ahead(mechanism):
    torch.manual_seed(0)
    spec = parse_mechanism(mechanism, {"window": 4} if mechanism == "sliding_window" else None)
    model = QualityModel(spec, vocab_size=20, num_outputs=20, embed_dim=16, num_heads=2, max_seq_len=12,
                         causal=True)
    x = torch.randint(20, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 20
    a, b = model(x), model(y)
    assert a.shape == (2, 12, 20)
    assert_close(a[:, :7], b[:, :7], dtype=torch.float32)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_model_inputs_and_errors():
    spec = parse_mechanism("softmax")
    reg = QualityModel(spec, input_dim=5, num_outputs=1, embed_dim=16, max_seq_len=8, causal=True)
    assert reg(torch.randn(3, 8, 5)).shape == (3, 8, 1)
    pool = QualityModel(spec, vocab_size=16, num_outputs=10, embed_dim=16, max_seq_len=8, causal=False, pool=True)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[:, 5:] = False
    assert pool(torch.randint(16, (3, 8)), mask).shape == (3, 10)
    with pytest.raises(ValueError, match="exactly one"):
        QualityModel(spec, num_outputs=2, max_seq_len=8, causal=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        reg(torch.randn(1, 9, 5))
    with pytest.raises(NotSupportedError, match="no causal form"):
        QualityModel(parse_mechanism("nystrom"), vocab_size=8, num_outputs=8, max_seq_len=8, causal=True)
    with pytest.raises(ValueError, match="linear:<map>"):
        parse_mechanism("linear:nope")
    with pytest.raises(ValueError, match="known mechanisms"):
        parse_mechanism("no_such_mechanism")


def test_state_sizes():
    d, n = 32, 64
    assert state_size(parse_mechanism("softmax"), head_dim=d, num_heads=2, seq_len=n) == (2 * n * d, "kv cache")
    assert state_size(parse_mechanism("sliding_window", {"window": 8}), head_dim=d, num_heads=2,
                      seq_len=n) == (2 * 8 * d, "window cache")
    assert state_size(parse_mechanism("linear:elu"), head_dim=d, num_heads=2, seq_len=n) == (d * d,
                                                                                             "recurrent state")
    taylor = 1 + d + d * (d + 1) // 2
    assert state_size(parse_mechanism("linear:taylor"), head_dim=d, num_heads=2, seq_len=n)[0] == taylor * d
    assert state_size(parse_mechanism("linear:favor", {"num_features": 16}), head_dim=d, num_heads=2,
                      seq_len=n)[0] == 16 * d
    from attnkit.quality.model import MechanismSpec

    registered = MechanismSpec("some_linear", "linear", True, None, {"feature_map": "elu"})
    assert state_size(registered, head_dim=d, num_heads=2, seq_len=n) == (d * d, "recurrent state")
    unnamed = MechanismSpec("other_linear", "linear", True, None, {})
    assert state_size(unnamed, head_dim=d, num_heads=2, seq_len=n) == (None, "unknown")


def test_mechanism_variants_carry_their_parameters():
    spec = parse_mechanism("sliding_window@window=4")
    assert spec.mechanism == "sliding_window" and spec.params["window"] == 4
    assert state_size(spec, head_dim=8, num_heads=2, seq_len=64) == (2 * 4 * 8, "window cache")
    fav = parse_mechanism("linear:favor@num_features=8", {"num_features": 12})  # explicit overrides win
    assert fav.feature_map == "favor" and fav.params["num_features"] == 12
    model = QualityModel(spec, vocab_size=8, num_outputs=8, embed_dim=16, max_seq_len=8, causal=True)
    assert model(torch.randint(8, (1, 8))).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="NAME@PARAM=VALUE"):
        parse_mechanism("sliding_window@window")
    cfg = QualityConfig(params={"sliding_window": {"window": 2}, "sliding_window@window=4": {"window": 3}})
    from attnkit.quality.train import mechanism_overrides

    assert mechanism_overrides(cfg, "sliding_window@window=4") == {"window": 3}
    assert mechanism_overrides(cfg, "sliding_window@window=9") == {}  # the entry's own value wins
    assert mechanism_overrides(cfg, "sliding_window") == {"window": 2}


# -- training and report ---------------------------------------------------------------------------------------
TINY = dict(embed_dim=32, num_heads=2, num_layers=2, batch=16, eval_examples=32, warmup=5, lrs=(3e-3,))


def test_tiny_softmax_run_learns():
    from attnkit.quality.tasks import get_task

    task = get_task("mqar")
    params = task.params(seq_len=16, num_kv_pairs=2, vocab_size=24)
    cfg = QualityConfig(steps=60, curve_points=6, **TINY)
    rec = train_one(parse_mechanism("softmax"), task, params, cfg)
    assert rec["status"] == "ok" and rec["final_loss"] < 0.8 * rec["first_loss"]
    assert 0.0 <= rec["accuracy"] <= 1.0 and rec["state_per_head"] == 2 * 16 * 16
    assert len(rec["loss_curve"]) == 6 and rec["train_s"] > 0


def test_run_quality_writes_report_and_keeps_bench_report(tmp_path):
    out = tmp_path / "attnkit-report"
    out.mkdir()
    (out / "report.md").write_text("# attnkit benchmark report\n\nbench table\n")
    (out / "report.html").write_text("<html><body><h1>bench</h1></body></html>")
    cfg = QualityConfig(tasks=("icl-regression", "listops"), mechanisms=("softmax", "linear:elu", "nystrom"),
                        task_params={"icl-regression": {"seq_len": 16, "dim": 3}, "listops": {"seq_len": 24}},
                        steps=3, **TINY)
    doc = run_quality(cfg, progress=False)
    assert [e["task"] for e in doc["tasks"]] == ["icl-regression", "listops"]
    reg, lo = doc["tasks"]
    assert [r["status"] for r in reg["results"]] == ["ok", "ok", "n/a"]  # nystrom: no causal form
    assert [r["status"] for r in lo["results"]] == ["ok", "ok", "ok"]
    assert reg["metric"] == "nmse" and reg["results"][0]["nmse"] >= 0
    written = qreport.write_quality_report(doc, out)
    assert (out / "quality.json").exists() and json.loads((out / "quality.json").read_text())["schema"]
    md = (out / "report.md").read_text()
    assert md.startswith("# attnkit benchmark report") and "bench table" in md and "## Quality" in md
    html = (out / "report.html").read_text()
    assert "<h1>bench</h1>" in html and html.index(qreport.BEGIN) < html.index("</body>")
    if written["plot_error"] is None:
        assert (out / qreport.PLOT).stat().st_size > 0
    qreport.write_quality_report(doc, out, plots=False)  # again: the section is replaced, not duplicated
    md = (out / "report.md").read_text()
    assert md.count(qreport.BEGIN) == 1 and md.count("## Quality") == 1 and "bench table" in md
    assert (out / "report.html").read_text().count(qreport.BEGIN) == 1
    assert "nystrom" in qreport.terminal_summary(doc)


def test_splice_section_new_files():
    sec = f"{qreport.BEGIN}\nx\n{qreport.END}"
    assert qreport.splice_section(None, sec).startswith("# attnkit report")
    assert "</body></html>" in qreport.splice_section(None, sec, html_doc=True)
    assert qreport.splice_section("a\n" + sec + "\nb", f"{qreport.BEGIN}\ny\n{qreport.END}") == \
        f"a\n{qreport.BEGIN}\ny\n{qreport.END}\nb"


def test_cli_quality_end_to_end(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["quality", "--task", "copy", "--seq-len", "16", "--task-param", "copy.num_tokens=4",
                 "--mechanisms", "softmax,sliding_window", "--steps", "2", "--batch", "4", "--eval-examples", "4",
                 "--embed-dim", "16", "--param", "sliding_window.window=4", "--out", str(out), "--no-progress",
                 "--no-plots", "--jobs", "1"])
    assert code == 0
    doc = json.loads((out / "quality.json").read_text())
    assert doc["tasks"][0]["params"]["num_tokens"] == 4
    assert [r["mechanism"] for r in doc["tasks"][0]["results"]] == ["softmax", "sliding_window"]
    assert doc["tasks"][0]["results"][1]["params"]["window"] == 4
    md = (out / "report.md").read_text()
    assert "## Quality" in md
    for part in ("--task copy", "--task-param copy.num_tokens=4", "--param sliding_window.window=4", "--steps 2"):
        assert part in md  # the reproduce line
    assert "sliding_window" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--task", "sudoku"], "unknown task"), (["--mechanisms", "nope"], "no mechanism named"),
    (["--param", "softmax"], "MECHANISM.NAME=VALUE"), (["--task-param", "mqar.depth=2"], "no parameters"),
    (["--steps", "0"], "positive integer"), (["--mechanisms", "softmax", "--param", "linear:elu.eps=1"],
                                           "not among the selected"),
    (["--mechanisms", "linear:elu", "--param", "linear:elu.x=1"], "takes no parameter x"),
    (["--mechanisms", "softmax", "--param", "softmax.nope=3"], "mechanism 'softmax' does not accept nope=3"),
    (["--mechanisms", "sliding_window", "--param", "sliding_window.window=abc"],
     "mechanism 'sliding_window' does not accept window='abc'"),
    (["--mechanisms", "linear:favor", "--param", "linear:favor.num_features=8x"],
     "mechanism 'linear:favor' does not accept num_features='8x'"),
])
def test_cli_quality_bad_options(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["quality", "--out", str(tmp_path), "--jobs", "1", *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["softmax", "linear:taylor@qk_dim=16"])
def test_conv_block_learns_mqar_in_fewer_steps(mechanism):
    """Zoology / Based: with the short convolution one mixer layer can bind each value to its key, so MQAR is
    learned within a budget where the same model without it (learned positions instead) is not."""
    from attnkit.quality.tasks import get_task

    task = get_task("mqar")
    params = task.params(seq_len=64, num_kv_pairs=4, vocab_size=128)
    acc = {}
    for kernel in (3, 0):
        cfg = QualityConfig(steps=300, batch=32, eval_examples=256, warmup=30, lrs=(1e-2,), conv_kernel=kernel)
        acc[kernel] = train_one(parse_mechanism(mechanism), task, params, cfg)["accuracy"]
    assert acc[3] > 0.9 and acc[3] > acc[0] + 0.2, acc


@pytest.mark.slow
def test_quick_run_learns_recall(tmp_path):
    assert main(["quality", "--quick", "--out", str(tmp_path), "--no-progress", "--no-plots"]) == 0
    res = {r["mechanism"]: r for r in json.loads((tmp_path / "quality.json").read_text())["tasks"][0]["results"]}
    assert res["softmax"]["accuracy"] > 0.9
    assert 0.0 < res["sliding_window@window=8"]["in_window"] < 1.0


# -- the Zoology / Based block -------------------------------------------------------------------------------
def test_short_conv_is_causal_and_reaches_kernel_minus_one_back():
    from attnkit.quality.model import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(6, kernel_size=3)
    x = torch.randn(2, 10, 6)
    base = conv(x)
    assert base.shape == x.shape
    for t in range(10):
        y = x.clone()
        y[:, t] += torch.randn(2, 6)
        changed = (conv(y) - base).abs().amax(dim=(0, 2)) > 1e-6
        # a change at t moves outputs t, t+1, t+2 (kernel 3) and nothing before t
        assert changed.nonzero().flatten().tolist() == list(range(t, min(t + 3, 10)))
    with pytest.raises(ValueError, match="kernel_size"):
        ShortConv(4, kernel_size=0)


def test_conv_block_has_no_positions_and_no_conv_has_learned_positions():
    spec = parse_mechanism("softmax")
    with_conv = QualityModel(spec, vocab_size=16, num_outputs=16, embed_dim=16, max_seq_len=8, causal=True)
    no_conv = QualityModel(spec, vocab_size=16, num_outputs=16, embed_dim=16, max_seq_len=8, causal=True,
                           conv_kernel=0)
    assert with_conv.pos is None and all(b.conv is not None for b in with_conv.blocks)
    assert no_conv.pos is not None and all(b.conv is None for b in no_conv.blocks)
    x = torch.randint(16, (2, 8))
    assert with_conv(x).shape == no_conv(x).shape == (2, 8, 16)
    with pytest.raises(ValueError, match="conv_kernel"):
        QualityModel(spec, vocab_size=16, num_outputs=16, max_seq_len=8, causal=True, conv_kernel=-1)


def test_qk_dim_sets_the_linear_state():
    spec = parse_mechanism("linear:taylor@qk_dim=4")
    assert spec.params["qk_dim"] == 4
    assert state_size(spec, head_dim=16, num_heads=1, seq_len=32) == ((1 + 4 + 10) * 16, "recurrent state")
    layer = FeatureMapAttention(16, 1, feature_map="taylor", causal=True, qk_dim=4)
    assert layer(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="qk_dim"):
        parse_mechanism("linear:taylor@qk_dim=0")
    # a registered linear mechanism's state comes from its record
    assert state_size(parse_mechanism("linear_elu"), head_dim=16, num_heads=1, seq_len=32) == (16 * 16,
                                                                                              "recurrent state")


def test_record_small_params_win_over_the_quality_table():
    from attnkit.quality.model import QUALITY_PARAMS
    from attnkit.registry import mechanism_info

    info = mechanism_info("nystrom")
    assert info.small_params and "nystrom" in QUALITY_PARAMS
    spec = parse_mechanism("nystrom")
    assert spec.params == {**info.bench_params, **info.small_params}
    assert parse_mechanism("nystrom@num_landmarks=4").params["num_landmarks"] == 4


class _TinyMixer(torch.nn.Module):
    """A causal token mixer for the tests: a cumulative mean of a projection (a one-number recurrent state)."""

    def __init__(self, dim: int, causal: bool = False, scale: float = 1.0):
        super().__init__()
        self.proj, self.causal, self.scale = torch.nn.Linear(dim, dim), causal, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.causal:
            n = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[:, None]
            return self.scale * h.cumsum(dim=1) / n
        return self.scale * h.mean(dim=1, keepdim=True).expand_as(h)


@pytest.fixture
def tiny_mixer():
    from attnkit import registry
    from attnkit.registry import Mechanism, register

    name = "test_quality_tiny_mixer"
    register(Mechanism(name=name, family="test", paper="(test)", exact=True, complexity="O(n d)", causal=True,
                       factory=lambda dim, causal=False, scale=1.0: _TinyMixer(dim, causal, scale), kind="mixer",
                       needs=("dim",), small_params={"scale": 0.5},
                       extras={"state_size": lambda dim, seq_len, **params: dim}, source="paper"))
    try:
        yield name
    finally:
        registry._REGISTRY.pop(name, None)


def test_mixer_records_fill_the_mixer_slot(tiny_mixer, tmp_path):
    spec = parse_mechanism(tiny_mixer)
    assert spec.kind == "mixer" and spec.params == {"scale": 0.5}
    model = QualityModel(spec, vocab_size=20, num_outputs=20, embed_dim=16, max_seq_len=12, causal=True)
    assert isinstance(model.blocks[0].mixer, _TinyMixer) and model.blocks[0].mixer.causal
    x = torch.randint(20, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 20
    assert_close(model(x)[:, :7], model(y)[:, :7], dtype=torch.float32)
    assert state_size(spec, head_dim=16, num_heads=1, seq_len=12, embed_dim=16) == (16, "mixer state")
    cfg = QualityConfig(mechanisms=(tiny_mixer,), task_params={"mqar": {"seq_len": 16, "num_kv_pairs": 2,
                                                                         "vocab_size": 24}},
                        steps=3, save_dir=str(tmp_path / "ckpt"), **TINY)
    doc = run_quality(cfg, progress=False)
    rec = doc["tasks"][0]["results"][0]
    assert rec["status"] == "ok" and rec["kind"] == "mixer"
    assert rec["state_bytes"] == 32 * 2 * 4  # per layer: dim; 2 layers; fp32
    from attnkit.quality import load_checkpoint

    loaded, info = load_checkpoint(rec["checkpoint"])
    assert info["spec"]["kind"] == "mixer" and isinstance(loaded.blocks[1].mixer, _TinyMixer)


# -- sweeps, seeds, checkpoints ------------------------------------------------------------------------------
def test_learning_rate_sweep_and_seeds_keep_every_value(tmp_path):
    cfg = QualityConfig(mechanisms=("softmax", "linear:elu"), seeds=(0, 1),
                        task_params={"mqar": {"seq_len": 16, "num_kv_pairs": 2, "vocab_size": 24}},
                        steps=4, **{**TINY, "lrs": (1e-4, 1e-2)})
    doc = run_quality(cfg, progress=False)
    for rec in doc["tasks"][0]["results"]:
        assert rec["status"] == "ok"
        assert [x["lr"] for x in rec["lr_sweep"]] == [1e-4, 1e-2]
        assert all(len(x["values"]) == 2 for x in rec["lr_sweep"])
        best = max(rec["lr_sweep"], key=lambda x: x["mean"])
        assert rec["lr"] == best["lr"] and rec["value"] == pytest.approx(best["mean"])
        assert rec["values"] == best["values"] and rec["value"] == pytest.approx(sum(best["values"]) / 2)
        assert rec["spread"] is not None and rec["seeds"] == [0, 1]
    md = "\n".join(qreport._section_md(doc, None).splitlines())
    assert "0.0001: " in md and "0.01: " in md and "+-" in md and "seeds 0, 1" in md
    with pytest.raises(ValueError, match="lrs"):
        QualityConfig(lrs=()).check()
    with pytest.raises(ValueError, match="seeds"):
        QualityConfig(seeds=(0, 0)).check()


def test_window_coverage_counts_queries_whose_key_is_in_the_window():
    from attnkit.quality.tasks import get_task
    from attnkit.quality.train import window_coverage

    task = get_task("mqar")
    data = [mqar(16, seq_len=64, num_kv_pairs=8, vocab_size=128, seed=s) for s in range(2)]

    def by_hand(window: int) -> float:
        inside = total = 0
        for b in data:
            for x, m in zip(b.inputs, b.mask):
                keys = x[0:16:2].tolist()
                for p in m.nonzero().flatten().tolist():
                    inside += p - 2 * keys.index(int(x[p])) <= window
                    total += 1
        return inside / total

    for w in (2, 8, 20):
        got = window_coverage(parse_mechanism(f"sliding_window@window={w}"), task, data)
        assert got == pytest.approx(by_hand(w))
    assert window_coverage(parse_mechanism("sliding_window@window=64"), task, data) == 1.0
    assert window_coverage(parse_mechanism("sliding_window@window=1"), task, data) == 0.0  # keys >= 2 back
    assert window_coverage(parse_mechanism("softmax"), task, data) is None


def test_state_sweep_variants():
    from attnkit.quality.tasks import get_task
    from attnkit.quality.train import state_variants

    task = get_task("mqar")
    tp = task.params(seq_len=64, num_kv_pairs=4, vocab_size=128)
    taylor = state_variants("linear:taylor", task, tp, head_dim=16)
    assert [(v[0], v[1], v[2]) for v in taylor] == [(f"linear:taylor@qk_dim={d}", "qk_dim", d) for d in (4, 8, 16)]
    assert [v[1:3] for v in state_variants("linear:favor", task, tp, head_dim=16)] == [
        ("num_features", 16), ("num_features", 64), ("num_features", 256)]
    assert [v[2] for v in state_variants("sliding_window@window=32", task, tp, head_dim=16)] == [8, 16, 32]
    soft = state_variants("softmax", task, tp, head_dim=16)
    assert [v[3]["seq_len"] for v in soft] == [16, 32, 64] and all(v[3]["num_kv_pairs"] == 4 for v in soft)
    assert state_variants("nystrom", task, tp, head_dim=16) == [("nystrom", None, None, tp)]


def test_state_sweep_run_and_frontier_plot(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = QualityConfig(mechanisms=("softmax", "sliding_window"), sweep="state",
                        task_params={"mqar": {"seq_len": 64, "num_kv_pairs": 2, "vocab_size": 80}},
                        steps=2, **{**TINY, "eval_examples": 4})
    doc = run_quality(cfg, progress=False)
    res = doc["tasks"][0]["results"]
    assert [r["sweep"]["knob"] for r in res] == ["seq_len"] * 3 + ["window"] * 3
    assert [r["state_bytes"] for r in res[:3]] == sorted(r["state_bytes"] for r in res[:3])
    assert res[0]["task_params"]["seq_len"] == 16 and [r["sweep"]["value"] for r in res[3:]] == [8, 16, 32]
    written = qreport.write_quality_report(doc, tmp_path)
    assert (tmp_path / qreport.FRONTIER_PLOT).stat().st_size > 0 and written["plot_error"] is None
    assert "--sweep state" in (tmp_path / "report.md").read_text()


def test_checkpoint_round_trip(tmp_path):
    from attnkit.quality import load_checkpoint
    from attnkit.quality.checkpoint import save_checkpoint
    from attnkit.quality.tasks import get_task

    task = get_task("mqar")
    params = task.params(seq_len=16, num_kv_pairs=2, vocab_size=24)
    cfg = QualityConfig(steps=3, **TINY)
    for name in ("linear:taylor@qk_dim=4", "sliding_window@window=4"):
        spec = parse_mechanism(name)
        rec = train_one(spec, task, params, cfg, keep_model=True)
        model = rec.pop("model").eval()
        path = save_checkpoint(tmp_path, spec=spec, task=task, task_params=params, config=cfg,
                               state_dict=model.state_dict(), record=rec)
        loaded, info = load_checkpoint(path)
        assert info["task"] == "mqar" and info["spec"]["name"] == name and info["training"]["lr"] == 3e-3
        assert not loaded.training
        x = task.sample(4, 123, params).inputs
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an attnkit quality checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_cli_sweep_seeds_no_conv_and_save(tmp_path):
    out, ckpt = tmp_path / "r", tmp_path / "ckpt"
    code = main(["quality", "--seq-len", "16", "--num-kv-pairs", "2", "--vocab-size", "24",
                 "--mechanisms", "softmax,linear:elu", "--steps", "2", "--batch", "4", "--eval-examples", "4",
                 "--embed-dim", "16", "--lr", "1e-3,1e-2", "--seed", "0,1", "--no-conv", "--save", str(ckpt),
                 "--out", str(out), "--no-progress", "--no-plots"])
    assert code == 0
    doc = json.loads((out / "quality.json").read_text())
    assert doc["config"]["lrs"] == [1e-3, 1e-2] and doc["config"]["seeds"] == [0, 1]
    assert doc["config"]["conv_kernel"] == 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["mqar--linear_elu.pt", "mqar--softmax.pt"]
    md = (out / "report.md").read_text()
    for part in ("--no-conv", "--lr 0.001,0.01", "--seed 0,1", "learned absolute positions"):
        assert part in md


def test_listops_budget_statement():
    entry = {"task": "listops", "metric": "accuracy", "results": [
        {"mechanism": "softmax", "status": "ok", "value": 0.24}]}
    doc = {"config": {"steps": 600}}
    assert "too short to conclude" in " ".join(qreport.task_notes(entry, doc))
    entry["results"][0]["value"] = 0.37
    assert not qreport.task_notes(entry, doc)


def test_every_registered_mechanism_trains_or_says_why():
    from attnkit.registry import list_mechanisms

    names = [m.name for m in list_mechanisms()]
    cfg = QualityConfig(tasks=("mqar", "listops"), mechanisms=names, steps=1, lrs=(1e-3,), embed_dim=16,
                        num_heads=2, batch=2, eval_examples=2, warmup=0,
                        task_params={"mqar": {"seq_len": 64, "num_kv_pairs": 2, "vocab_size": 80},
                                     "listops": {"seq_len": 64}})
    doc = run_quality(cfg, progress=False)
    for entry in doc["tasks"]:
        for rec in entry["results"]:
            assert rec["status"] in ("ok", "n/a") or rec["message"], rec
            if rec["status"] != "ok":
                assert rec["message"]
    # every mechanism trains on at least one of a causal and a bidirectional task
    ok = {r["mechanism"] for e in doc["tasks"] for r in e["results"] if r["status"] == "ok"}
    assert ok == set(names), sorted(set(names) - ok)


def test_cli_quality_every_run_failed_exits_non_zero(tmp_path, capsys):
    from test_bench_fakes import registered

    with registered("fake_failing"):
        code = main(["quality", "--task", "listops", "--seq-len", "16",  # non-causal: fake_failing runs there
                     "--mechanisms", "fake_failing", "--steps", "1", "--batch", "2", "--eval-examples", "2",
                     "--embed-dim", "16", "--out", str(tmp_path / "r"), "--no-progress", "--no-plots"])
    assert code == 1 and "every run failed" in capsys.readouterr().err


def test_state_size_of_gated_linear_records_and_mixers_comes_from_their_records():
    from attnkit.quality.model import state_size

    for name in ("gla", "deltanet"):
        size, kind = state_size(parse_mechanism(name), head_dim=16, num_heads=2, seq_len=64, embed_dim=32)
        assert (size, kind) == (16 * 16, "recurrent state")
    size, kind = state_size(parse_mechanism("aft_simple"), head_dim=16, num_heads=2, seq_len=64, embed_dim=32)
    assert kind == "mixer state" and size == 3 * 32  # running numerator, denominator and maximum per channel
