"""The CUDA attention kernels checked without a GPU (compile tier, no kernel launched):

- the fragment offsets of kernels/attention_layout.cuh, built for the host, replayed through a
  model of ldmatrix / mma.m16n8k16 written from the PTX ISA give exact products; the dropout
  words each lane draws (attention_common.cuh draw_pair_words) are those of its own elements;
- their SASS (cuobjdump) has HMMA in the theoretical count per tile, LDSM and LDGSTS for fp16
  and bf16, no generic loads, no local memory, and allows >= 2 blocks per SM on A100 / H100.
  `python -m pytest -m compile tests/test_cuda_attention_static.py`
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.cuda_helpers import ROOT, philox4x32_10, require_built
# autouse fixtures: imported, so they apply to every test in this module
from tests.cuda_helpers import extension_runs_here, poisoned_outputs  # noqa: F401


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


def _mma_x2(acc, j, a, b):
    """acc's n8 fragments 2j and 2j + 1 += a times the two halves of one ldmatrix.x4 of B."""
    acc[2 * j] = _mma(acc[2 * j], a, [(r[0], r[1]) for r in b])
    acc[2 * j + 1] = _mma(acc[2 * j + 1], a, [(r[2], r[3]) for r in b])


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

    def times_b(b_tile, a_of_kt):
        """sum over key tiles kt of the A operand a_of_kt(kt) times b_tile's rows 16kt..16kt+15,
        B loaded with ldmatrix .trans (V in forward, K in backward) -> d // 8 C fragments."""
        acc = [zero] * (d // 8)
        for kt in range(n // 16):
            a = a_of_kt(kt)
            for dp in range(d // 16):
                _mma_x2(acc, dp, a, _ldmatrix_x4(b_tile, layout(2, kt * 16, dp * 16, ld),
                                                 trans=True))
        return acc

    s_rows = []
    for w in range(2):  # forward: warp w owns query rows 16w..16w+15
        s = [zero] * (n // 8)
        for kk in range(d // 16):
            a = _ldmatrix_x4(q_t, layout(0, w * 16, kk * 16, ld), trans=False)
            for np_ in range(n // 16):
                bk = _ldmatrix_x4(k_t, layout(1, np_ * 16, kk * 16, ld), trans=False)
                _mma_x2(s, np_, a, bk)
        torch.testing.assert_close(_c_to_matrix(s), q[16 * w:16 * w + 16] @ k.T, rtol=0, atol=0)
        o = times_b(v_t, lambda kt: _c_as_a(s, kt))
        s_mat = _c_to_matrix(s)
        torch.testing.assert_close(_c_to_matrix(o), s_mat @ v, rtol=0, atol=0)
        s_rows.append(s_mat)
    # backward dQ: dS^T [keys][queries] in shared memory, stored from C fragments of key rows
    ds = torch.randint(-3, 4, (m, n), generator=gen).double()
    ds_t = _flat_tile(ds.T.contiguous(), ds_ld)
    for rg in range(2):
        acc = times_b(k_t, lambda kt: _ldmatrix_x4(ds_t, layout(3, rg * 16, kt * 16, ds_ld),
                                                   trans=True))
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

# fwd_kernel<__half, 64, false> or fwd_kernel_fp32<64, false> (and dkdv_kernel, dq_kernel)
_ATTENTION_KERNEL = re.compile(r"attn\d+(fwd_kernel|dkdv_kernel|dq_kernel)(_fp32)?I"
                               r"(6__half|13__nv_bfloat16)?Li(\d+)ELb([01])E")
_SMEM_PER_SM = {"A100": 167936, "H100": 233472}  # bytes a block may share an SM with others
_SMEM_RESERVED_PER_BLOCK = 1024


def _cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe is None:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        exe = str(bundled) if bundled.exists() else None
    return exe


def _kernel_key(arch, m):
    """(arch, kind, dtype, D, dropout) of a _ATTENTION_KERNEL match; fp32 kinds end in _fp32."""
    dtype = "fp32" if m[2] else "bf16" if "bfloat" in m[3] else "fp16"
    return arch, m[1] + (m[2] or ""), dtype, int(m[4]), m[5] == "1"


@pytest.fixture(scope="module")
def attention_sass():
    """{(arch, kernel, dtype, D, dropout): {"sass": [instructions], "REG": .., "STACK": ..,
    "LOCAL": ..}} for the attention kernels of the built extension."""
    require_built()
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
            current = None if m is None else _kernel_key(arch, m)
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
            current = _kernel_key(arch, m)
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

    half = {key: k for key, k in attention_sass.items() if key[2] != "fp32"}
    assert len(half) == len({k[0] for k in half}) * 2 * 3 * 2 * 3
    rows = []
    for (arch, kind, dtype, d, dropout), k in sorted(half.items()):
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


def _expected_lds128(kind, d, t):
    """16-byte shared loads (LDS.128) of an fp32 kernel: its loop bodies as written (dot_rows and
    accumulate_rows unrolled twice, each operand row one LDS.128 per 4 floats of the inner loop;
    the dK/dV kernel's dQ product unrolled 4 times, its dS^T column reads vectorised)."""
    if kind == "fwd_kernel_fp32":  # S = Q K^T (4 rows x kBlockN / 8 keys), O += P V
        return 2 * (4 + t["fwd_fp32_block_n"] // 8) + 2 * (4 + d // 8)
    if kind == "dq_kernel_fp32":  # S, dP (R rows x kBlockN / 8 keys); dQ += dS K
        rows = t["dq_fp32_block_m"] // 16
        return 4 * (rows + t["dq_fp32_block_n"] // 8) + 2 * (rows + d // 8)
    lanes = 128 // (t["dkdv_fp32_block_n"] // 4)  # S^T, dP^T (queries per thread x 4 keys)
    rows, acc = t["dkdv_fp32_block_m"] // lanes, d // lanes  # dV, dK; dQ
    dq_rows = t["dkdv_fp32_block_m"] * d // 4 // 128
    return 4 * (rows + 4) + 4 * (4 + acc) + 4 * (1 + dq_rows // 4)


@pytest.mark.compile
def test_fp32_attention_sass_is_simt_flash_attention(attention_sass):
    """The fp32 kernels (kernels/attention_fp32.cuh), every arch, head dim and dropout variant:
    FFMA on fp32 operands (no HMMA: TF32 would round the inputs to 10 bits), every shared-memory
    operand read as a 16-byte LDS.128 in exactly the count the loop bodies ask for, >= 8 FFMA per
    LDS.128 (each thread's 4 x 8 / 4 x 4 register tiles; 6 in the D = 128 deterministic dQ
    kernel's 2 x 4), tiles loaded by cp.async (LDGSTS), no
    generic LD.E and no local memory (spills or stack)."""
    import fastbert._C as ext

    fp32 = {key: k for key, k in attention_sass.items() if key[2] == "fp32"}
    assert len(fp32) == len({k[0] for k in fp32}) * 3 * 2 * 3
    rows = []
    for (arch, kind, dtype, d, dropout), k in sorted(fp32.items()):
        sass = k["sass"]
        tag = f"{arch} {kind}<D={d}, dropout={dropout}>"
        counts = {name: _count(sass, pat) for name, pat in (
            ("FFMA", r"FFMA\s"), ("LDS.128", r"LDS\.128"), ("HMMA", r"HMMA"),
            ("LDGSTS", r"LDGSTS"), ("LD.E", r"LD\.E"), ("local", r"(LDL|STL)\b"))}
        assert counts["HMMA"] == 0 and counts["LD.E"] == 0 and counts["local"] == 0, (tag, counts)
        assert k["STACK"] == 0 and k["LOCAL"] == 0, (tag, k)
        assert counts["LDGSTS"] > 0, (tag, counts)
        assert counts["LDS.128"] == _expected_lds128(kind, d, ext.attention_tile_info(d, dropout)),\
            (tag, counts)
        # the deterministic dQ kernel at D = 128 tiles 2 query rows a thread (2 blocks per A100 SM)
        intensity = 6 if kind == "dq_kernel_fp32" and d == 128 else 8
        assert counts["FFMA"] >= intensity * counts["LDS.128"], (tag, counts)
        rows.append(f"{tag:46s} REG {k['REG']:3d}  FFMA {counts['FFMA']:4d}  LDS.128 "
                    f"{counts['LDS.128']:3d}  instructions {len(sass)}")
    print("\n" + "\n".join(rows))
