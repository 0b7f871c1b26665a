// Multi-adapter LoRA gathers (BGMV per token, SGMV per segment) and the single-adapter LoRA expand
// epilogue. No torch headers: see include/peft_kernels/cuda_kernels.h for the contract.
//
//   bgmv_shrink  one block per sorted token, a warp per rank: a GEMV against the token's adapter
//   bgmv_expand  one block per (sorted token, 128 output columns): the token's S row in shared memory
//   sgmv_shrink  one block per (16 rows of a segment, 16 ranks): K tiles of x and W in shared memory
//                (the row blocks of every segment form one flattened grid, see locate_block)
//   sgmv_expand  one block per (16 rows of a segment, 128 columns): S tile in shared memory, each
//                thread one column and 16 fp32 accumulators; also the LoRA expand epilogue
// Loads along the reduced dimension are 16-byte vectors (8 fp16/bf16 or 4 fp32) whenever it is
// contiguous and the row is 16-byte aligned; otherwise (and for tails) scalar, so any K/N/R works.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "peft_kernels/cuda_kernels.h"

namespace peft_kernels {
namespace cuda {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);  // elements per 16-byte load
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// This lane's share of Σ_i a[i·sa]·b[i·sb] over i < n (lanes lane, lane+nlanes, ...).
template <typename T>
__device__ float partial_dot(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int lane, int nlanes) {
  constexpr int V = Vec<T>::kN;
  float acc = 0.f;
  int64_t done = 0;
  if (sa == 1 && sb == 1 && aligned16(a) && aligned16(b)) {
    const int64_t nv = n / V;
    const uint4* va = reinterpret_cast<const uint4*>(a);
    const uint4* vb = reinterpret_cast<const uint4*>(b);
    for (int64_t i = lane; i < nv; i += nlanes) {
      const uint4 xa = __ldg(va + i);
      const uint4 xb = __ldg(vb + i);
      const T* ea = reinterpret_cast<const T*>(&xa);
      const T* eb = reinterpret_cast<const T*>(&xb);
#pragma unroll
      for (int j = 0; j < V; ++j) acc = fmaf(to_f(ea[j]), to_f(eb[j]), acc);
    }
    done = nv * V;
  }
  for (int64_t i = done + lane; i < n; i += nlanes) acc = fmaf(to_f(a[i * sa]), to_f(b[i * sb]), acc);
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Index guards: the values of the mapping tensors are never trusted (see cuda_kernels.h).
__device__ __forceinline__ bool slot_ok(int slot, const Mapping& m) { return slot >= 0 && slot < m.num_slots; }
__device__ __forceinline__ bool row_ok(int64_t row, const Mapping& m) { return row >= 0 && row < m.num_rows; }
__device__ __forceinline__ int64_t clamp_rank(int32_t r, int64_t R) {
  return min(max(static_cast<int64_t>(r), int64_t{0}), R);
}
// segment g's positions [start, end), clamped to [0, num_active]
__device__ __forceinline__ void segment_bounds(const Mapping& m, int g, int64_t& start, int64_t& end) {
  start = min(max(static_cast<int64_t>(m.seg_starts[g]), int64_t{0}), m.num_active);
  end = min(max(static_cast<int64_t>(m.seg_starts[g + 1]), start), m.num_active);
}

// ---------------------------------------------------------------------------------------------
// BGMV
// ---------------------------------------------------------------------------------------------
constexpr int kShrinkWarps = 4;
constexpr int kShrinkRanksPerBlock = 16;

template <typename T>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    bgmv_shrink_kernel(const T* __restrict__ in, int64_t in_s0, int64_t in_s1, const T* __restrict__ w, int64_t ws0,
                       int64_t ws1, int64_t ws2, float* __restrict__ out, int64_t KD, int64_t R, Mapping m) {
  const int64_t p = blockIdx.x;
  const int slot = m.pos_slots[p];
  const int64_t tok = m.perm[p];
  if (!slot_ok(slot, m) || !row_ok(tok, m)) return;  // its S row stays zero
  const int64_t rank = clamp_rank(m.ranks[slot], R);
  const int64_t r_end = min(rank, static_cast<int64_t>(blockIdx.y + 1) * kShrinkRanksPerBlock);
  const float s = m.scalings != nullptr ? m.scalings[slot] : 1.f;
  const T* row = in + tok * in_s0;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * kShrinkRanksPerBlock + warp; r < r_end; r += kShrinkWarps) {
    const float acc = warp_sum(partial_dot(row, in_s1, w + slot * ws0 + r * ws1, ws2, KD, lane, 32));
    if (lane == 0) out[p * R + r] = acc * s;
  }
}

constexpr int kExpandThreads = 128;

// Σ_{r<rank} sv[r] · w[r·sw], sv in shared memory
template <typename T>
__device__ __forceinline__ float smem_row_dot(const float* sv, const T* w, int64_t sw, int64_t rank) {
  constexpr int V = Vec<T>::kN;
  float acc = 0.f;
  int64_t r = 0;
  if (sw == 1 && aligned16(w)) {
    for (; r + V <= rank; r += V) {
      const uint4 x = __ldg(reinterpret_cast<const uint4*>(w + r));
      const T* e = reinterpret_cast<const T*>(&x);
#pragma unroll
      for (int j = 0; j < V; ++j) acc = fmaf(sv[r + j], to_f(e[j]), acc);
    }
  }
  for (; r < rank; ++r) acc = fmaf(sv[r], to_f(w[r * sw]), acc);
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kExpandThreads, 8)  // (without the 8, ptxas spilled fp32 at 32 registers)
    bgmv_expand_kernel(const float* __restrict__ buf, const T* __restrict__ w, int64_t ws0, int64_t ws1, int64_t ws2,
                       T* __restrict__ out, int64_t out_s0, int64_t out_s1, int64_t ND, int64_t R, Mapping m) {
  extern __shared__ float srow[];  // the token's buffer row, [rank]
  const int64_t p = blockIdx.x;
  const int slot = m.pos_slots[p];
  const int64_t tok = m.perm[p];
  if (!slot_ok(slot, m) || !row_ok(tok, m)) return;  // the same for the whole block
  const int64_t rank = clamp_rank(m.ranks[slot], R);
  for (int64_t r = threadIdx.x; r < rank; r += blockDim.x) srow[r] = buf[p * R + r];
  __syncthreads();
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (n >= ND || rank == 0) return;
  const float s = m.scalings != nullptr ? m.scalings[slot] : 1.f;
  const float acc = smem_row_dot(srow, w + slot * ws0 + n * ws1, ws2, rank);
  T* o = out + tok * out_s0 + n * out_s1;
  *o = from_f<T>(to_f(*o) + s * acc);
}

// ---------------------------------------------------------------------------------------------
// SGMV
// ---------------------------------------------------------------------------------------------
constexpr int kTileRows = 16;  // rows (sorted positions) per block
constexpr int kTileRanks = 16;
constexpr int kTileK = 64;
constexpr int kShrinkThreads = kTileRows * kTileRanks;

// tile[i][c] = (float) base[row_i·s_row + (k0 + c)·s_col] for i < nrows, k0 + c < KD; 0 elsewhere.
// row_i = rowmap ? rowmap[row0 + i] : row0 + i (a mapped row outside [0, num_rows) reads as zeros). Vector loads where the row slice is contiguous and aligned.
template <typename T>
__device__ void load_tile(float (*tile)[kTileK + 1], const T* base, int64_t s_row, int64_t s_col,
                          const int32_t* rowmap, int64_t num_rows, int64_t row0, int nrows, int64_t k0, int64_t KD) {
  constexpr int V = Vec<T>::kN;
  constexpr int kVecPerRow = kTileK / V;
  for (int v = threadIdx.x; v < kTileRows * kVecPerRow; v += blockDim.x) {
    const int i = v / kVecPerRow;
    const int c = (v % kVecPerRow) * V;
    float vals[V];
    const int64_t row = i < nrows ? (rowmap != nullptr ? static_cast<int64_t>(rowmap[row0 + i]) : row0 + i) : -1;
    if (i < nrows && (rowmap == nullptr || (row >= 0 && row < num_rows))) {  // a bad perm entry reads zeros
      const T* src = base + row * s_row + (k0 + c) * s_col;
      if (s_col == 1 && k0 + c + V <= KD && aligned16(src)) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(src));
        const T* e = reinterpret_cast<const T*>(&x);
#pragma unroll
        for (int j = 0; j < V; ++j) vals[j] = to_f(e[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) vals[j] = (k0 + c + j < KD) ? to_f(src[j * s_col]) : 0.f;
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) vals[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < V; ++j) tile[i][c + j] = vals[j];
  }
}

__device__ __forceinline__ int64_t cdiv_rows(int64_t n) { return (n + kTileRows - 1) / kTileRows; }

// The flattened SGMV grid, as Punica and vLLM lay it out: block b of the row grid is the j-th block of
// kTileRows rows of segment g, where blocks(0..g-1) ≤ b < blocks(0..g) and blocks(g) = ⌈count_g / kTileRows⌉.
// The block finds g itself with a block-wide scan over the (clamped) segment counts, G ints that stay in
// L2, so the host builds no table and makes no sync. The row grid, cdiv(T_active, kTileRows) + G blocks,
// bounds Σ_g blocks(g); the blocks past the last one find nothing and exit. A skewed batch (1 × 4000 +
// 99 × 1 rows) launches 357 row blocks instead of segments × ⌈max_count / kTileRows⌉ = 25,000.
// Returns false when block b holds no rows, else the segment g and the block's first sorted position p0.
// Block-uniform (every thread returns the same), and every thread must call it.
template <int kThreads>
__device__ bool locate_block(const Mapping& m, int64_t b, int& g_out, int64_t& p0_out) {
  static_assert(kThreads % 32 == 0, "whole warps");
  constexpr int kWarps = kThreads / 32;
  __shared__ int64_t warp_total[kWarps];
  __shared__ int found_g;
  __shared__ int64_t found_p0;
  if (threadIdx.x == 0) found_g = -1;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t base = 0;  // blocks of the segments before this chunk
  for (int64_t c0 = 0; c0 < m.num_segments; c0 += kThreads) {
    const int64_t g = c0 + threadIdx.x;
    int64_t start = 0, end = 0;
    if (g < m.num_segments) segment_bounds(m, static_cast<int>(g), start, end);
    const int64_t nb = cdiv_rows(end - start);
    int64_t incl = nb;  // inclusive scan of nb over the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int64_t before = base, chunk = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += warp_total[w];
      chunk += warp_total[w];
    }
    incl += before;
    if (nb > 0 && b >= incl - nb && b < incl) {  // exactly one thread of one chunk
      found_g = static_cast<int>(g);
      found_p0 = start + (b - (incl - nb)) * kTileRows;
    }
    base += chunk;
    __syncthreads();
    if (found_g >= 0 || base > b) break;  // shared / block-uniform values: every thread leaves together
  }
  g_out = found_g;
  p0_out = found_p0;
  return g_out >= 0;
}

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads)
    sgmv_shrink_kernel(const T* __restrict__ in, int64_t in_s0, int64_t in_s1, const T* __restrict__ w, int64_t ws0,
                       int64_t ws1, int64_t ws2, float* __restrict__ out, int64_t KD, int64_t R, Mapping m) {
  __shared__ float xs[kTileRows][kTileK + 1];
  __shared__ float wt[kTileRanks][kTileK + 1];
  int g;
  int64_t p0;
  if (!locate_block<kShrinkThreads>(m, blockIdx.x, g, p0)) return;  // the same for the whole block
  const int slot = m.seg_slots[g];
  if (!slot_ok(slot, m)) return;  // the same for the whole block
  int64_t start, end;
  segment_bounds(m, g, start, end);
  const int64_t rank = clamp_rank(m.ranks[slot], R);
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * kTileRanks;
  if (r0 >= rank) return;
  const int nr = static_cast<int>(min(static_cast<int64_t>(kTileRanks), rank - r0));
  const int tr = threadIdx.x % kTileRanks;
  const int ti = threadIdx.x / kTileRanks;
  const T* wslot = w + slot * ws0 + r0 * ws1;
  const float s = m.scalings != nullptr ? m.scalings[slot] : 1.f;
  {  // this block's kTileRows rows from p0 (block-uniform)
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), end - p0));
    float acc = 0.f;
    for (int64_t k0 = 0; k0 < KD; k0 += kTileK) {
      load_tile<T>(xs, in, in_s0, in_s1, m.perm, m.num_rows, p0, rows, k0, KD);
      load_tile<T>(wt, wslot, ws1, ws2, nullptr, 0, 0, nr, k0, KD);
      __syncthreads();
#pragma unroll 16
      for (int k = 0; k < kTileK; ++k) acc = fmaf(xs[ti][k], wt[tr][k], acc);
      __syncthreads();
    }
    if (ti < rows && tr < nr) out[(p0 + ti) * R + r0 + tr] = acc * s;
  }
}

