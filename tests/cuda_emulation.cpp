// Runtime of the host emulation of fastbert's CUDA code (prelude: tests/cuda_emulation.h; build and
// Python side: tests/cuda_emulation.py). Not instrumented itself.
//
// Execution: a block's threads are fibers (ucontext) on one OS thread, resumed round-robin in an
// order that changes every round; blocks run one after another. A barrier parks a fiber until
// every thread of its block (or warp) has arrived.
//
// The checks compute-sanitizer makes on a GPU, on every launch (and host code touching a buffer,
// which on a GPU machine is device memory, is reported too):
// - memcheck: the kernels' loads and stores are instrumented (-fsanitize=kernel-address calls
//   __asan_{load,store}N_noabort per access). Global buffers are copies that
//   tests/cuda_emulation.py places between poisoned guard regions (emu_guard_begin); an access
//   that touches a guard, or
//   shared memory past the launch's dynamic allocation, is reported with the kernel, the buffer and
//   the byte offset. Guard bytes are compared afterwards too (writes the instrumentation missed).
// - racecheck: per byte of shared memory, the last writer and the readers since the last barrier;
//   two threads touching a byte between the same two __syncthreads, at least one writing, is a
//   race, unless both are lanes of one warp with a __syncwarp between them.
// - synccheck: a __syncthreads (or warp collective) that not every thread of the block (warp)
//   reaches, or that threads reach at different call sites, is reported and the block abandoned.
// - launch errors a GPU gives: empty or oversized grids and blocks, more than 48 KiB of dynamic
//   shared memory without cudaFuncSetAttribute, more than the device allows.
// bankcheck (off by default): shared-memory bank conflicts, tests/cuda_emulation_bankcheck.cpp.
#include <cxxabi.h>
#include <dlfcn.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "tests/cuda_emulation.h"
#include "tests/cuda_emulation_bankcheck.h"
#include "csrc/launchers.h"

namespace emu {

uint3 tid, bid;
dim3 bdim, gdim;

namespace {

// The emulated device (an H200's limits; a small SM count so that grid-stride loops and
// per-block partial sums get several rounds at test sizes).
int g_sm_count = 4;
constexpr int kMaxOptinSmem = 232448;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kDynamicBytes = 256 * 1024;  // the dynamic shared memory window
constexpr size_t kStaticBytes = 64 * 1024;    // `__shared__` objects
constexpr size_t kMaxStaticBytes = 48 * 1024;  // what a kernel may declare
constexpr size_t kStackBytes = 256 * 1024;

alignas(128) unsigned char g_smem[kDynamicBytes + kStaticBytes];

// ---- findings ---------------------------------------------------------------------------------

std::string g_findings;
int g_finding_count = 0;
std::string g_kernel;  // the running kernel's name

void finding(const std::string& what) {
  if (g_findings.find(what + "\n") != std::string::npos) return;  // said already
  if (++g_finding_count <= 8) g_findings += what + "\n";
}

std::string kernel_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) && info.dli_sname && info.dli_saddr == kernel) {
    int status = 0;
    char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 ? name : info.dli_sname;
    std::free(name);
    return s;
  }
  return "kernel at " + std::to_string((uintptr_t)kernel);
}

