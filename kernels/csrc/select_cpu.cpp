// Selection and sequence layouts for CPU tensors: the per-image top-k of the gate's scores as flat row
// ids, and the varlen / container ``cu_seqlens`` of SPA (Select and Pack Attention, arXiv 2410.23608).
// Built by kernels/cpu_ext.py; called by kernels/select.py and kernels/seqlens.py, which hold the torch
// references (``topk_indices_ref``; ``cu_seqlens_from_counts`` and ``container_seqlens``' torch path).
//
// Why kernels: each is a handful of small integer ops on tensors of a few dozen to a few thousand
// elements (top-k, a ranked mask, a scatter and ``nonzero``; a cumsum, ``unique`` and ``searchsorted``),
// which the torch path runs as 10-20 dispatched calls of 5-20 us each. An SPA block makes them once per
// forward whatever the kept ratio, so at low ratios they are a visible share of its time. Here each
// is one call and one pass.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

namespace {

// counts: (B,) integer CPU tensor -> int64 contiguous; every count >= 0 (ValueError otherwise).
at::Tensor checked_counts(const at::Tensor& counts_in, const char* op) {
  TORCH_CHECK(counts_in.device().is_cpu(), op, " (cpp): CPU tensors only");
  TORCH_CHECK(counts_in.dim() == 1, op, " (cpp): counts must be 1-D, got ", counts_in.sizes());
  TORCH_CHECK(!at::isFloatingType(counts_in.scalar_type()) && counts_in.scalar_type() != at::kBool,
              op, " (cpp): counts must be an integer tensor, got ", counts_in.scalar_type());
  auto counts = counts_in.to(at::kLong).contiguous();
  const int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < counts.numel(); ++b) TORCH_CHECK_VALUE(c[b] >= 0, "counts must be non-negative");
  return counts;
}

constexpr uint64_t kLow = 0xFFFFFFFFull;

// One 64-bit key per score whose descending order is the selection's order: the score's bits made
// monotone (NaN highest, -0.0 as 0.0) above the complement of the index (ties: lower index higher).
inline uint64_t rank_key(float v, int64_t j) {
  uint32_t u;
  if (std::isnan(v)) {
    u = 0xFFFFFFFFu;
  } else {
    if (v == 0.0f) v = 0.0f;  // -0.0 ranks as 0.0, as in torch's sort
    std::memcpy(&u, &v, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(u) << 32) | (kLow - static_cast<uint64_t>(j));
}

}  // namespace

// scores: (B, N) float32; counts: (B,) integer in [0, N]. Returns (T,) int64, T = sum(counts): the flat
// row ids b * N + j of the counts[b] highest scores of row b, rows in order and each row's ids ascending
// (token order). Order of the scores: higher first, NaN above every number, ties to the lower j (that of
// a stable descending sort), so the selection is unique and matches the reference exactly.
at::Tensor topk_indices_fwd(const at::Tensor& scores_in, const at::Tensor& counts_in) {
  TORCH_CHECK(scores_in.device().is_cpu(), "spa topk_indices (cpp): CPU tensors only");
  TORCH_CHECK(scores_in.scalar_type() == at::kFloat, "spa topk_indices (cpp): scores must be float32");
  TORCH_CHECK(scores_in.dim() == 2, "spa topk_indices (cpp): scores (B, N) expected, got ", scores_in.sizes());
  TORCH_CHECK_VALUE(scores_in.size(1) < kLow, "spa topk_indices (cpp): rows of ", scores_in.size(1), " scores are too long");
  const auto scores = scores_in.contiguous();
  const auto counts = checked_counts(counts_in, "spa topk_indices");
  const int64_t B = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(counts.numel() == B, "one count per row expected: ", counts.numel(), " counts for ", B, " rows");
  const int64_t* c = counts.data_ptr<int64_t>();
  std::vector<int64_t> offset(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(c[b] <= N, "counts must be at most N=", N, ", got ", c[b]);
    offset[b + 1] = offset[b] + c[b];
  }
  auto out = at::empty({offset[B]}, scores.options().dtype(at::kLong));
  const float* sp = scores.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1));  // rows per task
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> key(N);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k = c[b];
      int64_t* o = op + offset[b];
      if (k == N) {  // every token
        for (int64_t j = 0; j < N; ++j) o[j] = b * N + j;
        continue;
      }
      if (k == 0) continue;
      const float* s = sp + b * N;
      for (int64_t j = 0; j < N; ++j) key[j] = rank_key(s[j], j);
      std::nth_element(key.begin(), key.begin() + (k - 1), key.end(), std::greater<uint64_t>());  // [0, k): top k
      std::sort(key.begin(), key.begin() + k, [](uint64_t a, uint64_t z) { return (a & kLow) > (z & kLow); });
      for (int64_t i = 0; i < k; ++i) o[i] = b * N + static_cast<int64_t>(kLow - (key[i] & kLow));
    }
  });
  return out;
}