constexpr int kExpandRankTile = 64;

// out[row_i, n] += s·Σ_r buf[p0 + i, r]·W[n, r] (+ bias[n]) for the block's rows and column n.
// kLora: one segment of rows [0, lora_M), identity row map, slot 0, scale and bias from the args.
template <typename T, bool kLora>
__global__ void __launch_bounds__(kExpandThreads)
    sgmv_expand_kernel(const float* __restrict__ buf, const T* __restrict__ w, int64_t ws0, int64_t ws1, int64_t ws2,
                       T* __restrict__ out, int64_t out_s0, int64_t out_s1, int64_t ND, int64_t R, Mapping m,
                       const T* __restrict__ bias, float lora_scale, int64_t lora_M) {
  __shared__ float sb[kTileRows][kExpandRankTile];
  int slot = 0;
  int64_t start = 0, end = lora_M, rank = R;
  float s = lora_scale;
  int64_t first = static_cast<int64_t>(blockIdx.x) * kTileRows;  // kLora: row blocks over [0, lora_M)
  if (!kLora) {
    int g;
    if (!locate_block<kExpandThreads>(m, blockIdx.x, g, first)) return;  // the same for the whole block
    slot = m.seg_slots[g];
    if (!slot_ok(slot, m)) return;  // the same for the whole block
    segment_bounds(m, g, start, end);
    rank = clamp_rank(m.ranks[slot], R);
    s = m.scalings != nullptr ? m.scalings[slot] : 1.f;
  }
  if (!kLora && rank == 0) return;
  const int64_t n = static_cast<int64_t>(blockIdx.z) * kExpandThreads + threadIdx.x;
  const T* wrow = w + slot * ws0 + min(n, ND - 1) * ws1;  // clamped for the loads; stores are guarded
  {  // this block's kTileRows rows from p0 (block-uniform)
  const int64_t p0 = first;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), end - p0));
  float acc[kTileRows];
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) acc[i] = 0.f;
  constexpr int V = Vec<T>::kN;
  for (int64_t r0 = 0; r0 < rank; r0 += kExpandRankTile) {
    const int rc = static_cast<int>(min(static_cast<int64_t>(kExpandRankTile), rank - r0));
    for (int e = threadIdx.x; e < kTileRows * kExpandRankTile; e += blockDim.x) {
      const int i = e / kExpandRankTile;
      const int j = e % kExpandRankTile;
      sb[i][j] = (i < rows && j < rc) ? buf[(p0 + i) * R + r0 + j] : 0.f;
    }
    __syncthreads();
    int j = 0;
    if (ws2 == 1 && aligned16(wrow + r0)) {
      for (; j + V <= rc; j += V) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(wrow + r0 + j));
        const T* e = reinterpret_cast<const T*>(&x);
#pragma unroll
        for (int q = 0; q < V; ++q) {
          const float wf = to_f(e[q]);
#pragma unroll
          for (int i = 0; i < kTileRows; ++i) acc[i] = fmaf(sb[i][j + q], wf, acc[i]);
        }
      }
    }
    for (; j < rc; ++j) {
      const float wf = to_f(wrow[(r0 + j) * ws2]);
#pragma unroll
      for (int i = 0; i < kTileRows; ++i) acc[i] = fmaf(sb[i][j], wf, acc[i]);
    }
    __syncthreads();
  }
  if (n < ND) {  // (no return: the block's threads meet at the next row block's barriers)
    const float bv = (kLora && bias != nullptr) ? to_f(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < kTileRows; ++i) {
      if (i < rows) {
        const int64_t row = kLora ? p0 + i : static_cast<int64_t>(m.perm[p0 + i]);
        if (kLora || row_ok(row, m)) {
          T* o = out + row * out_s0 + n * out_s1;
          *o = from_f<T>(to_f(*o) + s * acc[i] + bv);
        }
      }
    }
  }
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
// row blocks of the flattened SGMV grid (see locate_block): Σ_g ⌈count_g / kTileRows⌉ ≤ this, ≤ 2^31 - 1
int64_t grid_rows(const Mapping& m) {
  return min(cdiv(m.num_active, kTileRows) + m.num_segments, int64_t{2147483647});
}

constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxBgmvExpandRank = 12 * 1024;  // its S row lives in (≤ 48 KB of) shared memory

// Calls f.template operator()<T>() with the C++ type of dt.
template <typename F>
cudaError_t dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t bgmv_shrink(DType dt, const void* in, int64_t in_s0, int64_t in_s1, WeightStack w, float* out, int64_t KD,
                        int64_t R, const Mapping& m, cudaStream_t stream) {
  if (m.num_active == 0 || R == 0) return cudaSuccess;
  const int64_t gy = cdiv(R, kShrinkRanksPerBlock);
  if (gy > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    bgmv_shrink_kernel<T><<<dim3(m.num_active, gy), kShrinkWarps * 32, 0, stream>>>(
        static_cast<const T*>(in), in_s0, in_s1, static_cast<const T*>(w.data), w.s0, w.s1, w.s2, out, KD, R, m);
    return cudaGetLastError();
  });
}

cudaError_t bgmv_expand(DType dt, const float* buf, WeightStack w, void* out, int64_t out_s0, int64_t out_s1,
                        int64_t ND, int64_t R, const Mapping& m, cudaStream_t stream) {
  if (m.num_active == 0 || R == 0 || ND == 0) return cudaSuccess;
  const int64_t gy = cdiv(ND, kExpandThreads);
  if (gy > kMaxGridYZ || R > kMaxBgmvExpandRank) return cudaErrorInvalidConfiguration;
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    bgmv_expand_kernel<T><<<dim3(m.num_active, gy), kExpandThreads, R * sizeof(float), stream>>>(
        buf, static_cast<const T*>(w.data), w.s0, w.s1, w.s2, static_cast<T*>(out), out_s0, out_s1, ND, R, m);
    return cudaGetLastError();
  });
}

