// CPU kernels for LoRA with dropout (float32): the mask is generated on the fly from a hash of
// the element index, applied, and consumed in the same pass, so no mask and no dropped copy of x
// is ever materialised.
//   lora_dropout_shrink: S[m, j]  = Σ_k keep(m,k) x[m,k] A[j,k]
//   lora_dropout_dx:     dX[m, k] = keep(m,k) Σ_j dS[m,j] A[j,k]
//   lora_dropout_da:     dA[j, k] = Σ_m dS[m,j] keep(m,k) x[m,k]
// The inverted-dropout scale is folded into S / dS by the caller. Hot loops are compiled for
// AVX-512, AVX2+FMA and baseline x86-64 (include/peft_kernels/cpu_isa.h: the best supported runs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "peft_kernels/dropout_hash.h"

#include "peft_kernels/cpu_isa.h"

namespace peft_kernels {
namespace cpu {
namespace {

// out[k] = keep(base + k) ? x[k] : 0, for k in [0, n); idx = base + k split into 32-bit halves.
// out may be x (masking in place): each element is read before it is written.
PK_BODY void masked_copy_body(const float* x, float* out, int64_t n, uint64_t base, DropoutKeys keys) {
  const uint32_t lo0 = static_cast<uint32_t>(base);
  const uint32_t hi0 = static_cast<uint32_t>(base >> 32);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t lo = lo0 + static_cast<uint32_t>(k);
    const uint32_t hi = hi0 + (lo < lo0 ? 1u : 0u);
    out[k] = dropout_hash(lo, hi, keys) >= keys.thr ? x[k] : 0.0f;
  }
}

PK_ISA_VARIANTS(masked_copy, (const float* x, float* out, int64_t n, uint64_t base, DropoutKeys keys),
                (x, out, n, base, keys))

// out[k] = keep[k] != 0 ? x[k] : 0, for a keep mask (1/0 floats) made by masked_copy: the same values as
// masked_copy(x) gives, without hashing again. out may be x.
PK_BODY void keep_select_body(const float* keep, const float* x, float* out, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = keep[k] != 0.0f ? x[k] : 0.0f;
}

PK_ISA_VARIANTS(keep_select, (const float* keep, const float* x, float* out, int64_t n), (keep, x, out, n))

// acc[k] += keep[k] != 0 ? x[k] : 0 (the same sum as adding keep_select's output to acc).
PK_BODY void keep_select_add_body(const float* keep, const float* x, float* acc, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) acc[k] += keep[k] != 0.0f ? x[k] : 0.0f;
}

PK_ISA_VARIANTS(keep_select_add, (const float* keep, const float* x, float* acc, int64_t n), (keep, x, acc, n))

DropoutKeys make_keys(int64_t k0, int64_t k1, int64_t k2, int64_t thr) {
  TORCH_CHECK_VALUE(k0 >= 0 && k0 < (int64_t(1) << 32) && k1 >= 0 && k1 < (int64_t(1) << 32) && k2 >= 0 &&
                  k2 < (int64_t(1) << 32) && thr >= 0 && thr < (int64_t(1) << 32),
              "peft_kernels: dropout keys and threshold must be uint32 values");
  return DropoutKeys{static_cast<uint32_t>(k0), static_cast<uint32_t>(k1), static_cast<uint32_t>(k2),
                     static_cast<uint32_t>(thr)};
}

void check_f32_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "peft_kernels: ", name, " must be a CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "peft_kernels: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, "peft_kernels: ", name, " must be 2-D, got ", t.dim(), "-D");
}

}  // namespace

