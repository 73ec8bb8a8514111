"""Triton variable-length (packed) attention vs fastbert.reference applied per sequence.

- interpreter: the kernels on CPU tensors under TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 python -m
  pytest -m interpreter tests/test_triton_attention_varlen.py`): lengths 0, 1, 17, 130 mixed in one
  batch, causal and not, head dims 16..64, every dtype, dropout, both dQ paths
- compile: the varlen kernel variants compile ahead of time for sm_80 and sm_90

Kernel-level checks call fastbert.triton.attention_varlen directly, with the arguments ops.py
passes after validation (q, k, v (total, H, D) with unit last stride, int32 cu_seqlens).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from fastbert import reference
from fastbert.triton import attention as kernels
from fastbert.triton import attention_varlen as varlen
from tests.helpers import assert_close_by_rule, assert_fp32_close, poison_, rule_factor
from tests.test_triton_attention import compile_all_kernels

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel forgets to write
    fails the comparison."""
    monkeypatch.setattr(kernels, "_alloc",
                        lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype,
                                                                         device=device)))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def cu_seqlens(lengths, device=DEVICE):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def make_varlen(lens_q, lens_k, h, d, dtype, packed=False, device=DEVICE):
    """q (total_q, H, D), k, v (total_k, H, D); packed: strided views of one (total, 3, H, D)."""
    if packed:
        assert list(lens_q) == list(lens_k)
        return torch.randn(sum(lens_q), 3, h, d, dtype=dtype, device=device).unbind(1)
    return tuple(torch.randn(sum(lens), h, d, dtype=dtype, device=device)
                 for lens in (lens_q, lens_k, lens_k))


def per_sequence(lens_q, lens_k):
    """(b, query rows, key rows) of every sequence."""
    cq, ck = cu_seqlens(lens_q, "cpu").tolist(), cu_seqlens(lens_k, "cpu").tolist()
    return [(b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(lens_q))]


def reference_varlen(dout, q, k, v, lens_q, lens_k, causal, p, scale, keep=None, upcast=True):
    """The reference on each sequence as a batch of one -> (out, lse (H, total_q), dq, dk, dv).
    keep: per sequence b, its (1, H, Lq, Lk) dropout keep-mask."""
    h, d = q.shape[1:]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, dq, dk, dv = (torch.zeros_like(t) for t in (q, q, k, v))
    lse = torch.full((h, q.shape[0]), float("inf"), dtype=acc, device=q.device)
    for b, rq, rk in per_sequence(lens_q, lens_k):
        if rq.stop == rq.start or rk.stop == rk.start:  # no (query, key) pair: zeros, lse +inf
            continue
        args = [t[r].unsqueeze(0) for t, r in ((q, rq), (k, rk), (v, rk))]
        mask_b = None if keep is None else keep[b]
        o, l = reference.attention_forward(*args, None, causal, p, scale, mask_b, upcast=upcast)
        grads = reference.attention_backward(dout[rq].unsqueeze(0), *args, o, l, None, causal, p,
                                             scale, mask_b, upcast=upcast)
        out[rq], lse[:, rq] = o[0], l[0]
        dq[rq], dk[rk], dv[rk] = (g[0] for g in grads)
    return out, lse, dq, dk, dv


def unseen(lens_q, lens_k, causal, total_q, total_k):
    """(queries that see no key (total_q,), keys no query sees (total_k,)) as bool."""
    no_key = torch.ones(total_q, dtype=torch.bool)
    no_query = torch.ones(total_k, dtype=torch.bool)
    for b, rq, rk in per_sequence(lens_q, lens_k):
        lq, lk = rq.stop - rq.start, rk.stop - rk.start
        visible = reference.attention_visible(None, causal, 1, lq, lk, "cpu")
        if visible is None:
            visible = torch.ones(1, 1, lq, lk, dtype=torch.bool)
        no_key[rq] = ~visible[0, 0].any(1)
        no_query[rk] = ~visible[0, 0].any(0)
    return no_key, no_query


def run_kernels(q, k, v, dout, lens_q, lens_k, causal, p, scale, seed, deterministic,
                extra_max=0):
    """The varlen forward and backward; extra_max raises max_seqlen above every real length (an
    upper bound is allowed; the grid's extra tiles must do nothing)."""
    cu_q, cu_k = cu_seqlens(lens_q, q.device), cu_seqlens(lens_k, q.device)
    max_q, max_k = max(lens_q, default=0) + extra_max, max(lens_k, default=0) + extra_max
    out, lse = varlen.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, p,
                                               scale, seed)
    grads = varlen.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                             causal, p, scale, seed, deterministic)
    return (out, lse) + tuple(grads)


