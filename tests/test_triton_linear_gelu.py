"""Triton bias+GELU GEMM: kernels vs fastbert.reference (interpreter tier), ahead-of-time
compilation of every launcher variant (compile tier), the BERT FFN shape on a GPU (gpu tier)."""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert import reference
from tests.helpers import (TRITON_TYPE, aot_compile, assert_close_by_rule, assert_fp32_close,
                           pointers, rule_factor)

pytest.importorskip("triton")
import triton  # noqa: E402  (after importorskip)
import triton.language as tl  # noqa: E402
from fastbert.triton import linear_gelu as lg  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATE = ["none", "tanh"]


def make_inputs(m, n, k, dtype, device="cpu"):
    x = torch.randn(m, k, dtype=dtype, device=device)
    # scaled like nn.Linear so the pre-activation is O(1), where GELU bends
    weight = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    bias = (0.5 * torch.randn(n, device=device)).to(dtype)
    dout = torch.randn(m, n, dtype=dtype, device=device)
    return x, weight, bias, dout


def exact_and_plain(x, weight, bias, dout, approximate):
    """fp64 reference (forward + explicit backward), and plain PyTorch autograd in x's dtype."""
    d = [t.double() for t in (x, weight, bias, dout)]
    out, pre = reference.linear_bias_gelu_forward(d[0], d[1], d[2], approximate)
    dx, dw, db = reference.linear_bias_gelu_backward(d[3], d[0], d[1], pre, approximate)
    exact = {"out": out, "pre": pre, "dx": dx, "dweight": dw, "dbias": db}

    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out_plain, pre_plain = reference.linear_bias_gelu_forward(*leaves, approximate, upcast=False)
    out_plain.backward(dout)
    plain = {"out": out_plain.detach(), "pre": pre_plain.detach(), "dx": leaves[0].grad,
             "dweight": leaves[1].grad, "dbias": leaves[2].grad}
    return exact, plain


def run_kernels(x, weight, bias, dout, approximate):
    out, pre = lg.linear_bias_gelu_forward(x, weight, bias, approximate)
    dx, dw, db = lg.linear_bias_gelu_backward(dout, x, weight, pre, approximate)
    return {"out": out, "pre": pre, "dx": dx, "dweight": dw, "dbias": db}


def check(got, exact, plain, x):
    for name, value in got.items():
        assert value.dtype == x.dtype, name
        assert value.shape == exact[name].shape, name
        if x.dtype == torch.float32:
            # GEMM outputs and dbias are sums: allow their magnitude in the absolute tolerance
            atol = 1e-5 * max(1.0, exact[name].abs().max().item())
            assert_fp32_close(value, exact[name], name, atol=atol)
        else:
            assert_close_by_rule(value, plain[name], exact[name], name,
                                 factor=rule_factor(value.dtype))


# --------------------------------------------------------------------------------------------
# interpreter tier (one 32x32x32 tile config, so these shapes span several partial tiles)
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 16, 16), (17, 40, 33), (130, 70, 40), (33, 40, 768), (17, 768, 40)]  # (M, N, K)


