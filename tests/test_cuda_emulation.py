"""The CUDA add+LayerNorm, bias+GELU, rotary and GeGLU kernels run on CPU under the host
emulation (tests/cuda_emulation.py: csrc/*.cu's real launchers and kernels/*.cuh, through
fastbert/cuda.py's entry points), checked by the gpu tier's own checks in tests/test_cuda.py and
tests/test_cuda_modernbert.py, with the emulation's memcheck, racecheck and synccheck on every
call; and those checks themselves, on kernels with one deliberate bug each
(tests/cuda_emulation_selftest.cu). The emulation's bank-conflict counter (bankcheck) on
shared-memory patterns whose cost is known (tests/cuda_emulation_bank_selftest.cu), and its report
for the attention kernels (`pytest -s` prints it). The attention kernels run under the same
emulation in tests/test_cuda_attention.py. The dropout masks of the LayerNorm and attention
kernels are recomputed here from their documented Philox layouts, and the LayerNorm masks compared
with the Triton kernel's (README, Backends: they differ).

- always: the source rewriting (pure Python).
- compile: everything else (`python -m pytest -m compile tests/test_cuda_emulation.py`).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from fastbert import reference
from tests import cuda_emulation
from tests.cuda_helpers import assert_keep_rate, emulated_backend, philox4x32_10  # noqa: F401
from tests.helpers import check_mixed_dtype_layer_norm
# autouse fixtures: imported, so they apply to every test in this module
from tests.cuda_helpers import extension_runs_here, poisoned_outputs  # noqa: F401
from tests.test_cuda import (check_layer_norm, check_layer_norm_dropout, check_linear_gelu,
                             check_public_pre_norm, layer_norm_keep_mask)
from tests.test_cuda_attention import attention_keep_mask
from tests.test_cuda_modernbert import check_geglu, check_public_ops, check_rotary

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# --------------------------------------------------------------------------------------------
# always: the rewriting keeps line numbers and turns CUDA syntax into calls
# --------------------------------------------------------------------------------------------

def test_rewrite_turns_launches_and_shared_declarations_into_calls():
    source = ("void f() {\n"
              "  k<T, decltype(d)::value>\n"
              "      <<<grid, dim3(32, 4), smem, stream>>>(a,\n"
              "                                           b);\n"
              "  extern __shared__ __align__(128) unsigned char smem[];\n"
              "  __shared__ float tile[8][32 * VEC];\n"
              "  check(cudaLaunchKernel((const void*)kernel, grid, block, args, 0, s));\n"
              "}\n")
    out = cuda_emulation.rewrite(source, "csrc/x.cu")
    lines = out.split("\n")
    assert lines[0] == '#line 1 "csrc/x.cu"'
    assert len(lines) == len(source.split("\n")) + 1  # the #line only
    assert lines[2].strip() == ("::emu::launch(::emu::config(grid, dim3(32, 4), smem, stream), "
                                "k<T, decltype(d)::value>,")
    assert lines[3].strip() == "a,"
    assert lines[4].strip() == "b);"
    assert lines[5].strip() == ("unsigned char* const smem = "
                                "reinterpret_cast<unsigned char*>(::emu::dynamic_smem());")
    assert lines[6].strip().startswith("auto& tile = ::emu::shared_object<float[8][32 * VEC]>(")
    assert "::emu::launch_kernel(kernel, grid" in lines[7]
    assert "<<<" not in out and "__shared__" not in out


def test_the_emulation_has_every_entry_point_of_the_extension():
    """A kernel added to csrc/ gets into the emulation's build by itself (csrc/*.cu), and into
    EmuC by hand: its buffers' extents are what the guard regions need."""
    bound = re.findall(r'm\.def\("(\w+)"', (cuda_emulation.ROOT / "csrc/bindings.cpp").read_text())
    assert len(bound) >= 15
    assert [name for name in bound if not callable(getattr(cuda_emulation.EmuC, name, None))] == []


