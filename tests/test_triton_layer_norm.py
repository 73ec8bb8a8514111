"""Triton add+LayerNorm: kernels vs fastbert.reference (interpreter tier), ahead-of-time
compilation of every launcher variant (compile tier), BERT shapes on a GPU (gpu tier).
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert import reference
from tests.helpers import (TRITON_TYPE, aot_compile, assert_close_by_rule, assert_fp32_close,
                           check_mixed_dtype_layer_norm, pointers, rule_factor)

pytest.importorskip("triton")
from fastbert.triton import layer_norm as ln  # noqa: E402  (after importorskip)

LOW_PRECISION = (torch.float16, torch.bfloat16)


def make_inputs(rows, hidden, dtype, with_residual, weight_dtype=torch.float32, device="cpu"):
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    residual = torch.randn(rows, hidden, dtype=dtype, device=device) if with_residual else None
    weight = (1.0 + 0.5 * torch.randn(hidden, device=device)).to(weight_dtype)
    bias = (0.5 * torch.randn(hidden, device=device)).to(weight_dtype)
    dy = torch.randn(rows, hidden, dtype=dtype, device=device)
    return x, residual, weight, bias, dy


def exact_and_plain(x, residual, weight, bias, dy, eps, dropout_p=0.0, keep=None):
    """fp64 reference (forward + explicit backward), and plain PyTorch autograd in x's dtype."""
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    y, mean, rstd = reference.add_layer_norm_forward(d(x), d(residual), d(weight), d(bias), eps,
                                                     dropout_p, keep)
    grads = reference.add_layer_norm_backward(d(dy), d(x), d(residual), d(weight), mean, rstd,
                                              dropout_p, keep)
    exact = {"y": y, "mean": mean, "rstd": rstd, "dx": grads[0], "dresidual": grads[1],
             "dweight": grads[2], "dbias": grads[3]}

    leaves = [t.detach().to(x.dtype).requires_grad_() if t is not None else None
              for t in (x, residual, weight, bias)]
    y_plain, _, _ = reference.add_layer_norm_forward(*leaves, eps, dropout_p, keep, upcast=False)
    y_plain.backward(dy)
    px, pres, pw, pb = leaves
    plain = {"y": y_plain.detach(), "dx": px.grad, "dresidual": pres.grad if pres is not None
             else None, "dweight": pw.grad, "dbias": pb.grad}
    return exact, plain


def run_kernels(x, residual, weight, bias, dy, eps, dropout_p=0.0, seed=0):
    y, mean, rstd = ln.add_layer_norm_forward(x, residual, weight, bias, eps, dropout_p, seed)
    dx, dres, dw, db = ln.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, dropout_p,
                                                  seed)
    return {"y": y, "mean": mean, "rstd": rstd, "dx": dx, "dresidual": dres, "dweight": dw,
            "dbias": db}


def check(got, exact, plain, x, residual, weight):
    assert got["y"].dtype == x.dtype and got["dx"].dtype == x.dtype
    assert got["dweight"].dtype == weight.dtype and got["dbias"].dtype == weight.dtype
    assert got["mean"].dtype == torch.float32 and got["rstd"].dtype == torch.float32
    assert (got["dresidual"] is None) == (residual is None)
    # statistics are computed in fp32 from the exact input values, whatever the input dtype
    assert_fp32_close(got["mean"], exact["mean"], "mean")
    assert_fp32_close(got["rstd"], exact["rstd"], "rstd", rtol=2e-5)
    for name in ("y", "dx", "dresidual", "dweight", "dbias"):
        if got[name] is None:
            continue
        assert got[name].shape == exact[name].shape, name
        if got[name].dtype == torch.float32 and x.dtype == torch.float32:
            # dweight/dbias sum over rows: allow their magnitude in the absolute tolerance
            atol = 1e-5 * max(1.0, exact[name].abs().max().item())
            assert_fp32_close(got[name], exact[name], name, atol=atol)
        else:
            assert_close_by_rule(got[name], plain[name], exact[name], name,
                                 factor=rule_factor(got[name].dtype))


# --------------------------------------------------------------------------------------------
# interpreter tier
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 16), (17, 40), (130, 768), (3, 5000), (2, 16384)]