def compare(got, q, k, v, dout, lens_q, lens_k, causal, p, scale, keep=None):
    """Forward, lse and every gradient vs the fp64 reference by the tolerance rule."""
    out, lse, dq, dk, dv = got
    dtype = q.dtype
    exact = reference_varlen(*(t.double() for t in (dout, q, k, v)), lens_q, lens_k, causal, p,
                             scale, keep)
    finite = torch.isfinite(exact[1])
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("inf")).all()
    torch.testing.assert_close(lse[finite].double(), exact[1][finite], rtol=1e-5, atol=1e-5)
    names = ("out", "dq", "dk", "dv")
    exact = (exact[0],) + exact[2:]
    if dtype == torch.float32:
        for name, g, e in zip(names, (out, dq, dk, dv), exact):
            assert_fp32_close(g, e, name)
    else:
        plain = reference_varlen(dout, q, k, v, lens_q, lens_k, causal, p, scale, keep,
                                 upcast=False)
        plain = (plain[0],) + plain[2:]
        for name, g, pl, e in zip(names, (out, dq, dk, dv), plain, exact):
            assert_close_by_rule(g, pl, e, name, factor=rule_factor(dtype))


def check_varlen(lens_q, lens_k, h, d, dtype, causal, packed, deterministic, extra_max=0):
    q, k, v = make_varlen(lens_q, lens_k, h, d, dtype, packed)
    dout = torch.randn(q.shape, dtype=dtype, device=q.device)
    scale = 1.0 / math.sqrt(d)
    got = run_kernels(q, k, v, dout, lens_q, lens_k, causal, 0.0, scale, 0, deterministic,
                      extra_max)
    out, lse, dq, dk, dv = got
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (h, q.shape[0]) and lse.dtype == torch.float32 and lse.is_contiguous()
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and g.dtype == dtype and g.is_contiguous()
    compare(got, q, k, v, dout, lens_q, lens_k, causal, 0.0, scale)
    # nothing visible -> exact zeros
    no_key, no_query = unseen(lens_q, lens_k, causal, q.shape[0], k.shape[0])
    assert (out[no_key.to(q.device)] == 0).all() and (dq[no_key.to(q.device)] == 0).all()
    assert (dk[no_query.to(q.device)] == 0).all() and (dv[no_query.to(q.device)] == 0).all()


# --------------------------------------------------------------------------------------------
# interpreter tier
# --------------------------------------------------------------------------------------------

# (lengths q, lengths k, H, D, dtype, causal, packed QKV, deterministic, max_seqlen slack):
# lengths 0, 1, 17, 130 mixed in one batch; Lq != Lk both ways under causal (bottom-right: a
# query may see no key); a length-0 key sequence under queries; max_seqlen above every length.
VARLEN_CASES = [
    ((0, 1, 17, 130), (0, 1, 17, 130), 2, 16, F32, False, True, False, 0),
    ((130, 17, 0, 1), (130, 17, 0, 1), 1, 32, F16, True, True, True, 0),
    ((17, 0, 130, 1), (130, 5, 17, 0), 1, 40, BF16, True, False, False, 0),
    ((1, 130, 0, 17), (17, 130, 0, 1), 1, 64, F32, True, False, True, 70),
    ((17, 1, 130, 0), (1, 17, 130, 9), 2, 64, F16, False, False, True, 0),
    ((0, 17, 1, 130), (0, 17, 1, 130), 1, 32, BF16, False, True, False, 33),
]


def _case_id(case):
    lq, lk, h, d, dtype, causal, packed, det, extra = case
    return (f"q{'-'.join(map(str, lq))}_k{'-'.join(map(str, lk))}-H{h}-D{d}-{str(dtype)[6:]}"
            + ("-causal" if causal else "") + ("-packed" if packed else "")
            + ("-det" if det else "-atomic") + (f"-max+{extra}" if extra else ""))


@pytest.mark.interpreter
@pytest.mark.parametrize("case", VARLEN_CASES, ids=_case_id)
def test_varlen_forward_backward_vs_reference(case):
    check_varlen(*case)


@pytest.mark.interpreter
@pytest.mark.parametrize("lens_q,lens_k", [((), ()), ((0, 0), (0, 0)), ((3, 0), (0, 4))])
def test_varlen_empty(lens_q, lens_k):
    """No sequences, only empty ones, or queries without keys: zeros and lse = +inf, no NaN."""
    q, k, v = make_varlen(lens_q, lens_k, 2, 16, F32)
    for det in (False, True):
        out, lse, dq, dk, dv = run_kernels(q, k, v, torch.randn_like(q), lens_q, lens_k, True,
                                           0.0, 0.25, 0, det)
        for t in (out, dq, dk, dv):
            assert (t == 0).all()
        assert (lse == float("inf")).all() and lse.shape == (2, q.shape[0])