@pytest.mark.compile
def test_every_kernel_runs_under_the_emulation(emulated_backend):
    """One small call of each entry point launches every __global__ function of kernels/."""
    source = "".join(p.read_text() for p in (cuda_emulation.ROOT / "kernels").glob("*.cuh"))
    declared = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(",
                              source))
    assert len(declared) >= 10
    x, w = torch.randn(3, 40, dtype=F16), torch.randn(40, dtype=F16)
    y, mean, rstd = emulated_backend.add_layer_norm_forward(x, x, w, w, 1e-5, 0.1, 1)
    emulated_backend.add_layer_norm_backward(y, x, x, w, mean, rstd, 0.1, 1)
    out, pre = emulated_backend.linear_bias_gelu_forward(x, w.view(1, 40), w[:1], "none")
    emulated_backend.linear_bias_gelu_backward(out, x, w.view(1, 40), pre, "none")
    for dtype in (F16, torch.float32):  # tensor-core and SIMT (fp32) attention
        q = torch.randn(1, 5, 1, 32, dtype=dtype)
        out, lse = emulated_backend.attention_forward(q, q, q, None, False, 0.0, 0.2, 0)
        for deterministic in (False, True):
            emulated_backend.attention_backward(out, q, q, q, out, lse, None, False, 0.0, 0.2,
                                                0, deterministic)
    positions = torch.arange(3)
    for interleaved in (False, True):
        emulated_backend.apply_rotary(x.view(3, 5, 8), w[:6].view(2, 3), w[6:12].view(2, 3),
                                      positions % 2, interleaved, False)
    out, pre = emulated_backend.linear_geglu_forward(x, x[:2], None, "none")
    emulated_backend.linear_geglu_backward(out, x, x[:2], pre, "none")
    assert declared - emulated_backend._C.launched_kernels() == set()


# --------------------------------------------------------------------------------------------
# compile: the checks find what they should, and only that
# --------------------------------------------------------------------------------------------

SELFTEST_FINDINGS = [
    # case, what the report must say (None: clean)
    (0, None),
    (1, "memcheck: selftest_kernels::shifted_copy_kernel(float const*, float*, int, int) "
        "block (1,0,0) thread (31,0,0): read of 4 bytes at byte offset 256 of 'x' (256 bytes)"),
    (2, "memcheck: selftest_kernels::write_before_kernel(float const*, float*, int) "
        "block (0,0,0) thread (0,0,0): write of 4 bytes at byte offset -4 of 'y' (256 bytes)"),
    (3, "racecheck: selftest_kernels::neighbour_kernel"),
    (4, None),
    (5, "memcheck: selftest_kernels::dynamic_smem_kernel(float const*, float*, int) "
        "block (0,0,0) thread (3"),  # one of the threads 32..63
    (5, "bytes at dynamic shared memory byte 1"),
    (5, "outside the launch's 128 bytes of dynamic shared memory"),
    (6, None),
    (7, "synccheck: selftest_kernels::divergent_barrier_kernel(float const*, float*, int, bool) "
        "block (0,0,0) thread (32,0,0): __syncthreads at tests/cuda_emulation_selftest.cu:42 "
        "reached by 32 of 64 threads of the block (32 exited without reaching it)"),
    (8, None),
    (9, "racecheck: selftest_kernels::warp_exchange_kernel"),
    (10, None),
    (12, "memcheck: selftest_kernels::vector_load_kernel(float const*, float*, int, int) "
         "block (0,0,0) thread (0,0,0): misaligned access to 'const struct float4' (tests/"
         "cuda_emulation_selftest.cu:57) at byte offset 4 of 'x' (256 bytes) (needs 16-byte "
         "alignment)"),
    (13, None),
    (14, "memcheck: host code reads 4 bytes of device memory at byte offset 0 of 'x' (256 bytes)"),
]


@pytest.mark.compile
@pytest.mark.parametrize("case, finding", SELFTEST_FINDINGS)
def test_emulation_checks_find_the_planted_bug(emulated_backend, case, finding):
    emu, n = emulated_backend._C, 64
    x = torch.randn(n)
    y = torch.full((n,), float("nan"))
    run = lambda: emu.selftest(case, (x.data_ptr(), 4 * n), (y.data_ptr(), 4 * n), n)  # noqa: E731
    if finding is None:
        assert run() == 0
        return
    with pytest.raises(cuda_emulation.EmulationFinding) as found:
        run()
    assert finding in str(found.value)


# --------------------------------------------------------------------------------------------
# compile: bankcheck, the shared-memory bank-conflict counter
# --------------------------------------------------------------------------------------------

