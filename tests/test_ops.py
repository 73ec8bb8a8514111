"""Tier 1: the ops layer on the torch backend — reference backward formulas, gradcheck, opcheck,
torch.compile, validation errors and backend choice."""
import math
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import layer_norm, linear_gelu, ops, reference
from fastbert.torch_backend import TorchBackend
from tests.helpers import check_mixed_dtype_layer_norm, random_padding_mask

f64 = torch.float64


def _attn_inputs(b=2, sq=5, sk=7, h=3, d=8, dtype=f64, grad=True):
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, requires_grad=grad) for s in (sq, sk, sk))
    return q, k, v


# --------------------------------------------------------------------------------------------
# explicit backward formulas vs autograd of the reference forward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(5, 5), (3, 7), (7, 3), (1, 6)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_backward_formula_matches_autograd(causal, sq, sk, dropout_p):
    q, k, v = _attn_inputs(sq=sq, sk=sk)
    mask = random_padding_mask(2, sk, mode="with_empty")
    keep = torch.rand(2, 3, sq, sk) >= dropout_p if dropout_p else None
    out, lse = reference.attention_forward(q, k, v, mask, causal, dropout_p, None, keep)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), dout)
    got = reference.attention_backward(dout, q, k, v, out.detach(), lse, mask, causal, dropout_p,
                                       None, keep)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, msg=f"d{name}")
    # the fully padded batch row gives zeros, finite lse = +inf, zero grads
    assert torch.all(out[0] == 0) and torch.isposinf(lse[0]).all()
    for g in got:
        assert not torch.isnan(g).any()
    assert torch.all(got[0][0] == 0)


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_add_layer_norm_backward_formula_matches_autograd(with_residual, dropout_p):
    x = torch.randn(6, 10, dtype=f64, requires_grad=True)
    res = torch.randn(6, 10, dtype=f64, requires_grad=True) if with_residual else None
    w = torch.randn(10, dtype=f64, requires_grad=True)
    bias = torch.randn(10, dtype=f64, requires_grad=True)
    keep = torch.rand(6, 10) >= dropout_p if dropout_p else None
    y, mean, rstd = reference.add_layer_norm_forward(x, res, w, bias, 1e-5, dropout_p, keep)
    dy = torch.randn_like(y)
    inputs = [x, w, bias] + ([res] if with_residual else [])
    want = torch.autograd.grad(y, inputs, dy)
    dx, dres, dw, db = reference.add_layer_norm_backward(dy, x, res, w, mean, rstd, dropout_p,
                                                         keep)
    got = [dx, dw, db] + ([dres] if with_residual else [])
    assert (dres is None) == (not with_residual)
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt)


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_add_layer_norm_backward_formula_with_residual_output(with_residual, dropout_p):
    """The pre-norm form: a gradient reaching the sum s = dropout(x) + residual as an output
    (dsum) joins the one through the norm."""
    x = torch.randn(6, 10, dtype=f64, requires_grad=True)
    res = torch.randn(6, 10, dtype=f64, requires_grad=True) if with_residual else None
    w = torch.randn(10, dtype=f64, requires_grad=True)
    bias = torch.randn(10, dtype=f64, requires_grad=True)
    keep = torch.rand(6, 10) >= dropout_p if dropout_p else None
    y, mean, rstd = reference.add_layer_norm_forward(x, res, w, bias, 1e-5, dropout_p, keep)
    s = reference.prenorm_sum(x, res, dropout_p, keep, f64)
    dy, dsum = torch.randn_like(y), torch.randn_like(y)
    inputs = [x, w, bias] + ([res] if with_residual else [])
    want = torch.autograd.grad((y * dy).sum() + (s * dsum).sum(), inputs)
    dx, dres, dw, db = reference.add_layer_norm_backward(dy, x, res, w, mean, rstd, dropout_p,
                                                         keep, dsum=dsum)
    got = [dx, dw, db] + ([dres] if with_residual else [])
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_bias_gelu_backward_formula_matches_autograd(approximate):
    x = torch.randn(3, 4, 6, dtype=f64, requires_grad=True)
    w = torch.randn(9, 6, dtype=f64, requires_grad=True)
    bias = torch.randn(9, dtype=f64, requires_grad=True)
    out, pre = reference.linear_bias_gelu_forward(x, w, bias, approximate)
    torch.testing.assert_close(out, torch.nn.functional.gelu(x @ w.T + bias, approximate=approximate))
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (x, w, bias), dout)
    got = reference.linear_bias_gelu_backward(dout, x, w, pre.detach(), approximate)
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt)


