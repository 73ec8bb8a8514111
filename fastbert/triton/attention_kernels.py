"""Fused scaled-dot-product attention in Triton, FlashAttention-2 style: the kernels.
attention.py launches them on the padded (dense) layout, attention_varlen.py on packed sequences.

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
    r0, r1, r2, r3 = tl.randint4x(seed + off_bh, counters, 7)
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


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DOut, Delta,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    n_heads, seqlen_q, head_dim, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = sm_scale * rowsum(dO * O) per query, fp32, (B, H, Sq) (pre-scaled: dS = P *
    (sm_scale * dP - delta) is then one FFMA and one FMUL per element). Varlen runs it as one
    batch of total_q rows: its (1, H, total_q) is the varlen (H, total_q) layout."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_bh = off_b * n_heads + off_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < head_dim)
    o = tl.load(Out + off_b.to(tl.int64) * stride_ob + off_h * stride_oh
                + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + off_b.to(tl.int64) * stride_db + off_h * stride_dh
                 + offs_m[:, None] * stride_ds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * sm_scale
    tl.store(Delta + off_bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _per_query(x, KEY_MAJOR: tl.constexpr):
    """A per-query vector broadcast over the keys of a (M, N) tile, or (N, M) with KEY_MAJOR."""
    if KEY_MAJOR:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _per_key(x, KEY_MAJOR: tl.constexpr):
    """A per-key vector broadcast over the queries of a (M, N) tile, or (N, M) with KEY_MAJOR."""
    if KEY_MAJOR:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _keys_first(x, KEY_MAJOR: tl.constexpr):
    """The (N, M) view of a tile held (M, N), or (N, M) with KEY_MAJOR."""
    if KEY_MAJOR:
        return x
    else:
        return tl.trans(x)


@triton.jit
def _dkdv_tile(dk, dv, k, k_s, v, start_m, offs_m0, offs_n, offs_d, d_ok, q_base, do_base,
               lse_base, delta_base, dq_base, Mask, key_real, off_b, off_bh, len_q, len_k, seqlen_k,
               stride_qs, stride_ds, delta_unscale, qk_scale, dropout_p, seed,
               IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               DQ_ATOMIC: tl.constexpr, EXACT_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, BOUNDARY: tl.constexpr,
               KEY_MAJOR: tl.constexpr):
    """dK, dV (and the atomic dQ) of one query tile, dK and dQ divided by ds_scale. Without
    BOUNDARY every query of the tile exists: its loads, the log-sum-exp's and the dQ atomics
    skip the per-row checks. P and dS are held (M, N), as the forward held P: the log-sum-exp
    and delta are then per row (two per thread) and the dropout mask's philox groups lie in
    one thread; dV and dK take P^T, dS^T as shared-memory MMA operands. KEY_MAJOR holds them
    (N, M) instead: P^T and dS^T are the registers' own MMA operands, and dQ takes dS through
    shared memory (see _attn_bwd_dkdv_kernel for which tiles do which). S takes the keys k_s,
    dQ k (they differ past len_k, see there)."""
    offs_m = start_m + offs_m0
    if BOUNDARY:
        row_ok = offs_m < len_q
        qo_mask = row_ok[:, None] & d_ok[None, :]
    else:  # a full tile: every query exists, no per-row checks
        qo_mask = d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qo_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_ds + offs_d[None, :], mask=qo_mask,
                 other=0.0)
    if BOUNDARY:
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # +inf makes P = 0
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    # recompute P from the saved log-sum-exp
    if KEY_MAJOR:
        s = _mm(k_s, tl.trans(q), EXACT_DOT)
    else:
        s = _mm(q, tl.trans(k_s), EXACT_DOT)
    p = tl.math.exp2(s * qk_scale - _per_query(lse * LOG2E_K, KEY_MAJOR))
    # keys past len_k need no check but with KEY_MAJOR's dQ atomics (see k_s in
    # _attn_bwd_dkdv_kernel); queries past len_q have P = 0 (lse = +inf)
    if HAS_MASK or (DQ_ATOMIC and KEY_MAJOR):
        p = tl.where(_per_key(key_real, KEY_MAJOR), p, 0.0)
    if IS_CAUSAL or WINDOW_LEFT >= 0 or WINDOW_RIGHT >= 0:
        visible = _visible(_per_query(offs_m, KEY_MAJOR), _per_key(offs_n, KEY_MAJOR), Mask,
                           off_b, len_q, len_k, IS_CAUSAL, False, WINDOW_LEFT, WINDOW_RIGHT)
        p = tl.where(visible, p, 0.0)
    if KEY_MAJOR:
        dp = _mm(v, tl.trans(do), EXACT_DOT)
    else:
        dp = _mm(do, tl.trans(v), EXACT_DOT)
    # dS / ds_scale = P * (dP * keep - delta / ds_scale): the kernel multiplies dK by ds_scale
    # once at the end, the launcher the atomic dQ (one multiply per element less per tile)
    delta = _per_query(delta * delta_unscale, KEY_MAJOR)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, off_bh, start_m, offs_n, seqlen_k, dropout_p, BLOCK_M,
                             KEY_MAJOR)
        # dV = (P * keep)^T dO / (1 - p): the 1 / (1 - p) goes on at the end. The select
        # runs in fp32, before the cast (after it, it is a 16-bit select and repack).
        p_kept = tl.where(keep, p, 0.0)
        dv = _dot(_keys_first(p_kept.to(do.dtype), KEY_MAJOR), do, dv, EXACT_DOT)
        # a dropped element's dP is 0: only -P * delta is left of its dS
        ds = p_kept * dp - p * delta
    else:
        dv = _dot(_keys_first(p.to(do.dtype), KEY_MAJOR), do, dv, EXACT_DOT)
        ds = p * (dp - delta)
    ds = _keys_first(ds.to(q.dtype), KEY_MAJOR)
    dk = _dot(ds, q, dk, EXACT_DOT)
    if DQ_ATOMIC:
        dq = _mm(tl.trans(ds), k, EXACT_DOT)
        tl.atomic_add(dq_base + offs_m[:, None] * stride_ds + offs_d[None, :], dq,
                      mask=qo_mask, sem="relaxed")  # a sum: no ordering needed
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, DK, DV, Mask, KvRange, CuSeqQ, CuSeqK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,  # dout, dq (same contiguous layout)
    stride_kgb, stride_kgs, stride_kgh,  # dk, dv (same contiguous layout)
    stride_lb, stride_lh,  # lse and delta (same layout)
    n_heads, seqlen_q, seqlen_k, head_dim,
    sm_scale, qk_scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, DQ_ATOMIC: tl.constexpr, EXACT_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,  # -1: unbounded
):
    """dK, dV for one key tile (and, with DQ_ATOMIC, its share of dQ added atomically)."""
    start_n = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_bh = off_b * n_heads + off_h
    q_start, k_start, len_q, len_k = _sequence(CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k,
                                               IS_VARLEN)
    if IS_VARLEN:
        if start_n * BLOCK_N >= len_k:
            return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    # sm_90's square 64x64 tile (one warpgroup) holds P and dS (M, N) (see _dkdv_tile); the
    # tall key tiles (sm_80's 32x128 on 8 warps, fp32, wide heads) hold them (N, M): there
    # (M, N) spilled 36-244 B (255 registers, sm_80 with dropout)
    KEY_MAJOR: tl.constexpr = BLOCK_N > BLOCK_M
    kv_mask = (offs_n[:, None] < len_k) & d_ok[None, :]
    k_rows = _rows(K, off_b, k_start, stride_kb, IS_VARLEN) + off_h * stride_kh + offs_d[None, :]
    k = tl.load(k_rows + offs_n[:, None] * stride_ks, mask=kv_mask, other=0.0)
    # S's keys past len_k: zero rows give them P = exp(-lse), which overflows where every score
    # of a query is below -88, and the dQ atomics' dS * 0 is then NaN. (M, N) tiles give them
    # copies of the last key instead (P <= 1; their dK, dV rows are not stored and dQ takes
    # the zero rows); (N, M) tiles zero their P with the dQ atomics (see _dkdv_tile).
    k_s = k
    if not KEY_MAJOR:
        k_s = tl.load(k_rows + tl.minimum(offs_n, len_k - 1)[:, None] * stride_ks,
                      mask=d_ok[None, :], other=0.0)
    v = tl.load(_rows(V, off_b, k_start, stride_vb, IS_VARLEN) + off_h * stride_vh
                + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base = _rows(Q, off_b, q_start, stride_qb, IS_VARLEN) + off_h * stride_qh
    do_base = _rows(DOut, off_b, q_start, stride_db, IS_VARLEN) + off_h * stride_dh
    lse_offset = off_b.to(tl.int64) * stride_lb + off_h * stride_lh + q_start
    lse_base = Lse + lse_offset
    delta_base = Delta + lse_offset

    # Query tiles to visit: all, less those entirely before the causal diagonal; none when this
    # key tile lies outside the batch's range of real keys (its dK, dV are zero).
    lo = 0
    hi = len_q
    if IS_CAUSAL:  # key j is seen by queries i >= j - (Sk - Sq)
        lo = tl.maximum(start_n * BLOCK_N - (len_k - len_q), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    # a sliding window: key j is seen by queries j - (Sk - Sq) - right <= i <= j - (Sk - Sq) + left
    if WINDOW_RIGHT >= 0:
        lo = tl.maximum(lo, start_n * BLOCK_N - (len_k - len_q) - WINDOW_RIGHT)
        lo = (lo // BLOCK_M) * BLOCK_M
    if WINDOW_LEFT >= 0:
        hi = tl.minimum(hi, (start_n + 1) * BLOCK_N - (len_k - len_q) + WINDOW_LEFT)
    if HAS_MASK:
        key_lo, key_hi = _key_range(KvRange, off_b, len_k, HAS_MASK)
        live = (start_n * BLOCK_N < key_hi) & ((start_n + 1) * BLOCK_N > key_lo)
        hi = tl.where(live, hi, 0)

    key_real = None
    if HAS_MASK:  # this tile's keys are those of every query tile: their mask is read once
        key_real = tl.load(Mask + off_b * len_k + offs_n, mask=offs_n < len_k, other=0) != 0
    elif DQ_ATOMIC and KEY_MAJOR:
        key_real = offs_n < len_k
    # dS = ds_scale * P * (dP * keep - delta / ds_scale): a kept dP is scaled by 1 / (1 - p),
    # and delta comes multiplied by the softmax scale
    ds_scale = sm_scale / (1.0 - dropout_p)
    delta_unscale = (1.0 - dropout_p) / sm_scale
    dq_base = DQ  # None without DQ_ATOMIC
    if DQ_ATOMIC:
        dq_base = _rows(DQ, off_b, q_start, stride_db, IS_VARLEN) + off_h * stride_dh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # the full query tiles [lo, mid), then the one that runs past len_q (if any). One loop does
    # all causal (two spilled 44 B with the dQ atomics, varlen, dropout), with the dQ atomics
    # and a key mask or KEY_MAJOR (two spill 108 B on sm_90, 12 B on sm_80 with Triton 3.6) and
    # with a sliding window (two: 16 more instructions per tile on sm_90).
    mid = lo
    ONE_LOOP: tl.constexpr = IS_CAUSAL or (DQ_ATOMIC and (HAS_MASK or KEY_MAJOR))
    if not ONE_LOOP and WINDOW_LEFT < 0 and WINDOW_RIGHT < 0:
        mid = tl.maximum(lo + ((hi - lo) // BLOCK_M) * BLOCK_M, lo)
    for start_m in range(lo, mid, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, k_s, v, start_m, offs_m0, offs_n, offs_d, d_ok, q_base,
                            do_base, lse_base, delta_base, dq_base, Mask, key_real, off_b, off_bh,
                            len_q, len_k, seqlen_k, stride_qs, stride_ds, delta_unscale, qk_scale,
                            dropout_p, seed, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, DQ_ATOMIC,
                            EXACT_DOT, BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT, False, KEY_MAJOR)
    for start_m in range(mid, hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, k_s, v, start_m, offs_m0, offs_n, offs_d, d_ok, q_base,
                            do_base, lse_base, delta_base, dq_base, Mask, key_real, off_b, off_bh,
                            len_q, len_k, seqlen_k, stride_qs, stride_ds, delta_unscale, qk_scale,
                            dropout_p, seed, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, DQ_ATOMIC,
                            EXACT_DOT, BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT, True, KEY_MAJOR)

    kg_offs = off_h * stride_kgh + offs_n[:, None] * stride_kgs + offs_d[None, :]
    tl.store(_rows(DK, off_b, k_start, stride_kgb, IS_VARLEN) + kg_offs,
             (dk * ds_scale).to(DK.dtype.element_ty), mask=kv_mask)
    if HAS_DROPOUT:
        dv = dv * (1.0 / (1.0 - dropout_p))
    tl.store(_rows(DV, off_b, k_start, stride_kgb, IS_VARLEN) + kg_offs,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, start_m, offs_m, offs_n, offs_d,
             d_ok, Mask, off_b, off_bh, len_q, len_k, seqlen_k, stride_ks, stride_vs, sm_scale,
             ds_scale, qk_scale, dropout_p, seed, IS_CAUSAL: tl.constexpr,
             HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, EXACT_DOT: tl.constexpr,
             BLOCK_M: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
             BOUNDARY: tl.constexpr):
    """dQ plus one key tile's share. Without BOUNDARY every key of the tile exists and every
    query sees it: no per-key check."""
    cols = start_n + offs_n
    if BOUNDARY:
        kv_mask = (cols[:, None] < len_k) & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _mm(q, tl.trans(k), EXACT_DOT)
    p = tl.math.exp2(s * qk_scale - lse[:, None] * LOG2E_K)
    if BOUNDARY:
        visible = _visible(offs_m[:, None], cols[None, :], Mask, off_b, len_q, len_k, IS_CAUSAL,
                           HAS_MASK, WINDOW_LEFT, WINDOW_RIGHT)
        p = tl.where(visible, p, 0.0)
    dp = _mm(do, tl.trans(v), EXACT_DOT)
    # dS = P * (scale * dP - delta), the softmax scale in (delta comes scaled)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, off_bh, start_m * BLOCK_M, cols, seqlen_k, dropout_p,
                             BLOCK_M, False)
        ds = p * tl.where(keep, dp * ds_scale - delta[:, None], -delta[:, None])
    else:
        ds = p * (dp * sm_scale - delta[:, None])
    return _dot(ds.to(k.dtype), k, dq, EXACT_DOT)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Mask, KvRange, CuSeqQ, CuSeqK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,  # dout, dq (same contiguous layout)
    stride_lb, stride_lh,  # lse and delta (same layout)
    n_heads, seqlen_q, seqlen_k, head_dim,
    sm_scale, qk_scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, EXACT_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,  # -1: unbounded
):
    """dQ for one query tile, summing over key tiles in a fixed order (deterministic)."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_bh = off_b * n_heads + off_h
    q_start, k_start, len_q, len_k = _sequence(CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k,
                                               IS_VARLEN)
    if IS_VARLEN:
        if start_m * BLOCK_M >= len_q:
            return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < len_q
    qo_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(_rows(Q, off_b, q_start, stride_qb, IS_VARLEN) + off_h * stride_qh
                + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qo_mask, other=0.0)
    do_offs = off_h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :]
    do = tl.load(_rows(DOut, off_b, q_start, stride_db, IS_VARLEN) + do_offs, mask=qo_mask,
                 other=0.0)
    lse_offset = off_b.to(tl.int64) * stride_lb + off_h * stride_lh + q_start
    lse = tl.load(Lse + lse_offset + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + lse_offset + offs_m, mask=row_ok, other=0.0)
    k_base = _rows(K, off_b, k_start, stride_kb, IS_VARLEN) + off_h * stride_kh
    v_base = _rows(V, off_b, k_start, stride_vb, IS_VARLEN) + off_h * stride_vh

    lo, hi = _key_range(KvRange, off_b, len_k, HAS_MASK)
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.minimum(len_q, (start_m + 1) * BLOCK_M) + len_k - len_q)
    if WINDOW_LEFT >= 0:
        lo = tl.maximum(lo, start_m * BLOCK_M + len_k - len_q - WINDOW_LEFT)
    if WINDOW_RIGHT >= 0:
        hi = tl.minimum(hi, tl.minimum(len_q, (start_m + 1) * BLOCK_M) + len_k - len_q
                        + WINDOW_RIGHT)
    lo = (lo // BLOCK_N) * BLOCK_N

    ds_scale = sm_scale / (1.0 - dropout_p)  # dropout: a kept dP is scaled by 1 / (1 - p)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the key tiles every query sees whole [lo, mid) (no mask, causal or window; they skip the
    # visibility select), then the one that runs past len_k (if any)
    mid = lo
    if not HAS_MASK and not IS_CAUSAL and WINDOW_LEFT < 0 and WINDOW_RIGHT < 0:
        mid = tl.maximum(lo + ((hi - lo) // BLOCK_N) * BLOCK_N, lo)
    for start_n in range(lo, mid, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, start_m, offs_m, offs_n,
                      offs_d, d_ok, Mask, off_b, off_bh, len_q, len_k, seqlen_k, stride_ks,
                      stride_vs, sm_scale, ds_scale, qk_scale, dropout_p, seed, IS_CAUSAL,
                      HAS_MASK, HAS_DROPOUT, EXACT_DOT, BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT, False)
    for start_n in range(mid, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, start_m, offs_m, offs_n,
                      offs_d, d_ok, Mask, off_b, off_bh, len_q, len_k, seqlen_k, stride_ks,
                      stride_vs, sm_scale, ds_scale, qk_scale, dropout_p, seed, IS_CAUSAL,
                      HAS_MASK, HAS_DROPOUT, EXACT_DOT, BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT, True)
    tl.store(_rows(DQ, off_b, q_start, stride_db, IS_VARLEN) + do_offs,
             dq.to(DQ.dtype.element_ty), mask=qo_mask)
