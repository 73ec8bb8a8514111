"""The backward kernels of the Triton attention (attention_kernels.py holds the forward, the
shared tile helpers and the module's description; attention.py launches both).

- A preprocess computes delta = scale * rowsum(dO * O) per query.
- `_attn_bwd_dkdv_kernel`, one program per key tile: recomputes P = exp(S - lse) and accumulates
  dV = P^T dO and dK = dS^T Q (dS = P * (scale * dP - delta), summed divided by the scale and,
  with dropout, by 1 / (1 - p); dK is multiplied once at the end). dQ either leaves this kernel
  by fp32 atomics (fast, order-dependent) or comes from
- `_attn_bwd_dq_kernel`, one program per query tile, with no atomics (bitwise reproducible).
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastbert.triton.attention_kernels import (LOG2E_K, _dot, _dropout_keep, _key_range, _mm,
                                               _rows, _sequence, _visible)
from fastbert.triton.launch import TRITON_BEFORE_3_9

# see ONE_LOOP in _attn_bwd_dkdv_kernel
BEFORE_3_9_K = tl.constexpr(TRITON_BEFORE_3_9)

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
    # P is zeroed for the keys key_real leaves out (None: none checked): a key mask's with a
    # window (else it is in the keys, see MASK_IN_KEYS); keys past len_k need no check (see
    # k_s in _attn_bwd_dkdv_kernel), queries past len_q have P = 0 (lse = +inf)
    if key_real is not None:
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
    key_real = None
    if HAS_MASK:  # this tile's keys are those of every query tile: their mask is read once
        key_lo, key_hi = _key_range(KvRange, off_b, len_k, HAS_MASK)
        key_real = tl.load(Mask + off_b * len_k + offs_n, mask=offs_n < len_k, other=0) != 0
    # without a window a key mask goes into the keys (MASK_IN_KEYS, below), not into a select
    # per element of P
    MASK_IN_KEYS: tl.constexpr = HAS_MASK and WINDOW_LEFT < 0 and WINDOW_RIGHT < 0
    kv_mask = (offs_n[:, None] < len_k) & d_ok[None, :]
    k_rows = _rows(K, off_b, k_start, stride_kb, IS_VARLEN) + off_h * stride_kh + offs_d[None, :]
    if MASK_IN_KEYS:
        k = tl.load(k_rows + offs_n[:, None] * stride_ks, mask=key_real[:, None] & d_ok[None, :],
                    other=0.0)
    else:
        k = tl.load(k_rows + offs_n[:, None] * stride_ks, mask=kv_mask, other=0.0)
    # S's keys past len_k: zero rows give them P = exp(-lse), which overflows where every score
    # of a query is below -88, and the dQ atomics' dS * 0 is then NaN. They take copies of the
    # last key instead (P <= 1; their dK, dV rows are not stored and dQ takes the zero rows).
    # MASK_IN_KEYS: every key that is not real (padding, past len_k) takes a copy of the
    # first real key, which every query that sees a real key sees (P <= 1), dQ takes K with
    # their rows 0, and their dK, dV rows are zeroed once at the end. (Without dQ, the
    # key-major tile needs no copies: nothing reads the rows past len_k.)
    k_s = k
    if MASK_IN_KEYS:
        k_s = tl.load(k_rows + tl.where(key_real, offs_n, key_lo)[:, None] * stride_ks,
                      mask=d_ok[None, :], other=0.0)
    elif DQ_ATOMIC or not KEY_MAJOR:
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
        live = (start_n * BLOCK_N < key_hi) & ((start_n + 1) * BLOCK_N > key_lo)
        hi = tl.where(live, hi, 0)

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
    # all causal (two spilled 44 B with the dQ atomics, varlen, dropout), the dQ atomics on
    # KEY_MAJOR under Triton before 3.9 (two spill 12-20 B on sm_80 with 3.6's ptxas) and a
    # sliding window (two: 16 more instructions per tile on sm_90).
    p_mask = key_real  # the keys _dkdv_tile zeroes P of (None: none)
    if MASK_IN_KEYS:
        p_mask = None
    mid = lo
    ONE_LOOP: tl.constexpr = IS_CAUSAL or (DQ_ATOMIC and KEY_MAJOR and BEFORE_3_9_K)
    if not ONE_LOOP and WINDOW_LEFT < 0 and WINDOW_RIGHT < 0:
        mid = tl.maximum(lo + ((hi - lo) // BLOCK_M) * BLOCK_M, lo)
    for start_m in range(lo, mid, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, k_s, v, start_m, offs_m0, offs_n, offs_d, d_ok, q_base,
                            do_base, lse_base, delta_base, dq_base, Mask, p_mask, off_b, off_bh,
                            len_q, len_k, seqlen_k, stride_qs, stride_ds, delta_unscale, qk_scale,
                            dropout_p, seed, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, DQ_ATOMIC,
                            EXACT_DOT, BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT, False, KEY_MAJOR)
    for start_m in range(mid, hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, k_s, v, start_m, offs_m0, offs_n, offs_d, d_ok, q_base,
                            do_base, lse_base, delta_base, dq_base, Mask, p_mask, off_b, off_bh,
                            len_q, len_k, seqlen_k, stride_qs, stride_ds, delta_unscale, qk_scale,
                            dropout_p, seed, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, DQ_ATOMIC,
                            EXACT_DOT, BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT, True, KEY_MAJOR)

    if MASK_IN_KEYS:
        dk = tl.where(key_real[:, None], dk, 0.0)
        dv = tl.where(key_real[:, None], dv, 0.0)
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
