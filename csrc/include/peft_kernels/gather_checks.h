// Argument checks shared by the CPU (csrc/cpu/lora_gather.cpp) and CUDA (csrc/cuda/ops_cuda.cpp)
// implementations of the gather ops (bgmv_*/sgmv_*/lora_expand). TORCH_CHECK_TYPE / TORCH_CHECK_VALUE
// surface in Python as TypeError / ValueError naming the argument.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace peft_kernels {

inline bool is_kernel_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device(), " but the data is on ", like.device());
}

// The per-slot metadata: ranks int32 [S], scalings fp32 [S] or none.
inline void check_slots(const at::Tensor& w, const at::Tensor& ranks, const c10::optional<at::Tensor>& scalings) {
  check_index(ranks, "ranks", w);
  TORCH_CHECK_VALUE(ranks.size(0) == w.size(0), "ranks must have one entry per slot (", w.size(0), "), got ",
                    ranks.size(0));
  if (scalings.has_value()) {
    const at::Tensor& s = *scalings;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "scalings must be float32, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == w.size(0) && s.is_contiguous(),
                      "scalings must be a contiguous [", w.size(0), "] tensor");
    TORCH_CHECK_VALUE(s.device() == w.device(), "scalings is on ", s.device(), " but the data is on ", w.device());
  }
}

// shrink: x [T, KD], w [S, R, KD] (any strides), returns R.
inline int64_t check_shrink(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK_TYPE(is_kernel_float(x), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "w dtype ", w.scalar_type(), " must match x's ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [tokens, in_features], got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(2) == x.size(1), "w must be [slots, rank, ", x.size(1), "], got ",
                    w.sizes());
  TORCH_CHECK_VALUE(w.device() == x.device(), "w is on ", w.device(), " but x is on ", x.device());
  return w.size(1);
}

// A 2-D tensor an op writes in place must have no two elements at one address (an expand()ed or
// as_strided tensor): threads writing different rows would race on one memory location, and torch's own
// in-place ops refuse such a tensor. The test: positive strides, and the outer dim steps over the whole
// inner one.
inline void check_disjoint_2d(const at::Tensor& t, const char* name) {
  const int64_t n0 = t.size(0), n1 = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  bool ok = true;
  if (n0 > 1 && n1 > 1)
    ok = s1 <= s0 ? (s1 >= 1 && s0 >= n1 * s1) : (s0 >= 1 && s1 >= n0 * s0);
  else if (n0 > 1)
    ok = s0 >= 1;
  else if (n1 > 1)
    ok = s1 >= 1;
  TORCH_CHECK_VALUE(ok, name, " is written in place, so no two of its elements may share memory (an expanded or "
                    "as_strided tensor); got sizes ", t.sizes(), " and strides ", t.strides(), ": pass a tensor of its "
                    "own (e.g. .clone())");
}

// expand: y [T, ND] (updated in place), S fp32 [T_active, R], w [S, ND, R] (any strides).
inline void check_expand(const at::Tensor& y, const at::Tensor& S, const at::Tensor& w) {
  TORCH_CHECK_TYPE(is_kernel_float(y), "y must be float32, float16 or bfloat16, got ", y.scalar_type());
  TORCH_CHECK_TYPE(w.scalar_type() == y.scalar_type(), "w dtype ", w.scalar_type(), " must match y's ",
                   y.scalar_type());
  TORCH_CHECK_TYPE(S.scalar_type() == at::kFloat, "S must be float32, got ", S.scalar_type());
  TORCH_CHECK_VALUE(y.dim() == 2, "y must be 2-D [tokens, out_features], got ", y.dim(), " dims");
  check_disjoint_2d(y, "y");
  TORCH_CHECK_VALUE(S.dim() == 2 && S.is_contiguous(), "S must be a contiguous 2-D [tokens, rank] tensor");
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(1) == y.size(1) && w.size(2) == S.size(1), "w must be [slots, ",
                    y.size(1), ", ", S.size(1), "], got ", w.sizes());
  TORCH_CHECK_VALUE(w.device() == y.device() && S.device() == y.device(), "y, S and w must be on one device");
}

inline void check_rows(const at::Tensor& perm, int64_t t_active, const at::Tensor& like, const char* name = "perm") {
  check_index(perm, name, like);
  TORCH_CHECK_VALUE(perm.size(0) == t_active, name, " must have one entry per sorted position (", t_active, "), got ",
                    perm.size(0));
}

inline void check_segments(const at::Tensor& seg_slots, const at::Tensor& seg_starts, const at::Tensor& like) {
  check_index(seg_slots, "seg_slots", like);
  check_index(seg_starts, "seg_starts", like);
  TORCH_CHECK_VALUE(seg_starts.size(0) == seg_slots.size(0) + 1, "seg_starts must have len(seg_slots) + 1 entries");
}

// The values of the mapping tensors, read on the host: what the CPU kernels trust before they index with them.
// (The CUDA kernels cannot read them without a host sync; they guard every index on the device instead.)
// perm: distinct rows of a [n_rows, ...] tensor (two writers of one row would race). O(len(perm) + n_rows).
inline void check_perm_values(const at::Tensor& perm, int64_t n_rows) {
  const int32_t* p = perm.data_ptr<int32_t>();
  std::vector<uint8_t> seen(static_cast<size_t>(n_rows), 0);
  for (int64_t i = 0; i < perm.size(0); ++i) {
    const int64_t v = p[i];
    TORCH_CHECK_VALUE(v >= 0 && v < n_rows, "perm[", i, "] = ", v, " is not a row index in [0, ", n_rows, ")");
    TORCH_CHECK_VALUE(!seen[v], "perm holds row ", v, " twice (at ", i, "): its entries must be distinct rows");
    seen[v] = 1;
  }
}

// pos_slots / seg_slots: slot indices in [0, n_slots).
inline void check_slot_values(const at::Tensor& t, const char* name, int64_t n_slots) {
  const int32_t* p = t.data_ptr<int32_t>();
  for (int64_t i = 0; i < t.size(0); ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < n_slots, name, "[", i, "] = ", p[i], " is not a slot in [0, ", n_slots,
                      ")");
}

// seg_starts: non-decreasing offsets into perm, from 0 to n_active. O(segments).
inline void check_start_values(const at::Tensor& seg_starts, int64_t n_active) {
  const int32_t* p = seg_starts.data_ptr<int32_t>();
  const int64_t n = seg_starts.size(0);
  TORCH_CHECK_VALUE(p[0] == 0 && p[n - 1] == n_active, "seg_starts must run from 0 to len(perm) = ", n_active,
                    ", got ", p[0], " … ", p[n - 1]);
  for (int64_t g = 0; g + 1 < n; ++g)
    TORCH_CHECK_VALUE(p[g] <= p[g + 1], "seg_starts must be non-decreasing, got ", p[g], " then ", p[g + 1],
                      " at ", g);
}

// A CPU call's whole mapping: perm against the rows of `rows_of`, the slot indices against the weight stack.
inline void check_mapping_values(const at::Tensor& perm, int64_t n_rows, const at::Tensor* pos_slots,
                                 const at::Tensor* seg_slots, const at::Tensor* seg_starts, int64_t n_slots) {
  check_perm_values(perm, n_rows);
  if (pos_slots) check_slot_values(*pos_slots, "pos_slots", n_slots);
  if (seg_slots) check_slot_values(*seg_slots, "seg_slots", n_slots);
  if (seg_starts) check_start_values(*seg_starts, perm.size(0));
}

}  // namespace peft_kernels
