"""fastbert's CPU attention kernel (fastbert._cpu, csrc/cpu/): forward and lse against the
reference by the tolerance rule on both of its instruction sets, packed sequences with empty
ones, unequal query and key lengths, sliding windows, causal, decoding steps' few query rows,
dropout (its mask read off the output, then the CUDA tests' dropout checks);
padded batches with key-padding masks (right, left, with holes, all padding); strided views of
one projection; RoPE through attention_varlen; backward (packed and padded, strided views,
dropout) against fp64 autograd; the route's conditions (forward and backward on one path, also
under torch.func; no double backward) and bad cu_seqlens. The extension is built by `pip install` on x86-64 (CI builds it)."""
import os
import sys

import pytest
import torch

import fastbert
from fastbert import cpu_attention, reference
from fastbert.torch_backend import TorchBackend
from fastbert.varlen import _TorchVarlen
from tests.helpers import assert_close_by_rule, check_out_of_band_tiles_are_never_read
from tests.test_cuda_attention import (ATTENTION_DROPOUT_CASES, attention_keep_mask,
                                       check_attention_dropout, check_attention_varlen)

# CI builds the extension on x86-64: a build that failed there fails here, not skips
_MISSING = cpu_attention._cpu is None or cpu_attention._WIDTH == 0
if _MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI: fastbert._cpu should have been built: {cpu_attention.reason()}")
pytestmark = pytest.mark.skipif(_MISSING, reason=f"{cpu_attention.reason()}")


def _isas():
    best = cpu_attention._cpu.isa() if cpu_attention._cpu is not None else ""
    return ["avx512", "avx2"] if best == "avx512" else ["avx2"]


