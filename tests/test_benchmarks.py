"""Tier 1: the benchmark suite's CPU path end to end on toy shapes, and its counting formulas."""
import csv
import math
import os
import time

import pytest
import torch

from benchmarks import counting, harness, report
from benchmarks.__main__ import DEFAULT_OUT, main, parse_args, plan, repeat_unstable
from benchmarks.suite import sizes


# --------------------------------------------------------------------------------------------
# FLOP / byte formulas against values worked out by hand
# --------------------------------------------------------------------------------------------

def test_attention_flops_by_hand():
    # 4 * B * S^2 * H * D = 4 * 32 * 512^2 * 12 * 64
    assert counting.attention_flops(32, 512, 12, 64) == 25_769_803_776
    assert counting.attention_flops(32, 512, 12, 64, mode="bwd") == 2.5 * 25_769_803_776
    assert counting.attention_flops(32, 512, 12, 64, mode="fwd+bwd") == 3.5 * 25_769_803_776
    assert counting.attention_flops(32, 512, 12, 64, causal=True) == 12_884_901_888
    # padded: only real tokens count, lengths 2 and 3 -> 4 + 9 = 13 query-key pairs per head
    assert counting.attention_flops(2, 8, 3, 5, lengths=[2, 3]) == 4 * 13 * 3 * 5


def test_linear_flops_by_hand():
    assert counting.linear_flops(16384, 768, 3072) == 77_309_411_328  # 2 * M * K * N
    assert counting.linear_flops(16384, 768, 3072, mode="fwd+bwd") == 3 * 77_309_411_328


def test_add_layer_norm_bytes_by_hand():
    # rows 4, hidden 8, bf16: activations 64 B each, weight/bias 16 B each, mean+rstd 32 B
    assert counting.add_layer_norm_bytes(4, 8, 2) == 3 * 64 + 2 * 16 + 32 == 256
    assert counting.add_layer_norm_bytes(4, 8, 2, mode="bwd") == 5 * 64 + 3 * 16 + 32 == 400
    assert counting.add_layer_norm_bytes(4, 8, 2, mode="fwd+bwd") == 656


def test_bert_flops_by_hand():
    # one layer, hidden 4, ffn 16, one sequence of 2 real tokens:
    # dense 2 * 2 tokens * (4*16 + 2*4*16) = 768, attention 4 * 2^2 * 4 = 64
    assert counting.bert_flops([2], layers=1, hidden=4, intermediate=16) == 832
    assert counting.bert_flops([2], layers=1, hidden=4, intermediate=16,
                               mode="fwd+bwd") == 3 * 768 + 3.5 * 64
    assert counting.bert_flops([2, 2], layers=3, hidden=4, intermediate=16) == 3 * 2 * 832


def test_copy_bytes_by_hand():
    assert counting.copy_bytes(10, 4) == 80


# --------------------------------------------------------------------------------------------
# harness pieces
# --------------------------------------------------------------------------------------------

def test_slug():
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.slug("Intel(R) Xeon(R) Processor (1 threads)") == "intel-xeon-processor-1-threads"


def _sleeper(ms):
    return lambda: (lambda: time.sleep(ms / 1e3))


def test_run_case_times_and_reports_failures():
    def unsupported():
        raise harness.Unsupported("needs a GPU")

    def broken():
        raise RuntimeError("kernel exploded\nsecond line")

    case = harness.Case("attention", "fwd", "toy", {"fast": _sleeper(2), "unsupported": unsupported,
                                                    "broken": broken}, work={"flops": 4e9})
    rows = harness.run_case(case, torch.device("cpu"), harness.Timing(rounds=2, cpu_min_s=0.02))
    by = {(r["provider"], r["metric"]): r for r in rows}
    assert by[("fast", "status")]["value"] == "ok"
    assert 2.0 <= by[("fast", "time_ms")]["value"] < 50.0
    assert by[("fast", "tflops")]["value"] == pytest.approx(4e9 / (by[("fast", "time_ms")]["value"] / 1e3) / 1e12)
    assert by[("unsupported", "status")]["value"] == "unsupported"
    assert by[("unsupported", "status")]["note"] == "needs a GPU"
    assert by[("broken", "status")]["value"] == "failed"
    assert by[("broken", "status")]["note"] == "RuntimeError: kernel exploded"


