// bankcheck, the emulation's shared-memory bank-conflict counter (off by default,
// emu_set_bankcheck): per kernel and per access site, in a model of the wavefronts Nsight Compute
// counts. Not a finding: a report (emu_bank_report). A warp instruction is the k-th execution of
// one program counter (the instrumentation callback's return address; ldmatrix's and cp.async's
// call sites) by the lanes of one warp, k counted per thread since the warp's last barrier
// (__syncthreads, __syncwarp or warp collective: the lanes are converged there). Its cost, with
// 32 banks of 4 bytes:
//   wavefronts = max(ceil(distinct bytes / 128), max over banks of the distinct 4-byte words
//                the warp touches in that bank)   (same word from several lanes: broadcast)
//   ideal      = max(1, ceil(distinct bytes / 128))
// over the whole warp's request; "phased" is the same summed over the hardware's strict phases
// (64-bit accesses: 2 half-warps, 128-bit: 4 quarter-warps, ldmatrix: its 8-row matrices), an
// upper bound where the hardware cannot merge phases (it also counts the register bandwidth a
// broadcast 64/128-bit load still needs: at least 2/4 wavefronts for a full warp). Offsets are
// those of the emulation's layout: dynamic shared memory at bank 0, `__shared__` objects at their
// alignment.
#include "tests/cuda_emulation_bankcheck.h"