std::string dim_str(uint3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

std::string where() { return g_kernel + " block " + dim_str(bid) + " thread " + dim_str(tid); }

// ---- fibers, blocks, warps ---------------------------------------------------------------------

enum class Wait { kNone, kBlock, kWarp };

struct Fiber {
  ucontext_t ctx;
  bool done = false;
  Wait wait = Wait::kNone;
  const char* file = nullptr;
  int line = 0;
  // cp.async in flight: destination, source, bytes, valid, group (commits before its issue)
  std::vector<std::tuple<void*, const void*, int, bool, int>> copies;
  int committed = 0;  // cp.async groups committed
};

struct Barrier {
  int count = 0;
  unsigned gen = 0;
  const char* file = nullptr;
  int line = 0;
};

struct Warp {
  Barrier bar;
  int lanes = 32;
  unsigned syncs = 0;  // completed __syncwarp()s (racecheck ordering)
  uint32_t slots[2][32 * 6];
};

ucontext_t g_scheduler;
std::vector<std::unique_ptr<char[]>> g_stacks;
std::vector<Fiber> g_fibers;
std::vector<Warp> g_warps;
Barrier g_block;
int g_threads = 0, g_current = 0;
bool g_progress = false;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;

Fiber& me() { return g_fibers[g_current]; }

void yield() { swapcontext(&me().ctx, &g_scheduler); }

bool same_site(const Barrier& b, const char* file, int line) {
  return b.line == line && std::strcmp(b.file, file) == 0;
}

// Arrive at `b` (of `needed` threads) and wait until all have; true for the thread completing it.
bool arrive(Barrier& b, int needed, Wait kind, const char* file, int line, const char* what) {
  if (b.count == 0) {
    b.file = file, b.line = line;
  } else if (!same_site(b, file, line)) {
    finding("synccheck: " + where() + ": " + what + " at " + file + ":" + std::to_string(line) +
            " while others wait at " + b.file + ":" + std::to_string(b.line));
  }
  g_progress = true;
  const unsigned gen = b.gen;
  if (++b.count == needed) {
    b.count = 0;
    ++b.gen;
    return true;
  }
  me().wait = kind, me().file = file, me().line = line;
  while (b.gen == gen) yield();
  me().wait = Wait::kNone;
  return false;
}

// ---- racecheck ---------------------------------------------------------------------------------

// Per byte of shared memory: the last write and the reads since, stamped with the barrier interval
// (a number that changes at every __syncthreads and every block) and the warp's __syncwarp count.
struct Shadow {
  uint32_t w_interval = 0, r_interval = 0;
  uint32_t w_syncs = 0, r_syncs = 0;  // of the writer's warp / the most recent reader's
  uint16_t w_tid = 0, r_tid = 0;      // r_tid kManyReaders: several threads read
  int16_t r_warp = 0;                 // the readers' warp, -1 if they span warps
};
constexpr uint16_t kManyReaders = 0xffff;
std::vector<Shadow> g_shadow(kDynamicBytes + kStaticBytes);
uint32_t g_interval = 0;
int g_races = 0;

uint3 split(int t, dim3 b) {
  return uint3{(unsigned)(t % b.x), (unsigned)(t / b.x % b.y), (unsigned)(t / (b.x * b.y))};
}

// Where a shared-memory byte is, as a kernel sees it.
std::string shared_place(size_t offset) {
  return offset < kDynamicBytes
             ? "dynamic shared memory byte " + std::to_string(offset)
             : "__shared__ object byte " + std::to_string(offset - kDynamicBytes) +
                   " (static shared memory)";
}

void race(const char* kind, int other, size_t offset) {
  if (++g_races > 1) return;  // the first per launch; the rest would repeat it
  finding("racecheck: " + where() + ": " + kind + " hazard on " + shared_place(offset) +
          " with " +
          (other < 0 ? std::string("threads of other warps")
                     : "thread " + dim_str(split(other, bdim))) +
          ", no barrier between them");
}

void shared_access(size_t offset, size_t bytes, bool write) {
  const int t = g_current, warp = t / 32;
  const uint32_t syncs = g_warps[warp].syncs;
  for (size_t i = offset; i < offset + bytes; ++i) {
    Shadow& s = g_shadow[i];
    const bool ordered_w = s.w_tid / 32 == warp && s.w_syncs < syncs;
    if (s.w_interval == g_interval && s.w_tid != t && !ordered_w)
      race(write ? "write-after-write" : "read-after-write", s.w_tid, i);
    if (write) {
      if (s.r_interval == g_interval && !(s.r_tid == t) &&
          !(s.r_warp == warp && s.r_syncs < syncs))
        race("write-after-read", s.r_tid == kManyReaders ? -1 : s.r_tid, i);
      s.w_interval = g_interval, s.w_tid = (uint16_t)t, s.w_syncs = syncs;
    } else if (s.r_interval != g_interval) {
      s.r_interval = g_interval, s.r_tid = (uint16_t)t, s.r_warp = (int16_t)warp;
      s.r_syncs = syncs;
    } else if (s.r_tid != t) {
      s.r_tid = kManyReaders;
      if (s.r_warp != warp) s.r_warp = -1;
      s.r_syncs = std::max(s.r_syncs, syncs);
    }
  }
}

// ---- memory regions ----------------------------------------------------------------------------

size_t g_dynamic_smem = 0, g_static_used = 0;
std::map<const void*, size_t> g_static_offsets;  // `__shared__` object -> offset

struct Region {
  std::string name;
  unsigned char* original;
  unsigned char* copy;
  size_t bytes;
};
std::vector<Region> g_regions;
std::unique_ptr<unsigned char[]> g_arena;
size_t g_arena_bytes = 0;
constexpr unsigned char kPoison = 0xff;  // NaN in fp16, bf16 and fp32

bool g_active = false;  // a kernel is running: accesses are checked
uintptr_t g_smem_lo = 0, g_smem_span = 0, g_global_lo = 0, g_global_span = 0;
int g_global_errors = 0;  // per launch
int g_call_memchecks = 0;  // per guarded call

// The buffer whose copy is nearest to [a, a + bytes), and whether it holds all of it.
const Region* nearest_region(uintptr_t a, size_t bytes, bool* inside) {
  const Region* nearest = nullptr;
  long best = 0;
  for (const Region& r : g_regions) {
    const uintptr_t lo = (uintptr_t)r.copy, hi = lo + r.bytes;
    const long dist = a < lo ? (long)(lo - a) : (long)(a + bytes > hi ? a + bytes - hi : 0);
    if (!nearest || dist < best) nearest = &r, best = dist;
  }
  *inside = nearest && best == 0;
  return nearest;
}

std::string global_place(const Region* r, uintptr_t a) {
  if (!r) return "address " + std::to_string(a);
  return "byte offset " + std::to_string((long)(a - (uintptr_t)r->copy)) + " of '" + r->name +
         "' (" + std::to_string(r->bytes) + " bytes)";
}

void global_access(uintptr_t a, size_t bytes, bool write) {
  bool inside = false;
  const Region* r = nearest_region(a, bytes, &inside);
  if (inside) return;
  ++g_call_memchecks;
  if (++g_global_errors > 3) return;
  finding("memcheck: " + where() + ": " + (write ? "write" : "read") + " of " +
          std::to_string(bytes) + " bytes at " + global_place(r, a) + ": out of bounds");
}

void shared_bounds(size_t offset, size_t bytes, bool write) {
  const bool in_dynamic = offset + bytes <= g_dynamic_smem;
  const bool in_static = offset >= kDynamicBytes && offset + bytes <= kDynamicBytes + g_static_used;
  if (in_dynamic || in_static || ++g_global_errors > 3) return;
  finding("memcheck: " + where() + ": shared " + (write ? "write" : "read") + " of " +
          std::to_string(bytes) + " bytes at " + shared_place(offset) + ", outside the launch's " +
          std::to_string(g_dynamic_smem) + " bytes of dynamic shared memory");
}

// Host code (a launcher) reading or writing a buffer: on a GPU machine that is device memory.
void host_access(uintptr_t a, size_t bytes, bool write) {
  bool inside = false;
  const Region* r = nearest_region(a, bytes, &inside);
  ++g_call_memchecks;
  finding(std::string("memcheck: host code ") + (write ? "writes " : "reads ") +
          std::to_string(bytes) + " bytes of device memory at " + global_place(r, a));
}

// pc: the instruction's program counter, for bankcheck (null: an access it does not count).
inline void on_access(uintptr_t a, size_t bytes, bool write, const void* pc = nullptr) {
  if (!g_active) {
    if (a - g_global_lo < g_global_span) host_access(a, bytes, write);
    return;
  }
  if (a - g_smem_lo < g_smem_span) {
    shared_bounds(a - g_smem_lo, bytes, write);
    shared_access(a - g_smem_lo, std::min(bytes, g_smem_span - (a - g_smem_lo)), write);
    if (bank::on && pc)
      bank::access(g_current, g_warps[g_current / 32].lanes, a - g_smem_lo, bytes,
                   write ? bank::kStore : bank::kLoad, pc);
  } else if (a - g_global_lo < g_global_span) {
    global_access(a, bytes, write);
  }
}

// A GPU faults on an access not aligned to its size (vector loads, cp.async, ldmatrix rows).
void misaligned(uintptr_t a, size_t align, const std::string& what) {
  std::string place = "address " + std::to_string(a);
  if (a - g_smem_lo < g_smem_span) {
    place = shared_place(a - g_smem_lo);
  } else if (a - g_global_lo < g_global_span) {
    bool inside = false;
    place = global_place(nearest_region(a, 1, &inside), a);
  }
  ++g_call_memchecks;
  if (++g_global_errors > 3) return;
  finding("memcheck: " + (g_active ? where() : std::string("host code")) + ": misaligned " + what +
          " at " + place + " (needs " + std::to_string(align) + "-byte alignment)");
}

// ---- launches ----------------------------------------------------------------------------------

cudaError_t g_last_error = cudaSuccess;
std::set<std::string> g_launched;  // every kernel (instantiation) run so far
std::map<const void*, int> g_smem_optin;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)

