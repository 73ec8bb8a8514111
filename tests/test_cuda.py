"""The CUDA C++ backend (fastbert._C + fastbert/cuda.py) vs fastbert.reference.

- always: `unsupported` / arch rules (pure Python).
- compile: the extension was built by pip and imports without a GPU; calling a kernel without a
  GPU raises a clean RuntimeError naming the op; the Philox header, built for the host, gives
  Random123's known answers; the attention kernels' fragment offsets (built for the host) replayed
  through a model of ldmatrix / mma.m16n8k16 give exact products; their SASS (cuobjdump) has
  HMMA in the theoretical count per tile, LDSM and LDGSTS for fp16 and bf16, no generic loads, no
  local memory, and allows >= 2 blocks per SM on A100 / H100; and the kernels themselves run on
  CPU under a host emulation of the warp primitives (tests/cuda_emulation.cpp) through
  fastbert/cuda.py, checked by the gpu tier's own check functions.
  `python -m pytest -m compile tests/test_cuda.py`
- gpu: every op, forward and all gradients, by the tolerance rule (tests/helpers.py) against an
  fp64 reference, odd shapes, padding masks with a fully padded row, causal with Sq != Sk,
  packed-QKV views, both attention dQ paths (atomic, deterministic), packed varlen attention with
  empty sequences, determinism, the public ops with backend="cuda", and the whole BertModel.
  With a GPU present, a built extension that cannot run there fails the gpu tests (unless
  FASTBERT_ALLOW_CUDA_SKIP=1).
  Dropout: the kernels' keep mask is read off their output (see attention_keep_mask and
  layer_norm_keep_mask), then forward and every gradient are compared with the reference given
  that mask; keep rate, 1 / (1 - p) scaling, same seed -> same bits, torch.manual_seed.
  The dropout checks take the backend module and device as arguments, so their logic can be run
  on CPU with fastbert.ops._TorchBackend in place of fastbert.cuda.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert import cuda as cuda_backend
from fastbert import reference
from fastbert import ops
from tests.helpers import assert_close_by_rule, poison_, random_padding_mask

ROOT = Path(__file__).resolve().parent.parent

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(autouse=True)
def _extension_runs_here(request):
    """gpu tests need the built extension to run on this GPU. Built but unusable here (e.g. a
    driver older than the statically linked CUDA runtime) FAILS with the reason: a green GPU run
    that tested nothing is worse than a red one. FASTBERT_ALLOW_CUDA_SKIP=1 skips instead."""
    if "gpu" in request.keywords and torch.cuda.is_available():
        reason = cuda_backend.unavailable_reason()
        if reason is not None:
            message = f"CUDA backend unusable on this GPU: {reason}"
            if cuda_backend._C is None or os.environ.get("FASTBERT_ALLOW_CUDA_SKIP") == "1":
                pytest.skip(message)
            pytest.fail(message + " (FASTBERT_ALLOW_CUDA_SKIP=1 turns this into a skip)")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Every buffer the backend hands to a kernel starts as NaN, so unwritten elements show."""
    monkeypatch.setattr(cuda_backend, "_empty",
                        lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype,
                                                                         device=device)))


# --------------------------------------------------------------------------------------------
# always: what the backend says it can serve
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op, kw, words", [
    ("fastbert.attention", dict(dtype=torch.float32, head_dim=64, dropout_p=0.0), "float16"),
    ("fastbert.attention", dict(dtype=torch.float16, head_dim=80, dropout_p=0.0), "head dims"),
    ("fastbert.add_layer_norm", dict(dtype=torch.float16, hidden=8192, dropout_p=0.0), "4096"),
    ("fastbert.linear_bias_gelu", dict(dtype=torch.float64, in_features=8, out_features=8),
     "float16"),
])
def test_unsupported_says_why(op, kw, words):
    reason = cuda_backend.unsupported(op, **kw)
    assert reason is not None and words in reason


@pytest.mark.parametrize("op, kw", [
    ("fastbert.attention", dict(dtype=torch.float16, head_dim=32, dropout_p=0.0, causal=True,
                                has_mask=True)),
    ("fastbert.attention", dict(dtype=torch.bfloat16, head_dim=128, dropout_p=0.0, causal=False,
                                has_mask=False)),
    ("fastbert.attention", dict(dtype=torch.bfloat16, head_dim=64, dropout_p=0.1, causal=False,
                                has_mask=True)),
    ("fastbert.add_layer_norm", dict(dtype=torch.float32, hidden=4096, dropout_p=0.0)),
    ("fastbert.add_layer_norm", dict(dtype=torch.float16, hidden=768, dropout_p=0.1)),
    ("fastbert.linear_bias_gelu", dict(dtype=torch.bfloat16, in_features=768,
                                       out_features=3072)),
])
def test_supported_inputs(op, kw):
    assert cuda_backend.unsupported(op, **kw) is None


def test_arch_rules():
    runs = cuda_backend._arch_runs_on
    assert runs("90a", 90) and not runs("90a", 100) and not runs("90a", 89)
    assert runs("80", 80) and runs("80", 86) and runs("80", 90)  # SASS in-family, PTX above
    assert runs("80-real", 86) and not runs("80-real", 90)
    assert not runs("80", 75)


# --------------------------------------------------------------------------------------------
# compile: the extension built and imports here, without a GPU
# --------------------------------------------------------------------------------------------

def _require_built():
    info = cuda_backend.extension_info()
    if not info["built"]:
        if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            pytest.skip("nvcc is not installed, so pip skipped the CUDA extension")
        pytest.fail(f"nvcc is installed but fastbert._C did not build or import: {info['error']}")
    return info


@pytest.mark.compile
def test_extension_built_for_the_requested_archs():
    info = _require_built()
    import fastbert._C as ext

    wanted = os.environ.get("FASTBERT_CUDA_ARCHS", "80;90a").split(";")
    assert info["archs"] == wanted == ext.archs.split(",")
    assert info["cuda_version"] and info["error"] is None


@pytest.mark.compile
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_kernels_without_gpu_raise_clean_errors():
    _require_built()
    import fastbert._C as ext

    zero3 = (0, 0, 0)
    calls = {
        "fastbert.attention": [
            lambda: ext.attention_forward(0, 0, 0, 0, 0, 0, 1, 8, 8, 1, 64, zero3, zero3, zero3,
                                          zero3, False, 0.125, 0.1, 7, 0, 0),
            lambda: ext.attention_backward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 8, 8, 1, 64,
                                           *([zero3] * 8), False, 0.125, 0.1, 7, 0, 0)],
        "fastbert.attention_varlen": [
            lambda: ext.attention_varlen_forward(0, 0, 0, 0, 0, 0, 0, 2, 8, 8, 8, 1, 64,
                                                 *([zero3] * 4), False, 0.125, 0.1, 7, 0, 0),
            lambda: ext.attention_varlen_backward(*([0] * 13), 2, 8, 8, 8, 1, 64,
                                                  *([zero3] * 8), True, 0.125, 0.0, 7, 1, 0)],
        "fastbert.add_layer_norm": [
            lambda: ext.add_layer_norm_forward(0, 0, 0, 0, 0, 0, 0, 4, 8, 1e-5, 0.1, 7, 0, 0, 0),
            lambda: ext.add_layer_norm_backward_parts(4, 8),
            lambda: ext.add_layer_norm_backward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 1, 0.1, 7,
                                                0, 0, 0)],
        "fastbert.linear_bias_gelu": [
            lambda: ext.bias_gelu_forward(0, 0, 0, 0, 4, 8, False, 0, 0),
            lambda: ext.gelu_backward_parts(4, 8),
            lambda: ext.gelu_backward(0, 0, 0, 0, 0, 4, 8, 1, False, 0, 0)],
    }
    for op, fns in calls.items():
        for fn in fns:
            with pytest.raises(RuntimeError, match=op + ": no (usable )?CUDA device"):
                fn()
    reason = cuda_backend.unavailable_reason()
    assert reason is not None and "no CUDA device" in reason


