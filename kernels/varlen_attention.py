"""Varlen (ragged) non-causal attention over packed tokens, forward and backward, with Swin's relative
position bias and shift mask: the attention of SPA (Select and Pack Attention, arXiv 2410.23608), where
every image keeps a different number of tokens.

Convention of flash-attention's varlen API: ``q, k, v: (T, H, D)`` are the tokens of all sequences
written one after another, sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``, and a token
attends to every token of its own sequence (no causal mask). Empty sequences are allowed. The paper's
containers are the same call with ``cu_seqlens`` cut at image and container boundaries
(``kernels.seqlens.container_seqlens``). With ``bias`` (``kernels.position_bias.PositionBias``), the
score of query i and key j in head h gets ``table[idx(i, j), h]`` from the two tokens' places, and
pairs of different shift regions are masked.

Layering (each kernel beside its reference): ``varlen_attention_ref`` -> the C++ CPU kernel
(``kernels/csrc/varlen_attention_cpu.cpp``, built on first use by ``kernels.cpu_ext``; float32
forward) -> the torch path (``_varlen_attention_torch``: container rows in one masked call, other
sequences as explicit softmax attention on views, those shorter than 16 tokens together in one padded
call; scores in float64 for float32 on CPU, SDPA's kernels where the scores keep the input dtype;
every dtype, and the backward of the CPU paths, incl. the bias table's gradient)
-> ``torch.library.custom_op`` ``spa::varlen_attention`` with its autograd formula ->
``varlen_attention``. On CUDA, impl "triton" is torch's FlexAttention (compiled to Triton by torch):
``kernels.flex_attention.flex_varlen_attention``, imported when it runs and called outside the custom
op (FlexAttention has its own autograd); under a FLOP count (``torch.jit.trace``, as fvcore traces,
or ``FlopCounterMode``: ``kernels._dispatch.counting_flops``) the custom op runs its torch path
instead, so that FLOPs are counted the same way on every path.

FLOPs (counted by ``kernels.flops``): ``2 * H * D * sum_i n_i^2`` multiply-adds forward (QK^T and
PV, ``n_i`` the length of sequence i); the bias adds none.

The module reads top to bottom as flash-attention's kernels do: reference, torch path, C++ launcher,
custom op with its autograd formula, public function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._dispatch import (
    counting_flops,
    cpp_kernels,
    cpu_op_threads,
    direct_call,
    resolve_impl,
    run_cpu,
    untraced,
)
from kernels.position_bias import PositionBias, check_position_bias, pair_bias, relative_index
from kernels.seqlens import check_varlen_inputs, sequence_ids

__all__ = ["varlen_attention", "varlen_attention_ref"]


# ----------------------------------------------------------------------------------------------------
# reference


def varlen_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    softmax_scale: float | None = None,
    bias: PositionBias | None = None,
) -> Tensor:
    """Plain per-sequence softmax attention in the dtype of the inputs (pass float64 for a reference).

    q, k, v: (T, H, D); cu_seqlens: (S+1,) int; bias: Swin's relative position bias and shift mask
    from the tokens' places (``kernels.position_bias``), or None. Returns (T, H, D). Rows of no
    sequence (none when ``cu_seqlens[-1] == T``) are zero. Differentiable in q, k, v and ``bias.table``.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        scores = (qi @ ki.transpose(-1, -2)) * scale  # (H, n, n)
        if bias is not None:
            scores = scores + pair_bias(bias.pos[s:e], bias.pos[s:e], bias.table, bias.window).to(
                scores.dtype
            )
        p = torch.softmax(scores, dim=-1)  # (H, n, n)
        out[s:e] = (p @ vi).transpose(0, 1)
    return out


# ----------------------------------------------------------------------------------------------------
# torch path (CPU): container rows in one masked call, other sequences one call each on views, the
# short ones together in one padded call

# Sequences shorter than _SHORT run together in one call, padded to the longest of them (a gather in,
# a scatter out); the others one call each on views of q, k, v (no copies). Why: at SPA's sizes a
# call's fixed cost is about that of its arithmetic, so many short sequences cost less as one call.
# Where it matters is the training step's small stages (``python -m harness.bench train-step``: 7x7
# and 4x4 token stages, a few tokens per image and container); the block rows (``blocks --strategies
# varlen,containers --impl torch``, 14x14 tokens, mostly longer sequences) time the same either way.
# 16 is a round value, not a tuned one.
_SHORT = 16


