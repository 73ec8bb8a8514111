// Dropout's hash, shared by the kernels of fastbert._cpu: included inside each ISA's namespace
// (FB_NS), so no include guard.

// MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2.
// (uint32_t or vu, lane by lane)
template <typename U>
static inline U fmix(U x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  return x ^ (x >> 16);
}

// The stream of one unit of a call (a sequence and head; a row) under the call's 64-bit seed:
// element `counter` of the unit is kept when fmix(counter * 0x9E3779B1 ^ stream) >= the
// threshold, in the forward and again in the backward.
static inline uint32_t seed_stream(uint64_t seed, uint32_t unit) {
  return fmix(static_cast<uint32_t>(seed) ^ fmix(static_cast<uint32_t>(seed >> 32) ^ unit));
}