def test_median_and_spread_by_hand():
    # inclusive quartiles of 1..5 are 2 and 4: IQR 2 over the median 3
    assert harness.median_and_spread([5.0, 1.0, 3.0, 2.0, 4.0]) == (3.0, pytest.approx(200 / 3))
    assert harness.median_and_spread([2.0]) == (2.0, 0.0)
    assert harness.median_and_spread([2.0, 2.0, 2.0]) == (2.0, 0.0)


def test_speedups_are_per_round_ratios_with_spread():
    # the baseline's rounds drift with the machine; fastbert's move alongside: the paired
    # per-round ratios stay at 2 with no spread, though each provider's times spread widely
    samples = {"fastbert-triton": [1.0, 2.0, 4.0], "sdpa-flash": [2.0, 4.0, 8.0],
               "torch-eager": [3.0, 3.0, 12.0]}
    rows = {(p, m): (v, note) for p, m, v, note in harness.speedups(samples, 3)}
    assert rows[("fastbert-triton", "speedup_vs:sdpa-flash")] == (2.0, "")
    assert rows[("fastbert-triton", "speedup_spread_pct_vs:sdpa-flash")][0] == 0.0
    # ratios 3, 1.5, 3: median 3, inclusive quartiles 2.25 and 3 -> spread 25 %: unstable
    value, note = rows[("fastbert-triton", "speedup_vs:torch-eager")]
    assert value == 3.0 and note == "unstable: spread 25% over 3 rounds"
    assert rows[("fastbert-triton", "speedup_spread_pct_vs:torch-eager")][0] == pytest.approx(25.0)
    assert not any(p == "sdpa-flash" for p, _ in rows), "ratios are fastbert over baselines only"


def test_ceiling_fractions():
    rows = [dict(op="attention", provider="fastbert-triton", mode="fwd", shape="s",
                 metric="tflops", value=500.0)]
    harness.add_ceiling_fractions(rows, {"gemm_tflops": 800.0, "copy_gbps": 3000.0})
    assert [r["value"] for r in rows if r["metric"] == "pct_gemm_peak"] == [62.5]


def test_ratio_table_shows_spread_and_marks_unstable():
    rows = [dict(op="attention", provider=p, mode="fwd", shape="s", metric="time_ms", value=t)
            for p, t in (("fastbert-torch", 2.0), ("sdpa-math", 3.0), ("torch-eager", 8.0))]
    rows += [dict(op="attention", provider="fastbert-torch", mode="fwd", shape="s", metric=m,
                  value=v, note="") for m, v in (("speedup_vs:sdpa-math", 1.5),
                                                 ("speedup_spread_pct_vs:sdpa-math", 3.2),
                                                 ("speedup_vs:torch-eager", 4.0),
                                                 ("speedup_spread_pct_vs:torch-eager", 18.0))]
    table = report.ratio_table(rows)
    assert "1.50x ±3% " in table and "4.00x ±18%!" in table
    assert "unstable (the machine was busy): 1 of 2 ratios" in table


def _scripted(times_ms):
    """A provider whose successive timed rounds take the given times (time_round is patched to
    return what the timed function returns)."""
    it = iter(times_ms)
    return lambda: (lambda: next(it))