# --------------------------------------------------------------------------------------------
# fp64 gradcheck through the public ops (custom op + registered autograd + explicit backward)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_attention_gradcheck(causal, dropout_p):
    q, k, v = _attn_inputs(b=2, sq=3, sk=4, h=2, d=4)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.int32)

    def fn(q, k, v):
        torch.manual_seed(1)  # same dropout pattern on every call of gradcheck
        return fastbert.attention(q, k, v, mask, causal=causal, dropout_p=dropout_p,
                                  backend="torch")

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm_gradcheck(with_residual):
    x = torch.randn(4, 7, dtype=f64, requires_grad=True)
    res = torch.randn(4, 7, dtype=f64, requires_grad=True) if with_residual else None
    w = torch.randn(7, dtype=f64, requires_grad=True)
    b = torch.randn(7, dtype=f64, requires_grad=True)

    def fn(x, res, w, b):
        torch.manual_seed(1)
        return fastbert.add_layer_norm(x, res, w, b, 1e-5, dropout_p=0.3, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, res, w, b))


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_add_layer_norm_return_residual_gradcheck(with_residual, dropout_p):
    """Both outputs of the pre-norm form, (y, s), and gradients reaching either or both."""
    x = torch.randn(4, 7, dtype=f64, requires_grad=True)
    res = torch.randn(4, 7, dtype=f64, requires_grad=True) if with_residual else None
    w = torch.randn(7, dtype=f64, requires_grad=True)
    b = torch.randn(7, dtype=f64, requires_grad=True)

    def fn(x, res, w, b):
        torch.manual_seed(1)
        return fastbert.add_layer_norm(x, res, w, b, 1e-5, dropout_p=dropout_p,
                                       return_residual=True, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, res, w, b))
    assert torch.autograd.gradcheck(lambda *a: fn(*a)[1] * 2.0, (x, res, w, b))  # s only
    torch.manual_seed(1)
    y, s = fn(x, res, w, b)
    torch.manual_seed(1)  # the same dropout draw: the same y as the plain form
    torch.testing.assert_close(y, fastbert.add_layer_norm(x, res, w, b, 1e-5,
                                                          dropout_p=dropout_p, backend="torch"),
                               rtol=0, atol=0)
    if dropout_p == 0.0:
        torch.testing.assert_close(s, x + res if with_residual else x, rtol=0, atol=0)
        assert with_residual or s.data_ptr() != x.data_ptr()  # never an alias of x


def test_add_layer_norm_return_residual_fp32_inference_and_autocast():
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    with torch.no_grad():
        y, s = fastbert.add_layer_norm(x, r, w, None, 1e-5, return_residual=True)
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (16,), w, None, 1e-5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU: the dtype of x + r, as torch's
        y, s = fastbert.add_layer_norm(x, r, w, b, 1e-5, return_residual=True)
        y16, s16 = fastbert.add_layer_norm(x.bfloat16(), r.bfloat16(), w, b, 1e-5,
                                           return_residual=True)
    assert y.dtype == s.dtype == torch.float32 and y.shape == s.shape == x.shape
    assert y16.dtype == s16.dtype == torch.bfloat16


@pytest.mark.parametrize("dropout_p, pre_norm", [(0.0, False), (0.3, True)])
def test_add_layer_norm_torch_backend_reads_mixed_dtypes(dropout_p, pre_norm):
    """autocast's bf16 x beside an fp32 residual, y asked in fp32, on the torch backend."""
    check_mixed_dtype_layer_norm(TorchBackend, dropout_p=dropout_p, pre_norm=pre_norm)


