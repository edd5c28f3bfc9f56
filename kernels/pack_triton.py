"""Triton kernels and checked launchers for ``kernels.pack`` (gather / scatter of token rows).

Imported lazily by ``kernels.pack``; importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["pack_tokens_triton", "unpack_tokens_triton"]


@triton.jit
def _pack_kernel(
    x_ptr,
    idx_ptr,
    out_ptr,
    T,
    C,
    stride_x,
    stride_out,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # out[t, :] = x[idx[t], :]
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_c[None, :] < C)
    rows = tl.load(idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    vals = tl.load(x_ptr + rows[:, None] * stride_x + offs_c[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_out + offs_c[None, :], vals, mask=mask)


@triton.jit
def _unpack_kernel(
    packed_ptr,
    idx_ptr,
    out_ptr,
    T,
    C,
    stride_p,
    stride_out,
    ADD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # out[idx[t], :] = packed[t, :] (+ out[idx[t], :] when ADD); out already holds a copy of base.
    # Indices are unique, so no two programs touch the same row: no atomics needed.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_c[None, :] < C)
    rows = tl.load(idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    vals = tl.load(
        packed_ptr + offs_t.to(tl.int64)[:, None] * stride_p + offs_c[None, :], mask=mask, other=0.0
    )
    dst = out_ptr + rows[:, None] * stride_out + offs_c[None, :]
    if ADD:
        vals = (vals.to(tl.float32) + tl.load(dst, mask=mask, other=0.0).to(tl.float32)).to(vals.dtype)
    tl.store(dst, vals, mask=mask)


def _blocks(T: int, C: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(C, 1)), 128)
    block_t = max(1, min(64, 4096 // block_c))
    return block_t, block_c


def pack_tokens_triton(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x: (R, C) any strides (the kernel reads rows of unit column stride: others are copied first);
    indices: (T,) integer row ids -> (T, C) contiguous."""
    if x.dim() != 2 or indices.dim() != 1:
        raise ValueError(
            f"expected x (R, C) and indices (T,), got {tuple(x.shape)} and {tuple(indices.shape)}"
        )
    x = x.contiguous()
    indices = indices.contiguous()
    T, C = indices.numel(), x.shape[1]
    out = x.new_empty(T, C)
    if T == 0 or C == 0:
        return out
    block_t, block_c = _blocks(T, C)
    grid = (triton.cdiv(T, block_t), triton.cdiv(C, block_c))
    _pack_kernel[grid](x, indices, out, T, C, x.stride(0), out.stride(0), BLOCK_T=block_t, BLOCK_C=block_c)
    return out


def unpack_tokens_triton(
    packed: torch.Tensor, indices: torch.Tensor, base: torch.Tensor, add: bool
) -> torch.Tensor:
    """packed: (T, C); indices: (T,) unique row ids; base: (R, C), any strides -> (R, C) contiguous,
    out of place."""
    if packed.dim() != 2 or base.dim() != 2 or indices.dim() != 1 or packed.shape[0] != indices.numel():
        raise ValueError(
            f"expected packed (T, C), indices (T,), base (R, C); got {tuple(packed.shape)}, "
            f"{tuple(indices.shape)}, {tuple(base.shape)}"
        )
    packed = packed.to(base.dtype).contiguous()
    indices = indices.contiguous()
    out = base.clone(memory_format=torch.contiguous_format)  # one copy, row-major whatever base's strides
    T, C = packed.shape
    if T == 0 or C == 0:
        return out
    block_t, block_c = _blocks(T, C)
    grid = (triton.cdiv(T, block_t), triton.cdiv(C, block_c))
    _unpack_kernel[grid](
        packed, indices, out, T, C, packed.stride(0), out.stride(0), ADD=add, BLOCK_T=block_t, BLOCK_C=block_c
    )
    return out
