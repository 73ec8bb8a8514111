"""fastbert.attention_varlen on the torch backend (the CPU path): against the reference run per
sequence, every gradient, fp64 gradcheck, empty sequences, dropout, argument checks, opcheck and
torch.compile. The Triton kernels have their own tests (test_triton_attention_varlen.py)."""
import math

import pytest
import torch

import fastbert
from fastbert import reference
from tests.helpers import assert_close_by_rule, assert_fp32_close

LENGTHS = [5, 0, 1, 17, 9]  # an empty sequence in the middle, a one-token one


def cu_of(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def per_sequence(q, k, v, lengths_q, lengths_k, causal, dtype=torch.float64):
    """The reference, one sequence at a time (B = 1, no mask): out (total_q, H, D)."""
    outs, sq0, sk0 = [], 0, 0
    for lq, lk in zip(lengths_q, lengths_k):
        qs, ks, vs = (t[a:a + n].to(dtype).unsqueeze(0) for t, a, n in
                      ((q, sq0, lq), (k, sk0, lk), (v, sk0, lk)))
        if lq:
            out, _ = reference.attention_forward(qs, ks, vs, None, causal, upcast=False)
            outs.append(out[0])
        sq0, sk0 = sq0 + lq, sk0 + lk
    return torch.cat(outs) if outs else q.new_zeros(0, *q.shape[1:]).to(dtype)


@pytest.fixture(params=["per-sequence", "padded", "fastbert-cpu-kernel"])
def cpu_path(request, monkeypatch):
    """Every CPU forward of the torch backend: ATen's fused attention once per run of
    equal-length sequences, or once on the padded grid (chosen by tokens per call; forced here),
    or fastbert's CPU kernel (fp32 where it is built; the others then run with it off)."""
    from fastbert import cpu_attention, varlen
    if request.param == "fastbert-cpu-kernel":
        if cpu_attention.reason() is not None:
            pytest.skip(cpu_attention.reason())
        return request.param
    monkeypatch.setattr(cpu_attention, "_enabled", False)
    monkeypatch.setattr(varlen, "MIN_TOKENS_PER_CALL", 0 if request.param == "per-sequence"
                        else 10 ** 9)
    return request.param


def per_sequence_lse(q, k, lengths_q, lengths_k, causal, scale):
    """(H, total_q) fp64 log-sum-exp of each query's visible scores; +inf where none is visible."""
    lses, sq0, sk0 = [], 0, 0
    for lq, lk in zip(lengths_q, lengths_k):
        qs, ks = q[sq0:sq0 + lq].double().unsqueeze(0), k[sk0:sk0 + lk].double().unsqueeze(0)
        if lq:
            lses.append(reference.attention_forward(qs, ks, ks, None, causal, softmax_scale=scale,
                                                    upcast=False)[1][0].double())
        sq0, sk0 = sq0 + lq, sk0 + lk
    return torch.cat(lses, 1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_per_sequence_forward_and_grads(dtype, causal, cpu_path):
    h, d = 3, 16
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, d, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = cu_of(LENGTHS)
    out = fastbert.attention_varlen(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def reference_run(run_dtype):
        leaves = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        ref = per_sequence(*leaves, LENGTHS, LENGTHS, causal, run_dtype)
        return ref, torch.autograd.grad(ref, leaves, dout.to(run_dtype))

    exact, exact_grads = reference_run(torch.float64)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, got, want in zip(names, (out, *grads), (exact, *exact_grads)):
            assert_fp32_close(got, want, name)
    else:
        plain, plain_grads = reference_run(dtype)
        for name, got, p, want in zip(names, (out, *grads), (plain, *plain_grads),
                                      (exact, *exact_grads)):
            assert_close_by_rule(got, p, want, name)


def test_cross_lengths_causal_is_bottom_right_per_sequence():
    lengths_q, lengths_k = [1, 3, 2], [4, 3, 6]  # a one-token query against a cache, ...
    h, d = 2, 8
    q = torch.randn(sum(lengths_q), h, d, dtype=torch.float64)
    k, v = (torch.randn(sum(lengths_k), h, d, dtype=torch.float64) for _ in range(2))
    out = fastbert.attention_varlen(q, k, v, cu_of(lengths_q), cu_of(lengths_k), 3, 6, causal=True)
    torch.testing.assert_close(out, per_sequence(q, k, v, lengths_q, lengths_k, True))


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_forward_out_and_lse_on_runs_of_equal_lengths_and_keyless_queries(causal, cpu_path):
    """The backend's (out, lse) against the fp64 reference: runs of equal lengths (one fused call
    each), empty sequences, and (without causal) a sequence whose queries have no key at all,
    which gives zeros and lse = +inf. Causal with len_q != len_k takes the padded path."""
    from fastbert.varlen import _TorchVarlen
    if causal:  # bottom-right aligned: the first query of sequence 1 sees no key
        lengths_q, lengths_k = [4, 4, 0, 3, 3, 3, 5], [4, 4, 0, 3, 3, 2, 6]
    else:
        lengths_q, lengths_k = [4, 4, 0, 3, 3, 3, 2], [4, 4, 0, 3, 0, 5, 5]
    h, d = 3, 16
    scale = d ** -0.5  # per_sequence's
    q = torch.randn(sum(lengths_q), h, d)
    k, v = (torch.randn(sum(lengths_k), h, d) for _ in range(2))
    out, lse = _TorchVarlen.attention_varlen_forward(
        q, k, v, cu_of(lengths_q), cu_of(lengths_k), max(lengths_q), max(lengths_k), causal, 0.0,
        scale, 0)
    exact = per_sequence(q, k, v, lengths_q, lengths_k, causal)
    exact_lse = per_sequence_lse(q, k, lengths_q, lengths_k, causal, scale)
    assert out.shape == q.shape and out.is_contiguous()
    assert lse.shape == (h, q.shape[0]) and lse.dtype == torch.float32 and lse.is_contiguous()
    keyless = torch.isinf(exact_lse)
    assert keyless.any()  # the case is in the test
    torch.testing.assert_close(torch.isinf(lse), keyless)
    assert (out.transpose(0, 1)[keyless] == 0).all()
    assert_fp32_close(out, exact, "out")
    assert_fp32_close(lse[~keyless], exact_lse[~keyless], "lse")


def test_gradcheck_fp64():
    lengths = [3, 0, 4]
    cu = cu_of(lengths)
    q, k, v = (torch.randn(7, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: fastbert.attention_varlen(q, k, v, cu, cu, 4, 4, causal=causal),
            (q, k, v))


def test_views_of_one_projection_and_an_upper_bound_max_seqlen():
    total, h, d = sum(LENGTHS), 2, 8
    qkv = torch.randn(total, 3, h, d)
    q, k, v = qkv.unbind(1)
    cu = cu_of(LENGTHS)
    a = fastbert.attention_varlen(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS))
    b = fastbert.attention_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 64, 64)
    torch.testing.assert_close(a, b)


def test_all_empty_and_zero_tokens():
    q = torch.randn(0, 2, 8, requires_grad=True)
    cu = cu_of([0, 0])
    out = fastbert.attention_varlen(q, q, q, cu, cu, 0, 0)
    assert out.shape == (0, 2, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_dropout_is_reproducible_and_backward_uses_the_same_mask():
    lengths = [6, 9]
    cu = cu_of(lengths)
    q, k = (torch.randn(15, 2, 16, dtype=torch.float64) for _ in range(2))
    # v = identity rows per key position: out then is the dropped, rescaled probability matrix
    v = torch.zeros(15, 2, 16, dtype=torch.float64)
    for b, (start, n) in enumerate(zip([0, 6], lengths)):
        v[start:start + n, :, :n] = torch.eye(n, dtype=torch.float64).unsqueeze(1)
    v.requires_grad_()
    torch.manual_seed(5)
    a = fastbert.attention_varlen(q, k, v, cu, cu, 9, 9, dropout_p=0.3, softmax_scale=0.5)
    torch.manual_seed(5)
    b = fastbert.attention_varlen(q, k, v, cu, cu, 9, 9, dropout_p=0.3, softmax_scale=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    dropped = (a[:, :, :9] == 0).double().mean().item()
    assert 0.15 < dropped < 0.45  # about 30 % of the visible probabilities
    # d out / d v[j] = P_dropped[:, j]: backward regenerated forward's mask
    (gv,) = torch.autograd.grad(a, v, torch.ones_like(a))
    for start, n in zip([0, 6], lengths):
        colsum = a[start:start + n, :, :n].sum(0)  # (H, keys): column sums of dropped P
        torch.testing.assert_close(gv[start:start + n, :, 0], colsum.t())


@pytest.mark.parametrize("call, words", [
    (lambda q, cu: fastbert.attention_varlen(q, q, q, cu.long(), cu, 4, 4), "torch.int32"),
    (lambda q, cu: fastbert.attention_varlen(q, q, q, cu.flip(0), cu, 4, 4), "never decrease"),
    (lambda q, cu: fastbert.attention_varlen(q, q, q, cu[:-1], cu[:-1], 4, 4), "last entry"),
    (lambda q, cu: fastbert.attention_varlen(q, q, q, cu, cu, 2, 4), "max_seqlen_q"),
    (lambda q, cu: fastbert.attention_varlen(q, q, q, cu, cu, 4.0, 4), "max_seqlen_q"),
    (lambda q, cu: fastbert.attention_varlen(q[0], q, q, cu, cu, 4, 4), "3-D"),
    (lambda q, cu: fastbert.attention_varlen(q, q.half(), q, cu, cu, 4, 4), "one dtype"),
    (lambda q, cu: fastbert.attention_varlen(q, q[:, :1], q, cu, cu, 4, 4), "'k' and 'v'"),
    (lambda q, cu: fastbert.attention_varlen(q, q, q, cu.view(1, -1), cu, 4, 4), "1-D"),
    (lambda q, cu: fastbert.attention_varlen(q, q, q, cu, cu, 4, 4, dropout_p=1.0), "dropout_p"),
])
def test_bad_input_is_named(call, words):
    q = torch.randn(7, 2, 8)
    cu = cu_of([3, 4])
    with pytest.raises((ValueError, TypeError), match=words) as info:
        call(q, cu)
    assert "fastbert.attention_varlen" in str(info.value)


def test_opcheck_and_compile_fullgraph():
    cu = cu_of([3, 0, 4])
    q, k, v = (torch.randn(7, 2, 8, requires_grad=True) for _ in range(3))
    from fastbert import varlen
    seed = None
    torch.library.opcheck(varlen._varlen_fwd, (q, k, v, cu, cu, 4, 4, True, 0.0, 8 ** -0.5, seed,
                                               False, "torch"))
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: fastbert.attention_varlen(q, k, v, cu, cu, 4, 4,
                                                                 causal=True),
                       fullgraph=True, backend="aot_eager")
    got = fn(q, k, v)
    got.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = fastbert.attention_varlen(q, k, v, cu, cu, 4, 4, causal=True)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


def test_default_scale_is_inverse_sqrt_head_dim():
    cu = cu_of([5])
    q, k, v = (torch.randn(5, 1, 9, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(fastbert.attention_varlen(q, k, v, cu, cu, 5, 5),
                               fastbert.attention_varlen(q, k, v, cu, cu, 5, 5,
                                                         softmax_scale=1 / math.sqrt(9)))


def test_layout_is_reused_across_calls_and_rebuilt_when_cu_seqlens_change():
    from fastbert import varlen
    cu = cu_of([3, 4])
    q = torch.randn(7, 2, 8)
    with torch.inference_mode():  # inference tensors have no version counter
        cu_inf = cu_of([3, 4])
        fastbert.attention_varlen(q, q, q, cu_inf, cu_inf, 4, 4)
    first = varlen._layout(q, q, cu, cu, 4, 4, False)
    assert varlen._layout(q, q, cu, cu, 4, 4, False) is first
    a = fastbert.attention_varlen(q, q, q, cu, cu, 4, 4)
    cu.copy_(cu_of([5, 2]))  # written in place: the cached layout no longer applies
    assert varlen._layout(q, q, cu, cu, 5, 5, False) is not first
    b = fastbert.attention_varlen(q, q, q, cu, cu, 5, 5)
    torch.testing.assert_close(b, fastbert.attention_varlen(q, q, q, cu_of([5, 2]),
                                                            cu_of([5, 2]), 5, 5))
    assert not torch.allclose(a, b)
