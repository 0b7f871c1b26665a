// Dequantization of bitsandbytes' 4-bit blockwise weights (NF4 and FP4) on the CPU, for the quantized
// frozen bases of peft_kernels/quant.py.
//
//   out[e] = code[q(e)] * absmax[e / blocksize],  e = n*K + k over the row-major [N, K] weight,
//   q(e)   = packed[e/2] >> 4 for even e, packed[e/2] & 15 for odd e   (bitsandbytes' nibble order)
//
// The product is one fp32 rounding, then one round-to-nearest-even conversion to the output dtype: the
// same values bitsandbytes' own dequantize_4bit gives (tests/test_qlora.py checks bit for bit). Blocks
// are independent; threads split them. Double quantization (8-bit absmax) is resolved by the caller,
// which passes the fp32 absmax.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "peft_kernels/cpu_isa.h"

namespace peft_kernels {
namespace cpu {
namespace {

// Two outputs per packed byte, from a 256-entry table of (code[hi], code[lo]) pairs. 2*n floats.
PK_BODY void dequant_pairs_body(const uint8_t* q, const float* pairs, float am, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const int b = q[i];
    out[2 * i] = pairs[2 * b] * am;
    out[2 * i + 1] = pairs[2 * b + 1] * am;
  }
}

PK_ISA_VARIANTS(dequant_pairs, (const uint8_t* q, const float* pairs, float am, float* out, int64_t n),
                (q, pairs, am, out, n))

// Elements [s, t) of one block into out (fp32), any parity.
void dequant_range(const uint8_t* q, const float* code, const float* pairs, float am, float* out, int64_t s,
                   int64_t t) {
  int64_t e = s;
  if (e < t && (e & 1)) {  // a block that starts on a low nibble
    *out++ = code[q[e >> 1] & 15] * am;
    ++e;
  }
  const int64_t nb = (t - e) / 2;
  dequant_pairs(q + (e >> 1), pairs, am, out, nb);
  out += 2 * nb;
  e += 2 * nb;
  if (e < t) *out = code[q[e >> 1] >> 4] * am;  // a trailing high nibble
}

template <typename T>
void convert(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // c10: round to nearest even
}

}  // namespace

at::Tensor dequantize_4bit(const at::Tensor& packed_, const at::Tensor& absmax_, const at::Tensor& code_,
                           int64_t blocksize, int64_t N, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(packed_.device().is_cpu() && absmax_.device().is_cpu() && code_.device().is_cpu(),
                    "peft_kernels.dequantize_4bit: packed, absmax and code must be CPU tensors");
  TORCH_CHECK_TYPE(packed_.scalar_type() == at::kByte, "peft_kernels.dequantize_4bit: packed must be uint8, got ",
                   packed_.scalar_type());
  TORCH_CHECK_TYPE(absmax_.scalar_type() == at::kFloat, "peft_kernels.dequantize_4bit: absmax must be float32, got ",
                   absmax_.scalar_type());
  TORCH_CHECK_TYPE(code_.scalar_type() == at::kFloat, "peft_kernels.dequantize_4bit: code must be float32, got ",
                   code_.scalar_type());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "peft_kernels.dequantize_4bit: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(code_.numel() == 16, "peft_kernels.dequantize_4bit: code must have 16 entries, got ",
                    code_.numel());
  TORCH_CHECK_VALUE(blocksize >= 1, "peft_kernels.dequantize_4bit: blocksize must be >= 1, got ", blocksize);
  TORCH_CHECK_VALUE(N >= 0 && K >= 0, "peft_kernels.dequantize_4bit: N and K must be >= 0, got ", N, ", ", K);
  TORCH_CHECK_VALUE(K == 0 || N <= std::numeric_limits<int64_t>::max() / 2 / K,
                    "peft_kernels.dequantize_4bit: N*K overflows int64");
  const int64_t NK = N * K, nblocks = (NK + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(packed_.numel() >= (NK + 1) / 2, "peft_kernels.dequantize_4bit: packed has ", packed_.numel(),
                    " bytes, a [", N, ", ", K, "] 4-bit weight needs ", (NK + 1) / 2);
  TORCH_CHECK_VALUE(absmax_.numel() >= nblocks, "peft_kernels.dequantize_4bit: absmax has ", absmax_.numel(),
                    " entries, ", nblocks, " blocks of ", blocksize, " need one each");
  const at::Tensor packed = packed_.detach().contiguous(), absmax = absmax_.detach().contiguous(),
                   code = code_.detach().contiguous();
  at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(dtype));
  if (NK == 0) return out;
  const uint8_t* q = packed.data_ptr<uint8_t>();
  const float* am = absmax.data_ptr<float>();
  const float* c = code.data_ptr<float>();
  float pairs[512];
  for (int b = 0; b < 256; ++b) {
    pairs[2 * b] = c[b >> 4];
    pairs[2 * b + 1] = c[b & 15];
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(dtype == at::kFloat ? 0 : static_cast<size_t>(std::min(blocksize, NK)));
    for (int64_t j = b0; j < b1; ++j) {
      const int64_t s = j * blocksize, t = std::min(NK, s + blocksize);
      if (dtype == at::kFloat) {
        dequant_range(q, c, pairs, am[j], out.data_ptr<float>() + s, s, t);
        continue;
      }
      dequant_range(q, c, pairs, am[j], buf.data(), s, t);
      if (dtype == at::kBFloat16)
        convert(buf.data(), out.data_ptr<at::BFloat16>() + s, t - s);
      else
        convert(buf.data(), out.data_ptr<at::Half>() + s, t - s);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace peft_kernels
