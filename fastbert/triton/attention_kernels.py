"""Fused scaled-dot-product attention in Triton, FlashAttention-2 style: the forward kernels and
the tile helpers the backward's (attention_bwd_kernels.py) share. attention.py launches them on
the padded (dense) layout, attention_varlen.py on packed sequences.

Layouts: dense q (B, Sq, H, D), k and v (B, Sk, H, D); varlen (IS_VARLEN) q (total_q, H, D), k and
v (total_k, H, D) with sequence b at rows cu_seqlens[b]:cu_seqlens[b + 1]. Any strides but a unit
last one (views of one packed QKV projection, never copied). One program handles one tile of
queries (forward, dQ) or keys (dK/dV) of one (sequence, head): grid (tiles, H, B), so B * H is not
bound by CUDA's 65535 limit on the grid's y and z. Varlen grids cover max_seqlen; a program whose
tile starts past its own sequence's end returns at once, and key loops cover only its sequence.

- Forward: online softmax over key tiles in base 2 (exp2 is one instruction; the scale carries
  log2(e)), fp32 accumulation, and the log-sum-exp saved per query (natural log, +inf for a query
  that sees no key, whose output is 0).
- Backward: a preprocess computes delta = scale * rowsum(dO * O); one kernel per key tile
  recomputes P = exp(S - lse) and accumulates dV = P^T dO and dK = dS^T Q, where dS = P * (scale
  * dP - delta) carries the softmax scale (and, with dropout, 1 / (1 - p): it adds up dS divided
  by both and multiplies dK, and the launcher the atomic dQ, once at the end).
  dQ either goes out from that same kernel by fp32 atomics (fast, order-dependent) or, with
  deterministic=True or torch.use_deterministic_algorithms(True), from a second pass over query
  tiles with no atomics (bitwise reproducible).
- Skipped work: the key-padding mask is reduced on the device to a per-batch range of real keys
  [first, last + 1] (one small kernel, cached for the mask tensor until it is modified, so
  backward reuses forward's); key tiles outside it (right or left padding, the common cases) and
  tiles entirely above the causal diagonal are never visited. Holes inside the range are masked
  element-wise; a mask without holes (right padding) runs the forward's full tiles without any
  per-key check, as varlen does.
- Dropout acts on the normalised probabilities with philox (16-bit draws, 8 per call, see
  _dropout_keep), keyed by the call's seed plus (batch * H + head) and a counter from the query
  and key (varlen: local query and key), so backward regenerates the same mask. The kernels do
  not specialise on the seed (it changes every call; specialising on its value would only
  multiply compiled variants).
- Constexpr flags IS_CAUSAL / HAS_MASK / HAS_DROPOUT / IS_VARLEN compile each variant to the
  minimum. Head dims are padded to a power of two (at least 16, the smallest tl.dot) with masked
  loads and stores.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastbert.triton.rotary_tile import rope_tile

LOG2E = 1.4426950408889634
# the same constants as kernel-visible globals (Triton kernels may only read constexpr globals)
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(0.6931471805599453)

# Triton's interpreter computes bf16 tl.dot wrongly (numpy has no bf16, it multiplies the raw
# bits), so under TRITON_INTERPRET=1 bf16 dot operands are upcast to fp32 first.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET_K = tl.constexpr(_INTERPRET)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@triton.jit
def _dot(a, b, acc, EXACT_DOT: tl.constexpr):
    """acc + a @ b in fp32. EXACT_DOT: multiply in fp32 with IEEE precision (fp32 inputs, where
    TF32 would miss the 1e-5 target, and bf16 in the interpreter, see _INTERPRET)."""
    if EXACT_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _mm(a, b, EXACT_DOT: tl.constexpr):
    """a @ b in fp32, from no accumulator (the MMA starts from zero; no zero tile to write)."""
    if EXACT_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sequence(CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first query row, first key row, query count, key count) of sequence off_b. Dense: the
    rows start at the batch stride, so (0, 0, Sq, Sk); varlen: read from cu_seqlens."""
    if IS_VARLEN:
        q_start = tl.load(CuSeqQ + off_b)
        len_q = tl.load(CuSeqQ + off_b + 1) - q_start
        k_start = tl.load(CuSeqK + off_b)
        len_k = tl.load(CuSeqK + off_b + 1) - k_start
    else:
        q_start = 0
        len_q = seqlen_q
        k_start = 0
        len_k = seqlen_k
    return q_start, k_start, len_q, len_k