// counts: (B,) integer >= 0. One sequence per image: cu_seqlens (B+1,) int32 (empty images give empty
// sequences) and the longest count (0 for no images).
std::tuple<at::Tensor, int64_t> cu_seqlens_fwd(const at::Tensor& counts_in) {
  const auto counts = checked_counts(counts_in, "spa cu_seqlens");
  const int64_t B = counts.numel();
  const int64_t* c = counts.data_ptr<int64_t>();
  auto cu = at::empty({B + 1}, counts.options().dtype(at::kInt));
  int32_t* cp = cu.data_ptr<int32_t>();
  int64_t total = 0, longest = 0;
  cp[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += c[b];
    longest = std::max(longest, c[b]);
    cp[b + 1] = static_cast<int32_t>(total);
  }
  TORCH_CHECK_VALUE(total <= INT32_MAX, "spa cu_seqlens (cpp): ", total, " tokens overflow int32 cu_seqlens");
  return {cu, longest};
}

// counts: (B,) integer >= 0; L >= 1. The paper's containers as varlen sequences: the packed stream cut
// at every image end and every multiple of L; empty images give no sequence. Returns cu_seqlens
// (S+1,) int32, the longest sequence (<= L), and per sequence its image and container (int64).
std::tuple<at::Tensor, int64_t, at::Tensor, at::Tensor> container_seqlens_fwd(const at::Tensor& counts_in,
                                                                               int64_t L) {
  TORCH_CHECK_VALUE(L >= 1, "container_len must be >= 1, got ", L);
  const auto counts = checked_counts(counts_in, "spa container_seqlens");
  const int64_t B = counts.numel();
  const int64_t* c = counts.data_ptr<int64_t>();
  std::vector<int32_t> cuts{0};
  std::vector<int64_t> image, container;
  int64_t pos = 0, longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t end = pos + c[b];
    while (pos < end) {
      const int64_t stop = std::min(end, (pos / L + 1) * L);
      image.push_back(b);
      container.push_back(pos / L);
      longest = std::max(longest, stop - pos);
      pos = stop;
      TORCH_CHECK_VALUE(pos <= INT32_MAX, "spa container_seqlens (cpp): ", pos, " tokens overflow int32 cu_seqlens");
      cuts.push_back(static_cast<int32_t>(pos));
    }
  }
  const auto opts = counts.options();
  const int64_t S = static_cast<int64_t>(image.size());
  auto cu = at::empty({S + 1}, opts.dtype(at::kInt));
  auto seq_image = at::empty({S}, opts.dtype(at::kLong));
  auto seq_container = at::empty({S}, opts.dtype(at::kLong));
  std::copy(cuts.begin(), cuts.end(), cu.data_ptr<int32_t>());
  std::copy(image.begin(), image.end(), seq_image.data_ptr<int64_t>());
  std::copy(container.begin(), container.end(), seq_container.data_ptr<int64_t>());
  return {cu, longest, seq_image, seq_container};
}
