// The process-wide choice of CPU micro-kernel variant (see include/peft_kernels/cpu_isa.h).
#include "peft_kernels/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace peft_kernels {
namespace cpu {
namespace {
const char* const kIsaNames[] = {"base", "avx2", "avx512"};
std::atomic<int> g_isa{-1};
}  // namespace

int best_isa() {
#if PK_MULTI_ISA
  if (__builtin_cpu_supports("avx512f")) return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
#endif
  return kIsaBase;
}

int active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = best_isa();
    g_isa.store(v, std::memory_order_relaxed);
  }
  return v;
}

std::string cpu_isa(const std::string& isa) {
  const int prev = active_isa();
  if (isa.empty()) return kIsaNames[prev];
  int want = -1;
  if (isa == "auto") want = best_isa();
  for (int i = 0; i < 3; ++i)
    if (isa == kIsaNames[i]) want = i;
  TORCH_CHECK(want >= 0, "cpu_isa: expected one of 'auto', 'avx512', 'avx2', 'base', got '", isa, "'");
  TORCH_CHECK(want <= best_isa(), "cpu_isa: this CPU (or build) does not support '", isa, "'; the best is '",
              kIsaNames[best_isa()], "'");
  g_isa.store(want, std::memory_order_relaxed);
  return kIsaNames[prev];
}

}  // namespace cpu
}  // namespace peft_kernels