// Whole-tensor dropout (peft_kernels.ops.hash_dropout, the model's own dropout layers):
//   y[i] = x[i] * m[i],  m[i] = keep(i) ? scale : 0 (fp32),  i = the flat index of contiguous x,
// the product in x's op-math type (fp32 for half types, fp64 for double), as torch computes
// x * m. Backward is this op on dy with the same keys; no mask is stored. Chunks of 4096
// elements: the factors are generated into a stack buffer (the masked-copy micro-kernel, SIMD)
// and applied while in L1. Threads split chunks; the result does not depend on the split.
at::Tensor hash_dropout(const at::Tensor& x_, int64_t k0, int64_t k1, int64_t k2, int64_t thr, double scale) {
  TORCH_CHECK_VALUE(x_.device().is_cpu(), "peft_kernels: hash_dropout: x must be a CPU tensor, got ", x_.device());
  const auto st = x_.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "peft_kernels: hash_dropout: x must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(scale >= 1.0 && scale < 1e10, "peft_kernels: hash_dropout: scale must be in [1, 1e10), got ",
                    scale);
  const DropoutKeys keys = make_keys(k0, k1, k2, thr);
  const at::Tensor x = x_.detach().contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  constexpr int64_t CH = 4096;
  const float s = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "hash_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + CH - 1) / CH, 16, [&](int64_t b, int64_t e) {
      float fill[CH], fac[CH];
      std::fill(fill, fill + CH, s);
      for (int64_t c = b; c < e; ++c) {
        const int64_t i0 = c * CH, len = std::min(CH, n - i0);
        masked_copy(fill, fac, len, static_cast<uint64_t>(i0), keys);
        for (int64_t k = 0; k < len; ++k)
          op[i0 + k] = static_cast<scalar_t>(static_cast<acc_t>(xp[i0 + k]) * static_cast<acc_t>(fac[k]));
      }
    });
  });
  return out;
}

at::Tensor dropout_keep_mask(int64_t M, int64_t K, int64_t k0, int64_t k1, int64_t k2, int64_t thr,
                             int64_t offset) {
  TORCH_CHECK_VALUE(M >= 0 && K >= 0 && offset >= 0, "peft_kernels: M, K and offset must be >= 0");
  const DropoutKeys keys = make_keys(k0, k1, k2, thr);
  at::Tensor ones = at::ones({K}, at::kFloat);
  at::Tensor out = at::empty({M, K}, at::kFloat);
  float* o = out.data_ptr<float>();
  const float* one = ones.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      masked_copy(one, o + m * K, K, static_cast<uint64_t>(offset) + static_cast<uint64_t>(m) * K, keys);
  });
  return out.to(at::kBool);
}

// Inputs are detached first: at::parallel_for's worker threads do not inherit the caller's
// grad-mode state, and the at::mm_out calls below must never see tensors that require grad.
//
// Row tiles of x are masked into a cache-resident buffer (about 1 MiB) and multiplied there
// (ATen's BLAS), so the dropped copy of x never reaches memory. Tiles are independent: threads
// split them.
static int64_t row_tile(int64_t K) { return std::min<int64_t>(64, std::max<int64_t>(8, (int64_t(1) << 18) / std::max<int64_t>(K, 1))); }

// S_i = (keep_i ⊙ x)·A_iᵀ for each member i (A's and keys given per member): each row tile of x is masked into the
// buffer and multiplied there, member after member while the tile is in cache.
static std::vector<at::Tensor> shrink_tiles(const at::Tensor& x_, const std::vector<at::Tensor>& As,
                                            const std::vector<DropoutKeys>& keys) {
  const at::Tensor x = x_.detach().contiguous();
  const int64_t M = x.size(0), K = x.size(1), n = static_cast<int64_t>(As.size());
  std::vector<at::Tensor> S, At;
  for (int64_t i = 0; i < n; ++i) {
    S.push_back(at::empty({M, As[i].size(0)}, at::kFloat));
    At.push_back(As[i].detach().t());
  }
  const float* xp = x.data_ptr<float>();
  const int64_t TM = row_tile(K), ntiles = (M + TM - 1) / TM;
  at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) {
    at::Tensor buf = at::empty({TM, K}, at::kFloat);
    float* bp = buf.data_ptr<float>();
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = t * TM, rows = std::min(TM, M - m0);
      for (int64_t i = 0; i < n; ++i) {
        // rows m0..m0+rows of contiguous x are element indices m0*K .. (m0+rows)*K - 1: one run
        masked_copy(xp + m0 * K, bp, rows * K, static_cast<uint64_t>(m0) * K, keys[i]);
        at::Tensor out = S[i].narrow(0, m0, rows);
        at::mm_out(out, buf.narrow(0, 0, rows), At[i]);
      }
    }
  });
  return S;
}

