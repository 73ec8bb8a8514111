"""The CUDA attention kernels with flash-attn's sliding window (window_size=(left, right)) vs
fastbert.reference, padded and packed, forward and every gradient by the tolerance rule, through
tests/test_cuda_attention.py's checks (both dQ paths, lse, zeros for queries that see no key;
with dropout, given the keep mask read off the kernels' output).

- always: fastbert.cuda serves windows, and fastbert.ops routes a windowed call to it.
- compile: the real kernels under the host emulation (tests/cuda_emulation.py) with memcheck,
  racecheck and synccheck; key tiles outside every band are never read (NaN there changes no bit).
  `python -m pytest -m compile -q tests/test_cuda_attention_window.py`
- gpu: the same cases and more on a real GPU, every head dim and half dtype.
"""
from __future__ import annotations


import pytest
import torch

import fastbert
from fastbert import cuda as cuda_backend
from fastbert import ops
from tests.cuda_helpers import emulated_backend  # noqa: F401 (fixture)
# autouse fixtures: imported, so they apply to every test in this module
from tests.cuda_helpers import extension_runs_here, poisoned_outputs  # noqa: F401
from tests.helpers import check_out_of_band_tiles_are_never_read, random_padding_mask
from tests.test_cuda_attention import (_cu, check_attention, check_attention_dropout,
                                       check_attention_varlen)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def hole_mask(b, sk, start, end, device):
    """(B, Sk) all real but keys [start, end) of batch row 0: a window narrower than the hole
    leaves the queries in its middle with no visible key."""
    mask = torch.ones(b, sk, dtype=torch.bool, device=device)
    mask[0, start:end] = False
    return mask