BANK_PATTERNS = [
    # case of tests/cuda_emulation_bank_selftest.cu (one warp, one shared access per lane), bytes
    # per lane, wavefronts, ideal, phased (strict half/quarter-warp phases)
    (0, 4, 1, 1, 1),     # 32 lanes, consecutive words
    (1, 4, 2, 1, 2),     # stride 2 words: 2-way
    (2, 4, 32, 1, 32),   # stride 32 words: all in bank 0
    (3, 4, 1, 1, 1),     # every lane the same word: broadcast
    (4, 4, 1, 1, 1),     # lane pairs share words: multicast
    (5, 16, 4, 4, 4),    # float4, consecutive: 512 bytes, 4 wavefronts, no conflict
    (6, 16, 32, 4, 32),  # float4, rows of 64 floats: all 32 rows in banks 0..3, 8x the ideal
    (7, 16, 4, 4, 4),    # float4, rows of 68 floats (padded): no conflict
    (8, 16, 8, 1, 8),    # float4 by 8 lanes, rows of 64 floats: 8-way
    (9, 16, 1, 1, 1),    # float4 by 8 lanes, rows of 68 floats: one wavefront
    (10, 16, 1, 1, 4),   # float4, every lane the same address: broadcast
    (11, 16, 8, 4, 32),  # float4, 8 rows of 64 x 4 columns: 2-way over the warp, 8-way a phase
    (12, 8, 2, 2, 2),    # float2, consecutive: 256 bytes
    (13, 4, 2, 1, 2),    # store, stride 2 words
    (14, 2, 1, 1, 1),    # 2-byte, consecutive: 64 bytes
]


def _run_bank_pattern(emu, case):
    n = 64
    x, y = torch.randn(n), torch.empty(n)
    assert emu.bank_selftest(case, (x.data_ptr(), 4 * n), (y.data_ptr(), 4 * n), n) == 0


@pytest.mark.compile
@pytest.mark.parametrize("case, width, wavefronts, ideal, phased", BANK_PATTERNS)
def test_bankcheck_counts_known_patterns(emulated_backend, case, width, wavefronts, ideal, phased):
    """One warp instruction of a known shared-memory pattern: wavefronts = max(ceil(distinct
    bytes / 128), the most distinct words in one bank), ideal = ceil(distinct bytes / 128)."""
    emu = emulated_backend._C
    with emu.bankcheck():
        _run_bank_pattern(emu, case)
    report = emu.bank_report()
    assert list(report) == ["bank_pattern_kernel"]
    entry = report["bank_pattern_kernel"]
    assert (entry["instructions"], entry["wavefronts"], entry["ideal"], entry["phased"]) == (
        1, wavefronts, ideal, phased)
    assert entry["worst"]["width"] == width
    assert entry["worst"]["kind"] == ("store" if case == 13 else "load")
    assert entry["worst"]["site"].startswith("bank_pattern_kernel+0x")


@pytest.mark.compile
def test_bankcheck_groups_executions_of_one_site_into_warp_instructions(emulated_backend):
    """A loop at one program counter: the k-th iteration of every lane is one warp instruction
    (strides 1, 2, 4, 8 words: 1 + 2 + 4 + 8 wavefronts)."""
    emu = emulated_backend._C
    with emu.bankcheck():
        _run_bank_pattern(emu, 15)
    entry = emu.bank_report()["bank_pattern_kernel"]
    assert (entry["instructions"], entry["wavefronts"], entry["ideal"]) == (4, 15, 4)
    assert entry["worst"]["wavefronts"] == 8


@pytest.mark.compile
def test_bankcheck_is_off_by_default_and_resets(emulated_backend):
    emu = emulated_backend._C
    emu.reset_bank_report()
    _run_bank_pattern(emu, 2)
    assert emu.bank_report() == {}
    with emu.bankcheck():
        _run_bank_pattern(emu, 2)
        _run_bank_pattern(emu, 0)
    assert emu.bank_report()["bank_pattern_kernel"]["wavefronts"] == 33
    _run_bank_pattern(emu, 2)  # off again
    assert emu.bank_report()["bank_pattern_kernel"]["wavefronts"] == 33
    emu.reset_bank_report()
    assert emu.bank_report() == {}


