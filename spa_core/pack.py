"""Packing the selected tokens of a batch (the "pack" of Select and Pack Attention, arXiv 2410.23608).

One data structure, ``PackedTokens``, in flash-attention's varlen form: the kept tokens of all images
written one after another (image by image, each image's tokens in the order given to ``pack``), with
``cu_seqlens`` saying where each attention sequence starts. The strategies of the design differ only in
how the sequences are cut (here) and how attention is laid out over them (``spa_core.attention``);
``spa_core.strategies`` registers each as one object with its FLOP formula:

- ``containers`` (the paper): the stream is poured into containers of ``L`` slots (only the last one
  partly empty), block-diagonal inside; as varlen it is cut at image boundaries and at multiples of L
  (``kernels.container_seqlens``). ``containers_dense`` gives the paper's ``(B', L, C)`` + mask form.
- ``varlen``: one sequence per image: each image's kept tokens attend to all of that image's kept tokens.
- ``pad``: the same sequences, run padded to the batch's largest count (same result, padded compute).
- ``mask``: the same sequences, run densely over all N tokens with the unselected ones masked out
  (no saving; the correctness control).

``unpack`` scatters attention outputs back to their places; unselected tokens are left unchanged.
Gradients flow through both (``kernels.pack_tokens`` / ``kernels.unpack_tokens``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import container_seqlens, cu_seqlens_from_counts, pack_tokens, unpack_tokens
from kernels._dispatch import untraced
from spa_core.config import SPAConfig
from spa_core.contracts import check_packed
from spa_core.registry import PACK_STRATEGIES

__all__ = [
    "PackedTokens",
    "pack",
    "unpack",
    "containers_dense",
    "containers_from_dense",
    "pack_containers",
    "pack_varlen",
    "pack_pad",
    "pack_mask",
    "DEFAULT_CONTAINER_LEN",
]

DEFAULT_CONTAINER_LEN = 49  # 7 * 7, Swin-T's window; blocks pass one window's tokens on their map


@dataclass
class PackedTokens:
    """Selected tokens of a batch in varlen form.

    tokens: (T, C) kept tokens, image-major; cu_seqlens: (S+1,) int32 sequence offsets into tokens;
    max_seqlen: longest sequence (int); indices: (T,) int64 row of each token in the flattened
    ``(B*N)`` grid; seq_image: (S,) int64 image of each sequence; counts: (B,) int64 kept per image;
    num_tokens: N, tokens per image before selection; strategy: the name of the pack strategy whose
    ``attend`` runs attention over it (``PACK_STRATEGIES``); container_len and seq_container (S,) for
    containers.
    """

    tokens: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    indices: Tensor
    seq_image: Tensor
    counts: Tensor
    num_tokens: int
    strategy: str
    container_len: int | None = None
    seq_container: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.counts.numel()

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_containers(self) -> int:
        """B' of the paper (containers only): ``ceil(T / L)``."""
        if self.container_len is None:
            raise ValueError(f"strategy {self.strategy!r} has no containers")
        return -(-self.tokens.shape[0] // self.container_len)

    def with_tokens(self, tokens: Tensor) -> PackedTokens:
        """The same layout over other per-token values (e.g. attention outputs): tokens (T, C')."""
        if tokens.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} rows for a pack of {self.tokens.shape[0]} tokens")
        return dataclasses.replace(self, tokens=tokens)