def check_window(b, sq, sk, h, d, dtype, causal, mask_mode, window, device="cuda",
                 expect_empty=False):
    """check_attention with a window; mask_mode "hole" is hole_mask over the middle third."""
    mask = hole_mask(b, sk, sk // 3, 2 * sk // 3, device) if mask_mode == "hole" else None
    visible = check_attention(b, sq, sk, h, d, dtype, causal, mask_mode, device=device,
                              window=window, mask=mask)
    if expect_empty:  # the case holds a query that sees no key (its zeros were checked)
        assert not visible.any(-1).all()


# --------------------------------------------------------------------------------------------
# always: the backend takes windows and ops routes them to it
# --------------------------------------------------------------------------------------------

def test_cuda_backend_serves_windows():
    for op in ("fastbert.attention", "fastbert.attention_varlen"):
        assert cuda_backend.unsupported(op, dtype=F16, head_dim=64, window=(64, 64)) is None


def test_windowed_calls_route_to_cuda(monkeypatch):
    """Named, the CUDA backend gets windowed calls; under auto, a window no longer skips it (a
    first backend that cannot run here falls through to CUDA, not to torch)."""
    monkeypatch.setattr(ops, "_device_reason", lambda name, device: None)
    monkeypatch.setitem(ops._modules, "cuda", cuda_backend)
    monkeypatch.setitem(ops._modules, "triton", None)
    monkeypatch.setitem(ops._load_errors, "triton", "not here (test)")
    monkeypatch.setattr(ops, "_auto_order", lambda op, device: ("triton", "cuda", "torch"))
    device = torch.device("cuda")
    for op in ("fastbert.attention", "fastbert.attention_varlen"):
        for backend in ("cuda", "auto"):
            assert ops.resolve_backend(op, backend, device, dtype=BF16, head_dim=64,
                                       dropout_p=0.1, causal=True, has_mask=False,
                                       window=(128, 0)) == "cuda"


# --------------------------------------------------------------------------------------------
# compile: the host emulation
# --------------------------------------------------------------------------------------------

EMULATED_WINDOW_CASES = [
    # b, sq, sk, h, d, dtype, causal, mask mode, window, a query sees no key
    (1, 300, 300, 1, 64, F16, False, "hole", (16, 16), True),  # tiles skipped on both sides
    (2, 200, 200, 1, 32, BF16, True, "third", (40, -1), False),  # causal + left window
    (2, 100, 40, 1, 128, F16, False, None, (5, 5), True),  # Sq > Sk: the first 55 see nothing
    (1, 260, 260, 1, 64, BF16, False, "random", (-1, 8), False),  # left side unbounded
    (1, 150, 150, 1, 128, BF16, False, "third", (10, -1), False),  # right side unbounded
    (1, 330, 330, 1, 32, F16, False, None, (150, 90), False),  # band spans several tiles
    (2, 70, 90, 1, 64, BF16, True, "with_empty", (0, 0), True),  # one key per query
    # fp32: the SIMT kernels
    (1, 300, 300, 1, 64, F32, False, "hole", (16, 16), True),
    (2, 100, 40, 1, 128, F32, True, None, (5, 5), True),
    (1, 330, 330, 1, 32, F32, False, None, (150, 90), False),
]


@pytest.mark.compile
@pytest.mark.parametrize("b, sq, sk, h, d, dtype, causal, mask_mode, window, empty",
                         EMULATED_WINDOW_CASES)
def test_emulated_window_matches_reference(emulated_backend, b, sq, sk, h, d, dtype, causal,
                                           mask_mode, window, empty):
    torch.manual_seed(sq * 1000 + sk + window[0])
    check_window(b, sq, sk, h, d, dtype, causal, mask_mode, window, device="cpu",
                 expect_empty=empty)


EMULATED_VARLEN_WINDOW_CASES = [
    # lens_q, lens_k, d, dtype, causal, dropout p, window
    ([5, 0, 200, 129, 1], [5, 0, 200, 129, 1], 64, F16, False, 0.0, (8, 3)),
    ([33, 170, 0, 3], [50, 120, 9, 0], 128, BF16, True, 0.0, (20, -1)),  # Sq != Sk per sequence
    ([17, 0, 64, 40], [64, 5, 33, 40], 64, F16, False, 0.3, (6, 2)),  # dropout
    ([33, 170, 0, 3], [50, 120, 9, 0], 128, F32, True, 0.3, (20, -1)),
]


@pytest.mark.compile
@pytest.mark.parametrize("lens_q, lens_k, d, dtype, causal, p, window",
                         EMULATED_VARLEN_WINDOW_CASES)
def test_emulated_varlen_window_matches_reference(emulated_backend, lens_q, lens_k, d, dtype,
                                                  causal, p, window):
    torch.manual_seed(len(lens_q) * 100 + d + window[0])
    check_attention_varlen(lens_q, lens_k, 1, d, dtype, causal, p=p, slack=3,
                           backend=emulated_backend, device="cpu", window=window)


@pytest.mark.compile
@pytest.mark.parametrize("b, sq, sk, h, d, dtype, causal, mask_mode, p, window", [
    (2, 70, 64, 1, 64, BF16, False, "with_empty", 0.1, (3, 9)),
    (1, 50, 100, 1, 128, F16, True, "random", 0.2, (30, -1)),
    (2, 70, 64, 1, 64, F32, False, "with_empty", 0.1, (3, 9)),
])
def test_emulated_window_dropout_matches_reference(emulated_backend, b, sq, sk, h, d, dtype,
                                                   causal, mask_mode, p, window):
    torch.manual_seed(11)
    check_attention_dropout(emulated_backend, "cpu", b, sq, sk, h, d, dtype, causal, mask_mode, p,
                            window=window)


@pytest.mark.compile
@pytest.mark.parametrize("d, dtype", [(64, F16), (128, BF16), (64, F32), (128, F32)])
@pytest.mark.parametrize("queries_cut", [False, True])
def test_emulated_out_of_band_tiles_are_never_read(emulated_backend, d, dtype, queries_cut):
    torch.manual_seed(d)
    check_out_of_band_tiles_are_never_read(emulated_backend, "cpu", d, dtype, queries_cut)


@pytest.mark.compile
@pytest.mark.parametrize("window", [(-2, 3), (3, -5)])
def test_emulated_launcher_refuses_a_bad_window(emulated_backend, window):
    """The launchers check the window themselves (fastbert.ops validates it before them)."""
    q = torch.randn(1, 8, 1, 32, dtype=F16)
    with pytest.raises(ValueError, match=r"fastbert.attention: window_size must be \(left, "
                                         r"right\), each >= 0 or -1 for unbounded"):
        emulated_backend.attention_forward(q, q, q, None, False, 0.0, 0.2, 0, window=window)


@pytest.fixture
def cuda_on_cpu(emulated_backend, monkeypatch):
    """fastbert's public ops on CPU tensors with backend="cuda" running the emulated kernels."""
    monkeypatch.setattr(ops, "_device_reason", lambda name, device: None)
    monkeypatch.setitem(ops._modules, "cuda", emulated_backend)
    return emulated_backend


def check_public_window_ops(backend, device):
    """fastbert.attention / attention_varlen(window_size=..., backend="cuda") with autograd give
    bit for bit what the kernel entry points give for that window."""
    b, s, h, d, window = 2, 45, 2, 32, (5, 9)
    qkv = torch.randn(b, s, 3, h, d, dtype=F16, device=device, requires_grad=True)
    mask = random_padding_mask(b, s, device, mode="with_empty")
    dout = torch.randn(b, s, h, d, dtype=F16, device=device)
    out = fastbert.attention(*qkv.unbind(2), mask, causal=True, window_size=window,
                             softmax_scale=0.2, deterministic=True, backend="cuda")
    out.backward(dout)
    q, k, v = qkv.detach().unbind(2)
    want, lse = backend.attention_forward(q, k, v, mask, True, 0.0, 0.2, 0, window=window)
    grads = backend.attention_backward(dout, q, k, v, want, lse, mask, True, 0.0, 0.2, 0, True,
                                       window=window)
    assert torch.equal(out, want) and torch.equal(qkv.grad, torch.stack(grads, dim=2))

    lens = [45, 0, 13]
    qkv = torch.randn(sum(lens), 3, h, d, dtype=BF16, device=device, requires_grad=True)
    cu, dout = _cu(lens, device), torch.randn(sum(lens), h, d, dtype=BF16, device=device)
    out = fastbert.attention_varlen(*qkv.unbind(1), cu, cu, 45, 45, window_size=window,
                                    softmax_scale=0.2, deterministic=True, backend="cuda")
    out.backward(dout)
    q, k, v = qkv.detach().unbind(1)
    want, lse = backend.attention_varlen_forward(q, k, v, cu, cu, 45, 45, False, 0.0, 0.2, 0,
                                                 window=window)
    grads = backend.attention_varlen_backward(dout, q, k, v, want, lse, cu, cu, 45, 45, False,
                                              0.0, 0.2, 0, True, window=window)
    assert torch.equal(out, want) and torch.equal(qkv.grad, torch.stack(grads, dim=1))
    # the window changed the result: it reached the kernels
    assert not torch.equal(want, backend.attention_varlen_forward(q, k, v, cu, cu, 45, 45, False,
                                                                  0.0, 0.2, 0)[0])


@pytest.mark.compile
def test_emulated_public_ops_pass_the_window(cuda_on_cpu):
    check_public_window_ops(cuda_on_cpu, "cpu")


# --------------------------------------------------------------------------------------------
# gpu
# --------------------------------------------------------------------------------------------

WINDOW_CASES = [
    # b, sq, sk, h, causal, mask mode, window, a query sees no key
    (2, 300, 300, 3, False, "hole", (16, 16), True),
    (2, 513, 513, 2, False, "random", (7, 130), False),  # left != right, several tiles
    (2, 200, 200, 2, True, "third", (40, -1), False),
    (2, 256, 256, 2, True, None, (100, 100), False),  # causal caps the right side at 0
    (2, 100, 40, 2, False, None, (5, 5), True),
    (2, 40, 100, 2, True, "with_empty", (12, 0), True),
    (1, 260, 260, 2, False, "random", (-1, 8), False),
    (1, 150, 150, 2, False, "third", (10, -1), False),
    (2, 70, 90, 2, True, "with_empty", (0, 0), True),
    (1, 1, 257, 2, True, "random", (31, -1), False),  # a decoding step against a cache
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
@pytest.mark.parametrize("d", cuda_backend.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("b, sq, sk, h, causal, mask_mode, window, empty", WINDOW_CASES)
def test_window_matches_reference(b, sq, sk, h, causal, mask_mode, window, empty, d, dtype):
    check_window(b, sq, sk, h, d, dtype, causal, mask_mode, window, expect_empty=empty)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
def test_window_modernbert_shape(dtype):
    """ModernBERT's local layers: a 128-token window (64 each side) at 2048 tokens, so most key
    tiles are skipped."""
    check_window(2, 2048, 2048, 4, 64, dtype, False, "third", (64, 64))


VARLEN_WINDOW_CASES = [
    # lens_q, lens_k, h, causal, window
    ([5, 0, 200, 129, 1], [5, 0, 200, 129, 1], 3, False, (8, 3)),
    ([33, 170, 0, 3], [50, 120, 9, 0], 2, True, (20, -1)),
    ([300, 17, 513], [300, 17, 513], 2, False, (-1, 64)),
    ([300, 17, 513], [300, 17, 513], 2, True, (64, 64)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
@pytest.mark.parametrize("d", cuda_backend.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("lens_q, lens_k, h, causal, window", VARLEN_WINDOW_CASES)
def test_varlen_window_matches_reference(lens_q, lens_k, h, causal, window, d, dtype):
    check_attention_varlen(lens_q, lens_k, h, d, dtype, causal, slack=3, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
@pytest.mark.parametrize("b, sq, sk, h, d, causal, mask_mode, p, window", [
    (2, 70, 64, 3, 64, False, "with_empty", 0.1, (3, 9)),
    (2, 130, 128, 2, 128, True, "random", 0.5, (30, -1)),
    (3, 17, 32, 2, 32, False, None, 0.3, (0, 4)),
])
def test_window_dropout_matches_reference_with_its_mask(b, sq, sk, h, d, causal, mask_mode, p,
                                                        window, dtype):
    check_attention_dropout(cuda_backend, "cuda", b, sq, sk, h, d, dtype, causal, mask_mode, p,
                            window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cuda_backend.ATTENTION_DTYPES)
def test_varlen_window_dropout_matches_reference_with_its_mask(dtype):
    check_attention_varlen([17, 0, 64, 40], [64, 5, 33, 40], 2, 64, dtype, True, p=0.3,
                           window=(6, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("d", cuda_backend.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("queries_cut", [False, True])
def test_out_of_band_tiles_are_never_read(d, queries_cut):
    check_out_of_band_tiles_are_never_read(cuda_backend, "cuda", d, F16, queries_cut)


@pytest.mark.gpu
def test_public_window_ops_run_these_kernels():
    check_public_window_ops(cuda_backend, "cuda")


@pytest.mark.gpu
def test_window_is_deterministic():
    q, k, v = (torch.randn(2, 600, 4, 64, dtype=BF16, device="cuda") for _ in range(3))
    dout = torch.randn_like(q)
    runs = []
    for _ in range(3):
        out, lse = cuda_backend.attention_forward(q, k, v, None, True, 0.1, 0.125, 3,
                                                  window=(100, -1))
        runs.append((out, lse) + cuda_backend.attention_backward(
            dout, q, k, v, out, lse, None, True, 0.1, 0.125, 3, True, window=(100, -1)))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)