void fiber_main() {
  g_body(g_body_ctx);
  me().done = true;
  g_progress = true;
}

// Every thread of the block is stuck at a barrier: say which and who is missing.
void report_deadlock() {
  int exited = 0;
  for (const Fiber& f : g_fibers) exited += f.done;
  for (int t = 0; t < g_threads; ++t) {
    const Fiber& f = g_fibers[t];
    if (f.done || f.wait == Wait::kNone) continue;
    g_current = t;
    tid = split(t, bdim);
    if (f.wait == Wait::kBlock) {
      finding("synccheck: " + where() + ": __syncthreads at " + f.file + ":" +
              std::to_string(f.line) + " reached by " + std::to_string(g_block.count) + " of " +
              std::to_string(g_threads) + " threads of the block (" + std::to_string(exited) +
              " exited without reaching it)");
    } else {
      const Warp& w = g_warps[t / 32];
      finding("synccheck: " + where() + ": warp collective at " + f.file + ":" +
              std::to_string(f.line) + " reached by " + std::to_string(w.bar.count) + " of " +
              std::to_string(w.lanes) + " lanes of warp " + std::to_string(t / 32));
    }
    return;
  }
}

void run_block(dim3 block_idx) {
  bid = uint3{block_idx.x, block_idx.y, block_idx.z};
  ++g_interval;
  std::memset(g_smem, kPoison, g_dynamic_smem);  // NaN where a kernel reads before writing
  std::memset(g_smem + kDynamicBytes, kPoison, g_static_used);
  g_block = Barrier{};
  for (int w = 0; w < (int)g_warps.size(); ++w) {
    g_warps[w].bar = Barrier{};
    g_warps[w].lanes = std::min(32, g_threads - 32 * w);
  }
  for (int t = 0; t < g_threads; ++t) {
    Fiber& f = g_fibers[t];
    f.done = false, f.wait = Wait::kNone, f.copies.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = g_stacks[t].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g_scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  // The order changes every round, so a missing barrier shows as a wrong result more often.
  for (unsigned round = 0;; ++round) {
    bool live = false;
    g_progress = false;
    for (int i = 0; i < g_threads; ++i) {
      const int t = round % 2 ? g_threads - 1 - i : (int)((i * 37u + round) % g_threads);
      if (g_fibers[t].done) continue;
      live = true;
      g_current = t;
      tid = split(t, bdim);
      swapcontext(&g_scheduler, &g_fibers[t].ctx);
    }
    if (!live) return;
    if (!g_progress) {
      report_deadlock();
      return;  // the stuck fibers are abandoned (their stacks are reused)
    }
  }
}

}  // namespace