def test_unstable_cases_are_repeated_while_the_budget_lasts(monkeypatch, capsys):
    monkeypatch.setattr(harness, "time_round", lambda fn, *args: fn())
    # each run: the probe call, then 4 rounds
    steady = harness.Case("attention", "fwd", "steady", {
        "fastbert-x": _scripted([0] + [1, 1, 1, 1] * 3), "base": _scripted([0] + [2, 2, 2, 2] * 3)})
    # a busy spell in round 3 of the first run: ratios 2, 2, 2/3, 2 -> spread 17 %
    shaky = harness.Case("attention", "fwd", "shaky", {
        "fastbert-x": _scripted([0, 1, 1, 3, 1, 0, 1, 1, 1, 1]),
        "base": _scripted([0, 2, 2, 2, 2, 0, 2, 2, 2, 2])})
    timing, cpu = harness.Timing(rounds=4), torch.device("cpu")
    cases = [steady, shaky]
    case_rows = [harness.run_case(c, cpu, timing) for c in cases]
    assert [bool(harness.unstable_speedups(rows)) for rows in case_rows] == [False, True]
    [marked] = harness.unstable_speedups(case_rows[1])
    assert marked["value"] == 2.0 and marked["note"] == "unstable: spread 17% over 4 rounds"
    saves = []
    # a deadline already passed: nothing is repeated
    assert repeat_unstable(cases, case_rows, cpu, timing, 2, time.monotonic() - 1,
                           lambda: saves.append(1)) == 0
    # the shaky case runs once more, steady this time, and that run is kept
    assert repeat_unstable(cases, case_rows, cpu, timing, 2, None, lambda: saves.append(1)) == 1
    assert saves == [1]
    # each re-timed case says so as it starts: no silent minutes
    assert "re-timing 1/1 (run 2): attention fwd shaky, widest ratio spread 17 %" in capsys.readouterr().out
    assert not harness.unstable_speedups(case_rows[1])
    assert {r["note"] for r in case_rows[1] if r["metric"] == "status"} == {"steadiest of 2 runs"}
    assert harness.worst_spread(case_rows[1]) == 0.0


def test_model_plot_draws_cases_as_bars_and_sweeps_as_lines():
    def case(model, seqlen, provider, tokens, spread):
        shape = f"{model} B8 S{seqlen}"
        return [dict(op="model", provider=provider, mode="infer", shape=shape, metric="tokens_per_s",
                     value=tokens, note=""),
                dict(op="model", provider=provider, mode="infer", shape=shape, metric="time_spread_pct",
                     value=spread, note="")]
    rows = (case("base", 128, "fastbert-torch", 100.0, 10.0) + case("base", 128, "transformers-sdpa", 50.0, 4.0)
            + case("mini", 64, "fastbert-torch", 300.0, 0.0) + case("mini", 128, "fastbert-torch", 200.0, 0.0))
    params = {("model", "infer", f"{m} B8 S{s}"): {"model": m, "seqlen": s}
              for m, s in (("base", 128), ("mini", 64), ("mini", 128))}
    panels = report.model_panels(rows, params)
    # one length: a bar per provider, error bar half the interquartile range each side
    assert panels["base inference, S=128"] == ("case", {"fastbert-torch": (100.0, 5.0),
                                                        "transformers-sdpa": (50.0, 1.0)})
    assert panels["mini inference, by sequence length"] == (
        "sweep", {"fastbert-torch": [(64, 300.0), (128, 200.0)]}, "sequence length")


def test_host_overhead_summary_explains_the_target():
    from benchmarks import host_overhead
    rows = [dict(op="host_overhead", provider="fastbert-triton", mode="infer fwd", shape="padded",
                 metric=m, value=v, note=n)
            for m, v, n in (("status", "ok", ""), ("host_us", 126.0, ""), ("target_us", 60.0, "2.1x the target"),
                            ("python_calls", 900, ""), ("host_syncs", 0, ""), ("dispatched_ops", 12, ""))]
    text = host_overhead.summary(rows)
    assert "target: the host time per BERT-base layer under which an H100-class GPU stays busy" in text
    assert "not a failure" in text and "over target" not in text and "2.1x the target" in text