def _selected(
    x: Tensor, mask: Tensor, order: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Kept tokens (T, C), their raster rows (T,), counts (B,) and the counts on the host: image-major,
    each image's tokens in ``order`` (default raster order). Gathers from x directly (no permuted copy
    of x).

    The one host read of a pack (a GPU sync): the counts. Every size after it is known on the host,
    so the rows come from ``nonzero_static`` at that size (``nonzero`` would read its size back from
    the GPU a second time) and the layouts are made on the host from the counts (``_layouts_on``)."""
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(
            f"pack expects x (B, N, C) and mask (B, N), got {tuple(x.shape)} and {tuple(mask.shape)}"
        )
    B, N, C = x.shape
    counts = mask.sum(1, dtype=torch.int64)  # (B,)
    with untraced():
        host = counts.tolist()
    if order is not None:
        _check_order(order, N)
        mask = mask[:, order]  # (B, N) the permuted grid
    rows = torch.nonzero_static(mask.reshape(-1), size=sum(host)).squeeze(1)  # (T,) image-major
    indices = rows if order is None else _raster_rows(rows, order, N)
    tokens = pack_tokens(x.reshape(B * N, C), indices)  # (T, C)
    return tokens, indices, counts, host


def _layouts_on(device: torch.device, *layout: Tensor) -> list[Tensor]:
    """Integer layout tensors made on the host, moved to ``device`` in one copy. On CUDA the copy is
    from pinned memory and does not block: a copy from pageable memory waits for the GPU's queue to
    drain (a sync). Each keeps its dtype and shape."""
    if device.type == "cpu":
        return list(layout)
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in layout])  # one buffer, one copy
    if device.type == "cuda" and torch._C._get_tracing_state() is None:  # a trace records plain ops
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    parts = flat.split([t.numel() for t in layout])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, layout)]


def _raster_rows(pos: Tensor, order: Tensor, n: int) -> Tensor:
    """Flat rows of a permuted ``(B, n)`` grid (``x[:, order]``) -> the same tokens' rows in raster order."""
    return torch.div(pos, n, rounding_mode="floor") * n + order[pos % n]


def _check_order(order: Tensor, n: int) -> None:
    if order.shape != (n,) or order.is_floating_point() or order.dtype == torch.bool:
        raise ValueError(
            f"order must be an integer permutation of the {n} token positions, got "
            f"{order.dtype} {tuple(order.shape)}"
        )


def _per_image(x: Tensor, mask: Tensor, strategy: str, order: Tensor | None) -> PackedTokens:
    tokens, indices, counts, host = _selected(x, mask, order)
    cu, max_seqlen = cu_seqlens_from_counts(torch.tensor(host, dtype=torch.int64))  # on the host
    (cu,) = _layouts_on(x.device, cu)
    seq_image = torch.arange(counts.numel(), device=x.device)
    return PackedTokens(tokens, cu, max_seqlen, indices, seq_image, counts, x.shape[1], strategy)


def pack_containers(
    x: Tensor, mask: Tensor, *, cfg: SPAConfig | None = None, order: Tensor | None = None
) -> PackedTokens:
    """The paper's containers of ``cfg.container_len`` slots (None -> ``DEFAULT_CONTAINER_LEN``), as
    varlen sequences cut at image and container boundaries."""
    L = (cfg.container_len if cfg is not None else None) or DEFAULT_CONTAINER_LEN
    tokens, indices, counts, host = _selected(x, mask, order)
    cu, max_seqlen, seq_image, seq_container = container_seqlens(torch.tensor(host, dtype=torch.int64), L)
    cu, seq_image, seq_container = _layouts_on(x.device, cu, seq_image, seq_container)
    return PackedTokens(
        tokens, cu, max_seqlen, indices, seq_image, counts, x.shape[1], "containers", L, seq_container
    )


def pack_varlen(
    x: Tensor, mask: Tensor, *, cfg: SPAConfig | None = None, order: Tensor | None = None
) -> PackedTokens:
    """One sequence per image (empty images give empty sequences)."""
    return _per_image(x, mask, "varlen", order)


def pack_pad(
    x: Tensor, mask: Tensor, *, cfg: SPAConfig | None = None, order: Tensor | None = None
) -> PackedTokens:
    """One sequence per image, attention padded to the batch's largest count."""
    return _per_image(x, mask, "pad", order)


def pack_mask(
    x: Tensor, mask: Tensor, *, cfg: SPAConfig | None = None, order: Tensor | None = None
) -> PackedTokens:
    """One sequence per image, attention dense over all N tokens with the unselected masked."""
    return _per_image(x, mask, "mask", order)