int lane() { return g_current % 32; }

void block_barrier(const char* file, int line) {
  if (arrive(g_block, g_threads, Wait::kBlock, file, line, "__syncthreads")) {
    ++g_interval;
    if (bank::on) bank::flush_all();
  }
}

void warp_sync(const char* file, int line) {
  Warp& w = g_warps[g_current / 32];
  if (arrive(w.bar, w.lanes, Wait::kWarp, file, line, "__syncwarp")) {
    ++w.syncs;
    if (bank::on) bank::flush_warp(g_current / 32);
  }
}

const uint32_t* warp_exchange(const uint32_t* mine, int words, const char* file, int line) {
  Warp& w = g_warps[g_current / 32];
  uint32_t* buf = w.slots[w.bar.gen & 1];
  std::memcpy(buf + lane() * words, mine, words * 4);
  if (arrive(w.bar, w.lanes, Wait::kWarp, file, line, "warp collective") && bank::on)
    bank::flush_warp(g_current / 32);
  return buf;
}

void check_access(const void* p, size_t bytes, bool write) {
  on_access((uintptr_t)p, bytes, write);
}

void count_shared_request(const void* p, size_t bytes, int kind, const void* pc) {
  const uintptr_t a = (uintptr_t)p;
  if (g_active && bank::on && a - g_smem_lo < g_smem_span)
    bank::access(g_current, g_warps[g_current / 32].lanes, a - g_smem_lo, bytes, kind, pc);
}

unsigned char* dynamic_smem() { return g_smem; }

void* static_shared(size_t bytes, size_t align, const void* key) {
  auto it = g_static_offsets.find(key);
  if (it == g_static_offsets.end()) {
    const size_t offset = (kDynamicBytes + g_static_used + align - 1) / align * align;
    if (offset + bytes > kDynamicBytes + kMaxStaticBytes) {  // a GPU would not load the kernel
      finding("memcheck: " + g_kernel + ": __shared__ objects of more than " +
              std::to_string(kMaxStaticBytes) + " bytes");
      return g_smem + kDynamicBytes;
    }
    g_static_used = offset + bytes - kDynamicBytes;
    std::memset(g_smem + offset, kPoison, bytes);
    it = g_static_offsets.emplace(key, offset).first;
  }
  return g_smem + it->second;
}

void check_aligned(const void* p, size_t align, const char* what) {
  if ((uintptr_t)p % align) misaligned((uintptr_t)p, align, what);
}

