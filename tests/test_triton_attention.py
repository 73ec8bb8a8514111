"""Triton fused attention vs fastbert.reference, in three tiers.

- interpreter: the kernels on CPU tensors under TRITON_INTERPRET=1 (small, odd shapes)
  `TRITON_INTERPRET=1 python -m pytest -m interpreter tests/test_triton_attention.py`
- compile: every kernel variant the launchers produce compiles ahead of time for sm_80 and sm_90
- gpu: BERT-base/large shapes on a CUDA device

Kernel-level checks import fastbert.triton.attention directly; the end-to-end checks go through
fastbert.attention(..., backend="triton").
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import triton
import triton.language as tl

import fastbert
from fastbert import ops, reference
from fastbert.triton import attention as kernels
from fastbert.triton.attention_kernels import _philox_7_rounds
from tests.helpers import (TRITON_TYPE, aot_compile, assert_close_by_rule, assert_fp32_close,
                           poison_, random_padding_mask, rule_factor)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


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

def make_qkv(b, sq, sk, h, d, dtype, packed=False, device=DEVICE):
    """q (B, Sq, H, D), k, v (B, Sk, H, D); packed: strided views of one (B, S, 3, H, D) tensor."""
    if packed:
        assert sq == sk
        qkv = torch.randn(b, sq, 3, h, d, dtype=dtype, device=device)
        return qkv.unbind(2)
    return tuple(torch.randn(b, s, h, d, dtype=dtype, device=device) for s in (sq, sk, sk))


def make_mask(b, sk, mode, device=DEVICE):
    """(B, Sk) bool key-padding mask or None. Modes of tests.helpers.random_padding_mask (right
    padding), plus "left" (left padding, row 0 fully padded) and "scattered" (arbitrary holes, row
    0 real only in its second half) for the skipping of key tiles at either end of the range, and
    "tiles" (B >= 2, Sk > 192): holes that leave the forward's 64-key tiles fully real ([0, 64),
    [192, Sk)), fully padded ([64, 128)) and mixed ([128, 192)) in one row; row 1 starts in the
    middle of a tile (key 67), the last row is fully padded."""
    if mode is None:
        return None
    if mode == "left":
        return random_padding_mask(b, sk, device, mode="with_empty").flip(1)
    if mode == "scattered":
        mask = torch.rand(b, sk, device=device) < 0.6
        mask[0, : sk // 2] = False
        return mask
    if mode == "tiles":
        mask = torch.rand(b, sk, device=device) < 0.5
        mask[:, :64] = mask[:, 192:] = True
        mask[:, 64:128] = False
        mask[1, :67] = False
        mask[-1] = False
        return mask
    return random_padding_mask(b, sk, device, mode=mode)


def no_key_visible(mask, causal, b, sq, sk, device):
    """(B, 1, Sq) bool: queries that see no key at all."""
    visible = reference.attention_visible(mask, causal, b, sq, sk, device)
    if visible is None:
        return torch.zeros(b, 1, sq, dtype=torch.bool, device=device)
    return ~visible.any(-1)


def check_attention(b, sq, sk, h, d, dtype, causal, mask_mode, packed, deterministic,
                    shift=0.0, padding_high=False):
    """Kernel forward and backward vs the fp64 reference, by the tolerance rule (fp32: ~1e-5).
    shift: q and k at -shift and +shift (+ 0.1 * noise): every score near -shift^2 * D;
    padding_high: the mask's padding keys at -shift instead (their scores near +shift^2 * D)."""
    q, k, v = make_qkv(b, sq, sk, h, d, dtype, packed)
    mask = make_mask(b, sk, mask_mode, q.device)
    if shift:
        q, k = ((t.float() * 0.1 + sign * shift).to(dtype) for t, sign in ((q, -1), (k, 1)))
        if padding_high:
            k = torch.where(mask[:, :, None, None], k, -k)
    scale = 1.0 / math.sqrt(d)
    dout = torch.randn(b, sq, h, d, dtype=dtype, device=q.device)

    out, lse = kernels.attention_forward(q, k, v, mask, causal, 0.0, scale, 0)
    dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, mask, causal, 0.0, scale, 0,
                                            deterministic)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and g.dtype == dtype and g.is_contiguous()

    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    exact_out, exact_lse = reference.attention_forward(q64, k64, v64, mask, causal, 0.0, scale)
    exact_grads = reference.attention_backward(do64, q64, k64, v64, exact_out, exact_lse, mask,
                                               causal, 0.0, scale)
    # lse: fp32 from the same inputs, +inf exactly where a query sees no key
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("inf")).all()
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], rtol=1e-5, atol=1e-5)

    names = ("out", "dq", "dk", "dv")
    kernel_res = (out, dq, dk, dv)
    exact_res = (exact_out,) + tuple(exact_grads)
    if dtype == torch.float32:
        for name, got, want in zip(names, kernel_res, exact_res):
            assert_fp32_close(got, want, name)
    else:
        plain_out, plain_lse = reference.attention_forward(q, k, v, mask, causal, 0.0, scale,
                                                           upcast=False)
        plain_grads = reference.attention_backward(dout, q, k, v, plain_out, plain_lse, mask,
                                                   causal, 0.0, scale, upcast=False)
        for name, got, plain, want in zip(names, kernel_res, (plain_out,) + tuple(plain_grads),
                                          exact_res):
            assert_close_by_rule(got, plain, want, name, factor=rule_factor(dtype))

    # nothing visible -> exact zeros: queries that see no key, keys no query sees
    empty_q = no_key_visible(mask, causal, b, sq, sk, q.device).transpose(1, 2)  # (B, Sq, 1)
    assert (out.masked_select(empty_q.unsqueeze(-1)) == 0).all()
    assert (dq.masked_select(empty_q.unsqueeze(-1)) == 0).all()
    visible = reference.attention_visible(mask, causal, b, sq, sk, q.device)
    if visible is not None:
        unseen_k = ~visible.any(2).transpose(1, 2)  # (B, Sk, 1)
        assert (dk.masked_select(unseen_k.unsqueeze(-1)) == 0).all()
        assert (dv.masked_select(unseen_k.unsqueeze(-1)) == 0).all()
    return out


