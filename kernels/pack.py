"""Pack (gather the selected tokens of a batch into one packed tensor) and unpack (scatter them back,
optionally adding to a residual), forward and backward: SPA's "pack" step (arXiv 2410.23608).

Layering (reference, fast kernel, checked launcher, op): ``*_ref`` (also the torch path) -> Triton kernel and checked
launcher (``kernels/pack_triton.py``, imported lazily) -> for unpack, the C++ CPU kernel
(``kernels/csrc/pack_cpu.cpp``, float32: one pass writing every output row once, where the torch path
clones, then scatters) -> ``torch.library.custom_op`` with its autograd formula (the
``autograd.Function``; a custom op also shows up by name, ``spa::pack_tokens``, in
``torch.jit.trace`` graphs, which fvcore counts) -> public function. Pack is one ``index_select``
on CPU: no kernel of ours beats it.

Token indices are flat row ids into ``x.view(B * N, C)``; they must be unique (they name selected
tokens), which makes unpack a plain scatter with no write conflicts and pack's gradient an unpack.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import cpp_kernels, cpu_op_threads, direct_call, resolve_impl, run_cpu

__all__ = ["pack_tokens", "unpack_tokens", "pack_tokens_ref", "unpack_tokens_ref"]


# ----------------------------------------------------------------------------------------------------
# reference (this is also the torch path: index_select / index_copy are already single fused kernels)


def pack_tokens_ref(x: Tensor, indices: Tensor) -> Tensor:
    """x: (R, C); indices: (T,) int64 -> (T, C) = x[indices]."""
    return x.index_select(0, indices)


def unpack_tokens_ref(packed: Tensor, indices: Tensor, base: Tensor, add: bool = False) -> Tensor:
    """packed: (T, C); indices: (T,) unique int64; base: (R, C) -> (R, C), out of place."""
    # a copy then an in-place scatter: measured ~2x faster on CPU than the out-of-place
    # index_add / index_copy, which take slower kernels
    out = base.clone()
    if add:
        return out.index_add_(0, indices, packed)
    return out.index_copy_(0, indices, packed)


# ----------------------------------------------------------------------------------------------------
# custom ops (the autograd layer)


@torch.library.custom_op("spa::pack_tokens", mutates_args=())
def _pack_op(x: Tensor, indices: Tensor, impl: str) -> Tensor:
    if impl == "triton":
        from kernels.pack_triton import pack_tokens_triton

        return pack_tokens_triton(x, indices)
    with cpu_op_threads(x, single_region=True):
        return pack_tokens_ref(x, indices)


@_pack_op.register_fake
def _(x, indices, impl):
    return x.new_empty(indices.shape[0], x.shape[1])


def _pack_setup(ctx, inputs, output):
    x, indices, impl = inputs
    ctx.save_for_backward(indices)
    ctx.x_shape = x.shape
    ctx.impl = impl


def _pack_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    zeros = grad.new_zeros(ctx.x_shape)
    return _unpack_op(grad, indices, zeros, False, ctx.impl), None, None


_pack_op.register_autograd(_pack_backward, setup_context=_pack_setup)


@torch.library.custom_op("spa::unpack_tokens", mutates_args=())
def _unpack_op(packed: Tensor, indices: Tensor, base: Tensor, add: bool, impl: str) -> Tensor:
    if impl == "triton":
        from kernels.pack_triton import unpack_tokens_triton

        return unpack_tokens_triton(packed, indices, base, add)
    if impl == "cpp":
        with cpu_op_threads(base, single_region=True):
            return cpp_kernels().unpack_tokens_fwd(packed, indices, base, add)
    with cpu_op_threads(base):
        return unpack_tokens_ref(packed, indices, base, add)


@_unpack_op.register_fake
def _(packed, indices, base, add, impl):
    return torch.empty_like(base)


def _unpack_setup(ctx, inputs, output):
    packed, indices, base, add, impl = inputs
    ctx.save_for_backward(indices)
    ctx.add = add
    ctx.impl = impl
    ctx.packed_shape = packed.shape


def _unpack_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    d_packed = _pack_op(grad, indices, ctx.impl)
    if ctx.add:
        d_base = grad
    else:  # replaced rows did not come from base
        d_base = _unpack_op(grad.new_zeros(ctx.packed_shape), indices, grad, False, ctx.impl)
    return d_packed, None, d_base, None, None


_unpack_op.register_autograd(_unpack_backward, setup_context=_unpack_setup)


# ----------------------------------------------------------------------------------------------------
# public functions


def _check_indices(indices: Tensor, device: torch.device) -> Tensor:
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D (T,), got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 (or int32), got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"indices on {indices.device} but tokens on {device}")
    return indices if indices.dtype is torch.int64 else indices.to(torch.int64)


def pack_tokens(x: Tensor, indices: Tensor, *, impl: str | None = None) -> Tensor:
    """Gather selected token rows.

    x: (B*N, C) tokens; indices: (T,) int64 unique row ids into x (image-major order gives the
    varlen / container layouts of ``kernels.seqlens``). Returns packed: (T, C). Differentiable in x.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (B*N, C), got shape {tuple(x.shape)}")
    indices = _check_indices(indices, x.device)
    name = resolve_impl(impl, x)
    if name in ("cpp", "torch") and direct_call(x):  # nothing to record
        return run_cpu("spa::pack_tokens", pack_tokens_ref, x, indices)
    return _pack_op(x, indices, name)


def unpack_tokens(
    packed: Tensor, indices: Tensor, base: Tensor, *, add: bool = False, impl: str | None = None
) -> Tensor:
    """Scatter packed rows back, out of place.

    packed: (T, C); indices: (T,) int64 unique row ids into base; base: (B*N, C).
    Returns (B*N, C): ``base`` with rows ``indices`` replaced by ``packed`` (``base[indices] + packed``
    when ``add``), all other rows unchanged (unselected tokens pass through). Differentiable in packed
    and base. ``packed`` is cast to ``base.dtype``.
    """
    if packed.dim() != 2 or base.dim() != 2:
        raise ValueError(f"packed and base must be 2-D, got {tuple(packed.shape)} and {tuple(base.shape)}")
    if packed.shape[1] != base.shape[1]:
        raise ValueError(f"channel mismatch: packed {tuple(packed.shape)} vs base {tuple(base.shape)}")
    indices = _check_indices(indices, base.device)
    if indices.numel() != packed.shape[0]:
        raise ValueError(f"{indices.numel()} indices for {packed.shape[0]} packed rows")
    if packed.device != base.device:
        raise ValueError(f"packed on {packed.device} but base on {base.device}")
    if packed.dtype != base.dtype:
        packed = packed.to(base.dtype)
    name = resolve_impl(impl, packed, base, cpp=True)
    if name in ("cpp", "torch") and direct_call(packed, base):  # nothing to record
        if name == "cpp":
            return run_cpu(
                "spa::unpack_tokens", cpp_kernels().unpack_tokens_fwd, packed, indices, base, bool(add)
            )
        return run_cpu(
            "spa::unpack_tokens", unpack_tokens_ref, packed, indices, base, bool(add), single_region=False
        )
    return _unpack_op(packed, indices, base, bool(add), name)
