// TORCH_LIBRARY schemas for peft_kernels' compiled ops, with the CPU implementations
// (the CUDA ones are registered in csrc/cuda/ops_cuda.cpp when the extension is built with CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "peft_kernels/cpu_isa.h"

namespace peft_kernels {
namespace cpu {
at::Tensor dropout_keep_mask(int64_t M, int64_t K, int64_t k0, int64_t k1, int64_t k2, int64_t thr,
                             int64_t offset);
at::Tensor lora_dropout_shrink(const at::Tensor& x, const at::Tensor& A, int64_t k0, int64_t k1, int64_t k2,
                               int64_t thr);
at::Tensor hash_dropout(const at::Tensor& x, int64_t k0, int64_t k1, int64_t k2, int64_t thr, double scale);
std::vector<at::Tensor> lora_dropout_shrink_group(const at::Tensor& x, at::TensorList As, at::IntArrayRef keys);
std::tuple<at::Tensor, std::vector<at::Tensor>> lora_dropout_bwd_group(at::TensorList dS, const at::Tensor& x,
                                                                       at::TensorList As, at::IntArrayRef keys,
                                                                       bool need_dx, at::IntArrayRef need_da);
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
at::Tensor bgmv_shrink(const at::Tensor& x, const at::Tensor& w, const at::Tensor& perm, const at::Tensor& pos_slots,
                       const at::Tensor& ranks, const c10::optional<at::Tensor>& scalings);
void bgmv_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& w, const at::Tensor& perm,
                 const at::Tensor& pos_slots, const at::Tensor& ranks, const c10::optional<at::Tensor>& scalings);
at::Tensor sgmv_shrink(const at::Tensor& x, const at::Tensor& w, const at::Tensor& perm, const at::Tensor& seg_slots,
                       const at::Tensor& seg_starts, const at::Tensor& ranks,
                       const c10::optional<at::Tensor>& scalings, int64_t max_count);
void sgmv_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& w, const at::Tensor& perm,
                 const at::Tensor& seg_slots, const at::Tensor& seg_starts, const at::Tensor& ranks,
                 const c10::optional<at::Tensor>& scalings, int64_t max_count);
void lora_expand(at::Tensor y, const at::Tensor& S, const at::Tensor& B, const c10::optional<at::Tensor>& bias,
                 double scale);
at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                           int64_t blocksize, int64_t N, int64_t K, at::ScalarType dtype);
}  // namespace cpu
}  // namespace peft_kernels

