// Multi-adapter LoRA on the CPU: grouped (SGMV-style) shrink/expand and their backward.
//
// Tokens arrive grouped by adapter (perm = token indices in adapter-sorted order, seg_starts the
// segment offsets into perm, seg_slots each segment's slot). Work items are segments, split into
// row chunks in forward, and run on at::parallel_for's threads; each item does its small GEMMs
// with at::mm (single-threaded inside the parallel region) in the adapter's dtype, at the slot's
// true rank. Every output row / slot gradient is written by exactly one item: no races, and the
// result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace peft_kernels {
namespace cpu {
namespace {

struct Item {
  int64_t slot, begin, end;
};

// rows per forward work item: small enough to balance a skewed batch over the threads
constexpr int64_t kChunkRows = 64;

struct Segments {
  std::vector<int64_t> slots, starts, ranks;
  std::vector<double> scal;
};

Segments read_segments(const at::Tensor& seg_slots, const at::Tensor& seg_starts, const at::Tensor& ranks,
                       const at::Tensor& scalings) {
  TORCH_CHECK(seg_slots.dim() == 1 && seg_starts.dim() == 1 && seg_starts.size(0) == seg_slots.size(0) + 1,
              "seg_starts must have one more entry than seg_slots");
  Segments s;
  auto sl = seg_slots.to(at::kLong).contiguous();
  auto st = seg_starts.to(at::kLong).contiguous();
  auto rk = ranks.to(at::kLong).contiguous();
  auto sc = scalings.to(at::kDouble).contiguous();
  s.slots.assign(sl.data_ptr<int64_t>(), sl.data_ptr<int64_t>() + sl.numel());
  s.starts.assign(st.data_ptr<int64_t>(), st.data_ptr<int64_t>() + st.numel());
  s.ranks.assign(rk.data_ptr<int64_t>(), rk.data_ptr<int64_t>() + rk.numel());
  s.scal.assign(sc.data_ptr<double>(), sc.data_ptr<double>() + sc.numel());
  const int64_t S = static_cast<int64_t>(s.ranks.size());
  for (size_t g = 0; g < s.slots.size(); ++g) {
    TORCH_CHECK(s.slots[g] >= 0 && s.slots[g] < S, "segment slot ", s.slots[g], " out of range [0, ", S, ")");
    TORCH_CHECK(s.starts[g] <= s.starts[g + 1], "seg_starts must be non-decreasing");
  }
  return s;
}

void check_common(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& perm,
                  const at::Tensor& ranks, const at::Tensor& scalings) {
  TORCH_CHECK(x.device().is_cpu() && A.device().is_cpu() && B.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && A.dim() == 3 && B.dim() == 3, "x must be 2-D, lora_A and lora_B 3-D");
  TORCH_CHECK(A.size(2) == x.size(1) && B.size(0) == A.size(0) && B.size(2) == A.size(1),
              "lora_A [S, R, K] / lora_B [S, N, R] do not match x [T, K]");
  TORCH_CHECK(perm.dim() == 1 && ranks.numel() == A.size(0) && scalings.numel() == A.size(0),
              "perm must be 1-D; ranks and scalings need one entry per slot");
}

}  // namespace

// y[perm[p]] += s_a · (x[perm[p]] · A_aᵀ) · B_aᵀ for every sorted position p; returns S = x·A_aᵀ
// ([T_active, R], adapter dtype, sorted rows, columns past a slot's rank zero).
at::Tensor multi_lora_fwd(at::Tensor y, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                          const at::Tensor& perm, const at::Tensor& seg_slots, const at::Tensor& seg_starts,
                          const at::Tensor& ranks, const at::Tensor& scalings) {
  check_common(x, lora_A, lora_B, perm, ranks, scalings);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == lora_B.size(1), "y must be [T, N]");
  const auto segs = read_segments(seg_slots, seg_starts, ranks, scalings);
  // at::parallel_for's workers do not inherit grad mode: never hand them tensors that require grad
  const auto xd = x.detach();
  const auto A = lora_A.detach();
  const auto B = lora_B.detach();
  const auto idx = perm.to(at::kLong);
  const auto cdt = A.scalar_type();
  const int64_t R = A.size(1), Ta = idx.size(0);
  TORCH_CHECK(segs.starts.back() == Ta, "seg_starts must end at perm's length");
  auto S = at::zeros({Ta, R}, A.options());
  std::vector<Item> items;
  for (size_t g = 0; g < segs.slots.size(); ++g) {
    if (segs.ranks[segs.slots[g]] <= 0) continue;  // an empty slot adds exactly nothing
    for (int64_t b = segs.starts[g]; b < segs.starts[g + 1]; b += kChunkRows)
      items.push_back({segs.slots[g], b, std::min(b + kChunkRows, segs.starts[g + 1])});
  }
  // each item gathers its rows, does its two GEMMs and scatters into its (unique) rows of y
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t ib, int64_t ie) {
    for (int64_t i = ib; i < ie; ++i) {
      const auto& it = items[i];
      const int64_t r = segs.ranks[it.slot], n = it.end - it.begin;
      const auto rows = idx.narrow(0, it.begin, n);
      auto xg = xd.index_select(0, rows);
      if (xg.scalar_type() != cdt) xg = xg.to(cdt);
      const auto At = A[it.slot].narrow(0, 0, r).t();
      auto Sg = S.narrow(0, it.begin, n).narrow(1, 0, r);
      if (r == R)
        at::mm_out(Sg, xg, At);
      else
        Sg.copy_(at::mm(xg, At));
      auto Zg = at::mm(Sg.mul(segs.scal[it.slot]), B[it.slot].narrow(1, 0, r).t());  // scale the n×r side
      y.index_add_(0, rows, Zg.scalar_type() == y.scalar_type() ? Zg : Zg.to(y.scalar_type()));
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
                                                  bool need_da, bool need_db) {
  check_common(x, lora_A, lora_B, perm, ranks, scalings);
  const auto segs = read_segments(seg_slots, seg_starts, ranks, scalings);
  const auto xd = x.detach();
  const auto dyd = dy.detach();
  const auto Sd = S.detach();
  const auto A = lora_A.detach();
  const auto B = lora_B.detach();
  const auto idx = perm.to(at::kLong);
  const auto cdt = A.scalar_type();
  at::Tensor dx = dx_opt.has_value() ? *dx_opt : at::Tensor();
  const bool need_dx = dx.defined();
  auto dA = need_da ? at::zeros_like(A) : at::empty({0}, A.options());
  auto dB = need_db ? at::zeros_like(B) : at::empty({0}, B.options());
  const int64_t G = static_cast<int64_t>(segs.slots.size());
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
        auto dXg = at::mm(dS, A[a].narrow(0, 0, r));
        dx.index_add_(0, rows, dXg.scalar_type() == dx.scalar_type() ? dXg : dXg.to(dx.scalar_type()));
      }
    }
  });
  return {dA, dB};
}

}  // namespace cpu
}  // namespace peft_kernels