void queue_copy(void* dst, const void* src, int bytes, bool valid) {
  check_aligned(dst, bytes, "cp.async destination");
  if (valid) check_aligned(src, bytes, "cp.async source");
  // The destination counts as written at the issue (a read of it before the wait is a race).
  check_access(dst, bytes, true);
  if (valid) check_access(src, bytes, false);
  count_shared_request(dst, bytes, bank::kCpAsync, __builtin_return_address(0));
  me().copies.emplace_back(dst, src, bytes, valid, me().committed);
}

void commit_copies() { ++me().committed; }

void wait_copies(int pending, bool all) {
  auto& copies = me().copies;
  const int landed = all ? INT32_MAX : me().committed - pending;  // groups before this one land
  auto keep = copies.begin();
  for (auto& copy : copies) {
    auto& [dst, src, bytes, valid, group] = copy;
    if (group >= landed) {
      *keep++ = copy;
    } else if (valid) {
      std::memcpy(dst, src, bytes);
    } else {
      std::memset(dst, 0, bytes);
    }
  }
  copies.erase(keep, copies.end());
}

cudaError_t run_grid(const void* kernel, const Config& c, void (*body)(void*), void* ctx) {
  const long threads = (long)c.block.x * c.block.y * c.block.z;
  const int optin = g_smem_optin.count(kernel) ? g_smem_optin[kernel] : (int)kDefaultSmem;
  cudaError_t err = cudaSuccess;
  if (threads < 1 || threads > 1024 || c.block.z > 64 || c.grid.x < 1 || c.grid.y < 1 ||
      c.grid.z < 1 || c.grid.x > 2147483647u || c.grid.y > 65535 || c.grid.z > 65535)
    err = cudaErrorInvalidConfiguration;
  else if (c.smem > (size_t)std::max<int>(optin, kDefaultSmem) || c.smem > (size_t)kMaxOptinSmem)
    err = cudaErrorInvalidValue;
  if (err != cudaSuccess) {
    g_last_error = err;
    return err;
  }
  g_kernel = kernel_name(kernel);
  g_launched.insert(g_kernel);
  bank::begin_kernel(g_kernel);
  g_threads = (int)threads;
  bdim = c.block, gdim = c.grid;
  g_body = body, g_body_ctx = ctx;
  g_dynamic_smem = c.smem;
  g_static_used = 0;
  g_static_offsets.clear();
  g_races = g_global_errors = 0;
  while ((int)g_stacks.size() < g_threads) g_stacks.emplace_back(new char[kStackBytes]);
  g_fibers.assign(g_threads, Fiber{});
  g_warps.assign((g_threads + 31) / 32, Warp{});
  if (bank::on) bank::begin_block(g_threads, (int)g_warps.size());
  g_smem_lo = (uintptr_t)g_smem, g_smem_span = sizeof(g_smem);
  g_active = true;
  for (unsigned z = 0; z < c.grid.z; ++z)
    for (unsigned y = 0; y < c.grid.y; ++y)
      for (unsigned x = 0; x < c.grid.x; ++x) {
        run_block(dim3(x, y, z));
        if (bank::on) bank::flush_all();  // what lanes skipped, or abandoned fibers left
      }
  g_active = false;
  return cudaSuccess;
}

// ---- guarded copies of the global buffers of one entry-point call ------------------------------