@pytest.fixture(params=_isas())
def isa(request):
    cpu_attention.use_isa(request.param)
    yield request.param
    cpu_attention.use_isa("")


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def reference_varlen(q, k, v, lengths_q, lengths_k, scale, causal, window, dtype):
    """Per sequence in `dtype`: out (Tq, H, D) and lse (H, Tq), zeros and +inf where a query sees
    no key; key j visible from query i when i + Lk - Lq - left <= j <= i + Lk - Lq + right."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = torch.zeros(q.shape, dtype=dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=dtype)
    sq = sk = 0
    for lq, lk in zip(lengths_q, lengths_k):
        if lq and lk:
            s = torch.einsum("ihd,jhd->hij", q[sq:sq + lq], k[sk:sk + lk]) * scale
            i = torch.arange(lq).view(-1, 1) + lk - lq
            j = torch.arange(lk).view(1, -1)
            visible = torch.ones(lq, lk, dtype=torch.bool)
            if left >= 0:
                visible &= j >= i - left
            if right >= 0:
                visible &= j <= i + right
            s = s.masked_fill(~visible, float("-inf"))
            row_lse = torch.logsumexp(s, -1)  # (H, lq), -inf where nothing is visible
            p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)
            out[sq:sq + lq] = torch.einsum("hij,jhd->ihd", p, v[sk:sk + lk])
            lse[:, sq:sq + lq] = row_lse.masked_fill(row_lse == float("-inf"), float("inf"))
        sq, sk = sq + lq, sk + lk
    return out, lse


CASES = [  # lengths_q, lengths_k (None: the same), heads, window, causal
    ([5, 0, 37, 64, 1], None, 2, (-1, -1), False),
    ([100, 3, 200], None, 3, (64, 64), False),
    ([50, 70], [60, 40], 2, (10, 0), False),
    ([129, 33], None, 1, (-1, -1), True),
    ([70, 33], None, 2, (5, 7), False),
    ([40, 8], [0, 8], 1, (-1, -1), False),
    ([64], None, 2, (0, 0), False),
    ([30, 45], [90, 10], 2, (-1, 3), True),
    ([2, 33, 3], [40, 33, 1], 2, (4, -1), True),  # 1-3 query rows: the row-at-a-time path
]


@pytest.mark.parametrize("head_dim", [8, 16, 48, 64, 128, 256])  # every PV tile width
@pytest.mark.parametrize("lengths_q, lengths_k, heads, window, causal", CASES)
def test_matches_reference(isa, lengths_q, lengths_k, heads, window, causal, head_dim):
    lengths_k = lengths_k or lengths_q
    if head_dim % cpu_attention._WIDTH:  # 8 floats: the AVX2 kernel's width only
        assert not cpu_attention.serves(*(torch.zeros(1, 1, head_dim),) * 3)
        return
    tq, tk = sum(lengths_q), sum(lengths_k)
    g = torch.Generator().manual_seed(sum(lengths_q) * 7 + head_dim)
    qkv = torch.randn(max(tq, tk), 3, heads, head_dim, generator=g)  # strided views, as a layer's
    q, k, v = qkv[:tq, 0], qkv[:tk, 1], qkv[:tk, 2]
    scale = head_dim ** -0.5
    assert cpu_attention.serves(q, k, v)
    out, lse = cpu_attention.varlen_forward(q, k, v, cu_of(lengths_q), cu_of(lengths_k), causal,
                                            scale, window)
    plain = reference_varlen(q, k, v, lengths_q, lengths_k, scale, causal, window, torch.float32)
    exact = reference_varlen(q, k, v, lengths_q, lengths_k, scale, causal, window, torch.float64)
    assert_close_by_rule(out, plain[0], exact[0], f"out ({isa})")
    seen = torch.isfinite(exact[1])
    assert torch.equal(torch.isinf(lse), ~seen), "lse is +inf exactly where no key is visible"
    assert_close_by_rule(lse[seen], plain[1][seen], exact[1][seen], f"lse ({isa})")
    assert torch.equal(out[~seen.any(0)], torch.zeros_like(out[~seen.any(0)]))


def _padding_mask(kind, batch, sk, g):
    if kind == "none":
        return None
    mask = torch.ones(batch, sk, dtype=torch.bool)
    if kind == "right":
        mask[0, sk // 2:] = False
    elif kind == "left":
        mask[-1, :sk // 3] = False
    elif kind == "holes":
        mask = torch.rand(batch, sk, generator=g) > 0.4
    elif kind == "all padding":
        mask[0] = False
    return mask


PADDED_CASES = [  # batch, Sq, Sk, heads, window, causal
    (3, 37, 37, 2, (-1, -1), False),
    (2, 1, 70, 3, (-1, -1), True),  # a decoding step: one query, bottom-right causal
    (2, 3, 100, 2, (20, -1), True),
    (2, 50, 20, 2, (-1, -1), True),  # more queries than keys: the first rows see nothing
    (4, 130, 130, 1, (8, 3), False),
    (1, 5, 200, 2, (0, 0), False),
]


@pytest.mark.parametrize("head_dim", [16, 64, 256])
@pytest.mark.parametrize("mask_kind", ["none", "right", "left", "holes", "all padding"])
@pytest.mark.parametrize("batch, sq, sk, heads, window, causal", PADDED_CASES)
def test_padded_batches_match_reference(isa, batch, sq, sk, heads, window, causal, mask_kind,
                                        head_dim):
    """The kernel through fastbert.attention's inference forward (the torch backend's route)."""
    g = torch.Generator().manual_seed(batch * 1000 + sq + sk + head_dim)
    qkv = torch.randn(batch, max(sq, sk), 3, heads, head_dim, generator=g)
    q, k, v = qkv[:, :sq, 0], qkv[:, :sk, 1], qkv[:, :sk, 2]  # strided views, as a layer's
    mask = _padding_mask(mask_kind, batch, sk, g)
    scale = head_dim ** -0.5
    assert cpu_attention.serves(q, k, v)
    calls = []
    kernel = cpu_attention.padded_forward
    try:
        cpu_attention.padded_forward = lambda *a: calls.append(1) or kernel(*a)
        with torch.inference_mode():
            out = fastbert.attention(q, k, v, mask, causal=causal, window_size=window,
                                     backend="torch")
    finally:
        cpu_attention.padded_forward = kernel
    assert calls == [1], "the inference forward ran on the kernel"
    _, lse = kernel(q, k, v, mask, causal, scale, window)
    visible = reference.attention_visible(mask, causal, batch, sq, sk, q.device, window)
    plain = reference.attention_forward(q, k, v, mask, causal, 0.0, scale, None, visible=visible)
    exact = reference.attention_forward(q.double(), k.double(), v.double(), mask, causal, 0.0,
                                        scale, None, visible=visible)
    assert_close_by_rule(out, plain[0], exact[0], f"out ({isa})")
    seen = torch.isfinite(exact[1])
    assert torch.equal(torch.isinf(lse), ~seen), "lse is +inf exactly where no key is visible"
    if seen.any():
        assert_close_by_rule(lse[seen], plain[1][seen], exact[1][seen], f"lse ({isa})")
    blind = ~seen.transpose(1, 2)  # (B, Sq, H): queries that see no key
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))


def _grads(fn, inputs, dout, dtype):
    """(out, *grads of inputs) of fn in dtype, by torch autograd."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(dtype))
    return (out, *(t.grad for t in leaves))


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("lengths_q, lengths_k, heads, window, causal", CASES)
def test_backward_matches_reference(isa, lengths_q, lengths_k, heads, window, causal, head_dim):
    lengths_k = lengths_k or lengths_q
    tq, tk = sum(lengths_q), sum(lengths_k)
    g = torch.Generator().manual_seed(sum(lengths_k) * 11 + head_dim)
    qkv = torch.randn(max(tq, tk), 3, heads, head_dim, generator=g)
    q, k, v = qkv[:tq, 0], qkv[:tk, 1], qkv[:tk, 2]
    dout = torch.randn(tq, heads, head_dim, generator=g)
    scale, cu_q, cu_k = head_dim ** -0.5, cu_of(lengths_q), cu_of(lengths_k)
    out, lse = cpu_attention.varlen_forward(q, k, v, cu_q, cu_k, causal, scale, window)
    grads = cpu_attention.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale,
                                          window)

    def fn(q, k, v):
        return reference_varlen(q, k, v, lengths_q, lengths_k, scale, causal, window, q.dtype)[0]
    plain = _grads(fn, (q, k, v), dout, torch.float32)
    exact = _grads(fn, (q, k, v), dout, torch.float64)
    for name, got, p, e in zip(("dq", "dk", "dv"), grads, plain[1:], exact[1:]):
        assert got.shape == p.shape and got.is_contiguous()
        assert_close_by_rule(got, p, e, f"{name} ({isa})")


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("mask_kind", ["none", "right", "left", "holes", "all padding"])
@pytest.mark.parametrize("batch, sq, sk, heads, window, causal", PADDED_CASES)
def test_padded_training_runs_the_kernel_forward_and_backward(isa, batch, sq, sk, heads, window,
                                                             causal, mask_kind, head_dim):
    """fastbert.attention's autograd path on the kernel (q, k, v strided views of one
    projection): output and every gradient by the rule; padding keys and queries that see
    nothing get zero gradients."""
    g = torch.Generator().manual_seed(batch * 100 + sq + sk + head_dim)
    qkv = torch.randn(batch, max(sq, sk), 3, heads, head_dim, generator=g)
    q, k, v = qkv[:, :sq, 0], qkv[:, :sk, 1], qkv[:, :sk, 2]
    dout = torch.randn(batch, sq, heads, head_dim, generator=g)
    mask = _padding_mask(mask_kind, batch, sk, g)
    calls = []
    forward, backward = cpu_attention.padded_forward, cpu_attention.padded_backward
    try:
        cpu_attention.padded_forward = lambda *a: calls.append("fwd") or forward(*a)
        cpu_attention.padded_backward = lambda *a: calls.append("bwd") or backward(*a)
        got = _grads(lambda q, k, v: fastbert.attention(q, k, v, mask, causal=causal,
                                                        window_size=window, backend="torch"),
                     (q, k, v), dout, torch.float32)
    finally:
        cpu_attention.padded_forward, cpu_attention.padded_backward = forward, backward
    assert calls == ["fwd", "bwd"]
    visible = reference.attention_visible(mask, causal, batch, sq, sk, q.device, window)

    def fn(q, k, v):
        return reference.attention_forward(q, k, v, mask, causal, 0.0, head_dim ** -0.5, None,
                                           visible=visible)[0]
    plain = _grads(fn, (q, k, v), dout, torch.float32)
    exact = _grads(fn, (q, k, v), dout, torch.float64)
    for name, a, p, e in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        assert_close_by_rule(a, p, e, f"{name} ({isa}, {mask_kind})")
    if mask is not None:
        assert not got[2][~mask].any() and not got[3][~mask].any(), "padding keys: zero grads"
    if visible is not None:
        blind = ~visible.any(-1).expand(batch, 1, sq)[:, 0]  # (B, Sq): queries that see no key
        assert not got[1][blind].any() and not got[0][blind].any(), "blind queries: zeros"


