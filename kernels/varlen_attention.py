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
sequences as explicit softmax attention on views, short ones in padded batches, chosen by a measured
cost model; scores in float64 for float32 on CPU, SDPA's kernels where the scores keep the input
dtype; every dtype, and the backward of the CPU paths, incl. the bias table's gradient)
-> ``torch.library.custom_op`` ``spa::varlen_attention`` with its autograd formula ->
``varlen_attention``. On CUDA, impl "triton" is torch's FlexAttention (compiled to Triton by torch):
``kernels.flex_attention.flex_varlen_attention``, imported when it runs and called outside the custom
op (FlexAttention has its own autograd).

FLOPs (counted by ``kernels.flops``): ``2 * H * D * sum_i n_i^2`` multiply-adds forward (QK^T and
PV, ``n_i`` the length of sequence i); the bias adds none.

One op, its layers in one file (about 600 lines) as flash-attention keeps its kernels: reference,
torch path, C++ launcher, custom op with its autograd formula, public function, read top to bottom.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._dispatch import cpp_kernels, cpu_op_threads, direct_call, resolve_impl, run_cpu
from kernels.position_bias import PositionBias, check_position_bias, pair_bias, relative_index
from kernels.seqlens import check_varlen_inputs

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
# fast torch path (CPU): as few calls and copies as pay off

# How the CPU path runs a set of ragged sequences. Two kinds of call:
# - "view": one sequence, explicit softmax attention (bmm, softmax, bmm) straight on views of q, k, v
#   (no copies in; one copy of its output);
# - "batch": G sequences gathered into a (G, H, P, D) batch padded to P (multiple of _ALIGN) with a
#   key mask, one SDPA call, scattered back.
# Measured on this project's 2-core CPU (fp32, H*D = 384): a gather + scatter of the batch costs more
# than the per-call overhead it saves unless sequences are short (below ~13 tokens), so long
# sequences run as views (at ratio 0.25 of 196 tokens x 32 images: 4.5 ms looping over SDPA on views
# vs 9.5 ms in two padded batches; explicit softmax on views: 3.1 ms) and only short ones are batched. The cost model (microseconds, per unit
# of H*D where it scales) lets a dynamic programme choose; only its ratios matter.
_VIEW_CALL_US = 20.0  # one view call (bmm, softmax, bmm) + output copy, fixed part
_BATCH_CALL_US = 50.0  # one batched call incl. building its index tensors, fixed part
_TOKEN_US_PER_HD = 0.004  # per padded token slot of a batch: 3 gathers + 1 scatter
_OUT_US_PER_HD = 0.0005  # per token of a view call: its output copy
_PAIR_US_PER_HD = 0.000055  # per (query, key) pair, either kind
# Batches are padded to multiples of 16: torch's CPU flash attention is much faster there than just
# below (1 thread, 16 x 6 heads x 64: P=60 127 us per sequence, P=64 89; P=124 434, P=128 341).
_ALIGN = 16
_MAX_BATCH_LEN = 64