class _Call(NamedTuple):
    """One attention call over G sequences padded to P tokens.

    ``idx`` None: one sequence, rows ``start:start+P`` of q, k, v (views). Else ``idx`` (G*P,) gathers
    the batch (padded slots read their sequence's first row: finite values), ``valid`` (G*P,) bool marks
    its real slots and ``mask`` (G, 1, 1, P) its real keys."""

    start: int
    G: int
    P: int
    idx: Tensor | None = None
    valid: Tensor | None = None
    mask: Tensor | None = None


def _container_rows(bounds: list[int]) -> int:
    """The shortest row length R, from the longest sequence up to twice it, such that every multiple
    of R up to the end is a sequence boundary (the layout of the paper's containers: R = L, its pieces
    at least half a container); 0 when there is none. Longer rows would be mostly masked pairs.

    The forward runs such rows as one call (views, no gather) in place of one per piece; the backward
    does not: it computes every masked pair of a row several times over (P, dP, dS), and at 14x14
    tokens takes about twice as long over rows as per piece."""
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    max_len, end = max(lengths, default=0), bounds[-1]
    if bounds[0] != 0 or max_len < 2:
        return 0
    cuts = set(bounds)
    for R in range(max_len, min(2 * max_len, end // 2) + 1):
        if all(m in cuts for m in range(R, end + 1, R)):
            return R
    return 0


def _calls(bounds: list[int], device: torch.device) -> list[_Call]:
    """The calls of the torch path for the sequences ``bounds[i]:bounds[i+1]`` (empty ones need none)."""
    calls, short = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e - s >= _SHORT:
            calls.append(_Call(s, 1, e - s))
        elif e > s:
            short.append((s, e - s))
    if len(short) == 1:
        calls.append(_Call(short[0][0], 1, short[0][1]))
    elif short:
        st, ln = (torch.tensor(c, dtype=torch.int64) for c in zip(*short))  # (G,)
        P = int(ln.max())
        pos = torch.arange(P, dtype=torch.int64)
        valid = pos[None, :] < ln[:, None]  # (G, P)
        idx = torch.where(valid, st[:, None] + pos[None, :], st[:, None]).reshape(-1)
        mask = valid[:, None, None, :]
        calls.append(_Call(-1, len(short), P, idx.to(device), valid.reshape(-1).to(device), mask.to(device)))
    return calls


def _operands(ts: tuple[Tensor, ...], c: _Call) -> list[Tensor]:
    """Each (T, H, D) -> (G, H, P, D): views for one sequence, else the gathered batch."""
    if c.idx is None:
        return [t[c.start : c.start + c.P].transpose(0, 1).unsqueeze(0) for t in ts]
    return [t.index_select(0, c.idx).view(c.G, c.P, *t.shape[1:]).transpose(1, 2) for t in ts]


def _store(out: Tensor, c: _Call, res: Tensor) -> None:
    """Writes a call's (G, H, P, D) result into its rows of ``out`` (T, H, D)."""
    res = res.transpose(1, 2).reshape(c.G * c.P, *out.shape[1:])
    if c.idx is None:
        out[c.start : c.start + c.P] = res
    else:
        out.index_copy_(0, c.idx[c.valid], res[c.valid].to(out.dtype))


def _positions(bias: PositionBias, c: _Call) -> Tensor:
    """(G, P, 3) places of a call's tokens."""
    pos = bias.pos[c.start : c.start + c.P] if c.idx is None else bias.pos.index_select(0, c.idx)
    return pos.view(c.G, c.P, 3)


def _score_dtype(t: Tensor) -> torch.dtype:
    """The dtype the torch path computes scores and softmax of ``t``'s dtype in on CPU: float64 for
    float32 (as the C++ kernel), float32 for half types; on CUDA ``t.dtype`` (SDPA's kernels). Why: a
    float32 dot product errs about sqrt(D) rounding steps of its running sum; with large logits
    (softmax scale 1, inputs a few times unit scale) that error decides the output's, and in float32
    the path was one draw of torch's own error distribution, above twice torch's error in ~1% of
    random cases. P V stays in the input dtype."""
    if t.is_cuda:
        return t.dtype
    return {torch.float32: torch.float64, torch.float16: torch.float32, torch.bfloat16: torch.float32}.get(
        t.dtype, t.dtype
    )


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """Softmax attention of (..., H, n, D) operands, scores in ``_score_dtype``; mask: additive
    (in that dtype) or boolean (True: attend), broadcast over (..., H, n, n), or None."""
    wide = _score_dtype(q)
    if wide is q.dtype:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * scale  # (..., H, n, n)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, dim=-1).to(q.dtype) @ v


def _output(like: Tensor, cu_seqlens: Tensor) -> Tensor:
    """A contiguous (T, H, D) result tensor; zero where no sequence writes (rows past ``cu_seqlens[-1]``)."""
    alloc = torch.empty if int(cu_seqlens[-1]) == like.shape[0] else torch.zeros
    return alloc(like.shape, dtype=like.dtype, device=like.device)


def _varlen_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    softmax_scale: float,
    bias: PositionBias | None = None,
) -> Tensor:
    """Same result as the reference: container rows (``_container_rows``) in one masked call, then the
    calls of ``_calls``; scores in ``_score_dtype``. ``bias`` is added to the scores of each call (an
    additive mask, baddbmm's input for a single sequence)."""
    T, H, D = q.shape
    wide = _score_dtype(q)
    if bias is not None:
        bias = bias._replace(table=bias.table.to(wide))  # the bias in the scores' dtype
    out = _output(q, cu_seqlens)
    bounds = cu_seqlens.tolist()
    R = _container_rows(bounds)
    if R:
        n_rows = bounds[-1] // R
        qr, kr, vr = (
            t[: n_rows * R].view(n_rows, R, H, D).transpose(1, 2) for t in (q, k, v)
        )  # (rows, H, R, D)
        seq = sequence_ids(cu_seqlens, n_rows * R).view(n_rows, R)  # sequence of every slot
        mask = None
        if not bool((seq == seq[:, :1]).all()):  # some row holds several sequences: block-diagonal
            mask = (seq[:, :, None] == seq[:, None, :])[:, None]  # (rows, 1, R, R)
        if bias is not None:
            pos = bias.pos[: n_rows * R].view(n_rows, R, 3)
            b = pair_bias(pos, pos, bias.table, bias.window)  # (rows, H, R, R)
            mask = b if mask is None else b.masked_fill(~mask, float("-inf"))
        o = _attend(qr, kr, vr, softmax_scale, mask)
        out[: n_rows * R] = o.transpose(1, 2).reshape(n_rows * R, H, D)
        bounds = [b for b in bounds if b >= n_rows * R]  # the last, partial row
    zero = q.new_zeros((), dtype=wide)  # baddbmm input, ignored (beta=0)
    for c in _calls(bounds, q.device):
        if c.idx is None:  # one sequence: straight on views, its output written in place (no copies)
            s, e = c.start, c.start + c.P
            qi, ki = q[s:e].transpose(0, 1).to(wide), k[s:e].permute(1, 2, 0).to(wide)  # (H, n, D), (H, D, n)
            if bias is None:
                scores = torch.baddbmm(zero, qi, ki, beta=0.0, alpha=softmax_scale)  # (H, n, n)
            else:
                b = pair_bias(bias.pos[s:e], bias.pos[s:e], bias.table, bias.window)  # (H, n, n)
                scores = torch.baddbmm(b, qi, ki, alpha=softmax_scale)
            p = torch.softmax(scores, dim=-1).to(q.dtype)
            torch.bmm(p, v[s:e].transpose(0, 1), out=out[s:e].transpose(0, 1))
            continue
        mask = c.mask
        if bias is not None:
            pos = _positions(bias, c)
            b = pair_bias(pos, pos, bias.table, bias.window)  # (G, H, P, P)
            mask = b if mask is None else b.masked_fill(~mask, float("-inf"))
        qg, kg, vg = _operands((q, k, v), c)
        _store(out, c, _attend(qg, kg, vg, softmax_scale, mask))
    return out


def _varlen_attention_torch_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    softmax_scale: float,
    bias: PositionBias | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dtable) of ``_varlen_attention_torch``: explicit softmax backward per call of
    ``_calls`` (batched matmuls), computed in ``_score_dtype`` (float64 for float32 inputs: dS = P (dP -
    rowsum) cancels, and dQ, dK sum it over the sequence; in float32 the path was one draw of torch's
    own error distribution, ~1% of random cases above twice torch's; it costs ~2.5x the float32
    backward at SPA's sizes). dtable (None without ``bias``) sums dS into the table by the pair index."""
    H = q.shape[1]
    dq, dk, dv = _output(q, cu_seqlens), _output(k, cu_seqlens), _output(v, cu_seqlens)
    wide = _score_dtype(q)
    table = None if bias is None else bias.table.to(wide)
    dtable = None if table is None else torch.zeros_like(table)  # ((2M-1)^2, H)
    for c in _calls(cu_seqlens.tolist(), q.device):
        qg, kg, vg, dog = (t.to(wide) for t in _operands((q, k, v, dout), c))  # (G, H, P, D)
        s = (qg @ kg.transpose(-1, -2)) * softmax_scale  # (G, H, P, P)
        idx = None
        if bias is not None and table is not None:
            pos = _positions(bias, c)
            idx, allowed = relative_index(pos, pos, bias.window)  # (G, P, P): once for all heads
            s = (s + table[idx].permute(0, 3, 1, 2)).masked_fill(~allowed[:, None], float("-inf"))
        if c.mask is not None:
            s = s.masked_fill(~c.mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if c.mask is not None:  # padded query slots (garbage dO) must not reach dK, dV, the table
            p = p.masked_fill(~c.mask.transpose(-1, -2), 0.0)
        dp = dog @ vg.transpose(-1, -2)  # (G, H, P, P)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # zero where p is: masked pairs, padding
        _store(dv, c, p.transpose(-1, -2) @ dog)
        _store(dq, c, (ds @ kg) * softmax_scale)
        _store(dk, c, (ds.transpose(-1, -2) @ qg) * softmax_scale)
        if dtable is not None and idx is not None:
            dtable.index_add_(0, idx.reshape(-1), ds.permute(0, 2, 3, 1).reshape(-1, H))
    if bias is not None and dtable is not None:
        dtable = dtable.to(bias.table.dtype)
    return dq, dk, dv, dtable


# custom op (the autograd layer)


def _varlen_attention_cpp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    softmax_scale: float,
    bias: PositionBias | None = None,
) -> Tensor:
    """Launcher of the C++ kernel: (T, H, D) float32 CPU -> (T, H, D) contiguous. Strides the kernel
    reads in place (any over T and H, the last dim contiguous or of size 1) pass as they are; other
    layouts are copied. The kernel checks its inputs itself."""
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (q, k, v))
    if bias is None:
        return cpp_kernels().varlen_attention_fwd(q, k, v, cu_seqlens, softmax_scale)
    table = bias.table.detach().to(torch.float32)
    return cpp_kernels().varlen_attention_fwd(
        q, k, v, cu_seqlens, softmax_scale, bias.pos, table, int(bias.window)
    )


