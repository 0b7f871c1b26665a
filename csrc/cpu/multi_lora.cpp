// Multi-adapter LoRA on the CPU: grouped (SGMV-style) shrink/expand and their backward.
//
// Tokens arrive grouped by adapter (perm = token indices in adapter-sorted order, seg_starts the
// segment offsets into perm, seg_slots each segment's slot). Work items are segments, split into
// row chunks in forward, and run on at::parallel_for's threads, at the slot's true rank. float32
// runs register-blocked micro-kernels (one variant per ISA, include/peft_kernels/cpu_isa.h); other
// dtypes do each item's small GEMMs with at::mm (single-threaded inside the parallel region) and add the
// result into the item's own rows of y (dx) with plain loads and stores.
// Every output row / slot gradient is written by exactly one item: no races, and the result does
// not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#define PK_T512 <v16, 4>
#define PK_T256 <v8, 2>
#define PK_T128 <v4, 2>
#include "peft_kernels/cpu_isa.h"
#include "peft_kernels/gather_checks.h"

namespace peft_kernels {
namespace cpu {
namespace {

// ---- float32 micro-kernels: BLAS is slow for these skinny shapes (rank 1..64 inner/outer dim) ----

// 16-float vectors (GCC vector extensions): one zmm with AVX-512, two ymm with AVX2, four xmm otherwise.
// Explicit vectors keep the 4×4 accumulator blocks in registers (auto-vectorised arrays were spilled).
typedef float v16 __attribute__((vector_size(64)));  // one zmm
typedef float v8 __attribute__((vector_size(32)));   // one ymm
typedef float v4 __attribute__((vector_size(16)));   // one xmm
template <typename V>
constexpr int lanes() {
  return static_cast<int>(sizeof(V) / sizeof(float));
}
template <typename V>
inline V loadv(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
inline void storev(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
template <typename V>
inline float hsum(V v) {
  float s = 0.f;
  for (int q = 0; q < lanes<V>(); ++q) s += v[q];
  return s;
}

// Each ISA variant instantiates the bodies with its register width and a block size that keeps all
// accumulators in registers: AVX-512 (32 zmm) 4×4 blocks of v16; AVX2 and SSE (16 registers) 2×4 of v8 / v4.
// S[i, j] = Σ_k x[rows[i], k] · A[j, k] for i < n, j < r: TT tokens × 4 rank rows per pass over K.
template <typename V, int TT>
PK_BODY void shrink_f32_body(const float* x, int64_t ldx, const int64_t* rows, int64_t n, const float* A,
                             int64_t lda, int64_t r, int64_t K, float* S, int64_t lds) {
  constexpr int L = lanes<V>();
  const int64_t KV = K - K % L;
  for (int64_t i = 0; i < n; i += TT) {
    const int64_t m = std::min<int64_t>(TT, n - i);
    const float* xs[TT];
    for (int64_t t = 0; t < TT; ++t) xs[t] = x + rows[i + std::min<int64_t>(t, m - 1)] * ldx;
    for (int64_t j0 = 0; j0 < r; j0 += 4) {
      const int64_t rr = std::min<int64_t>(4, r - j0);
      const float* as[4];
      for (int64_t u = 0; u < 4; ++u) as[u] = A + (j0 + std::min<int64_t>(u, rr - 1)) * lda;
      V acc[TT][4] = {};
      for (int64_t k = 0; k < KV; k += L) {
        V xv[TT];
        for (int t = 0; t < TT; ++t) xv[t] = loadv<V>(xs[t] + k);
        for (int u = 0; u < 4; ++u) {
          const V av = loadv<V>(as[u] + k);
          for (int t = 0; t < TT; ++t) acc[t][u] += xv[t] * av;
        }
      }
      for (int64_t t = 0; t < m; ++t)
        for (int64_t u = 0; u < rr; ++u) {
          float v = hsum<V>(acc[t][u]);
          for (int64_t k = KV; k < K; ++k) v += xs[t][k] * as[u][k];
          S[(i + t) * lds + j0 + u] = v;
        }
    }
  }
}

struct Item {
  int64_t slot, begin, end;
};

// rows per forward work item: small enough to balance a skewed batch over the threads
constexpr int64_t kChunkRows = 64;

struct Segments {
  std::vector<int64_t> slots, starts, ranks;
  std::vector<double> scal;
};

template <typename T>
std::vector<T> to_vector(const at::Tensor& t) {
  // reads the common dtypes in place (no conversion copies on the hot path)
  const auto c = t.contiguous();
  std::vector<T> out(static_cast<size_t>(c.numel()));
  AT_DISPATCH_ALL_TYPES(c.scalar_type(), "to_vector", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<T>(p[i]);
  });
  return out;
}

// R = lora_A.size(1): each slot's rank is clamped to [0, R] (as the CUDA and Triton kernels do), so a ranks
// buffer holding a value past R never reads or writes past row R of a slot.
Segments read_segments(const at::Tensor& seg_slots, const at::Tensor& seg_starts, const at::Tensor& ranks,
                       const at::Tensor& scalings, int64_t R, int64_t n_active) {
  TORCH_CHECK_VALUE(seg_slots.dim() == 1 && seg_starts.dim() == 1 && seg_starts.size(0) == seg_slots.size(0) + 1,
                    "multi_lora: seg_starts must have one more entry than seg_slots");
  TORCH_CHECK_VALUE(seg_slots.device().is_cpu() && seg_starts.device().is_cpu() && ranks.device().is_cpu() &&
                        scalings.device().is_cpu(), "multi_lora: segment tensors, ranks and scalings must be CPU tensors");
  for (const auto* t : {&seg_slots, &seg_starts, &ranks})
    TORCH_CHECK_TYPE(!t->is_floating_point() && !t->is_complex() && t->scalar_type() != at::kBool,
                     "multi_lora: seg_slots, seg_starts and ranks must be integer tensors, got ", t->scalar_type());
  Segments s;
  s.slots = to_vector<int64_t>(seg_slots);
  s.starts = to_vector<int64_t>(seg_starts);
  s.ranks = to_vector<int64_t>(ranks);
  for (auto& r : s.ranks) r = std::min(std::max<int64_t>(r, 0), R);
  s.scal = to_vector<double>(scalings);
  const int64_t S = static_cast<int64_t>(s.ranks.size());
  for (size_t g = 0; g < s.slots.size(); ++g) {
    TORCH_CHECK_VALUE(s.slots[g] >= 0 && s.slots[g] < S, "multi_lora: seg_slots[", g, "] = ", s.slots[g],
                      " is not a slot in [0, ", S, ")");
    TORCH_CHECK_VALUE(s.starts[g] <= s.starts[g + 1], "multi_lora: seg_starts must be non-decreasing");
  }
  TORCH_CHECK_VALUE(s.starts.front() == 0 && s.starts.back() == n_active, "multi_lora: seg_starts must run from 0 to "
                    "len(perm) = ", n_active, ", got ", s.starts.front(), " … ", s.starts.back());
  return s;
}

// B [S, N, R] as [S, R, N] (unit stride along N) for the fp32 expand, filled only where the kernels read it:
// the first `rank` rows of each slot that has a segment. Built per call from B itself, so it can never be a
// stale copy (a cache keyed on B's version missed updates made through .data); it costs a read of the
// active adapters' B, what the expand reads anyway, instead of the whole stack.
at::Tensor active_b_transposed(const at::Tensor& B, const Segments& segs) {
  auto Bt = at::empty({B.size(0), B.size(2), B.size(1)}, B.options());
  std::vector<char> done(static_cast<size_t>(B.size(0)), 0);
  for (const int64_t a : segs.slots) {
    const int64_t r = segs.ranks[a];
    if (r <= 0 || done[a]) continue;
    done[a] = 1;
    Bt.select(0, a).narrow(0, 0, r).copy_(B.select(0, a).narrow(1, 0, r).t());
  }
  return Bt;
}

void check_common(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& perm,
                  const at::Tensor& ranks, const at::Tensor& scalings) {
  for (const auto* t : {&x, &A, &B, &perm, &ranks, &scalings})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "multi_lora: every tensor must be on the CPU, got one on ", t->device());
  TORCH_CHECK_TYPE(x.is_floating_point() && A.is_floating_point() && B.is_floating_point(),
                   "multi_lora: x, lora_A and lora_B must be floating point, got ", x.scalar_type(), ", ",
                   A.scalar_type(), ", ", B.scalar_type());
  TORCH_CHECK_TYPE(A.scalar_type() == B.scalar_type(), "multi_lora: lora_A and lora_B must share a dtype, got ",
                   A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && A.dim() == 3 && B.dim() == 3, "multi_lora: x must be 2-D, lora_A and lora_B 3-D");
  TORCH_CHECK_VALUE(A.size(2) == x.size(1) && B.size(0) == A.size(0) && B.size(2) == A.size(1),
                    "multi_lora: lora_A ", A.sizes(), " / lora_B ", B.sizes(), " must be [S, R, K] / [S, N, R] for x ",
                    x.sizes());
  TORCH_CHECK_TYPE(!perm.is_floating_point() && !perm.is_complex() && perm.scalar_type() != at::kBool,
                   "multi_lora: perm must be an integer tensor, got ", perm.scalar_type());
  TORCH_CHECK_VALUE(perm.dim() == 1 && ranks.dim() == 1 && scalings.dim() == 1 && ranks.numel() == A.size(0) &&
                        scalings.numel() == A.size(0),
                    "multi_lora: perm must be 1-D; ranks and scalings 1-D with one entry per slot (", A.size(0), ")");
}

// perm's values: distinct rows of x (two work items writing one row would race). O(T_active + T).
void check_perm(const at::Tensor& idx, int64_t T) {
  const int64_t* p = idx.data_ptr<int64_t>();
  std::vector<uint8_t> seen(static_cast<size_t>(T), 0);
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < T, "multi_lora: perm[", i, "] = ", p[i], " is not a row of x in [0, ", T,
                      ")");
    TORCH_CHECK_VALUE(!seen[p[i]], "multi_lora: perm holds row ", p[i], " twice (at ", i, ")");
    seen[p[i]] = 1;
  }
}

// a [rows, cols] float tensor on the CPU
void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "multi_lora: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_TYPE(t.is_floating_point(), "multi_lora: ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "multi_lora: ", name, " must be [", rows,
                    ", ", cols, "], got ", t.sizes());
}

