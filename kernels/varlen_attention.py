"""Varlen (ragged) non-causal attention over packed tokens, forward and backward: the attention of SPA
(Select and Pack Attention, arXiv 2410.23608), where every image keeps a different number of tokens.

Convention of flash-attention's varlen API: ``q, k, v: (T, H, D)`` are the tokens of all sequences
written one after another, sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``, and a token
attends to every token of its own sequence (no causal mask). Empty sequences are allowed. The paper's
containers are the same call with ``cu_seqlens`` cut at image and container boundaries
(``kernels.seqlens.container_seqlens``).

Layering (../shared/STYLE.md): ``varlen_attention_ref`` -> Triton kernels and checked launchers
(``kernels/varlen_attention_triton.py``, imported lazily) -> the fast torch path for CPU
(``_varlen_attention_torch``: sequences grouped by length into a few batched SDPA calls) ->
``torch.library.custom_op`` ``spa::varlen_attention`` with its autograd formula -> ``varlen_attention``.

FLOPs (counted by ``kernels.flops``): ``2 * H * D * sum_i n_i^2`` multiply-adds forward (QK^T and
PV, ``n_i`` the length of sequence i).
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._dispatch import resolve_impl

__all__ = ["varlen_attention", "varlen_attention_ref"]


# ----------------------------------------------------------------------------------------------------
# reference


def varlen_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, softmax_scale: float | None = None
) -> Tensor:
    """Plain per-sequence softmax attention in the dtype of the inputs (pass float64 for a reference).

    q, k, v: (T, H, D); cu_seqlens: (S+1,) int. Returns (T, H, D). Rows of no sequence (none when
    ``cu_seqlens[-1] == T``) are zero.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        p = torch.softmax((qi @ ki.transpose(-1, -2)) * scale, dim=-1)  # (H, n, n)
        out[s:e] = (p @ vi).transpose(0, 1)
    return out


# ----------------------------------------------------------------------------------------------------
# fast torch path (CPU): group sequences of similar length into batched SDPA calls

# Cost model of one batched SDPA call of G sequences padded to P (microseconds, 2-core CPU, fp32):
# fixed call cost + per-token cost (gathers, copies) + per key-query pair cost; calibrated with
# kernels.bench --calibrate. Only the ratios matter for the plan.
_CALL_US = 40.0
_TOKEN_US_PER_HD = 0.0006
_PAIR_US_PER_HD = 0.000035


def _group_cost(n_seq: int, pad_len: int, hd: int) -> float:
    return _CALL_US + n_seq * hd * (_TOKEN_US_PER_HD * pad_len + _PAIR_US_PER_HD * pad_len * pad_len)