# (B, Sq, Sk, H, D, dtype, causal, mask mode, packed QKV, deterministic): S in {1, 17, 130},
# D in {1, 16, 32, 40, 64, 80, 128, 256}, every dtype, Sq != Sk both ways with causal, padding
# with a fully padded row, packed strided views, both dQ paths.
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
INTERPRETER_CASES = [
    (2, 1, 1, 2, 16, F32, False, None, False, True),
    (2, 17, 17, 1, 1, F32, True, "random", False, False),
    (2, 17, 17, 2, 32, F16, False, "with_empty", True, False),
    (1, 130, 130, 2, 64, BF16, True, "random", True, True),
    (2, 17, 130, 1, 40, F32, True, "with_empty", False, False),
    (2, 130, 17, 1, 80, F16, True, "third", False, True),
    (1, 130, 130, 1, 128, F32, False, "random", True, True),
    (2, 1, 130, 2, 128, BF16, True, "random", False, False),
    (1, 17, 17, 1, 256, F16, False, None, False, True),
    (2, 130, 130, 1, 16, BF16, False, "with_empty", False, False),
    (2, 130, 130, 1, 32, F32, True, "left", False, True),
    (3, 17, 130, 1, 64, F16, False, "scattered", False, False),
    (2, 130, 130, 2, 16, F32, True, "scattered", True, True),
    # causal tile bounds: the diagonal ends one past a key-tile start (65 with 64-key tiles), and
    # Sk - Sq = 33 puts a key tile's first query one past a query-tile start
    (1, 65, 65, 1, 64, F16, True, None, False, False),
    (2, 40, 73, 1, 32, F32, True, None, False, True),
    # a mask whose holes leave tiles fully real, fully padded and mixed (the forward's tiles
    # that check the mask alone), with a boundary tile after them (Sk = 260) and causal
    (3, 130, 260, 1, 64, BF16, False, "tiles", False, False),
    (3, 260, 260, 2, 32, F16, True, "tiles", True, True),
    (3, 70, 260, 1, 64, F32, True, "tiles", False, False),
]