@pytest.mark.interpreter
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_reference(rows, hidden, dtype, with_residual):
    x, residual, weight, bias, dy = make_inputs(rows, hidden, dtype, with_residual)
    got = run_kernels(x, residual, weight, bias, dy, eps=1e-5)
    exact, plain = exact_and_plain(x, residual, weight, bias, dy, eps=1e-5)
    check(got, exact, plain, x, residual, weight)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_weight_in_input_dtype(dtype):
    x, residual, weight, bias, dy = make_inputs(33, 96, dtype, True, weight_dtype=dtype)
    got = run_kernels(x, residual, weight, bias, dy, eps=1e-12)
    exact, plain = exact_and_plain(x, residual, weight, bias, dy, eps=1e-12)
    check(got, exact, plain, x, residual, weight)


@pytest.mark.interpreter
def test_constant_rows_give_bias_not_nan():
    # variance 0: y must be exactly the bias (xhat = 0), and gradients finite
    x = torch.full((4, 64), 3.0)
    _, _, weight, bias, dy = make_inputs(4, 64, torch.float32, False)
    got = run_kernels(x, None, weight, bias, dy, eps=1e-12)
    torch.testing.assert_close(got["y"], bias.expand(4, 64), rtol=0, atol=0)
    for name in ("dx", "dweight", "dbias"):
        assert torch.isfinite(got[name]).all(), name


@pytest.mark.interpreter
def test_zero_rows():
    x, residual, weight, bias, _ = make_inputs(0, 32, torch.float16, True)
    got = run_kernels(x, residual, weight, bias, torch.empty_like(x), eps=1e-5)
    assert got["y"].shape == (0, 32) and got["mean"].shape == (0,)
    assert torch.equal(got["dweight"], torch.zeros(32)) and torch.equal(got["dbias"], torch.zeros(32))


def kept_elements(x, residual, weight, bias, dy, p, seed):
    """The kernel's keep-mask, read off its own gradients: with a residual, d(sum)/dx is
    dresidual / (1 - p) where kept and exactly 0 where dropped (dresidual is nonzero a.s.)."""
    got = run_kernels(x, residual, weight, bias, dy, eps=1e-5, dropout_p=p, seed=seed)
    assert (got["dresidual"] != 0).all()
    return got["dx"] != 0, got


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [7, 2 ** 40 + 12345])  # 32- and 64-bit seeds
# a whole row; a row in MAX_BLOCK_N chunks; a width that is no multiple of 8 (dropout's group)
@pytest.mark.parametrize("rows,hidden", [(64, 256), (4, ln.MAX_BLOCK_N + 904), (300, 37)])
def test_dropout(dtype, seed, rows, hidden):
    p = 0.3
    x, residual, weight, bias, dy = make_inputs(rows, hidden, dtype, True)
    keep, got = kept_elements(x, residual, weight, bias, dy, p, seed)

    # keep rate: binomial with n >= 11100, std <= 0.0044; 5 sigma
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * ((p * (1 - p)) / keep.numel()) ** 0.5, rate

    # forward used the same mask with 1/(1-p) scaling, and every gradient is consistent with it
    exact, plain = exact_and_plain(x, residual, weight, bias, dy, 1e-5, p, keep)
    check(got, exact, plain, x, residual, weight)

    # same seed -> bitwise the same; another seed -> another mask
    again = run_kernels(x, residual, weight, bias, dy, eps=1e-5, dropout_p=p, seed=seed)
    for name in got:
        assert torch.equal(got[name], again[name]), name
    other_keep, _ = kept_elements(x, residual, weight, bias, dy, p, seed + 1)
    assert not torch.equal(keep, other_keep)


@pytest.mark.interpreter
def test_dropout_columns_sharing_a_philox_call_are_independent():
    # one philox call serves 8 consecutive columns: each must take its own 16-bit draw, so each
    # pair of them is kept together with probability (1 - p)^2, not 1 - p
    rows, hidden, p = 64, 256, 0.3
    keep, _ = kept_elements(*make_inputs(rows, hidden, torch.float32, True), p, seed=5)
    lanes = keep.view(-1, 8).float()
    pairs = lanes.shape[0]
    for a in range(8):
        for b in range(a + 1, 8):
            both = (lanes[:, a] * lanes[:, b]).mean().item()
            q = (1 - p) ** 2
            assert abs(both - q) < 5 * (q * (1 - q) / pairs) ** 0.5, (a, b, both)


