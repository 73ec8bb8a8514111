"""fastbert.backend_order: auto's order per op and GPU family, from results or static analysis."""
from __future__ import annotations

import csv

import pytest
import torch

from fastbert import backend_order as bo

HOPPER, AMPERE = (9, 0), (8, 0)
COLUMNS = ["op", "provider", "mode", "shape", "metric", "value", "device"]


def write_results(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(zip(COLUMNS, row)))


def names(order):
    return [backend for backend, _ in order]


@pytest.mark.parametrize("op", bo.OPS)
@pytest.mark.parametrize("capability", [HOPPER, AMPERE, (7, 5), (10, 0)])
def test_static_order_without_results(tmp_path, op, capability):
    order = bo.order(op, torch.device("cuda"), capability=capability, results_dir=str(tmp_path))
    assert sorted(names(order)) == sorted(bo.GPU_BACKENDS)
    assert names(order)[-1] == "torch"  # the fallback
    assert all(why.startswith("no benchmark results for") and "static analysis" in why for _, why in order)


def test_static_analysis_prefers_triton_attention_and_gemm_cuda_layer_norm(tmp_path):
    def first(op):
        return names(bo.order(op, "cuda", capability=HOPPER, results_dir=str(tmp_path)))[0]
    assert first("fastbert.attention") == "triton"  # the WMMA CUDA kernel: ~30 % of FA2
    assert first("fastbert.attention_varlen") == "triton"
    assert first("fastbert.linear_bias_gelu") == "triton"  # fused epilogue
    assert first("fastbert.add_layer_norm") == "cuda"  # memory-bound: host cost decides
    assert first("fastbert.apply_rotary") == "cuda"  # one elementwise pass: host cost decides
    assert first("fastbert.linear_geglu") == "triton"  # fused epilogue


def test_measured_results_decide_for_their_family_only(tmp_path):
    rows = []
    for shape, cuda_ms, triton_ms in [("B8 S128", 1.0, 2.0), ("B32 S512", 3.0, 5.0)]:
        rows += [("attention", "fastbert-cuda", "fwd+bwd", shape, "time_ms", cuda_ms, "NVIDIA H200"),
                 ("attention", "fastbert-triton", "fwd+bwd", shape, "time_ms", triton_ms,
                  "NVIDIA H200"),
                 ("attention", "sdpa-flash", "fwd+bwd", shape, "time_ms", 0.5, "NVIDIA H200"),
                 # forward-only cases do not count when training cases exist
                 ("attention", "fastbert-triton", "fwd", shape, "time_ms", 0.1, "NVIDIA H200"),
                 ("attention", "fastbert-cuda", "fwd", shape, "time_ms", 9.0, "NVIDIA H200")]
    write_results(tmp_path / "nvidia-h200.csv", rows)
    bo.measured_times.cache_clear()
    hopper = bo.order("fastbert.attention", "cuda", capability=HOPPER, results_dir=str(tmp_path))
    assert names(hopper) == ["cuda", "triton", "torch"]
    assert "measured on NVIDIA H200 (2 fwd+bwd cases" in hopper[0][1]
    assert "1.00x" in hopper[0][1]
    # triton: geometric mean of 2.0 and 5/3
    assert f"{(2.0 * 5 / 3) ** 0.5:.2f}x" in hopper[1][1]
    assert "not ranked by the benchmark results" in hopper[2][1]
    # no Ampere results: static order there, and for other ops on Hopper
    ampere = bo.order("fastbert.attention", "cuda", capability=AMPERE, results_dir=str(tmp_path))
    assert names(ampere)[0] == "triton" and "static analysis" in ampere[0][1]
    ln = bo.order("fastbert.add_layer_norm", "cuda", capability=HOPPER, results_dir=str(tmp_path))
    assert "static analysis" in ln[0][1]


def test_forward_results_count_without_training_ones(tmp_path):
    write_results(tmp_path / "a100.csv", [
        ("add_layer_norm", "fastbert-cuda", "fwd", "16384x768", "time_ms", 0.04, "NVIDIA A100-SXM4-80GB"),
        ("add_layer_norm", "fastbert-triton", "fwd", "16384x768", "time_ms", 0.03,
         "NVIDIA A100-SXM4-80GB"),
        ("add_layer_norm", "fastbert-triton", "fwd", "16384x768", "status", "ok",
         "NVIDIA A100-SXM4-80GB"),
    ])
    bo.measured_times.cache_clear()
    order = bo.order("fastbert.add_layer_norm", "cuda", capability=AMPERE,
                     results_dir=str(tmp_path))
    assert names(order) == ["triton", "cuda", "torch"]
    assert "1 forward cases" in order[0][1]


def test_cpu_gets_torch_alone_and_bad_op_raises():
    assert names(bo.order("fastbert.attention", torch.device("cpu"))) == ["torch"]
    with pytest.raises(ValueError, match="argument 'op'"):
        bo.order("fastbert.softmax", torch.device("cpu"))


def test_families():
    assert bo.family((9, 0)) == bo.HOPPER
    assert bo.family((8, 0)) == bo.AMPERE and bo.family((8, 6)) == bo.AMPERE
    assert bo.family((8, 9)) == bo.OTHER and bo.family((12, 0)) == bo.OTHER
    assert bo.family_of_name("NVIDIA H100 80GB HBM3") == bo.HOPPER
    assert bo.family_of_name("NVIDIA A100-SXM4-40GB") == bo.AMPERE
    assert bo.family_of_name("Intel(R) Xeon(R) Processor (1 threads)") is None


def test_committed_results_give_an_order_for_every_op():
    # whatever benchmarks/results holds (CPU-only today), every op gets all backends, torch last
    for op in bo.OPS:
        for capability in (HOPPER, AMPERE):
            order = bo.order(op, "cuda", capability=capability)
            assert sorted(names(order)) == sorted(bo.GPU_BACKENDS)
