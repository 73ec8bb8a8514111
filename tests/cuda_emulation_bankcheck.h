// bankcheck of the host emulation (tests/cuda_emulation_bankcheck.cpp states the model): the
// runtime (tests/cuda_emulation.cpp) hands it each shared access of a lane and each point where a
// warp's lanes are converged; it keeps the totals per kernel and access site. Not instrumented.
#pragma once
#include <cstddef>
#include <string>

namespace emu {
namespace bank {

constexpr int kLoad = 0, kStore = 1, kLdmatrix = 2, kCpAsync = 3;  // kinds of access

extern bool on;  // counting (off: the runtime calls nothing here)

void begin_kernel(const std::string& name);  // the next blocks' accesses are this kernel's
void begin_block(int threads, int warps);
// Thread `thread` (its warp has `warp_lanes` lanes) makes a shared access of `bytes` at `offset`
// into the block's shared memory, at site `pc`.
void access(int thread, int warp_lanes, size_t offset, size_t bytes, int kind, const void* pc);
void flush_warp(int warp);  // its lanes are converged: what they executed before is complete
void flush_all();
void reset();               // the totals so far
std::string report();       // one tab-separated line per site (emu_bank_report's format)

}  // namespace bank
}  // namespace emu