@triton.jit
def _rows(Base, off_b, row_start, stride_b, IS_VARLEN: tl.constexpr):
    """Base pointer of sequence off_b: batch stride (dense) or first row (varlen; stride_b is
    then the row stride)."""
    if IS_VARLEN:
        return Base + row_start.to(tl.int64) * stride_b
    else:
        return Base + off_b.to(tl.int64) * stride_b


# KvRange holds per batch (first real key, last real key + 1, end of the dense range)
KV_RANGE_SIZE = tl.constexpr(3)


@triton.jit
def _key_range(KvRange, off_b, seqlen_k, HAS_MASK: tl.constexpr):
    """[lo, hi): the keys of batch off_b that may be real (all of them without a mask)."""
    if HAS_MASK:
        lo = tl.load(KvRange + off_b * KV_RANGE_SIZE)
        hi = tl.load(KvRange + off_b * KV_RANGE_SIZE + 1)
    else:
        lo = 0
        hi = seqlen_k
    return lo, hi


@triton.jit
def _visible(rows_m, cols_n, Mask, off_b, seqlen_q, seqlen_k,
             IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, WINDOW_LEFT: tl.constexpr,
             WINDOW_RIGHT: tl.constexpr):
    """Which keys cols_n the queries rows_m may see, in their broadcast shape: (M, 1) and (1, N)
    give (M, N); (1, M) and (N, 1) give the transposed tile directly (no layout conversion)."""
    visible = (cols_n < seqlen_k) & (rows_m >= 0)
    if HAS_MASK:
        real = tl.load(Mask + off_b * seqlen_k + cols_n, mask=cols_n < seqlen_k, other=0)
        visible = visible & (real != 0)
    if IS_CAUSAL:  # bottom-right aligned: query i sees keys j <= i + Sk - Sq
        visible = visible & (cols_n <= rows_m + (seqlen_k - seqlen_q))
    # sliding window (flash-attn's): i + Sk - Sq - left <= j <= i + Sk - Sq + right
    if WINDOW_LEFT >= 0:
        visible = visible & (cols_n >= rows_m + (seqlen_k - seqlen_q) - WINDOW_LEFT)
    if WINDOW_RIGHT >= 0:
        visible = visible & (cols_n <= rows_m + (seqlen_k - seqlen_q) + WINDOW_RIGHT)
    return visible


# Philox-4x32's constants (tl.randint4x's)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
# a * factor as 32 x 32 -> 64 bits, returned as (high, low) words
_MUL_WIDE = "{{ .reg .u64 t; mul.wide.u32 t, $2, {}; mov.b64 {{$1, $0}}, t; }}"
MUL_WIDE_A = tl.constexpr(_MUL_WIDE.format(PHILOX_ROUND_A.value))
MUL_WIDE_B = tl.constexpr(_MUL_WIDE.format(PHILOX_ROUND_B.value))


@triton.jit
def _mul_wide(a, factor: tl.constexpr, MUL_WIDE: tl.constexpr):
    """(high, low) 32-bit halves of the uint32 a times factor (MUL_WIDE its PTX), as one
    32 x 32 -> 64-bit multiply (IMAD.WIDE.U32); tl.umulhi and * compile to two (IMAD.HI.U32,
    IMAD). PTX, because a uint64 product in Triton made its layout pass compute the philox in
    another layout and move the keep mask through shared memory (sm_90 dQ: 40 B spilled)."""
    if INTERPRET_K:
        return tl.umulhi(a, factor), a * factor
    else:
        return tl.inline_asm_elementwise(MUL_WIDE, "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32),
                                         is_pure=True, pack=1)