def _case_id(case):
    b, sq, sk, h, d, dtype, causal, mode, packed, det = case
    return (f"B{b}-Sq{sq}-Sk{sk}-H{h}-D{d}-{str(dtype)[6:]}" + ("-causal" if causal else "")
            + (f"-{mode}" if mode else "") + ("-packed" if packed else "")
            + ("-det" if det else "-atomic"))


# --------------------------------------------------------------------------------------------
# interpreter tier
# --------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=_case_id)
def test_forward_backward_vs_reference(case):
    check_attention(*case)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,head_dim", [(BF16, 64), (F16, 128)])
def test_backward_with_every_score_below_the_exp_range(dtype, head_dim):
    """Every scaled score near -128 or below (lse too): the keys past the last key tile's end,
    which the dK/dV kernel loads as zero rows, must not reach the atomic dQ as P = exp(-lse) =
    inf (NaN through dS * 0). Sk = 70 leaves 58 of them (head dim 64: the 64x64 (query, key)
    tile) or 26 (128: the 32x64 (key, query) tile). (fp32's 1e-5 bound is out of reach at these
    scores.)"""
    check_attention(1, 70, 70, 1, head_dim, dtype, False, None, False, False, shift=4.0)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,head_dim,causal,mask_mode,deterministic", [
    (BF16, 64, False, "scattered", False), (F16, 128, False, "scattered", False),
    (F16, 64, True, "left", False), (BF16, 64, True, "random", True)])
def test_backward_with_padding_keys_scoring_far_above_the_real_ones(dtype, head_dim, causal,
                                                                    mask_mode, deterministic):
    """Real keys' scaled scores near -128 (-181 at head dim 128), padding keys' as far above: a
    padding key's P that is not zeroed is exp(256) = inf and reaches dQ as NaN. The dK/dV
    kernel computes S against the first real key in their place (and zeroes their dK, dV rows
    at the end); head dim 64 runs the (query, key) tile, 128 the (key, query) one."""
    check_attention(2, 70, 70, 1, head_dim, dtype, causal, mask_mode, False, deterministic,
                    shift=4.0, padding_high=True)


def recover_keep(b, sq, sk, h, d, dtype, causal, mask, p, seed, window=(-1, -1)):
    """The kernel's dropout keep-mask (B, H, Sq, Sk): with v = identity rows (Sk <= D), the output
    row of query i is its dropped probability row, nonzero exactly where a visible key was kept."""
    assert sk <= d
    q, k, _ = make_qkv(b, sq, sk, h, d, dtype)
    eye = torch.zeros(b, sk, h, d, dtype=dtype, device=q.device)
    eye[:, torch.arange(sk), :, torch.arange(sk)] = 1.0
    scale = 1.0 / math.sqrt(d)
    out, _ = kernels.attention_forward(q, k, eye, mask, causal, p, scale, seed,
                                       **ops.window_kw(window))
    dropped = out[..., :sk].permute(0, 2, 1, 3)  # (B, H, Sq, Sk)
    probs, _ = reference.attention_forward(q.double(), k.double(), eye.double(), None, False,
                                           visible=_visible(mask, causal, b, sq, sk, window))
    probs = probs[..., :sk].permute(0, 2, 1, 3)  # (B, H, Sq, Sk), the undropped probabilities
    return dropped, probs