at::Tensor lora_dropout_shrink(const at::Tensor& x_, const at::Tensor& A_, int64_t k0, int64_t k1, int64_t k2,
                               int64_t thr) {
  check_f32_2d(x_, "x");
  check_f32_2d(A_, "lora_A");
  TORCH_CHECK_VALUE(x_.size(1) == A_.size(1), "peft_kernels: x has ", x_.size(1), " columns but lora_A has ", A_.size(1));
  return shrink_tiles(x_, {A_}, {make_keys(k0, k1, k2, thr)})[0];
}

// Backward, one pass over row tiles (threads split the tiles):
//   dX rows  = keep ⊙ (dS_tile · A)           written in place, masked while in cache
//   dA      += dS_tileᵀ · (keep ⊙ x_tile)      into a per-thread-range partial
// When both are asked for, a tile's mask is hashed once (into a 1/0 buffer) and applied to both.
// The partials are summed in range order afterwards, so for a given thread count the result is
// deterministic (the same property as the BLAS calls themselves).
std::tuple<at::Tensor, at::Tensor> lora_dropout_bwd(const at::Tensor& dS_, const at::Tensor& x_, const at::Tensor& A_,
                                                    int64_t k0, int64_t k1, int64_t k2, int64_t thr, bool need_dx,
                                                    bool need_da) {
  check_f32_2d(dS_, "dS");
  check_f32_2d(x_, "x");
  check_f32_2d(A_, "lora_A");
  TORCH_CHECK_VALUE(dS_.size(0) == x_.size(0), "peft_kernels: dS has ", dS_.size(0), " rows but x has ", x_.size(0));
  TORCH_CHECK_VALUE(dS_.size(1) == A_.size(0), "peft_kernels: dS has ", dS_.size(1), " columns but lora_A has ",
              A_.size(0), " rows");
  TORCH_CHECK_VALUE(x_.size(1) == A_.size(1), "peft_kernels: x has ", x_.size(1), " columns but lora_A has ", A_.size(1));
  const DropoutKeys keys = make_keys(k0, k1, k2, thr);
  const at::Tensor x = x_.detach().contiguous(), dS = dS_.detach().contiguous(), A = A_.detach().contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = dS.size(1);
  at::Tensor dX = need_dx ? at::empty({M, K}, at::kFloat) : at::empty({0}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  float* dxp = need_dx ? dX.data_ptr<float>() : nullptr;
  const int64_t TM = row_tile(K), ntiles = (M + TM - 1) / TM;
  std::vector<std::pair<int64_t, at::Tensor>> partials;  // (first tile, partial dA)
  std::mutex mu;
  const bool both = need_da && need_dx;
  at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) {
    at::Tensor buf = need_da ? at::empty({TM, K}, at::kFloat) : at::Tensor();
    at::Tensor part = need_da ? at::zeros({R, K}, at::kFloat) : at::Tensor();
    std::vector<float> keep(both ? static_cast<size_t>(TM * K) : 0);
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = t * TM, rows = std::min(TM, M - m0), n = rows * K;
      const uint64_t base = static_cast<uint64_t>(m0) * K;
      const at::Tensor dS_t = dS.narrow(0, m0, rows);
      if (both) {  // the tile's mask once, as 1/0 (masked_copy of ones, in place)
        std::fill(keep.begin(), keep.begin() + n, 1.0f);
        masked_copy(keep.data(), keep.data(), n, base, keys);
      }
      if (need_da) {
        if (both)
          keep_select(keep.data(), xp + m0 * K, buf.data_ptr<float>(), n);
        else
          masked_copy(xp + m0 * K, buf.data_ptr<float>(), n, base, keys);
        part.addmm_(dS_t.t(), buf.narrow(0, 0, rows));
      }
      if (need_dx) {
        at::Tensor out = dX.narrow(0, m0, rows);  // contiguous rows
        at::mm_out(out, dS_t, A);
        if (both)
          keep_select(keep.data(), dxp + m0 * K, dxp + m0 * K, n);
        else
          masked_copy(dxp + m0 * K, dxp + m0 * K, n, base, keys);
      }
    }
    if (need_da) {
      std::lock_guard<std::mutex> g(mu);
      partials.emplace_back(b, part);
    }
  });
  at::Tensor dA = at::empty({0}, at::kFloat);
  if (need_da) {
    std::sort(partials.begin(), partials.end(), [](const auto& l, const auto& r) { return l.first < r.first; });
    dA = partials.empty() ? at::zeros({R, K}, at::kFloat) : partials[0].second;
    for (size_t i = 1; i < partials.size(); ++i) dA.add_(partials[i].second);
  }
  return {dX, dA};
}


