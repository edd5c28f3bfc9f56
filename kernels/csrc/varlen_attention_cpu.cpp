// Varlen (ragged) non-causal attention, forward, for CPU float32 tensors, with Swin's relative position
// bias and shift mask: the CPU kernel of SPA's attention (Select and Pack Attention, arXiv 2410.23608).
// Built by kernels/cpu_ext.py (bindings in bindings.cpp); called by kernels/varlen_attention.py (impl
// "cpp"), which also holds the reference it is tested against.
//
// Why a kernel: torch has no CPU varlen attention (torch.nn.attention.varlen is CUDA-only, nested
// jagged SDPA has no CPU backend, compiled FlexAttention on CPU was 2.5x slower than a loop of
// per-sequence torch calls). The torch path runs three ops per sequence (baddbmm, softmax, bmm), and
// at SPA's sequence lengths (tens of tokens) their dispatch, the per-head loops inside bmm and the
// strided operands cost more than the arithmetic.
//
// Layout (flash-attention's varlen convention): q, k, v: (T, H, D), last dim contiguous (any stride
// when D == 1), any strides over T and H (so the unbound thirds of one qkv projection are read in
// place); sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]. out: (T, H, D) contiguous; rows of no
// sequence are zero. Position bias (kernels/position_bias.py): pos (T, 3) int (row, col, region) per
// token, table ((2M-1)^2, H), window M; score(i, j, h) += table[idx(i, j), h], computed inline from
// the two tokens' places, and -inf where the regions differ.
//
// One task per (group, head), spread over torch's intra-op threads (at::parallel_for); a group is one
// sequence, or consecutive short ones (up to kGroupRows rows). A task packs K^T (D x G) and V (G x D)
// of its group, both zero-padded to whole vectors, then walks each sequence in blocks of kMR query
// rows: scores S = scale * Q K^T for the block (kMR x n) plus the bias, softmax of each row, O = P V
// written straight into out. Memory per thread is O(n * D), never n x n. The register tile is kMR x
// kNV vectors of accumulators (6 x 2 = 12 of AVX2's 16 registers); a tile loads kNV vectors of B and
// broadcasts kMR values of A per step.
//
// Numerics: the scores are accumulated, biased and reduced to their row max in double, only s - max
// is rounded to float, and exp is Sleef's (1 ulp, what torch's softmax uses). Two error sources made
// the kernel err up to 3-8x torch's own float32 math with large logits (softmax scale 1, head dims
// ~100, inputs a few times unit scale), most on short sequences, where the maximum over few outputs is
// one draw of an error distribution: a float dot product over D terms errs about sqrt(D) rounding
// steps of its running sum (as torch's matmul does: the same distribution, so its max exceeded twice
// torch's by chance), and the approximate exp_u20 (torch's CPU flash attention uses it) errs up to 20
// ulps, which a sequence of a few tokens passes on to its output almost undiluted. With both fixed the
// kernel errs less than torch (median about a quarter of torch's error over random shapes and
// magnitudes). P V stays in float, as torch's matmul. The cost, mostly the scores' double
// accumulation (half the lanes of float): ~1.4-1.5x the all-float kernel's time at SPA's sizes (32
// images x ~98 tokens, 12 heads of 32, one or two threads).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using VecD = at::vec::Vectorized<double>;
using VecI = at::vec::Vectorized<int32_t>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kWD = VecD::size();
constexpr int kMR = 6;
constexpr int kNV = 2;
static_assert(VecI::size() == kW, "one int32 lane per float lane (the bias gathers floats by int32 index)");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// k-steps a tile sums in its registers before they join its running total: the sum over K is two
// levels (K / kKB partial sums of kKB terms), so its rounding grows with about kKB + K / kKB steps
// instead of K. P V sums over a whole sequence (K = n up to a few hundred) in float, and with one
// column vector per row (a head dim of 1-16) a single running sum errs past twice torch's float32
// error (2.6x measured for 300 keys at head dim 1 on an AVX-512 machine).
constexpr int64_t kKB = 32;

