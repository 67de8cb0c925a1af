"""The benchmark's pieces: FLOP counts, error computation, memory tracer, selection, budget, failures, Ctrl-C."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.bench import BenchConfig, measure, run_benchmark, select_variants
from attnkit.bench.plots import pareto_front
from attnkit.bench.runner import CELL_FIELDS, STATUSES
from attnkit.bench.workloads import is_quadratic, parse_param_overrides
from test_bench_fakes import BandPattern, registered


def tiny(**kw) -> BenchConfig:
    base = dict(seq_lens=[16, 32, 64], heads=2, head_dim=8, repeats=2, cell_budget_s=0.05, time_budget_s=60,
                flex=False, memory=False, error_rows=8)
    base.update(kw)
    return BenchConfig(**base)


# -- FLOPs ---------------------------------------------------------------------------------------------------
def test_dense_flops_hand_computed():
    # QK^T: 5 x 7 dot products of length 4 = 2*5*7*4 FLOPs; PV the same; per (batch, head) = 2*3.
    assert measure.dense_flops(batch=2, heads=3, q_len=5, kv_len=7, head_dim=4) == 2 * 3 * (2 * 5 * 7 * 4) * 2
    assert measure.dense_flops(batch=2, heads=3, q_len=5, kv_len=7, head_dim=4, causal=True) == 1680
    assert measure.dense_flops(batch=1, heads=1, q_len=8, kv_len=8, head_dim=2, density=0.25) == 4 * 64 * 2 / 4


def test_cell_flops_from_registry_baseline_and_backward():
    with registered("fake_mean", "fake_band"):
        cfg = tiny(mechanisms=["fake_mean", "fake_band"], seq_lens=[16])
        doc = run_benchmark(cfg, progress=False)
        cells = {c["label"]: c for c in doc["results"]}
        assert cells["fake_mean"]["flops"] == 1000.0 * 16  # the mechanism's own count
        assert cells["sdpa"]["flops"] == 4 * 1 * 2 * 16 * 16 * 8
        band = BandPattern(4).density(16)
        assert cells["fake_band"]["flops"] == pytest.approx(4 * 2 * 16 * 16 * 8 * band)
        assert cells["fake_band"]["gflops_per_s"] == pytest.approx(
            cells["fake_band"]["flops"] / cells["fake_band"]["time_s"] / 1e9)
        doc = run_benchmark(tiny(mechanisms=["fake_mean"], seq_lens=[16], backward=True), progress=False)
        cells = {c["label"]: c for c in doc["results"]}
        assert cells["fake_mean"]["flops"] == 3 * 1000.0 * 16
        assert cells["sdpa"]["status"] == "ok" and cells["sdpa"]["flops"] == 3 * 4 * 2 * 16 * 16 * 8


# -- error ---------------------------------------------------------------------------------------------------
def test_exact_rows_match_sdpa_and_known_cases():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 5, generator=g) for _ in range(3))
    rows = torch.tensor([0, 4, 10])
    for causal in (False, True):
        full = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        got = measure.exact_softmax_rows(q, k, v, rows, causal=causal, chunk=2)
        torch.testing.assert_close(got, full[:, :, rows], atol=1e-12, rtol=1e-12)
    # q = 0: every key gets weight 1/n, so attention is the mean of v.
    got = measure.exact_softmax_rows(torch.zeros_like(q), k, v, rows)
    torch.testing.assert_close(got, v.double().mean(2, keepdim=True).expand(2, 3, 3, 5), atol=1e-12, rtol=0)
    # A pattern allowing only the diagonal: attention returns v itself.
    got = measure.exact_softmax_rows(q, k, v, rows, pattern=BandPattern(0))
    torch.testing.assert_close(got, v.double()[:, :, rows], atol=1e-12, rtol=0)


def test_relative_error_known_values():
    e = torch.tensor([3.0, 4.0])
    assert measure.relative_error(e, e) == 0.0
    assert measure.relative_error(torch.zeros(2), e) == 1.0
    assert measure.relative_error(2 * e, e) == 1.0
    assert measure.relative_error(torch.tensor([3.0, 4.5]), e) == pytest.approx(0.1)
    assert measure.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert measure.relative_error(torch.ones(2), torch.zeros(2)) == math.inf


def test_error_in_a_run_is_against_exact_softmax():
    with registered("fake_mean", "fake_exact"):
        doc = run_benchmark(tiny(mechanisms=["fake_mean", "fake_exact"], seq_lens=[32], error_rows=32),
                            progress=False)
        cells = {c["label"]: c for c in doc["results"]}
        from attnkit.bench.workloads import make_inputs

        q, k, v = make_inputs("clustered", (1, 2, 32, 8), torch.Generator().manual_seed(0 + 32))  # the default
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        approx = v.mean(2, keepdim=True).expand_as(v)
        expected = float((approx.double() - exact).norm() / exact.norm())
        assert cells["fake_mean"]["error"] == pytest.approx(expected, rel=1e-6)
        assert cells["fake_mean"]["exact_check"] is None  # approximate: an error, not a check
        assert cells["fake_exact"]["error"] < 1e-5 and cells["fake_exact"]["exact_check"] == "ok"
        assert cells["sdpa"]["exact_check"] == "ok"


# -- memory, timing --------------------------------------------------------------------------------------------
def test_peak_memory_tracer_counts_temporaries():
    x = torch.ones(256, 1024)  # 1 MiB, allocated before: not counted

    def call():
        t = x * 2  # 1 MiB temporary
        u = t + 1  # 1 MiB more (peak 2 MiB)
        del t
        return u.sum()

    out, peak = measure.peak_memory(call, torch.device("cpu"))
    assert float(out) == 3 * 256 * 1024
    assert 2 * 2**20 <= peak < 2 * 2**20 + 64 * 1024


def test_time_calls_respects_budget_and_repeats():
    calls = []
    times = measure.time_calls(lambda: calls.append(1), torch.device("cpu"), repeats=7, budget_s=10)
    assert len(times) == 7 == len(calls)
    import time

    times = measure.time_calls(lambda: time.sleep(0.02), torch.device("cpu"), repeats=50, budget_s=0.05)
    assert 1 <= len(times) <= 4


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.1), (3.0, 0.2), (0.5, 0.9), (4.0, 0.01)]
    assert pareto_front(pts) == [(0.5, 0.9), (1.0, 0.5), (2.0, 0.1), (4.0, 0.01)]


# -- selection ---------------------------------------------------------------------------------------------------
def test_is_quadratic():
    assert is_quadratic("O(n^2 d)") and is_quadratic("O(T n^2 + n^2 d)") and is_quadratic("O(N²)")
    assert is_quadratic("O(n*n*d)")
    assert not is_quadratic("O(n d^2)") and not is_quadratic("O(n * w * d)") and not is_quadratic("O(n m d)")


def test_select_variants_defaults_names_families_and_modes():
    with registered() as fakes:
        variants = select_variants(BenchConfig(seq_lens=None), fakes)
        labels = [v.label for v in variants]
        # in_default_bench ones, then one representative of every family without one (issue 27)
        assert labels == ["sdpa", "fake_exact", "fake_band", "flex[fake_band]", "fake_mean"]
        band = next(v for v in variants if v.name == "fake_band")
        assert band.seq_lens[-1] == 65536 and band.params == {"window": 4}  # sub-quadratic: longer
        assert variants[0].seq_lens[-1] == 16384  # the quadratic baseline stops at 16K
        variants = select_variants(BenchConfig(mechanisms=["fakes_approx", "sdpa"], causal="both",
                                               params={"fake_mean": {"k": 1}}), fakes)
        assert [v.label for v in variants] == ["sdpa", "sdpa causal", "fake_mean", "fake_mean causal"]
        assert variants[-1].unsupported == "no causal form" and variants[-1].params == {"k": 1}
        with pytest.raises(ValueError, match="unknown mechanism.*'nope'.*known mechanisms"):
            select_variants(BenchConfig(mechanisms=["nope"]), fakes)


def test_parse_param_overrides():
    assert parse_param_overrides(["a.x=3", "a.y=abc", "b.z=[1, 2]"]) == {"a": {"x": 3, "y": "abc"},
                                                                         "b": {"z": [1, 2]}}
    with pytest.raises(ValueError, match="MECHANISM.NAME=VALUE"):
        parse_param_overrides(["nodot=3"])


# -- the run ----------------------------------------------------------------------------------------------------
def test_failures_oom_unsupported_and_skips_are_reported_not_dropped():
    with registered("fake_failing", "fake_oom", "fake_mean"):
        cfg = tiny(mechanisms=["fake_failing", "fake_oom", "fake_mean"], causal="both")
        doc = run_benchmark(cfg, progress=False)
        assert doc["complete"] and not doc["interrupted"]
        status = {(c["label"], c["seq_len"]): c["status"] for c in doc["results"]}
        for c in doc["results"]:
            assert set(c) == set(CELL_FIELDS) and c["status"] in STATUSES
        assert all(status[("fake_failing", n)] == "failed" for n in (16, 32, 64))
        assert status[("fake_failing causal", 16)] == "unsupported"
        assert status[("fake_oom", 32)] == "ok" and status[("fake_oom", 64)] == "oom"
        assert status[("fake_mean causal", 64)] == "unsupported"
        msg = next(c["message"] for c in doc["results"] if c["label"] == "fake_failing")
        assert "broken on purpose" in msg


def test_oom_skips_longer_lengths_and_budget_skips():
    with registered("fake_oom"):
        doc = run_benchmark(tiny(mechanisms=["fake_oom"], seq_lens=[16, 64, 128]), progress=False)
        cells = {c["seq_len"]: c for c in doc["results"] if c["mechanism"] == "fake_oom"}
        assert cells[64]["status"] == "oom" and cells[128]["status"] == "skipped"
        assert "out of memory at n=64" in cells[128]["message"]
        # A per-call limit far below any call: everything after the first length is predicted too slow.
        doc = run_benchmark(tiny(mechanisms=["fake_oom"], max_call_s=1e-9), progress=False)
        base = [c for c in doc["results"] if c["mechanism"] == "sdpa"]
        assert [c["status"] for c in base] == ["ok", "skipped", "skipped"]
        assert "predicted" in base[1]["message"] and "--max-call" in base[1]["message"]
        # A spent run budget skips what is left, and says so.
        doc = run_benchmark(tiny(mechanisms=["fake_oom"], time_budget_s=1e-9), progress=False)
        assert all(c["status"] == "skipped" and "budget" in c["message"] for c in doc["results"])


def test_ratios_and_speed_of_light_use_the_same_run():
    with registered("fake_band", "fake_exact"):
        doc = run_benchmark(tiny(mechanisms=["fake_band", "fake_exact"], seq_lens=[64], memory=True),
                            progress=False)
        cells = {c["label"]: c for c in doc["results"]}
        base = cells["sdpa"]
        band = cells["fake_band"]
        assert band["density"] == pytest.approx(BandPattern(4).density(64))
        assert band["vs_sdpa"] == pytest.approx(band["time_s"] / base["time_s"])
        assert band["speed_of_light_s"] == pytest.approx(base["time_s"] * band["density"])
        assert band["speed_of_light_ratio"] == pytest.approx(band["time_s"] / band["speed_of_light_s"])
        assert band["exact_check"] == "ok" and "pattern" in band["error_reference"]
        assert cells["fake_exact"]["speed_of_light_ratio"] is None  # no pattern, no speed of light
        assert base["peak_memory_bytes"] > 0 and base["time_min_s"] <= base["time_s"] <= base["time_max_s"]


def test_ctrl_c_keeps_the_results_so_far():
    seen = []
    with registered("fake_interrupt"):
        doc = run_benchmark(tiny(mechanisms=["fake_interrupt"]), progress=False,
                            on_cell=lambda d: seen.append(len(d["results"])))
    assert doc["interrupted"] and not doc["complete"]
    assert [(c["label"], c["seq_len"]) for c in doc["results"]] == [
        ("sdpa", 16), ("fake_interrupt", 16), ("sdpa", 32), ("fake_interrupt", 32), ("sdpa", 64)]
    assert seen == [1, 2, 3, 4, 5]


def test_clustered_inputs_give_peaked_attention_and_are_seeded():
    from attnkit.bench.workloads import make_inputs

    shape = (1, 2, 512, 32)
    q, k, v = make_inputs("clustered", shape, torch.Generator().manual_seed(3))
    again = make_inputs("clustered", shape, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again)) and q.shape == shape
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    # peaked on the query's cluster: the output keeps most of a value's norm (uniform attention would not)
    assert out.norm(dim=-1).mean() > 0.5 * v.norm(dim=-1).mean()
    g = make_inputs("gaussian", shape, torch.Generator().manual_seed(3))
    flat = torch.nn.functional.scaled_dot_product_attention(*g)
    assert flat.norm(dim=-1).mean() < 0.3 * g[2].norm(dim=-1).mean()
    with pytest.raises(ValueError, match="inputs must be one of"):
        make_inputs("uniform", shape, torch.Generator())