@triton.jit
def _gelu_half_kernel(X, Y, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(Y + offsets, lg._gelu(tl.load(X + offsets), False, True))


@pytest.mark.interpreter
def test_half_output_erf_gelu_accuracy():
    # fp16/bf16 outputs take the one-polynomial erfc (Abramowitz & Stegun 7.1.26): within 1e-6
    # of the exact GELU, and within half an fp16 rounding step (2**-12 relative) where the
    # output is not tiny
    x = torch.linspace(-12, 12, 8192)
    y = torch.empty_like(x)
    _gelu_half_kernel[(1,)](x, y, N=x.numel())
    exact = torch.nn.functional.gelu(x.double())
    error = (y.double() - exact).abs()
    assert error.max().item() < 1e-6
    big = exact.abs() > 1e-3
    assert (error[big] / exact[big].abs()).max().item() < 2.0 ** -12


@pytest.mark.interpreter
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_matches_reference(m, n, k, dtype, approximate):
    x, weight, bias, dout = make_inputs(m, n, k, dtype)
    got = run_kernels(x, weight, bias, dout, approximate)
    exact, plain = exact_and_plain(x, weight, bias, dout, approximate)
    check(got, exact, plain, x)


@pytest.mark.interpreter
def test_dbias_deterministic():
    # more rows than one dGELU row range, so several partials are reduced
    x, weight, bias, dout = make_inputs(lg.BWD_BLOCK_M * 3 + 5, 150, 24, torch.float16)
    assert lg.backward_launch(x.shape[0], 150)[0][0] > 1
    first = run_kernels(x, weight, bias, dout, "none")
    second = run_kernels(x, weight, bias, dout, "none")
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_pre_activation_without_gradient(dtype):
    x, weight, bias, _ = make_inputs(17, 40, 33, dtype)
    with_pre, pre = lg.linear_bias_gelu_forward(x, weight, bias, "none")
    out, empty = lg.linear_bias_gelu_forward(x, weight, bias, "none", store_pre=False)
    assert empty.shape == (0, 40) and empty.dtype == dtype and pre.shape == (17, 40)
    assert torch.equal(out, with_pre)  # the same kernel math, one store fewer


def test_autotune_key_is_a_row_bucket():
    # the key holds a power-of-two bucket of M, not M itself: padded batch shapes share choices
    assert "M" not in lg._linear_bias_gelu_fwd_kernel.keys
    assert "M_BUCKET" in lg._linear_bias_gelu_fwd_kernel.keys
    assert [lg.rows_bucket(m) for m in (0, 1, 3, 4096, 4097, 3 * 1000)] == [1, 1, 4, 4096, 8192,
                                                                            4096]


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid's exp(-2u) -> inf -> 0
def test_large_pre_activations_stay_finite():
    # |pre| ~ 100: erf/sigmoid saturate; GELU is ~x or ~0 and its gradient ~1 or ~0, never NaN
    x, weight, bias, dout = make_inputs(9, 20, 16, torch.float32)
    bias = bias * 400.0
    for approximate in APPROXIMATE:
        got = run_kernels(x, weight, bias, dout, approximate)
        exact, plain = exact_and_plain(x, weight, bias, dout, approximate)
        check(got, exact, plain, x)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_public_op_autograd(dtype, approximate):
    x, weight, bias, dout = make_inputs(18, 40, 24, dtype)
    leaves = [x.view(2, 9, 24).clone().requires_grad_(), weight.clone().requires_grad_(),
              bias.clone().requires_grad_()]
    out = fastbert.linear_bias_gelu(*leaves, approximate=approximate, backend="triton")
    assert out.shape == (2, 9, 40)
    out.backward(dout.view(2, 9, 40))
    got = {"out": out.detach().view(18, 40), "dx": leaves[0].grad.view(18, 24),
           "dweight": leaves[1].grad, "dbias": leaves[2].grad}
    exact, plain = exact_and_plain(x, weight, bias, dout, approximate)
    check(got, exact, plain, x)


@pytest.mark.interpreter
def test_opcheck_and_compile():
    x, weight, bias, dout = make_inputs(6, 40, 24, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    torch.library.opcheck(torch.ops.fastbert.linear_bias_gelu_fwd.default,
                          (*leaves, "none", True, "triton"))
    _, pre = lg.linear_bias_gelu_forward(x, weight, bias, "none")
    torch.library.opcheck(torch.ops.fastbert.linear_bias_gelu_bwd.default,
                          (dout, x, weight, pre, "none", "triton"))
    compiled = torch.compile(lambda *a: fastbert.linear_bias_gelu(*a, backend="triton"),
                             fullgraph=True, backend="eager")
    expected = fastbert.linear_bias_gelu(x, weight, bias, backend="torch")
    assert_fp32_close(compiled(x, weight, bias), expected, "compiled out")


# --------------------------------------------------------------------------------------------
# always: what the backend says it cannot serve
# --------------------------------------------------------------------------------------------

def test_unsupported_reasons():
    assert lg.unsupported(torch.bfloat16, 768, 3072) is None
    assert "float64" in lg.unsupported(torch.float64, 768, 3072)
    assert lg.unsupported(torch.float16, 0, 3072) is not None


def test_one_config_under_interpreter_several_on_gpu():
    assert len(lg.INTERPRETER_CONFIGS) == 1
    assert len(lg.GPU_CONFIGS) > 1
    assert lg.CONFIGS is (lg.INTERPRETER_CONFIGS if lg.INTERPRET else lg.GPU_CONFIGS)


# --------------------------------------------------------------------------------------------
# compile tier: every variant the launchers produce, for sm_80 and sm_90
# --------------------------------------------------------------------------------------------

def _fwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"X": f"*{t}", "W": f"*{t}", "BIAS": f"*{t}", "OUT": f"*{t}", "PRE": f"*{t}",
            "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32"}


def _bwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"DOUT": f"*{t}", "PRE": f"*{t}", "DPRE": f"*{t}", "DBIAS_PARTIAL": "*fp32",
            "M": "i32", "N": "i32", "rows_per_program": "i32"}


