"""The CUDA attention kernels (dense and packed varlen, with and without dropout) vs
fastbert.reference.

- gpu: forward and all gradients, by the tolerance rule (tests/helpers.py) against an fp64
  reference, odd shapes, padding masks with a fully padded row, causal with Sq != Sk,
  packed-QKV views, both attention dQ paths (atomic, deterministic), packed varlen attention with
  empty sequences, determinism, the public ops with backend="cuda".
  Dropout: the kernels' keep mask is read off their output (see attention_keep_mask), then
  forward and every gradient are compared with the reference given that mask; keep rate,
  1 / (1 - p) scaling, same seed -> same bits, torch.manual_seed.
  The checks take the backend module and device as arguments, so their logic can be run on CPU
  with the torch backend in place of fastbert.cuda.
- compile: the real launchers and kernels run on CPU under the host emulation
  (tests/cuda_emulation.py) through fastbert/cuda.py, checked by the gpu tier's own check
  functions, and every call by the emulation's memcheck, racecheck and synccheck. They come last
  in this file: their module-scoped fixture swaps fastbert.cuda's extension for the emulation
  until the module ends.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastbert
from fastbert import cuda as cuda_backend
from fastbert import reference
from fastbert import ops
from tests.cuda_helpers import assert_keep_rate, philox4x32_10
from tests.cuda_helpers import emulated_backend  # noqa: F401 (fixture)
# autouse fixtures: imported, so they apply to every test in this module
from tests.cuda_helpers import extension_runs_here, poisoned_outputs  # noqa: F401
from tests.helpers import assert_close_by_rule, random_padding_mask


# --------------------------------------------------------------------------------------------
# gpu: attention
# --------------------------------------------------------------------------------------------

def make_qkv(b, sq, sk, h, d, dtype, packed=False, device="cuda"):
    """q (B, Sq, H, D), k, v (B, Sk, H, D); packed: strided views of one (B, S, 3, H, D) tensor."""
    if packed:
        assert sq == sk
        return torch.randn(b, sq, 3, h, d, dtype=dtype, device=device).unbind(2)
    return tuple(torch.randn(b, s, h, d, dtype=dtype, device=device) for s in (sq, sk, sk))


def check_attention(b, sq, sk, h, d, dtype, causal, mask_mode, packed=False, device="cuda",
                    window=ops.FULL_WINDOW, mask=None):
    """`window` (left, right): flash-attn's sliding window; `mask` replaces mask_mode's."""
    q, k, v = make_qkv(b, sq, sk, h, d, dtype, packed, device)
    if mask is None and mask_mode is not None:
        mask = random_padding_mask(b, sk, device, mode=mask_mode)
    scale = 1.0 / math.sqrt(d)
    dout = torch.randn(b, sq, h, d, dtype=dtype, device=device)

    out, lse = cuda_backend.attention_forward(q, k, v, mask, causal, 0.0, scale, 0, window=window)
    dq, dk, dv = cuda_backend.attention_backward(dout, q, k, v, out, lse, mask, causal, 0.0,
                                                 scale, 0, False, window=window)
    # deterministic: dQ from its own kernel (no atomics); dK and dV are the same computation
    dq_det, dk_det, dv_det = cuda_backend.attention_backward(dout, q, k, v, out, lse, mask, causal,
                                                             0.0, scale, 0, True, window=window)
    assert torch.equal(dk, dk_det) and torch.equal(dv, dv_det)
    assert out.shape == (b, sq, h, d) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and g.dtype == dtype and g.is_contiguous()

    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    vis = reference.attention_visible(mask, causal, b, sq, sk, device, window)
    exact_out, exact_lse = reference.attention_forward(q64, k64, v64, mask, causal, 0.0, scale,
                                                       visible=vis)
    exact = reference.attention_backward(do64, q64, k64, v64, exact_out, exact_lse, mask, causal,
                                         0.0, scale, visible=vis)
    plain_out, plain_lse = reference.attention_forward(q, k, v, mask, causal, 0.0, scale,
                                                       upcast=False, visible=vis)
    plain = reference.attention_backward(dout, q, k, v, plain_out, plain_lse, mask, causal, 0.0,
                                         scale, upcast=False, visible=vis)
    tag = f"b{b} sq{sq} sk{sk} h{h} d{d} {dtype} causal={causal} mask={mask_mode} window={window}"
    assert_close_by_rule(out, plain_out, exact_out, f"out [{tag}]")
    for name, got, p, e in zip(("dq", "dk", "dv"), (dq, dk, dv), plain, exact):
        assert_close_by_rule(got, p, e, f"{name} [{tag}]")
    assert_close_by_rule(dq_det, plain[0], exact[0], f"deterministic dq [{tag}]")

    # lse: +inf exactly where a query sees no key, fp32-accurate elsewhere; zeros there
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), tag
    assert (lse[~finite] == float("inf")).all(), tag
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], rtol=0, atol=2e-3)
    empty_q = (~finite).transpose(1, 2)  # (B, Sq, H)
    assert (out[empty_q] == 0).all() and (dq[empty_q] == 0).all(), tag
    assert (dq_det[empty_q] == 0).all(), tag
    return vis


ATTENTION_CASES = [
    # b, sq, sk, h, causal, mask mode
    (2, 128, 128, 3, False, None),
    (2, 17, 17, 2, False, "with_empty"),  # fully padded row, one partial tile
    (3, 130, 130, 2, False, "random"),    # tile boundary + 2
    (1, 1, 1, 1, False, None),
    (2, 77, 77, 2, True, "third"),
    (2, 40, 100, 2, True, None),          # Sq < Sk: bottom-right aligned
    (2, 100, 40, 2, True, "with_empty"),  # Sq > Sk: the first 60 queries see no key
    (1, 1, 257, 2, True, "random"),       # one decoding step against a cache
    (2, 65, 191, 2, False, "random"),     # Sq != Sk, not causal
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
@pytest.mark.parametrize("d", cuda_backend.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("b, sq, sk, h, causal, mask_mode", ATTENTION_CASES)
def test_attention_matches_reference(b, sq, sk, h, causal, mask_mode, d, dtype):
    check_attention(b, sq, sk, h, d, dtype, causal, mask_mode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
def test_attention_bert_shapes(dtype):
    check_attention(8, 512, 512, 12, 64, dtype, False, "third")
    check_attention(2, 384, 384, 16, 128, dtype, True, "random")


@pytest.mark.gpu
@pytest.mark.parametrize("d", cuda_backend.ATTENTION_HEAD_DIMS)
def test_attention_packed_qkv_views(d):
    check_attention(2, 67, 67, 3, d, torch.float16, False, "random", packed=True)


@pytest.mark.gpu
def test_attention_is_deterministic():
    q, k, v = make_qkv(2, 300, 300, 4, 64, torch.bfloat16)
    mask = random_padding_mask(2, 300, "cuda")
    dout = torch.randn_like(q)
    runs = []
    for _ in range(3):
        out, lse = cuda_backend.attention_forward(q, k, v, mask, False, 0.0, 0.125, 0)
        runs.append((out, lse) + cuda_backend.attention_backward(
            dout, q, k, v, out, lse, mask, False, 0.0, 0.125, 0, True))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
def test_public_attention_op_runs_these_kernels(dtype):
    """fastbert.attention(backend="cuda") with packed views and autograd gives bit for bit what
    the (separately validated) kernel entry points give."""
    b, s, h, d = 2, 45, 4, 32
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype, device="cuda", requires_grad=True)
    mask = random_padding_mask(b, s, "cuda", mode="with_empty")
    dout = torch.randn(b, s, h, d, dtype=dtype, device="cuda")
    q, k, v = qkv.unbind(2)
    out = fastbert.attention(q, k, v, mask, causal=True, softmax_scale=0.2, deterministic=True,
                             backend="cuda")
    out.backward(dout)

    q, k, v = qkv.detach().unbind(2)
    want_out, lse = cuda_backend.attention_forward(q, k, v, mask, True, 0.0, 0.2, 0)
    grads = cuda_backend.attention_backward(dout, q, k, v, want_out, lse, mask, True, 0.0, 0.2,
                                            0, True)
    assert torch.equal(out, want_out)
    assert torch.equal(qkv.grad, torch.stack(grads, dim=2))


# --------------------------------------------------------------------------------------------
# gpu: packed (varlen) attention
# --------------------------------------------------------------------------------------------

def _cu(lengths, device="cuda"):
    return torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)


def _packed_qkv(lens_q, lens_k, h, d, dtype, scale_by=1.0, device="cuda"):
    """q (total_q, H, D), k, v (total_k, H, D) as strided views of packed tensors, as a model
    passes them (never copied)."""
    total_q, total_k = sum(lens_q), sum(lens_k)
    if list(lens_q) == list(lens_k):
        q, k, v = (scale_by * torch.randn(total_q, 3, h, d, dtype=dtype, device=device)).unbind(1)
    else:
        q = scale_by * torch.randn(total_q, h, d, dtype=dtype, device=device)
        k, v = (scale_by * torch.randn(total_k, 2, h, d, dtype=dtype, device=device)).unbind(1)
    return q, k, v


def varlen_reference(q, k, v, dout, lens_q, lens_k, causal, p, scale, keeps, upcast,
                     window=ops.FULL_WINDOW):
    """Per sequence, the dense reference; results packed like the kernels' (lse (H, total_q))."""
    parts = [[], [], [], [], []]
    qa = ka = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qb, dob = q[qa:qa + lq][None], dout[qa:qa + lq][None]
        kb, vb = k[ka:ka + lk][None], v[ka:ka + lk][None]
        keep = keeps[b] if p > 0 else None
        vis = reference.attention_visible(None, causal, 1, lq, lk, q.device, window)
        out, lse = reference.attention_forward(qb, kb, vb, None, causal, p, scale, keep,
                                               upcast=upcast, visible=vis)
        grads = reference.attention_backward(dob, qb, kb, vb, out, lse, None, causal, p, scale,
                                             keep, upcast=upcast, visible=vis)
        for lst, t in zip(parts, (out[0], lse[0]) + tuple(g[0] for g in grads)):
            lst.append(t)
        qa, ka = qa + lq, ka + lk
    out, lse, dq, dk, dv = (torch.cat(lst, dim=1 if i == 1 else 0) for i, lst in enumerate(parts))
    return out, lse, (dq, dk, dv)


