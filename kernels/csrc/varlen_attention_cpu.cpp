// Varlen (ragged) non-causal attention, forward, for CPU float32 tensors: the CPU kernel of SPA's
// attention (Select and Pack Attention, arXiv 2410.23608). Built by kernels/cpu_ext.py (bindings in
// bindings.cpp); called by kernels/varlen_attention.py (impl "cpp"), which also holds the reference it
// is tested against.
//
// Why a kernel: torch has no CPU varlen attention (torch.nn.attention.varlen is CUDA-only, nested
// jagged SDPA has no CPU backend, compiled FlexAttention on CPU was 2.5x slower than a loop of
// per-sequence torch calls). The torch path runs three ops per sequence (baddbmm, softmax, bmm), and
// at SPA's sequence lengths (tens of tokens) their dispatch, the per-head loops inside bmm and the
// strided operands cost more than the arithmetic.
//
// Layout (flash-attention's varlen convention): q, k, v: (T, H, D), last dim contiguous, any strides
// over T and H (so the unbound thirds of one qkv projection are read in place); sequence i is rows
// cu_seqlens[i]:cu_seqlens[i+1]. out: (T, H, D) contiguous; rows of no sequence are zero.
//
// One task per (group, head), spread over torch's intra-op threads (at::parallel_for); a group is one
// sequence, or consecutive short ones (up to kGroupRows rows). A task packs K^T (D x G) and V (G x D)
// of its group, both zero-padded to whole vectors, then walks each sequence in blocks of kMR query
// rows: scores S = scale * Q K^T for the block (kMR x n), softmax of each row (exp_u20: torch's own
// CPU flash attention uses it), O = P V written straight into out. Memory per thread is O(n * D),
// never n x n. The register tile is kMR x kNV vectors of accumulators (6 x 2 = 12 of AVX2's 16
// registers); a tile loads kNV vectors of B and broadcasts kMR values of A per step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int kMR = 6;
constexpr int kNV = 2;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// c[r, :cols] = alpha[r] * sum_k a[r * lda + k] * b[k * ldb + :cols] for r < R. b must be readable
// for V * kW columns (zero padding); only the first `cols` columns of c are written.
template <int R, int V>
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* alpha,
                 float* c, int64_t ldc, int64_t cols) {
  Vec acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = Vec::loadu(b + k * ldb + v * kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec av(a[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const Vec s(alpha[r]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const int64_t n = std::min<int64_t>(kW, cols - v * kW);
      if (n == kW) {
        (acc[r][v] * s).store(c + r * ldc + v * kW);
      } else if (n > 0) {
        (acc[r][v] * s).store(c + r * ldc + v * kW, n);
      }
    }
  }
}

template <int V>
inline void tile_rows(int64_t rows, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                      const float* alpha, float* c, int64_t ldc, int64_t cols) {
  static_assert(kMR == 6, "tile_rows dispatches 1..6 rows");
  switch (rows) {
    case 6: tile<6, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    case 5: tile<5, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    case 4: tile<4, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    case 3: tile<3, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    case 2: tile<2, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    default: tile<1, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
  }
}

// C (rows x N) = diag(alpha) A (rows x K, row stride lda) B (K x N, row stride ldb, readable up to
// round_up(N, kW) columns), rows <= kMR.
inline void block_gemm(int64_t rows, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
                       int64_t ldb, const float* alpha, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + kNV * kW <= N; j += kNV * kW) tile_rows<kNV>(rows, a, lda, b + j, ldb, K, alpha, c + j, ldc, kNV * kW);
  for (; j < N; j += kW) tile_rows<1>(rows, a, lda, b + j, ldb, K, alpha, c + j, ldc, std::min<int64_t>(kW, N - j));
}

// In place: row[:n] = exp(row[:n] - max(row[:n])); returns 1 / sum.
inline float softmax_row(float* row, int64_t n) {
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  Vec mv = neg_inf;
  int64_t j = 0;
  for (; j + kW <= n; j += kW) mv = at::vec::maximum(mv, Vec::loadu(row + j));
  if (j < n) mv = at::vec::maximum(mv, Vec::set(neg_inf, Vec::loadu(row + j, n - j), n - j));
  const float m = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, mv);
  const Vec mb(m);
  Vec acc(0.f);
  j = 0;
  for (; j + kW <= n; j += kW) {
    const Vec e = (Vec::loadu(row + j) - mb).exp_u20();
    e.store(row + j);
    acc = acc + e;
  }
  if (j < n) {
    const Vec e = (Vec::loadu(row + j, n - j) - mb).exp_u20();
    e.store(row + j, n - j);
    acc = acc + Vec::set(Vec(0.f), e, n - j);
  }
  return 1.f / at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
}

constexpr int64_t kGroupRows = 64;  // consecutive short sequences up to this many rows share one task

struct Buffers {
  std::vector<float> kt, v, s, alpha, inv;
  Buffers(int64_t max_rows, int64_t D, float scale)
      : kt(D * (round_up(max_rows, kW) + kW)), v(max_rows * round_up(D, kW)), s(kMR * (round_up(max_rows, kW) + kW)),
        alpha(kMR, scale), inv(kMR) {}  // alpha: the softmax scale of every score row
};