// Copies the buffers (overlapping ones merged into one, e.g. q/k/v views of one tensor) into one
// arena, each between guard regions as large as the largest buffer (so an access off by up to
// a whole buffer still lands in a guard); a copy keeps its original's address modulo 4096, so
// alignment-dependent choices of the launchers are the same. Returns the copies' addresses.
void guard_begin(int n, const uint64_t* ptrs, const uint64_t* sizes, const char* const* names,
                 uint64_t* out) {
  struct Buf {
    uintptr_t lo, hi;
    std::string name;
  };
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int a, int b) { return ptrs[a] < ptrs[b]; });
  std::vector<Buf> merged;
  std::vector<int> home(n);
  for (int i : order) {
    if (!merged.empty() && ptrs[i] < merged.back().hi) {
      merged.back().hi = std::max<uintptr_t>(merged.back().hi, ptrs[i] + sizes[i]);
      merged.back().name += std::string(", ") + names[i];
    } else {
      merged.push_back({(uintptr_t)ptrs[i], (uintptr_t)(ptrs[i] + sizes[i]), names[i]});
    }
    home[i] = (int)merged.size() - 1;
  }
  size_t guard = 4096;
  for (const Buf& b : merged) guard = std::max<size_t>(guard, (b.hi - b.lo + 4095) / 4096 * 4096);
  guard = std::min<size_t>(guard, 16 << 20);
  g_arena_bytes = 4096 + guard;
  std::vector<size_t> offsets;
  for (const Buf& b : merged) {
    offsets.push_back(g_arena_bytes + b.lo % 4096);
    g_arena_bytes += (b.lo % 4096 + b.hi - b.lo + 4095) / 4096 * 4096 + guard;
  }
  g_arena.reset(new unsigned char[g_arena_bytes]);
  unsigned char* base = g_arena.get() + (4096 - (uintptr_t)g_arena.get() % 4096);
  g_arena_bytes -= 4096;
  std::memset(base, kPoison, g_arena_bytes);
  g_regions.clear();
  for (size_t m = 0; m < merged.size(); ++m) {
    const Buf& b = merged[m];
    unsigned char* copy = base + offsets[m] - 4096;
    std::memcpy(copy, (const void*)b.lo, b.hi - b.lo);
    g_regions.push_back({b.name, (unsigned char*)b.lo, copy, b.hi - b.lo});
  }
  for (int i = 0; i < n; ++i) {
    const Region& r = g_regions[home[i]];
    out[i] = (uint64_t)(r.copy + (ptrs[i] - (uintptr_t)r.original));
  }
  g_global_lo = (uintptr_t)base, g_global_span = g_arena_bytes;
  g_call_memchecks = 0;
}

// Copies the buffers back and reports guard bytes that changed.
void guard_end() {
  const unsigned char* guard = (const unsigned char*)g_global_lo;  // regions are in order
  const unsigned char* end = guard + g_arena_bytes;
  for (size_t i = 0; i <= g_regions.size(); ++i) {
    const unsigned char* stop = i < g_regions.size() ? g_regions[i].copy : end;
    for (const unsigned char* p = guard; p < stop && g_call_memchecks == 0; ++p) {
      if (*p == kPoison) continue;
      const Region& r = g_regions[i < g_regions.size() ? i : i - 1];
      finding("memcheck: guard byte at offset " + std::to_string(p - r.copy) + " of '" + r.name +
              "' overwritten by a store the instrumentation did not see");
      break;
    }
    if (i < g_regions.size()) {
      std::memcpy(g_regions[i].original, g_regions[i].copy, g_regions[i].bytes);
      guard = g_regions[i].copy + g_regions[i].bytes;
    }
  }
  g_regions.clear();
  g_arena.reset();
  g_global_lo = g_global_span = 0;
}

}  // namespace emu

// ---- the CUDA runtime calls the launchers make --------------------------------------------------

extern "C" {
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    default: return "cudaError";
  }
}
const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::g_sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::kMaxOptinSmem; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > emu::kMaxOptinSmem)
    return cudaErrorInvalidValue;
  emu::g_smem_optin[func] = value;
  return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}

// ---- instrumentation callbacks (-fsanitize=kernel-address, one call per access) -----------------

// Hidden: the instrumented objects of this library call them directly, not through the PLT.
#define EMU_HIDDEN __attribute__((visibility("hidden")))
// The return address names the access's instruction (bankcheck).
#define EMU_PC __builtin_return_address(0)
#define EMU_ACCESS(n)                                                                           \
  EMU_HIDDEN void __asan_load##n##_noabort(uintptr_t a) { emu::on_access(a, n, false, EMU_PC); } \
  EMU_HIDDEN void __asan_store##n##_noabort(uintptr_t a) { emu::on_access(a, n, true, EMU_PC); }
EMU_ACCESS(1)
EMU_ACCESS(2)
EMU_ACCESS(4)
EMU_ACCESS(8)
EMU_ACCESS(16)
#undef EMU_ACCESS
EMU_HIDDEN void __asan_loadN_noabort(uintptr_t a, size_t n) {
  emu::on_access(a, n, false, EMU_PC);
}
EMU_HIDDEN void __asan_storeN_noabort(uintptr_t a, size_t n) {
  emu::on_access(a, n, true, EMU_PC);
}
#undef EMU_PC
EMU_HIDDEN void __asan_handle_no_return(void) {}

// -fsanitize=alignment: an access through a pointer not aligned to its type (the Vec<T, N>,
// uint4 and float4 vector accesses of the kernels).
struct UbsanLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanType {
  uint16_t kind, info;
  char name[1];
};
struct UbsanMismatch {
  UbsanLocation loc;
  const UbsanType* type;
  unsigned char log_alignment, check_kind;
};
EMU_HIDDEN void __ubsan_handle_type_mismatch_v1(UbsanMismatch* d, uintptr_t ptr) {
  emu::misaligned(ptr, (size_t)1 << d->log_alignment,
                  std::string("access to ") + d->type->name + " (" + d->loc.file + ":" +
                      std::to_string(d->loc.line) + ")");
}
}

