"""benchmarks/small_batch.py on the CPU: the inputs, the providers that run here, the budget rules
and the table. (Its GPU providers -- CUDA graphs, torch.compile reduce-overhead, the Triton
backend with and without pre-bound launches -- run in scripts/gpu_check.sh and the GPU suite.)"""
import math
import time

import torch

from benchmarks import small_batch
from benchmarks.small_batch import COMPILED, Inputs, measure, table

CPU = torch.device("cpu")


def test_inputs_pack_the_padded_batch():
    inputs = Inputs("bert-tiny", 4, 32, CPU)
    mask = inputs.mask.bool()
    assert inputs.ids.shape == (4, 32) and mask.sum(1).tolist() == inputs.lengths
    assert all(32 * 2 // 5 <= n <= 32 for n in inputs.lengths)
    assert torch.equal(inputs.packed_ids.view(-1), inputs.ids[mask])
    assert (inputs.ids[~mask] == 0).all() and (inputs.packed_ids > 0).all()
    assert inputs.cu_seqlens.dtype == torch.int32
    assert inputs.cu_seqlens.diff().tolist() == inputs.lengths
    assert inputs.max_seqlen == max(inputs.lengths)


def test_switches_are_restored():
    from fastbert import lean
    from fastbert.triton import launch
    plan, enabled = lean.plan, launch.enabled
    with small_batch._public_ops():
        assert lean.plan(None, None, None, None) is None and lean.plan is not plan
    with small_batch._ordinary_launches():
        assert launch.enabled is False
    assert lean.plan is plan and launch.enabled is enabled


def test_tiny_cpu_run_times_what_runs_here_and_says_why_not_the_rest():
    # a generous deadline, but too little of it for a compile
    rows = measure(CPU, "tiny", deadline=time.monotonic() + 3600, compile_s=10_000)
    shapes = [small_batch.shape_label("bert-tiny", b, s) for b, s in small_batch.SHAPES["tiny"]]
    for shape in shapes:
        got = {r["provider"]: r for r in rows if r["shape"] == shape}
        for name in ("transformers-eager", "transformers-sdpa", "fastbert-eager", "fastbert-lean"):
            assert got[name]["metric"] == "latency_ms", got[name]
            assert math.isfinite(got[name]["value"]) and got[name]["value"] > 0
        graphs = got["fastbert-cuda_graphs"]
        assert (graphs["metric"], graphs["value"]) == ("status", "unsupported")
        assert "GPU only" in graphs["note"]
        assert not any(name.startswith("fastbert-triton") for name in got)  # GPU providers only
    compiled = [r for r in rows if r["provider"] == COMPILED]
    assert [r["shape"] for r in compiled] == [small_batch.shape_label("bert-tiny", 1, 16)]
    assert compiled[0]["value"] == "skipped" and "budget" in compiled[0]["note"]
    text = table(rows)
    assert all(shape in text for shape in shapes) and "fb-lean" in text and "hf-sdpa" in text


def test_past_deadline_builds_nothing(monkeypatch):
    def no_model(self, name):
        raise AssertionError("a model was built after the deadline")

    monkeypatch.setattr(small_batch.Models, "get", no_model)
    rows = measure(CPU, "tiny", deadline=time.monotonic() - 1)
    assert rows and all((r["metric"], r["value"]) == ("status", "skipped") for r in rows)