// Groups of members that read the same x, each with its own A_i [R_i, K] and its own mask (keys_i): sibling
// projections with dropout (ops/siblings.py). Each row tile of x is read from memory once and masked for every
// member while in cache, and backward keeps each tile of dX in cache for every member's term, so dX is written
// once, where separate calls write one dX per member and add them. Results equal the one-member ops' member by
// member, bit for bit (the same tiles, masks, GEMM shapes and sums, in member order).
namespace {

struct Group {
  std::vector<at::Tensor> As;  // contiguous, detached
  std::vector<DropoutKeys> keys;
  int64_t M = 0, K = 0;
};

Group check_group(const at::Tensor& x_, at::TensorList As_, at::IntArrayRef keys, const char* op) {
  check_f32_2d(x_, "x");
  const int64_t n = static_cast<int64_t>(As_.size());
  TORCH_CHECK_VALUE(n >= 1, "peft_kernels: ", op, ": lora_As must hold at least one member");
  TORCH_CHECK_VALUE(static_cast<int64_t>(keys.size()) == 4 * n, "peft_kernels: ", op,
                    ": keys must hold 4 values (k0, k1, k2, thr) per member: expected ", 4 * n, ", got ", keys.size());
  Group g;
  g.M = x_.size(0);
  g.K = x_.size(1);
  for (int64_t i = 0; i < n; ++i) {
    check_f32_2d(As_[i], "lora_As[i]");
    TORCH_CHECK_VALUE(As_[i].size(1) == g.K, "peft_kernels: ", op, ": x has ", g.K, " columns but lora_As[", i,
                      "] has ", As_[i].size(1));
    g.As.push_back(As_[i].detach().contiguous());
    g.keys.push_back(make_keys(keys[4 * i], keys[4 * i + 1], keys[4 * i + 2], keys[4 * i + 3]));
  }
  return g;
}

}  // namespace

std::vector<at::Tensor> lora_dropout_shrink_group(const at::Tensor& x_, at::TensorList As_, at::IntArrayRef keys) {
  const Group g = check_group(x_, As_, keys, "lora_dropout_shrink_group");
  return shrink_tiles(x_, g.As, g.keys);
}

