"""Per-image top-k of token scores as flat row ids: the selection of an SPA block (Select and Pack
Attention, arXiv 2410.23608) when every image keeps its own number of tokens, in the order ``pack_tokens``
and the sequence layouts of ``kernels.seqlens`` expect (image-major, token order within an image).

Layering (reference, fast kernel, checked launcher, op): ``topk_indices_ref`` (a stable descending sort, a ranked mask,
``nonzero``: the specification, ties included) -> the torch path (``torch.topk`` of the largest count,
a ranked mask, ``nonzero``: faster than a full sort, the path on CUDA; it agrees with the reference
whenever no two scores of an image tie) -> the C++ CPU kernel (``kernels/csrc/select_cpu.cpp``: one
call where the torch path makes about ten small ones; exactly the reference, ties included) -> public
function. No autograd: the result is integer indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import cpp_kernels, resolve_helper_impl
from kernels.seqlens import as_integer_counts

__all__ = ["topk_indices", "topk_indices_ref"]


def topk_indices_ref(scores: Tensor, counts: Tensor) -> Tensor:
    """scores: (B, N); counts: (B,) integer in [0, N] -> (T,) int64 flat row ids ``b * N + j`` of the
    ``counts[b]`` highest scores of row b, image-major, ascending within an image. Order: higher first,
    NaN above every number, ties to the lower j (a stable descending sort)."""
    return _first_ranked(scores.sort(dim=1, descending=True, stable=True).indices, counts, scores.shape[1])


def _topk_indices_torch(scores: Tensor, counts: Tensor) -> Tensor:
    """The torch path: top-k of the largest count, then each image's first ``counts[b]`` of them."""
    k = int(counts.max()) if counts.numel() else 0
    return _first_ranked(scores.topk(k, dim=1).indices, counts, scores.shape[1])


def _first_ranked(order: Tensor, counts: Tensor, N: int) -> Tensor:
    """order: (B, k) token indices of each image, best first -> flat row ids of each image's first
    ``counts[b]``, image-major and in token order."""
    B, k = order.shape
    ranked = torch.arange(k, device=order.device)[None, :] < counts.to(order.device)[:, None]  # (B, k)
    keep = torch.zeros(B, N, dtype=torch.bool, device=order.device).scatter_(1, order, ranked)
    return keep.view(-1).nonzero().squeeze(1)


def _check(scores: Tensor, counts: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if as_integer_counts(counts).numel() != scores.shape[0]:
        raise ValueError(f"counts must be (B,) = ({scores.shape[0]},), got shape {tuple(counts.shape)}")


def topk_indices(scores: Tensor, counts: Tensor, *, impl: str | None = None) -> Tensor:
    """The ``counts[b]`` best tokens of every image b, as flat row ids into ``x.view(B * N, C)``.

    scores: (B, N) floating point (a gate's scores); counts: (B,) integer, each in [0, N].
    Returns (T,) int64, T = sum(counts): image-major, each image's ids in token order (what
    ``pack_tokens`` takes and what ``cu_seqlens_from_counts(counts)`` / ``container_seqlens`` lay out).
    Higher scores first, NaN above every number, ties to the lower token index (the C++ kernel and the
    reference; the torch path, ``torch.topk``, may order tied scores differently). ``impl``: see
    ``kernels._dispatch.resolve_helper_impl``; the C++ kernel serves float32 CPU scores, the torch path
    the rest ("ref": the reference).
    """
    _check(scores, counts)
    name = resolve_helper_impl(impl, scores)
    if name == "cpp":
        return cpp_kernels().topk_indices_fwd(scores, counts)  # reads the data only: no detach needed
    counts = counts.to(torch.int64)
    if counts.numel() and bool(((counts < 0) | (counts > scores.shape[1])).any()):
        raise ValueError(f"counts must be in [0, N={scores.shape[1]}], got {counts.tolist()}")
    return (topk_indices_ref if name == "ref" else _topk_indices_torch)(scores.detach(), counts)