cudaError_t sgmv_shrink(DType dt, const void* in, int64_t in_s0, int64_t in_s1, WeightStack w, float* out, int64_t KD,
                        int64_t R, const Mapping& m, cudaStream_t stream) {
  if (m.num_active == 0 || R == 0 || m.num_segments == 0) return cudaSuccess;
  const int64_t gz = cdiv(R, kTileRanks);
  if (gz > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    sgmv_shrink_kernel<T><<<dim3(grid_rows(m), 1, gz), kShrinkThreads, 0, stream>>>(
        static_cast<const T*>(in), in_s0, in_s1, static_cast<const T*>(w.data), w.s0, w.s1, w.s2, out, KD, R, m);
    return cudaGetLastError();
  });
}

cudaError_t sgmv_expand(DType dt, const float* buf, WeightStack w, void* out, int64_t out_s0, int64_t out_s1,
                        int64_t ND, int64_t R, const Mapping& m, cudaStream_t stream) {
  if (m.num_active == 0 || R == 0 || ND == 0 || m.num_segments == 0) return cudaSuccess;
  const int64_t gz = cdiv(ND, kExpandThreads);
  if (gz > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    sgmv_expand_kernel<T, false><<<dim3(grid_rows(m), 1, gz), kExpandThreads, 0,
                                   stream>>>(buf, static_cast<const T*>(w.data), w.s0, w.s1, w.s2,
                                             static_cast<T*>(out), out_s0, out_s1, ND, R, m, nullptr, 1.f, 0);
    return cudaGetLastError();
  });
}

cudaError_t lora_expand(DType dt, const float* S, const void* B, int64_t b_s0, int64_t b_s1, const void* bias, void* y,
                        int64_t y_s0, int64_t y_s1, int64_t M, int64_t N, int64_t R, float scale,
                        cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const int64_t gz = cdiv(N, kExpandThreads);
  if (gz > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  Mapping none{};
  return dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    sgmv_expand_kernel<T, true><<<dim3(cdiv(M, kTileRows), 1, gz), kExpandThreads, 0, stream>>>(
        S, static_cast<const T*>(B), 0, b_s0, b_s1, static_cast<T*>(y), y_s0, y_s1, N, R, none,
        static_cast<const T*>(bias), scale, M);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace peft_kernels
