"""Triton kernels and checked launchers for ``kernels.varlen_attention`` (flash-attention style:
online softmax forward saving the softmax statistics, backward as one dQ kernel over query blocks
(which in fp32 also recomputes the statistics exactly) then one dK/dV kernel over key blocks; no
atomics).

One program per (block of rows, sequence, head); a sequence's rows are ``cu_seqlens[s]:cu_seqlens[s+1]``
and the grid spans ``max_seqlen``, so programs past a short sequence's end do nothing. Head dims that
are not powers of two are padded to ``BLOCK_D`` inside the kernel (masked loads, zeros). Softmax runs
in base 2 (``exp2``) with the scale folded in. The forward saves, per row, the running max ``m`` and
``1 / l`` (the softmax denominator) rather than one log-sum-exp: the backward recomputes
``P = exp2(S - m) / l`` as torch's softmax does, where ``exp2(S - lse)`` would add the rounding of a
large ``lse`` to every probability of the row.

Imported lazily by ``kernels.varlen_attention``; importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["varlen_attention_fwd_triton", "varlen_attention_bwd_triton"]

_LOG2E = 1.4426950408889634


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    M,
    INVL,
    CU,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(CU + seq).to(tl.int64)
    n = tl.load(CU + seq + 1).to(tl.int64) - start

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n
    mask_d = offs_d < D
    rows = start + offs_m

    q = tl.load(
        Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # programs past the end of the sequence run no iteration and store nothing
    hi = tl.where(pid_m * BLOCK_M < n, n, 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < n
        kt = tl.load(
            K + (start + cols)[None, :] * stride_kt + h * stride_kh + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + (start + cols)[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(
        O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )
    tl.store(M + h * stride_lh + rows, m_i, mask=mask_m)
    tl.store(INVL + h * stride_lh + rows, 1.0 / l_safe, mask=mask_m)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    M,
    INVL,
    DELTA,
    DK,
    DV,
    CU,
    qk_scale,
    sm_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_lh,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # dK, dV of one block of keys: loop over the sequence's query blocks
    pid_n = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(CU + seq).to(tl.int64)
    n = tl.load(CU + seq + 1).to(tl.int64) - start

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    cols = start + offs_n

    k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    hi = tl.where(pid_n * BLOCK_N < n, n, 0)
    for start_m in range(0, hi, BLOCK_M):
        rows_m = start_m + offs_m
        mask_m = rows_m < n
        rows = start + rows_m
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=mask_md, other=0.0)
        do = tl.load(
            DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask_md, other=0.0
        )
        m = tl.load(M + h * stride_lh + rows, mask=mask_m, other=0.0)
        inv_l = tl.load(INVL + h * stride_lh + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + h * stride_lh + rows, mask=mask_m, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    dk = dk * sm_scale
    tl.store(
        DK + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=mask_nd,
    )
    tl.store(
        DV + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=mask_nd,
    )


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    M,
    INVL,
    DELTA,
    DQ,
    CU,
    qk_scale,
    sm_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_lh,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT_STATS: tl.constexpr,
):
    # dQ of one block of queries: loop over the sequence's key blocks
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(CU + seq).to(tl.int64)
    n = tl.load(CU + seq + 1).to(tl.int64) - start

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    rows = start + offs_m

    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=mask_md, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask_md, other=0.0)
    m = tl.load(M + h * stride_lh + rows, mask=mask_m, other=0.0)
    hi = tl.where(pid_m * BLOCK_M < n, n, 0)
    if EXACT_STATS:
        # Recompute the softmax denominator l and delta = rowsum(P * dP) from P itself, rather than
        # the forward's l (rounded at every online-softmax rescale) and rowsum(dO * O) (with O
        # rounded): in fp32 those roughly double the error of dQ, dK, dV against torch's.
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        num = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            cols_n = start_n + offs_n
            mask_n = cols_n < n
            cols = start + cols_n
            mask_nd = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=mask_nd, other=0.0
            )
            v = tl.load(
                V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=mask_nd, other=0.0
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            e = tl.exp2(s - m[:, None])
            e = tl.where(mask_m[:, None] & mask_n[None, :], e, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            den += tl.sum(e, 1)
            num += tl.sum(e * dp, 1)
        inv_l = 1.0 / tl.where(den > 0.0, den, 1.0)
        delta = num * inv_l
        tl.store(INVL + h * stride_lh + rows, inv_l, mask=mask_m)  # both read by the dK/dV kernel
        tl.store(DELTA + h * stride_lh + rows, delta, mask=mask_m)
    else:
        inv_l = tl.load(INVL + h * stride_lh + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + h * stride_lh + rows, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, hi, BLOCK_N):
        cols_n = start_n + offs_n
        mask_n = cols_n < n
        cols = start + cols_n
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq = dq * sm_scale
    tl.store(
        DQ + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=mask_md,
    )


# ----------------------------------------------------------------------------------------------------
# checked launchers


def _config(q: torch.Tensor) -> tuple[int, int, int, str, int]:
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    if q.is_cuda:
        block = 64 if block_d <= 64 else 32
        num_warps = 4
    else:  # the interpreter: small blocks so that short test sequences still span several blocks
        block, num_warps = 16, 1
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 stays exact on tensor-core GPUs
    return block, block, block_d, precision, num_warps


def _check(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must be (T, H, D) of one shape: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"Triton varlen attention supports fp32/fp16/bf16, got {q.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError("q, k, v and cu_seqlens must be on one device")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the head dim of q, k, v must be contiguous")


def varlen_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: (T, H, D); cu_seqlens: (S+1,) int32 -> out (T, H, D), softmax stats (2, H, T) float32."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    _check(q, k, v, cu_seqlens)
    cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    T, H, D = q.shape
    out = torch.zeros_like(q)  # rows of no sequence stay zero
    lse = torch.zeros(2, H, T, device=q.device, dtype=torch.float32)  # [0]: row max m, [1]: 1 / l
    S = cu_seqlens.numel() - 1
    if T == 0 or S == 0 or max_seqlen == 0:
        return out, lse
    block_m, block_n, block_d, precision, num_warps = _config(q)
    grid = (triton.cdiv(max_seqlen, block_m), S, H)
    _fwd_kernel[grid](
        q, k, v, out, lse[0], lse[1], cu_seqlens, softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(1), D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    return out, lse


def varlen_attention_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), each (T, H, D), given the forward's out and lse."""
    q, k, v, out, dout = (t.contiguous() for t in (q, k, v, out, dout))
    _check(q, k, v, cu_seqlens)
    cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    T, H, D = q.shape
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    S = cu_seqlens.numel() - 1
    if T == 0 or S == 0 or max_seqlen == 0:
        return dq, dk, dv
    # delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id, the softmax backward's correction term, and 1/l.
    # In fp32 the dQ kernel recomputes both from P; in fp16/bf16 the forward's l and the O form
    # (flash-attention's) suffice.
    lse = lse.contiguous()
    m = lse[0]  # (H, T) row max, base 2
    exact = q.dtype == torch.float32
    if exact:
        inv_l = torch.empty(H, T, device=q.device, dtype=torch.float32)  # written by the dQ kernel
        delta = torch.empty(H, T, device=q.device, dtype=torch.float32)
    else:
        inv_l = lse[1]
        delta = (dout.float() * out.float()).sum(-1).t().contiguous()  # (H, T)
    block_m, block_n, block_d, precision, num_warps = _config(q)
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, num_warps=num_warps)
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), m.stride(0), D,
    )  # fmt: skip
    qk_scale = softmax_scale * _LOG2E
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), S, H)](
        q, k, v, dout, m, inv_l, delta, dq, cu_seqlens, qk_scale, softmax_scale, *strides,
        EXACT_STATS=exact, **common,
    )  # fmt: skip
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), S, H)](
        q, k, v, dout, m, inv_l, delta, dk, dv, cu_seqlens, qk_scale, softmax_scale, *strides, **common
    )
    return dq, dk, dv