@lru_cache(maxsize=512)
def _plan_groups(lengths: tuple[int, ...], hd: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Partition the non-empty sequences into groups, each run as one SDPA call padded to its longest.

    Sequences sorted by length; a group is a run of consecutive distinct lengths; dynamic programming
    over the distinct lengths minimises the summed ``_group_cost``. Returns ((seq ids), pad_len) pairs.
    """
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n > 0:
            by_len.setdefault(n, []).append(i)
    distinct = sorted(by_len)
    if not distinct:
        return ()
    mult = [len(by_len[n]) for n in distinct]
    K = len(distinct)
    best = [0.0] + [math.inf] * K  # best[j]: cost of the first j distinct lengths
    cut = [0] * (K + 1)
    for j in range(1, K + 1):
        n_seq = 0
        pad = distinct[j - 1]
        for i in range(j, 0, -1):  # group = distinct[i-1 .. j-1], padded to distinct[j-1]
            n_seq += mult[i - 1]
            c = best[i - 1] + _group_cost(n_seq, pad, hd)
            if c < best[j]:
                best[j], cut[j] = c, i - 1
    groups = []
    j = K
    while j > 0:
        i = cut[j]
        ids = tuple(s for n in distinct[i:j] for s in by_len[n])
        groups.append((ids, distinct[j - 1]))
        j = i
    return tuple(reversed(groups))


def _varlen_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, softmax_scale: float
) -> Tensor:
    """Same result as the reference, in a few batched ``scaled_dot_product_attention`` calls.

    Differentiable through torch autograd (the custom op's backward recomputes through it).
    """
    T, H, D = q.shape
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], tuple(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    out = q.new_zeros(T, H, D) if bounds[-1] < T or bounds[0] > 0 else q.new_empty(T, H, D)
    pieces, rows = [], []
    for ids, pad in _plan_groups(lengths, H * D):
        if len(ids) == 1:  # one sequence: views, no copies
            s = starts[ids[0]]
            qi, ki, vi = (t[s : s + pad].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, n, D)
            o = F.scaled_dot_product_attention(qi, ki, vi, scale=softmax_scale)
            out[s : s + pad] = o[0].transpose(0, 1)
            continue
        G = len(ids)
        st = torch.tensor([starts[i] for i in ids], dtype=torch.int64)  # (G,)
        ln = torch.tensor([lengths[i] for i in ids], dtype=torch.int64)  # (G,)
        pos = torch.arange(pad, dtype=torch.int64)
        valid = pos[None, :] < ln[:, None]  # (G, P)
        # padded slots read their sequence's first row: finite values, masked out as keys
        idx = (st[:, None] + torch.where(valid, pos[None, :], 0)).reshape(-1).to(q.device)
        qg, kg, vg = (
            t.index_select(0, idx).view(G, pad, H, D).transpose(1, 2) for t in (q, k, v)
        )  # (G, H, P, D)
        mask = None
        if not bool(valid.all()):
            mask = valid.to(q.device)[:, None, None, :]  # (G, 1, 1, P) keys
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=softmax_scale)
        o = o.transpose(1, 2).reshape(G * pad, H, D)  # (G*P, H, D)
        if mask is None:
            pieces.append(o)
            rows.append(idx)
        else:
            keep = valid.reshape(-1).nonzero().squeeze(1).to(q.device)
            pieces.append(o.index_select(0, keep))
            rows.append(idx.index_select(0, keep))
    if pieces:
        out = (
            out.index_copy(0, torch.cat(rows), torch.cat(pieces))
            if len(pieces) > 1
            else out.index_copy(0, rows[0], pieces[0])
        )
    return out


# ----------------------------------------------------------------------------------------------------
# custom op (the autograd layer)


def _forward_impl(q, k, v, cu_seqlens, max_seqlen, scale, impl):
    if impl == "triton":
        from kernels.varlen_attention_triton import varlen_attention_fwd_triton

        return varlen_attention_fwd_triton(q, k, v, cu_seqlens, max_seqlen, scale)
    fn = varlen_attention_ref if impl == "ref" else _varlen_attention_torch
    return fn(q, k, v, cu_seqlens, scale), q.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("spa::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
    impl: str,
    seqlen_sq_sum: int,
) -> tuple[Tensor, Tensor]:
    """Returns (out (T, H, D), lse). ``lse: (H, T) float32`` for Triton (the backward needs it),
    empty for the torch paths (their backward recomputes). ``seqlen_sq_sum`` (sum n_i^2, or -1 when
    unknown) is not used by the computation: it is recorded in traces so that FLOP counters that
    cannot read ``cu_seqlens`` (fvcore's jit handles) still count exactly."""
    out, lse = _forward_impl(q, k, v, cu_seqlens, max_seqlen, softmax_scale, impl)
    return out, lse


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, impl, seqlen_sq_sum):
    lse_shape = (q.shape[1], q.shape[0]) if impl == "triton" else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("spa::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
    impl: str,
    seqlen_sq_sum: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton backward (dq, dk, dv); the torch paths differentiate a recomputation instead."""
    if impl != "triton":
        raise ValueError(f"spa::varlen_attention_backward serves impl='triton' only, got {impl!r}")
    from kernels.varlen_attention_triton import varlen_attention_bwd_triton

    return varlen_attention_bwd_triton(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale)


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, impl, seqlen_sq_sum):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, impl, sq = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, softmax_scale, impl, sq)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    max_seqlen, softmax_scale, impl, sq = ctx.args
    if impl == "triton":
        dq, dk, dv = _varlen_attention_backward_op(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, impl, sq
        )
    else:
        # torch paths: differentiate a recomputation (SDPA's own backward kernels do the work); this
        # runs in the autograd engine, outside the op, where autograd can record.
        fn = varlen_attention_ref if impl == "ref" else _varlen_attention_torch
        with torch.enable_grad():
            qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = fn(qr, kr, vr, cu_seqlens, softmax_scale)
            dq, dk, dv = torch.autograd.grad(o, (qr, kr, vr), dout, allow_unused=True)
        dq, dk, dv = (torch.zeros_like(t) if g is None else g for g, t in zip((dq, dk, dv), (q, k, v)))
    return dq, dk, dv, None, None, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------
# public function


@contextlib.contextmanager
def _untraced():
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    *,
    impl: str | None = None,
) -> Tensor:
    """Non-causal attention within each sequence of a packed batch.

    q, k, v: (T, H, D) (same shapes; any head dim); cu_seqlens: (S+1,) int32, non-decreasing, from 0
    to T (empty sequences allowed); max_seqlen: the longest sequence (an upper bound is fine; the
    Triton kernel launches over it); softmax_scale: default ``D ** -0.5``; impl: see
    ``kernels._dispatch`` ("auto" | "triton" | "torch" | "ref"; default env ``SPA_ATTN_IMPL`` or auto).
    Returns out: (T, H, D) in the dtype of q. Differentiable in q, k, v.
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (T, H, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor (S+1,), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens on {cu_seqlens.device} but q on {q.device}")
    cu_seqlens = cu_seqlens.to(torch.int32)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    name = resolve_impl(impl, q, k, v)
    if cu_seqlens.is_cuda and not torch.jit.is_tracing():
        sq = -1  # reading cu_seqlens would sync the GPU; only a trace needs the number
    else:
        with _untraced():  # host reads, kept out of traces (fvcore would list them as ops)
            b = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(b[:-1], b[1:])]
        if b[0] != 0 or b[-1] > q.shape[0] or any(n < 0 for n in lengths):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to at most T={q.shape[0]}, got {b}")
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than a sequence of cu_seqlens")
        sq = sum(n * n for n in lengths)
    out, _ = _varlen_attention_op(q, k, v, cu_seqlens, int(max_seqlen), scale, name, sq)
    return out