#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace emu {
namespace bank {
namespace {


// A thread's executions of one program counter since its warp's last barrier (epoch).
struct PcCount {
  uint64_t epoch = 0;
  uint32_t count = 0;
};
std::vector<std::unordered_map<uintptr_t, PcCount>> g_pc_counts;  // per thread of the block

struct InstrKey {
  uintptr_t pc;
  uint32_t k;
  int kind;
  bool operator==(const InstrKey& o) const { return pc == o.pc && k == o.k && kind == o.kind; }
};
struct InstrKeyHash {
  size_t operator()(const InstrKey& key) const {
    return std::hash<uintptr_t>()(key.pc * 31 + key.k * 1000003u + (uintptr_t)key.kind);
  }
};
// One warp instruction being gathered: the shared offset and width of each lane that executed it.
struct WarpInstr {
  uint32_t mask = 0;
  uint32_t offset[32];
  uint8_t width[32];
};
struct BankWarp {
  uint64_t epoch = 0;
  std::unordered_map<InstrKey, WarpInstr, InstrKeyHash> pending;
};
std::vector<BankWarp> g_bank_warps;
uint64_t g_bank_epochs = 0;  // the last epoch handed out (epochs are never reused)

// Totals of the warp instructions of one site (kernel, program counter, kind).
struct BankStats {
  uint64_t instructions = 0, wavefronts = 0, ideal = 0, phased = 0;
  unsigned width = 0;  // the widest lane access seen (bytes)
  uint32_t worst_wavefronts = 0, worst_ideal = 0, worst_phased = 0;
};
std::vector<std::string> g_bank_kernels;  // kernel id -> name
std::map<std::string, int> g_bank_kernel_ids;
int g_bank_kernel = 0;  // the running kernel's id
std::map<std::tuple<int, uintptr_t, int>, BankStats> g_bank_stats;

// Wavefronts and distinct bytes of the lanes `lanes[0..n)` of an instruction.
std::pair<uint32_t, uint32_t> bank_cost(const WarpInstr& in, const int* lanes, int n) {
  uint32_t words[32 * 5], lo[32], hi[32];
  int nw = 0;
  for (int i = 0; i < n; ++i) {
    const uint32_t a = in.offset[lanes[i]], b = a + in.width[lanes[i]];
    lo[i] = a, hi[i] = b;
    for (uint32_t w = a / 4; w <= (b - 1) / 4; ++w) words[nw++] = w;
  }
  std::sort(words, words + nw);
  nw = (int)(std::unique(words, words + nw) - words);
  uint32_t per_bank[32] = {}, most = 0;
  for (int i = 0; i < nw; ++i) most = std::max(most, ++per_bank[words[i] % 32]);
  // distinct bytes: the union of the lanes' [lo, hi), taken in the order of lo
  int order[32];
  for (int i = 0; i < n; ++i) order[i] = i;
  std::sort(order, order + n, [&](int x, int y) { return lo[x] < lo[y]; });
  uint32_t bytes = 0, end = 0;
  for (int j = 0; j < n; ++j) {
    const uint32_t a = std::max(lo[order[j]], end), b = hi[order[j]];
    if (b > a) bytes += b - a;
    end = std::max(end, b);
  }
  return {std::max((bytes + 127) / 128, most), bytes};
}

void bank_finalize(const InstrKey& key, const WarpInstr& in) {
  int lanes[32], n = 0;
  unsigned width = 0;
  for (int l = 0; l < 32; ++l)
    if (in.mask >> l & 1) lanes[n++] = l, width = std::max<unsigned>(width, in.width[l]);
  const auto [wavefronts, bytes] = bank_cost(in, lanes, n);
  const uint32_t ideal = std::max<uint32_t>(1, (bytes + 127) / 128);
  // the strict phases: lanes 8i .. 8i + 7 for 128-bit accesses and ldmatrix's matrices, half-warps
  // for 64-bit ones, the whole warp otherwise
  const int phase = key.kind == kLdmatrix || width > 8 ? 8 : width > 4 ? 16 : 32;
  uint32_t phased = 0;
  for (int first = 0; first < 32; first += phase) {
    int sub[32], m = 0;
    for (int i = 0; i < n; ++i)
      if (lanes[i] >= first && lanes[i] < first + phase) sub[m++] = lanes[i];
    if (m) phased += bank_cost(in, sub, m).first;
  }
  BankStats& s = g_bank_stats[{g_bank_kernel, key.pc, key.kind}];
  ++s.instructions;
  s.wavefronts += wavefronts, s.ideal += ideal, s.phased += phased;
  s.width = std::max(s.width, width);
  const long excess = (long)wavefronts - ideal, worst = (long)s.worst_wavefronts - s.worst_ideal;
  if (s.instructions == 1 || excess > worst ||
      (excess == worst && wavefronts > s.worst_wavefronts)) {
    s.worst_wavefronts = wavefronts, s.worst_ideal = ideal, s.worst_phased = phased;
  }
}

// The warp's lanes are converged (a barrier completed, or the block ended): what they executed
// before is complete (instructions some lanes skipped included), and counting starts again.
void bank_flush(BankWarp& w) {
  for (const auto& [key, in] : w.pending) bank_finalize(key, in);
  w.pending.clear();
  w.epoch = ++g_bank_epochs;
}

}  // namespace

bool on = false;

void begin_kernel(const std::string& name) {
  auto id = g_bank_kernel_ids.try_emplace(name, (int)g_bank_kernels.size()).first;
  if (id->second == (int)g_bank_kernels.size()) g_bank_kernels.push_back(name);
  g_bank_kernel = id->second;
}

void begin_block(int threads, int warps) {
  g_bank_warps.resize(warps);
  if ((int)g_pc_counts.size() < threads) g_pc_counts.resize(threads);
  flush_all();
}

void flush_warp(int warp) { bank_flush(g_bank_warps[warp]); }

void flush_all() {
  for (BankWarp& w : g_bank_warps) bank_flush(w);
}

void reset() { g_bank_stats.clear(); }

void access(int t, int warp_lanes, size_t offset, size_t bytes, int kind, const void* pc) {
  if (bytes == 0 || bytes > 16) return;  // not one shared-memory instruction of a lane
  const int l = t % 32;
  BankWarp& w = g_bank_warps[t / 32];
  PcCount& c = g_pc_counts[t][(uintptr_t)pc];
  if (c.epoch != w.epoch) c.epoch = w.epoch, c.count = 0;
  const InstrKey key{(uintptr_t)pc, c.count++, kind};
  auto it = w.pending.try_emplace(key).first;
  WarpInstr& in = it->second;
  if (in.mask >> l & 1) return;  // cannot happen: k counts this lane's executions
  in.mask |= 1u << l;
  in.offset[l] = (uint32_t)offset, in.width[l] = (uint8_t)bytes;
  if (__builtin_popcount(in.mask) == warp_lanes) {
    bank_finalize(key, in);
    w.pending.erase(it);
  }
}

// One line per site: kernel, site (function+0xoffset of its program counter), kind (load, store,
// ldmatrix, cp.async), width, instructions, wavefronts, ideal, phased, and the worst instruction's
// wavefronts, ideal, phased; tab-separated.
std::string report() {
  std::string text;
  static const char* const kinds[] = {"load", "store", "ldmatrix", "cp.async"};
  text.clear();
  for (const auto& [key, s] : g_bank_stats) {
    const auto& [kernel, pc, kind] = key;
    std::string site = "pc " + std::to_string(pc);
    Dl_info info;
    if (dladdr((const void*)pc, &info) && info.dli_sname) {
      int status = 0;
      char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
      char offset[32];
      std::snprintf(offset, sizeof offset, "+0x%lx",
                    (unsigned long)(pc - (uintptr_t)info.dli_saddr));
      site = (status == 0 ? std::string(name) : std::string(info.dli_sname)) + offset;
      std::free(name);
    }
    for (const std::string& field :
         {g_bank_kernels[kernel], site, std::string(kinds[kind]), std::to_string(s.width),
          std::to_string(s.instructions), std::to_string(s.wavefronts), std::to_string(s.ideal),
          std::to_string(s.phased), std::to_string(s.worst_wavefronts),
          std::to_string(s.worst_ideal), std::to_string(s.worst_phased)})
      text += field + "\t";
    text.back() = '\n';
  }
  return text;
}

}  // namespace bank
}  // namespace emu