// dX = Σ_i keep_i ⊙ (dS_i·A_i) (when need_dx), dA_i = dS_iᵀ·(keep_i ⊙ x) (for the members need_da marks, else an
// empty tensor). Per tile: member i's mask hashed once into a 1/0 buffer, applied to x for dA_i and to dS_i·A_i;
// the first member's term is dX's tile, the others' are added to it in member order.
std::tuple<at::Tensor, std::vector<at::Tensor>> lora_dropout_bwd_group(at::TensorList dS_, const at::Tensor& x_,
                                                                       at::TensorList As_, at::IntArrayRef keys,
                                                                       bool need_dx, at::IntArrayRef need_da) {
  const Group g = check_group(x_, As_, keys, "lora_dropout_bwd_group");
  const int64_t M = g.M, K = g.K, n = static_cast<int64_t>(g.As.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(dS_.size()) == n, "peft_kernels: lora_dropout_bwd_group: dS must hold one "
                    "tensor per member: expected ", n, ", got ", dS_.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(need_da.size()) == n, "peft_kernels: lora_dropout_bwd_group: need_da must "
                    "hold one flag per member: expected ", n, ", got ", need_da.size());
  std::vector<at::Tensor> dS;
  bool any_da = false;
  for (int64_t i = 0; i < n; ++i) {
    check_f32_2d(dS_[i], "dS[i]");
    TORCH_CHECK_VALUE(dS_[i].size(0) == M && dS_[i].size(1) == g.As[i].size(0), "peft_kernels: "
                      "lora_dropout_bwd_group: dS[", i, "] must be [", M, ", ", g.As[i].size(0), "], got [",
                      dS_[i].size(0), ", ", dS_[i].size(1), "]");
    TORCH_CHECK_VALUE(need_da[i] == 0 || need_da[i] == 1, "peft_kernels: lora_dropout_bwd_group: need_da flags "
                      "must be 0 or 1, got ", need_da[i]);
    dS.push_back(dS_[i].detach().contiguous());
    any_da = any_da || need_da[i] != 0;
  }
  const at::Tensor x = x_.detach().contiguous();
  at::Tensor dX = need_dx ? at::empty({M, K}, at::kFloat) : at::empty({0}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  float* dxp = need_dx ? dX.data_ptr<float>() : nullptr;
  const int64_t TM = row_tile(K), ntiles = (M + TM - 1) / TM;
  std::vector<std::pair<int64_t, std::vector<at::Tensor>>> partials;  // (first tile, each member's partial dA)
  std::mutex mu;
  at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) {
    at::Tensor buf = any_da ? at::empty({TM, K}, at::kFloat) : at::Tensor();
    at::Tensor tmp = need_dx && n > 1 ? at::empty({TM, K}, at::kFloat) : at::Tensor();
    std::vector<at::Tensor> part(n);
    for (int64_t i = 0; i < n; ++i)
      if (need_da[i]) part[i] = at::zeros({g.As[i].size(0), K}, at::kFloat);
    std::vector<float> keep(static_cast<size_t>(TM * K));
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = t * TM, rows = std::min(TM, M - m0), cnt = rows * K;
      const uint64_t base = static_cast<uint64_t>(m0) * K;
      for (int64_t i = 0; i < n; ++i) {
        if (!need_da[i] && !need_dx) continue;
        std::fill(keep.begin(), keep.begin() + cnt, 1.0f);
        masked_copy(keep.data(), keep.data(), cnt, base, g.keys[i]);
        const at::Tensor dS_t = dS[i].narrow(0, m0, rows);
        if (need_da[i]) {
          keep_select(keep.data(), xp + m0 * K, buf.data_ptr<float>(), cnt);
          part[i].addmm_(dS_t.t(), buf.narrow(0, 0, rows));
        }
        if (need_dx) {
          if (i == 0) {
            at::Tensor out = dX.narrow(0, m0, rows);  // contiguous rows
            at::mm_out(out, dS_t, g.As[i]);
            keep_select(keep.data(), dxp + m0 * K, dxp + m0 * K, cnt);
          } else {
            at::Tensor out = tmp.narrow(0, 0, rows);
            at::mm_out(out, dS_t, g.As[i]);
            keep_select_add(keep.data(), tmp.data_ptr<float>(), dxp + m0 * K, cnt);
          }
        }
      }
    }
    if (any_da) {
      std::lock_guard<std::mutex> lock(mu);
      partials.emplace_back(b, std::move(part));
    }
  });
  std::sort(partials.begin(), partials.end(), [](const auto& l, const auto& r) { return l.first < r.first; });
  std::vector<at::Tensor> dA;
  for (int64_t i = 0; i < n; ++i) {
    if (!need_da[i]) {
      dA.push_back(at::empty({0}, at::kFloat));
      continue;
    }
    at::Tensor a = partials.empty() ? at::zeros({g.As[i].size(0), K}, at::kFloat) : partials[0].second[i];
    for (size_t j = 1; j < partials.size(); ++j) a.add_(partials[j].second[i]);
    dA.push_back(a);
  }
  return {dX, dA};
}

}  // namespace cpu
}  // namespace peft_kernels