@triton.jit
def _philox_7_rounds(seed, counters):
    """tl.randint4x(seed, counters, 7) for int32 counters, bit for bit (tests check it), with
    each round's two products taken whole (_mul_wide): 4 instructions a round instead of 6."""
    tl.static_assert(counters.dtype.primitive_bitwidth == 32, "int32 counters only")
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = counters.to(tl.uint32)
    c1 = c0 * 0  # the counters' high word, and the two words randint4x leaves 0
    c2 = c1
    c3 = c1
    for _ in tl.static_range(7):
        high_b, low_b = _mul_wide(c2, PHILOX_ROUND_B, MUL_WIDE_B)
        high_a, low_a = _mul_wide(c0, PHILOX_ROUND_A, MUL_WIDE_A)
        c0 = high_b ^ c1 ^ k0
        c2 = high_a ^ c3 ^ k1
        c1 = low_b
        c3 = low_a
        k0 = tl.add(k0, PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(seed, off_bh, start_m, cols, row_stride, dropout_p, BLOCK_M: tl.constexpr,
                  KEYS_FIRST: tl.constexpr):
    """Keep-mask of queries start_m + [0, BLOCK_M) x keys `cols` (consecutive), the same for
    the same (seed, batch*head, query, key): (M, N), or (N, M) with KEYS_FIRST (dK/dV's
    transposed tile). One philox call (7 rounds, as FlashAttention's) gives 4 words, split into
    8 16-bit draws for queries {i, i + 8} x keys {j, j + 1, j + 8, j + 9} (i, j multiples of 16
    plus 0..7 / 0, 2, 4, 6): the 8 elements one thread holds of an MMA accumulator tile (sm_80's
    mma.sync and sm_90's wgmma), so the mask is generated where it is used, without a trip
    through shared memory. An element is kept when its draw is >= dropout_p * 2**16
    (probability 1 - dropout_p within 2**-16), compared as integers. Counter: query i * row_stride
    + key j of the group's first element, row_stride = Sk (dense) or max_seqlen_k (varlen);
    start_m and cols[0] are multiples of 16."""
    # group index (a, r, b, c): query start_m + 16 a + r, key cols[16 b + 2 c]
    a = tl.arange(0, BLOCK_M // 16)[:, None, None, None]
    r = tl.arange(0, 8)[None, :, None, None]
    BLOCK_N: tl.constexpr = cols.shape[0]
    # the group's first keys, cols[16 b + 2 c]: (b, key bit 3, c, key bit 0) -> bits 3 and 0 = 0
    firsts, _ = tl.split(tl.reshape(cols, (BLOCK_N // 16, 2, 4, 2)))
    firsts, _ = tl.split(tl.permute(firsts, (0, 2, 1)))
    counters = (start_m + 16 * a + r) * row_stride + firsts[None, None, :, :]
    r0, r1, r2, r3 = _philox_7_rounds(seed + off_bh, counters)
    # a draw d (16 bits) is kept when d >= threshold, compared in the high half of a word:
    # the high draw as the word itself, the low one shifted up (no mask, no shift down)
    threshold = tl.cast(dropout_p * 65536.0, tl.uint32) << 16
    # word 2 * (query bit 3) + (key bit 3), its low half for even keys, high for odd
    keep_q0 = tl.join(tl.join((r0 << 16) >= threshold, r0 >= threshold),
                      tl.join((r1 << 16) >= threshold, r1 >= threshold))
    keep_q8 = tl.join(tl.join((r2 << 16) >= threshold, r2 >= threshold),
                      tl.join((r3 << 16) >= threshold, r3 >= threshold))
    keep = tl.join(keep_q0, keep_q8)  # (a, r, b, c, key bit 0, key bit 3, query bit 3)
    keep = tl.reshape(tl.permute(keep, (0, 6, 1, 2, 5, 3, 4)), (BLOCK_M, BLOCK_N))
    if KEYS_FIRST:
        return tl.trans(keep)
    else:
        return keep


@triton.jit
def _key_range_kernel(Mask, KvRange, seqlen_k, BLOCK: tl.constexpr):
    """KvRange[b] = (first real key, last real key + 1, end of the dense range) of mask row b:
    every key in [first, dense end) is real, dense end = last + 1 when no key between is padding
    (right or left padding), else first; (0, 0, 0) when none."""
    off_b = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK)
    first = tl.full([BLOCK], seqlen_k, tl.int32)
    last = tl.zeros([BLOCK], tl.int32)
    count = tl.zeros([BLOCK], tl.int32)
    row = Mask + off_b.to(tl.int64) * seqlen_k
    for start in range(0, seqlen_k, BLOCK):
        cols = start + cols0
        real = tl.load(row + cols, mask=cols < seqlen_k, other=0) != 0
        first = tl.minimum(first, tl.where(real, cols, seqlen_k))
        last = tl.maximum(last, tl.where(real, cols + 1, 0))
        count += real.to(tl.int32)
    hi = tl.max(last, 0)
    lo = tl.minimum(tl.min(first, 0), hi)
    dense = tl.where(tl.sum(count, 0) == hi - lo, hi, lo)
    tl.store(KvRange + off_b * KV_RANGE_SIZE, lo)
    tl.store(KvRange + off_b * KV_RANGE_SIZE + 1, hi)
    tl.store(KvRange + off_b * KV_RANGE_SIZE + 2, dense)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_visible(rows, cols, Mask, off_b, len_q, len_k, IS_CAUSAL: tl.constexpr,
                 HAS_MASK: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """_visible for the forward's (M, N) tile, with the bounds on the keys folded per query
    first: query i sees keys first_i <= j <= last_i (and real ones), two integer compares per
    element however many bounds apply (a window, causal, the key count)."""
    per_key = cols < len_k
    if HAS_MASK:
        real = tl.load(Mask + off_b * len_k + cols, mask=per_key, other=0)
        per_key = per_key & (real != 0)
    if IS_CAUSAL or WINDOW_LEFT >= 0 or WINDOW_RIGHT >= 0:
        diagonal = rows + (len_k - len_q)  # bottom-right aligned
        last = tl.full(rows.shape, len_k - 1, tl.int32)
        if IS_CAUSAL:
            last = tl.minimum(last, diagonal)
        if WINDOW_RIGHT >= 0:
            last = tl.minimum(last, diagonal + WINDOW_RIGHT)
        if WINDOW_LEFT >= 0:
            # first <= j <= last as one unsigned compare, j - first <= last - first (a row that
            # sees nothing gets first = 2**30: j - first wraps to above any width)
            first = diagonal - WINDOW_LEFT
            width = last - first
            first = tl.where(width < 0, 1 << 30, first)
            width = tl.maximum(width, 0).to(tl.uint32)
            visible = (cols[None, :] - first[:, None]).to(tl.uint32) <= width[:, None]
        else:
            visible = cols[None, :] <= last[:, None]
        if HAS_MASK:
            visible = visible & per_key[None, :]
        return visible
    else:  # (rows >= 0 is always true; with it ptxas makes sm_80's full-tile loop 7
        # instructions shorter, measured on triton 3.9)
        return per_key[None, :] & (rows >= 0)[:, None]


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, d_ok, Mask,
              off_b, off_bh, len_q, len_k, seqlen_k, stride_ks, stride_vs, qk_scale, dropout_p,
              seed, start_m, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, EXACT_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
              BOUNDARY: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
              Cos=None, Sin=None, pos_k=None, ROTARY_HALF: tl.constexpr = 0):
    """One key tile of the online softmax. Without BOUNDARY every key of the tile exists and
    (causal, a window's right side) lies at or below every query's bound: no per-key check but,
    in a sliding window, its left bound, and with HAS_MASK the mask alone."""
    cols = start_n + offs_n
    if BOUNDARY:
        kv_mask = (cols[:, None] < len_k) & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    if ROTARY_HALF > 0:  # RoPE turns the keys as they arrive
        k = rope_tile(k, k_base + cols[:, None] * stride_ks, offs_d, kv_mask, Cos, Sin,
                      tl.load(pos_k + cols, mask=cols < len_k, other=0), ROTARY_HALF)
    # s stays unscaled: the scale (> 0) commutes with the max and folds into exp2's FFMA below
    s = _mm(q, tl.trans(k), EXACT_DOT)
    if BOUNDARY:
        s = tl.where(_fwd_visible(offs_m, cols, Mask, off_b, len_q, len_k, IS_CAUSAL, HAS_MASK,
                                  WINDOW_LEFT, WINDOW_RIGHT), s, float("-inf"))
    elif WINDOW_LEFT >= 0:  # key j >= query i + Sk - Sq - left
        first = offs_m + (len_k - len_q - WINDOW_LEFT)
        s = tl.where(cols[None, :] >= first[:, None], s, float("-inf"))
    if HAS_MASK and not BOUNDARY:  # one byte load and compare per key, no bounds to check
        real = tl.load(Mask + off_b * len_k + cols)
        s = tl.where(real[None, :] != 0, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # a row that has seen no key yet keeps m = -inf; subtract 0 instead to avoid inf - inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:  # normalise with every probability, then drop (1/(1-p) applied at the end)
        keep = _dropout_keep(seed, off_bh, start_m * BLOCK_M, cols, seqlen_k, dropout_p,
                             BLOCK_M, False)
        p = tl.where(keep, p, 0.0)
    v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = _dot(p.to(v.dtype), v, acc, EXACT_DOT)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, KvRange, CuSeqQ, CuSeqK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,  # lse: (B, H, Sq) dense, (H, total_q) varlen (stride_lb unused)
    n_heads, seqlen_q, seqlen_k, head_dim,  # varlen: seqlen_* are the max_seqlen bounds
    qk_scale,  # softmax scale * log2(e)
    dropout_p, seed,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, EXACT_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,  # -1: unbounded
    # > 0: q and k come un-rotated, RoPE turns them as they load (rotary_tile.py) with the
    # contiguous (positions, ROTARY_HALF) tables Cos, Sin at each row's PosQ / PosK entry
    ROTARY_HALF: tl.constexpr = 0, Cos=None, Sin=None, PosQ=None, PosK=None,
):
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_bh = off_b * n_heads + off_h
    q_start, k_start, len_q, len_k = _sequence(CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k,
                                               IS_VARLEN)
    if IS_VARLEN:
        if start_m * BLOCK_M >= len_q:  # the grid covers max_seqlen_q; this sequence is shorter
            return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < len_q

    q_base = _rows(Q, off_b, q_start, stride_qb, IS_VARLEN) + off_h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    pos_k = PosK  # None without ROTARY_HALF
    if ROTARY_HALF > 0:  # the query tile turns once
        q = rope_tile(q, q_base + offs_m[:, None] * stride_qs, offs_d,
                      row_ok[:, None] & d_ok[None, :], Cos, Sin,
                      tl.load(PosQ + q_start + offs_m, mask=row_ok, other=0), ROTARY_HALF)
        pos_k = PosK + k_start
    k_base = _rows(K, off_b, k_start, stride_kb, IS_VARLEN) + off_h * stride_kh
    v_base = _rows(V, off_b, k_start, stride_vb, IS_VARLEN) + off_h * stride_vh

    lo, hi = _key_range(KvRange, off_b, len_k, HAS_MASK)
    # Tiles [lo, mid) hold only existing keys (and, causal, keys every query of the block sees):
    # they skip the bound checks. lo and mid are multiples of BLOCK_N (or mid = hi). With a mask,
    # those of its dense range (all of [lo, hi) for right padding, when it starts on a tile) skip
    # the mask too; the others, [full_end, mid) (a mask with holes), check the mask alone.
    mid = tl.minimum(hi, (len_k // BLOCK_N) * BLOCK_N)
    if HAS_MASK:
        dense = tl.load(KvRange + off_b * KV_RANGE_SIZE + 2)
        dense_end = tl.where(lo % BLOCK_N == 0, lo + (dense - lo) // BLOCK_N * BLOCK_N, 0)
    if IS_CAUSAL:  # the block's first query sees keys up to start_m * BLOCK_M + Sk - Sq ...
        diagonal = start_m * BLOCK_M + len_k - len_q + 1
        mid = tl.minimum(mid, tl.where(diagonal > 0, diagonal // BLOCK_N, 0) * BLOCK_N)
        # ... its last one keys below min(Sq, end of block) + Sk - Sq
        hi = tl.minimum(hi, tl.minimum(len_q, (start_m + 1) * BLOCK_M) + len_k - len_q)
    # a sliding window: only the key tiles the block's band reaches
    if WINDOW_LEFT >= 0:
        lo = tl.maximum(lo, start_m * BLOCK_M + len_k - len_q - WINDOW_LEFT)
    if WINDOW_RIGHT >= 0:
        hi = tl.minimum(hi, tl.minimum(len_q, (start_m + 1) * BLOCK_M) + len_k - len_q
                        + WINDOW_RIGHT)
    lo = (lo // BLOCK_N) * BLOCK_N
    mid = tl.maximum(mid, lo)
    right_only = hi
    if WINDOW_LEFT >= 0 or WINDOW_RIGHT >= 0:
        # Each tile of the band needs one side's bound only: below the block's lowest right
        # bound (key count, causal, window) [lo, mid) checks the left bound alone (in the
        # full-tile loop), above its highest left bound [right_only, hi) the right bounds
        # alone; a tile between checks both (none at window 64 on 128 x 64 tiles).
        mid = lo
        if not HAS_MASK:
            last = len_k - 1  # the block's first query's last visible key
            if IS_CAUSAL:
                last = tl.minimum(last, start_m * BLOCK_M + len_k - len_q)
            if WINDOW_RIGHT >= 0:
                last = tl.minimum(last, start_m * BLOCK_M + len_k - len_q + WINDOW_RIGHT)
            mid = tl.minimum(tl.maximum((last + 1) // BLOCK_N * BLOCK_N, lo), hi)
            if WINDOW_LEFT >= 0:  # the block's last query's first visible key
                first = tl.minimum(len_q, (start_m + 1) * BLOCK_M) - 1 + len_k - len_q \
                    - WINDOW_LEFT
                right_only = tl.minimum(tl.maximum(tl.cdiv(first, BLOCK_N) * BLOCK_N, mid), hi)
            else:
                right_only = mid
    full_end = mid
    if HAS_MASK:  # (a window with a mask has no full tiles: mid = lo)
        full_end = tl.minimum(tl.maximum(dense_end, lo), mid)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_MASK:  # (tiles in any order; this one compiles to the shortest full-tile loops)
        for start_n in range(full_end, mid, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n,
                                      offs_d, d_ok, Mask, off_b, off_bh, len_q, len_k, seqlen_k,
                                      stride_ks, stride_vs, qk_scale, dropout_p, seed, start_m,
                                      IS_CAUSAL, True, HAS_DROPOUT, EXACT_DOT, BLOCK_M, False,
                                      WINDOW_LEFT, WINDOW_RIGHT, Cos, Sin, pos_k, ROTARY_HALF)
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n,
                                  offs_d, d_ok, Mask, off_b, off_bh, len_q, len_k, seqlen_k,
                                  stride_ks, stride_vs, qk_scale, dropout_p, seed, start_m,
                                  IS_CAUSAL, False, HAS_DROPOUT, EXACT_DOT, BLOCK_M, False,
                                  WINDOW_LEFT, WINDOW_RIGHT, Cos, Sin, pos_k, ROTARY_HALF)
    for start_n in range(mid, right_only, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n,
                                  offs_d, d_ok, Mask, off_b, off_bh, len_q, len_k, seqlen_k,
                                  stride_ks, stride_vs, qk_scale, dropout_p, seed, start_m,
                                  IS_CAUSAL, HAS_MASK, HAS_DROPOUT, EXACT_DOT, BLOCK_M, True,
                                  WINDOW_LEFT, WINDOW_RIGHT, Cos, Sin, pos_k, ROTARY_HALF)
    if WINDOW_LEFT >= 0 and not HAS_MASK:  # the tiles past the left bound: -1 drops its check
        for start_n in range(right_only, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n,
                                      offs_d, d_ok, Mask, off_b, off_bh, len_q, len_k, seqlen_k,
                                      stride_ks, stride_vs, qk_scale, dropout_p, seed, start_m,
                                      IS_CAUSAL, HAS_MASK, HAS_DROPOUT, EXACT_DOT, BLOCK_M, True,
                                      -1, WINDOW_RIGHT, Cos, Sin, pos_k, ROTARY_HALF)

    empty = l_i == 0.0  # the query sees no key: out = 0, lse = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2_K)
    o_base = _rows(Out, off_b, q_start, stride_ob, IS_VARLEN) + off_h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse_base = Lse + off_b.to(tl.int64) * stride_lb + off_h * stride_lh + q_start
    tl.store(lse_base + offs_m, lse, mask=row_ok)
