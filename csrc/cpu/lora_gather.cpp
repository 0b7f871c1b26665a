// CPU implementations of the gather ops that csrc/cuda implements for CUDA (same schemas, same
// results): BGMV shrink/expand (per token: at::parallel_for over tokens, fp32 dots), SGMV
// shrink/expand (per segment: the segment's rows gathered once, one GEMM against its adapter) and
// the single-adapter LoRA expand epilogue. fp32 accumulation for every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "peft_kernels/gather_checks.h"

namespace peft_kernels {
namespace cpu {
namespace {

// Σ_i a[i·sa]·b[i·sb] in fp32; contiguous fp32 rows take the vectorized path.
template <typename T>
float dot(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (sa == 1 && sb == 1) {
      return at::vec::map2_reduce_all<float>([](auto x, auto y) { return x * y; },
                                             [](auto x, auto y) { return x + y; }, a, b, n);
    }
  }
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<float>(a[i * sa]) * static_cast<float>(b[i * sb]);
  return acc;
}

inline float slot_scale(const c10::optional<at::Tensor>& scalings, int64_t slot) {
  return scalings.has_value() ? scalings->data_ptr<float>()[slot] : 1.f;
}

}  // namespace

at::Tensor bgmv_shrink(const at::Tensor& x, const at::Tensor& w, const at::Tensor& perm, const at::Tensor& pos_slots,
                       const at::Tensor& ranks, const c10::optional<at::Tensor>& scalings) {
  const int64_t R = check_shrink(x, w);
  check_rows(perm, perm.size(0), x);
  check_rows(pos_slots, perm.size(0), x, "pos_slots");
  check_slots(w, ranks, scalings);
  check_mapping_values(perm, x.size(0), &pos_slots, nullptr, nullptr, w.size(0));
  const int64_t T = perm.size(0), KD = x.size(1);
  at::Tensor S = at::zeros({T, R}, x.options().dtype(at::kFloat));
  const int32_t* pm = perm.data_ptr<int32_t>();
  const int32_t* ps = pos_slots.data_ptr<int32_t>();
  const int32_t* rk = ranks.data_ptr<int32_t>();
  float* out = S.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bgmv_shrink", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t slot = ps[p];
        const int64_t rank = std::clamp<int64_t>(rk[slot], 0, R);
        const float s = slot_scale(scalings, slot);
        const scalar_t* row = xp + pm[p] * x.stride(0);
        for (int64_t r = 0; r < rank; ++r) {
          out[p * R + r] = s * dot(row, x.stride(1), wp + slot * w.stride(0) + r * w.stride(1), w.stride(2), KD);
        }
      }
    });
  });
  return S;
}

void bgmv_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& w, const at::Tensor& perm,
                 const at::Tensor& pos_slots, const at::Tensor& ranks, const c10::optional<at::Tensor>& scalings) {
  check_expand(y, S, w);
  check_rows(perm, S.size(0), y);
  check_rows(pos_slots, S.size(0), y, "pos_slots");
  check_slots(w, ranks, scalings);
  check_mapping_values(perm, y.size(0), &pos_slots, nullptr, nullptr, w.size(0));
  const int64_t T = S.size(0), R = S.size(1), ND = y.size(1);
  const int32_t* pm = perm.data_ptr<int32_t>();
  const int32_t* ps = pos_slots.data_ptr<int32_t>();
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const float* sp = S.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bgmv_expand", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    // each sorted position is a different token, so the rows written never overlap
    at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t slot = ps[p];
        const int64_t rank = std::clamp<int64_t>(rk[slot], 0, R);
        if (rank == 0) continue;
        const float s = slot_scale(scalings, slot);
        scalar_t* out = yp + pm[p] * y.stride(0);
        for (int64_t n = 0; n < ND; ++n) {
          const scalar_t* wr = wp + slot * w.stride(0) + n * w.stride(1);
          float acc = 0.f;
          for (int64_t r = 0; r < rank; ++r) acc += sp[p * R + r] * static_cast<float>(wr[r * w.stride(2)]);
          scalar_t& o = out[n * y.stride(1)];
          o = static_cast<scalar_t>(static_cast<float>(o) + s * acc);
        }
      }
    });
  });
}

