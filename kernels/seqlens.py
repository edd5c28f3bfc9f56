"""Sequence layouts of packed tokens: ``cu_seqlens`` for one sequence per image, and the paper's
containers (SPA, arXiv 2410.23608) expressed as varlen sequences.

Packed tokens are the selected tokens of all images written one after another, image by image
(``kernels.pack.pack_tokens``). A container of length ``L`` with its block-diagonal mask is exactly a
varlen batch whose sequences are the runs of one image's tokens inside one container, so both layouts
are only different ``cu_seqlens`` over the same packed tensor (docs/method.md, "Pack").

On CPU both layouts come from one call of a C++ kernel (``kernels/csrc/select_cpu.cpp``) where the torch
path below makes 5-15 small calls; the results are identical. The torch path serves CUDA (where it
avoids a host round trip for ``cu_seqlens``), traces, and ``impl="torch"``.
"""

from __future__ import annotations

import torch

from kernels._dispatch import cpp_kernels, resolve_helper_impl

__all__ = [
    "cu_seqlens_from_counts",
    "container_seqlens",
    "seqlen_sq_sum",
    "sequence_ids",
    "check_varlen_inputs",
]


def as_integer_counts(counts) -> torch.Tensor:
    """counts as a tensor, checked to be 1-D and integer (ValueError / TypeError otherwise); shared by
    the layouts and ``kernels.select``."""
    if not isinstance(counts, torch.Tensor):
        counts = torch.as_tensor(counts)
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (one count per image), got shape {tuple(counts.shape)}")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"counts must be an integer tensor, got {counts.dtype}")
    return counts


def _as_counts(counts) -> torch.Tensor:
    counts = as_integer_counts(counts)
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    return counts.to(torch.int64)


def _cpp(impl: str | None, counts: torch.Tensor):
    """The C++ extension when it serves these counts (CPU, not traced or compiled, ``impl`` "auto" or
    "cpp"), else None. ``impl`` as in ``kernels._dispatch``."""
    if not counts.is_cpu or resolve_helper_impl(impl) != "cpp":
        return None
    return cpp_kernels()


def cu_seqlens_from_counts(counts, *, impl: str | None = None) -> tuple[torch.Tensor, int]:
    """One sequence per image.

    counts: (B,) integer, tokens kept per image (0 allowed).
    Returns ``cu_seqlens: (B+1,) int32`` on the device of ``counts`` and ``max_seqlen`` (a Python
    int, 0 for an empty batch). ``impl``: "torch" forces the torch path (see the module docstring).
    """
    ext = _cpp(impl, counts := as_integer_counts(counts))
    if ext is not None:
        return ext.cu_seqlens_fwd(counts)
    counts = _as_counts(counts)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    if counts.numel():
        torch.cumsum(counts, 0, out=cu[1:])  # cumsum casts into the int32 output
    max_seqlen = int(counts.max()) if counts.numel() else 0
    return cu, max_seqlen


def container_seqlens(
    counts, container_len: int, *, impl: str | None = None
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """The paper's containers as varlen sequences.

    The kept tokens of the images are written one after another into containers of ``container_len``
    (L) slots; a sequence is a run of one image's tokens inside one container, i.e. the packed token
    stream is cut at every image boundary and at every multiple of L. Images that keep nothing produce
    no sequence.

    counts: (B,) integer; container_len: L >= 1.
    Returns ``cu_seqlens: (S+1,) int32``, ``max_seqlen`` (int, <= L), ``seq_image: (S,) int64`` (the
    image of each sequence) and ``seq_container: (S,) int64`` (its container, ``start // L``). The
    number of containers is ``ceil(T / L)``; only the last one is partly empty. ``impl``: "torch"
    forces the torch path (see the module docstring).
    """
    if int(container_len) < 1:
        raise ValueError(f"container_len must be >= 1, got {container_len}")
    L = int(container_len)
    ext = _cpp(impl, counts := as_integer_counts(counts))
    if ext is not None:
        return ext.container_seqlens_fwd(counts, L)
    counts = _as_counts(counts)
    device = counts.device
    ends = torch.cumsum(counts, 0)  # (B,) image end offsets in the packed stream
    total = int(ends[-1]) if counts.numel() else 0
    cuts = torch.cat(
        [
            torch.zeros(1, dtype=torch.int64, device=device),
            ends,
            torch.arange(0, total, L, dtype=torch.int64, device=device),
        ]
    )
    cuts = torch.unique(cuts)  # sorted; an empty image only repeats a cut
    starts = cuts[:-1]
    lengths = cuts[1:] - starts
    seq_image = torch.searchsorted(ends, starts, right=True)  # first image whose end is past start
    seq_container = torch.div(starts, L, rounding_mode="floor")
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return cuts.to(torch.int32), max_seqlen, seq_image, seq_container


def sequence_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """(T,) int64: the sequence of every row of a packed (T, ...) tensor, -1 for rows past
    ``cu_seqlens[-1]``; on the device of ``cu_seqlens``, without a host sync."""
    cu = cu_seqlens.to(torch.int64)
    rows = torch.arange(T, device=cu.device)
    # the number of sequence ends at or before a row is its sequence (empty sequences end where they
    # start, so they are counted and skipped)
    seq = torch.searchsorted(cu[1:], rows, right=True)
    return torch.where(rows < cu[-1], seq, -1)


def seqlen_sq_sum(cu_seqlens: torch.Tensor) -> int:
    """Sum over sequences of n_i^2 (what attention FLOPs scale with). Syncs when on a GPU."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return int((lengths * lengths).sum()) if lengths.numel() else 0


def check_varlen_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """What every varlen attention path requires of its inputs: q, k, v (T, H, D) of one shape and one
    floating dtype, cu_seqlens a 1-D integer tensor (S+1,) on q's device. Raises ValueError / TypeError
    naming what is wrong (the contents of cu_seqlens are checked where they are read)."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (T, H, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor (S+1,), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens on {cu_seqlens.device} but q on {q.device}")
