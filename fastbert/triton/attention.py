"""Fused scaled-dot-product attention in Triton, FlashAttention-2 style: kernels and launchers.

Layout: q (B, Sq, H, D), k and v (B, Sk, H, D) with any strides but a unit last one (they may be
views of one packed (B, S, 3, H, D) projection, never copied). One program handles one tile of
queries (forward, dQ) or keys (dK/dV) of one (batch, head): grid (tiles, H, B), so B * H is not
bound by CUDA's 65535 limit on the grid's y and z.

- Forward: online softmax over key tiles in base 2 (exp2 is one instruction; the scale carries
  log2(e)), fp32 accumulation, and the log-sum-exp saved per query (natural log, +inf for a query
  that sees no key, whose output is 0).
- Backward: a preprocess computes delta = rowsum(dO * O); one kernel per key tile recomputes
  P = exp(S - lse) and accumulates dV = P^T dO and dK = dS^T Q, where dS = P * (dP - delta).
  dQ either goes out from that same kernel by fp32 atomics (fast, order-dependent) or, with
  deterministic=True, from a second pass over query tiles with no atomics (bitwise reproducible).
- Skipped work: the launcher reduces the key-padding mask to a per-batch range of real keys
  [first, last + 1]; key tiles outside it (right or left padding, the common cases) and tiles
  entirely above the causal diagonal are never visited. Holes inside the range are masked
  element-wise. The range costs two tiny reductions on the (B, Sk) mask per launch, and unlike a
  per-tile "all padding?" test it needs no mask loads for tiles it skips.
- Dropout acts on the normalised probabilities with philox (`tl.rand`), keyed by the call's seed
  plus (batch * H + head) and the counter query * Sk + key, so backward regenerates the same mask.
  The kernels do not specialise on the seed (it changes every call; specialising on its value
  would only multiply compiled variants).
- Constexpr flags IS_CAUSAL / HAS_MASK / HAS_DROPOUT compile each variant to the minimum. Head dims
  are padded to a power of two (at least 16, the smallest tl.dot) with masked loads and stores.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

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
def _key_range(KvRange, off_b, seqlen_k, HAS_MASK: tl.constexpr):
    """[lo, hi): the keys of batch off_b that may be real (all of them without a mask)."""
    if HAS_MASK:
        lo = tl.load(KvRange + off_b * 2)
        hi = tl.load(KvRange + off_b * 2 + 1)
    else:
        lo = 0
        hi = seqlen_k
    return lo, hi


@triton.jit
def _visible(offs_m, offs_n, Mask, off_b, seqlen_q, seqlen_k,
             IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """(M, N) bool: which keys offs_n the queries offs_m may see."""
    visible = (offs_n[None, :] < seqlen_k) & (offs_m[:, None] >= 0)
    if HAS_MASK:
        real = tl.load(Mask + off_b * seqlen_k + offs_n, mask=offs_n < seqlen_k, other=0)
        visible = visible & (real[None, :] != 0)
    if IS_CAUSAL:  # bottom-right aligned: query i sees keys j <= i + Sk - Sq
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q))
    return visible


@triton.jit
def _dropout_keep(seed, off_bh, offs_m, offs_n, seqlen_k, dropout_p):
    """(M, N) bool keep-mask, the same for the same (seed, batch*head, query, key)."""
    counters = offs_m[:, None] * seqlen_k + offs_n[None, :]
    return tl.rand(seed + off_bh, counters) >= dropout_p


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, KvRange,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    n_heads, seqlen_q, seqlen_k, head_dim,
    qk_scale,  # softmax scale * log2(e)
    dropout_p, seed,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_bh = off_b * n_heads + off_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    q_ptrs = (Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
              + offs_m[:, None] * stride_qs + offs_d[None, :])
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & d_ok[None, :], other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h * stride_vh

    lo, hi = _key_range(KvRange, off_b, seqlen_k, HAS_MASK)
    if IS_CAUSAL:  # the block's last query sees keys below min(Sq, end of block) + Sk - Sq
        hi = tl.minimum(hi, tl.minimum(seqlen_q, (start_m + 1) * BLOCK_M) + seqlen_k - seqlen_q)
    lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_DOT) * qk_scale
        visible = _visible(offs_m, cols, Mask, off_b, seqlen_q, seqlen_k, IS_CAUSAL, HAS_MASK)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:  # normalise with every probability, then drop (1/(1-p) applied at the end)
            p = tl.where(_dropout_keep(seed, off_bh, offs_m, cols, seqlen_k, dropout_p), p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc, EXACT_DOT)
        m_i = m_new

    empty = l_i == 0.0  # the query sees no key: out = 0, lse = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2_K)
    row_ok = offs_m < seqlen_q
    o_ptrs = (Out + off_b.to(tl.int64) * stride_ob + off_h * stride_oh
              + offs_m[:, None] * stride_os + offs_d[None, :])
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + off_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DOut, Delta,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    n_heads, seqlen_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) per query, fp32, (B, H, Sq)."""
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
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, DK, DV, Mask, KvRange,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,  # dout, dq (same contiguous layout)
    stride_kgb, stride_kgs, stride_kgh,  # dk, dv (same contiguous layout)
    n_heads, seqlen_q, seqlen_k, head_dim,
    sm_scale, qk_scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, EXACT_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV for one key tile (and, with DQ_ATOMIC, its share of dQ added atomically)."""
    start_n = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_bh = off_b * n_heads + off_h
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    kv_mask = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_h * stride_kh
                + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_h * stride_vh
                + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
    do_base = DOut + off_b.to(tl.int64) * stride_db + off_h * stride_dh
    lse_base = Lse + off_bh.to(tl.int64) * seqlen_q
    delta_base = Delta + off_bh.to(tl.int64) * seqlen_q

    # Query tiles to visit: all, less those entirely before the causal diagonal; none when this
    # key tile lies outside the batch's range of real keys (its dK, dV are zero).
    lo = 0
    hi = seqlen_q
    if IS_CAUSAL:  # key j is seen by queries i >= j - (Sk - Sq)
        lo = tl.maximum(start_n * BLOCK_N - (seqlen_k - seqlen_q), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_MASK:
        key_lo, key_hi = _key_range(KvRange, off_b, seqlen_k, HAS_MASK)
        live = (start_n * BLOCK_N < key_hi) & ((start_n + 1) * BLOCK_N > key_lo)
        hi = tl.where(live, seqlen_q, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < seqlen_q
        qo_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qo_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_ds + offs_d[None, :], mask=qo_mask,
                     other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # +inf makes P = 0
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        # recompute P^T (N, M) from the saved log-sum-exp
        st = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), EXACT_DOT)
        pt = tl.math.exp2(st * qk_scale - lse[None, :] * LOG2E_K)
        visible = _visible(offs_m, offs_n, Mask, off_b, seqlen_q, seqlen_k, IS_CAUSAL, HAS_MASK)
        pt = tl.where(tl.trans(visible), pt, 0.0)
        dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), EXACT_DOT)
        if HAS_DROPOUT:
            keep = tl.trans(_dropout_keep(seed, off_bh, offs_m, offs_n, seqlen_k, dropout_p))
            drop_scale = 1.0 / (1.0 - dropout_p)
            dv = _dot(tl.where(keep, pt * drop_scale, 0.0).to(do.dtype), do, dv, EXACT_DOT)
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        else:
            dv = _dot(pt.to(do.dtype), do, dv, EXACT_DOT)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = _dot(dst, q, dk, EXACT_DOT)
        if DQ_ATOMIC:
            dq_base = DQ + off_b.to(tl.int64) * stride_db + off_h * stride_dh
            dq = _dot(tl.trans(dst), k, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), EXACT_DOT)
            tl.atomic_add(dq_base + offs_m[:, None] * stride_ds + offs_d[None, :], dq * sm_scale,
                          mask=qo_mask)

    kg_offs = off_b.to(tl.int64) * stride_kgb + off_h * stride_kgh + offs_n[:, None] * stride_kgs \
        + offs_d[None, :]
    tl.store(DK + kg_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kg_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Mask, KvRange,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,  # dout, dq (same contiguous layout)
    n_heads, seqlen_q, seqlen_k, head_dim,
    sm_scale, qk_scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for one query tile, summing over key tiles in a fixed order (deterministic)."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_bh = off_b * n_heads + off_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < seqlen_q
    qo_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
                + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qo_mask, other=0.0)
    do_offs = off_b.to(tl.int64) * stride_db + off_h * stride_dh + offs_m[:, None] * stride_ds \
        + offs_d[None, :]
    do = tl.load(DOut + do_offs, mask=qo_mask, other=0.0)
    lse = tl.load(Lse + off_bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + off_bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h * stride_vh

    lo, hi = _key_range(KvRange, off_b, seqlen_k, HAS_MASK)
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.minimum(seqlen_q, (start_m + 1) * BLOCK_M) + seqlen_k - seqlen_q)
    lo = (lo // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_DOT)
        p = tl.math.exp2(s * qk_scale - lse[:, None] * LOG2E_K)
        visible = _visible(offs_m, cols, Mask, off_b, seqlen_q, seqlen_k, IS_CAUSAL, HAS_MASK)
        p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_DOT)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, off_bh, offs_m, cols, seqlen_k, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = _dot(ds, k, dq, EXACT_DOT)
    tl.store(DQ + do_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qo_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled one to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def exact_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


# Tile shapes per kernel, head dim (padded) and element size; (BLOCK_M, BLOCK_N, num_warps,
# num_stages). Shaped after Triton's fused-attention tutorial for Ampere/Hopper: the forward and
# dQ keep a tall query tile in registers, dK/dV a tall key tile; fp32 and wide heads get smaller
# tiles so registers and shared memory suffice.
def fwd_config(bd: int, dtype: torch.dtype):
    if dtype == torch.float32:
        return (64, 32, 4, 2) if bd <= 64 else (32, 32, 8, 2) if bd <= 128 else (16, 32, 8, 1)
    return (128, 64, 4, 3) if bd <= 64 else (128, 64, 8, 3) if bd <= 128 else (64, 32, 8, 2)


def dkdv_config(bd: int, dtype: torch.dtype):
    if dtype == torch.float32:
        return (32, 64, 4, 2) if bd <= 64 else (32, 32, 8, 2) if bd <= 128 else (16, 32, 8, 1)
    return (32, 128, 4, 3) if bd <= 64 else (32, 64, 8, 3) if bd <= 128 else (16, 32, 8, 2)


def dq_config(bd: int, dtype: torch.dtype):
    if dtype == torch.float32:
        return (64, 32, 4, 2) if bd <= 64 else (32, 32, 8, 2) if bd <= 128 else (16, 32, 8, 1)
    return (128, 32, 4, 3) if bd <= 64 else (64, 32, 8, 3) if bd <= 128 else (32, 32, 8, 2)


PREPROCESS_BLOCK_M = 64


def key_range(mask: torch.Tensor) -> torch.Tensor:
    """(B, Sk) bool -> (B, 2) int32 [first real key, last real key + 1]; (0, 0) when none."""
    sk = mask.shape[1]
    if sk == 0:  # no keys at all (amax/amin reject an empty dim)
        return torch.zeros(mask.shape[0], 2, dtype=torch.int32, device=mask.device)
    idx = torch.arange(sk, device=mask.device, dtype=torch.int32)
    last = torch.where(mask, idx + 1, 0).amax(1)
    first = torch.minimum(torch.where(mask, idx, sk).amin(1), last)
    return torch.stack([first, last], 1).to(torch.int32).contiguous()


def _mask_args(mask: Optional[torch.Tensor]):
    if mask is None:
        return None, None
    return mask.view(torch.uint8), key_range(mask)


def unsupported(dtype, head_dim, dropout_p=0.0, causal=False, has_mask=False) -> Optional[str]:
    """Why these kernels cannot serve the input, or None (every dropout, causal and mask setting
    is served)."""
    if dtype not in _DTYPES:
        return f"the Triton attention kernels take float16, bfloat16, float32, got {dtype}"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"the Triton attention kernels take head dims 1..{MAX_HEAD_DIM}, got {head_dim}"
    return None


def attention_forward(q, k, v, mask, causal, dropout_p, scale, seed):
    """-> (out (B, Sq, H, D) contiguous in q.dtype, lse (B, H, Sq) fp32)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    out = _alloc((b, sq, h, d), q.dtype, q.device)
    lse = _alloc((b, h, sq), torch.float32, q.device)
    mask_u8, kv_range = _mask_args(mask)
    bd = block_d(d)
    block_m, block_n, warps, stages = fwd_config(bd, q.dtype)
    grid = (triton.cdiv(sq, block_m), h, b)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, mask_u8, kv_range,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, sq, sk, d,
        scale * LOG2E, float(dropout_p), int(seed),
        IS_CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0.0,
        EXACT_DOT=exact_dot(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, mask, causal, dropout_p, scale, seed,
                       deterministic):
    """-> (dq, dk, dv), contiguous, in the shapes and dtypes of q, k, v."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    dout = dout.contiguous()  # ops.py passes it contiguous; dQ shares its layout and strides
    mask_u8, kv_range = _mask_args(mask)
    bd = block_d(d)
    flags = dict(IS_CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0.0,
                 EXACT_DOT=exact_dot(q.dtype))
    qkv_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2))

    delta = _alloc((b, h, sq), torch.float32, q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(sq, PREPROCESS_BLOCK_M), h, b)](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        h, sq, d, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=bd,
    )

    dk = _alloc((b, sk, h, d), k.dtype, k.device)
    dv = _alloc((b, sk, h, d), v.dtype, v.device)
    if deterministic:
        dq = _alloc((b, sq, h, d), q.dtype, q.device)
        dq_acc = None
    else:
        dq = None
        dq_acc = torch.zeros((b, sq, h, d), dtype=torch.float32, device=q.device)
    do_strides = (dout.stride(0), dout.stride(1), dout.stride(2))

    block_m, block_n, warps, stages = dkdv_config(bd, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(sk, block_n), h, b)](
        q, k, v, dout, lse, delta, dq_acc, dk, dv, mask_u8, kv_range,
        *qkv_strides, *do_strides,
        dk.stride(0), dk.stride(1), dk.stride(2),
        h, sq, sk, d,
        scale, scale * LOG2E, float(dropout_p), int(seed),
        DQ_ATOMIC=not deterministic, **flags,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    if deterministic:
        block_m, block_n, warps, stages = dq_config(bd, q.dtype)
        _attn_bwd_dq_kernel[(triton.cdiv(sq, block_m), h, b)](
            q, k, v, dout, lse, delta, dq, mask_u8, kv_range,
            *qkv_strides, *do_strides,
            h, sq, sk, d,
            scale, scale * LOG2E, float(dropout_p), int(seed),
            **flags,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
    else:
        dq = dq_acc.to(q.dtype)
    return dq, dk, dv