// lora_B_t: lora_B [S, N, R] transposed to fp32 [S, R, N] with unit stride along N
void check_b_t(const at::Tensor& Bt, const at::Tensor& B) {
  TORCH_CHECK_VALUE(Bt.device().is_cpu() && Bt.scalar_type() == at::kFloat && Bt.dim() == 3 &&
                        Bt.size(0) == B.size(0) && Bt.size(1) == B.size(2) && Bt.size(2) == B.size(1) &&
                        Bt.stride(2) == 1,
                    "multi_lora: lora_B_t must be lora_B transposed to a float32 CPU [", B.size(0), ", ", B.size(2),
                    ", ", B.size(1), "] tensor with unit stride along N, got ", Bt.sizes());
}

// y[rows[i], :] += scale · Σ_j S[i, j] · Bt[j, :] with Bt = B_aᵀ ([r, N], row stride ldbt): rank-row
// axpys along N. Four tokens share each pass over a Bt row (a quarter of the adapter traffic); each
// token's LoRA row is summed in a buffer and added to y once (one rounding, as BLAS would).
template <typename V, int TT>
PK_BODY void expand_t_f32_body(float* y, int64_t ldy, const int64_t* rows, int64_t n, const float* S, int64_t lds,
                               float scale, const float* Bt, int64_t ldbt, int64_t r, int64_t N) {
  constexpr int L = lanes<V>(), W = 4 * L;  // TT tokens × 4 vectors of accumulators
  const int64_t NW = N - N % W;
  for (int64_t i = 0; i < n; i += TT) {
    const int64_t m = std::min<int64_t>(TT, n - i);
    const float* ss[TT];
    for (int64_t t = 0; t < TT; ++t) ss[t] = S + (i + std::min<int64_t>(t, m - 1)) * lds;
    for (int64_t nb = 0; nb < NW; nb += W) {
      V acc[TT][4] = {};
      for (int64_t j = 0; j < r; ++j) {
        const float* bj = Bt + j * ldbt + nb;
        V bv[4];
        for (int q = 0; q < 4; ++q) bv[q] = loadv<V>(bj + q * L);
        for (int t = 0; t < TT; ++t) {
          const float c = ss[t][j] * scale;
          for (int q = 0; q < 4; ++q) acc[t][q] += c * bv[q];
        }
      }
      for (int64_t t = 0; t < m; ++t) {
        float* yr = y + rows[i + t] * ldy + nb;
        for (int q = 0; q < 4; ++q) storev<V>(yr + q * L, loadv<V>(yr + q * L) + acc[t][q]);
      }
    }
    for (int64_t t = 0; t < m && NW < N; ++t) {  // the last N % W columns
      float* yr = y + rows[i + t] * ldy;
      for (int64_t q = NW; q < N; ++q) {
        float v = 0.f;
        for (int64_t j = 0; j < r; ++j) v += ss[t][j] * scale * Bt[j * ldbt + q];
        yr[q] += v;
      }
    }
  }
}

