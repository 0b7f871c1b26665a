// The torch backend's dropout mask, as a pure function of (round keys, element index).
//
// keep(idx) = hash(idx) >= thr, with hash three murmur3-fmix32 rounds keyed by k0, k1, k2
// (derived from the seed in Python: peft_kernels/ops/_torch_dropout.py, which also holds the
// pure-torch twin of this function; tests check the two agree bit for bit).
#pragma once
#include <cstdint>

namespace peft_kernels {

struct DropoutKeys {
  uint32_t k0, k1, k2, thr;
};

static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// idx = lo | (hi << 32)
static inline uint32_t dropout_hash(uint32_t lo, uint32_t hi, const DropoutKeys& k) {
  uint32_t h = fmix32(lo ^ k.k0);
  h = fmix32(h ^ hi ^ k.k1);
  return fmix32(h ^ k.k2);
}

}  // namespace peft_kernels