def test_host_overhead_summary_lists_whole_models():
    from benchmarks import host_overhead
    rows = [dict(op="host_overhead", provider=p, mode="infer fwd", shape=host_overhead.MODEL_SHAPE,
                 metric=metric, value=value, note="")
            for p in ("fastbert-triton", "transformers-sdpa")
            for metric, value in (("python_calls", 888), ("python_calls_per_layer", 158.0),
                                  ("host_us_per_layer", 146.0))]
    text = host_overhead.summary(rows)
    assert "whole models" in text and "transformers-sdpa" in text
    assert "888 Python calls per forward (158 per layer), 146 us per layer" in text


def test_default_out_is_outside_the_package_source():
    benchmarks_dir = os.path.dirname(os.path.abspath(harness.__file__))
    repo = os.path.dirname(benchmarks_dir)
    assert parse_args([]).out == DEFAULT_OUT
    assert not os.path.abspath(DEFAULT_OUT).startswith(repo + os.sep)
    assert parse_args(["--out", "benchmarks/results"]).out == "benchmarks/results"


def test_cpu_quick_leaves_the_sweeps_to_a_flag():
    cpu = torch.device("cpu")
    quick, swept, full = sizes(cpu, "quick"), sizes(cpu, "quick", sweeps=True), sizes(cpu, "full")
    assert quick["sweep"] == [] and [m for m in quick["models"] if m[0] == "bert-mini"] == [
        ("bert-mini", 8, 128, ["train", "infer"])]
    assert len(swept["sweep"]) == len(full["sweep"]) == 3
    assert {m[2] for m in swept["models"] if m[0] == "bert-mini"} == {64, 128, 256}
    # the headline cases are in every CPU run
    headline = {(m[0], m[2]) for m in quick["models"]}
    assert headline >= {("bert-base-2l", 128), ("bert-base", 128), ("roberta-base-2l", 128)}
    assert parse_args(["--quick", "--sweeps"]).sweeps


def test_plan_only_ops_has_no_model_cases():
    cfg = sizes(torch.device("cpu"), "tiny")
    ops = {c.op for c in plan(torch.device("cpu"), cfg, "ops")}
    assert ops == {"ceiling", "attention", "add_layer_norm", "linear_bias_gelu"}
    assert {c.op for c in plan(torch.device("cpu"), cfg, "model")} == {"ceiling", "model"}


# --------------------------------------------------------------------------------------------
# the whole CPU path, toy shapes
# --------------------------------------------------------------------------------------------