// c[r, :cols] = alpha[r] * sum_k a[r * lda + k] * b[k * ldb + :cols] for r < R, in T (float or
// double). b must be readable for V vectors of columns (zero padding); only the first `cols` columns
// of c are written.
template <typename T, int R, int V>
inline void tile(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, const T* alpha, T* c, int64_t ldc,
                 int64_t cols) {
  using VT = at::vec::Vectorized<T>;
  constexpr int64_t w = VT::size();
  VT acc[R][V], total[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) total[r][v] = VT(T(0));
  for (int64_t k0 = 0; k0 < K; k0 += kKB) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = VT(T(0));
    const int64_t k1 = std::min<int64_t>(K, k0 + kKB);
    for (int64_t k = k0; k < k1; ++k) {
      VT bv[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) bv[v] = VT::loadu(b + k * ldb + v * w);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const VT av(a[r * lda + k]);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) total[r][v] = total[r][v] + acc[r][v];
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const VT s(alpha[r]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const int64_t n = std::min<int64_t>(w, cols - v * w);
      if (n == w) {
        (total[r][v] * s).store(c + r * ldc + v * w);
      } else if (n > 0) {
        (total[r][v] * s).store(c + r * ldc + v * w, n);
      }
    }
  }
}

template <typename T, int V>
inline void tile_rows(int64_t rows, const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, const T* alpha,
                      T* c, int64_t ldc, int64_t cols) {
  static_assert(kMR == 6, "tile_rows dispatches 1..6 rows");
  switch (rows) {
    case 6: tile<T, 6, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    case 5: tile<T, 5, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    case 4: tile<T, 4, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    case 3: tile<T, 3, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    case 2: tile<T, 2, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
    default: tile<T, 1, V>(a, lda, b, ldb, K, alpha, c, ldc, cols); break;
  }
}

// C (rows x N) = diag(alpha) A (rows x K, row stride lda) B (K x N, row stride ldb, readable up to
// round_up(N, kNV vectors) columns), rows <= kMR.
template <typename T>
inline void block_gemm(int64_t rows, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
                       const T* alpha, T* c, int64_t ldc) {
  constexpr int64_t w = at::vec::Vectorized<T>::size();
  int64_t j = 0;
  for (; j + kNV * w <= N; j += kNV * w)
    tile_rows<T, kNV>(rows, a, lda, b + j, ldb, K, alpha, c + j, ldc, kNV * w);
  for (; j < N; j += w) tile_rows<T, 1>(rows, a, lda, b + j, ldb, K, alpha, c + j, ldc, std::min<int64_t>(w, N - j));
}

// Swin's bias of one query against n keys, added to its score row s[:n]: th[idx] by the clamped
// (row, col) offset, th[(2M-1)^2] = -inf where the regions differ. pq: the query's (row, col, region);
// kr, kc, kg: the keys' rows, cols, regions; tmp: n + kW floats.
inline void add_bias(double* s, int64_t n, const int32_t* pq, const int32_t* kr, const int32_t* kc, const int32_t* kg,
                     const float* th, int32_t M, float* tmp) {
  const VecI ri(pq[0]), ci(pq[1]), gi(pq[2]);
  const VecI lo(-(M - 1)), hi(M - 1), off(M - 1), width(2 * M - 1), masked((2 * M - 1) * (2 * M - 1));
  for (int64_t j = 0; j < n; j += kW) {
    const int32_t cnt = static_cast<int32_t>(std::min<int64_t>(kW, n - j));  // tail lanes read zeros: valid idx
    const VecI dr = at::vec::minimum(at::vec::maximum(ri - VecI::loadu(kr + j, cnt), lo), hi) + off;
    const VecI dc = at::vec::minimum(at::vec::maximum(ci - VecI::loadu(kc + j, cnt), lo), hi) + off;
    const VecI idx = VecI::blendv(masked, dr * width + dc, gi == VecI::loadu(kg + j, cnt));
    at::vec::gather<sizeof(float)>(th, idx).store(tmp + j);
  }
  for (int64_t j = 0; j < n; ++j) s[j] += tmp[j];
}