at::Tensor sgmv_shrink(const at::Tensor& x, const at::Tensor& w, const at::Tensor& perm, const at::Tensor& seg_slots,
                       const at::Tensor& seg_starts, const at::Tensor& ranks,
                       const c10::optional<at::Tensor>& scalings, int64_t max_count) {
  const int64_t R = check_shrink(x, w);
  check_rows(perm, perm.size(0), x);
  check_segments(seg_slots, seg_starts, x);
  check_slots(w, ranks, scalings);
  check_mapping_values(perm, x.size(0), nullptr, &seg_slots, &seg_starts, w.size(0));
  TORCH_CHECK_VALUE(max_count >= 0, "max_count must be ≥ 0");
  at::Tensor S = at::zeros({perm.size(0), R}, x.options().dtype(at::kFloat));
  const int32_t* st = seg_starts.data_ptr<int32_t>();
  const int32_t* sl = seg_slots.data_ptr<int32_t>();
  const at::Tensor perm64 = perm.to(at::kLong);
  for (int64_t g = 0; g < seg_slots.size(0); ++g) {  // each GEMM is parallel inside
    const int64_t slot = sl[g], a = st[g], b = st[g + 1];
    const int64_t rank = std::clamp<int64_t>(ranks.data_ptr<int32_t>()[slot], 0, R);
    if (rank == 0 || b == a) continue;
    at::Tensor rows = x.index_select(0, perm64.slice(0, a, b)).to(at::kFloat);       // [n, KD]
    at::Tensor wg = w.select(0, slot).slice(0, 0, rank).to(at::kFloat);              // [rank, KD]
    S.slice(0, a, b).slice(1, 0, rank).copy_(at::mm(rows, wg.t()).mul_(slot_scale(scalings, slot)));
  }
  return S;
}

void sgmv_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& w, const at::Tensor& perm,
                 const at::Tensor& seg_slots, const at::Tensor& seg_starts, const at::Tensor& ranks,
                 const c10::optional<at::Tensor>& scalings, int64_t max_count) {
  check_expand(y, S, w);
  check_rows(perm, S.size(0), y);
  check_segments(seg_slots, seg_starts, y);
  check_slots(w, ranks, scalings);
  check_mapping_values(perm, y.size(0), nullptr, &seg_slots, &seg_starts, w.size(0));
  TORCH_CHECK_VALUE(max_count >= 0, "max_count must be ≥ 0");
  const int64_t R = S.size(1);
  const int32_t* st = seg_starts.data_ptr<int32_t>();
  const int32_t* sl = seg_slots.data_ptr<int32_t>();
  const at::Tensor perm64 = perm.to(at::kLong);
  for (int64_t g = 0; g < seg_slots.size(0); ++g) {
    const int64_t slot = sl[g], a = st[g], b = st[g + 1];
    const int64_t rank = std::clamp<int64_t>(ranks.data_ptr<int32_t>()[slot], 0, R);
    if (rank == 0 || b == a) continue;
    at::Tensor idx = perm64.slice(0, a, b);
    at::Tensor upd = at::mm(S.slice(0, a, b).slice(1, 0, rank), w.select(0, slot).slice(1, 0, rank).to(at::kFloat).t());
    upd.mul_(slot_scale(scalings, slot)).add_(y.index_select(0, idx).to(at::kFloat));
    y.index_copy_(0, idx, upd.to(y.scalar_type()));  // y + s·S·Wᵀ rounded once, as the CUDA kernel does
  }
}

void lora_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& B, const c10::optional<at::Tensor>& bias,
                 double scale) {
  TORCH_CHECK_VALUE(B.dim() == 2, "B must be 2-D [out_features, rank], got ", B.dim(), " dims");
  check_expand(y, S, B.unsqueeze(0));
  TORCH_CHECK_VALUE(S.size(0) == y.size(0), "S must have y's rows (", y.size(0), "), got ", S.size(0));
  at::Tensor upd = at::mm(S, B.to(at::kFloat).t()).mul_(scale).add_(y.to(at::kFloat));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == y.size(1), "bias must be [", y.size(1), "]");
    TORCH_CHECK_TYPE(bias->scalar_type() == y.scalar_type(), "bias dtype must match y's");
    upd.add_(bias->to(at::kFloat));
  }
  y.copy_(upd);
}

}  // namespace cpu
}  // namespace peft_kernels