def test_add_layer_norm_keeps_an_fp64_residuals_precision():
    """Mixed inputs (autocast) with an fp64 residual: the torch backend accumulates in fp64, as
    when both were cast up first."""
    x, r = torch.randn(7, 16), torch.randn(7, 16, dtype=torch.float64)
    w, b, dy = torch.randn(16), torch.randn(16), torch.randn(7, 16, dtype=torch.float64)
    y, mean, rstd = TorchBackend.add_layer_norm_forward(x, r, w, b, 1e-5, 0.0, 0,
                                                        out_dtype=torch.float64)
    dx, dr, dw, db = TorchBackend.add_layer_norm_backward(dy, x, r, w, mean, rstd, 0.0, 0)
    x64, w64, b64 = x.double(), w.double(), b.double()
    ey, emean, erstd = reference.add_layer_norm_forward(x64, r, w64, b64, 1e-5)
    edx, edr, edw, edb = reference.add_layer_norm_backward(dy, x64, r, w64, emean, erstd)
    assert y.dtype == dr.dtype == torch.float64 and dx.dtype == torch.float32
    for got, want in ((y, ey), (dr, edr), (dx, edx.float()), (dw, edw.float()), (db, edb.float())):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12 if got.dtype ==
                                   torch.float64 else 1e-6, atol=1e-12 if got.dtype ==
                                   torch.float64 else 1e-6)


def test_linear_bias_gelu_gradcheck():
    x = torch.randn(2, 3, 5, dtype=f64, requires_grad=True)
    w = torch.randn(4, 5, dtype=f64, requires_grad=True)
    b = torch.randn(4, dtype=f64, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: fastbert.linear_bias_gelu(x, w, b, approximate=approximate,
                                                      backend="torch"), (x, w, b))


# --------------------------------------------------------------------------------------------
# the contract on the torch backend
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_matches_sdpa_and_fully_padded_rows_are_zero(dtype):
    b, s, h, d = 3, 9, 2, 16
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = random_padding_mask(b, s, mode="with_empty")
    out = fastbert.attention(q, k, v, mask, backend="torch")
    out.float().sum().backward()
    expect = torch.nn.functional.scaled_dot_product_attention(
        *(t.detach().float().transpose(1, 2) for t in (q, k, v)),
        attn_mask=mask[:, None, None, :]).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[1:].float(), expect[1:], atol=tol, rtol=tol)
    assert torch.all(out[0] == 0)
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any() and torch.all(t.grad[0] == 0)


