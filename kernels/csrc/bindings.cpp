// Python bindings of the C++ CPU kernels of spa-harness (kernels/csrc/*.cpp), one extension module
// built by kernels/cpu_ext.py.

#include <torch/extension.h>

at::Tensor varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens, double softmax_scale, const std::optional<at::Tensor>& pos,
                                const std::optional<at::Tensor>& table, int64_t window);
at::Tensor unpack_tokens_fwd(const at::Tensor& packed, const at::Tensor& indices, const at::Tensor& base, bool add);
at::Tensor token_scores_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor topk_indices_fwd(const at::Tensor& scores, const at::Tensor& counts);
std::tuple<at::Tensor, int64_t> cu_seqlens_fwd(const at::Tensor& counts);
std::tuple<at::Tensor, int64_t, at::Tensor, at::Tensor> container_seqlens_fwd(const at::Tensor& counts, int64_t L);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("varlen_attention_fwd", &varlen_attention_fwd,
        "Varlen non-causal attention forward over (T, H, D) float32 CPU tensors (cu_seqlens convention), with "
        "Swin's relative position bias and shift mask when pos (T, 3) and table ((2M-1)^2, H) are given",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens"), py::arg("softmax_scale"),
        py::arg("pos") = py::none(), py::arg("table") = py::none(), py::arg("window") = 0);
  m.def("unpack_tokens_fwd", &unpack_tokens_fwd,
        "Scatter packed (T, C) rows into a copy of base (R, C) at unique indices, added or replacing");
  m.def("token_scores_fwd", &token_scores_fwd,
        "One linear score per row of x (..., C) -> (...): x @ weight + bias, float32 CPU tensors");
  m.def("topk_indices_fwd", &topk_indices_fwd,
        "Flat row ids of the counts[b] highest scores of each row b of (B, N) float32 scores, in token order");
  m.def("cu_seqlens_fwd", &cu_seqlens_fwd, "cu_seqlens (int32) and the longest count: one sequence per image");
  m.def("container_seqlens_fwd", &container_seqlens_fwd,
        "Containers of L slots as varlen sequences: cu_seqlens, longest, image and container per sequence");
}