def varlen_keep_masks(backend, device, lens_q, lens_k, h, d, dtype, causal, p, seed, scale,
                      slack, window=ops.FULL_WINDOW):
    """The kernels' keep masks per sequence (1, H, Sq_b, Sk_b), read off the output with one-hot
    value rows (as attention_keep_mask does for the dense op; needs every Sk_b <= D)."""
    assert max(lens_k) <= d
    q, k, _ = _packed_qkv(lens_q, lens_k, h, d, dtype, scale_by=0.5, device=device)
    v = torch.cat([torch.eye(lk, d, dtype=dtype, device=device)[:, None, :].expand(lk, h, d)
                   for lk in lens_k])
    out, _ = backend.attention_varlen_forward(q, k, v, _cu(lens_q, device), _cu(lens_k, device),
                                              max(lens_q) + slack, max(lens_k) + slack, causal,
                                              p, scale, seed, window=window)
    probs, _, _ = varlen_reference(q.double(), k.double(), v.double(), q.double(), lens_q,
                                   lens_k, causal, 0.0, scale, None, upcast=True, window=window)
    keeps, qa = [], 0
    for lq, lk in zip(lens_q, lens_k):
        dropped = out[qa:qa + lq, :, :lk].transpose(0, 1).double()[None]  # (1, H, Sq_b, Sk_b)
        ref = probs[qa:qa + lq, :, :lk].transpose(0, 1)[None]
        visible = ref > 0
        keep = (dropped != 0) | ~visible
        assert (dropped[~visible] == 0).all()
        tol = 1e-2 if dtype == torch.float16 else 2e-2
        torch.testing.assert_close(dropped, ref * keep / (1 - p), rtol=tol, atol=1e-4)
        keeps.append(keep)
        qa += lq
    return keeps