TORCH_LIBRARY(peft_kernels, m) {
  // keep-mask of the torch backend's dropout for element indices offset + m*K + k (tests, debugging)
  m.def("dropout_keep_mask(int M, int K, int k0, int k1, int k2, int thr, int offset=0) -> Tensor");
  // whole-tensor dropout with the same mask: x * (keep ? scale : 0) by flat index (ops/hash_dropout.py)
  m.def("hash_dropout(Tensor x, int k0, int k1, int k2, int thr, float scale) -> Tensor");
  m.def("lora_dropout_shrink(Tensor x, Tensor lora_A, int k0, int k1, int k2, int thr) -> Tensor");
  // (dX, dA); an output not asked for is an empty tensor
  m.def("lora_dropout_bwd(Tensor dS, Tensor x, Tensor lora_A, int k0, int k1, int k2, int thr, bool need_dx, "
        "bool need_da) -> (Tensor, Tensor)");
  // the same for members that read one x, each with its own A and mask (keys: k0, k1, k2, thr per member):
  // each member's S; (dX summed over the members, each member's dA where need_da[i] is 1, else empty)
  m.def("lora_dropout_shrink_group(Tensor x, Tensor[] lora_As, int[] keys) -> Tensor[]");
  m.def("lora_dropout_bwd_group(Tensor[] dS, Tensor x, Tensor[] lora_As, int[] keys, bool need_dx, "
        "int[] need_da) -> (Tensor, Tensor[])");
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
  // The gather ops, with CPU (csrc/cpu/lora_gather.cpp) and CUDA (csrc/cuda) kernels. Mapping tensors
  // (int32) as in ops/multi_lora.py's AdapterMapping; w is a weight stack viewed [S, R, K] (shrink) or
  // [S, N, R] (expand) with any strides.
  //   shrink: S[p, r] = s? · Σ_k x[perm[p], k] · w[slot_p, r, k] (r < rank; fp32 [len(perm), R], 0 past rank)
  //   expand: y[perm[p], n] += s? · Σ_{r<rank} S[p, r] · w[slot_p, n, r]
  m.def("bgmv_shrink(Tensor x, Tensor w, Tensor perm, Tensor pos_slots, Tensor ranks, Tensor? scalings) -> Tensor");
  m.def("bgmv_expand(Tensor(a!) y, Tensor S, Tensor w, Tensor perm, Tensor pos_slots, Tensor ranks, "
        "Tensor? scalings) -> ()");
  m.def("sgmv_shrink(Tensor x, Tensor w, Tensor perm, Tensor seg_slots, Tensor seg_starts, Tensor ranks, "
        "Tensor? scalings, int max_count) -> Tensor");
  m.def("sgmv_expand(Tensor(a!) y, Tensor S, Tensor w, Tensor perm, Tensor seg_slots, Tensor seg_starts, "
        "Tensor ranks, Tensor? scalings, int max_count) -> ()");
  // single-adapter LoRA expand epilogue: y += scale · S·Bᵀ (+ bias), S fp32 [M, R], B [N, R]
  m.def("lora_expand(Tensor(a!) y, Tensor S, Tensor B, Tensor? bias, float scale) -> ()");
  // bitsandbytes' 4-bit blockwise weight (NF4/FP4; code: the 16-entry table, absmax fp32 per block) as a
  // [N, K] tensor of dtype (csrc/cpu/dequant.cpp)
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, int N, int K, "
        "ScalarType dtype) -> Tensor");
  // how this library was built: "cpu" or "cuda <archs>" (python -m peft_kernels info)
  m.def("build_info() -> str", []() -> std::string {
#ifdef PK_WITH_CUDA
#define PK_STR(...) #__VA_ARGS__
#define PK_XSTR(...) PK_STR(__VA_ARGS__)
    return std::string("cuda ") + PK_XSTR(PK_CUDA_ARCHS);
#else
    return "cpu";
#endif
  });
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("lora_dropout_shrink", &peft_kernels::cpu::lora_dropout_shrink);
  m.impl("lora_dropout_bwd", &peft_kernels::cpu::lora_dropout_bwd);
  m.impl("lora_dropout_shrink_group", &peft_kernels::cpu::lora_dropout_shrink_group);
  m.impl("lora_dropout_bwd_group", &peft_kernels::cpu::lora_dropout_bwd_group);
  m.impl("hash_dropout", &peft_kernels::cpu::hash_dropout);
  m.impl("multi_lora_fwd", &peft_kernels::cpu::multi_lora_fwd);
  m.impl("multi_lora_bwd", &peft_kernels::cpu::multi_lora_bwd);
  m.impl("bgmv_shrink", &peft_kernels::cpu::bgmv_shrink);
  m.impl("bgmv_expand", &peft_kernels::cpu::bgmv_expand);
  m.impl("sgmv_shrink", &peft_kernels::cpu::sgmv_shrink);
  m.impl("sgmv_expand", &peft_kernels::cpu::sgmv_expand);
  m.impl("lora_expand", &peft_kernels::cpu::lora_expand);
  m.impl("group_by_adapter", &peft_kernels::cpu::group_by_adapter);
  m.impl("dequantize_4bit", &peft_kernels::cpu::dequantize_4bit);
}

TORCH_LIBRARY_IMPL(peft_kernels, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep_mask", &peft_kernels::cpu::dropout_keep_mask);
}