def _attention_bank_report(backend, dtype):
    """bankcheck's report of the attention kernels on a small dense case: b=1, sq=sk=70, h=1,
    head dims 32, 64, 128, forward and backward (atomic and deterministic dQ), without and with
    dropout."""
    emu = backend._C
    torch.manual_seed(0)
    with emu.bankcheck():
        for d in (32, 64, 128):
            q, k, v = (torch.randn(1, 70, 1, d, dtype=dtype) for _ in range(3))
            for p in (0.0, 0.2):
                out, lse = backend.attention_forward(q, k, v, None, False, p, d ** -0.5, 11)
                dout = torch.randn_like(out)
                for deterministic in (False, True):
                    backend.attention_backward(dout, q, k, v, out, lse, None, False, p,
                                               d ** -0.5, 11, deterministic)
    return emu.bank_report()


@pytest.mark.compile
@pytest.mark.parametrize("dtype", [F32, F16])
def test_attention_shared_memory_bank_report(emulated_backend, dtype):
    """Prints (pytest -s) the attention kernels' bank conflicts: per kernel and kind of access,
    warp instructions, wavefronts, ideal wavefronts, their ratio, the strict-phase count and the
    worst site. "load" / "store" are the kernels' plain shared accesses (instrumented), "ldmatrix"
    and "cp.async" the emulated instructions' shared requests (a lane's 16-byte row / destination).
    Every kernel that touches shared memory is counted, never below the ideal. The fp32 kernels
    (kernels/attention_fp32.cuh) are bank-conflict-free in every access (wavefronts == ideal,
    whole-warp model: their 4-consecutive-row tiling before review gave 2x on the P stores and
    1.3-1.4x on loads here); the fp16 kernels' ldmatrix and cp.async requests are too."""
    report = _attention_bank_report(emulated_backend, dtype)
    print(f"\nshared-memory bank report, {dtype} attention (b=1, sq=sk=70, h=1, d=32/64/128, "
          f"forward, backward, dropout 0 / 0.2):")
    print(cuda_emulation.format_bank_report(report, kinds=("load", "store")))
    if any(k in entry["kinds"] for entry in report.values() for k in ("ldmatrix", "cp.async")):
        print("emulated instructions:")
        print(cuda_emulation.format_bank_report(report, kinds=("ldmatrix", "cp.async")))
    assert report
    if dtype == F16:  # the tensor-core kernels' ldmatrix and cp.async requests are counted
        assert {"ldmatrix", "cp.async"} <= {k for entry in report.values() for k in entry["kinds"]}
    for kernel, entry in report.items():
        assert entry["instructions"] > 0, kernel
        assert entry["wavefronts"] >= entry["ideal"], kernel
        for kind, totals in entry["kinds"].items():
            assert totals["wavefronts"] >= totals["ideal"] > 0, (kernel, kind)
            assert totals["phased"] >= totals["wavefronts"], (kernel, kind)
            if "_fp32" in kernel or kind in ("ldmatrix", "cp.async"):
                assert totals["wavefronts"] == totals["ideal"], (kernel, kind, totals)
    if dtype == F32:
        assert {k.split("<")[0] for k in report} >= {"fwd_kernel_fp32", "dkdv_kernel_fp32",
                                                     "dq_kernel_fp32"}, list(report)


@pytest.mark.compile
def test_emulation_refuses_launches_a_gpu_refuses(emulated_backend):
    """64 KiB of dynamic shared memory without cudaFuncSetAttribute: cudaErrorInvalidValue."""
    x, y = torch.randn(64), torch.empty(64)
    assert emulated_backend._C.selftest(11, (x.data_ptr(), 256), (y.data_ptr(), 256), 64) == 1


@pytest.mark.compile
def test_emulated_launcher_errors_are_python_errors(emulated_backend):
    x = torch.randn(2, 5000)
    w = torch.ones(5000)
    with pytest.raises(ValueError, match="hidden sizes 1..4096, got 5000"):
        emulated_backend.add_layer_norm_forward(x, None, w, w, 1e-5, 0.0, 0)


# --------------------------------------------------------------------------------------------
# compile: add + LayerNorm
# --------------------------------------------------------------------------------------------