def check_attention_varlen(lens_q, lens_k, h, d, dtype, causal, p=0.0, slack=0, seed=17,
                           backend=cuda_backend, device="cuda", window=ops.FULL_WINDOW):
    """Packed attention against the per-sequence dense reference, forward and every gradient by
    the rule, both dQ paths; with dropout, given the mask read off the backend's output."""
    scale = 1.0 / math.sqrt(d)
    keeps = varlen_keep_masks(backend, device, lens_q, lens_k, h, d, dtype, causal, p, seed,
                              scale, slack, window) if p else None
    q, k, v = _packed_qkv(lens_q, lens_k, h, d, dtype, device=device)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    max_q, max_k = max(lens_q) + slack, max(lens_k) + slack  # upper bounds are fine
    dout = torch.randn(sum(lens_q), h, d, dtype=dtype, device=device)
    out, lse = backend.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, p,
                                                scale, seed, window=window)
    grads = backend.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                              causal, p, scale, seed, False, window=window)
    grads_det = backend.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q,
                                                  max_k, causal, p, scale, seed, True,
                                                  window=window)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (h, sum(lens_q))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == dtype and g.is_contiguous()
    assert torch.equal(grads[1], grads_det[1]) and torch.equal(grads[2], grads_det[2])

    f64 = [t.double() for t in (q, k, v, dout)]
    exact_out, exact_lse, exact = varlen_reference(*f64, lens_q, lens_k, causal, p, scale, keeps,
                                                   upcast=True, window=window)
    plain_out, _, plain = varlen_reference(q, k, v, dout, lens_q, lens_k, causal, p, scale, keeps,
                                           upcast=False, window=window)
    tag = f"lens_q={lens_q} lens_k={lens_k} h{h} d{d} {dtype} causal={causal} p={p} w={window}"
    assert_close_by_rule(out, plain_out, exact_out, f"out [{tag}]")
    for name, got, pl, ex in zip(("dq", "dk", "dv"), grads, plain, exact):
        assert_close_by_rule(got, pl, ex, f"{name} [{tag}]")
    assert_close_by_rule(grads_det[0], plain[0], exact[0], f"deterministic dq [{tag}]")
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), tag
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], rtol=0, atol=2e-3)
    empty_q = (~finite).transpose(0, 1)  # (total_q, H): queries that see no key
    assert (out[empty_q] == 0).all() and (grads[0][empty_q] == 0).all(), tag
    return empty_q