@pytest.mark.parametrize("causal,sq,sk", [(False, 9, 9), (True, 9, 9), (True, 4, 9), (True, 9, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_fast_cpu_path_matches_reference(causal, sq, sk, dtype):
    """Without dropout, the torch backend runs ATen's fused CPU attention: hold it to the fp64
    reference by the tolerance rule, empty rows (padding, causal with Sq > Sk) included."""
    from tests.helpers import assert_close_by_rule
    q = torch.randn(3, sq, 2, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(3, sk, 2, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = random_padding_mask(3, sk, mode="with_empty")
    out = fastbert.attention(q, k, v, mask, causal=causal, backend="torch")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    exact64 = [t.detach().double() for t in (q, k, v)]
    exact_out, exact_lse = reference.attention_forward(*exact64, mask, causal)
    exact = (exact_out,) + reference.attention_backward(dout.double(), *exact64, exact_out,
                                                        exact_lse, mask, causal)
    plain_in = [t.detach() for t in (q, k, v)]
    plain_out, plain_lse = reference.attention_forward(*plain_in, mask, causal, upcast=False)
    plain = (plain_out,) + reference.attention_backward(dout, *plain_in, plain_out, plain_lse,
                                                        mask, causal, upcast=False)
    for name, got, p, e in zip(("out", "dq", "dk", "dv"), (out,) + grads, plain, exact):
        assert_close_by_rule(got, p, e, name)


def test_attention_causal_is_bottom_right_aligned():
    q, k, v = _attn_inputs(b=1, sq=2, sk=5, h=1, d=4, grad=False)
    out = fastbert.attention(q, k, v, causal=True, backend="torch")
    # the last query sees every key, the first sees keys 0..3
    full = fastbert.attention(q[:, 1:], k, v, backend="torch")
    part = fastbert.attention(q[:, :1], k[:, :4], v[:, :4], backend="torch")
    torch.testing.assert_close(out[:, 1:], full)
    torch.testing.assert_close(out[:, :1], part)


def test_attention_takes_packed_qkv_views():
    b, s, h, d = 2, 6, 3, 8
    qkv = torch.randn(b, s, 3, h, d, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = fastbert.attention(q, k, v, backend="torch")
    ref = fastbert.attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="torch")
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_attention_softmax_scale():
    q, k, v = _attn_inputs(grad=False)
    out = fastbert.attention(q, k, v, softmax_scale=0.5, backend="torch")
    ref = fastbert.attention(q * (0.5 * math.sqrt(8)), k, v, backend="torch")
    torch.testing.assert_close(out, ref)


def test_dropout_reproducible_and_scaled():
    q, k, v = _attn_inputs(b=2, sq=16, sk=16, h=2, d=16, dtype=torch.float32, grad=False)
    torch.manual_seed(3)
    a = fastbert.attention(q, k, v, dropout_p=0.5, backend="torch")
    torch.manual_seed(3)
    b = fastbert.attention(q, k, v, dropout_p=0.5, backend="torch")
    c = fastbert.attention(q, k, v, dropout_p=0.5, backend="torch")
    assert torch.equal(a, b) and not torch.equal(a, c)
    x = torch.ones(400, 100)
    y = fastbert.add_layer_norm(x, torch.zeros_like(x), torch.ones(100), torch.zeros(100),
                                dropout_p=0.3, backend="torch")
    # LayerNorm of a {0, 1/0.7} row: check the keep rate through the fraction of high values
    keep_rate = (y > 0).float().mean().item()
    assert abs(keep_rate - 0.7) < 0.01


def test_autocast_runs_ops_in_low_precision_and_norms_as_torch_would():
    x = torch.randn(2, 4, 8)
    w, b = torch.randn(16, 8), torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = fastbert.linear_bias_gelu(x, w, b, backend="torch")
        y = fastbert.add_layer_norm(h, h.float(), torch.ones(16), torch.zeros(16), backend="torch")
        q = torch.randn(2, 4, 2, 8)
        o = fastbert.attention(q, q, q, backend="torch")
    assert h.dtype == o.dtype == torch.bfloat16
    assert y.dtype == torch.float32  # the sum's dtype, as LayerNorm(h + residual) on CPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastbert.add_layer_norm(h, None, torch.ones(16), torch.zeros(16)).dtype == h.dtype
    assert layer_norm.norm_dtype("cuda", torch.bfloat16) == torch.float32  # autocast's layer_norm
    assert layer_norm.norm_dtype("cpu", torch.bfloat16, torch.float32) == torch.float32


# --------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# --------------------------------------------------------------------------------------------

def test_opcheck_attention():
    q, k, v = _attn_inputs(dtype=torch.float32)
    mask = random_padding_mask(2, 7)
    seed = torch.tensor([5])
    for args in [(q, k, v, mask, True, 0.0, 0.3, None, False, "torch"),
                 (q, k, v, None, False, 0.2, 0.3, seed, True, "torch")]:
        torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, args)
    out, lse = torch.ops.fastbert.attention_fwd(q, k, v, mask, True, 0.0, 0.3, None, False, "torch")
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
                mask, True, 0.0, 0.3, None, False, "torch")
    torch.library.opcheck(torch.ops.fastbert.attention_bwd.default, bwd_args)


def test_opcheck_add_layer_norm():
    x, r = torch.randn(5, 12, requires_grad=True), torch.randn(5, 12, requires_grad=True)
    w, b = torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True)
    for args in [(x, r, w, b, 1e-5, 0.0, None, "torch"),
                 (x, None, w, b, 1e-5, 0.1, torch.tensor([2]), "torch")]:
        torch.library.opcheck(torch.ops.fastbert.add_layer_norm_fwd.default, args)
    y, mean, rstd = torch.ops.fastbert.add_layer_norm_fwd(x, r, w, b, 1e-5, 0.0, None, "torch")
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_bwd.default,
                          (torch.randn(5, 12), x.detach(), r.detach(), w.detach(), mean, rstd, 0.0,
                           None, "torch"))
    # the pre-norm form, and the backward with a gradient reaching its sum output
    for args in [(x, r, w, b, 1e-5, 0.0, None, "torch"),
                 (x, None, w, b, 1e-5, 0.1, torch.tensor([2]), "torch")]:
        torch.library.opcheck(torch.ops.fastbert.add_layer_norm_residual_fwd.default, args)
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_bwd.default,
                          (torch.randn(5, 12), x.detach(), r.detach(), w.detach(), mean, rstd, 0.0,
                           None, "torch", torch.randn(5, 12)))


