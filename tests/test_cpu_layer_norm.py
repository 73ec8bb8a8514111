"""fastbert's CPU add+LayerNorm kernel (fastbert._cpu, csrc/cpu/layer_norm.cpp): forward,
statistics and every gradient against fp64 by the tolerance rule on both instruction sets
(the CUDA backend's checks: residual or not, the pre-norm form, unaligned rows, widths no
multiple of a vector); dropout (its mask read off the output, its rate, every gradient given
it, the same seed the same mask, which the torch backend's other dtypes draw too); the public
op's route (forward and backward on the kernel, the same results as ATen's path with the same
mask, torch.func) and what the kernel does not take. The extension is built by `pip install`
on x86-64 (CI builds it)."""
import os

import pytest
import torch

import fastbert
from fastbert import cpu_attention, cpu_layer_norm, reference
from fastbert.torch_backend import TorchBackend
from tests.cuda_helpers import assert_keep_rate
from tests.helpers import check_mixed_dtype_layer_norm
from tests.test_cuda import check_layer_norm, check_layer_norm_dropout, layer_norm_keep_mask

_MISSING = cpu_layer_norm.reason() is not None
if _MISSING and os.environ.get("CI"):  # CI builds the extension: a failed build fails here
    raise RuntimeError(f"CI: fastbert._cpu should have been built: {cpu_layer_norm.reason()}")
pytestmark = pytest.mark.skipif(_MISSING, reason=f"{cpu_layer_norm.reason()}")


def _isas():
    best = cpu_attention._cpu.isa() if cpu_attention._cpu is not None else ""
    return ["avx512", "avx2"] if best == "avx512" else ["avx2"]


@pytest.fixture(params=_isas())
def isa(request):
    cpu_attention.use_isa(request.param)  # one ISA for every kernel of fastbert._cpu
    yield request.param
    cpu_attention.use_isa("")


# one row; rows in several blocks of 32 with a ragged last one; widths no multiple of 16 or 8;
# BERT's and ModernBERT's widths; a wide row
SHAPES = [(1, 32), (37, 100), (300, 384), (64, 768), (9, 1030), (70, 1536), (3, 5000)]


@pytest.mark.parametrize("rows, hidden", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_matches_reference(isa, rows, hidden, with_residual, pre_norm):
    check_layer_norm(rows, hidden, torch.float32, torch.float32, with_residual, cpu_layer_norm,
                     "cpu", pre_norm=pre_norm)


@pytest.mark.parametrize("x_offset", [1, 5])
def test_unaligned_rows(isa, x_offset):
    check_layer_norm(33, 200, torch.float32, torch.float32, True, cpu_layer_norm, "cpu",
                     x_offset=x_offset, pre_norm=True)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float64])
def test_weight_of_another_dtype(weight_dtype):
    """An fp32 activation with a bf16 or fp64 LayerNorm: read in fp32, dweight and dbias in the
    weight's dtype."""
    check_layer_norm(40, 96, torch.float32, weight_dtype, True, cpu_layer_norm, "cpu")