@pytest.mark.interpreter
def test_dropout_without_residual():
    rows, hidden, p, seed = 16, 128, 0.5, 99
    x, residual, weight, bias, dy = make_inputs(rows, hidden, torch.float32, True)
    keep, _ = kept_elements(x, residual, weight, bias, dy, p, seed)  # mask depends on seed only
    got = run_kernels(x, None, weight, bias, dy, eps=1e-5, dropout_p=p, seed=seed)
    exact, plain = exact_and_plain(x, None, weight, bias, dy, 1e-5, p, keep)
    check(got, exact, plain, x, None, weight)


def run_pre_norm_kernels(x, residual, weight, bias, dy, dsum, eps, dropout_p=0.0, seed=0):
    """The pre-norm form: the forward also stores the sum, the backward takes its gradient."""
    y, mean, rstd, s = ln.add_layer_norm_forward(x, residual, weight, bias, eps, dropout_p, seed,
                                                 store_sum=True)
    dx, dres, dw, db = ln.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, dropout_p,
                                                  seed, dsum=dsum)
    return {"y": y, "sum": s, "mean": mean, "rstd": rstd, "dx": dx, "dresidual": dres,
            "dweight": dw, "dbias": db}


def exact_and_plain_pre_norm(x, residual, weight, bias, dy, dsum, eps, dropout_p=0.0, keep=None):
    """exact_and_plain with the sum as a second output and dsum reaching it."""
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    y, mean, rstd = reference.add_layer_norm_forward(d(x), d(residual), d(weight), d(bias), eps,
                                                     dropout_p, keep)
    s = reference.prenorm_sum(d(x), d(residual), dropout_p, keep, torch.float64)
    grads = reference.add_layer_norm_backward(d(dy), d(x), d(residual), d(weight), mean, rstd,
                                              dropout_p, keep, dsum=d(dsum))
    exact = {"y": y, "sum": s, "mean": mean, "rstd": rstd, "dx": grads[0],
             "dresidual": grads[1], "dweight": grads[2], "dbias": grads[3]}
    leaves = [t.detach().to(x.dtype).requires_grad_() if t is not None else None
              for t in (x, residual, weight, bias)]
    y_plain, _, _ = reference.add_layer_norm_forward(*leaves, eps, dropout_p, keep, upcast=False)
    s_plain = reference.prenorm_sum(leaves[0], leaves[1], dropout_p, keep, x.dtype)
    torch.autograd.backward([y_plain, s_plain], [dy, dsum])
    px, pres, pw, pb = leaves
    plain = {"y": y_plain.detach(), "sum": s_plain.detach(), "dx": px.grad,
             "dresidual": pres.grad if pres is not None else None, "dweight": pw.grad,
             "dbias": pb.grad}
    return exact, plain