// out[j, :] = scale · Σ_i C[i, j] · V[rows[i], :] for j < r (out row stride ldo, length L): the
// per-slot gradient reductions dA = dSᵀ·x and dBᵀ = s·Sᵀ·dY. 4 rank rows × 64 columns of register
// accumulators per pass over the segment's tokens, in token order (deterministic).
template <typename Vt, int UU>
PK_BODY void outer_f32_body(float* out, int64_t ldo, int64_t r, const float* V, int64_t ldv, const int64_t* rows,
                            int64_t n, const float* C, int64_t ldc, float scale, int64_t L) {
  constexpr int LN = lanes<Vt>(), W = 4 * LN;  // UU rank rows × 4 vectors of accumulators
  const int64_t LW = L - L % W;
  for (int64_t j0 = 0; j0 < r; j0 += UU) {
    const int64_t rr = std::min<int64_t>(UU, r - j0);
    for (int64_t lb = 0; lb < LW; lb += W) {
      Vt acc[UU][4] = {};
      for (int64_t i = 0; i < n; ++i) {
        const float* v = V + rows[i] * ldv + lb;
        Vt vv[4];
        for (int q = 0; q < 4; ++q) vv[q] = loadv<Vt>(v + q * LN);
        const float* ci = C + i * ldc + j0;
        for (int u = 0; u < UU; ++u) {
          const float c = u < rr ? ci[u] : 0.f;
          for (int q = 0; q < 4; ++q) acc[u][q] += c * vv[q];
        }
      }
      for (int64_t u = 0; u < rr; ++u)
        for (int q = 0; q < 4; ++q) storev<Vt>(out + (j0 + u) * ldo + lb + q * LN, acc[u][q] * scale);
    }
    for (int64_t u = 0; u < rr && LW < L; ++u)  // the last L % W columns
      for (int64_t l = LW; l < L; ++l) {
        float v = 0.f;
        for (int64_t i = 0; i < n; ++i) v += C[i * ldc + j0 + u] * V[rows[i] * ldv + l];
        out[(j0 + u) * ldo + l] = v * scale;
      }
  }
}