@pytest.mark.parametrize("rows, hidden", [(37, 100), (64, 768), (9, 1030), (5, 4096)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_dropout_matches_reference_with_its_mask(isa, rows, hidden, with_residual, p,
                                                 pre_norm):
    """The CUDA backend's dropout check: the mask read off the output, its keep rate, forward
    and every gradient given it, the same seed the same results, another seed another mask."""
    check_layer_norm_dropout(cpu_layer_norm, "cpu", rows, hidden, torch.float32, with_residual,
                             p, pre_norm=pre_norm)


@pytest.mark.parametrize("seed", [7, 2 ** 40 + 12345, 2 ** 64 - 1])  # 32- and 64-bit seeds
def test_keep_mask_is_the_kernels(isa, seed):
    """keep_mask draws what the kernel drops (on both ISAs), whatever the thread count; its
    columns are independent (pairs kept together at (1 - p)^2)."""
    rows, hidden, p = 1024, 256, 0.3  # 2 threads' work or more
    keep = cpu_layer_norm.keep_mask(seed, (rows, hidden), p)
    assert torch.equal(keep, layer_norm_keep_mask(cpu_layer_norm, "cpu", rows, hidden,
                                                  torch.float32, p, seed))
    assert_keep_rate(keep, p, "cpu add_layer_norm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(keep, cpu_layer_norm.keep_mask(seed, (rows, hidden), p))
    finally:
        torch.set_num_threads(threads)
    lanes = keep.view(-1, 16).float()
    for a, b in ((0, 1), (0, 8), (3, 15)):
        both, q = (lanes[:, a] * lanes[:, b]).mean().item(), (1 - p) ** 2
        assert abs(both - q) < 5 * (q * (1 - q) / lanes.shape[0]) ** 0.5, (a, b, both)
    assert not torch.equal(keep, cpu_layer_norm.keep_mask(seed ^ 1, (rows, hidden), p))


def test_other_dtypes_drop_the_same_elements():
    """The torch backend's fp64 and bf16 calls (ATen's path) drop by the kernel's mask: the
    same seed drops the same elements in every dtype."""
    rows, hidden, p, seed = 24, 80, 0.4, 99
    keep = cpu_layer_norm.keep_mask(seed, (rows, hidden), p)
    for dtype in (torch.float64, torch.bfloat16):
        assert not cpu_layer_norm.serves(torch.ones(1, 1, dtype=dtype), None, None)
        got = layer_norm_keep_mask(TorchBackend, "cpu", rows, hidden, dtype, p, seed)
        assert torch.equal(got, keep), dtype
    check_mixed_dtype_layer_norm(TorchBackend, rows=rows, hidden=hidden, dropout_p=p,
                                 pre_norm=True)


def test_constant_rows_and_no_rows():
    """Variance 0: y is exactly the bias, gradients finite. No rows: empty outputs, zero dweight
    and dbias."""
    weight, bias = torch.randn(64), torch.randn(64)
    x = torch.full((4, 64), 3.0)
    y, mean, rstd = cpu_layer_norm.add_layer_norm_forward(x, None, weight, bias, 1e-12, 0.0, 0)
    assert torch.equal(y, bias.expand(4, 64))
    grads = cpu_layer_norm.add_layer_norm_backward(torch.randn(4, 64), x, None, weight, mean,
                                                   rstd, 0.0, 0)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    empty = torch.empty(0, 64)
    y, mean, rstd, s = cpu_layer_norm.add_layer_norm_forward(empty, empty, weight, bias, 1e-5,
                                                             0.1, 3, store_sum=True)
    assert y.shape == s.shape == (0, 64) and mean.shape == rstd.shape == (0,)
    dx, dres, dw, db = cpu_layer_norm.add_layer_norm_backward(empty, empty, empty, weight, mean,
                                                              rstd, 0.1, 3)
    assert dx.shape == dres.shape == (0, 64)
    assert torch.equal(dw, torch.zeros(64)) and torch.equal(db, torch.zeros(64))


def test_dweight_is_deterministic_and_threads_agree():
    x, r, dy = torch.randn(3, 1000, 256).unbind(0)
    w, b = torch.randn(256), torch.randn(256)
    _, mean, rstd = cpu_layer_norm.add_layer_norm_forward(x, r, w, b, 1e-5, 0.2, 8)
    first = cpu_layer_norm.add_layer_norm_backward(dy, x, r, w, mean, rstd, 0.2, 8)
    again = cpu_layer_norm.add_layer_norm_backward(dy, x, r, w, mean, rstd, 0.2, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cpu_layer_norm.add_layer_norm_backward(dy, x, r, w, mean, rstd, 0.2, 8)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], one[0]) and torch.equal(first[1], one[1])  # per row
    for a, b in zip(first[2:], one[2:]):  # summed over rows in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def _counting(name):
    """Replace cpu_layer_norm.<name> with a wrapper counting its calls (restored by the
    caller)."""
    kernel, calls = getattr(cpu_layer_norm, name), []
    setattr(cpu_layer_norm, name, lambda *a, **k: calls.append(name) or kernel(*a, **k))
    return kernel, calls


NAMES = ("add_layer_norm_forward", "add_layer_norm_backward")


def _public_run(return_residual, p, seed=11):
    g = torch.Generator().manual_seed(2)
    leaves = [t.requires_grad_() for t in (torch.randn(2, 9, 40, generator=g),
                                            torch.randn(2, 9, 40, generator=g),
                                            1 + 0.1 * torch.randn(40, generator=g),
                                            0.1 * torch.randn(40, generator=g))]
    torch.manual_seed(seed)
    out = fastbert.add_layer_norm(*leaves, 1e-5, dropout_p=p, return_residual=return_residual)
    outs = out if return_residual else (out,)
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) * (i + 1.5)
                                               for i, o in enumerate(outs)])
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("return_residual", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_public_op_runs_the_kernel_as_atens_path_would(return_residual, p):
    """fastbert.add_layer_norm (autograd) runs forward and backward on the kernel, and gives
    what the torch backend's ATen path gives with the kernel off: the same dropout mask, outputs
    and gradients to fp32 rounding."""
    kernels = [_counting(name) for name in NAMES]
    try:
        got = _public_run(return_residual, p)
    finally:
        for name, (kernel, _) in zip(NAMES, kernels):
            setattr(cpu_layer_norm, name, kernel)
    assert [len(calls) for _, calls in kernels] == [1, 1]
    cpu_layer_norm.set_enabled(False)
    try:
        want = _public_run(return_residual, p)
    finally:
        cpu_layer_norm.set_enabled(True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("transform", ["grad", "vjp"])
def test_torch_func_with_dropout(transform):
    """torch.func's forward may run on the kernel and its backward (on wrapped tensors) on
    ATen's path: both drop by the same mask, so the gradient is autograd's."""
    g = torch.Generator().manual_seed(6)
    x, r = torch.randn(12, 48, generator=g), torch.randn(12, 48, generator=g)
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)

    def norm(x):
        return fastbert.add_layer_norm(x, r, w, b, 1e-5, dropout_p=0.3)

    torch.manual_seed(4)
    if transform == "grad":
        got = torch.func.grad(lambda x: norm(x).square().sum())(x)
    else:
        out, pullback = torch.func.vjp(norm, x)
        got, = pullback(2 * out)
    torch.manual_seed(4)
    leaf = x.clone().requires_grad_()
    norm(leaf).square().sum().backward()
    torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-5)