@pytest.mark.parametrize("queries_cut", [False, True])
def test_out_of_band_keys_and_queries_are_never_read(isa, queries_cut):
    """A local layer costs O(S * window): NaN outside every band changes no bit (forward and
    backward), as for the GPU kernels."""
    torch.manual_seed(4)
    assert cpu_attention.serves(*(torch.empty(1, 1, 1, 16),) * 3)
    check_out_of_band_tiles_are_never_read(TorchBackend, "cpu", 16, torch.float32, queries_cut)


def test_keys_no_sequence_holds_get_zero_gradients():
    q, k, v = (torch.randn(t, 2, 16) for t in (20, 26, 26))  # keys 20..25 in no sequence
    cu = cu_of([8, 12])
    out, lse = cpu_attention.varlen_forward(q, k, v, cu, cu, False, 0.25)
    stale = [torch.full_like(k, float("nan")) for _ in range(4)]
    del stale  # freed NaN buffers of dk's size: the allocator hands them out again
    dq, dk, dv = cpu_attention.varlen_backward(torch.randn_like(q), q, k, v, out, lse, cu, cu,
                                               False, 0.25)
    assert not dk[20:].any() and not dv[20:].any() and dk[:20].any()


def _packed_call(q, k, v, p):
    cu = cu_of([5, 7])
    return fastbert.attention_varlen(q, k, v, cu, cu, 7, 7, dropout_p=p)


