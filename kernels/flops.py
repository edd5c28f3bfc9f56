"""FLOP formulas for the ops of ``kernels`` and for SDPA: fvcore jit handles and
``torch.utils.flop_counter`` formulas.

Units differ between the two counters, as they do upstream: fvcore counts one multiply-add as one
flop (so it reports MACs), ``torch.utils.flop_counter`` counts 2 flops per multiply-add.

- ``spa::varlen_attention`` (q, k, v: (T, H, D), sequences of lengths n_i):
  ``2 * H * D * sum_i n_i^2`` MACs (QK^T and PV, ``H * D * n_i^2`` each); flop_counter: twice that.
  Swin's relative position bias and shift mask (``pos``, ``table``) add no multiply-adds: a gather
  and an add per score, like the softmax, which counts 0. Its backward (the torch backward) is five
  such matmuls: ``5 * H * D * sum_i n_i^2`` MACs, as torch counts SDPA's; the table's gradient is a
  scatter-add (0). On CUDA the attention runs FlexAttention (``kernels.flex_attention``), a compiled
  function that ``torch.jit.trace`` refuses and ``FlopCounterMode`` counts as dense; under either
  counter ``varlen_attention`` runs this custom op (its torch path) instead, so both counters see
  ``spa::varlen_attention`` and its formula on every path.
- ``aten::scaled_dot_product_attention`` (q: (..., L, E), k: (..., S, E), v: (..., S, Ev)):
  ``prod(...) * L * S * (E + Ev)`` MACs; masks do not reduce it (SDPA computes densely).
  (flop_counter counts SDPA already.)
- ``spa::token_scores`` (x: (R, C)): ``R * C`` MACs, as a Linear with one output; its backward runs
  in torch (counted there).
- ``spa::pack_tokens`` / ``spa::unpack_tokens``: data movement, 0 (fvcore likewise ignores the
  element-wise add of a residual).
- ``aten::nonzero_static`` (the pack's selected rows at a size known on the host): 0, as fvcore
  ignores ``aten::nonzero``.

fvcore traces with ``torch.jit.trace``, whose graph holds shapes but not the contents of
``cu_seqlens``; ``varlen_attention`` therefore passes ``sum_i n_i^2`` to the op as an int argument,
which the trace records as a constant that the handle reads.

Use: ``FlopCountAnalysis(model, inputs).set_op_handle(**FVCORE_HANDLES)``; for flop_counter call
``register_flop_handles()`` once (idempotent; not done on ``import kernels`` because importing
``torch.utils.flop_counter`` imports Triton, which must come after ``TRITON_INTERPRET`` is set). It
also registers SDPA's CPU kernel, which flop_counter otherwise counts as 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

__all__ = [
    "FVCORE_HANDLES",
    "register_flop_handles",
    "varlen_attention_macs",
    "sdpa_macs",
]


def varlen_attention_macs(num_heads: int, head_dim: int, seqlen_sq_sum: int) -> int:
    """Forward multiply-adds of varlen attention: ``2 * H * D * sum_i n_i^2``."""
    return 2 * num_heads * head_dim * seqlen_sq_sum


def sdpa_macs(q_shape, k_shape, v_shape) -> int:
    """Forward multiply-adds of dense SDPA: ``prod(batch) * L * S * (E + Ev)``."""
    *batch, L, E = q_shape
    S, Ev = k_shape[-2], v_shape[-1]
    return math.prod(batch) * L * S * (E + Ev)


# ----------------------------------------------------------------------------------------------------
# fvcore jit handles: handle(inputs: list[torch._C.Value], outputs: list[torch._C.Value]) -> MACs


def _shape(value) -> list[int]:
    t = value.type()
    sizes = t.sizes() if isinstance(t, torch._C.TensorType) else None
    if sizes is None:  # every input a handle reads is a tensor the trace gave a shape
        raise ValueError(f"fvcore handle: expected a tensor of known shape, got {t}")
    return sizes


def _const(value) -> Any:
    try:
        return value.toIValue()
    except Exception:
        return None


def _fvcore_varlen_attention(inputs, outputs) -> int:
    # inputs: q, k, v, cu_seqlens, max_seqlen, scale, impl, seqlen_sq_sum, pos, table, window
    T, H, D = _shape(inputs[0])
    sq = _const(inputs[7])
    if sq is None or sq < 0:
        cu = _const(inputs[3])
        if isinstance(cu, torch.Tensor):
            from kernels.seqlens import seqlen_sq_sum

            sq = seqlen_sq_sum(cu)
        else:  # upper bound: every token attends to max_seqlen keys
            max_seqlen = _const(inputs[4]) or T
            warnings.warn(
                "spa::varlen_attention: sequence lengths not recorded in the trace; counting the upper "
                "bound T * max_seqlen",
                stacklevel=1,
            )
            sq = T * min(max_seqlen, T)
    return varlen_attention_macs(H, D, int(sq))


def _fvcore_varlen_attention_backward(inputs, outputs) -> int:
    # inputs: dout, q, k, v, cu_seqlens, max_seqlen, scale, impl, seqlen_sq_sum, pos, table, window
    T, H, D = _shape(inputs[1])
    sq = _const(inputs[8])
    if sq is None or sq < 0:
        sq = T * min(_const(inputs[5]) or T, T)
    return 5 * H * D * int(sq)


def _fvcore_sdpa(inputs, outputs) -> int:
    return sdpa_macs(_shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2]))


def _fvcore_token_scores(inputs, outputs) -> int:
    R, C = _shape(inputs[0])
    return R * C


def _fvcore_zero(inputs, outputs) -> int:
    return 0


FVCORE_HANDLES: dict[str, Any] = {
    "spa::varlen_attention": _fvcore_varlen_attention,
    "spa::varlen_attention_backward": _fvcore_varlen_attention_backward,
    "spa::pack_tokens": _fvcore_zero,
    "spa::unpack_tokens": _fvcore_zero,
    "spa::token_scores": _fvcore_token_scores,
    "aten::scaled_dot_product_attention": _fvcore_sdpa,
    "aten::nonzero_static": _fvcore_zero,
}


# ----------------------------------------------------------------------------------------------------
# torch.utils.flop_counter formulas (flops = 2 * MACs)

_registered = False


def register_flop_handles() -> dict[str, Any]:
    """Register the ``torch.utils.flop_counter`` formulas of the ``spa::`` ops (once) and return
    ``FVCORE_HANDLES`` for fvcore."""
    global _registered
    if _registered:
        return FVCORE_HANDLES
    from torch.utils.flop_counter import register_flop_formula

    import kernels.pack  # noqa: F401  (defines the ops)
    import kernels.scores  # noqa: F401
    import kernels.varlen_attention  # noqa: F401
    from kernels.seqlens import seqlen_sq_sum

    ops = torch.ops.spa

    @register_flop_formula(ops.varlen_attention, get_raw=True)
    def _varlen_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, impl, sq, *bias, out_val=None, **kwargs):
        if sq < 0:
            sq = seqlen_sq_sum(cu_seqlens)
        return 2 * varlen_attention_macs(q.shape[1], q.shape[2], sq)

    @register_flop_formula(ops.varlen_attention_backward, get_raw=True)
    def _varlen_bwd(dout, q, k, v, cu_seqlens, max_seqlen, scale, impl, sq, *bias, out_val=None, **kw):
        if sq < 0:
            sq = seqlen_sq_sum(cu_seqlens)
        return 2 * 5 * q.shape[1] * q.shape[2] * sq

    @register_flop_formula(ops.token_scores, get_raw=True)
    def _scores(x, weight, bias, *args, out_val=None, **kwargs):
        return 2 * x.shape[0] * x.shape[1]

    @register_flop_formula([ops.pack_tokens, ops.unpack_tokens], get_raw=True)
    def _zero(*args, out_val=None, **kwargs):
        return 0

    # flop_counter has no formula for SDPA's CPU kernel (it counts CPU attention as 0); use its own
    # GPU formulas for it, unless a newer torch already has one.
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    cpu_fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    cpu_bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if cpu_fwd is not None and cpu_fwd not in flop_registry:

        @register_flop_formula(cpu_fwd)
        def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(query, key, value)

    if cpu_bwd is not None and cpu_bwd not in flop_registry:

        @register_flop_formula(cpu_bwd)
        def _sdpa_cpu_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, query, key, value)

    _registered = True
    return FVCORE_HANDLES