@pytest.mark.interpreter
def test_varlen_deterministic_is_bitwise_reproducible():
    lens = (17, 130, 0, 1)
    q, k, v = make_varlen(lens, lens, 2, 40, F16, packed=True)
    dout = torch.randn(q.shape, dtype=q.dtype)
    runs = [run_kernels(q, k, v, dout, lens, lens, True, 0.1, 0.125, 5, True) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.interpreter
def test_use_deterministic_algorithms_selects_the_deterministic_dq(monkeypatch):
    """torch.use_deterministic_algorithms(True) must route deterministic=False to the dQ pass
    without atomics, dense and varlen, with the same bits as deterministic=True."""
    launches = []
    real = kernels._attn_bwd_dq_kernel

    class Recording:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]
    monkeypatch.setattr(kernels, "_attn_bwd_dq_kernel", Recording())
    lens = (17, 5)
    q, k, v = make_varlen(lens, lens, 1, 16, F32)
    dout = torch.randn_like(q)
    dense = [t.view(1, *t.shape) for t in (q, k, v, dout)]
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        forced_varlen = run_kernels(q, k, v, dout, lens, lens, False, 0.0, 0.25, 0, False)
        out, lse = kernels.attention_forward(*dense[:3], None, False, 0.0, 0.25, 0)
        forced_dense = kernels.attention_backward(dense[3], *dense[:3], out, lse, None, False,
                                                  0.0, 0.25, 0, False)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(launches) == 2
    chosen = run_kernels(q, k, v, dout, lens, lens, False, 0.0, 0.25, 0, True)
    assert all(torch.equal(a, b) for a, b in zip(forced_varlen, chosen))
    assert len(launches) == 3
    kernels.attention_backward(dense[3], *dense[:3], out, lse, None, False, 0.0, 0.25, 0, False)
    assert len(launches) == 3  # the atomic path when neither asks for determinism
    assert torch.equal(forced_dense[0], kernels.attention_backward(
        dense[3], *dense[:3], out, lse, None, False, 0.0, 0.25, 0, True)[0])


def recover_keep(lens_q, lens_k, h, d, causal, p, seed, extra_max=0):
    """The kernel's dropout keep-mask per sequence, (1, H, Lq, Lk) each: with v = identity rows
    (every Lk <= D), query i's output row is its dropped probability row, nonzero exactly where a
    visible key was kept. -> (dropped, undropped probabilities) lists per sequence."""
    assert max(lens_k) <= d
    q, k, _ = make_varlen(lens_q, lens_k, h, d, F32)
    eye = torch.zeros(k.shape, dtype=F32, device=k.device)
    cu_k = cu_seqlens(lens_k, "cpu").tolist()
    for b, lk in enumerate(lens_k):
        eye[cu_k[b] + torch.arange(lk), :, torch.arange(lk)] = 1.0
    scale = 1.0 / math.sqrt(d)
    out = run_kernels(q, k, eye, torch.zeros_like(q), lens_q, lens_k, causal, p, scale, seed,
                      True, extra_max)[0]
    probs = reference_varlen(torch.zeros_like(q).double(), q.double(), k.double(), eye.double(),
                             lens_q, lens_k, causal, 0.0, scale)[0]
    dropped, undropped = [], []
    for b, rq, rk in per_sequence(lens_q, lens_k):
        lk = rk.stop - rk.start
        dropped.append(out[rq, :, :lk].permute(1, 0, 2).unsqueeze(0))  # (1, H, Lq, Lk)
        undropped.append(probs[rq, :, :lk].permute(1, 0, 2).unsqueeze(0))
    return dropped, undropped


