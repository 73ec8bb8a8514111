// The fp32 CPU attention backward of fastbert._cpu, for one instruction set: included by
// attention.cpp after attention_kernel.h (whose tiles it reuses), with the same FB_* defined.
//
// FlashAttention-2's backward recomputes P = exp(S - lse) from the forward's lse and, with
// delta = rowsum(dO * O), dS = P * (dP - delta) where dP = dO V^T. dQ = dS K gathers over keys,
// dK = dS^T Q and dV = P^T dO over queries, so the work is cut two ways instead of accumulating
// dQ across threads: a key task (BM keys as the lanes, every query that can see them) makes
// dK and dV, a query task (BM queries as the lanes, every key they can see) makes dQ. Each
// recomputes its own S and dP (the forward's FLOPs twice over, no atomics, no dQ scratch in
// memory); both read q, k, v, dO in place, and a sliding window bounds both loops.
namespace FB_NS {

struct GradScratch {
  std::vector<float> t1, t2, s, dp, acc1, acc2, rows, tail;
  explicit GradScratch(int64_t dim)
      : t1(dim * BM), t2(dim * BM), s(BN * BM), dp(BN * BM), acc1(BM * dim), acc2(BM * dim),
        rows((BN + JG) * dim), tail(JG * dim) {}
};

// P = exp(s - lse) for scores s = (q * scale) . k, the forward's own numbers: both passes
// scale q first and sum over the head dim in the forward's order.
template <typename L>
static inline vf probability(vf s, L lse) {
  return exp_nonpositive(s - lse);
}

// dK and dV for keys [t.row0, t.row0 + BM) of one sequence and head: the keys are the lanes, the
// query rows that can see any of them are visited in blocks of BN.
static void run_key_block(const Args& a, const Grads& g, const Seq& sq, const Task& t,
                          GradScratch& sc) {
  const int64_t dim = a.dim, h = t.head, shift = sq.shift;
  const int keys = static_cast<int>(std::min<int64_t>(BM, sq.lk - t.row0));
  const int live = (keys + W - 1) / W;
  const int64_t j0 = t.row0, jl = t.row0 + keys - 1;
  const int64_t ibegin = sq.query_begin(a, j0), iend = sq.query_end(a, jl);
  float* kt = sc.t1.data();
  float* vt = sc.t2.data();
  float* s = sc.s.data();
  float* dp = sc.dp.data();
  float* dk = sc.acc1.data();
  float* dv = sc.acc2.data();
  transpose_in(a.k + sq.k_off + j0 * a.k_tok + h * a.k_head, a.k_tok, keys, dim, kt);
  transpose_in(a.v + sq.v_off + j0 * a.v_tok + h * a.v_head, a.v_tok, keys, dim, vt);
  std::fill(dk, dk + BM * dim, 0.0f);
  std::fill(dv, dv + BM * dim, 0.0f);
  vi key[QV];
  for (int c = 0; c < QV; ++c) key[c] = lane_index() + static_cast<int32_t>(j0 + c * W);
  const float* lse = a.lse + sq.lse_off + h * a.lse_head;
  const float* delta = g.delta + sq.lse_off + h * a.lse_head;
  const bool drop = a.drop_threshold != 0;
  const uint32_t stream = drop ? dropout_stream(a, sq, h) : 0;
  for (int64_t ib = ibegin; ib < iend; ib += BN) {
    const int n = static_cast<int>(std::min<int64_t>(BN, iend - ib));
    const int64_t do_at = sq.do_off + ib * g.do_tok + h * g.do_head;
    // the block's q rows scaled, as the forward's Qt: rows past n keep finite stale values
    float* qs = sc.rows.data();
    const float* q_rows = a.q + sq.q_off + ib * a.q_tok + h * a.q_head;
    for (int i = 0; i < n; ++i)
      for (int64_t d = 0; d < dim; ++d) qs[i * dim + d] = q_rows[i * a.q_tok + d] * a.scale;
    scores_block(qs, 0, dim, static_cast<int64_t>(sc.rows.size()), n, kt, dim, s,
                 sc.tail.data());
    scores_block(g.dout, do_at, g.do_tok, g.do_extent, n, vt, dim, dp, sc.tail.data());
    for (int i = 0; i < n; ++i) {
      const int64_t qi = ib + i;
      const float row_lse = lse[qi], dl = delta[qi];
      const int32_t lo = a.left < 0 ? INT32_MIN : static_cast<int32_t>(qi + shift - a.left);
      const int32_t hi = a.right < 0 ? INT32_MAX : static_cast<int32_t>(qi + shift + a.right);
      const vi real = sq.key_mask == nullptr ? vi{} - 1 : vi{};
      for (int c = 0; c < live; ++c) {
        vi seen = (key[c] >= lo) & (key[c] <= hi);
        if (sq.key_mask != nullptr)
          for (int e = 0; e < W; ++e)
            seen[e] &= c * W + e < keys && sq.key_mask[j0 + c * W + e] ? -1 : 0;
        else
          seen &= real;
        float* sp = s + i * BM + c * W;
        float* dpp = dp + i * BM + c * W;
        const vf p = seen ? probability(load(sp), row_lse) : splat(0.0f);
        // dropout: dV takes P Z, dS = P (dP Z - delta), Z the forward's keep mask / (1 - p)
        const vf z = drop ? dropout_factor(a, stream, __builtin_convertvector(key[c], vu) +
                                                          static_cast<uint32_t>(
                                                              qi * sq.key_stride + sq.key0))
                          : splat(1.0f);
        store(sp, p * z);
        store(dpp, p * (load(dpp) * z - dl));
      }
    }
    accumulate(s, keys, n, g.dout + do_at, g.do_tok, dv, dim);  // dV += P^T dO
    accumulate(dp, keys, n, qs, dim, dk, dim);                   // dK += dS^T (Q scale)
  }
  for (int r = 0; r < keys; ++r) {
    float* dk_row = g.dk + sq.dkv_off + (j0 + r) * a.o_tok + h * a.o_head;
    float* dv_row = g.dv + sq.dkv_off + (j0 + r) * a.o_tok + h * a.o_head;
    for (int64_t d = 0; d < dim; d += W) {
      store(dk_row + d, load(dk + r * dim + d));
      store(dv_row + d, load(dv + r * dim + d));
    }
  }
}

// dQ for query rows [t.row0, t.row0 + BM) of one sequence and head: the rows are the lanes (as
// the forward's), the keys they can see are visited in blocks of BN.
static void run_query_block(const Args& a, const Grads& g, const Seq& sq, const Task& t,
                            GradScratch& sc) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const int64_t dim = a.dim, h = t.head, shift = sq.shift;
  const int rows = static_cast<int>(std::min<int64_t>(BM, sq.lq - t.row0));
  const int live = (rows + W - 1) / W;
  const int64_t first = t.row0, last = t.row0 + rows - 1;
  const int64_t kbegin = sq.key_begin(a, first), kend = sq.key_end(a, last);
  float* qt = sc.t1.data();
  float* dot = sc.t2.data();
  float* s = sc.s.data();
  float* dp = sc.dp.data();
  float* dq = sc.acc1.data();
  transpose_in(a.q + sq.q_off + first * a.q_tok + h * a.q_head, a.q_tok, rows, dim, qt,
               a.scale);
  transpose_in(g.dout + sq.do_off + first * g.do_tok + h * g.do_head, g.do_tok, rows, dim, dot);
  std::fill(dq, dq + BM * dim, 0.0f);
  vf row_lse[QV], dl[QV];
  vi row_lo[QV], row_hi[QV];
  const float* lse = a.lse + sq.lse_off + h * a.lse_head + first;
  const float* delta = g.delta + sq.lse_off + h * a.lse_head + first;
  for (int c = 0; c < QV; ++c) {
    for (int e = 0; e < W; ++e) {  // idle lanes: lse = +inf, so p = 0
      const int r = c * W + e;
      row_lse[c][e] = r < rows ? lse[r] : inf;
      dl[c][e] = r < rows ? delta[r] : 0.0f;
    }
    const vi i = lane_index() + static_cast<int32_t>(first + c * W);
    row_lo[c] = a.left < 0 ? vi{} + INT32_MIN : i + static_cast<int32_t>(shift - a.left);
    row_hi[c] = a.right < 0 ? vi{} + INT32_MAX : i + static_cast<int32_t>(shift + a.right);
  }
  const bool drop = a.drop_threshold != 0;
  const uint32_t stream = drop ? dropout_stream(a, sq, h) : 0;
  vu counter[QV];  // query lane i's counter for key 0
  for (int c = 0; c < QV; ++c)
    counter[c] = (lane_counter() + static_cast<uint32_t>(first + c * W)) *
                     static_cast<uint32_t>(sq.key_stride) + static_cast<uint32_t>(sq.key0);
  for (int64_t kb = kbegin; kb < kend; kb += BN) {
    const int n = static_cast<int>(std::min<int64_t>(BN, kend - kb));
    const int64_t k_at = sq.k_off + kb * a.k_tok + h * a.k_head;
    scores_block(a.k, k_at, a.k_tok, a.k_extent, n, qt, dim, s, sc.tail.data());
    scores_block(a.v, sq.v_off + kb * a.v_tok + h * a.v_head, a.v_tok, a.v_extent, n, dot, dim,
                 dp, sc.tail.data());
    for (int j = 0; j < n; ++j) {
      const int32_t key = static_cast<int32_t>(kb + j);
      const bool real = sq.key_mask == nullptr || sq.key_mask[kb + j];
      for (int c = 0; c < live; ++c) {
        float* sp = s + j * BM + c * W;
        float* dpp = dp + j * BM + c * W;
        const vi seen = (key >= row_lo[c]) & (key <= row_hi[c]);
        const vf p = real && seen ? probability(load(sp), row_lse[c]) : splat(0.0f);
        const vf z = drop ? dropout_factor(a, stream, counter[c] + static_cast<uint32_t>(kb + j))
                          : splat(1.0f);
        store(dpp, p * (load(dpp) * z - dl[c]));
      }
    }
    accumulate(dp, rows, n, a.k + k_at, a.k_tok, dq, dim);  // dQ += dS K
  }
  const vf sv = splat(a.scale);
  for (int r = 0; r < rows; ++r) {
    float* dst = g.dq + sq.o_off + (first + r) * a.o_tok + h * a.o_head;
    for (int64_t d = 0; d < dim; d += W) store(dst + d, load(dq + r * dim + d) * sv);
  }
}

// Key tasks and query tasks shared out by one atomic counter among torch's OpenMP team (see run).
static void run_backward(const Args& a, const Grads& g, const std::vector<Seq>& seqs,
                         const std::vector<Task>& key_tasks, const std::vector<Task>& query_tasks,
                         int threads) {
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_lock;
  const size_t total = key_tasks.size() + query_tasks.size();
#pragma omp parallel num_threads(threads)
  {
    try {
      GradScratch sc(a.dim);
      for (size_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
        if (t < key_tasks.size())
          run_key_block(a, g, seqs[key_tasks[t].seq], key_tasks[t], sc);
        else
          run_query_block(a, g, seqs[query_tasks[t - key_tasks.size()].seq],
                          query_tasks[t - key_tasks.size()], sc);
      }
    } catch (...) {
      std::lock_guard<std::mutex> hold(error_lock);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace FB_NS
