"""The fast path of SPA (Select and Pack Attention, arXiv 2410.23608): varlen attention over packed
tokens, pack/unpack of the selected tokens, the gate's token scores, the per-image top-k selection,
the varlen and container sequence layouts, and FLOP formulas for fvcore and ``torch.utils.flop_counter``.

Every op runs through one switch (``kernels._dispatch``): Triton on CUDA tensors (for the attention,
torch's FlexAttention, which torch compiles to Triton), C++ kernels or a fast torch path on CPU,
overridable by ``impl=`` or the ``SPA_ATTN_IMPL`` environment variable. The attention takes Swin's
relative position bias and shift mask from the packed tokens' places (``kernels.position_bias``). Importing this package
needs neither Triton nor a GPU. The ops are ``torch.library`` custom ops in the ``spa`` namespace
(``spa::varlen_attention``, ``spa::pack_tokens``, ``spa::unpack_tokens``, ``spa::token_scores``), so traces name them.
A CPU call that needs nothing of the custom op (no autograd to record, no trace, compile or dispatch
mode: inference, evaluation) calls its kernel directly, the same kernel with the same result, without
the custom op's Python dispatch (``kernels._dispatch.direct_call``).
"""

from kernels._dispatch import ENV_VAR, IMPLS, cpu_op_thread_count, resolve_impl, triton_available
from kernels.flops import FVCORE_HANDLES, register_flop_handles, sdpa_macs, varlen_attention_macs
from kernels.pack import pack_tokens, pack_tokens_ref, unpack_tokens, unpack_tokens_ref
from kernels.position_bias import PositionBias
from kernels.scores import token_scores, token_scores_ref
from kernels.select import topk_indices, topk_indices_ref
from kernels.seqlens import container_seqlens, cu_seqlens_from_counts, seqlen_sq_sum
from kernels.varlen_attention import varlen_attention, varlen_attention_ref

__all__ = [
    "ENV_VAR",
    "FVCORE_HANDLES",
    "IMPLS",
    "PositionBias",
    "container_seqlens",
    "cpu_op_thread_count",
    "cu_seqlens_from_counts",
    "pack_tokens",
    "pack_tokens_ref",
    "register_flop_handles",
    "resolve_impl",
    "sdpa_macs",
    "seqlen_sq_sum",
    "token_scores",
    "token_scores_ref",
    "topk_indices",
    "topk_indices_ref",
    "triton_available",
    "unpack_tokens",
    "unpack_tokens_ref",
    "varlen_attention",
    "varlen_attention_macs",
    "varlen_attention_ref",
]