@pytest.mark.interpreter
def test_varlen_dropout_keep_rate_scaling_and_seed():
    lens, h, d, p = (0, 1, 17, 60), 2, 64, 0.3
    dropped, probs = recover_keep(lens, lens, h, d, False, p, seed=1234)
    kept = torch.cat([x.flatten() for x in dropped]) != 0
    rate = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma}"
    for x, pr in zip(dropped, probs):  # kept probabilities scaled by 1/(1-p), dropped exactly 0
        keep = x != 0
        torch.testing.assert_close(x.double()[keep], pr[keep] / (1 - p), rtol=1e-5, atol=1e-6)
    keep60 = dropped[3] != 0  # the mask differs between heads and between query rows
    assert not torch.equal(keep60[0, 0], keep60[0, 1])
    assert not torch.equal(keep60[0, 0, 0], keep60[0, 0, 1])
    # same seed -> the same mask; another seed -> another
    again, _ = recover_keep(lens, lens, h, d, False, p, seed=1234)
    other, _ = recover_keep(lens, lens, h, d, False, p, seed=99)
    assert all(torch.equal(a != 0, b != 0) for a, b in zip(dropped, again))
    assert not torch.equal(dropped[3] != 0, other[3] != 0)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,causal,deterministic,seed,extra_max", [
    (F32, False, True, 7, 0),
    (F16, True, False, 2 ** 40 + 3, 5),  # a 64-bit seed, as ops.py draws them; max_seqlen slack
    (BF16, True, True, 11, 0),
], ids=["f32", "f16-causal-seed64-slack", "bf16-causal"])
def test_varlen_dropout_backward_uses_forward_mask(dtype, causal, deterministic, seed, extra_max):
    """Recover the kernel's keep-mask, then the kernel's forward and all three gradients on fresh
    inputs with the same seed must match the reference given that mask."""
    lens_q, lens_k, h, d, p = (20, 0, 1, 48), (33, 4, 0, 48), 2, 64, 0.25
    dropped, probs = recover_keep(lens_q, lens_k, h, d, causal, p, seed, extra_max)
    keep = [(x != 0) | (pr == 0) for x, pr in zip(dropped, probs)]  # P = 0: the bit is moot
    q, k, v = make_varlen(lens_q, lens_k, h, d, dtype)
    dout = torch.randn(q.shape, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    got = run_kernels(q, k, v, dout, lens_q, lens_k, causal, p, scale, seed, deterministic,
                      extra_max)
    compare(got, q, k, v, dout, lens_q, lens_k, causal, p, scale, keep)


@pytest.mark.interpreter
def test_end_to_end_through_fastbert_attention_varlen():
    """The public op with backend="triton" (autograd, packed QKV views) vs backend="torch"."""
    import fastbert
    lens = (5, 0, 17, 1)
    cu = cu_seqlens(lens)
    qkv = torch.randn(sum(lens), 3, 2, 32, requires_grad=True)
    results = {}
    for backend in ("triton", "torch"):
        qkv.grad = None
        q, k, v = qkv.unbind(1)
        out = fastbert.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                        backend=backend)
        out.backward(torch.ones_like(out))
        results[backend] = (out.detach(), qkv.grad.clone())
    assert_fp32_close(results["triton"][0], results["torch"][0], "out")
    assert_fp32_close(results["triton"][1], results["torch"][1], "dqkv")


def test_unsupported_varlen():
    for dtype in (F16, BF16, F32):
        assert varlen.unsupported(dtype=dtype, head_dim=64, dropout_p=0.1, causal=True) is None
    assert "float64" in varlen.unsupported(dtype=torch.float64, head_dim=64)
    assert "257" in varlen.unsupported(dtype=F16, head_dim=257)
    from fastbert import triton as backend
    assert backend.unsupported("fastbert.attention_varlen", dtype=F16, head_dim=32,
                               dropout_p=0.0, causal=False) is None


# --------------------------------------------------------------------------------------------
# gpu tier
# --------------------------------------------------------------------------------------------

# BERT-base/large shapes, packed: lengths spread over (0, 512], one empty, one single token
GPU_LENGTHS = (512, 300, 1, 0, 129, 64, 511, 200)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,h,causal,deterministic", [
    (F16, 12, False, False), (BF16, 16, False, True), (BF16, 12, True, False),
    (F32, 4, False, True),
], ids=["f16", "bf16-det", "bf16-causal", "f32-det"])
def test_gpu_varlen_vs_reference(dtype, h, causal, deterministic):
    check_varlen(GPU_LENGTHS, GPU_LENGTHS, h, 64, dtype, causal, True, deterministic)


@pytest.mark.gpu
def test_gpu_varlen_dropout_repeatable():
    lens = GPU_LENGTHS
    q, k, v = make_varlen(lens, lens, 12, 64, BF16, packed=True)
    dout = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    runs = [run_kernels(q, k, v, dout, lens, lens, False, 0.1, 0.125, 2 ** 50 + 1, True)
            for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# compile tier
# --------------------------------------------------------------------------------------------

# The varlen variants BERT launches (fp16/bf16, head dims 32/64/128, training with dropout and
# the causal LM) on both targets; fp32 once with every flag.
@pytest.mark.compile
@pytest.mark.parametrize("target", [80, 90])
@pytest.mark.parametrize("dtype,head_dim,causal,dropout", [
    (F16, 64, False, True), (BF16, 32, True, False), (BF16, 128, True, True), (F32, 64, True, True),
], ids=lambda x: str(x)[6:] if isinstance(x, torch.dtype) else None)
def test_compile_varlen(target, dtype, head_dim, causal, dropout):
    compile_all_kernels(dtype, head_dim, target, causal, False, dropout, preprocess=False,
                        varlen=True)