# Opt-in shared memory per block: A100 (sm_80) and H100 (sm_90).
SHARED_MEMORY = {80: 166912, 90: 232448}


def test_shared_memory_pruning():
    fp16 = lg.configs_that_fit(lg.GPU_CONFIGS, 2, SHARED_MEMORY[80])
    fp32 = lg.configs_that_fit(lg.GPU_CONFIGS, 4, SHARED_MEMORY[80])
    assert fp16 == lg.GPU_CONFIGS  # every 16-bit config fits an A100
    assert 0 < len(fp32) < len(fp16)  # the big fp32 tiles do not
    assert all(lg.pipeline_shared_memory(c, 4) <= SHARED_MEMORY[80] for c in fp32)
    assert len(lg.configs_that_fit(lg.GPU_CONFIGS, 4, 1024)) == 1  # never none


@pytest.mark.compile
@pytest.mark.parametrize("capability", [80, 90])
def test_compiles_ahead_of_time(capability):
    assert not lg.INTERPRET  # the compile tier sees the GPU autotune configs
    for dtype in DTYPES:
        element_size = torch.empty(0, dtype=dtype).element_size()
        fitting = lg.configs_that_fit(lg.GPU_CONFIGS, element_size, SHARED_MEMORY[capability])
        for approximate, store_pre in (("none", True), ("tanh", True), ("none", False)):
            flags = lg.forward_constexprs(dtype, approximate, store_pre)
            # the epilogue flags are independent of the tiles: all tiles with exact GELU, one with
            # tanh, one without the pre-activation store
            configs = fitting if approximate == "none" and store_pre else fitting[:1]
            for config in configs:
                sig = _fwd_signature(dtype)
                compiled = aot_compile(lg._linear_bias_gelu_fwd_kernel, sig,
                                       dict(flags, **config.kwargs), capability, config.num_warps,
                                       config.num_stages, aligned=pointers(sig) + ["M", "N", "K"])
                # the pruning's estimate must keep out every config that could not launch
                assert compiled.metadata.shared <= SHARED_MEMORY[capability], (
                    f"{config}: {compiled.metadata.shared} B shared memory on sm_{capability}")
            sig = _bwd_signature(dtype)
            aot_compile(lg._gelu_bwd_dbias_kernel, sig,
                        {"APPROXIMATE_TANH": approximate == "tanh", "BLOCK_M": lg.BWD_BLOCK_M,
                         "BLOCK_N": lg.BWD_BLOCK_N}, capability, lg.BWD_NUM_WARPS,
                        aligned=pointers(sig) + ["M", "N"])


# --------------------------------------------------------------------------------------------
# gpu tier: BERT FFN up-projection, 16k tokens x 768 -> 3072
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_bert_ffn_gpu(dtype, approximate):
    x, weight, bias, dout = make_inputs(16384, 3072, 768, dtype, device="cuda")
    got = run_kernels(x, weight, bias, dout, approximate)
    exact, plain = exact_and_plain(x, weight, bias, dout, approximate)
    check(got, exact, plain, x)
    again = run_kernels(x, weight, bias, dout, approximate)
    assert torch.equal(got["dbias"], again["dbias"])


@pytest.mark.gpu
def test_odd_shapes_gpu():
    for m, n, k in [(1, 16, 16), (17, 40, 33), (130, 70, 40), (1000, 3000, 700)]:
        for dtype in DTYPES:
            x, weight, bias, dout = make_inputs(m, n, k, dtype, device="cuda")
            got = run_kernels(x, weight, bias, dout, "none")
            exact, plain = exact_and_plain(x, weight, bias, dout, "none")
            check(got, exact, plain, x)