PK_ISA_VARIANTS(shrink_f32, (const float* x, int64_t ldx, const int64_t* rows, int64_t n, const float* A,
                              int64_t lda, int64_t r, int64_t K, float* S, int64_t lds), (x, ldx, rows, n, A, lda, r, K, S, lds))
PK_ISA_VARIANTS(expand_t_f32, (float* y, int64_t ldy, const int64_t* rows, int64_t n, const float* S, int64_t lds,
                                float scale, const float* Bt, int64_t ldbt, int64_t r, int64_t N), (y, ldy, rows, n, S, lds, scale, Bt, ldbt, r, N))
PK_ISA_VARIANTS(outer_f32, (float* out, int64_t ldo, int64_t r, const float* V, int64_t ldv, const int64_t* rows,
                             int64_t n, const float* C, int64_t ldc, float scale, int64_t L), (out, ldo, r, V, ldv, rows, n, C, ldc, scale, L))

// y[rows[i], :] += src[i, :] for i < n, element by element as index_add_ adds (in float for 16-bit types);
// src [n, N] is converted to y's dtype first. The caller's rows are its own (perm holds distinct rows: check_perm),
// so items running on other threads never touch them; y may have any strides (check_disjoint_2d).
void add_rows(const at::Tensor& y, const int64_t* rows, int64_t n, const at::Tensor& src) {
  const auto s = src.scalar_type() == y.scalar_type() ? src.contiguous() : src.to(y.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "multi_lora_add_rows", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const int64_t s0 = y.stride(0), s1 = y.stride(1), N = y.size(1);
    for (int64_t i = 0; i < n; ++i) {
      scalar_t* yr = yp + rows[i] * s0;
      const scalar_t* sr = sp + i * N;
      for (int64_t j = 0; j < N; ++j) yr[j * s1] = yr[j * s1] + sr[j];
    }
  });
}

}  // namespace