@pytest.mark.parametrize("transform", ["grad", "vjp"])
@pytest.mark.parametrize("packed", [False, True])
def test_forward_and_backward_take_one_path_under_torch_func(transform, packed):
    """torch.func runs an autograd.Function's forward on unwrapped tensors and its backward on
    wrapped ones (vjp: after the transform exits): the public ops suspend the kernel for the
    forward and the backward refuses wrappers, so the gradient under torch.func (dropout
    included) is the one ATen's path gives under plain autograd."""
    shape = (12, 2, 16) if packed else (2, 12, 2, 16)
    q, k, v = (torch.randn(shape) for _ in range(3))

    def attend(q):
        return _packed_call(q, k, v, 0.3) if packed else fastbert.attention(q, k, v,
                                                                             dropout_p=0.3)
    names = ("varlen_forward", "varlen_backward") if packed else ("padded_forward",
                                                                   "padded_backward")
    kernels = [_counting(name) for name in names]
    try:
        torch.manual_seed(3)
        if transform == "grad":
            got = torch.func.grad(lambda q: attend(q).sum())(q)
        else:
            out, pullback = torch.func.vjp(attend, q)
            got, = pullback(torch.ones_like(out))
    finally:
        for name, (kernel, _) in zip(names, kernels):
            setattr(cpu_attention, name, kernel)
    assert not kernels[0][1] and not kernels[1][1]
    cpu_attention.set_enabled(False)
    try:
        torch.manual_seed(3)
        leaf = q.clone().requires_grad_()
        attend(leaf).sum().backward()
    finally:
        cpu_attention.set_enabled(True)
    torch.testing.assert_close(got, leaf.grad)