VARLEN_CASES = [
    # lens_q, lens_k, h, causal
    ([5, 0, 64, 129, 1], [5, 0, 64, 129, 1], 3, False),  # empty sequence, partial and 2 tiles
    ([5, 0, 64, 129, 1], [5, 0, 64, 129, 1], 2, True),
    ([33, 70, 0, 3], [50, 20, 9, 0], 2, True),  # Sq != Sk per sequence; keys without queries,
    ([200, 17], [31, 250], 1, False),            # queries without keys
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
@pytest.mark.parametrize("d", cuda_backend.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("lens_q, lens_k, h, causal", VARLEN_CASES)
def test_attention_varlen_matches_reference(lens_q, lens_k, h, causal, d, dtype):
    check_attention_varlen(lens_q, lens_k, h, d, dtype, causal, slack=3 if causal else 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_varlen_dropout_matches_reference_with_its_mask(causal, dtype):
    check_attention_varlen([17, 0, 64, 40], [64, 5, 33, 40], 2, 64, dtype, causal, p=0.3)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_varlen_checker_passes_the_torch_backend_on_cpu(p):
    """The varlen checks above, run on CPU against the torch backend (fastbert/varlen.py), so
    that their own logic is exercised without a GPU."""
    from fastbert.varlen import _TorchVarlen

    check_attention_varlen([17, 0, 40, 5], [30, 5, 31, 0], 2, 32, torch.bfloat16, True, p=p,
                           slack=2, backend=_TorchVarlen, device="cpu")


@pytest.mark.gpu
def test_attention_varlen_is_deterministic_when_asked():
    lens = [300, 0, 77]
    q, k, v = _packed_qkv(lens, lens, 4, 64, torch.bfloat16)
    cu = _cu(lens)
    dout = torch.randn_like(q)
    out, lse = cuda_backend.attention_varlen_forward(q, k, v, cu, cu, 300, 300, True, 0.1, 0.125,
                                                     5)
    runs = [cuda_backend.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, 300, 300,
                                                   True, 0.1, 0.125, 5, True) for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    torch.use_deterministic_algorithms(True)
    try:  # torch's switch selects the deterministic path too
        forced = cuda_backend.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, 300, 300,
                                                        True, 0.1, 0.125, 5, False)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(runs[0], forced):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
def test_public_attention_varlen_op_runs_these_kernels(dtype):
    """fastbert.attention_varlen(backend="cuda") with autograd gives bit for bit what the kernel
    entry points give."""
    lens = [45, 0, 13]
    qkv = torch.randn(sum(lens), 3, 4, 32, dtype=dtype, device="cuda", requires_grad=True)
    cu = _cu(lens)
    dout = torch.randn(sum(lens), 4, 32, dtype=dtype, device="cuda")
    q, k, v = qkv.unbind(1)
    out = fastbert.attention_varlen(q, k, v, cu, cu, 45, 45, causal=True, softmax_scale=0.2,
                                    deterministic=True, backend="cuda")
    out.backward(dout)
    q, k, v = qkv.detach().unbind(1)
    want, lse = cuda_backend.attention_varlen_forward(q, k, v, cu, cu, 45, 45, True, 0.0, 0.2, 0)
    grads = cuda_backend.attention_varlen_backward(dout, q, k, v, want, lse, cu, cu, 45, 45, True,
                                                   0.0, 0.2, 0, True)
    assert torch.equal(out, want)
    assert torch.equal(qkv.grad, torch.stack(grads, dim=1))


# --------------------------------------------------------------------------------------------
# gpu: attention with dropout
# --------------------------------------------------------------------------------------------

def attention_keep_mask(backend, device, b, sq, sk, h, d, dtype, causal, mask, p, seed, scale,
                        window=ops.FULL_WINDOW):
    """The keep mask (B, H, Sq, Sk) a backend draws for `seed`, read off its output: with v rows
    one-hot (v[b, j, h] = e_j, needs Sk <= D), out[b, i, h, :Sk] is the dropped probability row,
    P * keep / (1 - p). Also checks that scaling. Masked-out keys (P = 0) count as kept."""
    assert sk <= d
    q = 0.5 * torch.randn(b, sq, h, d, dtype=dtype, device=device)  # P stays far from underflow
    k = 0.5 * torch.randn(b, sk, h, d, dtype=dtype, device=device)
    v = torch.eye(sk, d, dtype=dtype, device=device)[None, :, None, :].expand(b, sk, h, d)
    out, _ = backend.attention_forward(q, k, v.contiguous(), mask, causal, p, scale, seed,
                                       window=window)
    dropped = out.transpose(1, 2)[..., :sk].double()  # (B, H, Sq, Sk)
    assert (out[..., sk:] == 0).all()
    probs, _ = reference.attention_forward(q.double(), k.double(), torch.eye(sk, d).double()
                                           .to(device)[None, :, None, :].expand(b, sk, h, d),
                                           mask, causal, 0.0, scale,
                                           visible=reference.attention_visible(
                                               mask, causal, b, sq, sk, device, window))
    probs = probs.transpose(1, 2)[..., :sk]
    visible = probs > 0
    keep = (dropped != 0) | ~visible
    assert (dropped[~visible] == 0).all()
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(dropped, probs * keep / (1 - p), rtol=tol, atol=1e-4)
    return keep, visible


def check_attention_dropout(backend, device, b, sq, sk, h, d, dtype, causal, mask_mode, p,
                            seed=20261124, window=ops.FULL_WINDOW):
    mask = None if mask_mode is None else random_padding_mask(b, sk, device, mode=mask_mode)
    scale = 1.0 / math.sqrt(d)
    keep, visible = attention_keep_mask(backend, device, b, sq, sk, h, d, dtype, causal, mask, p,
                                        seed, scale, window)
    assert_keep_rate(keep[visible], p, "attention")

    # the same seed with fresh q, k, v draws the same mask: forward and every gradient by the rule
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device=device) for s in (sq, sk, sk))
    dout = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    win = {"window": window}
    out, lse = backend.attention_forward(q, k, v, mask, causal, p, scale, seed, **win)
    grads = backend.attention_backward(dout, q, k, v, out, lse, mask, causal, p, scale, seed,
                                       False, **win)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    vis = reference.attention_visible(mask, causal, b, sq, sk, device, window)
    exact_out, exact_lse = reference.attention_forward(q64, k64, v64, mask, causal, p, scale,
                                                       keep, visible=vis)
    exact = reference.attention_backward(do64, q64, k64, v64, exact_out, exact_lse, mask, causal,
                                         p, scale, keep, visible=vis)
    plain_out, plain_lse = reference.attention_forward(q, k, v, mask, causal, p, scale, keep,
                                                       upcast=False, visible=vis)
    plain = reference.attention_backward(dout, q, k, v, plain_out, plain_lse, mask, causal, p,
                                         scale, keep, upcast=False, visible=vis)
    tag = (f"b{b} sq{sq} sk{sk} h{h} d{d} {dtype} causal={causal} mask={mask_mode} p={p} "
           f"window={window}")
    assert_close_by_rule(out, plain_out, exact_out, f"out [{tag}]")
    for name, got, pl, ex in zip(("dq", "dk", "dv"), grads, plain, exact):
        assert_close_by_rule(got, pl, ex, f"{name} [{tag}]")
    # lse is that of the undropped softmax
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), tag
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], rtol=0, atol=2e-3)

    # same seed -> the same bits; another seed -> another mask
    again = backend.attention_forward(q, k, v, mask, causal, p, scale, seed, **win)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1]), tag
    # (deterministic=True: the default adds dQ with atomics, so its bits may vary)
    grads_det = backend.attention_backward(dout, q, k, v, out, lse, mask, causal, p, scale, seed,
                                           True, **win)
    assert_close_by_rule(grads_det[0], plain[0], exact[0], f"deterministic dq [{tag}]")
    grads_again = backend.attention_backward(dout, q, k, v, out, lse, mask, causal, p, scale,
                                             seed, True, **win)
    for g, g2 in zip(grads_det, grads_again):
        assert torch.equal(g, g2), tag
    other, _ = backend.attention_forward(q, k, v, mask, causal, p, scale, seed + 1, **win)
    assert not torch.equal(out, other), tag


