// Unpack for CPU float32 tensors: scatter packed token rows back into a copy of the base grid, adding
// them to the residual or replacing rows, in one pass. The "unpack" of SPA (Select and Pack
// Attention, arXiv 2410.23608). Built by kernels/cpu_ext.py; called by kernels/pack.py (impl "cpp"),
// which also holds the reference (``unpack_tokens_ref``: clone, then index_add_ / index_copy_).
//
// Why a kernel: the torch path makes two passes over the (B*N, C) output (a clone, then a scatter
// whose CPU kernel goes through scatter_add_ with an expanded index); this writes every output row
// once, from base or from base + packed, as one parallel region over rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// packed: (T, C) float32; indices: (T,) int64, unique, in [0, R); base: (R, C) float32.
// Returns (R, C) contiguous: base with rows indices[t] replaced by packed[t] (add: base + packed).
at::Tensor unpack_tokens_fwd(const at::Tensor& packed_in, const at::Tensor& indices_in, const at::Tensor& base_in,
                             bool add) {
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(packed_in.device().is_cpu() && base_in.device().is_cpu() && indices_in.device().is_cpu(),
              "spa unpack (cpp): CPU tensors only");
  TORCH_CHECK(packed_in.scalar_type() == at::kFloat && base_in.scalar_type() == at::kFloat,
              "spa unpack (cpp): packed and base must be float32");
  TORCH_CHECK(packed_in.dim() == 2 && base_in.dim() == 2 && packed_in.size(1) == base_in.size(1),
              "spa unpack (cpp): packed (T, C) and base (R, C) expected, got ", packed_in.sizes(), " and ",
              base_in.sizes());
  TORCH_CHECK(indices_in.dim() == 1 && indices_in.numel() == packed_in.size(0),
              "spa unpack (cpp): one index per packed row expected");
  const auto packed = packed_in.contiguous();
  const auto base = base_in.contiguous();
  const auto indices = indices_in.to(at::kLong).contiguous();
  const int64_t R = base.size(0), C = base.size(1), T = packed.size(0);
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<int64_t> source(R, -1);  // packed row of each output row, -1: from base
  for (int64_t t = 0; t < T; ++t) {
    const int64_t r = idx[t];
    TORCH_CHECK(r >= 0 && r < R, "spa unpack (cpp): index ", r, " out of range for ", R, " rows");
    TORCH_CHECK(source[r] < 0, "spa unpack (cpp): indices must be unique, row ", r, " appears twice");
    source[r] = t;
  }
  auto out = at::empty({R, C}, base.options());
  const float* bp = base.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* o = op + r * C;
      const float* b = bp + r * C;
      const int64_t t = source[r];
      if (t < 0) {
        std::memcpy(o, b, C * sizeof(float));
      } else if (!add) {
        std::memcpy(o, pp + t * C, C * sizeof(float));
      } else {
        const float* p = pp + t * C;
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size()) (Vec::loadu(b + c) + Vec::loadu(p + c)).store(o + c);
        for (; c < C; ++c) o[c] = b[c] + p[c];
      }
    }
  });
  return out;
}