def test_double_backward_is_refused():
    x = torch.randn(6, 32, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32)
    y = fastbert.add_layer_norm(x, None, w, b)
    with pytest.raises((NotImplementedError, RuntimeError), match="double backward|derivative"):
        gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.sum().backward()


def test_double_backward_through_the_residual_alone_is_refused():
    """create_graph=True where only the residual needs a gradient: refused, not a gradient
    without a graph."""
    x, w, b = torch.randn(6, 32), torch.randn(32), torch.randn(32)
    r = torch.randn(6, 32, requires_grad=True)
    y = fastbert.add_layer_norm(x, r, w, b)
    with pytest.raises((NotImplementedError, RuntimeError), match="double backward|derivative"):
        gr, = torch.autograd.grad(y.square().sum(), r, create_graph=True)
        gr.sum().backward()


def test_outputs_on_the_cpu_under_another_default_device():
    """The kernel writes its outputs through their addresses: they are CPU tensors whatever
    torch's default device (`with torch.device("meta")` made meta outputs it wrote through)."""
    x, r = torch.randn(5, 40), torch.randn(5, 40)
    w, b = torch.randn(40), torch.randn(40)
    want = fastbert.add_layer_norm(x, r, w, b, dropout_p=0.0)
    with torch.device("meta"):
        got = fastbert.add_layer_norm(x, r, w, b)
        keep = cpu_layer_norm.keep_mask(3, (5, 40), 0.5)
        y, mean, rstd = cpu_layer_norm.add_layer_norm_forward(x, r, w, b, 1e-12, 0.5, 3)
        grads = cpu_layer_norm.add_layer_norm_backward(x, x, r, w, mean, rstd, 0.5, 3)
    assert got.device.type == keep.device.type == "cpu" and torch.equal(got, want)
    assert all(t.device.type == "cpu" for t in (y, mean, rstd, *grads))


