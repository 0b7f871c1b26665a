// TORCH_LIBRARY schemas for peft_kernels' compiled ops, with the CPU implementations.
// (The CUDA kernels and their registrations are a later milestone.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "peft_kernels/cpu_isa.h"

namespace peft_kernels {
namespace cpu {
at::Tensor dropout_keep_mask(int64_t M, int64_t K, int64_t k0, int64_t k1, int64_t k2, int64_t thr,
                             int64_t offset);
at::Tensor lora_dropout_shrink(const at::Tensor& x, const at::Tensor& A, int64_t k0, int64_t k1, int64_t k2,
                               int64_t thr);
std::tuple<at::Tensor, at::Tensor> lora_dropout_bwd(const at::Tensor& dS, const at::Tensor& x, const at::Tensor& A,
                                                    int64_t k0, int64_t k1, int64_t k2, int64_t thr, bool need_dx,
                                                    bool need_da);
at::Tensor multi_lora_fwd(at::Tensor y, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                          const at::Tensor& perm, const at::Tensor& seg_slots, const at::Tensor& seg_starts,
                          const at::Tensor& ranks, const at::Tensor& scalings,
                          const c10::optional<at::Tensor>& lora_B_t);
std::tuple<at::Tensor, at::Tensor> multi_lora_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& S,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  const at::Tensor& perm, const at::Tensor& seg_slots,
                                                  const at::Tensor& seg_starts, const at::Tensor& ranks,
                                                  const at::Tensor& scalings, const c10::optional<at::Tensor>& dx,
                                                  bool need_da, bool need_db,
                                                  const c10::optional<at::Tensor>& lora_B_t);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_by_adapter(const at::Tensor& ids,
                                                                                        int64_t num_slots);
}  // namespace cpu
}  // namespace peft_kernels

TORCH_LIBRARY(peft_kernels, m) {
  // keep-mask of the torch backend's dropout for element indices offset + m*K + k (tests, debugging)
  m.def("dropout_keep_mask(int M, int K, int k0, int k1, int k2, int thr, int offset=0) -> Tensor");
  m.def("lora_dropout_shrink(Tensor x, Tensor lora_A, int k0, int k1, int k2, int thr) -> Tensor");
  // (dX, dA); an output not asked for is an empty tensor
  m.def("lora_dropout_bwd(Tensor dS, Tensor x, Tensor lora_A, int k0, int k1, int k2, int thr, bool need_dx, "
        "bool need_da) -> (Tensor, Tensor)");
  // multi-adapter LoRA over tokens grouped by adapter (perm, seg_slots, seg_starts: ops/multi_lora.py's
  // AdapterMapping): adds the LoRA updates into y in place, returns the shrink S [T_active, R]
  m.def("multi_lora_fwd(Tensor(a!) y, Tensor x, Tensor lora_A, Tensor lora_B, Tensor perm, Tensor seg_slots, "
        "Tensor seg_starts, Tensor ranks, Tensor scalings, Tensor? lora_B_t=None) -> Tensor");
  // which variant of the fp32 CPU micro-kernels runs (tests pin each one): returns the previous name
  m.def("cpu_isa(str isa=\"\") -> str", [](std::string isa) { return peft_kernels::cpu::cpu_isa(isa); });
  // stable counting sort of tokens by adapter id: (perm, pos_slots, seg_slots, seg_starts, invalid ids)
  m.def("group_by_adapter(Tensor ids, int num_slots) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // adds the LoRA part of dX into dx (when given) in place; returns (dA, dB), empty when not asked for
  m.def("multi_lora_bwd(Tensor dy, Tensor x, Tensor S, Tensor lora_A, Tensor lora_B, Tensor perm, "
        "Tensor seg_slots, Tensor seg_starts, Tensor ranks, Tensor scalings, Tensor(a!)? dx, bool need_da, "
        "bool need_db, Tensor? lora_B_t=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("lora_dropout_shrink", &peft_kernels::cpu::lora_dropout_shrink);
  m.impl("lora_dropout_bwd", &peft_kernels::cpu::lora_dropout_bwd);
  m.impl("multi_lora_fwd", &peft_kernels::cpu::multi_lora_fwd);
  m.impl("multi_lora_bwd", &peft_kernels::cpu::multi_lora_bwd);
  m.impl("group_by_adapter", &peft_kernels::cpu::group_by_adapter);
}

TORCH_LIBRARY_IMPL(peft_kernels, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep_mask", &peft_kernels::cpu::dropout_keep_mask);
}