// ---- what tests/cuda_emulation.py calls (ctypes) ---------------------------------------------

namespace {
std::string g_error;

// Runs a launcher; 0, or 1 (ValueError) / 2 (RuntimeError) with the message in emu_error().
template <typename F> int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::invalid_argument& e) {
    g_error = e.what();
    return 1;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 2;
  }
}

fastbert::Strides3 s3(const int64_t* s) { return {s[0], s[1], s[2]}; }
}  // namespace

extern "C" {
const char* emu_error() { return g_error.c_str(); }
const char* emu_findings() { return emu::g_findings.c_str(); }
int emu_finding_count() { return emu::g_finding_count; }
void emu_clear_findings() {
  emu::g_findings.clear();
  emu::g_finding_count = 0;
}
void emu_set_sm_count(int n) { emu::g_sm_count = n; }
void emu_guard_begin(int n, const uint64_t* ptrs, const uint64_t* sizes, const char* const* names,
                     uint64_t* out) {
  emu::guard_begin(n, ptrs, sizes, names, out);
}
void emu_guard_end() { emu::guard_end(); }

int emu_set_device(int device) { return guarded([&] { fastbert::set_device(device); }); }
int emu_probe_device(int device) {
  return guarded([&] { g_error = fastbert::probe_device(device); });
}
int64_t emu_attention_smem_bytes(int64_t D, int dtype) {
  return fastbert::attention_smem_bytes(D, dtype);
}
// "name=value" lines in emu_error()
int emu_attention_tile_info(int64_t D, int dropout) {
  return guarded([&] {
    std::string lines;
    for (const auto& [name, value] : fastbert::attention_tile_info(D, dropout))
      lines += name + "=" + std::to_string(value) + "\n";
    g_error = lines;
  });
}
// The kernels launched so far, one demangled name a line.
const char* emu_launched_kernels() {
  static std::string names;
  names.clear();
  for (const std::string& k : emu::g_launched) names += k + "\n";
  return names.c_str();
}
int64_t emu_max_smem_per_block() { return fastbert::max_smem_per_block(); }

// bankcheck: counting on or off (off: one branch per shared access), the totals so far, reset.
void emu_set_bankcheck(int on) { emu::bank::on = on != 0; }
void emu_reset_bank_report() { emu::bank::reset(); }
const char* emu_bank_report() {
  static std::string text;
  text = emu::bank::report();
  return text.c_str();
}

int emu_attention_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out,
                          uintptr_t lse, int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t D,
                          const int64_t* q_st, const int64_t* k_st, const int64_t* v_st,
                          const int64_t* out_st, int causal, int64_t left, int64_t right,
                          double scale, double p, uint64_t seed, int dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::attention_forward(q, k, v, mask, out, lse, B, Sq, Sk, H, D, s3(q_st), s3(k_st),
                                s3(v_st), s3(out_st), causal, left, right, scale, p, seed, dtype,
                                stream);
  });
}

int emu_attention_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                           uintptr_t lse, uintptr_t mask, uintptr_t dq, uintptr_t dk,
                           uintptr_t dv, uintptr_t delta, uintptr_t acc, int64_t B, int64_t Sq,
                           int64_t Sk, int64_t H, int64_t D, const int64_t* const* st,
                           int causal, int64_t left, int64_t right, double scale, double p,
                           uint64_t seed, int dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::attention_backward(dout, q, k, v, out, lse, mask, dq, dk, dv, delta, acc, B, Sq,
                                 Sk, H, D, s3(st[0]), s3(st[1]), s3(st[2]), s3(st[3]),
                                 s3(st[4]), s3(st[5]), s3(st[6]), s3(st[7]), causal, left, right,
                                 scale, p, seed, dtype, stream);
  });
}

int emu_attention_varlen_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cu_q,
                                 uintptr_t cu_k, uintptr_t out, uintptr_t lse, int64_t B,
                                 int64_t total_q, int64_t max_q, int64_t max_k, int64_t H,
                                 int64_t D, const int64_t* q_st, const int64_t* k_st,
                                 const int64_t* v_st, const int64_t* out_st, int causal,
                                 int64_t left, int64_t right, double scale, double p,
                                 uint64_t seed, int dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::attention_varlen_forward(q, k, v, cu_q, cu_k, out, lse, B, total_q, max_q, max_k,
                                       H, D, s3(q_st), s3(k_st), s3(v_st), s3(out_st), causal,
                                       left, right, scale, p, seed, dtype, stream);
  });
}

