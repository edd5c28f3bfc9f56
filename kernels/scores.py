"""Token scores: one linear score per token, ``s = x @ w + b`` (a Linear with one output), forward and
backward. The gate of SPA (Select and Pack Attention, arXiv 2410.23608) scores every token of every
image with it before anything is selected, so its cost does not shrink with the kept ratio.

Layering (reference, fast kernel, checked launcher, op): ``token_scores_ref`` (``F.linear``; also the torch path, which on
CUDA is cuBLAS's GEMV) -> the C++ CPU kernel (``kernels/csrc/scores_cpu.cpp``, float32: one parallel
region over rows; torch runs a one-output Linear as a GEMM with n = 1 that kept about one core busy on
this project's machine) -> ``torch.library.custom_op`` around the kernel with its autograd formula (named
``spa::token_scores`` in traces; fvcore counts it with ``kernels.FVCORE_HANDLES``: ``R * C``
multiply-adds, as it counts the Linear) -> public function, which runs the reference itself for every
other implementation. The backward runs in torch: ``dx = ds w^T``, ``dw = x^T ds``, ``db = sum(ds)``.
No Triton kernel: on CUDA the torch path is cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._dispatch import cpp_kernels, cpu_op_threads, direct_call, resolve_impl, run_cpu

__all__ = ["token_scores", "token_scores_ref"]


def token_scores_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x: (..., C); weight: (C,) or (1, C); bias: (1,) or None -> (...,) = x @ weight + bias. Also the
    torch path (traced as ``aten::linear``, which fvcore counts itself)."""
    return F.linear(x, weight.reshape(1, -1), bias).squeeze(-1)


@torch.library.custom_op("spa::token_scores", mutates_args=())
def _scores_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    with cpu_op_threads(x, single_region=True):
        return cpp_kernels().token_scores_fwd(x, weight, bias)


@_scores_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0])


def _scores_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _scores_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = grad[:, None] * weight[None, :].to(grad.dtype)  # (R, C)
    if ctx.needs_input_grad[1]:
        dw = (grad[None, :] @ x).reshape(weight.shape).to(weight.dtype)  # (C,)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = grad.sum().reshape(1)
    return dx, dw, db


_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)


def token_scores(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, impl: str | None = None) -> Tensor:
    """One score per token: ``F.linear(x, weight, bias).squeeze(-1)``.

    x: (..., C); weight: (1, C) or (C,) (an ``nn.Linear(C, 1)``'s weight); bias: (1,) or None.
    Returns (...,) in the dtype ``F.linear`` gives. Differentiable in x, weight and bias. Under
    autocast, or for dtypes other than float32, the torch path runs (the C++ kernel is float32 CPU).
    """
    C = x.shape[-1]
    if weight.numel() != C or weight.dim() > 2 or (weight.dim() == 2 and weight.shape[0] != 1):
        raise ValueError(
            f"weight must be (1, {C}) or ({C},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.numel() != 1:
        raise ValueError(f"bias must hold one value, got shape {tuple(bias.shape)}")
    if torch._C._is_any_autocast_enabled():  # autocast decides the dtype: leave it to F.linear
        return token_scores_ref(x, weight, bias)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if resolve_impl(impl, *tensors, cpp=True) != "cpp":  # torch, cuBLAS on CUDA: no kernel of ours there
        return token_scores_ref(x, weight, bias)
    if direct_call(
        x, weight, bias
    ):  # nothing to record: the kernel (which takes (..., C)) without its custom op
        return run_cpu("spa::token_scores", cpp_kernels().token_scores_fwd, x, weight, bias)
    return _scores_op(x.reshape(-1, C), weight.reshape(C), bias).reshape(x.shape[:-1])