def pack(
    x: Tensor,
    mask: Tensor,
    strategy: str = "varlen",
    *,
    cfg: SPAConfig | None = None,
    order: Tensor | None = None,
) -> PackedTokens:
    """Pack the kept tokens of ``x: (B, N, C)`` (``mask: (B, N)`` bool) by ``PACK_STRATEGIES[strategy]``.

    ``order: (N,)`` a permutation of the token positions: each image's tokens are packed in this order
    (the SPA block passes the shifted-window order, so containers hold neighbours); ``indices`` always
    point into the raster ``(B*N)`` grid of ``x``.
    """
    entry = PACK_STRATEGIES.get(strategy)
    return check_packed(entry.pack(x, mask, cfg=cfg, order=order), x, mask, strategy, entry.pack)


def unpack(
    packed: PackedTokens, tokens: Tensor | None = None, base: Tensor | None = None, *, add: bool = False
) -> Tensor:
    """Scatter per-token values back to ``(B, N, C)``.

    tokens: (T, C) (default ``packed.tokens``); base: (B, N, C) the values of the other positions
    (default zeros). Kept positions get ``tokens`` (``base + tokens`` when ``add``); the rest keep
    ``base``. Differentiable in tokens and base.
    """
    tokens = packed.tokens if tokens is None else tokens
    B, N, C = packed.batch_size, packed.num_tokens, tokens.shape[1]
    if base is None:
        base = tokens.new_zeros(B, N, C)
    if base.shape != (B, N, C):
        raise ValueError(f"base must be (B, N, C) = {(B, N, C)}, got {tuple(base.shape)}")
    return unpack_tokens(tokens, packed.indices, base.reshape(B * N, C), add=add).view(B, N, C)


def _container_len(packed: PackedTokens, what: str) -> int:
    if packed.container_len is None:
        raise ValueError(f"{what} needs a containers pack, got strategy {packed.strategy!r}")
    return packed.container_len


def _slots(packed: PackedTokens) -> tuple[Tensor, Tensor]:
    """Container and slot of every packed token: (T,), (T,) int64."""
    L = _container_len(packed, "_slots")
    t = torch.arange(packed.tokens.shape[0], device=packed.tokens.device)
    return torch.div(t, L, rounding_mode="floor"), t % L


def containers_dense(packed: PackedTokens, tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The paper's form of a containers pack: ``p: (B', L, *F)`` (tokens (T, *F), default
    ``packed.tokens``, poured into containers; empty slots zero) and ``attn_mask: (B', L, L)`` bool,
    True where query slot i may attend to key slot j: both filled and of the same image (block-diagonal).
    An empty slot attends to nothing; its output is meaningless and dropped by ``containers_from_dense``.
    """
    L = _container_len(packed, "containers_dense")
    tokens = packed.tokens if tokens is None else tokens
    T = tokens.shape[0]
    Bc = packed.num_containers
    cont, slot = _slots(packed)
    p = tokens.new_zeros(Bc * L, *tokens.shape[1:]).index_copy(0, cont * L + slot, tokens)
    image = torch.full((Bc * L,), -1, dtype=torch.int64, device=tokens.device)
    image[cont * L + slot] = torch.repeat_interleave(
        torch.arange(packed.batch_size, device=tokens.device), packed.counts, output_size=T
    )
    image = image.view(Bc, L)
    attn_mask = (image[:, :, None] == image[:, None, :]) & (image[:, None, :] >= 0)  # (B', L, L)
    return p.view(Bc, L, *tokens.shape[1:]), attn_mask


def containers_from_dense(packed: PackedTokens, p: Tensor) -> Tensor:
    """Inverse of ``containers_dense`` on the token values: p (B', L, *F) -> (T, *F)."""
    L = _container_len(packed, "containers_from_dense")
    cont, slot = _slots(packed)
    return p.reshape(-1, *p.shape[2:]).index_select(0, cont * L + slot)