LAYER_NORM_CASES = [
    # rows, hidden, dtype, weight dtype, residual, x offset (elements), emulated SM count
    (1, 1, F32, F32, True, 0, 4),
    (300, 7, F16, F16, False, 0, 4),       # one element per lane at most, 75 row groups on 8
    (37, 768, BF16, F32, True, 0, 4),      # vectorised, fp32 weights
    (64, 768, F16, F16, True, 1, 4),       # unaligned rows: the scalar path
    (130, 1000, F16, F16, True, 0, 132),   # every row group its own partial sum
    (9, 1000, F32, F32, False, 0, 4),
    (5, 4096, BF16, BF16, True, 0, 4),     # block mode, 512 threads a row
    (3, 4096, F32, F32, False, 0, 4),      # block mode, 1024 threads a row
    (7, 1030, F16, F16, True, 0, 4),       # block mode, scalar: 1024 threads, some with 2 columns
]


@pytest.mark.compile
@pytest.mark.parametrize("rows, hidden, dtype, weight_dtype, with_residual, x_offset, sm_count",
                         LAYER_NORM_CASES)
def test_emulated_add_layer_norm_matches_reference(emulated_backend, rows, hidden, dtype,
                                                   weight_dtype, with_residual, x_offset,
                                                   sm_count):
    emulated_backend._C.set_sm_count(sm_count)
    try:
        check_layer_norm(rows, hidden, dtype, weight_dtype, with_residual, emulated_backend,
                         "cpu", x_offset)
    finally:
        emulated_backend._C.set_sm_count(4)


@pytest.mark.compile
@pytest.mark.parametrize("rows, hidden, dtype, weight_dtype, with_residual, x_offset", [
    (300, 7, F16, F16, False, 0),      # no residual: the sum is x
    (37, 768, BF16, F32, True, 0),     # vectorised sum and dsum
    (64, 768, F16, F16, True, 1),      # unaligned rows: the scalar path
    (9, 1000, F32, F32, False, 0),
    (5, 4096, BF16, BF16, True, 0),    # block mode
    (7, 1030, F16, F16, True, 0),      # block mode, scalar
])
def test_emulated_add_layer_norm_pre_norm_matches_reference(emulated_backend, rows, hidden, dtype,
                                                            weight_dtype, with_residual, x_offset):
    """The pre-norm form (return_residual): the stored sum, and every gradient with dsum added."""
    check_layer_norm(rows, hidden, dtype, weight_dtype, with_residual, emulated_backend, "cpu",
                     x_offset, pre_norm=True)


@pytest.mark.compile
@pytest.mark.parametrize("rows, hidden, dtype, with_residual, p", [
    (40, 768, BF16, True, 0.1),
    (7, 1000, F32, False, 0.5),
    (3, 4096, F16, True, 0.2),
    (33, 100, F16, True, 0.3),   # unvectorised (100 is not a multiple of 8)
    (3, 4095, F32, False, 0.1),  # block mode, unvectorised
])
def test_emulated_add_layer_norm_dropout_matches_reference(emulated_backend, rows, hidden, dtype,
                                                           with_residual, p):
    """Forward and every gradient given the forward's mask (backward regenerates it: dx is 0
    exactly where forward dropped), keep rate, same seed same bits, another seed another mask."""
    check_layer_norm_dropout(emulated_backend, "cpu", rows, hidden, dtype, with_residual, p)


@pytest.mark.compile
@pytest.mark.parametrize("rows, hidden, dtype, with_residual, p", [
    (40, 768, BF16, True, 0.1),
    (7, 1000, F32, False, 0.5),
    (33, 100, F16, True, 0.3),   # unvectorised
    (3, 4095, F32, False, 0.1),  # block mode, unvectorised
])
def test_emulated_add_layer_norm_pre_norm_dropout_matches_reference(emulated_backend, rows,
                                                                    hidden, dtype, with_residual,
                                                                    p):
    """The pre-norm form with dropout: the sum holds forward's mask, backward regenerates it."""
    check_layer_norm_dropout(emulated_backend, "cpu", rows, hidden, dtype, with_residual, p,
                             pre_norm=True)


