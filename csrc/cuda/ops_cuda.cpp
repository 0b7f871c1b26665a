// CUDA implementations of the gather ops (schemas in csrc/ops.cpp): argument checks shared with the
// CPU kernels, then the raw-pointer launchers of csrc/cuda/*.cu on the current stream. Compiled only
// into the CUDA build of peft_kernels._C (setup.py's CUDAExtension).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "peft_kernels/cuda_kernels.h"
#include "peft_kernels/gather_checks.h"

namespace peft_kernels {
namespace cuda_ops {
namespace {

using cuda::DType;
using cuda::Mapping;
using cuda::WeightStack;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

void ok(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "peft_kernels.", op, ": CUDA error ", static_cast<int>(e), " (",
              cudaGetErrorString(e), ")");
}

WeightStack stack(const at::Tensor& w) { return {w.data_ptr(), w.stride(0), w.stride(1), w.stride(2)}; }

Mapping mapping(const at::Tensor& perm, const at::Tensor* pos_slots, const at::Tensor* seg_slots,
                const at::Tensor* seg_starts, const at::Tensor& ranks, const c10::optional<at::Tensor>& scalings,
                int64_t max_count, int64_t num_rows) {
  Mapping m{};
  m.num_rows = num_rows;
  m.num_slots = ranks.size(0);
  m.perm = perm.data_ptr<int32_t>();
  m.pos_slots = pos_slots ? pos_slots->data_ptr<int32_t>() : nullptr;
  m.seg_slots = seg_slots ? seg_slots->data_ptr<int32_t>() : nullptr;
  m.seg_starts = seg_starts ? seg_starts->data_ptr<int32_t>() : nullptr;
  m.ranks = ranks.data_ptr<int32_t>();
  m.scalings = scalings.has_value() ? scalings->data_ptr<float>() : nullptr;
  m.num_active = perm.size(0);
  m.num_segments = seg_slots ? seg_slots->size(0) : 0;
  m.max_count = max_count;
  return m;
}

at::Tensor bgmv_shrink(const at::Tensor& x, const at::Tensor& w, const at::Tensor& perm, const at::Tensor& pos_slots,
                       const at::Tensor& ranks, const c10::optional<at::Tensor>& scalings) {
  check_cuda(x, "x");
  const int64_t R = check_shrink(x, w);
  check_rows(perm, perm.size(0), x);
  check_rows(pos_slots, perm.size(0), x, "pos_slots");
  check_slots(w, ranks, scalings);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor S = at::zeros({perm.size(0), R}, x.options().dtype(at::kFloat));
  ok(cuda::bgmv_shrink(dtype_of(x), x.data_ptr(), x.stride(0), x.stride(1), stack(w), S.data_ptr<float>(), x.size(1),
                       R, mapping(perm, &pos_slots, nullptr, nullptr, ranks, scalings, 0, x.size(0)),
                       c10::cuda::getCurrentCUDAStream()),
     "bgmv_shrink");
  return S;
}

void bgmv_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& w, const at::Tensor& perm,
                 const at::Tensor& pos_slots, const at::Tensor& ranks, const c10::optional<at::Tensor>& scalings) {
  check_cuda(y, "y");
  check_expand(y, S, w);
  check_rows(perm, S.size(0), y);
  check_rows(pos_slots, S.size(0), y, "pos_slots");
  check_slots(w, ranks, scalings);
  c10::cuda::CUDAGuard guard(y.device());
  ok(cuda::bgmv_expand(dtype_of(y), S.data_ptr<float>(), stack(w), y.data_ptr(), y.stride(0), y.stride(1), y.size(1),
                       S.size(1), mapping(perm, &pos_slots, nullptr, nullptr, ranks, scalings, 0, y.size(0)),
                       c10::cuda::getCurrentCUDAStream()),
     "bgmv_expand");
}

at::Tensor sgmv_shrink(const at::Tensor& x, const at::Tensor& w, const at::Tensor& perm, const at::Tensor& seg_slots,
                       const at::Tensor& seg_starts, const at::Tensor& ranks,
                       const c10::optional<at::Tensor>& scalings, int64_t max_count) {
  check_cuda(x, "x");
  const int64_t R = check_shrink(x, w);
  check_rows(perm, perm.size(0), x);
  check_segments(seg_slots, seg_starts, x);
  check_slots(w, ranks, scalings);
  TORCH_CHECK_VALUE(max_count >= 0, "max_count must be ≥ 0");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor S = at::zeros({perm.size(0), R}, x.options().dtype(at::kFloat));
  ok(cuda::sgmv_shrink(dtype_of(x), x.data_ptr(), x.stride(0), x.stride(1), stack(w), S.data_ptr<float>(), x.size(1),
                       R, mapping(perm, nullptr, &seg_slots, &seg_starts, ranks, scalings, max_count, x.size(0)),
                       c10::cuda::getCurrentCUDAStream()),
     "sgmv_shrink");
  return S;
}

void sgmv_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& w, const at::Tensor& perm,
                 const at::Tensor& seg_slots, const at::Tensor& seg_starts, const at::Tensor& ranks,
                 const c10::optional<at::Tensor>& scalings, int64_t max_count) {
  check_cuda(y, "y");
  check_expand(y, S, w);
  check_rows(perm, S.size(0), y);
  check_segments(seg_slots, seg_starts, y);
  check_slots(w, ranks, scalings);
  TORCH_CHECK_VALUE(max_count >= 0, "max_count must be ≥ 0");
  c10::cuda::CUDAGuard guard(y.device());
  ok(cuda::sgmv_expand(dtype_of(y), S.data_ptr<float>(), stack(w), y.data_ptr(), y.stride(0), y.stride(1), y.size(1),
                       S.size(1), mapping(perm, nullptr, &seg_slots, &seg_starts, ranks, scalings, max_count, y.size(0)),
                       c10::cuda::getCurrentCUDAStream()),
     "sgmv_expand");
}

void lora_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& B, const c10::optional<at::Tensor>& bias,
                 double scale) {
  check_cuda(y, "y");
  TORCH_CHECK_VALUE(B.dim() == 2, "B must be 2-D [out_features, rank], got ", B.dim(), " dims");
  check_expand(y, S, B.unsqueeze(0));
  TORCH_CHECK_VALUE(S.size(0) == y.size(0), "S must have y's rows (", y.size(0), "), got ", S.size(0));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == y.size(1) && bias->is_contiguous(),
                      "bias must be a contiguous [", y.size(1), "] tensor");
    TORCH_CHECK_TYPE(bias->scalar_type() == y.scalar_type(), "bias dtype must match y's");
  }
  c10::cuda::CUDAGuard guard(y.device());
  ok(cuda::lora_expand(dtype_of(y), S.data_ptr<float>(), B.data_ptr(), B.stride(0), B.stride(1),
                       bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), y.stride(0), y.stride(1),
                       y.size(0), y.size(1), S.size(1), static_cast<float>(scale), c10::cuda::getCurrentCUDAStream()),
     "lora_expand");
}

}  // namespace
}  // namespace cuda_ops
}  // namespace peft_kernels

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("bgmv_shrink", &peft_kernels::cuda_ops::bgmv_shrink);
  m.impl("bgmv_expand", &peft_kernels::cuda_ops::bgmv_expand);
  m.impl("sgmv_shrink", &peft_kernels::cuda_ops::sgmv_shrink);
  m.impl("sgmv_expand", &peft_kernels::cuda_ops::sgmv_expand);
  m.impl("lora_expand", &peft_kernels::cuda_ops::lora_expand);
}