// One head of a group of consecutive sequences (rows 0..G of the group, pieces[p] = (offset, length)
// within it): q, k, v, o point at the group's first row of this head. K^T and V are packed once for
// the group; each sequence then attends to its own columns / rows of them. A group is one sequence
// when sequences are long; short ones (the paper's container pieces, images keeping few tokens) share
// the packing.
void attend_group(const float* q, int64_t sq, const float* k, int64_t sk, const float* v, int64_t sv, float* o,
                  int64_t so, int64_t G, const std::vector<std::pair<int64_t, int64_t>>& pieces, int64_t D,
                  Buffers& buf) {
  // K^T: (D, ldk); a piece at column c reads up to round_up(n, kW) columns from c, so kW spare columns
  const int64_t ldk = round_up(G, kW) + kW;
  const int64_t ldv = round_up(D, kW);  // V: (G, ldv), columns D.. zero
  float* kt = buf.kt.data();
  float* vp = buf.v.data();
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * ldk + G, kt + (d + 1) * ldk, 0.f);
  int64_t j = 0;
  for (; j + 8 <= G; j += 8) {  // 8 x 8 blocks (an AVX2 register transpose; scalar elsewhere)
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) at::vec::transpose_mxn<float, 8, 8>(k + j * sk + d, sk, kt + d * ldk + j, ldk);
    for (; d < D; ++d)
      for (int64_t jj = j; jj < j + 8; ++jj) kt[d * ldk + jj] = k[jj * sk + d];
  }
  for (; j < G; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * ldk + j] = k[j * sk + d];
  for (j = 0; j < G; ++j) {
    std::copy(v + j * sv, v + j * sv + D, vp + j * ldv);
    std::fill(vp + j * ldv + D, vp + (j + 1) * ldv, 0.f);
  }
  float* s = buf.s.data();
  for (const auto& [c, n] : pieces) {
    for (int64_t i = 0; i < n; i += kMR) {
      const int64_t rows = std::min<int64_t>(kMR, n - i);
      block_gemm(rows, n, D, q + (c + i) * sq, sq, kt + c, ldk, buf.alpha.data(), s, ldk);  // (rows, n) scores
      for (int64_t r = 0; r < rows; ++r) buf.inv[r] = softmax_row(s + r * ldk, n);
      block_gemm(rows, D, n, s, ldk, vp + c * ldv, ldv, buf.inv.data(), o + (c + i) * so, so);  // (rows, D)
    }
  }
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), "spa varlen attention (cpp): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "spa varlen attention (cpp): ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.sizes() == q.sizes(), "spa varlen attention (cpp): ", name,
              " must be (T, H, D) like q, got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1, "spa varlen attention (cpp): ", name, " must be contiguous in its last dim");
}

}  // namespace

// q, k, v: (T, H, D) float32 CPU, last dim contiguous; cu_seqlens: (S+1,) int32/int64, non-decreasing
// from 0 to at most T. Returns out: (T, H, D) contiguous float32.
at::Tensor varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens, double softmax_scale) {
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 && cu_seqlens.device().is_cpu(),
              "spa varlen attention (cpp): cu_seqlens must be a 1-D CPU tensor (S+1,)");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const auto cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t S = cu.numel() - 1;
  const int64_t* b = cu.data_ptr<int64_t>();
  TORCH_CHECK(b[0] == 0, "spa varlen attention (cpp): cu_seqlens must start at 0");
  for (int64_t i = 0; i < S; ++i)
    TORCH_CHECK(b[i + 1] >= b[i], "spa varlen attention (cpp): cu_seqlens must be non-decreasing");
  TORCH_CHECK(b[S] <= T, "spa varlen attention (cpp): cu_seqlens ends at ", b[S], " > T = ", T);

  auto out = at::empty({T, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (b[S] < T) out.narrow(0, b[S], T - b[S]).zero_();
  if (b[S] == 0 || H == 0 || D == 0) return out;  // no tokens in any sequence
  // groups of consecutive sequences: [first, last) sequence ids, at most kGroupRows rows unless one
  // sequence alone is longer
  std::vector<std::pair<int64_t, int64_t>> groups;
  int64_t max_rows = 0;
  for (int64_t i = 0; i < S;) {
    int64_t j = i + 1;
    while (j < S && b[j + 1] - b[i] <= kGroupRows) ++j;
    if (b[j] > b[i]) groups.emplace_back(i, j);
    max_rows = std::max(max_rows, b[j] - b[i]);
    i = j;
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sqt = q.stride(0), sqh = q.stride(1), skt = k.stride(0), skh = k.stride(1);
  const int64_t svt = v.stride(0), svh = v.stride(1), so = H * D;
  const float scale = static_cast<float>(softmax_scale);
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  at::parallel_for(0, n_groups * H, 1, [&](int64_t begin, int64_t end) {
    Buffers buf(max_rows, D, scale);
    std::vector<std::pair<int64_t, int64_t>> pieces;
    for (int64_t task = begin; task < end; ++task) {
      const auto [first, last] = groups[task / H];
      const int64_t h = task % H, start = b[first];
      pieces.clear();
      for (int64_t i = first; i < last; ++i)
        if (b[i + 1] > b[i]) pieces.emplace_back(b[i] - start, b[i + 1] - b[i]);
      attend_group(qp + start * sqt + h * sqh, sqt, kp + start * skt + h * skh, skt, vp + start * svt + h * svh,
                   svt, op + start * so + h * D, so, b[last] - start, pieces, D, buf);
    }
  });
  return out;
}
