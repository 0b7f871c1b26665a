// Which instruction-set variant of the CPU micro-kernels runs.
//
// Hot loops are written once, as always-inline bodies, and compiled three times on x86-64 with GCC:
// for AVX-512, for AVX2+FMA and for baseline x86-64. The best variant the CPU supports runs;
// `torch.ops.peft_kernels.cpu_isa(name)` pins a lower one, so the tests run every variant the
// machine can execute (a variant that is never run is a variant that can be silently wrong).
#pragma once

#include <string>

namespace peft_kernels {
namespace cpu {
enum Isa : int { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
int best_isa();    // the best variant this CPU (and build) supports
int active_isa();  // the variant that runs now
// "" → the current name; "auto" → the best; "avx512" | "avx2" | "base" → that one. Returns the previous name.
std::string cpu_isa(const std::string& isa);
}  // namespace cpu
}  // namespace peft_kernels

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PK_MULTI_ISA 1
#else
#define PK_MULTI_ISA 0
#endif
#define PK_BODY static inline __attribute__((always_inline))

// PK_ISA_VARIANTS(name, (params), (args)) defines `name` from `name##_body`, one copy per ISA,
// dispatching on active_isa(). A file whose bodies are templates defines PK_T512 / PK_T256 / PK_T128
// as their template arguments (register blocks that fit each ISA's register file) before using it;
// otherwise they are empty.
#ifndef PK_T512
#define PK_T512
#define PK_T256
#define PK_T128
#endif
#if PK_MULTI_ISA
#define PK_ISA_VARIANTS(name, params, args)                                                        \
  __attribute__((target("avx512f"))) void name##_avx512 params { name##_body PK_T512 args; }         \
  __attribute__((target("avx2,fma"))) void name##_avx2 params { name##_body PK_T256 args; }          \
  void name##_base params { name##_body PK_T128 args; }                                             \
  void name params {                                                                                \
    switch (::peft_kernels::cpu::active_isa()) {                                                    \
      case ::peft_kernels::cpu::kIsaAvx512: name##_avx512 args; break;                              \
      case ::peft_kernels::cpu::kIsaAvx2: name##_avx2 args; break;                                  \
      default: name##_base args;                                                                    \
    }                                                                                               \
  }
#else
#define PK_ISA_VARIANTS(name, params, args) \
  void name params { name##_body PK_T128 args; }
#endif