@pytest.mark.interpreter
@pytest.mark.parametrize("rows,hidden", [(17, 40), (130, 768), (3, 5000)])  # 5000: in chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_pre_norm_form_matches_reference(rows, hidden, dtype, with_residual):
    x, residual, weight, bias, dy = make_inputs(rows, hidden, dtype, with_residual)
    dsum = torch.randn_like(dy)
    got = run_pre_norm_kernels(x, residual, weight, bias, dy, dsum, eps=1e-5)
    exact, plain = exact_and_plain_pre_norm(x, residual, weight, bias, dy, dsum, eps=1e-5)
    assert got["sum"].dtype == x.dtype
    check(got, exact, plain, x, residual, weight)
    if dtype == torch.float32:
        assert_fp32_close(got["sum"], exact["sum"], "sum")
    else:
        assert_close_by_rule(got["sum"], plain["sum"], exact["sum"], "sum",
                             factor=rule_factor(dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("rows,hidden", [(64, 256), (4, ln.MAX_BLOCK_N + 904)])
def test_pre_norm_form_with_dropout(rows, hidden):
    p, seed = 0.3, 11
    x, residual, weight, bias, dy = make_inputs(rows, hidden, torch.float32, True)
    dsum = torch.randn_like(dy)
    keep, _ = kept_elements(x, residual, weight, bias, dy, p, seed)  # the plain form's mask
    got = run_pre_norm_kernels(x, residual, weight, bias, dy, dsum, 1e-5, p, seed)
    exact, plain = exact_and_plain_pre_norm(x, residual, weight, bias, dy, dsum, 1e-5, p, keep)
    check(got, exact, plain, x, residual, weight)
    assert_fp32_close(got["sum"], exact["sum"], "sum")


@pytest.mark.interpreter
def test_pre_norm_public_op_autograd():
    """return_residual=True on the Triton backend: (y, s) and every gradient, with gradients
    reaching both outputs, then the sum alone, against the torch backend."""
    x, residual, weight, bias, dy = make_inputs(18, 40, torch.float32, True)
    dsum = torch.randn_like(dy)
    results = {}
    for backend in ("triton", "torch"):
        for uses in ("both", "sum"):
            leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
            y, s = fastbert.add_layer_norm(*(t.view(2, 9, 40) if t.dim() == 2 else t
                                             for t in leaves), 1e-5, return_residual=True,
                                           backend=backend)
            loss = (s * dsum.view(2, 9, 40)).sum()
            if uses == "both":
                loss = loss + (y * dy.view(2, 9, 40)).sum()
            loss.backward()
            results[backend, uses] = [y.detach(), s.detach()] + [t.grad for t in leaves]
    for uses in ("both", "sum"):
        for got, want in zip(results["triton", uses], results["torch", uses]):
            if uses == "sum" and want is None:
                continue
            assert_fp32_close(got, want, uses, atol=1e-5 * max(1.0, want.abs().max().item()))
    assert results["triton", "sum"][4] is None or not results["triton", "sum"][4].any()


@pytest.mark.interpreter
@pytest.mark.parametrize("low", LOW_PRECISION)
@pytest.mark.parametrize("dropout_p, pre_norm", [(0.0, False), (0.2, True), (0.0, True)])
@pytest.mark.parametrize("hidden", [96, 5000])  # whole row, chunked
def test_mixed_dtypes_read_as_they_are(low, dropout_p, pre_norm, hidden):
    """CUDA autocast's norm: a bf16/fp16 x beside the fp32 residual stream, y (and the pre-norm
    sum) in fp32, each gradient in its input's dtype, with no cast pass (the kernels load each
    pointer in its own dtype)."""
    check_mixed_dtype_layer_norm(ln, rows=5, hidden=hidden, low=low, dropout_p=dropout_p,
                                 pre_norm=pre_norm, factor=rule_factor(low))


@pytest.mark.interpreter
def test_dweight_dbias_deterministic():
    x, residual, weight, bias, dy = make_inputs(130, 200, torch.float16, True)
    first = run_kernels(x, residual, weight, bias, dy, eps=1e-5)
    second = run_kernels(x, residual, weight, bias, dy, eps=1e-5)
    assert torch.equal(first["dweight"], second["dweight"])
    assert torch.equal(first["dbias"], second["dbias"])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_op_autograd(dtype):
    x, residual, weight, bias, dy = make_inputs(18, 40, dtype, True)
    x3, r3, dy3 = x.view(2, 9, 40), residual.view(2, 9, 40), dy.view(2, 9, 40)
    leaves = [t.clone().requires_grad_() for t in (x3, r3, weight, bias)]
    y = fastbert.add_layer_norm(*leaves, 1e-5, backend="triton")
    y.backward(dy3)
    got = {"y": y.detach().view(18, 40), "dx": leaves[0].grad.view(18, 40),
           "dresidual": leaves[1].grad.view(18, 40), "dweight": leaves[2].grad,
           "dbias": leaves[3].grad}
    exact, plain = exact_and_plain(x, residual, weight, bias, dy, 1e-5)
    for name, value in got.items():
        if dtype == torch.float32:
            assert_fp32_close(value, exact[name], name, atol=1e-5 * max(1.0, exact[name].abs().max().item()))
        else:
            assert_close_by_rule(value, plain[name], exact[name], name,
                                 factor=rule_factor(value.dtype))


@pytest.mark.interpreter
def test_public_op_dropout_reproducible():
    x, residual, weight, bias, dy = make_inputs(32, 64, torch.float32, True)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(fastbert.add_layer_norm(x, residual, weight, bias, dropout_p=0.2,
                                            backend="triton"))
    assert torch.equal(outs[0], outs[1])
    no_dropout = fastbert.add_layer_norm(x, residual, weight, bias, backend="triton")
    assert not torch.equal(outs[0], no_dropout)


@pytest.mark.interpreter
@pytest.mark.parametrize("with_residual", [True, False])
def test_opcheck_and_compile(with_residual):
    x, residual, weight, bias, dy = make_inputs(6, 40, torch.float32, with_residual)
    leaves = [t.clone().requires_grad_() if t is not None else None
              for t in (x, residual, weight, bias)]
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_fwd.default,
                          (*leaves, 1e-5, 0.0, None, "triton"))
    _, mean, rstd = ln.add_layer_norm_forward(x, residual, weight, bias, 1e-5, 0.0, 0)
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_bwd.default,
                          (dy, x, residual, weight, mean, rstd, 0.0, None, "triton"))
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_residual_fwd.default,
                          (*leaves, 1e-5, 0.0, None, "triton"))
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_bwd.default,
                          (dy, x, residual, weight, mean, rstd, 0.0, None, "triton",
                           torch.randn_like(dy)))
    compiled = torch.compile(lambda *a: fastbert.add_layer_norm(*a, 1e-5, backend="triton"),
                             fullgraph=True, backend="eager")
    expected = fastbert.add_layer_norm(x, residual, weight, bias, 1e-5, backend="torch")
    assert_fp32_close(compiled(x, residual, weight, bias), expected, "compiled y")