def test_views_that_are_not_rows_stay_on_aten():
    """A residual broadcast along the rows (stride 0) or a column slice is no (rows, C)
    buffer: `serves` refuses it, and the torch backend's ATen path computes it."""
    base = torch.randn(6, 48)
    w, b = torch.randn(32), torch.randn(32)
    x = torch.randn(6, 32)
    for residual in (torch.randn(32).expand(6, 32), base[:, :32]):
        assert not cpu_layer_norm.serves(x, residual, None)
        y = TorchBackend.add_layer_norm_forward(x, residual, w, b, 1e-5, 0.0, 0)[0]
        want = torch.nn.functional.layer_norm(x + residual, (32,), w, b, 1e-5)
        torch.testing.assert_close(y, want)
    assert not cpu_layer_norm.serves(base[:, :32], None, None)


def test_what_the_kernel_does_not_take():
    x = torch.randn(10, 32)
    assert cpu_layer_norm.serves(x, x, None) and cpu_layer_norm.serves(x, None, torch.float32)
    assert not cpu_layer_norm.serves(x.bfloat16(), None, None)
    assert not cpu_layer_norm.serves(x, x.double(), None)  # autocast's mixed residual
    assert not cpu_layer_norm.serves(x, x, torch.float64)  # y asked in another dtype
    assert not cpu_layer_norm.serves(x.view(2, 5, 32), None, None)
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD: no tangent through C++
        assert not cpu_layer_norm.serves(x, None, None)
    with cpu_attention.suspended():
        assert not cpu_layer_norm.serves(x, None, None)
    cpu_layer_norm.set_enabled(False)
    try:
        assert not cpu_layer_norm.serves(x, None, None)
        assert "set_enabled(False)" in cpu_layer_norm.reason()
        assert "ATen" in cpu_layer_norm.describe()
    finally:
        cpu_layer_norm.set_enabled(True)
    _, mean, rstd = cpu_layer_norm.add_layer_norm_forward(x, None, torch.ones(32),
                                                          torch.zeros(32), 1e-5, 0.0, 0)
    with pytest.raises(ValueError, match="add_layer_norm_backward: expected fp32 dy"):
        cpu_layer_norm.add_layer_norm_backward(x[:9], x, None, torch.ones(32), mean, rstd, 0.0, 0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        cpu_layer_norm.add_layer_norm_forward(x, None, torch.ones(32), torch.zeros(32), 1e-5,
                                              1.0, 0)


def test_reference_agrees_on_the_hash_masks_scale():
    """The kernel scales kept elements by 1 / its exact keep rate (the hash threshold's), within
    1e-9 of the reference's 1 / (1 - p)."""
    x = torch.ones(8, 64)
    p = 0.1
    _, mean, _, s = cpu_layer_norm.add_layer_norm_forward(x, None, torch.ones(64),
                                                          torch.zeros(64), 1e-5, p, 5,
                                                          store_sum=True)
    keep = cpu_layer_norm.keep_mask(5, (8, 64), p)
    torch.testing.assert_close(s.double(), reference.prenorm_sum(x.double(), None, p, keep,
                                                                 torch.float64),
                               rtol=1e-7, atol=0)