@pytest.mark.parametrize("mask_kind", ["left", "holes"])
@pytest.mark.parametrize("window", [(-1, -1), (6, 2)])
def test_padded_dropout_with_front_padding_and_windows(isa, mask_kind, window):
    """Rows whose first keys are padding (the kernel skips them: its dropout counter adds them
    back) and sliding windows, with dropout: forward and every gradient by the rule given the
    keep mask read off the output."""
    b, sq, sk, h, d, p, seed = 2, 20, 40, 2, 64, 0.3, 11
    mask = _padding_mask(mask_kind, b, sk, torch.Generator().manual_seed(5))
    scale = d ** -0.5
    keep, _ = attention_keep_mask(TorchBackend, "cpu", b, sq, sk, h, d, torch.float32, False,
                                  mask, p, seed, scale, window)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for s in (sq, sk, sk))
    dout = torch.randn(b, sq, h, d, generator=g)
    out, lse = TorchBackend.attention_forward(q, k, v, mask, False, p, scale, seed, window=window)
    grads = TorchBackend.attention_backward(dout, q, k, v, out, lse, mask, False, p, scale, seed,
                                            False, window=window)
    visible = reference.attention_visible(mask, False, b, sq, sk, "cpu", window)
    results = {}
    for name, dtype in (("plain", torch.float32), ("exact", torch.float64)):
        args = [t.to(dtype) for t in (q, k, v)]
        o, l = reference.attention_forward(*args, mask, False, p, scale, keep, visible=visible,
                                           upcast=False)
        results[name] = (o, *reference.attention_backward(dout.to(dtype), *args, o, l, mask,
                                                          False, p, scale, keep, upcast=False,
                                                          visible=visible))
    for i, (name, got) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *grads))):
        assert_close_by_rule(got, results["plain"][i], results["exact"][i], f"{name} ({isa})")


def test_double_backward_through_the_kernel_is_refused():
    q = torch.randn(2, 8, 2, 16, requires_grad=True)
    grad, = torch.autograd.grad(fastbert.attention(q, q, q).sum(), q)  # a plain backward
    assert grad.shape == q.shape
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(fastbert.attention(q, q, q).sum(), q, create_graph=True)


def _counting(name):
    """Replace cpu_attention.<name> with a wrapper counting its calls (restored by the caller)."""
    kernel, calls = getattr(cpu_attention, name), []
    setattr(cpu_attention, name, lambda *a: calls.append(name) or kernel(*a))
    return kernel, calls


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("b, sq, sk, h, d, causal, mask_mode", ATTENTION_DROPOUT_CASES)
def test_padded_dropout_matches_reference_with_its_mask(isa, b, sq, sk, h, d, causal, mask_mode,
                                                        p):
    """The kernel's keep mask read off its output (one-hot v), its rate, and forward and every
    gradient by the rule given that mask: the CUDA backend's dropout check, on the torch
    backend's CPU route."""
    kernels = [_counting(name) for name in ("padded_forward", "padded_backward")]
    try:
        check_attention_dropout(TorchBackend, "cpu", b, sq, sk, h, d, torch.float32, causal,
                                mask_mode, p)
    finally:
        for name, (kernel, _) in zip(("padded_forward", "padded_backward"), kernels):
            setattr(cpu_attention, name, kernel)
    assert kernels[0][1] and kernels[1][1], "the kernel ran forward and backward"


@pytest.mark.parametrize("causal", [False, True])
def test_packed_dropout_matches_reference_with_its_mask(isa, causal):
    kernels = [_counting(name) for name in ("varlen_forward", "varlen_backward")]
    try:
        check_attention_varlen([17, 0, 64, 40], [64, 5, 33, 40], 2, 64, torch.float32, causal,
                               p=0.3, backend=_TorchVarlen, device="cpu")
    finally:
        for name, (kernel, _) in zip(("varlen_forward", "varlen_backward"), kernels):
            setattr(cpu_attention, name, kernel)
    assert kernels[0][1] and kernels[1][1], "the kernel ran forward and backward"


def test_features_with_a_stride_are_copied_first():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(30, 2, 64, generator=g)[..., ::2] for _ in range(3))
    cu = cu_of([12, 18])
    assert cpu_attention.serves(q, k, v)
    out, _ = cpu_attention.varlen_forward(q, k, v, cu, cu, False, 0.2)
    want, _ = cpu_attention.varlen_forward(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu,
                                           False, 0.2)
    assert torch.equal(out, want)