# --------------------------------------------------------------------------------------------
# always: what the backend says it cannot serve
# --------------------------------------------------------------------------------------------

def test_unsupported_reasons():
    assert ln.unsupported(torch.float16, 768, 0.1) is None
    assert ln.unsupported(torch.float32, ln.MAX_HIDDEN, 0.0) is None
    assert "hidden" in ln.unsupported(torch.float32, ln.MAX_HIDDEN + 1, 0.0)
    assert "float64" in ln.unsupported(torch.float64, 768, 0.0)


# --------------------------------------------------------------------------------------------
# compile tier: every variant the launchers produce, for sm_80 and sm_90
# --------------------------------------------------------------------------------------------

def _block_sizes():
    # every (BLOCK_N, num_warps, WHOLE_ROW) the launcher picks up to MAX_HIDDEN
    return sorted({ln._row_config(h) for h in [2 ** i for i in range(15)]
                   + [ln.MAX_BLOCK_N + 1, ln.MAX_HIDDEN]})


def _fwd_signature(dtype, weight_dtype, seed_type, stream_dtype=None):
    """stream_dtype: the residual's, y's and the sum's dtype where it is not x's (autocast's
    bf16 x beside an fp32 residual stream)."""
    t, w = TRITON_TYPE[dtype], TRITON_TYPE[weight_dtype]
    r = TRITON_TYPE[stream_dtype or dtype]
    return {"X": f"*{t}", "RESIDUAL": f"*{r}", "W": f"*{w}", "B": f"*{w}", "Y": f"*{r}",
            "MEAN": "*fp32", "RSTD": "*fp32", "SUM": f"*{r}", "hidden": "i32", "eps": "fp32",
            "dropout_p": "fp32", "seed": seed_type}


def _bwd_signature(dtype, weight_dtype, seed_type, stream_dtype=None):
    t, w = TRITON_TYPE[dtype], TRITON_TYPE[weight_dtype]
    r = TRITON_TYPE[stream_dtype or dtype]
    return {"DY": f"*{r}", "X": f"*{t}", "RESIDUAL": f"*{r}", "W": f"*{w}", "MEAN": "*fp32",
            "RSTD": "*fp32", "DX": f"*{t}", "DRESIDUAL": f"*{r}", "DW_PARTIAL": "*fp32",
            "DB_PARTIAL": "*fp32", "DSUM": f"*{r}", "rows": "i32", "hidden": "i32",
            "rows_per_program": "i32",
            "dropout_p": "fp32", "seed": seed_type}