// y[perm[p]] += s_a · (x[perm[p]] · A_aᵀ) · B_aᵀ for every sorted position p; returns S = x·A_aᵀ
// ([T_active, R], adapter dtype, sorted rows, columns past a slot's rank zero).
at::Tensor multi_lora_fwd(at::Tensor y, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                          const at::Tensor& perm, const at::Tensor& seg_slots, const at::Tensor& seg_starts,
                          const at::Tensor& ranks, const at::Tensor& scalings,
                          const c10::optional<at::Tensor>& lora_B_t) {
  check_common(x, lora_A, lora_B, perm, ranks, scalings);
  check_matrix(y, "y", x.size(0), lora_B.size(1));
  check_disjoint_2d(y, "multi_lora: y");
  const auto segs = read_segments(seg_slots, seg_starts, ranks, scalings, lora_A.size(1), perm.size(0));
  // at::parallel_for's workers do not inherit grad mode: never hand them tensors that require grad
  const auto xd = x.detach();
  const auto A = lora_A.detach();
  const auto B = lora_B.detach();
  const auto idx = perm.to(at::kLong).contiguous();
  const auto cdt = A.scalar_type();
  const int64_t R = A.size(1), Ta = idx.size(0);
  check_perm(idx, x.size(0));
  auto S = at::zeros({Ta, R}, A.options());
  std::vector<Item> items;
  for (size_t g = 0; g < segs.slots.size(); ++g) {
    if (segs.ranks[segs.slots[g]] <= 0) continue;  // an empty slot adds exactly nothing
    for (int64_t b = segs.starts[g]; b < segs.starts[g + 1]; b += kChunkRows)
      items.push_back({segs.slots[g], b, std::min(b + kChunkRows, segs.starts[g + 1])});
  }
  const bool f32 = cdt == at::kFloat && xd.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat;
  if (f32) {
    // micro-kernel path: read x rows through perm, write y rows in place; no gathered copies
    const auto xc = xd.stride(1) == 1 ? xd : xd.contiguous();
    const auto Ac = A.stride(2) == 1 ? A : A.contiguous();
    // B transposed to [S, R, N] (given, or built for the active slots): the expand runs along N, no shuffles
    const at::Tensor Bt = (lora_B_t.has_value() && lora_B_t->defined()) ? lora_B_t->detach()
                                                                         : active_b_transposed(B, segs);
    check_b_t(Bt, B);
    TORCH_CHECK_VALUE(y.stride(1) == 1, "multi_lora: y must have unit column stride");
    const int64_t K = xc.size(1), N = B.size(1);
    const int64_t* ip = idx.data_ptr<int64_t>();
    const float* xp = xc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    float* sp = S.data_ptr<float>();
    // small batches run inline: waking the thread pool costs more than the work
    const int64_t work = Ta * K * R;
    const int64_t grain = work < (int64_t{1} << 20) ? std::max<int64_t>(1, static_cast<int64_t>(items.size())) : 1;
    at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t ib, int64_t ie) {
      for (int64_t i = ib; i < ie; ++i) {
        const auto& it = items[i];
        const int64_t r = segs.ranks[it.slot], n = it.end - it.begin;
        shrink_f32(xp, xc.stride(0), ip + it.begin, n, Ac.data_ptr<float>() + it.slot * Ac.stride(0), Ac.stride(1),
                   r, K, sp + it.begin * R, R);
        expand_t_f32(yp, y.stride(0), ip + it.begin, n, sp + it.begin * R, R, static_cast<float>(segs.scal[it.slot]),
                     Bt.data_ptr<float>() + it.slot * Bt.stride(0), Bt.stride(1), r, N);
      }
    });
    return S;
  }
  // each item gathers its rows, does its two GEMMs and adds the result into its own rows of y (add_rows: plain
  // loads and stores; no at:: op in the region writes a tensor another item writes). index_add_ into the shared y
  // from several threads lost updates: bf16 outputs up to 85 % off (it reads and writes more of y than the
  // indexed rows).
  const int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t ib, int64_t ie) {
    for (int64_t i = ib; i < ie; ++i) {
      const auto& it = items[i];
      const int64_t r = segs.ranks[it.slot], n = it.end - it.begin;
      auto xg = xd.index_select(0, idx.narrow(0, it.begin, n));
      if (xg.scalar_type() != cdt) xg = xg.to(cdt);
      const auto At = A[it.slot].narrow(0, 0, r).t();
      auto Sg = S.narrow(0, it.begin, n).narrow(1, 0, r);
      if (r == R)
        at::mm_out(Sg, xg, At);
      else
        Sg.copy_(at::mm(xg, At));
      const auto Zg = at::mm(Sg.mul(segs.scal[it.slot]), B[it.slot].narrow(1, 0, r).t());  // scale the n×r side
      add_rows(y, ip + it.begin, n, Zg);
    }
  });
  return S;
}