# --------------------------------------------------------------------------------------------
# compile: Philox-4x32-10 (kernels/philox.cuh) built for the host, against known answers
# --------------------------------------------------------------------------------------------

# Random123's kat_vectors for philox4x32_10: (counter, key) -> output
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),  # pi's digits
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32_10(counter, key):
    """Philox-4x32-10 in plain Python, written from the paper (Salmon et al., SC 2011)."""
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_ > 0:
            k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


PHILOX_HOST_PROGRAM = r"""
#include <cstdio>
#include "kernels/philox.cuh"
// stdin lines "c0 c1 c2 c3 k0 k1" (hex) -> "r0 r1 r2 r3"; then "p" lines -> dropout thresholds
int main() {
  unsigned c[4], k[2];
  while (std::scanf("%x %x %x %x %x %x", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]) == 6) {
    const fastbert::Philox4 r = fastbert::philox4x32(c[0], c[1], c[2], c[3], k[0], k[1]);
    std::printf("%08x %08x %08x %08x\n", r.x[0], r.x[1], r.x[2], r.x[3]);
  }
  double p;
  while (std::scanf(" p %lf", &p) == 1) std::printf("%u\n", fastbert::dropout_threshold(p));
  return 0;
}
"""


def test_python_philox_gives_the_known_answers():
    for counter, key, want in PHILOX_KNOWN_ANSWERS:
        assert philox4x32_10(counter, key) == want


@pytest.mark.compile
def test_philox_header_gives_known_answers(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    source = tmp_path / "philox_kat.cpp"
    source.write_text(PHILOX_HOST_PROGRAM)
    exe = tmp_path / "philox_kat"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}",
                    str(source), "-o", str(exe)], check=True)
    rng = random.Random(1234)
    cases = [(c, k) for c, k, _ in PHILOX_KNOWN_ANSWERS] + [
        (tuple(rng.getrandbits(32) for _ in range(4)), tuple(rng.getrandbits(32) for _ in range(2)))
        for _ in range(300)]
    probs = [0.0, 0.1, 0.5, 0.999, 1 - 2 ** -33]
    stdin = "".join(" ".join(f"{x:x}" for x in c + k) + "\n" for c, k in cases)
    stdin += "".join(f"p {p!r}\n" for p in probs)
    run = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True)
    lines = run.stdout.split("\n")
    got = [tuple(int(w, 16) for w in line.split()) for line in lines[:len(cases)]]
    for (counter, key, want), g in zip(PHILOX_KNOWN_ANSWERS, got):
        assert g == want, (counter, key)
    for (counter, key), g in zip(cases, got):
        assert g == philox4x32_10(counter, key), (counter, key)
    thresholds = [int(x) for x in lines[len(cases):len(cases) + len(probs)]]
    assert thresholds == [min(round(p * 2 ** 32), 2 ** 32 - 1) for p in probs]


# --------------------------------------------------------------------------------------------
# compile: the attention kernels' fragment index math (kernels/attention_layout.cuh, built for the
# host) replayed through a model of ldmatrix and mma.m16n8k16 written from the PTX ISA
# --------------------------------------------------------------------------------------------

LAYOUT_HOST_PROGRAM = r"""
#include <cstdio>
#include "kernels/attention_layout.cuh"
// stdin lines "fn r0 k0 ld" -> the 32 lanes' offsets of a_frag (0), bt_frag (1), b_frag (2),
// at_frag (3)
int main() {
  using namespace fastbert::attn;
  int fn, r0, k0, ld;
  while (std::scanf("%d %d %d %d", &fn, &r0, &k0, &ld) == 4) {
    for (int lane = 0; lane < 32; ++lane)
      std::printf("%d ", fn == 0 ? a_frag_offset(lane, r0, k0, ld)
                         : fn == 1 ? bt_frag_offset(lane, r0, k0, ld)
                         : fn == 2 ? b_frag_offset(lane, r0, k0, ld)
                                   : at_frag_offset(lane, r0, k0, ld));
    std::printf("\n");
  }
  return 0;
}
"""


class _Layout:
    """The header's offset functions, evaluated by the host build (cached per argument tuple)."""

    def __init__(self, exe):
        self.exe, self.cache = exe, {}

    def prefetch(self, calls):
        calls = [c for c in dict.fromkeys(calls) if c not in self.cache]
        stdin = "".join(" ".join(map(str, c)) + "\n" for c in calls)
        out = subprocess.run([str(self.exe)], input=stdin, capture_output=True, text=True,
                             check=True).stdout.split("\n")
        for c, line in zip(calls, out):
            self.cache[c] = [int(x) for x in line.split()]

    def __call__(self, fn, r0, k0, ld):
        return self.cache[(fn, r0, k0, ld)]


def _ldmatrix_x4(tile, offsets, trans):
    """PTX ldmatrix.x4 on a flat tile: matrix i's rows start at lanes 8i..8i+7's offsets; lane l
    gets register i = (M[l/4][2(l%4)], M[l/4][2(l%4)+1]), or with .trans the transposed pair."""
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        rows = [tile[offsets[8 * i + r]:offsets[8 * i + r] + 8] for r in range(8)]
        for lane in range(32):
            g, t = lane // 4, lane % 4
            if trans:
                regs[lane][i] = (rows[2 * t][g], rows[2 * t + 1][g])
            else:
                regs[lane][i] = (rows[g][2 * t], rows[g][2 * t + 1])
    return regs