// p[:n] = exp(s[:n] - max(s[:n])), the difference taken in double and rounded once; returns 1 / sum.
inline float softmax_row(const double* s, float* p, int64_t n) {
  const VecD neg_inf(-std::numeric_limits<double>::infinity());
  VecD mv = neg_inf;
  int64_t j = 0;
  for (; j + kWD <= n; j += kWD) mv = at::vec::maximum(mv, VecD::loadu(s + j));
  if (j < n) mv = at::vec::maximum(mv, VecD::set(neg_inf, VecD::loadu(s + j, n - j), n - j));
  const double m = at::vec::vec_reduce_all<double>([](VecD& x, VecD& y) { return at::vec::maximum(x, y); }, mv);
  for (j = 0; j < n; ++j) p[j] = static_cast<float>(s[j] - m);
  Vec acc(0.f);
  j = 0;
  for (; j + kW <= n; j += kW) {
    const Vec e = Vec::loadu(p + j).exp();
    e.store(p + j);
    acc = acc + e;
  }
  if (j < n) {
    const Vec e = Vec::loadu(p + j, n - j).exp();
    e.store(p + j, n - j);
    acc = acc + Vec::set(Vec(0.f), e, n - j);
  }
  return 1.f / at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
}

constexpr int64_t kGroupRows = 64;  // consecutive short sequences up to this many rows share one task

struct Buffers {
  std::vector<float> kt, v, p, inv, th, tmp;
  std::vector<double> ktd, qd, s, alpha;
  Buffers(int64_t max_rows, int64_t D, double scale, int64_t table_rows)
      : kt(D * (round_up(max_rows, kW) + kW)), v(max_rows * round_up(D, kW)), p(kMR * (round_up(max_rows, kW) + kW)),
        inv(kMR), th(table_rows + 1), tmp(round_up(max_rows, kW) + kW), ktd(kt.size()), qd(kMR * D),
        s(p.size()), alpha(kMR, scale) {}  // alpha: the softmax scale of every score row
};

// The position bias of one task: the group's tokens' rows, cols, regions, and the head's table column
// followed by -inf (th); M == 0: none.
struct Bias {
  const int32_t *row = nullptr, *col = nullptr, *region = nullptr;
  const float* th = nullptr;
  int32_t M = 0;
};

// One head of a group of consecutive sequences (rows 0..G of the group, pieces[p] = (offset, length)
// within it): q, k, v, o point at the group's first row of this head. K^T and V are packed once for
// the group; each sequence then attends to its own columns / rows of them. A group is one sequence
// when sequences are long; short ones (the paper's container pieces, images keeping few tokens) share
// the packing.
void attend_group(const float* q, int64_t sq, const float* k, int64_t sk, const float* v, int64_t sv, float* o,
                  int64_t so, int64_t G, const std::vector<std::pair<int64_t, int64_t>>& pieces, int64_t D,
                  const Bias& bias, Buffers& buf) {
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
  double* ktd = buf.ktd.data();
  for (int64_t i = 0; i < D * ldk; ++i) ktd[i] = kt[i];  // the scores are accumulated in double
  for (j = 0; j < G; ++j) {
    std::copy(v + j * sv, v + j * sv + D, vp + j * ldv);
    std::fill(vp + j * ldv + D, vp + (j + 1) * ldv, 0.f);
  }
  double* s = buf.s.data();
  double* qd = buf.qd.data();
  float* p = buf.p.data();
  for (const auto& [c, n] : pieces) {
    for (int64_t i = 0; i < n; i += kMR) {
      const int64_t rows = std::min<int64_t>(kMR, n - i);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d) qd[r * D + d] = q[(c + i + r) * sq + d];
      block_gemm<double>(rows, n, D, qd, D, ktd + c, ldk, buf.alpha.data(), s, ldk);  // (rows, n) scores
      for (int64_t r = 0; r < rows; ++r) {
        if (bias.M > 0) {
          const int64_t t = c + i + r;
          const int32_t pq[3] = {bias.row[t], bias.col[t], bias.region[t]};
          add_bias(s + r * ldk, n, pq, bias.row + c, bias.col + c, bias.region + c, bias.th, bias.M, buf.tmp.data());
        }
        buf.inv[r] = softmax_row(s + r * ldk, p + r * ldk, n);
      }
      block_gemm<float>(rows, D, n, p, ldk, vp + c * ldv, ldv, buf.inv.data(), o + (c + i) * so, so);  // (rows, D)
    }
  }
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), "spa varlen attention (cpp): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "spa varlen attention (cpp): ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.sizes() == q.sizes(), "spa varlen attention (cpp): ", name,
              " must be (T, H, D) like q, got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) <= 1, "spa varlen attention (cpp): ", name,
              " must be contiguous in its last dim");
}

}  // namespace