def test_opcheck_linear_bias_gelu():
    x, w, b = (torch.randn(6, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True),
               torch.randn(10, requires_grad=True))
    torch.library.opcheck(torch.ops.fastbert.linear_bias_gelu_fwd.default,
                          (x, w, b, "tanh", True, "torch"))
    # without the pre-activation there is no backward: the inputs need no grad then
    torch.library.opcheck(torch.ops.fastbert.linear_bias_gelu_fwd.default,
                          (x.detach(), w.detach(), b.detach(), "tanh", False, "torch"))
    out, pre = torch.ops.fastbert.linear_bias_gelu_fwd(x, w, b, "none", True, "torch")
    torch.library.opcheck(torch.ops.fastbert.linear_bias_gelu_bwd.default,
                          (torch.randn(6, 10), x.detach(), w.detach(), pre, "none", "torch"))


def test_linear_bias_gelu_keeps_no_pre_activation_without_grad(monkeypatch):
    seen = []
    real = linear_gelu._linear_bias_gelu_forward

    def spy(x, w, b, approximate, store_pre, backend):
        out, pre = real(x, w, b, approximate, store_pre, backend)
        seen.append((store_pre, tuple(pre.shape)))
        return out, pre

    monkeypatch.setattr(linear_gelu, "_linear_bias_gelu_forward", spy)
    monkeypatch.setattr(linear_gelu.cpu, "should_use", lambda *a: False)  # not the oneDNN path
    x, w, b = torch.randn(6, 8), torch.randn(10, 8, requires_grad=True), torch.randn(10)
    with torch.no_grad():
        fastbert.linear_bias_gelu(x, w, b)
    fastbert.linear_bias_gelu(x, w.detach(), b)
    fastbert.linear_bias_gelu(x, w, b).sum().backward()
    assert seen == [(False, (0, 10)), (False, (0, 10)), (True, (6, 10))]
    assert w.grad is not None