// Backward of multi_lora_fwd: dx (the base dY·W, or undefined) gets += dS·A_a in place; returns
// (dA [S, R, K], dB [S, N, R]) (empty tensors when not asked for). One work item per segment, so
// each slot's gradient is one fixed-order computation.
std::tuple<at::Tensor, at::Tensor> multi_lora_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& S,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  const at::Tensor& perm, const at::Tensor& seg_slots,
                                                  const at::Tensor& seg_starts, const at::Tensor& ranks,
                                                  const at::Tensor& scalings, const c10::optional<at::Tensor>& dx_opt,
                                                  bool need_da, bool need_db,
                                                  const c10::optional<at::Tensor>& lora_B_t) {
  check_common(x, lora_A, lora_B, perm, ranks, scalings);
  check_matrix(dy, "dy", x.size(0), lora_B.size(1));
  check_matrix(S, "S", perm.size(0), lora_A.size(1));
  if (dx_opt.has_value() && dx_opt->defined()) {
    check_matrix(*dx_opt, "dx", x.size(0), x.size(1));
    check_disjoint_2d(*dx_opt, "multi_lora: dx");
  }
  const auto segs = read_segments(seg_slots, seg_starts, ranks, scalings, lora_A.size(1), perm.size(0));
  {  // a slot's gradient is written by its one segment: two segments of one slot would overwrite (and race)
    std::vector<char> seen(static_cast<size_t>(lora_A.size(0)), 0);
    for (size_t g = 0; g < segs.slots.size(); ++g) {
      TORCH_CHECK_VALUE(!seen[segs.slots[g]], "multi_lora_bwd: seg_slots holds slot ", segs.slots[g], " twice (at ",
                        g, "): each slot's tokens must be one segment");
      seen[segs.slots[g]] = 1;
    }
  }
  const auto xd = x.detach();
  const auto dyd = dy.detach();
  const auto Sd = S.detach();
  const auto A = lora_A.detach();
  const auto B = lora_B.detach();
  const auto idx = perm.to(at::kLong).contiguous();
  check_perm(idx, x.size(0));
  const auto cdt = A.scalar_type();
  at::Tensor dx = dx_opt.has_value() ? *dx_opt : at::Tensor();
  const bool need_dx = dx.defined();
  auto dA = need_da ? at::zeros_like(A) : at::empty({0}, A.options());
  auto dB = need_db ? at::zeros_like(B) : at::empty({0}, B.options());
  const int64_t G = static_cast<int64_t>(segs.slots.size());
  const bool f32 = cdt == at::kFloat && xd.scalar_type() == at::kFloat && dyd.scalar_type() == at::kFloat &&
                   Sd.scalar_type() == at::kFloat && (!need_dx || dx.scalar_type() == at::kFloat);
  if (f32) {
    // micro-kernel path (rows read through perm, dX rows updated in place, nothing gathered):
    //   dS = s·dY·B_a (shrink against B_aᵀ), dX += dS·A_a (expand), dA = dSᵀ·x, dBᵀ = s·Sᵀ·dY (outer)
    const auto xc = xd.stride(1) == 1 ? xd : xd.contiguous();
    const auto dyc = dyd.stride(1) == 1 ? dyd : dyd.contiguous();
    const auto Sc = Sd.contiguous();
    const auto Ac = A.stride(2) == 1 ? A : A.contiguous();
    at::Tensor Bt = (lora_B_t.has_value() && lora_B_t->defined()) ? lora_B_t->detach()
                                                                   : active_b_transposed(B, segs);
    check_b_t(Bt, B);
    if (need_dx) TORCH_CHECK_VALUE(dx.stride(1) == 1, "multi_lora: dx must have unit column stride");
    const int64_t K = xc.size(1), N = dyc.size(1), R = A.size(1);
    const int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, G, 1, [&](int64_t gb, int64_t ge) {
      std::vector<float> dS, dBt;
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t a = segs.slots[g], r = segs.ranks[a], b = segs.starts[g], n = segs.starts[g + 1] - b;
        if (r <= 0 || n == 0) continue;
        const float sc = static_cast<float>(segs.scal[a]);
        const int64_t* rows = ip + b;
        if (need_db) {  // dB_a[:, :r] = s·dYᵀ·S, computed as its transpose [r, N] and copied in
          dBt.assign(static_cast<size_t>(r * N), 0.f);
          outer_f32(dBt.data(), N, r, dyc.data_ptr<float>(), dyc.stride(0), rows, n, Sc.data_ptr<float>() + b * R, R,
                    sc, N);
          float* dBa = dB.data_ptr<float>() + a * dB.stride(0);
          for (int64_t j = 0; j < r; ++j)
            for (int64_t q = 0; q < N; ++q) dBa[q * dB.stride(1) + j] = dBt[j * N + q];
        }
        if (!need_da && !need_dx) continue;
        dS.assign(static_cast<size_t>(n * r), 0.f);
        shrink_f32(dyc.data_ptr<float>(), dyc.stride(0), rows, n, Bt.data_ptr<float>() + a * Bt.stride(0), Bt.stride(1),
                   r, N, dS.data(), r);
        for (auto& v : dS) v *= sc;
        if (need_da)
          outer_f32(dA.data_ptr<float>() + a * dA.stride(0), dA.stride(1), r, xc.data_ptr<float>(), xc.stride(0), rows,
                    n, dS.data(), r, 1.f, K);
        if (need_dx) {
          // dX rows are unique to this segment; expand adds dS·A_a into them
          expand_t_f32(dx.data_ptr<float>(), dx.stride(0), rows, n, dS.data(), r, 1.f,
                       Ac.data_ptr<float>() + a * Ac.stride(0), Ac.stride(1), r, K);
        }
      }
    });
    return {dA, dB};
  }
  // as in the forward: each segment adds its dX rows into its own rows of dx (add_rows)
  const int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, G, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t a = segs.slots[g], r = segs.ranks[a], b = segs.starts[g], n = segs.starts[g + 1] - b;
      if (r <= 0 || n == 0) continue;
      const double sc = segs.scal[a];
      const auto rows = idx.narrow(0, b, n);
      auto dyg = dyd.index_select(0, rows);
      if (dyg.scalar_type() != cdt) dyg = dyg.to(cdt);
      if (need_db) {
        auto Ssc = Sd.narrow(0, b, n).narrow(1, 0, r).mul(sc);
        if (Ssc.scalar_type() != cdt) Ssc = Ssc.to(cdt);
        dB[a].narrow(1, 0, r).copy_(at::mm(dyg.t(), Ssc));
      }
      if (!need_da && !need_dx) continue;
      auto dS = at::mm(dyg, B[a].narrow(1, 0, r)).mul_(sc);  // [n, r]
      if (need_da) {
        auto xg = xd.index_select(0, rows);
        if (xg.scalar_type() != cdt) xg = xg.to(cdt);
        auto dAa = dA[a].narrow(0, 0, r);
        at::mm_out(dAa, dS.t(), xg);
      }
      if (need_dx) {
        add_rows(dx, ip + b, n, at::mm(dS, A[a].narrow(0, 0, r)));
      }
    }
  });
  return {dA, dB};
}