def test_rotary_through_the_kernel_is_apply_rotary_then_attention():
    lengths = [20, 45]
    cu = cu_of(lengths)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(65, 2, 32, generator=g) for _ in range(3))
    angles = torch.arange(45.0).view(-1, 1) * torch.rand(1, 16, generator=g)
    cos, sin = angles.cos(), angles.sin()
    with torch.inference_mode():
        fused = fastbert.attention_varlen(q, k, v, cu, cu, 45, 45, window_size=(4, 4),
                                          rotary=(cos, sin))
        qr = fastbert.apply_rotary(q, cos, sin, cu_seqlens=cu, max_seqlen=45)
        kr = fastbert.apply_rotary(k, cos, sin, cu_seqlens=cu, max_seqlen=45)
        cpu_attention.set_enabled(False)
        try:
            aten = fastbert.attention_varlen(qr, kr, v, cu, cu, 45, 45, window_size=(4, 4))
        finally:
            cpu_attention.set_enabled(True)
    torch.testing.assert_close(fused, aten, rtol=1e-5, atol=1e-5)


def test_windows_wider_than_the_tokens_and_other_defaults():
    """A window wider than all tokens bounds nothing (no int32 wrap in the kernel's lanes), and
    the outputs are fp32 CPU tensors whatever torch's default dtype."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(50, 2, 16, generator=g) for _ in range(3))
    cu = cu_of([20, 30])
    full, _ = cpu_attention.varlen_forward(q, k, v, cu, cu, False, 0.25)
    for window in ((sys.maxsize, 0), (-1, sys.maxsize), (2 ** 40, 2 ** 40)):
        left, right = window
        want = reference_varlen(q, k, v, [20, 30], [20, 30], 0.25, False,
                                (-1 if left > 100 else left, -1 if right > 100 else right),
                                torch.float32)[0]
        got, _ = cpu_attention.varlen_forward(q, k, v, cu, cu, False, 0.25, window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out, lse = cpu_attention.varlen_forward(q, k, v, cu, cu, False, 0.25)
    finally:
        torch.set_default_dtype(before)
    assert out.dtype == lse.dtype == torch.float32 and torch.equal(out, full)


def test_what_the_kernel_does_not_take():
    q = torch.randn(10, 2, 32)
    assert cpu_attention.serves(q, q, q)
    assert not cpu_attention.serves(q.bfloat16(), q.bfloat16(), q.bfloat16())
    assert not cpu_attention.serves(q.double(), q.double(), q.double())
    odd = torch.randn(10, 2, 20)  # not a multiple of the vector width
    assert not cpu_attention.serves(odd, odd, odd)
    wide = torch.randn(10, 1, 272)
    assert not cpu_attention.serves(wide, wide, wide)
    assert not cpu_attention.serves(q, torch.randn(10, 3, 32), torch.randn(10, 3, 32))
    assert not cpu_attention.serves(q, q, q[:9])  # v shorter than k
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD: no tangent through C++
        assert not cpu_attention.serves(q, q, q)
    cpu_attention.set_enabled(False)
    try:
        assert not cpu_attention.serves(q, q, q)
        assert "set_enabled(False)" in cpu_attention.reason()
        assert "ATen" in cpu_attention.describe()
    finally:
        cpu_attention.set_enabled(True)


@pytest.mark.parametrize("cu_q, cu_k", [([0, 5, 11], [0, 5, 10]), ([0, 6, 3], [0, 6, 3]),
                                        ([1, 10], [1, 10]), ([0, 4, 9], [0, 4, 9]),
                                        ([0, 5, 10], [0, 10])])
def test_out_of_range_cu_seqlens_are_refused_before_any_read(cu_q, cu_k):
    q = torch.randn(10, 1, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        cpu_attention.varlen_forward(q, q, q, torch.tensor(cu_q), torch.tensor(cu_k), False, 0.25)