def test_inference_calls_skip_the_custom_op_and_agree(monkeypatch):
    from fastbert import ops
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x, w, b = torch.randn(4, 16), torch.ones(16), torch.zeros(16)
    qg, xg = q.clone().requires_grad_(), x.clone().requires_grad_()  # recording autograd
    with_grad = (fastbert.attention(qg, k, v, mask).detach(),
                 fastbert.add_layer_norm(xg, x, w, b).detach())
    monkeypatch.setattr(ops, "_attention_fwd", None)  # a call through the op would fail
    monkeypatch.setattr(layer_norm, "_add_layer_norm_fwd", None)
    # a model's LayerNorm weights are nn.Parameters: they too take the direct path
    wp, bp = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    with torch.no_grad():
        direct = (fastbert.attention(q, k, v, mask), fastbert.add_layer_norm(x, x, w, b),
                  fastbert.add_layer_norm(x, x, wp, bp))
    for got, want in zip(direct, (*with_grad, with_grad[1])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _every_op_fwd_bwd(seed: int):
    """Outputs and every gradient of one call of each op (dropout on), from torch seed `seed`."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 2, 8, requires_grad=True) for _ in range(3))
    x, r = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)
    w, b = torch.nn.Parameter(torch.ones(16)), torch.nn.Parameter(torch.zeros(16))
    lw, lb = torch.randn(12, 16, requires_grad=True), torch.randn(12, requires_grad=True)
    packed = torch.randn(9, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    torch.manual_seed(seed)
    outs = (fastbert.attention(q, k, v, mask, dropout_p=0.2),
            fastbert.add_layer_norm(x, r, w, b, dropout_p=0.2),
            fastbert.linear_bias_gelu(x, lw, lb),
            fastbert.attention_varlen(packed, packed, packed, cu, cu, 5, 5, causal=True))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    leaves = (q, k, v, x, r, w, b, lw, lb, packed)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def test_eager_training_calls_skip_the_custom_op_and_equal_it(monkeypatch):
    """Calls that record autograd run each op's registered forward, setup_context and backward
    through ops._EagerOp: the same outputs and gradients, bit for bit, as through the custom op
    (dropout masks included), and no call reaches the custom ops."""
    from fastbert import varlen
    eager = _every_op_fwd_bwd(seed=3)
    with monkeypatch.context() as m:
        m.setattr(ops, "_eager", lambda *tensors: False)
        through_ops = _every_op_fwd_bwd(seed=3)
    for got, want in zip(eager, through_ops):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for module, name in ((ops, "_attention_fwd"), (ops, "_attention_bwd"),
                         (layer_norm, "_add_layer_norm_fwd"), (layer_norm, "_add_layer_norm_bwd"),
                         (linear_gelu, "_linear_bias_gelu_fwd"),
                         (linear_gelu, "_linear_bias_gelu_bwd"),
                         (varlen, "_varlen_fwd"), (varlen, "_varlen_bwd")):
        monkeypatch.setattr(module, name, None)  # a call through a custom op would fail
    for got, want in zip(_every_op_fwd_bwd(seed=3), eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_return_residual_eager_and_compiled_equal_the_custom_op(monkeypatch):
    """The pre-norm form: eager (_EagerOp), through its custom op, and under
    torch.compile(fullgraph=True) give the same (y, s) and gradients (dropout included)."""
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    w, b = torch.randn(16), torch.randn(16)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
        torch.manual_seed(4)
        y, s = fn(*leaves)
        (y.pow(2).sum() + (s * y).sum()).backward()
        return [y.detach(), s.detach()] + [t.grad for t in leaves]

    def op(x, r, w, b):
        return fastbert.add_layer_norm(x, r, w, b, 1e-5, dropout_p=0.2, return_residual=True)

    eager = run(op)
    with monkeypatch.context() as m:
        m.setattr(ops, "_eager", lambda *tensors: False)
        through_op = run(op)
        compiled = run(torch.compile(op, fullgraph=True, backend="aot_eager"))
    for got, want in zip(through_op + compiled, eager + eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cuda_backend_serves_return_residual(monkeypatch):
    """The CUDA LayerNorm kernels store the pre-norm sum too: ops does not refuse
    return_residual (store_sum) there, the CUDA module's own rules decide as for the plain form."""
    from fastbert import cuda as cuda_backend

    monkeypatch.setattr(ops, "_device_reason", lambda name, device: None)  # as on a GPU
    monkeypatch.setattr(ops, "_backend_module",
                        lambda name: cuda_backend if name == "cuda" else _TorchLike)
    op, cpu = "fastbert.add_layer_norm", torch.device("cpu")
    for hidden in (768, 8192):
        kw = dict(dtype=torch.float16, hidden=hidden, dropout_p=0.1)
        plain = ops._why_not("cuda", op, cpu, kw)
        assert ops._why_not("cuda", op, cpu, dict(kw, store_sum=True)) == plain
        assert (plain is None) == (hidden == 768)
        assert ops._why_not("triton", op, cpu, dict(kw, store_sum=True)) is None
    assert ops.resolve_backend(op, "cuda", cpu, dtype=torch.bfloat16, hidden=768, dropout_p=0.0,
                               store_sum=True) == "cuda"


class _TorchLike:
    """A backend module that serves everything (ops' own refusals only)."""

    @staticmethod
    def unsupported(op, **kw):
        return None


def test_torch_func_grad_through_the_ops():
    """torch.func.grad (functorch) runs the eager path's autograd.Function (setup_context style)
    and gives the gradients plain autograd gives."""
    q, k, v = (torch.randn(2, 5, 2, 8, dtype=torch.float64) for _ in range(3))
    x, r = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    w, b = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)

    def loss(q, x):
        return (fastbert.attention(q, k, v).pow(2).sum()
                + fastbert.add_layer_norm(x, r, w, b).pow(3).sum())

    dq, dx = torch.func.grad(loss, argnums=(0, 1))(q, x)
    q2, x2 = q.clone().requires_grad_(), x.clone().requires_grad_()
    loss(q2, x2).backward()
    torch.testing.assert_close(dq, q2.grad, rtol=0, atol=0)
    torch.testing.assert_close(dx, x2.grad, rtol=0, atol=0)