// Group T tokens by adapter id with a stable counting sort, O(T + S). Ids outside [0, S) (-1 = no
// adapter) are left out. Returns (perm, pos_slots, seg_slots, seg_starts) as int32 and the sorted
// distinct ids outside [-1, S) (for the caller's error message).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_by_adapter(const at::Tensor& ids,
                                                                                        int64_t num_slots) {
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.dim() == 1, "group_by_adapter: ids must be a 1-D CPU tensor");
  TORCH_CHECK_TYPE(!ids.is_floating_point() && !ids.is_complex() && ids.scalar_type() != at::kBool,
                   "group_by_adapter: ids must be an integer tensor, got ", ids.scalar_type());
  // a count per slot is allocated; the outputs are int32
  TORCH_CHECK_VALUE(num_slots >= 1 && num_slots <= (int64_t{1} << 24), "group_by_adapter: num_slots must be in [1, ",
                    int64_t{1} << 24, "], got ", num_slots);
  TORCH_CHECK_VALUE(ids.numel() <= std::numeric_limits<int32_t>::max(), "group_by_adapter: at most 2^31-1 ids, got ",
                    ids.numel());
  const auto id = ids.to(at::kLong).contiguous();
  const int64_t T = id.numel();
  const int64_t* p = id.data_ptr<int64_t>();
  std::vector<int64_t> count(num_slots + 1, 0);
  std::vector<int64_t> bad;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t v = p[t];
    if (v >= 0 && v < num_slots) ++count[v + 1];
    else if (v != -1) bad.push_back(v);
  }
  std::sort(bad.begin(), bad.end());
  bad.erase(std::unique(bad.begin(), bad.end()), bad.end());
  std::vector<int64_t> offset(num_slots + 1, 0);
  int64_t G = 0;
  for (int64_t a = 0; a < num_slots; ++a) {
    offset[a + 1] = offset[a] + count[a + 1];
    if (count[a + 1]) ++G;
  }
  const int64_t Ta = offset[num_slots];
  auto opts = at::TensorOptions().dtype(at::kInt);
  auto perm = at::empty({Ta}, opts), pos_slots = at::empty({Ta}, opts);
  auto seg_slots = at::empty({G}, opts), seg_starts = at::empty({G + 1}, opts);
  int32_t* pp = perm.data_ptr<int32_t>();
  int32_t* ps = pos_slots.data_ptr<int32_t>();
  std::vector<int64_t> cursor(offset.begin(), offset.end() - 1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t v = p[t];
    if (v >= 0 && v < num_slots) {
      const int64_t at_ = cursor[v]++;
      pp[at_] = static_cast<int32_t>(t);
      ps[at_] = static_cast<int32_t>(v);
    }
  }
  int32_t* gs = seg_slots.data_ptr<int32_t>();
  int32_t* gt = seg_starts.data_ptr<int32_t>();
  int64_t g = 0;
  gt[0] = 0;
  for (int64_t a = 0; a < num_slots; ++a)
    if (count[a + 1]) {
      gs[g] = static_cast<int32_t>(a);
      gt[++g] = static_cast<int32_t>(offset[a + 1]);
    }
  auto bad_t = at::empty({static_cast<int64_t>(bad.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(bad.begin(), bad.end(), bad_t.data_ptr<int64_t>());
  return {perm, pos_slots, seg_slots, seg_starts, bad_t};
}

}  // namespace cpu
}  // namespace peft_kernels