@pytest.mark.interpreter
def test_dropout_keep_rate_scaling_and_seed():
    b, s, h, d, p = 2, 64, 2, 64, 0.3
    dropped, probs = recover_keep(b, s, s, h, d, torch.float32, False, None, p, seed=1234)
    keep = dropped != 0
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma}"
    # kept probabilities are scaled by 1/(1-p), dropped ones are exactly 0
    torch.testing.assert_close(dropped.double()[keep], probs[keep] / (1 - p), rtol=1e-5, atol=1e-6)
    # the mask is not the same for every (batch, head) nor every query row
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    # same seed -> bitwise the same output; another seed -> another mask
    torch.manual_seed(0)
    again, _ = recover_keep(b, s, s, h, d, torch.float32, False, None, p, seed=1234)
    torch.manual_seed(0)
    same_inputs, _ = recover_keep(b, s, s, h, d, torch.float32, False, None, p, seed=1234)
    torch.manual_seed(0)
    other, _ = recover_keep(b, s, s, h, d, torch.float32, False, None, p, seed=99)
    assert torch.equal(again, same_inputs)
    assert not torch.equal(again != 0, other != 0)


@triton.jit
def _philox_both_kernel(Counters, Mine, Theirs, seed, N: tl.constexpr):
    offs = tl.arange(0, N)
    counters = tl.load(Counters + offs)
    m0, m1, m2, m3 = _philox_7_rounds(seed, counters)
    t0, t1, t2, t3 = tl.randint4x(seed, counters, 7)
    for i, word in enumerate((m0, m1, m2, m3)):
        tl.store(Mine + i * N + offs, word.to(tl.int32, bitcast=True))
    for i, word in enumerate((t0, t1, t2, t3)):
        tl.store(Theirs + i * N + offs, word.to(tl.int32, bitcast=True))


def check_philox_is_randint4x(device):
    """The dropout mask's philox (whole 64-bit products: inline PTX compiled, tl.umulhi in the
    interpreter) gives tl.randint4x(seed, counters, 7)'s words bit for bit, so the mask is the
    same as with randint4x, for 32- and 64-bit seeds and any int32 counter."""
    n = 256
    generator = torch.Generator().manual_seed(3)
    counters = torch.randint(-2 ** 31, 2 ** 31, (n,), dtype=torch.int64, generator=generator)
    counters[:4] = torch.tensor([0, 1, -1, 2 ** 31 - 1])
    counters = counters.to(torch.int32).to(device)
    for seed in (0, 1234, 2 ** 31 + 5, 2 ** 40 + 3, 2 ** 63 - 1):
        mine = torch.zeros(4, n, dtype=torch.int32, device=device)
        theirs = torch.ones(4, n, dtype=torch.int32, device=device)
        _philox_both_kernel[(1,)](counters, mine, theirs, seed, N=n)
        assert torch.equal(mine, theirs), seed
        assert len(set(mine.flatten().tolist())) > 4 * n - 4  # words, not a constant


@pytest.mark.interpreter
def test_dropout_philox_is_randint4x():
    check_philox_is_randint4x(DEVICE)


@pytest.mark.gpu
def test_gpu_dropout_philox_is_randint4x():
    check_philox_is_randint4x("cuda")


@pytest.mark.interpreter
def test_dropout_elements_sharing_a_philox_call_are_independent():
    # one philox call draws for queries {i, i + 8} x keys {j, j + 1, j + 8, j + 9} (16 bits
    # each): every pair of them must be kept together with probability (1 - p)^2, not 1 - p as
    # one shared draw would give
    b, s, h, d, p = 2, 64, 2, 64, 0.3
    dropped, _ = recover_keep(b, s, s, h, d, torch.float32, False, None, p, seed=21)
    # (B, H, query // 16, query bit 3, query % 8, key // 16, key bit 3, key % 8 // 2, key bit 0)
    keep = (dropped != 0).view(b, h, s // 16, 2, 8, s // 16, 2, 4, 2)
    groups = keep.permute(0, 1, 2, 4, 5, 7, 3, 6, 8).reshape(-1, 8).double()
    q = (1 - p) ** 2
    for i, j in itertools.combinations(range(8), 2):
        both = (groups[:, i] * groups[:, j]).mean().item()
        assert abs(both - q) < 5 * math.sqrt(q * (1 - q) / groups.shape[0]), (i, j, both)


def _visible(mask, causal, b, sq, sk, window):
    """The reference's (B, 1, Sq, Sk) visibility: key padding, causal and the window."""
    return reference.attention_visible(mask, causal, b, sq, sk, DEVICE, window)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,causal,mask_mode,sq,deterministic,seed,window", [
    (F32, False, None, 48, True, 7, (-1, -1)),
    # a 64-bit seed, as ops.py draws them
    (F32, True, "with_empty", 20, False, 2 ** 40 + 3, (-1, -1)),
    (BF16, True, "random", 48, True, 11, (-1, -1)),
    (F16, False, "scattered", 48, False, 12, (-1, -1)),
    (F16, False, "random", 48, True, 13, (5, 9)),
    (F32, True, "with_empty", 40, False, 14, (12, -1)),
], ids=["f32", "f32-causal-padded-seed64", "bf16-causal-padded", "f16-scattered",
        "f16-window-padded", "f32-causal-window-padded"])