def _mma(c, a, b):
    """PTX mma.m16n8k16.row.col: per-lane A (4 pairs), B (2 pairs), C (4 floats) -> D."""
    A = torch.zeros(16, 16, dtype=torch.float64)
    B = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2] = torch.tensor(a[lane][0])
        A[g + 8, 2 * t:2 * t + 2] = torch.tensor(a[lane][1])
        A[g, 2 * t + 8:2 * t + 10] = torch.tensor(a[lane][2])
        A[g + 8, 2 * t + 8:2 * t + 10] = torch.tensor(a[lane][3])
        B[2 * t:2 * t + 2, g] = torch.tensor(b[lane][0])
        B[2 * t + 8:2 * t + 10, g] = torch.tensor(b[lane][1])
    prod = A @ B
    return [[c[lane][0] + prod[lane // 4, 2 * (lane % 4)].item(),
             c[lane][1] + prod[lane // 4, 2 * (lane % 4) + 1].item(),
             c[lane][2] + prod[lane // 4 + 8, 2 * (lane % 4)].item(),
             c[lane][3] + prod[lane // 4 + 8, 2 * (lane % 4) + 1].item()] for lane in range(32)]


def _c_to_matrix(frags, rows=16):
    """C fragments (one per 8 columns) -> matrix, by the kernels' store formula (store_rows,
    the dS^T store): lane (g, c) element e at row g + 8 (e >> 1), column 8f + 2c + (e & 1)."""
    out = torch.zeros(rows, 8 * len(frags), dtype=torch.float64)
    for f, frag in enumerate(frags):
        for lane in range(32):
            g, c = lane // 4, lane % 4
            for e in range(4):
                out[g + 8 * (e >> 1), 8 * f + 2 * c + (e & 1)] = frag[lane][e]
    return out


def _c_as_a(frags, kt):
    """Two C fragments (columns 16kt..16kt+15) re-packed as an A operand, as the kernels do."""
    f0, f1 = frags[2 * kt], frags[2 * kt + 1]
    return [[(f0[l][0], f0[l][1]), (f0[l][2], f0[l][3]), (f1[l][0], f1[l][1]),
             (f1[l][2], f1[l][3])] for l in range(32)]


def _flat_tile(m, ld):
    rows, cols = m.shape
    t = torch.zeros(rows, ld, dtype=torch.float64)
    t[:, :cols] = m
    return t.reshape(-1).tolist()


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    tmp = tmp_path_factory.mktemp("layout")
    (tmp / "layout.cpp").write_text(LAYOUT_HOST_PROGRAM)
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}",
                    str(tmp / "layout.cpp"), "-o", str(tmp / "layout")], check=True)
    return _Layout(tmp / "layout")


@pytest.mark.compile
def test_fragment_index_model(layout):
    """S = Q K^T, O = P V (P = S's C fragments re-packed), and dQ = dS K through dS^T in shared
    memory, computed with the kernels' ldmatrix offsets and fragment re-packing, equal the plain
    products. Small integers keep every product exact."""
    gen = torch.Generator().manual_seed(0)
    d, n, m = 32, 32, 32  # head dim, keys, queries (two 16-row warps: warp row offsets matter)
    ld, ds_ld = d + 8, m + 8
    q, k, v = (torch.randint(-3, 4, (r, d), generator=gen).double() for r in (m, n, n))
    q_t, k_t, v_t = _flat_tile(q, ld), _flat_tile(k, ld), _flat_tile(v, ld)
    calls = [(0, w * 16, kk * 16, ld) for w in range(2) for kk in range(d // 16)]
    calls += [(1, np_ * 16, kk * 16, ld) for np_ in range(n // 16) for kk in range(d // 16)]
    calls += [(2, kt * 16, dp * 16, ld) for kt in range(n // 16) for dp in range(d // 16)]
    calls += [(3, w * 16, kt * 16, ds_ld) for w in range(2) for kt in range(n // 16)]
    layout.prefetch(calls)
    zero = [[0.0] * 4 for _ in range(32)]
    s_rows = []
    for w in range(2):  # forward: warp w owns query rows 16w..16w+15
        s = [zero] * (n // 8)
        for kk in range(d // 16):
            a = _ldmatrix_x4(q_t, layout(0, w * 16, kk * 16, ld), trans=False)
            for np_ in range(n // 16):
                bk = _ldmatrix_x4(k_t, layout(1, np_ * 16, kk * 16, ld), trans=False)
                s[2 * np_] = _mma(s[2 * np_], a, [(r[0], r[1]) for r in bk])
                s[2 * np_ + 1] = _mma(s[2 * np_ + 1], a, [(r[2], r[3]) for r in bk])
        torch.testing.assert_close(_c_to_matrix(s), q[16 * w:16 * w + 16] @ k.T, rtol=0, atol=0)
        o = [zero] * (d // 8)
        for kt in range(n // 16):
            a = _c_as_a(s, kt)
            for dp in range(d // 16):
                bv = _ldmatrix_x4(v_t, layout(2, kt * 16, dp * 16, ld), trans=True)
                o[2 * dp] = _mma(o[2 * dp], a, [(r[0], r[1]) for r in bv])
                o[2 * dp + 1] = _mma(o[2 * dp + 1], a, [(r[2], r[3]) for r in bv])
        s_mat = _c_to_matrix(s)
        torch.testing.assert_close(_c_to_matrix(o), s_mat @ v, rtol=0, atol=0)
        s_rows.append(s_mat)
    # backward dQ: dS^T [keys][queries] in shared memory, stored from C fragments of key rows
    ds = torch.randint(-3, 4, (m, n), generator=gen).double()
    ds_t = _flat_tile(ds.T.contiguous(), ds_ld)
    for rg in range(2):
        acc = [zero] * (d // 8)
        for kt in range(n // 16):
            a = _ldmatrix_x4(ds_t, layout(3, rg * 16, kt * 16, ds_ld), trans=True)
            for dp in range(d // 16):
                bk = _ldmatrix_x4(k_t, layout(2, kt * 16, dp * 16, ld), trans=True)
                acc[2 * dp] = _mma(acc[2 * dp], a, [(r[0], r[1]) for r in bk])
                acc[2 * dp + 1] = _mma(acc[2 * dp + 1], a, [(r[2], r[3]) for r in bk])
        torch.testing.assert_close(_c_to_matrix(acc), ds[16 * rg:16 * rg + 16] @ k, rtol=0,
                                   atol=0)


def _draw_pair_words_model(rows_are_queries, seed, b, h, row_base, col):
    """kernels/attention_common.cuh draw_pair_words for one warp (rows row_base + g, g + 8;
    columns col + 2c, + 1), the lane ^ 4 shuffle included -> per lane (lo, hi) word pairs."""
    drawn = []
    for lane in range(32):
        g, c = lane // 4, lane % 4
        odd = g & 1
        row = row_base + g + (8 if odd else 0)
        qi, kj = (row, col + 2 * c) if rows_are_queries else (col + 2 * c, row)
        x = philox4x32_10((kj >> 1, qi >> 1, h, b), (seed & 0xFFFFFFFF, seed >> 32))
        e0, o1 = x[0], x[3]
        e1, o0 = (x[1], x[2]) if rows_are_queries else (x[2], x[1])
        drawn.append((odd, (e0, e1), (o0, o1)))
    out = []
    for lane in range(32):
        odd, even_pair, odd_pair = drawn[lane]
        other_odd, other_even, other_oddp = drawn[lane ^ 4]
        sent = other_even if other_odd else other_oddp  # what lane ^ 4 sends
        lo = sent if odd else even_pair
        hi = odd_pair if odd else sent
        out.append((lo, hi))
    return out


@pytest.mark.parametrize("rows_are_queries", [True, False])
def test_dropout_pair_words_model(rows_are_queries):
    """Every lane ends up with the Philox word of exactly its own (query, key) elements:
    word 2 (i & 1) + (j & 1) of philox(counter = (j / 2, i / 2, h, b)), in forward and backward
    orientation alike, so both regenerate the same mask."""
    seed, b, h = 0x1234_5678_9ABC_DEF0, 3, 5
    for row_base, col in ((0, 0), (48, 24), (112, 8)):
        got = _draw_pair_words_model(rows_are_queries, seed, b, h, row_base, col)
        for lane in range(32):
            g, c = lane // 4, lane % 4
            for r, pair in enumerate(got[lane]):
                for j in range(2):
                    row, column = row_base + g + 8 * r, col + 2 * c + j
                    qi, kj = (row, column) if rows_are_queries else (column, row)
                    want = philox4x32_10((kj >> 1, qi >> 1, h, b),
                                         (seed & 0xFFFFFFFF, seed >> 32))[2 * (qi & 1) + (kj & 1)]
                    assert pair[j] == want, (lane, r, j)


# --------------------------------------------------------------------------------------------
# compile: the attention kernels' machine code (SASS of the built extension, every arch)
# --------------------------------------------------------------------------------------------

_ATTENTION_KERNEL = re.compile(
    r"attn\d+(fwd_kernel|dkdv_kernel|dq_kernel)I(6__half|13__nv_bfloat16)Li(\d+)ELb([01])E")
_SMEM_PER_SM = {"A100": 167936, "H100": 233472}  # bytes a block may share an SM with others
_SMEM_RESERVED_PER_BLOCK = 1024


def _cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe is None:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        exe = str(bundled) if bundled.exists() else None
    return exe


@pytest.fixture(scope="module")
def attention_sass():
    """{(arch, kernel, dtype, D, dropout): {"sass": [instructions], "REG": .., "STACK": ..,
    "LOCAL": ..}} for the attention kernels of the built extension."""
    _require_built()
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("cuobjdump not found (ships with nvcc and with triton)")
    import fastbert._C as ext

    def dump(flag):
        return subprocess.run([exe, flag, ext.__file__], capture_output=True, text=True,
                              check=True).stdout

    kernels, arch, current = {}, None, None
    for line in dump("-sass").splitlines():
        if line.strip().startswith("arch = "):
            arch = line.split("=")[1].strip()
        elif "Function : " in line:
            m = _ATTENTION_KERNEL.search(line)
            current = None if m is None else (arch, m[1], "bf16" if "bfloat" in m[2] else "fp16",
                                              int(m[3]), m[4] == "1")
            if current is not None:
                kernels[current] = {"sass": []}
        elif current is not None and re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", line):
            kernels[current]["sass"].append(line.split("*/", 1)[1].strip())
    arch = None
    for line in dump("-res-usage").splitlines():
        if line.strip().startswith("arch = "):
            arch = line.split("=")[1].strip()
        m = _ATTENTION_KERNEL.search(line)
        if m is not None and "Function" in line:
            current = (arch, m[1], "bf16" if "bfloat" in m[2] else "fp16", int(m[3]), m[4] == "1")
        elif current is not None and "REG:" in line:
            kernels[current].update({k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)})
            current = None
    archs = {key[0] for key in kernels}
    assert archs == {"sm_" + a.split("-")[0] for a in ext.archs.split(",")}, archs
    return kernels


def _count(sass, pattern):
    return sum(1 for ins in sass if re.match(pattern, ins))


def _expected_hmma(kind, d, t):
    """mma.m16n8k16 per warp per tile: the theoretical count of the kernel's loop body."""
    if kind == "fwd_kernel":  # S = Q K^T, O += P V
        return d // 16 * t["fwd_block_n"] // 8 + t["fwd_block_n"] // 16 * d // 8
    if kind == "dkdv_kernel":  # S^T, dP^T; dV, dK; dQ (16 query rows x warp_cols)
        m, n = t["dkdv_block_m"], t["dkdv_block_n"]
        return 2 * (d // 16) * (m // 8) + 2 * (m // 16) * (d // 8) + n // 16 * \
            t["dkdv_warp_cols"] // 8
    n = t["dq_block_n"]  # S, dP; dQ
    return 2 * (d // 16) * (n // 8) + n // 16 * d // 8


@pytest.mark.compile
def test_attention_sass_is_flash_attention_class(attention_sass):
    """In every attention kernel, arch, dtype, head dim and dropout variant: tensor-core HMMA in
    exactly the theoretical count per tile, ldmatrix (LDSM) and cp.async (LDGSTS) for fp16 AND
    bf16, no generic LD.E, no local memory (spills or stack); the forward's only shared stores
    are the epilogue's (S, P and O never go through shared memory)."""
    import fastbert._C as ext

    assert len(attention_sass) == len({k[0] for k in attention_sass}) * 2 * 3 * 2 * 3
    rows = []
    for (arch, kind, dtype, d, dropout), k in sorted(attention_sass.items()):
        sass = k["sass"]
        tiles = ext.attention_tile_info(d, dropout)
        tag = f"{arch} {kind}<{dtype}, D={d}, dropout={dropout}>"
        counts = {name: _count(sass, pat) for name, pat in (
            ("HMMA", r"HMMA\.16816\.F32"), ("LDSM", r"LDSM\."), ("LDGSTS", r"LDGSTS"),
            ("LD.E", r"LD\.E"), ("local", r"(LDL|STL)\b"), ("STS", r"STS(\.\S+)?\s"))}
        assert counts["HMMA"] == _expected_hmma(kind, d, tiles), (tag, counts)
        assert counts["LDSM"] > 0 and counts["LDGSTS"] > 0, (tag, counts)
        assert counts["LD.E"] == 0 and counts["local"] == 0, (tag, counts)
        assert k["STACK"] == 0 and k["LOCAL"] == 0, (tag, k)
        if kind == "fwd_kernel":  # store_rows: two 4-byte stores per 8 output columns
            assert counts["STS"] == d // 4, (tag, counts)
        rows.append(f"{tag:52s} REG {k['REG']:3d}  HMMA {counts['HMMA']:3d}  LDSM "
                    f"{counts['LDSM']:3d}  STS {counts['STS']:3d}  instructions {len(sass)}")
    print("\n" + "\n".join(rows))


@pytest.mark.compile
def test_attention_blocks_per_sm(attention_sass):
    """Shared memory and registers of every attention kernel allow >= 2 resident blocks per SM
    on A100 and H100 (the occupancy the tile shapes were chosen for)."""
    import fastbert._C as ext

    rows = []
    for (arch, kind, dtype, d, dropout), k in sorted(attention_sass.items()):
        tiles = ext.attention_tile_info(d, dropout)
        name = kind.replace("_kernel", "")
        threads, smem = tiles[f"{name}_threads"], tiles[f"{name}_smem"]
        warps = threads // 32
        regs_per_warp = -(-k["REG"] * 32 // 256) * 256  # allocated in units of 256 per warp
        by_regs = 65536 // regs_per_warp // warps
        gpu = "A100" if arch == "sm_80" else "H100"
        by_smem = _SMEM_PER_SM[gpu] // (smem + _SMEM_RESERVED_PER_BLOCK)
        blocks = min(by_regs, by_smem)
        tag = f"{arch} {kind}<{dtype}, D={d}, dropout={dropout}>"
        assert blocks >= 2, (tag, k["REG"], smem, by_regs, by_smem)
        rows.append(f"{tag:52s} threads {threads:3d}  smem {smem:6d} B  REG {k['REG']:3d}  "
                    f"blocks/SM on {gpu}: {blocks}")
    print("\n" + "\n".join(rows))


# --------------------------------------------------------------------------------------------
# gpu: attention
# --------------------------------------------------------------------------------------------

def make_qkv(b, sq, sk, h, d, dtype, packed=False, device="cuda"):
    """q (B, Sq, H, D), k, v (B, Sk, H, D); packed: strided views of one (B, S, 3, H, D) tensor."""
    if packed:
        assert sq == sk
        return torch.randn(b, sq, 3, h, d, dtype=dtype, device=device).unbind(2)
    return tuple(torch.randn(b, s, h, d, dtype=dtype, device=device) for s in (sq, sk, sk))


def check_attention(b, sq, sk, h, d, dtype, causal, mask_mode, packed=False, device="cuda"):
    q, k, v = make_qkv(b, sq, sk, h, d, dtype, packed, device)
    mask = None if mask_mode is None else random_padding_mask(b, sk, device, mode=mask_mode)
    scale = 1.0 / math.sqrt(d)
    dout = torch.randn(b, sq, h, d, dtype=dtype, device=device)

    out, lse = cuda_backend.attention_forward(q, k, v, mask, causal, 0.0, scale, 0)
    dq, dk, dv = cuda_backend.attention_backward(dout, q, k, v, out, lse, mask, causal, 0.0,
                                                 scale, 0, False)
    # deterministic: dQ from its own kernel (no atomics); dK and dV are the same computation
    dq_det, dk_det, dv_det = cuda_backend.attention_backward(dout, q, k, v, out, lse, mask, causal,
                                                             0.0, scale, 0, True)
    assert torch.equal(dk, dk_det) and torch.equal(dv, dv_det)
    assert out.shape == (b, sq, h, d) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and g.dtype == dtype and g.is_contiguous()

    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    exact_out, exact_lse = reference.attention_forward(q64, k64, v64, mask, causal, 0.0, scale)
    exact = reference.attention_backward(do64, q64, k64, v64, exact_out, exact_lse, mask, causal,
                                         0.0, scale)
    plain_out, plain_lse = reference.attention_forward(q, k, v, mask, causal, 0.0, scale,
                                                       upcast=False)
    plain = reference.attention_backward(dout, q, k, v, plain_out, plain_lse, mask, causal, 0.0,
                                         scale, upcast=False)
    tag = f"b{b} sq{sq} sk{sk} h{h} d{d} {dtype} causal={causal} mask={mask_mode}"
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
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("d", cuda_backend.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("b, sq, sk, h, causal, mask_mode", ATTENTION_CASES)
def test_attention_matches_reference(b, sq, sk, h, causal, mask_mode, d, dtype):
    check_attention(b, sq, sk, h, d, dtype, causal, mask_mode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
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
@pytest.mark.parametrize("dtype", HALF_DTYPES)
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


def varlen_reference(q, k, v, dout, lens_q, lens_k, causal, p, scale, keeps, upcast):
    """Per sequence, the dense reference; results packed like the kernels' (lse (H, total_q))."""
    parts = [[], [], [], [], []]
    qa = ka = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qb, dob = q[qa:qa + lq][None], dout[qa:qa + lq][None]
        kb, vb = k[ka:ka + lk][None], v[ka:ka + lk][None]
        keep = keeps[b] if p > 0 else None
        out, lse = reference.attention_forward(qb, kb, vb, None, causal, p, scale, keep,
                                               upcast=upcast)
        grads = reference.attention_backward(dob, qb, kb, vb, out, lse, None, causal, p, scale,
                                             keep, upcast=upcast)
        for lst, t in zip(parts, (out[0], lse[0]) + tuple(g[0] for g in grads)):
            lst.append(t)
        qa, ka = qa + lq, ka + lk
    out, lse, dq, dk, dv = (torch.cat(lst, dim=1 if i == 1 else 0) for i, lst in enumerate(parts))
    return out, lse, (dq, dk, dv)


def varlen_keep_masks(backend, device, lens_q, lens_k, h, d, dtype, causal, p, seed, scale,
                      slack):
    """The kernels' keep masks per sequence (1, H, Sq_b, Sk_b), read off the output with one-hot
    value rows (as attention_keep_mask does for the dense op; needs every Sk_b <= D)."""
    assert max(lens_k) <= d
    q, k, _ = _packed_qkv(lens_q, lens_k, h, d, dtype, scale_by=0.5, device=device)
    v = torch.cat([torch.eye(lk, d, dtype=dtype, device=device)[:, None, :].expand(lk, h, d)
                   for lk in lens_k])
    out, _ = backend.attention_varlen_forward(q, k, v, _cu(lens_q, device), _cu(lens_k, device),
                                              max(lens_q) + slack, max(lens_k) + slack, causal,
                                              p, scale, seed)
    probs, _, _ = varlen_reference(q.double(), k.double(), v.double(), q.double(), lens_q,
                                   lens_k, causal, 0.0, scale, None, upcast=True)
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
                           backend=cuda_backend, device="cuda"):
    """Packed attention against the per-sequence dense reference, forward and every gradient by
    the rule, both dQ paths; with dropout, given the mask read off the backend's output."""
    scale = 1.0 / math.sqrt(d)
    keeps = varlen_keep_masks(backend, device, lens_q, lens_k, h, d, dtype, causal, p, seed,
                              scale, slack) if p else None
    q, k, v = _packed_qkv(lens_q, lens_k, h, d, dtype, device=device)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    max_q, max_k = max(lens_q) + slack, max(lens_k) + slack  # upper bounds are fine
    dout = torch.randn(sum(lens_q), h, d, dtype=dtype, device=device)
    out, lse = backend.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, p,
                                                scale, seed)
    grads = backend.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                              causal, p, scale, seed, False)
    grads_det = backend.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q,
                                                  max_k, causal, p, scale, seed, True)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (h, sum(lens_q))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == dtype and g.is_contiguous()
    assert torch.equal(grads[1], grads_det[1]) and torch.equal(grads[2], grads_det[2])

    f64 = [t.double() for t in (q, k, v, dout)]
    exact_out, exact_lse, exact = varlen_reference(*f64, lens_q, lens_k, causal, p, scale, keeps,
                                                   upcast=True)
    plain_out, _, plain = varlen_reference(q, k, v, dout, lens_q, lens_k, causal, p, scale, keeps,
                                           upcast=False)
    tag = f"lens_q={lens_q} lens_k={lens_k} h{h} d{d} {dtype} causal={causal} p={p}"
    assert_close_by_rule(out, plain_out, exact_out, f"out [{tag}]")
    for name, got, pl, ex in zip(("dq", "dk", "dv"), grads, plain, exact):
        assert_close_by_rule(got, pl, ex, f"{name} [{tag}]")
    assert_close_by_rule(grads_det[0], plain[0], exact[0], f"deterministic dq [{tag}]")
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), tag
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], rtol=0, atol=2e-3)
    empty_q = (~finite).transpose(0, 1)  # (total_q, H): queries that see no key
    assert (out[empty_q] == 0).all() and (grads[0][empty_q] == 0).all(), tag


VARLEN_CASES = [
    # lens_q, lens_k, h, causal
    ([5, 0, 64, 129, 1], [5, 0, 64, 129, 1], 3, False),  # empty sequence, partial and 2 tiles
    ([5, 0, 64, 129, 1], [5, 0, 64, 129, 1], 2, True),
    ([33, 70, 0, 3], [50, 20, 9, 0], 2, True),  # Sq != Sk per sequence; keys without queries,
    ([200, 17], [31, 250], 1, False),            # queries without keys
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("d", cuda_backend.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("lens_q, lens_k, h, causal", VARLEN_CASES)
def test_attention_varlen_matches_reference(lens_q, lens_k, h, causal, d, dtype):
    check_attention_varlen(lens_q, lens_k, h, d, dtype, causal, slack=3 if causal else 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
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
@pytest.mark.parametrize("dtype", HALF_DTYPES)
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
# compile: the real attention kernels run on CPU under a host emulation of the warp primitives
# (tests/cuda_emulation.cpp), through fastbert/cuda.py, by the same checks as the gpu tier
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emulated_backend(tmp_path_factory):
    from tests import cuda_emulation

    compiler = shutil.which("c++") or shutil.which("g++")
    include = cuda_emulation.cuda_include_dir()
    if compiler is None or include is None:
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    lib = cuda_emulation.build(tmp_path_factory.mktemp("emulation"), compiler, include)
    patch = pytest.MonkeyPatch()
    patch.setattr(cuda_backend, "_C", cuda_emulation.EmuC(lib))
    patch.setattr(cuda_backend, "_on_device", lambda device: contextlib.nullcontext())
    patch.setattr(cuda_backend, "_stream", lambda t: 0)
    yield cuda_backend
    patch.undo()


EMULATED_DENSE_CASES = [
    # b, sq, sk, h, d, dtype, causal, mask mode, packed q/k/v views
    (2, 17, 17, 1, 32, torch.float16, False, "with_empty", False),
    (1, 130, 130, 1, 64, torch.bfloat16, False, "random", False),
    (2, 40, 100, 1, 128, torch.float16, True, None, False),
    (2, 100, 40, 1, 64, torch.bfloat16, True, "with_empty", False),
    (2, 33, 33, 2, 32, torch.bfloat16, True, "third", True),
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
])
def test_emulated_attention_dropout_matches_reference(emulated_backend, b, sq, sk, h, d, dtype,
                                                      causal, mask_mode, p):
    torch.manual_seed(7)
    check_attention_dropout(emulated_backend, "cpu", b, sq, sk, h, d, dtype, causal, mask_mode, p)


# --------------------------------------------------------------------------------------------
# gpu: attention with dropout
# --------------------------------------------------------------------------------------------

def assert_keep_rate(keep, p, what):
    """The fraction kept is 1 - p within 5 standard deviations of a binomial."""
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (what, rate, 1 - p, n)


def attention_keep_mask(backend, device, b, sq, sk, h, d, dtype, causal, mask, p, seed, scale):
    """The keep mask (B, H, Sq, Sk) a backend draws for `seed`, read off its output: with v rows
    one-hot (v[b, j, h] = e_j, needs Sk <= D), out[b, i, h, :Sk] is the dropped probability row,
    P * keep / (1 - p). Also checks that scaling. Masked-out keys (P = 0) count as kept."""
    assert sk <= d
    q = 0.5 * torch.randn(b, sq, h, d, dtype=dtype, device=device)  # P stays far from underflow
    k = 0.5 * torch.randn(b, sk, h, d, dtype=dtype, device=device)
    v = torch.eye(sk, d, dtype=dtype, device=device)[None, :, None, :].expand(b, sk, h, d)
    out, _ = backend.attention_forward(q, k, v.contiguous(), mask, causal, p, scale, seed)
    dropped = out.transpose(1, 2)[..., :sk].double()  # (B, H, Sq, Sk)
    assert (out[..., sk:] == 0).all()
    probs, _ = reference.attention_forward(q.double(), k.double(), torch.eye(sk, d).double()
                                           .to(device)[None, :, None, :].expand(b, sk, h, d),
                                           mask, causal, 0.0, scale)
    probs = probs.transpose(1, 2)[..., :sk]
    visible = probs > 0
    keep = (dropped != 0) | ~visible
    assert (dropped[~visible] == 0).all()
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(dropped, probs * keep / (1 - p), rtol=tol, atol=1e-4)
    return keep, visible


def check_attention_dropout(backend, device, b, sq, sk, h, d, dtype, causal, mask_mode, p,
                            seed=20261124):
    mask = None if mask_mode is None else random_padding_mask(b, sk, device, mode=mask_mode)
    scale = 1.0 / math.sqrt(d)
    keep, visible = attention_keep_mask(backend, device, b, sq, sk, h, d, dtype, causal, mask, p,
                                        seed, scale)
    assert_keep_rate(keep[visible], p, "attention")

    # the same seed with fresh q, k, v draws the same mask: forward and every gradient by the rule
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device=device) for s in (sq, sk, sk))
    dout = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    out, lse = backend.attention_forward(q, k, v, mask, causal, p, scale, seed)
    grads = backend.attention_backward(dout, q, k, v, out, lse, mask, causal, p, scale, seed,
                                       False)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    exact_out, exact_lse = reference.attention_forward(q64, k64, v64, mask, causal, p, scale,
                                                       keep)
    exact = reference.attention_backward(do64, q64, k64, v64, exact_out, exact_lse, mask, causal,
                                         p, scale, keep)
    plain_out, plain_lse = reference.attention_forward(q, k, v, mask, causal, p, scale, keep,
                                                       upcast=False)
    plain = reference.attention_backward(dout, q, k, v, plain_out, plain_lse, mask, causal, p,
                                         scale, keep, upcast=False)
    tag = f"b{b} sq{sq} sk{sk} h{h} d{d} {dtype} causal={causal} mask={mask_mode} p={p}"
    assert_close_by_rule(out, plain_out, exact_out, f"out [{tag}]")
    for name, got, pl, ex in zip(("dq", "dk", "dv"), grads, plain, exact):
        assert_close_by_rule(got, pl, ex, f"{name} [{tag}]")
    # lse is that of the undropped softmax
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), tag
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], rtol=0, atol=2e-3)

    # same seed -> the same bits; another seed -> another mask
    again = backend.attention_forward(q, k, v, mask, causal, p, scale, seed)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1]), tag
    # (deterministic=True: the default adds dQ with atomics, so its bits may vary)
    grads_det = backend.attention_backward(dout, q, k, v, out, lse, mask, causal, p, scale, seed,
                                           True)
    assert_close_by_rule(grads_det[0], plain[0], exact[0], f"deterministic dq [{tag}]")
    grads_again = backend.attention_backward(dout, q, k, v, out, lse, mask, causal, p, scale,
                                             seed, True)
    for g, g2 in zip(grads_det, grads_again):
        assert torch.equal(g, g2), tag
    other, _ = backend.attention_forward(q, k, v, mask, causal, p, scale, seed + 1)
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
@pytest.mark.parametrize("dtype", HALF_DTYPES)
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

    def run(torch_seed):
        qkv.grad = None
        torch.manual_seed(torch_seed)
        q, k, v = qkv.unbind(2)
        out = fastbert.attention(q, k, v, mask, dropout_p=p, softmax_scale=0.2,
                                 deterministic=True, backend=backend_name)
        out.backward(dout)
        return out.detach(), qkv.grad.clone()

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(5)
    seed = int(ops._draw_seed(p).item())
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

    first, again, other = run_ln(5), run_ln(5), run_ln(6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(5)
    seed = int(ops._draw_seed(p).item())
    want_y, _, _ = backend.add_layer_norm_forward(x.detach().reshape(15, 256),
                                                  residual.reshape(15, 256), weight, bias, 1e-12,
                                                  p, seed)
    assert torch.equal(first[0].reshape(15, 256), want_y)


@pytest.mark.gpu
def test_public_ops_dropout_follow_torch_manual_seed():
    check_public_op_dropout("cuda", "cuda", cuda_backend)


# --------------------------------------------------------------------------------------------
# gpu: add_layer_norm
# --------------------------------------------------------------------------------------------

def check_layer_norm(rows, hidden, dtype, weight_dtype, with_residual):
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
    residual = torch.randn_like(x) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(weight_dtype)
    bias = (0.1 * torch.randn(hidden, device="cuda")).to(weight_dtype)
    dy = torch.randn_like(x)
    eps = 1e-5

    y, mean, rstd = cuda_backend.add_layer_norm_forward(x, residual, weight, bias, eps, 0.0, 0)
    dx, dres, dw, db = cuda_backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd,
                                                            0.0, 0)
    assert y.dtype == dtype and dw.dtype == weight_dtype and db.dtype == weight_dtype
    assert (dres is None) == (residual is None)

    r64 = residual.double() if residual is not None else None
    x64, w64, b64, dy64 = x.double(), weight.double(), bias.double(), dy.double()
    ey, emean, erstd = reference.add_layer_norm_forward(x64, r64, w64, b64, eps)
    edx, edres, edw, edb = reference.add_layer_norm_backward(dy64, x64, r64, w64, emean, erstd)
    py, pmean, prstd = reference.add_layer_norm_forward(x, residual, weight, bias, eps,
                                                        upcast=False)
    pdx, pdres, pdw, pdb = reference.add_layer_norm_backward(dy, x, residual, weight, pmean,
                                                             prstd)
    tag = f"rows{rows} hidden{hidden} {dtype} weight {weight_dtype} residual={with_residual}"
    torch.testing.assert_close(mean.double(), emean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), erstd, rtol=1e-4, atol=1e-5)
    assert_close_by_rule(y, py, ey, f"y [{tag}]")
    assert_close_by_rule(dx, pdx, edx, f"dx [{tag}]")
    if residual is not None:
        assert torch.equal(dres, dx) and dres.data_ptr() != dx.data_ptr()
    assert_close_by_rule(dw, pdw, edw, f"dweight [{tag}]")
    assert_close_by_rule(db, pdb, edb, f"dbias [{tag}]")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 32), (37, 100), (300, 384), (64, 768),
                                          (33, 1024), (20, 1536), (7, 4096), (9, 1030)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm_matches_reference(rows, hidden, dtype, with_residual):
    check_layer_norm(rows, hidden, dtype, dtype, with_residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("hidden", [768, 2048])
def test_add_layer_norm_fp32_weight(dtype, hidden):
    check_layer_norm(50, hidden, dtype, torch.float32, True)


@pytest.mark.gpu
def test_add_layer_norm_backward_is_deterministic():
    x = torch.randn(4096, 768, dtype=torch.float16, device="cuda")
    residual, dy = torch.randn_like(x), torch.randn_like(x)
    weight = torch.randn(768, device="cuda")
    bias = torch.randn(768, device="cuda")
    _, mean, rstd = cuda_backend.add_layer_norm_forward(x, residual, weight, bias, 1e-12, 0.0, 0)
    first = cuda_backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, 0.0, 0)
    for _ in range(3):
        again = cuda_backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, 0.0, 0)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_public_add_layer_norm_op_runs_these_kernels():
    x = torch.randn(2, 9, 768, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = torch.randn(768, device="cuda", requires_grad=True)
    bias = torch.randn(768, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    y = fastbert.add_layer_norm(x, residual, weight, bias, 1e-12, backend="cuda")
    y.backward(dy)

    x2, r2, dy2 = (t.detach().reshape(18, 768) for t in (x, residual, dy))
    want_y, mean, rstd = cuda_backend.add_layer_norm_forward(x2, r2, weight.detach(),
                                                             bias.detach(), 1e-12, 0.0, 0)
    want = cuda_backend.add_layer_norm_backward(dy2, x2, r2, weight.detach(), mean, rstd, 0.0, 0)
    assert torch.equal(y.reshape(18, 768), want_y)
    for got, w in zip((x.grad, residual.grad, weight.grad, bias.grad), want):
        assert torch.equal(got.reshape(w.shape), w)


def layer_norm_keep_mask(backend, device, rows, hidden, dtype, p, seed):
    """The keep mask (rows, hidden) a backend draws for `seed`, read off its output: with x = 1,
    no residual, weight 1 and bias 0 the pre-norm sum is 1 / (1 - p) where kept and 0 where
    dropped, so y > 0 exactly where kept (when a row has both)."""
    x = torch.ones(rows, hidden, dtype=dtype, device=device)
    weight = torch.ones(hidden, dtype=dtype, device=device)
    y, mean, _ = backend.add_layer_norm_forward(x, None, weight, torch.zeros_like(weight), 1e-5,
                                                p, seed)
    keep = y > 0
    assert (keep.any(1) & ~keep.all(1)).all(), "a row kept or dropped everything: pick other sizes"
    # the mean of the pre-norm sum is (fraction kept) / (1 - p): checks the 1 / (1 - p) scale
    torch.testing.assert_close(mean.double(), keep.double().mean(1) / (1 - p), rtol=1e-5,
                               atol=1e-6)
    return keep


def check_layer_norm_dropout(backend, device, rows, hidden, dtype, with_residual, p,
                             seed=424242):
    keep = layer_norm_keep_mask(backend, device, rows, hidden, dtype, p, seed)
    assert_keep_rate(keep, p, "add_layer_norm")

    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    residual = torch.randn_like(x) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    bias = (0.1 * torch.randn(hidden, device=device)).to(dtype)
    dy = torch.randn_like(x)
    eps = 1e-5
    y, mean, rstd = backend.add_layer_norm_forward(x, residual, weight, bias, eps, p, seed)
    dx, dres, dw, db = backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, p, seed)

    r64 = residual.double() if residual is not None else None
    x64, w64, b64, dy64 = x.double(), weight.double(), bias.double(), dy.double()
    ey, emean, erstd = reference.add_layer_norm_forward(x64, r64, w64, b64, eps, p, keep)
    edx, edres, edw, edb = reference.add_layer_norm_backward(dy64, x64, r64, w64, emean, erstd,
                                                             p, keep)
    py, pmean, prstd = reference.add_layer_norm_forward(x, residual, weight, bias, eps, p, keep,
                                                        upcast=False)
    pdx, pdres, pdw, pdb = reference.add_layer_norm_backward(dy, x, residual, weight, pmean,
                                                             prstd, p, keep)
    tag = f"rows{rows} hidden{hidden} {dtype} residual={with_residual} p={p}"
    torch.testing.assert_close(mean.double(), emean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), erstd, rtol=1e-4, atol=1e-5)
    assert_close_by_rule(y, py, ey, f"y [{tag}]")
    assert_close_by_rule(dx, pdx, edx, f"dx [{tag}]")
    assert (dx[~keep] == 0).all(), tag  # backward regenerated forward's mask
    if residual is not None:
        assert_close_by_rule(dres, pdres, edres, f"dresidual [{tag}]")
    assert_close_by_rule(dw, pdw, edw, f"dweight [{tag}]")
    assert_close_by_rule(db, pdb, edb, f"dbias [{tag}]")

    again = backend.add_layer_norm_forward(x, residual, weight, bias, eps, p, seed)
    assert all(torch.equal(a, b) for a, b in zip((y, mean, rstd), again)), tag
    grads_again = backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, p, seed)
    assert all(torch.equal(a, b) for a, b in zip((dx, dw, db), grads_again[:1] + grads_again[2:]))
    other = backend.add_layer_norm_forward(x, residual, weight, bias, eps, p, seed + 1)
    assert not torch.equal(y, other[0]), tag


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows, hidden", [(37, 100), (64, 768), (9, 1030), (7, 1536),
                                          (5, 4096)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_add_layer_norm_dropout_matches_reference_with_its_mask(rows, hidden, dtype,
                                                                with_residual, p):
    check_layer_norm_dropout(cuda_backend, "cuda", rows, hidden, dtype, with_residual, p)


# --------------------------------------------------------------------------------------------
# gpu: linear + bias + GELU
# --------------------------------------------------------------------------------------------

def check_linear_gelu(m, k, n, dtype, approximate):
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    weight = (torch.randn(n, k, device="cuda") / math.sqrt(k)).to(dtype)
    bias = torch.randn(n, dtype=dtype, device="cuda")
    dout = torch.randn(m, n, dtype=dtype, device="cuda")

    out, pre = cuda_backend.linear_bias_gelu_forward(x, weight, bias, approximate)
    dx, dw, db = cuda_backend.linear_bias_gelu_backward(dout, x, weight, pre, approximate)
    assert out.shape == (m, n) and out.dtype == dtype and pre.dtype == dtype

    x64, w64, b64, do64 = x.double(), weight.double(), bias.double(), dout.double()
    eout, epre = reference.linear_bias_gelu_forward(x64, w64, b64, approximate)
    edx, edw, edb = reference.linear_bias_gelu_backward(do64, x64, w64, epre, approximate)
    pout, ppre = reference.linear_bias_gelu_forward(x, weight, bias, approximate, upcast=False)
    pdx, pdw, pdb = reference.linear_bias_gelu_backward(dout, x, weight, ppre, approximate)
    tag = f"m{m} k{k} n{n} {dtype} {approximate}"
    assert_close_by_rule(out, pout, eout, f"out [{tag}]")
    assert_close_by_rule(dx, pdx, edx, f"dx [{tag}]")
    assert_close_by_rule(dw, pdw, edw, f"dweight [{tag}]")
    assert_close_by_rule(db, pdb, edb, f"dbias [{tag}]")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("m, k, n", [(1, 64, 96), (37, 48, 130), (256, 128, 333),
                                     (512, 768, 3072)])
def test_linear_bias_gelu_matches_reference(m, k, n, dtype, approximate):
    check_linear_gelu(m, k, n, dtype, approximate)


@pytest.mark.gpu
def test_linear_bias_gelu_backward_is_deterministic():
    x = torch.randn(2048, 256, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(1024, 256, dtype=torch.bfloat16, device="cuda") / 16
    bias = torch.randn(1024, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(2048, 1024, dtype=torch.bfloat16, device="cuda")
    _, pre = cuda_backend.linear_bias_gelu_forward(x, weight, bias, "none")
    first = cuda_backend.linear_bias_gelu_backward(dout, x, weight, pre, "none")
    again = cuda_backend.linear_bias_gelu_backward(dout, x, weight, pre, "none")
    assert torch.equal(first[2], again[2])  # dbias: the part the extension reduces


@pytest.mark.gpu
def test_public_linear_bias_gelu_op_runs_these_kernels():
    x = torch.randn(3, 7, 64, dtype=torch.float16, device="cuda", requires_grad=True)
    weight = (torch.randn(200, 64, device="cuda") / 8).half().requires_grad_()
    bias = torch.randn(200, dtype=torch.float16, device="cuda", requires_grad=True)
    dout = torch.randn(3, 7, 200, dtype=torch.float16, device="cuda")
    out = fastbert.linear_bias_gelu(x, weight, bias, approximate="tanh", backend="cuda")
    out.backward(dout)

    x2, do2 = x.detach().reshape(21, 64), dout.reshape(21, 200)
    want_out, pre = cuda_backend.linear_bias_gelu_forward(x2, weight.detach(), bias.detach(),
                                                          "tanh")
    want = cuda_backend.linear_bias_gelu_backward(do2, x2, weight.detach(), pre, "tanh")
    assert torch.equal(out.reshape(21, 200), want_out)
    for got, w in zip((x.grad, weight.grad, bias.grad), want):
        assert torch.equal(got.reshape(w.shape), w)


# --------------------------------------------------------------------------------------------
# gpu: the whole model
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_bert_model_cuda_backend_matches_torch_backend(dtype):
    from fastbert.model import BertConfig, BertModel

    config = BertConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=1024,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config).cuda().eval()
    ids = torch.randint(0, 512, (3, 70), device="cuda")
    mask = random_padding_mask(3, 70, "cuda", mode="third")
    results = {}
    previous = fastbert.get_backend()
    try:
        for backend, dt in (("cuda", dtype), ("torch", dtype), ("torch", torch.float64)):
            fastbert.set_backend(backend)
            m = model.to(dt)
            m.zero_grad(set_to_none=True)
            hidden = m(ids, attention_mask=mask).last_hidden_state
            hidden.float().pow(2).mean().backward()
            grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()
                     if p.grad is not None}
            results[(backend, dt)] = (hidden.detach().clone(), grads)
    finally:
        fastbert.set_backend(previous)
    kernel, plain, exact = (results[("cuda", dtype)], results[("torch", dtype)],
                            results[("torch", torch.float64)])
    real = mask.unsqueeze(-1).expand_as(kernel[0])  # padded positions are not compared
    assert_close_by_rule(kernel[0][real], plain[0][real], exact[0][real], "last_hidden_state",
                         factor=3.0)
    for name, g in kernel[1].items():
        assert torch.isfinite(g).all(), name
        assert_close_by_rule(g, plain[1][name], exact[1][name], f"grad {name}", factor=3.0,
                             floor=2e-2 * exact[1][name].abs().max().item())


# --------------------------------------------------------------------------------------------
# gpu: compute-sanitizer on small cases
# --------------------------------------------------------------------------------------------

SANITIZER_SCRIPT = """
import torch
from fastbert import cuda as cb
torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16):
    for d in (32, 64, 128):
        for sq, sk, causal in ((70, 70, False), (33, 90, True), (90, 33, True)):
            q = torch.randn(2, sq, 2, d, dtype=dtype, device="cuda")
            k = torch.randn(2, sk, 2, d, dtype=dtype, device="cuda")
            v = torch.randn_like(k)
            mask = torch.arange(sk, device="cuda") < torch.tensor([[sk // 2], [0]], device="cuda")
            for p in (0.0, 0.2):
                out, lse = cb.attention_forward(q, k, v, mask, causal, p, 0.1, 7)
                for det in (False, True):
                    cb.attention_backward(torch.randn_like(out), q, k, v, out, lse, mask, causal,
                                          p, 0.1, 7, det)
        cu = torch.tensor([0, 0, 37, 37, 170, 171], dtype=torch.int32, device="cuda")
        qkv = torch.randn(171, 3, 2, d, dtype=dtype, device="cuda")
        q, k, v = qkv.unbind(1)
        for causal, p, det in ((False, 0.0, False), (True, 0.2, True)):
            out, lse = cb.attention_varlen_forward(q, k, v, cu, cu, 133, 133, causal, p, 0.1, 7)
            cb.attention_varlen_backward(torch.randn_like(out), q, k, v, out, lse, cu, cu, 133,
                                         133, causal, p, 0.1, 7, det)
    for hidden in (100, 768, 2048):
        x = torch.randn(9, hidden, dtype=dtype, device="cuda")
        w = torch.randn(hidden, device="cuda")
        for p in (0.0, 0.2):
            y, mean, rstd = cb.add_layer_norm_forward(x, x.clone(), w, w.clone(), 1e-5, p, 7)
            cb.add_layer_norm_backward(torch.randn_like(y), x, x.clone(), w, mean, rstd, p, 7)
    x = torch.randn(13, 40, dtype=dtype, device="cuda")
    w = torch.randn(72, 40, dtype=dtype, device="cuda")
    out, pre = cb.linear_bias_gelu_forward(x, w, torch.randn(72, dtype=dtype, device="cuda"),
                                           "none")
    cb.linear_bias_gelu_backward(torch.randn_like(out), x, w, pre, "none")
torch.cuda.synchronize()
"""


def _sanitizer():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "compute-sanitizer")):
            return os.path.join(home, "bin", "compute-sanitizer")
    return shutil.which("compute-sanitizer")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_is_clean(tool):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer is not installed")
    # only fastbert's kernels are instrumented (torch's own kernels are not under test)
    cmd = [exe, "--tool", tool, "--error-exitcode", "99", "--kernel-name", "kns=fastbert",
           sys.executable, "-c", SANITIZER_SCRIPT]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
