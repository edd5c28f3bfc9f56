// Token scores for CPU float32 tensors: one linear score per row, s[r] = x[r] . w + b, the gate of SPA
// (Select and Pack Attention, arXiv 2410.23608), which scores every token of every image. Built by
// kernels/cpu_ext.py; called by kernels/scores.py (impl "cpp"), which also holds the reference
// (``token_scores_ref``: ``F.linear`` with one output).
//
// Why a kernel: torch runs a Linear with one output as a GEMM with n = 1 (or a GEMV), which on this
// project's CPU machine used little more than one core, while reading x is all the work there is. This
// is one parallel region over rows, a vectorized dot product per row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <optional>

// x: (..., C) float32; weight: (C,) or (1, C) float32; bias: (1,) float32 or None. Returns (...,) float32.
at::Tensor token_scores_fwd(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t V = Vec::size();
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(), "spa token_scores (cpp): CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight_in.scalar_type() == at::kFloat,
              "spa token_scores (cpp): x and weight must be float32");
  TORCH_CHECK(x_in.dim() >= 1 && weight_in.numel() == x_in.size(-1),
              "spa token_scores (cpp): x (..., C) and weight (C,) expected, got ", x_in.sizes(), " and ",
              weight_in.sizes());
  const int64_t C = x_in.size(-1);
  const auto x = x_in.reshape({-1, C}).contiguous();
  const auto w = weight_in.reshape({-1}).contiguous();
  const int64_t R = x.size(0);
  float b = 0.f;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->numel() == 1 && bias_in->scalar_type() == at::kFloat,
                "spa token_scores (cpp): bias must be one float32 value");
    b = bias_in->item<float>();
  }
  auto out = at::empty({R}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * C;
      Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);  // four chains: the adds of one row do not wait on each other
      int64_t c = 0;
      for (; c + 4 * V <= C; c += 4 * V) {
        a0 = at::vec::fmadd(Vec::loadu(row + c), Vec::loadu(wp + c), a0);
        a1 = at::vec::fmadd(Vec::loadu(row + c + V), Vec::loadu(wp + c + V), a1);
        a2 = at::vec::fmadd(Vec::loadu(row + c + 2 * V), Vec::loadu(wp + c + 2 * V), a2);
        a3 = at::vec::fmadd(Vec::loadu(row + c + 3 * V), Vec::loadu(wp + c + 3 * V), a3);
      }
      for (; c + V <= C; c += V) a0 = at::vec::fmadd(Vec::loadu(row + c), Vec::loadu(wp + c), a0);
      const Vec acc = (a0 + a1) + (a2 + a3);
      float s = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, acc);
      for (; c < C; ++c) s += row[c] * wp[c];
      op[r] = s + b;
    }
  });
  return out.view(x_in.sizes().slice(0, x_in.dim() - 1));
}