def test_dropout_backward_uses_forward_mask(dtype, causal, mask_mode, sq, deterministic, seed,
                                            window):
    """Recover the kernel's keep-mask, then the kernel's forward and all three gradients on fresh
    inputs with the same seed must match the reference given that mask (windows compose)."""
    b, sk, h, d, p = 2, 48, 2, 64, 0.25
    mask = make_mask(b, sk, mask_mode)
    dropped, probs = recover_keep(b, sq, sk, h, d, dtype, causal, mask, p, seed, window)
    keep = (dropped != 0) | (probs == 0)  # where P = 0 the keep bit does not matter
    q, k, v = make_qkv(b, sq, sk, h, d, dtype)
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(d)
    band = ops.window_kw(window)
    out, lse = kernels.attention_forward(q, k, v, mask, causal, p, scale, seed, **band)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, mask, causal, p, scale, seed,
                                       deterministic, **band)
    visible = _visible(mask, causal, b, sq, sk, window)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    e_out, e_lse = reference.attention_forward(q64, k64, v64, None, False, p, scale, keep,
                                               visible=visible)
    e_grads = reference.attention_backward(do64, q64, k64, v64, e_out, e_lse, None, False, p,
                                           scale, keep, visible=visible)
    pl_out, pl_lse = reference.attention_forward(q, k, v, None, False, p, scale, keep,
                                                 upcast=False, visible=visible)
    pl_grads = reference.attention_backward(dout, q, k, v, pl_out, pl_lse, None, False, p, scale,
                                            keep, upcast=False, visible=visible)
    for name, got, plain, want in zip(("out", "dq", "dk", "dv"), (out,) + tuple(grads),
                                      (pl_out,) + tuple(pl_grads), (e_out,) + tuple(e_grads)):
        if dtype == torch.float32:
            assert_fp32_close(got, want, name)
        else:
            assert_close_by_rule(got, plain, want, name, factor=rule_factor(dtype))


@pytest.mark.interpreter
def test_deterministic_backward_is_bitwise_reproducible():
    b, s, h, d = 2, 130, 2, 40
    q, k, v = make_qkv(b, s, s, h, d, torch.float16, packed=True)
    mask = random_padding_mask(b, s, mode="third")
    dout = torch.randn_like(q)
    out, lse = kernels.attention_forward(q, k, v, mask, True, 0.1, 0.125, 5)
    first = kernels.attention_backward(dout, q, k, v, out, lse, mask, True, 0.1, 0.125, 5, True)
    second = kernels.attention_backward(dout, q, k, v, out, lse, mask, True, 0.1, 0.125, 5, True)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.interpreter