def _aligned(n: int) -> int:
    return n if n < 2 * _ALIGN else -(-n // _ALIGN) * _ALIGN  # short batches: padding would dominate


def _view_cost(n: int, hd: int) -> float:
    return _VIEW_CALL_US + hd * (_OUT_US_PER_HD * n + _PAIR_US_PER_HD * n * n)


def _batch_cost(n_seq: int, pad_len: int, hd: int) -> float:
    return _BATCH_CALL_US + n_seq * hd * (_TOKEN_US_PER_HD * pad_len + _PAIR_US_PER_HD * pad_len * pad_len)


@lru_cache(maxsize=512)
def _plan_groups(lengths: tuple[int, ...], hd: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Partition the non-empty sequences into calls: ((seq ids), pad_len) pairs; a single id with
    ``pad_len`` equal to its length is a view call.

    Sequences sorted by length; dynamic programming over the distinct lengths: the sequences of one
    distinct length run as view calls, or a run of consecutive distinct lengths forms one batch
    padded to its longest (rounded up to ``_ALIGN``); the summed cost model is minimised.
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
    cut = [0] * (K + 1)  # cut[j] = i: distinct[i:j] batched; cut[j] = -1: distinct[j-1] as views
    for j in range(1, K + 1):
        best[j], cut[j] = best[j - 1] + mult[j - 1] * _view_cost(distinct[j - 1], hd), -1
        if distinct[j - 1] > _MAX_BATCH_LEN:  # long sequences never batch: keep the search O(K) there
            continue
        n_seq = 0
        pad = _aligned(distinct[j - 1])
        for i in range(j, 0, -1):  # batch = distinct[i-1 .. j-1], padded to distinct[j-1]
            n_seq += mult[i - 1]
            c = best[i - 1] + _batch_cost(n_seq, pad, hd)
            if c < best[j]:
                best[j], cut[j] = c, i - 1
    groups = []
    j = K
    while j > 0:
        if cut[j] < 0:
            groups.extend(((s,), distinct[j - 1]) for s in by_len[distinct[j - 1]])
            j -= 1
            continue
        i = cut[j]
        ids = tuple(s for n in distinct[i:j] for s in by_len[n])
        groups.append((ids, _aligned(distinct[j - 1])))
        j = i
    return tuple(reversed(groups))


class _Group(NamedTuple):
    """One attention call.

    View call (``start`` >= 0): one sequence, rows ``start:start+P`` of q, k, v (views, no copies in).
    Batch call: G sequences padded to P; ``idx`` (G*P,) gathers the batch (padded slots read their
    sequence's first row: finite values), ``idx_out`` (G*P,) scatters it back (padded slots to a dummy
    row T), and ``mask`` (G, 1, 1, P) marks real keys (None: no padding)."""

    start: int
    G: int
    P: int
    idx: Tensor | None
    idx_out: Tensor | None
    mask: Tensor | None


def _groups(bounds: list[int], T: int, hd: int, device: torch.device) -> list[_Group]:
    """The calls of ``_plan_groups`` for the sequences ``bounds[i]:bounds[i+1]`` of tensors of T rows."""
    starts, lengths = bounds[:-1], tuple(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    groups = []
    for ids, pad in _plan_groups(lengths, hd):
        if len(ids) == 1 and lengths[ids[0]] == pad:  # one unpadded sequence: views
            groups.append(_Group(starts[ids[0]], 1, pad, None, None, None))
            continue
        st = torch.tensor([starts[i] for i in ids], dtype=torch.int64)  # (G,)
        ln = torch.tensor([lengths[i] for i in ids], dtype=torch.int64)  # (G,)
        pos = torch.arange(pad, dtype=torch.int64)
        valid = pos[None, :] < ln[:, None]  # (G, P)
        src = st[:, None] + pos[None, :]
        idx = torch.where(valid, src, st[:, None]).reshape(-1)
        if bool(valid.all()):
            idx_out, mask = idx, None
        else:
            idx_out = torch.where(valid, src, T).reshape(-1)
            mask = valid[:, None, None, :].to(device)
        groups.append(_Group(-1, len(ids), pad, idx.to(device), idx_out.to(device), mask))
    return groups


def _packed_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """(T, 3*H*D) view when q, k, v are the unbound thirds of one (T, 3, H, D) tensor (the usual
    ``qkv(x).view(T, 3, H, D).unbind(1)``): then one gather serves all three."""
    T, H, D = q.shape
    hd, e = H * D, q.element_size()
    if (
        q.stride() == k.stride() == v.stride() == (3 * hd, D, 1)
        and k.data_ptr() - q.data_ptr() == hd * e
        and v.data_ptr() - k.data_ptr() == hd * e
        and q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    ):
        return q.as_strided((T, 3 * hd), (3 * hd, 1))
    return None


def _gather(ts: tuple[Tensor, ...], g: _Group, packed: Tensor | None = None) -> list[Tensor]:
    """Each (T, H, D) -> (G, H, P, D): views for a single sequence, else gathered rows (one gather
    for all three when ``packed`` is their (T, 3*H*D) storage)."""
    if g.start >= 0:
        return [t[g.start : g.start + g.P].transpose(0, 1).unsqueeze(0) for t in ts]
    H, D = ts[0].shape[1:]
    if packed is not None:
        rows = packed.index_select(0, g.idx).view(g.G, g.P, 3, H, D)
        return [rows[:, :, i].transpose(1, 2) for i in range(3)]
    return [t.index_select(0, g.idx).view(g.G, g.P, H, D).transpose(1, 2) for t in ts]


class _Scatter:
    """Writes per-group (G, H, P, D) results into one (T, H, D) tensor; padded slots land in a dummy
    row T that is dropped at the end."""

    def __init__(self, like: Tensor, bounds: list[int]):
        T = like.shape[0]
        alloc = torch.empty if bounds[0] == 0 and bounds[-1] == T else torch.zeros
        self.T = T
        self.out = alloc((T + 1, *like.shape[1:]), dtype=like.dtype, device=like.device)

    def add(self, g: _Group, res: Tensor) -> None:
        res = res.transpose(1, 2)  # (G, P, H, D); SDPA's CPU output is laid out like this already
        if g.start >= 0:
            self.out[g.start : g.start + g.P] = res[0]
        else:
            self.out.index_copy_(0, g.idx_out, res.reshape(g.G * g.P, *res.shape[2:]))

    def result(self) -> Tensor:
        return self.out[: self.T]


def _container_rows(bounds: list[int], hd: int) -> int:
    """A row length R such that every multiple of R up to the end is a sequence boundary (the layout
    of the paper's containers, R = L), when running the first ``T // R`` rows as one SDPA call with a
    block-diagonal mask is cheaper than the per-sequence plan; else 0.

    Such rows are views of q, k, v (no gather), and one call replaces one per sequence piece: for
    containers at ratio 0.25 of 32 x 196 tokens, ~31 rows of 49 instead of ~64 pieces."""
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    max_len, end = max(lengths, default=0), bounds[-1]
    if bounds[0] != 0 or max_len < 2:
        return 0
    cuts = set(bounds)
    for R in range(max_len, min(2 * max_len, end // 2) + 1):
        if all(m in cuts for m in range(R, end + 1, R)):
            n_rows = end // R
            rows_cost = _BATCH_CALL_US + n_rows * hd * (_PAIR_US_PER_HD * R * R + _OUT_US_PER_HD * R)
            views_cost = sum(_view_cost(n, hd) for n, s in zip(lengths, bounds) if n and s < n_rows * R)
            return R if rows_cost < views_cost else 0
    return 0


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


def _bias_rows(bias: PositionBias, dtype: torch.dtype, pos: Tensor) -> Tensor:
    """Additive scores (..., H, n, n) of tokens at ``pos: (..., n, 3)``: the table gathered by the pair
    index (computed once, for all heads), -inf across regions."""
    return pair_bias(pos, pos, bias.table.to(dtype), bias.window)


def _varlen_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    softmax_scale: float,
    bias: PositionBias | None = None,
) -> Tensor:
    """Same result as the reference, in as few calls as pay off: container rows (``_container_rows``),
    then the per-sequence plan (``_plan_groups``); scores in ``_score_dtype``. ``bias`` is added to
    the scores of each call (an additive mask, baddbmm's input for a view call)."""
    T, H, D = q.shape
    wide = _score_dtype(q)
    bounds = cu_seqlens.tolist()
    out = _Scatter(q, bounds)
    R = _container_rows(bounds, H * D)
    if R:
        n_rows = bounds[-1] // R
        rows = [t[: n_rows * R].view(n_rows, R, H, D).transpose(1, 2) for t in (q, k, v)]  # (rows, H, R, D)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths.long())
        seq = seq[: n_rows * R].view(n_rows, R)  # sequence of every slot
        mask = None
        if not bool((seq == seq[:, :1]).all()):  # some row holds several sequences: block-diagonal
            mask = (seq[:, :, None] == seq[:, None, :])[:, None]  # (rows, 1, R, R)
        if bias is not None:
            b = _bias_rows(bias, wide, bias.pos[: n_rows * R].view(n_rows, R, 3))  # (rows, H, R, R)
            mask = b if mask is None else b.masked_fill(~mask, float("-inf"))
        o = _attend(*rows, softmax_scale, mask)
        out.out[: n_rows * R] = o.transpose(1, 2).reshape(n_rows * R, H, D)
        bounds = [b for b in bounds if b >= n_rows * R]  # the last, partial row
    packed = _packed_qkv(q, k, v)
    # per sequence (H, n, D) / (H, D, n) views from one split call each, so that a sequence's operands
    # are views (no copies in) and its output is written in place by ``bmm(out=)`` (no copy out)
    lo, hi = bounds[0], bounds[-1]
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    seq_at = {s: i for i, s in enumerate(bounds[:-1])}  # start -> sequence (the last of equal starts)
    qs, ks, vs, os_ = (
        t[lo:hi].permute(*perm).split(lengths, dim=d)
        for t, perm, d in ((q, (1, 0, 2), 1), (k, (1, 2, 0), 2), (v, (1, 0, 2), 1), (out.out, (1, 0, 2), 1))
    )
    zero = q.new_zeros((), dtype=wide)  # baddbmm input, ignored (beta=0)
    for g in _groups(bounds, T, H * D, q.device):
        if g.start >= 0:
            # one sequence: explicit softmax attention on views. At these sizes (H x n x n scores in
            # cache) it beats SDPA's CPU flash kernel: 32 sequences of ~49 (~98) tokens, 1 thread,
            # 3.1 (7.0) ms vs 4.5 (8.3) ms.
            i = seq_at[g.start]
            qi, ki = qs[i].to(wide), ks[i].to(wide)
            if bias is None:
                scores = torch.baddbmm(zero, qi, ki, beta=0.0, alpha=softmax_scale)  # (H, n, n)
            else:
                b = _bias_rows(bias, wide, bias.pos[g.start : g.start + g.P])  # (H, n, n)
                scores = torch.baddbmm(b, qi, ki, alpha=softmax_scale)
            torch.bmm(torch.softmax(scores, dim=-1).to(q.dtype), vs[i], out=os_[i])
            continue
        qg, kg, vg = _gather((q, k, v), g, packed)  # (G, H, P, D)
        mask = g.mask
        if bias is not None:
            b = _bias_rows(bias, wide, bias.pos.index_select(0, g.idx).view(g.G, g.P, 3))  # (G, H, P, P)
            mask = b if mask is None else b.masked_fill(~mask, float("-inf"))
        out.add(g, _attend(qg, kg, vg, softmax_scale, mask))
    return out.result()


def _varlen_attention_torch_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    softmax_scale: float,
    bias: PositionBias | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dtable) of ``_varlen_attention_torch``: explicit softmax backward per group
    (batched matmuls), computed in ``_score_dtype`` (float64 for float32 inputs: dS = P (dP - rowsum)
    cancels, and dQ, dK sum it over the sequence; in float32 the path was one draw of torch's own
    error distribution, ~1% of random cases above twice torch's; it costs ~2.5x the float32 backward
    at SPA's sizes). dtable (None without ``bias``) sums dS into the table by the pair index."""
    T, H, D = q.shape
    bounds = cu_seqlens.tolist()
    dq, dk, dv = _Scatter(q, bounds), _Scatter(k, bounds), _Scatter(v, bounds)
    wide = _score_dtype(q)
    table = dtable = None
    if bias is not None:
        table = bias.table.to(wide)
        dtable = torch.zeros_like(table)  # ((2M-1)^2, H)
    for g in _groups(bounds, T, H * D, q.device):
        qg, kg, vg, dog = (t.to(wide) for t in _gather((q, k, v, dout), g))  # (G, H, P, D)
        s = (qg @ kg.transpose(-1, -2)) * softmax_scale  # (G, H, P, P)
        if bias is not None:
            pos = bias.pos[g.start : g.start + g.P][None] if g.start >= 0 else bias.pos.index_select(0, g.idx)
            pos = pos.view(g.G, g.P, 3)
            idx, allowed = relative_index(pos, pos, bias.window)  # (G, P, P): once for all heads
            s = (s + table[idx].permute(0, 3, 1, 2)).masked_fill(~allowed[:, None], float("-inf"))
        if g.mask is not None:
            s = s.masked_fill(~g.mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if g.mask is not None:  # padded query slots (garbage dO) must not reach dK, dV, the table
            p = p.masked_fill(~g.mask.transpose(-1, -2), 0.0)
        dp = dog @ vg.transpose(-1, -2)  # (G, H, P, P)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # zero where p is: masked pairs, padding
        dv.add(g, (p.transpose(-1, -2) @ dog).to(q.dtype))
        dq.add(g, ((ds @ kg) * softmax_scale).to(q.dtype))
        dk.add(g, ((ds.transpose(-1, -2) @ qg) * softmax_scale).to(q.dtype))
        if bias is not None:
            dtable.index_add_(0, idx.reshape(-1), ds.permute(0, 2, 3, 1).reshape(-1, H))
    if dtable is not None:
        dtable = dtable.to(bias.table.dtype)
    return dq.result(), dk.result(), dv.result(), dtable


# ----------------------------------------------------------------------------------------------------
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
            grads = torch.autograd.grad(o, leaves, dout, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        dq, dk, dv = grads[:3]
        dtable = grads[3] if bias is not None else None
    if bias is None:
        dtable = None
    return dq, dk, dv, None, None, None, None, None, None, dtable, None


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
    if name == "triton":  # FlexAttention: its own autograd, so no custom op around it
        from kernels.flex_attention import flex_varlen_attention

        return flex_varlen_attention(q, k, v, cu_seqlens, scale, bias)
    pos, table, window = (None, None, 0) if bias is None else (bias.pos, bias.table, int(bias.window))
    tracing = torch._C._get_tracing_state() is not None
    if cu_seqlens.is_cuda and not tracing:
        sq = -1  # reading cu_seqlens would sync the GPU; only a trace needs the number
    else:
        if tracing:
            with _untraced():  # host reads, kept out of traces (fvcore would list them as ops)
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