ATTENTION_DROPOUT_CASES = [
    # b, sq, sk, h, d, causal, mask mode (Sk <= D, so the keep mask can be read off the output)
    (2, 70, 64, 3, 64, False, "with_empty"),  # two query tiles, a fully padded batch row
    (2, 130, 128, 2, 128, True, "random"),    # three query tiles, two key tiles
    (3, 17, 32, 2, 32, False, None),
    (2, 40, 29, 2, 32, True, "third"),        # Sq > Sk: early queries see no key
    (1, 1, 61, 4, 64, True, None),            # one decoding step
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("b, sq, sk, h, d, causal, mask_mode", ATTENTION_DROPOUT_CASES)
def test_attention_dropout_matches_reference_with_its_mask(b, sq, sk, h, d, causal, mask_mode,
                                                           p, dtype):
    check_attention_dropout(cuda_backend, "cuda", b, sq, sk, h, d, dtype, causal, mask_mode, p)


@pytest.mark.gpu
def test_attention_dropout_rate_at_bert_shape():
    """Keep rate over a BERT-base-sized probability tensor, per (batch, head) slice too (a
    counter layout that repeated across heads or batches would show up here as equal slices)."""
    b, s, h, d, p = 4, 64, 12, 64, 0.1
    keep, visible = attention_keep_mask(cuda_backend, "cuda", b, s, s, h, d, torch.float16,
                                        False, None, p, 99, 0.125)
    assert visible.all()
    assert_keep_rate(keep, p, "attention, whole tensor")
    slices = keep.reshape(b * h, s * s)
    assert len({tuple(row.tolist()) for row in slices}) == b * h


def check_public_op_dropout(device, backend_name, backend):
    """fastbert.attention / add_layer_norm with dropout: torch.manual_seed reproduces forward and
    backward bit for bit, and the op gives exactly what the kernel entry points give for the
    seed it draws from torch's generator."""
    b, s, h, d, p = 2, 45, 4, 32, 0.2
    qkv = torch.randn(b, s, 3, h, d, dtype=torch.float16, device=device, requires_grad=True)
    mask = random_padding_mask(b, s, device, mode="with_empty")
    dout = torch.randn(b, s, h, d, dtype=torch.float16, device=device)

    def reproduced_and_seed(run):
        """run(5) twice gives the same bits, run(6) others; the seed the op drew for 5."""
        first, again, other = run(5), run(5), run(6)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert not torch.equal(first[0], other[0])
        torch.manual_seed(5)
        return first, int(ops._draw_seed(p).item())

    def run(torch_seed):
        qkv.grad = None
        torch.manual_seed(torch_seed)
        q, k, v = qkv.unbind(2)
        out = fastbert.attention(q, k, v, mask, dropout_p=p, softmax_scale=0.2,
                                 deterministic=True, backend=backend_name)
        out.backward(dout)
        return out.detach(), qkv.grad.clone()

    first, seed = reproduced_and_seed(run)
    q, k, v = qkv.detach().unbind(2)
    want_out, lse = backend.attention_forward(q, k, v, mask, False, p, 0.2, seed)
    grads = backend.attention_backward(dout, q, k, v, want_out, lse, mask, False, p, 0.2, seed,
                                       True)
    assert torch.equal(first[0], want_out)
    assert torch.equal(first[1], torch.stack(grads, dim=2))

    x = torch.randn(3, 5, 256, dtype=torch.bfloat16, device=device, requires_grad=True)
    residual = torch.randn_like(x)
    weight = torch.randn(256, device=device)
    bias = torch.randn(256, device=device)

    def run_ln(torch_seed):
        x.grad = None
        torch.manual_seed(torch_seed)
        y = fastbert.add_layer_norm(x, residual, weight, bias, 1e-12, dropout_p=p,
                                    backend=backend_name)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad.clone()

    first, seed = reproduced_and_seed(run_ln)
    want_y, _, _ = backend.add_layer_norm_forward(x.detach().reshape(15, 256),
                                                  residual.reshape(15, 256), weight, bias, 1e-12,
                                                  p, seed)
    assert torch.equal(first[0].reshape(15, 256), want_y)


@pytest.mark.gpu
def test_public_ops_dropout_follow_torch_manual_seed():
    check_public_op_dropout("cuda", "cuda", cuda_backend)


# --------------------------------------------------------------------------------------------
# compile: the real attention launchers and kernels run on CPU under the host emulation
# (tests/cuda_emulation.py), through fastbert/cuda.py, by the same checks as the gpu tier, with
# memcheck, racecheck and synccheck on every call
# --------------------------------------------------------------------------------------------

EMULATED_DENSE_CASES = [
    # b, sq, sk, h, d, dtype, causal, mask mode, packed q/k/v views
    (2, 17, 17, 1, 32, torch.float16, False, "with_empty", False),
    (1, 130, 130, 1, 64, torch.bfloat16, False, "random", False),
    (2, 40, 100, 1, 128, torch.float16, True, None, False),
    (2, 100, 40, 1, 64, torch.bfloat16, True, "with_empty", False),
    (2, 33, 33, 2, 32, torch.bfloat16, True, "third", True),
    # fp32: the SIMT kernels (kernels/attention_fp32.cuh)
    (2, 17, 17, 1, 32, torch.float32, False, "with_empty", True),
    (1, 130, 130, 1, 64, torch.float32, False, "random", False),
    (2, 40, 100, 1, 128, torch.float32, True, None, False),
    (2, 100, 40, 1, 64, torch.float32, True, "with_empty", False),
]


@pytest.mark.compile
@pytest.mark.parametrize("b, sq, sk, h, d, dtype, causal, mask_mode, packed",
                         EMULATED_DENSE_CASES)
def test_emulated_attention_matches_reference(emulated_backend, b, sq, sk, h, d, dtype, causal,
                                              mask_mode, packed):
    torch.manual_seed(sq * 1000 + sk)
    check_attention(b, sq, sk, h, d, dtype, causal, mask_mode, packed, device="cpu")


EMULATED_VARLEN_CASES = [
    # lens_q, lens_k, h, d, dtype, causal, dropout p
    ([5, 0, 64, 129, 1], [5, 0, 64, 129, 1], 1, 64, torch.float16, True, 0.0),
    ([33, 70, 0, 3], [50, 20, 9, 0], 1, 128, torch.bfloat16, True, 0.0),
    ([17, 0, 64, 40], [64, 5, 33, 40], 1, 64, torch.float16, True, 0.3),
    ([17, 0, 40], [30, 5, 31], 1, 32, torch.bfloat16, False, 0.5),
    ([5, 0, 64, 129, 1], [5, 0, 64, 129, 1], 1, 64, torch.float32, True, 0.0),
    ([33, 70, 0, 3], [50, 20, 9, 0], 1, 128, torch.float32, False, 0.3),
]


@pytest.mark.compile
@pytest.mark.parametrize("lens_q, lens_k, h, d, dtype, causal, p", EMULATED_VARLEN_CASES)
def test_emulated_attention_varlen_matches_reference(emulated_backend, lens_q, lens_k, h, d,
                                                     dtype, causal, p):
    torch.manual_seed(len(lens_q) * 100 + d)
    check_attention_varlen(lens_q, lens_k, h, d, dtype, causal, p=p, slack=3 if causal else 0,
                           backend=emulated_backend, device="cpu")


@pytest.mark.compile
@pytest.mark.parametrize("b, sq, sk, h, d, dtype, causal, mask_mode, p", [
    (2, 70, 64, 1, 64, torch.bfloat16, False, "with_empty", 0.1),
    (2, 40, 29, 2, 32, torch.float16, True, "third", 0.5),
    (1, 50, 100, 1, 128, torch.float16, True, "random", 0.2),
    (2, 70, 64, 1, 64, torch.float32, False, "with_empty", 0.1),
    (2, 40, 29, 2, 32, torch.float32, True, "third", 0.5),
    (1, 50, 100, 1, 128, torch.float32, True, "random", 0.2),
])
def test_emulated_attention_dropout_matches_reference(emulated_backend, b, sq, sk, h, d, dtype,
                                                      causal, mask_mode, p):
    torch.manual_seed(7)
    check_attention_dropout(emulated_backend, "cpu", b, sq, sk, h, d, dtype, causal, mask_mode, p)


@pytest.mark.compile
@pytest.mark.parametrize("d", [32, 128])
def test_emulated_dropout_is_the_documented_philox_stream_in_every_dtype(emulated_backend, d):
    """The fp16, bf16 and fp32 kernels keep exactly the (query i, key j) pairs that
    kernels/attention_common.cuh documents: word 2 (i & 1) + (j & 1) of philox4x32-10(counter
    (j / 2, i / 2, h, b), key = seed) >= round(p * 2^32). So a seed drops the same pairs
    whatever the dtype, and each kernel's lane-to-element mapping of the Philox words is right."""
    b, sq, sk, h, p, seed = 2, 37, min(d, 45), 2, 0.3, 0x1234_5678_9ABC_DEF0
    threshold = round(p * 2**32)
    want = torch.empty(b, h, sq, sk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                for j in range(0, sk, 2):
                    words = philox4x32_10((j // 2, i // 2, hi, bi),
                                          (seed & 0xFFFFFFFF, seed >> 32))
                    for jj in range(j, min(j + 2, sk)):
                        want[bi, hi, i, jj] = words[2 * (i & 1) + (jj & 1)] >= threshold
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        torch.manual_seed(3)
        keep, visible = attention_keep_mask(emulated_backend, "cpu", b, sq, sk, h, d, dtype,
                                            False, None, p, seed, 1.0 / math.sqrt(d))
        assert visible.all()
        assert torch.equal(keep, want), dtype