def test_quick_cpu_suite_writes_csv_and_plots(tmp_path, capsys):
    assert main(["--quick", "--tiny", "--threads", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    [csv_path] = tmp_path.glob("*.csv")
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["op", "provider", "mode", "shape", "metric", "value", "note",
                                     "device", "torch", "triton", "transformers", "fastbert",
                                     "commit", "date", "suite"]
        rows = list(reader)
    assert {r["op"] for r in rows} == {"ceiling", "attention", "add_layer_norm",
                                       "linear_bias_gelu", "model"}
    assert all(r["torch"] == torch.__version__ and r["suite"] == "tiny" for r in rows)

    def value(op, provider, metric, mode=None):
        vals = [r["value"] for r in rows if (r["op"], r["provider"], r["metric"]) == (op, provider, metric)
                and mode in (None, r["mode"])]
        assert vals, f"no {metric} row for {op} / {provider}"
        return vals

    # every op and the model ran on fastbert's torch backend and on the baselines
    for op, baseline in (("attention", "sdpa-math"), ("add_layer_norm", "torch-eager"),
                         ("linear_bias_gelu", "torch-eager"), ("model", "transformers-sdpa")):
        for provider in ("fastbert-torch", baseline):
            assert set(value(op, provider, "status")) == {"ok"}
            assert all(0 < float(v) < 1e4 for v in value(op, provider, "time_ms"))
        assert all(float(v) > 0 for v in value(op, "fastbert-torch", f"speedup_vs:{baseline}"))
        assert all(float(v) >= 0 for v in value(op, "fastbert-torch",
                                                 f"speedup_spread_pct_vs:{baseline}"))
        assert all(float(v) >= 0 for v in value(op, "fastbert-torch", "time_spread_pct"))
    for mode in ("train", "infer"):
        assert float(value("model", "patch_hf", "tokens_per_s", mode)[0]) > 0
        assert math.isfinite(float(value("model", "fastbert-torch", "mfu_pct", mode)[0]))
    assert float(value("add_layer_norm", "torch-eager", "pct_copy_bw")[0]) > 0
    # unavailable providers are recorded with their reason, not dropped
    # CUDA-only SDPA backends are not listed on CPU
    assert not [r for r in rows if r["provider"] in ("sdpa-efficient", "sdpa-cudnn")]
    assert set(value("attention", "fastbert-triton", "status")) == {"unsupported"}
    assert set(value("model", "transformers-sdpa+compile", "status")) == {"skipped"}
    # ModernBERT inference is also timed against its own GEMMs alone (the floor)
    assert value("model", "gemm-floor", "status", "infer") == ["ok"]
    assert value("model", "gemm-floor", "status", "train") == ["skipped"]
    assert float(value("model", "patch_hf", "speedup_vs:gemm-floor", "infer")[0]) > 0
    # bf16 GEMMs: timed where the CPU has native bf16, else recorded with the reason
    from fastbert import cpu
    bf16 = value("model", "patch_hf-bf16-gemms", "status", "infer")
    assert bf16 == (["ok"] if cpu.bf16_support()[0] else ["unsupported"])
    assert value("model", "patch_hf-bf16-gemms", "status", "train") == ["unsupported"]
    # prepacked fp32 weights (opt-in): timed for CPU inference, and switched off after each call
    assert value("model", "patch_hf-prepacked", "status", "infer") == ["ok"]
    assert value("model", "patch_hf-prepacked", "status", "train") == ["unsupported"]
    assert cpu.PREPACK_FP32 is False
    assert all(r["note"] for r in rows if r["metric"] == "status" and r["value"] != "ok")

    assert len(list(tmp_path.glob("*.png"))) == 3
    assert all(float(r["value"]) >= 0 for r in rows if r["metric"] == "case_wall_s")
    assert {r["op"] for r in rows if r["metric"] == "case_wall_s"} >= {"attention", "model"}
    printed = capsys.readouterr().out
    assert "took " in printed and " min" in printed
    assert "speedup of fastbert over each baseline" in printed
    assert "±: spread of a ratio" in printed
    assert "not timed:" in printed


def test_modernbert_gemm_floor_runs_each_projection_of_every_layer_on_the_real_tokens(monkeypatch):
    import torch.nn.functional as F
    from benchmarks import modernbert
    from benchmarks.models import _hf_model
    from fastbert import cpu
    hf = _hf_model("modernbert-tiny", torch.device("cpu"), torch.float32, "sdpa")
    calls = []

    def record(route):
        def linear(x, w, b=None):
            calls.append((tuple(x.shape), w))
            return route(x, w, b)
        return linear
    monkeypatch.setattr(F, "linear", record(F.linear))
    monkeypatch.setattr(cpu, "linear", record(cpu.linear))
    modernbert._gemm_floor(hf, 37, torch.device("cpu"), torch.float32)()
    expected = [m.weight for layer in hf.layers
                for m in (layer.attn.Wqkv, layer.attn.Wo, layer.mlp.Wi, layer.mlp.Wo)]
    assert len(calls) == len(expected) == 4 * len(hf.layers)
    for (shape, w), want in zip(calls, expected):
        assert w is want and shape == (37, want.shape[1])