@pytest.mark.compile
@pytest.mark.parametrize("low, p, pre_norm", [(BF16, 0.0, False), (F16, 0.2, True)])
def test_emulated_add_layer_norm_mixed_dtypes_as_autocast_gives_them(emulated_backend, low, p,
                                                                     pre_norm):
    """A bf16/fp16 x beside an fp32 residual, y asked in fp32 (CUDA autocast's norm): the
    launcher casts to the kernels' one dtype and each gradient back to its input's."""
    check_mixed_dtype_layer_norm(emulated_backend, low=low, dropout_p=p, pre_norm=pre_norm)


@pytest.mark.compile
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_emulated_kernels_take_zero_rows(emulated_backend, p):
    """No rows: LayerNorm and GELU backward still launch (one partial-sum block) and give zero
    weight and bias gradients; nothing is read or written out of bounds."""
    x, w = torch.randn(0, 96, dtype=BF16), torch.randn(96, dtype=BF16)
    y, mean, rstd = emulated_backend.add_layer_norm_forward(x, x, w, w, 1e-5, p, 3)
    dx, dres, dw, db = emulated_backend.add_layer_norm_backward(x, x, x, w, mean, rstd, p, 3)
    assert y.shape == dx.shape == dres.shape == (0, 96)
    assert (dw == 0).all() and (db == 0).all()
    weight = torch.randn(40, 96, dtype=BF16)
    out, pre = emulated_backend.linear_bias_gelu_forward(x, weight, torch.randn(40, dtype=BF16),
                                                         "none")
    dx, dw, db = emulated_backend.linear_bias_gelu_backward(out, x, weight, pre, "none")
    assert out.shape == (0, 40) and dx.shape == (0, 96) and (dw == 0).all() and (db == 0).all()