def _forward_impl(q, k, v, cu_seqlens, scale, impl, bias):
    fn = {"ref": varlen_attention_ref, "cpp": _varlen_attention_cpp}.get(impl, _varlen_attention_torch)
    with cpu_op_threads(q, single_region=impl == "cpp"):
        return fn(q, k, v, cu_seqlens, scale, bias)


def _position_bias(pos: Tensor | None, table: Tensor | None, window: int) -> PositionBias | None:
    return None if pos is None or table is None else PositionBias(pos, table, window)


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
    pos: Tensor | None,
    table: Tensor | None,
    window: int,
) -> Tensor:
    """out (T, H, D) for impl "cpp", "torch" or "ref". ``pos``, ``table``, ``window``: the fields of
    ``PositionBias`` (None, None, 0: no bias). ``seqlen_sq_sum`` (sum n_i^2, or -1 when unknown) is
    not used by the computation: it is recorded in traces so that FLOP counters that cannot read
    ``cu_seqlens`` (fvcore's jit handles) still count exactly."""
    return _forward_impl(q, k, v, cu_seqlens, softmax_scale, impl, _position_bias(pos, table, window))


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, impl, seqlen_sq_sum, pos, table, window):
    return torch.empty_like(q)


@torch.library.custom_op("spa::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
    impl: str,
    seqlen_sq_sum: int,
    pos: Tensor | None,
    table: Tensor | None,
    window: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dtable) for impl "cpp" and "torch" (they share the torch backward; "ref"
    differentiates a recomputation instead). dtable: ((2M-1)^2, H), or empty (0,) without a table."""
    if impl not in ("cpp", "torch"):
        raise ValueError(f"spa::varlen_attention_backward serves impl 'cpp' and 'torch', got {impl!r}")
    with cpu_op_threads(q):
        dq, dk, dv, dtable = _varlen_attention_torch_backward(
            dout, q, k, v, cu_seqlens, softmax_scale, _position_bias(pos, table, window)
        )
    return dq, dk, dv, q.new_empty(0) if dtable is None else dtable


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, cu_seqlens, max_seqlen, softmax_scale, impl, seqlen_sq_sum, pos, table, window):
    dtable = q.new_empty(0) if table is None or pos is None else torch.empty_like(table)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtable


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, impl, sq, pos, table, window = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, pos, table)
    ctx.args = (max_seqlen, softmax_scale, impl, sq, window)


def _backward(ctx, dout):
    q, k, v, cu_seqlens, pos, table = ctx.saved_tensors
    max_seqlen, softmax_scale, impl, sq, window = ctx.args
    bias = _position_bias(pos, table, window)
    if impl in ("cpp", "torch"):
        dq, dk, dv, dtable = _varlen_attention_backward_op(
            dout.contiguous(), q, k, v, cu_seqlens, max_seqlen, softmax_scale, impl, sq, pos, table, window
        )
    else:
        # the reference: differentiate a recomputation; this runs in the autograd engine, outside
        # the op, where autograd can record
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            if bias is not None:
                leaves.append(table.detach().requires_grad_(True))
                bias = bias._replace(table=leaves[3])
            o = varlen_attention_ref(*leaves[:3], cu_seqlens, softmax_scale, bias)
            # no sequence at all (an empty pack): the output is constant zeros, the gradients too
            grads = torch.autograd.grad(o, leaves, dout, allow_unused=True) if o.requires_grad else [None] * 4
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        dq, dk, dv = grads[:3]
        dtable = grads[3] if bias is not None else None
    if bias is None:
        dtable = None
    return dq, dk, dv, None, None, None, None, None, None, dtable, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------
# public function


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    *,
    impl: str | None = None,
    bias: PositionBias | None = None,
) -> Tensor:
    """Non-causal attention within each sequence of a packed batch, with Swin's relative position bias
    and shift mask when ``bias`` is given.

    q, k, v: (T, H, D) (same shapes, any strides; any head dim); cu_seqlens: (S+1,) int32,
    non-decreasing, from 0 to T (empty sequences allowed); max_seqlen: the longest sequence (an upper
    bound is fine); softmax_scale: default ``D ** -0.5``; bias: ``PositionBias(pos (T, 3) int32,
    table ((2M-1)^2, H), window M)`` (``kernels.position_bias``), or None; impl: see
    ``kernels._dispatch`` ("auto" | "triton" | "cpp" | "torch" | "ref"; default env ``SPA_ATTN_IMPL``
    or auto: FlexAttention (compiled to Triton by torch) on CUDA, the C++ kernel for float32 on CPU,
    else the torch path). Returns out: (T, H, D) in the dtype of q. Differentiable in q, k, v and
    ``bias.table``.
    """
    check_varlen_inputs(q, k, v, cu_seqlens)
    if bias is not None:
        check_position_bias(bias, q.shape[0], q.shape[1], q.device)
    if cu_seqlens.dtype is not torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    name = resolve_impl(impl, q, k, v, cpp=True)
    if name == "triton" and counting_flops():
        # a FLOP count (fvcore's trace, flop_counter) cannot see into the compiled FlexAttention: the
        # custom op with its torch path computes the same attention, on any device, and is counted
        # by its formula (sum n_i^2), so the count does not depend on the path
        name = "torch"
    if name == "triton":  # FlexAttention: its own autograd, so no custom op around it
        from kernels.flex_attention import flex_varlen_attention

        return flex_varlen_attention(q, k, v, cu_seqlens, scale, bias)
    pos, table, window = (None, None, 0) if bias is None else (bias.pos, bias.table, int(bias.window))
    tracing = torch._C._get_tracing_state() is not None
    if cu_seqlens.is_cuda and not tracing:
        sq = -1  # reading cu_seqlens would sync the GPU; only a trace needs the number
    else:
        if tracing:
            with untraced():  # host reads, kept out of traces (fvcore would list them as ops)
                b = cu_seqlens.tolist()
        else:
            b = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(b[:-1], b[1:])]
        if b[0] != 0 or b[-1] > q.shape[0] or any(n < 0 for n in lengths):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to at most T={q.shape[0]}, got {b}")
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than a sequence of cu_seqlens")
        if name in ("cpp", "torch") and direct_call(q, k, v, table):  # nothing to record: no custom op
            fn = _varlen_attention_cpp if name == "cpp" else _varlen_attention_torch
            return run_cpu(
                "spa::varlen_attention", fn, q, k, v, cu_seqlens, scale, bias, single_region=name == "cpp"
            )
        sq = sum(n * n for n in lengths)
    return _varlen_attention_op(q, k, v, cu_seqlens, int(max_seqlen), scale, name, sq, pos, table, window)