def test_a_training_step_does_not_import_dynamo():
    """The custom ops' dispatch imports torch._dynamo on first use (seconds); eager training
    does not go through it."""
    code = ("import sys, torch, fastbert\n"
            "config = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,\n"
            "                             num_attention_heads=2, intermediate_size=64)\n"
            "model = fastbert.BertForMaskedLM(config)\n"
            "ids = torch.randint(1, 50, (2, 7))\n"
            "mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])\n"
            "model(ids, mask, labels=ids).loss.backward()\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_torch_compile_fullgraph_ops():
    torch._dynamo.reset()

    def block(x, mask, w_qkv, w1, b1, ln_w, ln_b):
        b, s, hid = x.shape
        q, k, v = (x @ w_qkv.T).view(b, s, 3, 2, hid // 2).unbind(2)
        a = fastbert.attention(q, k, v, mask).reshape(b, s, hid)
        h = fastbert.add_layer_norm(a, x, ln_w, ln_b)
        return fastbert.linear_bias_gelu(h, w1, b1)

    args = (torch.randn(2, 5, 8, requires_grad=True), random_padding_mask(2, 5),
            torch.randn(24, 8), torch.randn(16, 8), torch.randn(16), torch.ones(8), torch.zeros(8))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    want = block(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert args[0].grad is not None


# --------------------------------------------------------------------------------------------
# validation: every bad input raises before any kernel runs, naming op and argument
# --------------------------------------------------------------------------------------------

def _q(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


ATTN_BAD = [
    (dict(q=_q(2, 5, 3)), ValueError, "'q' expected a 4-D"),
    (dict(q=torch.ones(2, 5, 3, 8, dtype=torch.int32)), TypeError, "'q' expected dtype"),
    (dict(k=_q(2, 5, 3, 8, dtype=torch.float16)), TypeError, "one dtype"),
    (dict(k=_q(2, 5, 4, 8)), ValueError, "'k' and 'v' expected shape"),
    (dict(v=_q(2, 6, 3, 8)), ValueError, "'k' and 'v' expected shape"),
    (dict(q=_q(1, 2, 1, 300), k=_q(1, 2, 1, 300), v=_q(1, 2, 1, 300)), ValueError, "head dim"),
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "'key_padding_mask' expected shape"),
    (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "bool or integer"),
    (dict(key_padding_mask=[[1] * 5] * 2), TypeError, "'key_padding_mask' expected a torch.Tensor"),
    (dict(dropout_p=1.0), ValueError, "'dropout_p'"),
    (dict(dropout_p=-0.1), ValueError, "'dropout_p'"),
    (dict(softmax_scale=float("nan")), ValueError, "'softmax_scale'"),
    (dict(backend="flash"), ValueError, "'backend'"),
    (dict(q="nope"), TypeError, "'q' expected a torch.Tensor"),
]


@pytest.mark.parametrize("override,exc,text", ATTN_BAD)
def test_attention_validation(override, exc, text):
    args = dict(q=_q(2, 5, 3, 8), k=_q(2, 5, 3, 8), v=_q(2, 5, 3, 8), key_padding_mask=None)
    args.update(override)
    kwargs = {k: args.pop(k) for k in ("dropout_p", "softmax_scale", "backend") if k in args}
    with pytest.raises(exc, match="fastbert.attention") as e:
        fastbert.attention(**args, **kwargs)
    assert text in str(e.value)


LN_BAD = [
    (dict(residual=_q(4, 9)), ValueError, "'residual' expected shape"),
    (dict(residual=_q(4, 8, dtype=torch.float16)), TypeError, "'residual' expected dtype"),
    (dict(weight=_q(9)), ValueError, "'weight' expected shape"),
    (dict(bias=_q(8, dtype=torch.float16)), TypeError, "'bias' expected dtype"),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "'x' expected dtype"),
    (dict(eps=0.0), ValueError, "'eps'"),
    (dict(dropout_p=1.5), ValueError, "'dropout_p'"),
    (dict(backend="cudnn"), ValueError, "'backend'"),
    (dict(return_residual=1), TypeError, "'return_residual' expected a bool"),
]


@pytest.mark.parametrize("override,exc,text", LN_BAD)
def test_add_layer_norm_validation(override, exc, text):
    args = dict(x=_q(4, 8), residual=_q(4, 8), weight=_q(8), bias=_q(8), eps=1e-5)
    args.update(override)
    kwargs = {k: args.pop(k) for k in ("dropout_p", "return_residual", "backend") if k in args}
    with pytest.raises(exc, match="fastbert.add_layer_norm") as e:
        fastbert.add_layer_norm(**args, **kwargs)
    assert text in str(e.value)


GELU_BAD = [
    (dict(weight=_q(6, 5)), ValueError, "'weight' expected shape"),
    (dict(weight=_q(6, 4, 1)), ValueError, "'weight' expected shape"),
    (dict(bias=_q(5)), ValueError, "'bias' expected shape"),
    (dict(bias=_q(6, dtype=torch.float16)), TypeError, "one dtype"),
    (dict(approximate="fast"), ValueError, "'approximate'"),
    (dict(backend=3), ValueError, "'backend'"),
]


@pytest.mark.parametrize("override,exc,text", GELU_BAD)
def test_linear_bias_gelu_validation(override, exc, text):
    args = dict(x=_q(3, 4), weight=_q(6, 4), bias=_q(6))
    args.update(override)
    kwargs = {k: args.pop(k) for k in ("approximate", "backend") if k in args}
    with pytest.raises(exc, match="fastbert.linear_bias_gelu") as e:
        fastbert.linear_bias_gelu(**args, **kwargs)
    assert text in str(e.value)


def test_mixed_devices_rejected():
    q = _q(1, 2, 1, 4)
    with pytest.raises(ValueError, match="'k' expected to be on cpu"):
        fastbert.attention(q, q.to("meta"), q)


# --------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------

def test_auto_picks_torch_on_cpu_and_named_backends_explain_refusal():
    assert ops.resolve_backend("fastbert.attention", "auto", torch.device("cpu")) == "torch"
    for name in ("cuda", "triton"):
        with pytest.raises(ValueError, match=f"backend '{name}' cannot serve this input"):
            fastbert.attention(*_attn_inputs(dtype=torch.float32, grad=False), backend=name)


def test_set_backend_and_env():
    try:
        fastbert.set_backend("torch")
        assert fastbert.get_backend() == "torch"
        with pytest.raises(ValueError, match="set_backend"):
            fastbert.set_backend("tpu")
    finally:
        fastbert.set_backend("auto")
    import os
    import subprocess
    import sys
    code = "import fastbert; print(fastbert.get_backend())"
    env = dict(os.environ, FASTBERT_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "torch", out.stderr
    env["FASTBERT_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTBERT_BACKEND" in out.stderr


def _leaked_from_vjp(x):
    """x * 1.5 computed inside a torch.func.vjp that has returned: a dead functorch wrapper
    still in x's graph (what a custom Function's backward sees of its saved tensors)."""
    leak = []

    def f(t):
        h = t * 1.5
        leak.append(h)
        return h.sum()
    torch.func.vjp(f, x)
    return leak[0]


@pytest.mark.parametrize("op", ["attention", "attention_varlen", "apply_rotary"])
def test_public_ops_take_tensors_left_by_a_finished_vjp(monkeypatch, op):
    """ops.eager_apply unwraps dead wrappers as Function.apply does: the gradient through an op
    on one is Function.apply's (without the unwrap: an error, or no gradient at all)."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 8, 2, 16, generator=g), torch.randn(2, 8, 2, 16, generator=g)
    kv = torch.randn(16, 2, 16, generator=g)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    cos, sin = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    shape, call = {
        "attention": ((2, 8, 2, 16), lambda h: fastbert.attention(h, k, v)),
        "attention_varlen": ((16, 2, 16),
                             lambda h: fastbert.attention_varlen(h, kv, kv, cu, cu, 11, 11)),
        "apply_rotary": ((2, 16, 2, 16), lambda h: fastbert.apply_rotary(h, cos, sin)),
    }[op]
    base = torch.randn(*shape, generator=g)
    grads = []
    for apply in (ops.apply_eager, ops._EagerOp.apply):
        monkeypatch.setattr(ops, "apply_eager", apply)
        x = base.clone().requires_grad_()
        grad, = torch.autograd.grad(call(_leaked_from_vjp(x)).square().sum(), x,
                                    allow_unused=True)
        grads.append(grad)
    assert grads[0] is not None and grads[1] is not None
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("rows", [4, 512])  # ATen's path, fastbert's CPU kernel
def test_add_layer_norm_leaves_get_gradients_of_their_own(rows):
    """x and the residual as leaves: two .grad tensors, each accumulating its own gradient
    (one buffer handed to both doubled each step's sum into the other)."""
    x, r = torch.randn(rows, 32, requires_grad=True), torch.randn(rows, 32, requires_grad=True)
    w, b = torch.randn(32), torch.randn(32)
    fastbert.add_layer_norm(x, r, w, b).square().sum().backward()
    once = x.grad.clone()
    assert x.grad.data_ptr() != r.grad.data_ptr()
    fastbert.add_layer_norm(x, r, w, b).square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * once)
    torch.testing.assert_close(r.grad, 2 * once)