int emu_attention_varlen_backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v,
                                  uintptr_t out, uintptr_t lse, uintptr_t cu_q, uintptr_t cu_k,
                                  uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t delta,
                                  uintptr_t acc, int64_t B, int64_t total_q, int64_t max_q,
                                  int64_t max_k, int64_t H, int64_t D, const int64_t* const* st,
                                  int causal, int64_t left, int64_t right, double scale, double p,
                                  uint64_t seed, int dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, delta,
                                        acc, B, total_q, max_q, max_k, H, D, s3(st[0]),
                                        s3(st[1]), s3(st[2]), s3(st[3]), s3(st[4]), s3(st[5]),
                                        s3(st[6]), s3(st[7]), causal, left, right, scale, p, seed,
                                        dtype, stream);
  });
}

int emu_add_layer_norm_forward(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias,
                               uintptr_t y, uintptr_t sum, uintptr_t mean, uintptr_t rstd,
                               int64_t rows, int64_t hidden, double eps, double p, uint64_t seed,
                               int dtype, int weight_dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::add_layer_norm_forward(x, residual, weight, bias, y, sum, mean, rstd, rows, hidden,
                                     eps, p, seed, dtype, weight_dtype, stream);
  });
}

int emu_add_layer_norm_backward_parts(int64_t rows, int64_t hidden, int64_t* parts) {
  return guarded([&] { *parts = fastbert::add_layer_norm_backward_parts(rows, hidden); });
}

int emu_add_layer_norm_backward(uintptr_t dy, uintptr_t dsum, uintptr_t x, uintptr_t residual,
                                uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t dx,
                                uintptr_t dresidual, uintptr_t partial, uintptr_t dweight,
                                uintptr_t dbias, int64_t rows, int64_t hidden, int64_t parts,
                                double p, uint64_t seed, int dtype, int weight_dtype,
                                uintptr_t stream) {
  return guarded([&] {
    fastbert::add_layer_norm_backward(dy, dsum, x, residual, weight, mean, rstd, dx, dresidual,
                                      partial, dweight, dbias, rows, hidden, parts, p, seed,
                                      dtype, weight_dtype, stream);
  });
}

int emu_bias_gelu_forward(uintptr_t acc, uintptr_t bias, uintptr_t pre, uintptr_t out, int64_t m,
                          int64_t n, int tanh_approx, int dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::bias_gelu_forward(acc, bias, pre, out, m, n, tanh_approx, dtype, stream);
  });
}

int emu_gelu_backward_parts(int64_t m, int64_t n, int64_t* parts) {
  return guarded([&] { *parts = fastbert::gelu_backward_parts(m, n); });
}

int emu_gelu_backward(uintptr_t dout, uintptr_t pre, uintptr_t dpre, uintptr_t partial,
                      uintptr_t dbias, int64_t m, int64_t n, int64_t parts, int tanh_approx,
                      int dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::gelu_backward(dout, pre, dpre, partial, dbias, m, n, parts, tanh_approx, dtype,
                            stream);
  });
}

int emu_apply_rotary(uintptr_t x, uintptr_t cos_table, uintptr_t sin_table, uintptr_t positions,
                     uintptr_t out, int64_t rows, int64_t heads, int64_t head_dim, int64_t half,
                     int64_t table_rows, int64_t row_stride, int64_t head_stride, int interleaved,
                     int conjugate, int dtype, int table_dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::apply_rotary(x, cos_table, sin_table, positions, out, rows, heads, head_dim, half,
                           table_rows, row_stride, head_stride, interleaved, conjugate, dtype,
                           table_dtype, stream);
  });
}

int emu_geglu_forward(uintptr_t pre, uintptr_t bias, uintptr_t out, int64_t m, int64_t n,
                      int tanh_approx, int dtype, uintptr_t stream) {
  return guarded(
      [&] { fastbert::geglu_forward(pre, bias, out, m, n, tanh_approx, dtype, stream); });
}

int emu_geglu_backward_parts(int64_t m, int64_t n, int64_t* parts) {
  return guarded([&] { *parts = fastbert::geglu_backward_parts(m, n); });
}

int emu_geglu_backward(uintptr_t dout, uintptr_t pre, uintptr_t dpre, uintptr_t partial,
                       uintptr_t dbias, int64_t m, int64_t n, int64_t parts, int tanh_approx,
                       int dtype, uintptr_t stream) {
  return guarded([&] {
    fastbert::geglu_backward(dout, pre, dpre, partial, dbias, m, n, parts, tanh_approx, dtype,
                             stream);
  });
}
}