// q, k, v: (T, H, D) float32 CPU, last dim contiguous; cu_seqlens: (S+1,) int32/int64, non-decreasing
// from 0 to at most T; pos: (T, 3) integer (row, col, region), table: ((2M-1)^2, H) float32, window: M
// (pos and table both given, or neither). Returns out: (T, H, D) contiguous float32.
at::Tensor varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens, double softmax_scale, const std::optional<at::Tensor>& pos,
                                const std::optional<at::Tensor>& table, int64_t window) {
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
  TORCH_CHECK(pos.has_value() == table.has_value(), "spa varlen attention (cpp): pass pos and table together");
  at::Tensor pos_t, table_t;  // (3, T) int32: rows, cols, regions; (H, (2M-1)^2) float32
  const int64_t M = pos.has_value() ? window : 0;
  if (pos.has_value()) {
    TORCH_CHECK(M >= 1 && M < (1 << 14), "spa varlen attention (cpp): window must be in [1, 16384), got ", window);
    TORCH_CHECK(pos->device().is_cpu() && pos->dim() == 2 && pos->size(0) == T && pos->size(1) == 3 &&
                    !at::isFloatingType(pos->scalar_type()) && pos->scalar_type() != at::kBool,
                "spa varlen attention (cpp): pos must be (T, 3) = (", T, ", 3) integers on CPU, got ",
                pos->scalar_type(), " ", pos->sizes());
    TORCH_CHECK(table->device().is_cpu() && table->scalar_type() == at::kFloat && table->dim() == 2 &&
                    table->size(0) == (2 * M - 1) * (2 * M - 1) && table->size(1) == H,
                "spa varlen attention (cpp): table must be ((2M-1)^2, H) = (", (2 * M - 1) * (2 * M - 1), ", ", H,
                ") float32 on CPU, got ", table->scalar_type(), " ", table->sizes());
    pos_t = pos->to(at::kInt).t().contiguous();
    table_t = table->t().contiguous();
  }

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
  const int32_t* pp = M > 0 ? pos_t.data_ptr<int32_t>() : nullptr;
  const float* tp = M > 0 ? table_t.data_ptr<float>() : nullptr;
  const int64_t table_rows = (2 * M - 1) * (2 * M - 1);
  const int64_t sqt = q.stride(0), sqh = q.stride(1), skt = k.stride(0), skh = k.stride(1);
  const int64_t svt = v.stride(0), svh = v.stride(1), so = H * D;
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  at::parallel_for(0, n_groups * H, 1, [&](int64_t begin, int64_t end) {
    Buffers buf(max_rows, D, softmax_scale, table_rows);
    std::vector<std::pair<int64_t, int64_t>> pieces;
    for (int64_t task = begin; task < end; ++task) {
      const auto [first, last] = groups[task / H];
      const int64_t h = task % H, start = b[first];
      pieces.clear();
      for (int64_t i = first; i < last; ++i)
        if (b[i + 1] > b[i]) pieces.emplace_back(b[i] - start, b[i + 1] - b[i]);
      Bias bias;
      if (M > 0) {
        bias = {pp + start, pp + T + start, pp + 2 * T + start, buf.th.data(), static_cast<int32_t>(M)};
        std::copy(tp + h * table_rows, tp + (h + 1) * table_rows, buf.th.data());
        buf.th[table_rows] = -std::numeric_limits<float>::infinity();
      }
      attend_group(qp + start * sqt + h * sqh, sqt, kp + start * skt + h * skh, skt, vp + start * svt + h * svh,
                   svt, op + start * so + h * D, so, b[last] - start, pieces, D, bias, buf);
    }
  });
  return out;
}