def test_end_to_end_through_fastbert_attention():
    """The op with backend="triton" (autograd, validation, integer mask) vs backend="torch"."""
    b, s, h, d = 2, 17, 2, 32
    qkv = torch.randn(b, s, 3, h, d, requires_grad=True)
    mask = random_padding_mask(b, s, mode="with_empty").to(torch.int64)
    results = {}
    for backend in ("triton", "torch"):
        qkv.grad = None
        q, k, v = qkv.unbind(2)
        out = fastbert.attention(q, k, v, mask, causal=True, backend=backend)
        out.backward(torch.ones_like(out))
        results[backend] = (out.detach(), qkv.grad.clone())
    assert_fp32_close(results["triton"][0], results["torch"][0], "out")
    assert_fp32_close(results["triton"][1], results["torch"][1], "dqkv")
    # dropout: torch.manual_seed reproduces forward and backward
    grads = []
    for _ in range(2):
        torch.manual_seed(3)
        qkv.grad = None
        q, k, v = qkv.unbind(2)
        out = fastbert.attention(q, k, v, mask, dropout_p=0.2, deterministic=True,
                                 backend="triton")
        out.sum().backward()
        grads.append((out.detach(), qkv.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_unsupported_serves_every_contract_input():
    for dtype, d, p, causal, has_mask in itertools.product(
            (torch.float16, torch.bfloat16, torch.float32), (1, 17, 64, 200, 256), (0.0, 0.1),
            (False, True), (False, True)):
        assert kernels.unsupported(dtype=dtype, head_dim=d, dropout_p=p, causal=causal,
                                   has_mask=has_mask) is None
    assert "float64" in kernels.unsupported(dtype=torch.float64, head_dim=64)
    assert "257" in kernels.unsupported(dtype=torch.float16, head_dim=257)


@pytest.mark.interpreter
def test_key_range():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    # (first real key, last + 1, end of the dense range: last + 1 without holes, else first)
    ranges = kernels.key_range(mask)
    assert ranges.tolist() == [[0, 2, 2], [1, 4, 1], [0, 0, 0], [0, 4, 4]]
    assert kernels.key_range(mask) is ranges  # cached while the mask is unmodified
    mask[2, 3] = True  # an in-place edit invalidates the cache
    assert kernels.key_range(mask).tolist() == [[0, 2, 2], [1, 4, 1], [3, 4, 4], [0, 4, 4]]
    assert kernels.key_range(mask[:, :0]).tolist() == [[0, 0, 0]] * 4
    # longer than one reduction block, real keys only in the second block
    block = kernels.KEY_RANGE_BLOCK
    long = torch.zeros(3, block + 44, dtype=torch.bool)
    long[0, block + 3: block + 10] = True
    long[1, 5] = long[1, -1] = True
    long[2, 2: block + 20] = True  # a dense range across two blocks (left and right padding)
    assert kernels.key_range(long).tolist() == [
        [block + 3, block + 10, block + 10], [5, long.shape[1], 5], [2, block + 20, block + 20]]


@pytest.mark.interpreter
@pytest.mark.parametrize("b,sq,sk", [(2, 0, 5), (2, 5, 0), (0, 5, 5)])
def test_empty_sizes(b, sq, sk):
    """Zero-length sequences or batch: no NaN, zeros where a query sees no key."""
    q, k, v = make_qkv(b, sq, sk, 2, 16, torch.float32)
    mask = torch.ones(b, sk, dtype=torch.bool)
    out, lse = kernels.attention_forward(q, k, v, mask, True, 0.0, 0.25, 0)
    grads = kernels.attention_backward(torch.randn_like(out), q, k, v, out, lse, mask, True, 0.0,
                                       0.25, 0, True)
    for t in (out,) + tuple(grads):
        assert (t == 0).all()
    assert (lse == float("inf")).all()


# --------------------------------------------------------------------------------------------
# compile tier: ahead-of-time compilation for sm_80 and sm_90, no GPU needed
# --------------------------------------------------------------------------------------------

_DATA_PTRS = {"Q", "K", "V", "Out", "DOut", "DK", "DV"}
_FP32_PTRS = {"Lse", "Delta"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p"}
# Shared memory per block on the targets (A100 sm_80: 163 KiB, H100 sm_90: 227 KiB).
_SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _signature(fn, dtype, constexprs, has_mask, has_dropout, dq_dtype, varlen=False):
    """The launcher's runtime argument types, and the arguments divisible by 16 where they
    usually are (pointers, strides, head dim; not varlen's lse head stride, total_q).
    The forward's rotary arguments, which launchers without RoPE leave at their defaults
    (ROTARY_HALF = 0, no tables), are added to `constexprs` so when ROTARY_HALF is not set."""
    sig, aligned = {}, []
    if "ROTARY_HALF" in fn.arg_names and not constexprs.setdefault("ROTARY_HALF", 0):
        constexprs.update(Cos=None, Sin=None, PosQ=None, PosK=None)
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in _DATA_PTRS:
            sig[name] = "*" + TRITON_TYPE[dtype]
        elif name == "DQ":
            sig[name] = "*" + TRITON_TYPE[dq_dtype]
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name == "Mask":
            sig[name] = "*u8"
        elif name in ("KvRange", "CuSeqQ", "CuSeqK"):
            sig[name] = "*i32"
        elif name in ("Cos", "Sin"):  # the rotary tables, in the model's dtype
            sig[name] = "*" + TRITON_TYPE[dtype]
        elif name in ("PosQ", "PosK"):
            sig[name] = "*i64"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64" if has_dropout else "i32"
        else:
            sig[name] = "i32"
        if (sig[name].startswith("*") or name.startswith("stride_") or name == "head_dim") \
                and not (varlen and name == "stride_lh"):
            aligned.append(name)
    return sig, aligned


def compile_variant(fn, dtype, target, warps, stages, has_mask, has_dropout, dq_dtype=None,
                    **consts):
    """One kernel variant compiled as a GPU launch would; checks its shared memory fits."""
    varlen = consts.get("IS_VARLEN", False)
    if not has_mask and "Mask" in fn.arg_names:
        consts.update(Mask=None, KvRange=None)
    if not varlen and "CuSeqQ" in fn.arg_names:
        consts.update(CuSeqQ=None, CuSeqK=None)
    if fn is kernels._attn_bwd_dkdv_kernel and not consts.get("DQ_ATOMIC"):
        consts["DQ"] = None
    sig, aligned = _signature(fn, dtype, consts, has_mask, has_dropout, dq_dtype or dtype, varlen)
    compiled = aot_compile(fn, sig, consts, target, warps, stages, aligned=aligned)
    assert compiled.metadata.shared <= _SMEM_LIMIT[target], (
        f"{fn.__name__}: {compiled.metadata.shared} B shared memory > sm_{target} limit")
    return compiled


def compile_all_kernels(dtype, head_dim, target, causal, has_mask, has_dropout,
                        preprocess=True, varlen=False, **specialized):
    """Every kernel the launchers run for this input, with the launchers' own tile configs for
    the target. `specialized`: integer arguments Triton turns into constants (it does so for the
    value 1). -> {(kernel name, dQ atomic): compiled}."""
    bd = kernels.block_d(head_dim)
    flags = dict(IS_CAUSAL=causal, HAS_MASK=has_mask, HAS_DROPOUT=has_dropout,
                 IS_VARLEN=varlen, WINDOW_LEFT=-1, WINDOW_RIGHT=-1,  # as the launchers' flags()
                 EXACT_DOT=dtype == torch.float32,  # never the interpreter-only bf16 upcast here
                 **specialized)
    compiled = {}
    m, n, w, s = kernels.fwd_config(bd, dtype, target, has_dropout, has_mask, causal)
    compiled["fwd", None] = compile_variant(kernels._attn_fwd_kernel, dtype, target, w, s,
                                            has_mask, has_dropout, **flags, BLOCK_M=m,
                                            BLOCK_N=n, BLOCK_D=bd)
    if preprocess:  # flag-free: depends on dtype and head dim only
        compiled["preprocess", None] = compile_variant(
            kernels._attn_bwd_preprocess_kernel, dtype, target, 4, 1, False, False,
            BLOCK_M=kernels.PREPROCESS_BLOCK_M, BLOCK_D=bd, **specialized)
    m, n, w, s = kernels.dkdv_config(bd, dtype, target, has_dropout)
    for atomic in (True, False):
        compiled["dkdv", atomic] = compile_variant(
            kernels._attn_bwd_dkdv_kernel, dtype, target, w, s, has_mask, has_dropout,
            dq_dtype=torch.float32, DQ_ATOMIC=atomic, **flags, BLOCK_M=m, BLOCK_N=n, BLOCK_D=bd)
    m, n, w, s = kernels.dq_config(bd, dtype, target)
    compiled["dq", None] = compile_variant(kernels._attn_bwd_dq_kernel, dtype, target, w, s,
                                           has_mask, has_dropout, **flags, BLOCK_M=m, BLOCK_N=n,
                                           BLOCK_D=bd)
    return compiled


# Every flag combination (causal x mask x dropout) at BERT's head dim 64 for sm_90; sm_80 gets
# all flags off here and all on below (the flags change element-wise code, not the MMA lowering
# that differs between the targets). Keeps the tier near 2.5 CPU-minutes.
@pytest.mark.compile
@pytest.mark.parametrize("target,causal,has_mask,has_dropout",
                         [(90,) + flags for flags in itertools.product((False, True), repeat=3)]
                         + [(80, False, False, False)])
def test_compile_every_flag_combination(target, causal, has_mask, has_dropout):
    compile_all_kernels(torch.float16, 64, target, causal, has_mask, has_dropout,
                         preprocess=False)


# Decoding one token against a cache (Sq = 1) and a single head: Triton passes these ints as
# constants, so loop bounds and index math fold differently.
@pytest.mark.compile
def test_compile_single_query_single_head():
    compile_all_kernels(torch.bfloat16, 64, 90, True, True, False, seqlen_q=1, n_heads=1)


# Every dtype against every tile-config class it has (fp16 and bf16 share theirs: head dim padded
# to <= 64, 128, 256; fp32 has its own), all flags on (the largest variant), both targets. 40 pads
# to 64 (masked head-dim loads), 16 is the smallest tile.
@pytest.mark.compile
@pytest.mark.parametrize("target", [80, 90])
@pytest.mark.parametrize("dtype,head_dim", [
    (F16, 16), (F16, 256), (BF16, 40), (BF16, 128), (F32, 64), (F32, 80), (F32, 256),
], ids=lambda x: str(x)[6:] if isinstance(x, torch.dtype) else None)
def test_compile_dtypes_and_head_dims(target, dtype, head_dim):
    compile_all_kernels(dtype, head_dim, target, True, True, True)


# --------------------------------------------------------------------------------------------
# gpu tier
# --------------------------------------------------------------------------------------------

GPU_CASES = [  # BERT-base and BERT-large shapes
    (8, 512, 512, 12, 64, F16, False, "third", True, False),
    (8, 512, 512, 16, 64, BF16, False, "with_empty", True, True),
    (8, 512, 512, 12, 64, BF16, True, None, False, False),
    (8, 128, 512, 16, 64, F16, True, "random", False, True),
    (2, 512, 512, 12, 64, F32, False, "random", False, True),
    (2, 256, 256, 4, 128, F16, True, "random", False, False),
    (2, 256, 256, 4, 256, BF16, False, "random", False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_forward_backward_vs_reference(case):
    check_attention(*case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gpu_dropout_and_determinism(dtype):
    b, s, h, d, p = 8, 64, 12, 64, 0.1
    dropped, probs = recover_keep(b, s, s, h, d, dtype, False, None, p, seed=2 ** 50 + 1)
    keep = dropped != 0
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    torch.manual_seed(0)
    q, k, v = make_qkv(8, 512, 512, 12, 64, dtype, packed=True)
    mask = random_padding_mask(8, 512, q.device, mode="third")
    dout = torch.randn_like(q)
    out, lse = kernels.attention_forward(q, k, v, mask, False, p, 0.125, 17)
    runs = [kernels.attention_backward(dout, q, k, v, out, lse, mask, False, p, 0.125, 17, True)
            for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    again, _ = kernels.attention_forward(q, k, v, mask, False, p, 0.125, 17)
    assert torch.equal(out, again)
