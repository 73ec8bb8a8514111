// The fp32 CPU attention kernel of fastbert._cpu, for one instruction set. attention.cpp
// includes this file once per ISA under `#pragma GCC target(...)`, with FB_NS (namespace),
// FB_W (floats per vector register), FB_JG (keys per register tile of S^T) and FB_R (query rows
// per register tile of O) defined.
//
// One task is a block of BM = 32 query rows of one sequence and one head (FlashAttention-2's
// outer loop). Its q is scaled and transposed once into Qt (D x 32: the 32 rows are the lanes of
// QV vector registers); then the keys the block can see, and only those (a sliding window bounds
// the range: a local layer costs O(rows * window)), are visited in blocks of BN. Per block
// S^T = K Qt reads the K rows in place (one broadcast per element), the online softmax runs
// down the key axis with every query row in its own lane (no horizontal reductions), and
// O += P V reads the V rows in place. Qt, S^T and O stay in per-thread tiles in L1/L2.
namespace FB_NS {

constexpr int W = FB_W;
constexpr int JG = FB_JG;
constexpr int R = FB_R;
constexpr int BM = 32;       // query rows per task
constexpr int QV = BM / W;   // vector registers per row of S^T
constexpr int BN = 48;       // keys per block
constexpr int FEW = 3;       // up to this many query rows (decoding): one row at a time
static_assert(BM % W == 0 && BN % JG == 0 && BM % R == 0, "tile sizes must divide");

typedef float vf __attribute__((vector_size(4 * W)));
typedef float vfu __attribute__((vector_size(4 * W), aligned(4)));  // unaligned access
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

static inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
static inline vf splat(float x) { return x - vf{}; }  // x - (+0) is x: a plain broadcast
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vi lane_index() {
  vi i;
  for (int e = 0; e < W; ++e) i[e] = e;
  return i;
}

// 2^x for x <= 0 (every argument here: a score minus a running max): x = n + f with
// n = round(x) and |f| <= 1/2, 2^f by the Taylor series of e^(f ln 2) to degree 7 (truncation
// error below 1e-8), 2^n written into the exponent bits. Below 2^-126 (and -inf) it gives 0.
static inline vf exp2_nonpositive(vf x) {
  const vf clamped = x < -126.0f ? splat(-126.0f) : x;
  const vi n = __builtin_convertvector(clamped - 0.5f, vi);  // toward zero: rounds x <= 0
  const vf t = (clamped - __builtin_convertvector(n, vf)) * 0.6931471805599453f;
  vf p = splat(1.0f / 5040.0f);
  p = p * t + 1.0f / 720.0f;
  p = p * t + 1.0f / 120.0f;
  p = p * t + 1.0f / 24.0f;
  p = p * t + 1.0f / 6.0f;
  p = p * t + 0.5f;
  p = p * t + 1.0f;
  p = p * t + 1.0f;
  const vi bits = (n + 127) << 23;
  const vf r = p * (vf)bits;  // a vector cast reinterprets the bits
  return x < -126.0f ? splat(0.0f) : r;
}

#include "csrc/cpu/hash.h"

// Dropout's stream for one sequence and head: the call's seed mixed with (sequence, head).
static inline uint32_t dropout_stream(const Args& a, const Seq& sq, int64_t h) {
  const uint32_t which = static_cast<uint32_t>(sq.index * a.heads + h) * 0x9E3779B9u;
  return seed_stream(a.seed, which);
}

// drop_scale (1 / the keep rate) for the elements (query i, key j: counter i * key_stride + key0 + j)
// dropout keeps, 0 for those it drops: forward and backward draw the same mask from the counter.
static inline vf dropout_factor(const Args& a, uint32_t stream, vu counter) {
  const vu hash = fmix(counter * 0x9E3779B1u ^ stream);
  return hash >= vu{} + a.drop_threshold ? splat(a.drop_scale) : splat(0.0f);
}

static inline vu lane_counter() { return __builtin_convertvector(lane_index(), vu); }

// e^x for x <= 0. The scores, their running max and lse stay in natural units (the base change
// is applied to each difference, close to 0 where the probabilities are large): the backward
// recomputes P from lse as exp(s * scale - lse), and a forward whose max and lse were rounded in
// base 2 left it 1.5x further from fp64 than ATen's in whole-model gradient tests.
static inline vf exp_nonpositive(vf x) { return exp2_nonpositive(x * 1.4426950408889634f); }

// S^T[JG][BM] = K[JG][D] Qt[D][BM]: K rows at `k` with stride k_tok.
static inline void scores_tile(const float* k, int64_t k_tok, const float* qt, int64_t dim,
                               float* st) {
  vf acc[JG][QV];
#pragma GCC unroll 16
  for (int j = 0; j < JG; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < QV; ++c) acc[j][c] = splat(0.0f);
  for (int64_t d = 0; d < dim; ++d) {
    vf q[QV];
#pragma GCC unroll 4
    for (int c = 0; c < QV; ++c) q[c] = load(qt + d * BM + c * W);
#pragma GCC unroll 16
    for (int j = 0; j < JG; ++j) {
      const vf b = splat(k[j * k_tok + d]);
#pragma GCC unroll 4
      for (int c = 0; c < QV; ++c) acc[j][c] += b * q[c];
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < JG; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < QV; ++c) store(st + j * BM + c * W, acc[j][c]);
}

// S^T[n][BM] = rows[n][D] T[D][BM] for the n rows at base + off (stride tok), JG at a time. A
// tile reads JG rows, some past the n: in place while they lie inside the tensor (extent: its
// elements from base), else from a zero-padded copy, never a read past the tensor's end.
static inline void scores_block(const float* base, int64_t off, int64_t tok, int64_t extent,
                                int n, const float* t, int64_t dim, float* st, float* tail) {
  for (int g = 0; g * JG < n; ++g) {
    const int64_t first = off + g * JG * tok;
    if (first + (JG - 1) * tok + dim <= extent) {
      scores_tile(base + first, tok, t, dim, st + g * JG * BM);
      continue;
    }
    for (int j = 0; j < JG; ++j) {
      const bool real = g * JG + j < n;
      const float* src = base + first + j * tok;
      for (int64_t d = 0; d < dim; ++d) tail[j * dim + d] = real ? src[d] : 0.0f;
    }
    scores_tile(tail, dim, t, dim, st + g * JG * BM);
  }
}

// O[RR][NV*W] += P[RR][n] V[n][NV*W]: P read from S^T's lanes (key j's at pt + j * p_key),
// V rows in place (stride v_tok).
template <int NV, int RR>
static inline void pv_tile(const float* pt, int p_key, int n, const float* v, int64_t v_tok,
                           float* o, int64_t dim) {
  vf acc[RR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = load(o + r * dim + c * W);
  for (int j = 0; j < n; ++j) {
    const float* row = v + j * v_tok;
    vf vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = load(row + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const vf b = splat(pt[j * p_key + r]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] += b * vv[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) store(o + r * dim + c * W, acc[r][c]);
}

template <int RR>
static inline void pv(int nv, const float* pt, int p_key, int n, const float* v, int64_t v_tok,
                      float* o, int64_t dim) {
  switch (nv) {
    case 1: pv_tile<1, RR>(pt, p_key, n, v, v_tok, o, dim); break;
    case 2: pv_tile<2, RR>(pt, p_key, n, v, v_tok, o, dim); break;
    case 3: pv_tile<3, RR>(pt, p_key, n, v, v_tok, o, dim); break;
    default: pv_tile<4, RR>(pt, p_key, n, v, v_tok, o, dim); break;
  }
}

struct Scratch {
  std::vector<float> qt, st, o, tail;
  explicit Scratch(int64_t dim) : qt(dim * BM), st(BN * BM), o(BM * dim), tail(JG * dim) {}
};

// T[d][lane] = rows[lane][d] * mult for `count` rows at `src` (stride tok); idle lanes are 0.
static inline void transpose_in(const float* src, int64_t tok, int count, int64_t dim, float* t,
                                float mult = 1.0f) {
  for (int r = 0; r < BM; ++r)
    for (int64_t d = 0; d < dim; ++d) t[d * BM + r] = r < count ? src[r * tok + d] * mult : 0.0f;
}

// acc[RR rows][D] += P^T[n][rows] X[n][D] for `rows` rows of P's lanes (P at pt, key j's at
// pt + j * BM), X rows in place at x (stride x_tok).
static inline void accumulate(const float* pt, int rows, int n, const float* x, int64_t x_tok,
                              float* acc, int64_t dim) {
  for (int r0 = 0; r0 < rows; r0 += R)
    for (int64_t d = 0; d < dim; d += 4 * W) {
      const int nv = static_cast<int>(std::min<int64_t>(4 * W, dim - d)) / W;
      if (r0 + R <= rows) {
        pv<R>(nv, pt + r0, BM, n, x + d, x_tok, acc + r0 * dim + d, dim);
      } else {
        for (int r = r0; r < rows; ++r)
          pv<1>(nv, pt + r, BM, n, x + d, x_tok, acc + r * dim + d, dim);
      }
    }
}

// out[i] = O / l, lse[i] = log(l) + max; a row that saw no key gets zeros and lse = +inf (the op
// contract).
static inline void finish_row(const Args& a, const Seq& sq, int64_t h, int64_t i,
                              const float* orow, float sum, float mx) {
  float* dst = a.out + sq.o_off + i * a.o_tok + h * a.o_head;
  float* lse = a.lse_out + sq.lse_off + h * a.lse_head + i;
  if (sum == 0.0f) {
    std::fill(dst, dst + a.dim, 0.0f);
    *lse = std::numeric_limits<float>::infinity();
    return;
  }
  const vf inv = splat(1.0f / sum);
  for (int64_t d = 0; d < a.dim; d += W) store(dst + d, load(orow + d) * inv);
  *lse = mx + std::log(sum);
}

// A decoding step's few query rows, one at a time, keys along the lanes: s = K q by dot products,
// the softmax across the keys, o += p V. Where the tile below would spend its 32 lanes of
// S^T, of the softmax and of P V's rows on each real row, this does each key's work once.
static void run_rows(const Args& a, const Seq& sq, const Task& t, int rows, Scratch& sc) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const int64_t dim = a.dim, h = t.head;
  float* qrow = sc.qt.data();
  float* s = sc.st.data();  // BN scores, then probabilities
  float* orow = sc.o.data();
  const bool drop = a.drop_threshold != 0;
  const uint32_t stream = drop ? dropout_stream(a, sq, h) : 0;
  for (int r = 0; r < rows; ++r) {
    const int64_t i = t.row0 + r;
    const float* src = a.q + sq.q_off + i * a.q_tok + h * a.q_head;
    for (int64_t d = 0; d < dim; ++d) qrow[d] = src[d] * a.scale;
    std::fill(orow, orow + dim, 0.0f);
    const int64_t kbegin = sq.key_begin(a, i), kend = sq.key_end(a, i);
    float m = -inf, l = 0.0f;
    for (int64_t kb = kbegin; kb < kend; kb += BN) {
      const int n = static_cast<int>(std::min<int64_t>(BN, kend - kb));
      const float* kblock = a.k + sq.k_off + kb * a.k_tok + h * a.k_head;
      const float* vblock = a.v + sq.v_off + kb * a.v_tok + h * a.v_head;
      float mx = -inf;
      for (int j = 0; j < n; ++j) {
        // each key and value row once: too little work per row to hide a miss, so the rows
        // ahead are requested now (keys a few rows ahead, this key's value row for P V below)
        for (int64_t d = 0; d < dim; d += 16) {
          __builtin_prefetch(kblock + (j + 4) * a.k_tok + d);
          __builtin_prefetch(vblock + j * a.v_tok + d);
        }
        if (sq.key_mask != nullptr && !sq.key_mask[kb + j]) {
          s[j] = -inf;
          continue;
        }
        const float* key = kblock + j * a.k_tok;
        vf acc = load(key) * load(qrow);
        for (int64_t d = W; d < dim; d += W) acc += load(key + d) * load(qrow + d);
        float dot = 0.0f;
        for (int e = 0; e < W; ++e) dot += acc[e];
        s[j] = dot;
        mx = std::max(mx, dot);
      }
      if (mx == -inf) continue;  // every key of the block is padding
      const float m_new = std::max(m, mx);
      const float alpha = exp_nonpositive(splat(m - m_new))[0];  // 0 for the first block
      vf sum = splat(0.0f);
      for (int j = 0; j < n; j += W) {  // lanes past n: -inf, p = 0
        vf x;
        for (int e = 0; e < W; ++e) x[e] = j + e < n ? s[j + e] : -inf;
        const vf p = exp_nonpositive(x - m_new);
        sum += p;  // l sums every probability; dropout zeroes some of those P V sees
        const uint32_t first = static_cast<uint32_t>(i * sq.key_stride + sq.key0 + kb + j);
        store(s + j, drop ? p * dropout_factor(a, stream, lane_counter() + first) : p);
      }
      float block_sum = 0.0f;
      for (int e = 0; e < W; ++e) block_sum += sum[e];
      l = l * alpha + block_sum;
      m = m_new;
      if (alpha != 1.0f)
        for (int64_t d = 0; d < dim; d += W) store(orow + d, load(orow + d) * alpha);
      for (int64_t d = 0; d < dim; d += 4 * W) {
        const int nv = static_cast<int>(std::min<int64_t>(4 * W, dim - d)) / W;
        pv<1>(nv, s, 1, n, vblock + d, a.v_tok, orow + d, dim);
      }
    }
    finish_row(a, sq, h, i, orow, l, m);
  }
}

static void run_task(const Args& a, const Seq& sq, const Task& t, Scratch& sc) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const int64_t dim = a.dim, h = t.head, lq = sq.lq, lk = sq.lk, shift = sq.shift;
  const int rows = static_cast<int>(std::min<int64_t>(BM, lq - t.row0));
  if (rows <= FEW) return run_rows(a, sq, t, rows, sc);
  const int64_t first = t.row0, last = t.row0 + rows - 1;
  const int64_t kbegin = sq.key_begin(a, first), kend = sq.key_end(a, last);
  const bool drop = a.drop_threshold != 0;
  const uint32_t stream = drop ? dropout_stream(a, sq, h) : 0;

  float* qt = sc.qt.data();
  float* st = sc.st.data();
  float* o = sc.o.data();
  const int live = (rows + W - 1) / W;  // the vectors of S^T holding real rows
  transpose_in(a.q + sq.q_off + t.row0 * a.q_tok + h * a.q_head, a.q_tok, rows, dim, qt,
               a.scale);  // Qt = (q scale)^T
  std::fill(o, o + BM * dim, 0.0f);
  vf m[QV], l[QV];
  for (int c = 0; c < QV; ++c) {
    m[c] = splat(-inf);
    l[c] = splat(0.0f);
  }
  // per lane: the first and last key its row may see (window edges; no edge: the whole range)
  vi row_lo[QV], row_hi[QV];
  for (int c = 0; c < QV; ++c) {
    const vi i = lane_index() + static_cast<int32_t>(t.row0 + c * W);
    row_lo[c] = a.left < 0 ? vi{} : i + static_cast<int32_t>(shift - a.left);
    row_hi[c] = a.right < 0 ? vi{} + static_cast<int32_t>(lk - 1)
                            : i + static_cast<int32_t>(shift + a.right);
  }

  for (int64_t kb = kbegin; kb < kend; kb += BN) {
    const int n = static_cast<int>(std::min<int64_t>(BN, kend - kb));
    scores_block(a.k, sq.k_off + kb * a.k_tok + h * a.k_head, a.k_tok, a.k_extent, n, qt, dim,
                 st, sc.tail.data());
    // a block every row sees whole, with no padding key inside, needs no mask (idle lanes are
    // never read back)
    if (sq.key_mask != nullptr
        || !(kb >= sq.key_begin(a, last) && kb + n <= sq.key_end(a, first))) {
      for (int j = 0; j < n; ++j) {
        const int32_t key = static_cast<int32_t>(kb + j);
        const vi real = vi{} + (sq.key_mask == nullptr || sq.key_mask[kb + j] ? -1 : 0);
        for (int c = 0; c < live; ++c) {
          const vf s = load(st + j * BM + c * W);
          store(st + j * BM + c * W,
                (key >= row_lo[c]) & (key <= row_hi[c]) & real ? s : splat(-inf));
        }
      }
    }
    // online softmax down the keys, every query row in its own lane
    vf alpha[QV];
    bool rescale = false;
    for (int c = 0; c < live; ++c) {
      const vu counter = (lane_counter() + static_cast<uint32_t>(t.row0 + c * W)) *
                             static_cast<uint32_t>(sq.key_stride) +
                         static_cast<uint32_t>(sq.key0 + kb);
      vf mx = splat(-inf);
      for (int j = 0; j < n; ++j) mx = vmax(mx, load(st + j * BM + c * W));
      const vf m_new = vmax(m[c], mx);
      const vf base = m_new == -inf ? splat(0.0f) : m_new;  // a row with nothing visible yet
      vf sum = splat(0.0f);
      for (int j = 0; j < n; ++j) {
        const vf p = exp_nonpositive(load(st + j * BM + c * W) - base);
        sum += p;  // l sums every probability; dropout zeroes some of those P V sees
        store(st + j * BM + c * W,
              drop ? p * dropout_factor(a, stream, counter + static_cast<uint32_t>(j)) : p);
      }
      alpha[c] = exp_nonpositive(m[c] - base);  // 0 for a row's first visible block
      l[c] = l[c] * alpha[c] + sum;
      for (int e = 0; e < W; ++e) rescale |= alpha[c][e] != 1.0f;
      m[c] = m_new;
    }
    if (rescale)
      for (int r = 0; r < rows; ++r) {
        const vf s = splat(alpha[r / W][r % W]);
        float* orow = o + r * dim;
        for (int64_t d = 0; d < dim; d += W) store(orow + d, load(orow + d) * s);
      }
    accumulate(st, rows, n, a.v + sq.v_off + kb * a.v_tok + h * a.v_head, a.v_tok, o, dim);
  }
  for (int r = 0; r < rows; ++r)
    finish_row(a, sq, h, t.row0 + r, o + r * dim, l[r / W][r % W], m[r / W][r % W]);
}

// Tasks shared out by an atomic counter among an OpenMP team: torch loads its own libgomp first,
// so this team is torch's (loaded by soname), and its threads do not spin against ours between
// ATen's parallel regions and this one. An error in a worker (its scratch not allocated) is
// raised after the team has joined.
static void run(const Args& a, const std::vector<Seq>& seqs, const std::vector<Task>& tasks,
                int threads) {
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_lock;
#pragma omp parallel num_threads(threads)
  {
    try {
      Scratch sc(a.dim);
      for (size_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks.size();)
        run_task(a, seqs[tasks[t].seq], tasks[t], sc);
    } catch (...) {
      std::lock_guard<std::mutex> hold(error_lock);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace FB_NS
