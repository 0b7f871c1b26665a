// Launchers of peft_kernels' CUDA kernels (csrc/cuda/*.cu). Plain C++: raw pointers, sizes,
// strides (in elements) and a cudaStream_t; no torch headers, so CMake builds the kernels alone.
//
// Multi-adapter layout (the same as the Triton kernels, ops/multi_lora.py's AdapterMapping):
//   perm       int32 [T_active]  token rows in adapter-sorted order (id -1 tokens are not in it)
//   pos_slots  int32 [T_active]  the adapter slot of each sorted position        (BGMV)
//   seg_slots  int32 [G], seg_starts int32 [G+1]  segments of equal slot in perm  (SGMV)
//   ranks      int32 [S]  each slot's true rank (work stops there; 0 = empty slot)
//   scalings   fp32  [S]  per-slot scale, or nullptr for none
// A weight stack W is read through three strides: shrink reads W[slot, r, k], expand W[slot, n, r].
//   shrink  out[p, r] = s? · Σ_k in[perm[p], k] · W[slot, r, k]          (out fp32 [T_active, R], r < rank)
//   expand  out[perm[p], n] += s? · Σ_{r<rank} buf[p, r] · W[slot, n, r]  (buf fp32 [T_active, R])
// Every index read on the device is guarded (the host cannot check values without a sync): perm entries
// outside [0, num_rows) and slots outside [0, num_slots) are skipped, ranks clamped to [0, R], segment bounds
// clamped to [0, num_active], so inconsistent index tensors never cause an access out of bounds.
// Inputs fp16/bf16/fp32, fp32 accumulation; 16-byte vector loads where the reduced dimension is
// contiguous and aligned, masked scalar code for every other K/N/R.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace peft_kernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Mapping {
  const int32_t* perm;
  const int32_t* pos_slots;
  const int32_t* seg_slots;
  const int32_t* seg_starts;
  const int32_t* ranks;
  const float* scalings;  // nullptr: no per-slot scale
  int64_t num_active;     // T_active
  int64_t num_segments;   // G
  int64_t max_count;      // the longest segment (kept in the ops' schema; the flattened SGMV grid needs no bound)
  int64_t num_rows;       // rows of the gathered/scattered tensor: perm entries outside [0, num_rows) are skipped
  int64_t num_slots;      // slots of the weight stack: slot ids outside [0, num_slots) are skipped
};

struct WeightStack {  // W[slot, i, j] at data + slot*s0 + i*s1 + j*s2
  const void* data;
  int64_t s0, s1, s2;
};

// in: [T, KD] with row stride in_s0 and column stride in_s1; out: fp32 [T_active, R] row-major.
cudaError_t bgmv_shrink(DType dt, const void* in, int64_t in_s0, int64_t in_s1, WeightStack w, float* out,
                        int64_t KD, int64_t R, const Mapping& m, cudaStream_t stream);
cudaError_t sgmv_shrink(DType dt, const void* in, int64_t in_s0, int64_t in_s1, WeightStack w, float* out,
                        int64_t KD, int64_t R, const Mapping& m, cudaStream_t stream);
// buf: fp32 [T_active, R]; out: [T, ND] (strides out_s0, out_s1), updated in place.
cudaError_t bgmv_expand(DType dt, const float* buf, WeightStack w, void* out, int64_t out_s0, int64_t out_s1,
                        int64_t ND, int64_t R, const Mapping& m, cudaStream_t stream);
cudaError_t sgmv_expand(DType dt, const float* buf, WeightStack w, void* out, int64_t out_s0, int64_t out_s1,
                        int64_t ND, int64_t R, const Mapping& m, cudaStream_t stream);

// Single-adapter LoRA expand epilogue: y[m, n] = y[m, n] + scale · Σ_r S[m, r] · B[n, r] (+ bias[n]),
// S fp32 [M, R] row-major, B [N, R] through (b_s0, b_s1), y [M, N] through (y_s0, y_s1), bias or nullptr.
cudaError_t lora_expand(DType dt, const float* S, const void* B, int64_t b_s0, int64_t b_s1, const void* bias,
                        void* y, int64_t y_s0, int64_t y_s1, int64_t M, int64_t N, int64_t R, float scale,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace peft_kernels