@pytest.mark.compile
@pytest.mark.parametrize("rows, hidden, dtype, p", [(6, 768, F16, 0.3), (5, 100, F32, 0.5)])
def test_emulated_layer_norm_dropout_is_the_documented_philox_stream(emulated_backend, rows,
                                                                     hidden, dtype, p):
    """The mask the kernels draw is kernels/layer_norm.cuh's layout, recomputed here with an
    independent Philox: element e = row * hidden + col is kept when word e % 4 of
    philox4x32_10((e / 4, 0, 0, 0), (seed low, seed high)) >= round(p * 2^32)."""
    seed = 0x1234_5678_9ABC_DEF0
    keep = layer_norm_keep_mask(emulated_backend, "cpu", rows, hidden, dtype, p, seed)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    threshold = round(p * 2 ** 32)
    words = [w for g in range((rows * hidden + 3) // 4)
             for w in philox4x32_10((g & 0xFFFFFFFF, g >> 32, 0, 0), key)]
    want = torch.tensor(words[:rows * hidden], dtype=torch.int64).view(rows, hidden) >= threshold
    assert torch.equal(keep, want)


@pytest.mark.compile
def test_emulated_attention_dropout_is_the_documented_philox_stream(emulated_backend):
    """kernels/attention_common.cuh's layout, recomputed with an independent Philox: (query i,
    key j) of head h, batch b is kept when word 2 (i % 2) + j % 2 of
    philox4x32_10((j / 2, i / 2, h, b), (seed low, seed high)) >= round(p * 2^32). The mask is read
    off the forward's output; the backward regenerating it is checked by
    test_cuda_attention.py's emulated dropout tests (every gradient given this mask)."""
    b, sq, sk, h, d, p, seed = 2, 9, 20, 2, 32, 0.3, 0x0FED_CBA9_8765_4321
    keep, visible = attention_keep_mask(emulated_backend, "cpu", b, sq, sk, h, d, F16, False, None,
                                        p, seed, d ** -0.5)
    assert visible.all()
    key, threshold = (seed & 0xFFFFFFFF, seed >> 32), round(p * 2 ** 32)
    want = torch.tensor([[[[philox4x32_10((j // 2, i // 2, hh, bb), key)[2 * (i % 2) + j % 2]
                            >= threshold for j in range(sk)] for i in range(sq)]
                          for hh in range(h)] for bb in range(b)])
    assert torch.equal(keep, want)


TRITON_LAYER_NORM_MASKS = """
import os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
from fastbert.triton import layer_norm
seed, out, cases = int(sys.argv[1]), sys.argv[2], eval(sys.argv[3])
masks = []
for rows, hidden, p in cases:
    ones = torch.ones(rows, hidden)
    y, _, _ = layer_norm.add_layer_norm_forward(ones, None, torch.ones(hidden), torch.zeros(hidden),
                                                1e-5, p, seed)
    masks.append(y > 0)
torch.save(masks, out)
"""


@pytest.mark.compile
def test_layer_norm_masks_of_cuda_and_triton_differ_as_documented(emulated_backend, tmp_path):
    """README (Backends, dropout): from the same seed the CUDA LayerNorm kernel (Philox-4x32-10,
    32-bit words) and the Triton one (7 rounds, 16-bit draws) keep different elements, each at
    the rate 1 - p. Triton runs under its interpreter in a child process (TRITON_INTERPRET must be
    set before triton is imported)."""
    seed, cases = 0x0123_4567_89AB_CDEF, [(6, 768, 0.1), (9, 100, 0.5), (20, 7, 0.3)]
    out = tmp_path / "masks.pt"
    env = dict(os.environ, PYTHONPATH=str(cuda_emulation.ROOT))
    subprocess.run([sys.executable, "-c", TRITON_LAYER_NORM_MASKS, str(seed), str(out),
                    repr(cases)], check=True, env=env, timeout=600)
    for (rows, hidden, p), triton_keep in zip(cases, torch.load(out)):
        ones = torch.ones(rows, hidden)
        y, _, _ = emulated_backend.add_layer_norm_forward(ones, None, torch.ones(hidden),
                                                          torch.zeros(hidden), 1e-5, p, seed)
        cuda_keep = y > 0
        assert not torch.equal(cuda_keep, triton_keep), (rows, hidden, p)
        for keep in (cuda_keep, triton_keep):
            assert_keep_rate(keep, p, f"LayerNorm rows {rows} hidden {hidden}")


# --------------------------------------------------------------------------------------------
# compile: bias + GELU epilogues (the GEMMs are torch's)
# --------------------------------------------------------------------------------------------

@pytest.mark.compile
@pytest.mark.parametrize("m, k, n, dtype, approximate", [
    (1, 64, 1, F32, "none"),
    (300, 48, 7, F16, "tanh"),       # scalar path, 38 row groups on 8 partial sums
    (37, 64, 768, BF16, "none"),
    (130, 32, 1000, F16, "none"),
    (64, 32, 1000, BF16, "tanh"),
    (5, 16, 4096, F32, "tanh"),
    (17, 24, 4096, F16, "none"),
])
def test_emulated_linear_bias_gelu_matches_reference(emulated_backend, m, k, n, dtype,
                                                     approximate):
    check_linear_gelu(m, k, n, dtype, approximate, emulated_backend, "cpu")


# --------------------------------------------------------------------------------------------
# compile: ModernBERT's rotary embeddings and GeGLU epilogues
# --------------------------------------------------------------------------------------------

@pytest.mark.compile
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("lengths, heads, head_dim, half, dtype, table_dtype, packed, offsets, "
                         "strided", [
    ([5, 0, 9, 1], 2, 32, 16, F16, F32, True, 0, True),      # restarts, a length-0 sequence
    ([6, 11], 3, 64, 32, BF16, BF16, True, [4, 0], True),     # per-sequence offsets
    ([7, 3], 2, 48, 8, F16, F16, False, 2, False),           # rotary dim < head dim, padded
    ([4, 9], 1, 24, 12, F32, F32, True, 1, True),
    ([3, 5], 2, 40, 10, BF16, F32, True, [0, 2], True),     # 10 pairs: scalar when not interleaved
    ([6], 3, 17, 8, F16, F32, False, 0, True),             # odd head dim: the scalar kernel
    ([2, 7], 5, 2, 1, F32, F32, True, 0, False),           # one pair per head
])
def test_emulated_rotary_matches_reference(emulated_backend, lengths, heads, head_dim, half,
                                           dtype, table_dtype, packed, offsets, strided,
                                           interleaved):
    check_rotary(emulated_backend, "cpu", lengths, heads, head_dim, half, dtype, interleaved,
                 packed=packed, offsets=offsets, table_dtype=table_dtype, strided=strided)


@pytest.mark.compile
def test_emulated_rotary_marks_positions_past_the_table_nan(emulated_backend):
    """Per-sequence offsets are not read on the host (no sync), so the kernel checks each row's
    position: past the table its turned dims are NaN (never a read outside cos / sin), the
    pass-through dims and the other rows are still right."""
    x = torch.randn(6, 2, 16)
    cos, sin = torch.rand(4, 4), torch.rand(4, 4)
    positions = torch.tensor([0, 3, 4, 9, 1, -1])
    out = emulated_backend.apply_rotary(x, cos, sin, positions, False, False)
    bad = torch.tensor([False, False, True, True, False, True])
    assert out[bad, :, :8].isnan().all() and not out[~bad].isnan().any()
    assert torch.equal(out[..., 8:], x[..., 8:])
    ok = positions.clamp(0, 3)
    want = reference.rotary_forward(x, cos, sin, ok, False)
    torch.testing.assert_close(out[~bad], want[~bad], rtol=1e-6, atol=1e-6)


@pytest.mark.compile
@pytest.mark.parametrize("m, k, n, dtype, approximate, with_bias", [
    (1, 16, 1, F32, "none", True),
    (37, 24, 40, F16, "tanh", False),
    (70, 48, 33, BF16, "none", True),      # odd N: the scalar path
    (300, 32, 64, F16, "none", True),     # 38 row groups on 8 partial sums
    (17, 64, 768, BF16, "tanh", False),   # ModernBERT-base's N = 1152 / 1.5
    (9, 40, 260, F32, "tanh", True),
])
def test_emulated_linear_geglu_matches_reference(emulated_backend, m, k, n, dtype, approximate,
                                                 with_bias):
    check_geglu(emulated_backend, "cpu", m, k, n, dtype, approximate, with_bias)


@pytest.mark.compile
def test_emulated_geglu_takes_zero_rows(emulated_backend):
    x, weight = torch.randn(0, 24, dtype=BF16), torch.randn(80, 24, dtype=BF16)
    out, pre = emulated_backend.linear_geglu_forward(x, weight, torch.randn(80, dtype=BF16),
                                                     "none")
    dx, dw, db = emulated_backend.linear_geglu_backward(out, x, weight, pre, "none")
    assert out.shape == (0, 40) and dx.shape == (0, 24) and (dw == 0).all() and (db == 0).all()


def _serve_cuda_by(emulated_backend, monkeypatch) -> None:
    """ops is told the emulated backend is "cuda" and serves CPU tensors."""
    from fastbert import ops

    device_reason = ops._device_reason
    monkeypatch.setitem(ops._modules, "cuda", emulated_backend)
    monkeypatch.setattr(ops, "_device_reason",
                        lambda name, device: None if name == "cuda" else device_reason(name,
                                                                                       device))


@pytest.mark.compile
def test_emulated_public_rotary_and_geglu_ops_run_these_kernels(emulated_backend, monkeypatch):
    """fastbert.apply_rotary / fastbert.linear_geglu with backend="cuda" through autograd, on
    CPU tensors: ops is told the emulated backend serves them."""
    _serve_cuda_by(emulated_backend, monkeypatch)
    calls = []
    for name in ("apply_rotary", "linear_geglu_forward", "linear_geglu_backward"):
        run = getattr(emulated_backend, name)
        monkeypatch.setattr(emulated_backend, name,
                            lambda *args, _run=run, _name=name: calls.append(_name) or _run(*args))
    check_public_ops("cpu")
    assert sorted(set(calls)) == ["apply_rotary", "linear_geglu_backward", "linear_geglu_forward"]


@pytest.mark.compile
def test_emulated_public_pre_norm_op_runs_these_kernels(emulated_backend, monkeypatch):
    """fastbert.add_layer_norm(..., return_residual=True, backend="cuda") through autograd, on
    CPU tensors: ops is told the emulated backend serves them."""
    _serve_cuda_by(emulated_backend, monkeypatch)
    calls = []
    for name in ("add_layer_norm_forward", "add_layer_norm_backward"):
        run = getattr(emulated_backend, name)
        monkeypatch.setattr(emulated_backend, name,
                            lambda *args, _run=run, _name=name, **kw: calls.append((_name, kw))
                            or _run(*args, **kw))
    check_public_pre_norm("cpu")
    assert {name for name, _ in calls} == {"add_layer_norm_forward", "add_layer_norm_backward"}
    assert all(kw.get("store_sum") or kw.get("dsum") is not None for _, kw in calls)