@pytest.mark.compile
@pytest.mark.parametrize("capability", [80, 90])
def test_compiles_ahead_of_time(capability):
    # the pre-norm form's flag: the forward stores the sum, the backward takes its gradient
    kernels = [(ln._add_layer_norm_fwd_kernel, _fwd_signature, "STORE_SUM"),
               (ln._add_layer_norm_bwd_kernel, _bwd_signature, "HAS_DSUM")]
    # every dtype pairing and flag combination at BERT's row width ...
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for weight_dtype in sorted({dtype, torch.float32}, key=str):
            for has_residual in (False, True):
                for has_dropout in (False, True):
                    seed_type = "i64" if has_dropout else "i32"
                    block_n, num_warps, whole_row = ln._row_config(768)
                    for kernel, signature, sum_flag in kernels:
                        for with_sum in (False, True):
                            sig = signature(dtype, weight_dtype, seed_type)
                            aot_compile(kernel, sig,
                                        {"HAS_RESIDUAL": has_residual,
                                         "HAS_DROPOUT": has_dropout, "BLOCK_N": block_n,
                                         "WHOLE_ROW": whole_row, sum_flag: with_sum},
                                        capability, num_warps,
                                        aligned=pointers(sig) + ["hidden"])
    # ... autocast's mixed inputs (a half x beside the fp32 residual stream, fp32 out) ...
    block_n, num_warps, whole_row = ln._row_config(768)
    for dtype in LOW_PRECISION:
        for has_dropout in (False, True):
            seed_type = "i64" if has_dropout else "i32"
            for kernel, signature, sum_flag in kernels:
                for with_sum in (False, True):
                    sig = signature(dtype, torch.float32, seed_type, torch.float32)
                    aot_compile(kernel, sig,
                                {"HAS_RESIDUAL": True, "HAS_DROPOUT": has_dropout,
                                 "BLOCK_N": block_n, "WHOLE_ROW": whole_row, sum_flag: with_sum},
                                capability, num_warps, aligned=pointers(sig) + ["hidden"])
    # ... and every row width the launcher can pick, with all features on
    for block_n, num_warps, whole_row in _block_sizes():
        for kernel, signature, sum_flag in kernels:
            sig = signature(torch.bfloat16, torch.float32, "i64")
            aot_compile(kernel, sig,
                        {"HAS_RESIDUAL": True, "HAS_DROPOUT": True, "BLOCK_N": block_n,
                         "WHOLE_ROW": whole_row, sum_flag: True},
                        capability, num_warps, aligned=pointers(sig) + ["hidden"])


# --------------------------------------------------------------------------------------------
# gpu tier: BERT shapes
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [768, 1024])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_bert_shapes_gpu(hidden, dtype):
    x, residual, weight, bias, dy = make_inputs(16384, hidden, dtype, True, device="cuda")
    got = run_kernels(x, residual, weight, bias, dy, eps=1e-12)
    exact, plain = exact_and_plain(x, residual, weight, bias, dy, eps=1e-12)
    check(got, exact, plain, x, residual, weight)
    again = run_kernels(x, residual, weight, bias, dy, eps=1e-12)
    assert torch.equal(got["dweight"], again["dweight"]) and torch.equal(got["dbias"], again["dbias"])


@pytest.mark.gpu
def test_bert_dropout_gpu():
    x, residual, weight, bias, dy = make_inputs(16384, 768, torch.bfloat16, True, device="cuda")
    keep, got = kept_elements(x, residual, weight, bias, dy, 0.1, seed=2 ** 50 + 3)
    assert abs(keep.float().mean().item() - 0.9) < 2e-3
    exact, plain = exact_and_plain(x, residual, weight, bias, dy, 1e-5, 0.1, keep)
    check(got, exact, plain, x, residual, weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p, pre_norm", [(0.0, False), (0.1, True)])
def test_autocast_mixed_dtypes_gpu(dropout_p, pre_norm):
    """CUDA autocast's norm at BERT-base width: bf16 x beside the fp32 residual stream."""
    check_mixed_dtype_layer_norm(ln, device="cuda", rows=4096, hidden=768, dropout_p=dropout_p,
                                 pre_norm=pre_norm)
