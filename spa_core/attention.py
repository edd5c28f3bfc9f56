"""Attention over packed tokens: the "attention" of Select and Pack Attention (arXiv 2410.23608).

``packed_attention`` runs attention within every sequence of a ``PackedTokens`` and dispatches on its
layout: ``varlen`` (containers and varlen) -> ``kernels.varlen_attention``; ``pad`` -> the sequences
padded to the longest, one batched SDPA with a key mask; ``mask`` -> every image dense over all N
positions with the unselected keys masked (the correctness control: no saving).

One switch picks the kernel implementation (../shared/STYLE.md, timm's ``TIMM_FUSED_ATTN`` habit): the
module attribute ``PackedAttention.attn_impl`` (set from ``SPAConfig.attn_impl``) when not ``"auto"``,
else the environment variable ``SPA_ATTN_IMPL`` (``auto | triton | cpp | torch | ref``, read by ``kernels``).

Cost per block (multiply-adds; T kept tokens, C channels, n_i sequence lengths): projections
``4*T*C^2``, attention ``2*C*sum_i n_i^2`` (``varlen``/``containers``), ``2*C*S*max_i n_i^2`` (``pad``),
``2*C*B*N^2`` (``mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import varlen_attention
from spa_core.pack import PackedTokens, containers_dense, containers_from_dense

__all__ = ["packed_attention", "containers_dense_attention", "PackedAttention"]


def _padded_sdpa(q: Tensor, k: Tensor, v: Tensor, row: Tensor, col: Tensor, shape: tuple[int, int], scale):
    """q, k, v: (T, H, D) placed at (row, col) of a (R, P) grid -> SDPA per row, keys limited to the
    filled slots -> (T, H, D). Empty query slots attend to everything (finite, then dropped)."""
    R, P = shape
    T, H, D = q.shape
    flat = row * P + col  # (T,)
    grid = [t.new_zeros(R * P, H, D).index_copy(0, flat, t).view(R, P, H, D).transpose(1, 2) for t in (q, k, v)]
    filled = torch.zeros(R * P, dtype=torch.bool, device=q.device)
    filled = filled.scatter(0, flat, torch.ones_like(flat, dtype=torch.bool)).view(R, P)  # traceable
    attn_mask = filled[:, None, None, :] | ~filled[:, None, :, None]  # (R, 1, P, P) query x key
    out = F.scaled_dot_product_attention(*grid, attn_mask=attn_mask, scale=scale)  # (R, H, P, D)
    return out.transpose(1, 2).reshape(R * P, H, D).index_select(0, flat)


def _seq_of_tokens(packed: PackedTokens) -> Tensor:
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).to(torch.int64)
    seqs = torch.arange(packed.num_seqs, device=lengths.device)
    return torch.repeat_interleave(seqs, lengths, output_size=packed.tokens.shape[0])  # (T,)


def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, packed: PackedTokens, *, softmax_scale: float | None = None, impl=None
) -> Tensor:
    """Attention within each sequence of ``packed``. q, k, v: (T, H, D) -> (T, H, D).

    impl: kernel implementation for the varlen layout (None: ``SPA_ATTN_IMPL``, default auto).
    """
    if q.shape[0] == 0:
        return q.clone()
    if packed.layout == "varlen":
        return varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, softmax_scale, impl=impl)
    if packed.layout == "pad":
        seq = _seq_of_tokens(packed)
        col = torch.arange(q.shape[0], device=q.device) - packed.cu_seqlens.to(torch.int64)[seq]
        return _padded_sdpa(q, k, v, seq, col, (packed.num_seqs, packed.max_seqlen), softmax_scale)
    if packed.layout == "mask":
        N = packed.num_tokens
        image = torch.div(packed.indices, N, rounding_mode="floor")
        return _padded_sdpa(q, k, v, image, packed.indices % N, (packed.batch_size, N), softmax_scale)
    raise ValueError(f"unknown packed layout {packed.layout!r} (strategy {packed.strategy!r})")


def containers_dense_attention(
    q: Tensor, k: Tensor, v: Tensor, packed: PackedTokens, *, softmax_scale: float | None = None
) -> Tensor:
    """The paper's form of container attention: ``(B', L)`` containers, block-diagonal mask, one SDPA.
    Same result as ``packed_attention`` on a containers pack. q, k, v: (T, H, D) -> (T, H, D)."""
    if q.shape[0] == 0:
        return q.clone()
    (qc, kc, vc), attn_mask = zip(*(containers_dense(packed, t) for t in (q, k, v)))  # (B', L, H, D)
    attn_mask = attn_mask[0]
    attn_mask = attn_mask | ~attn_mask.any(-1, keepdim=True)  # empty slots: attend anywhere, dropped
    out = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (qc, kc, vc)), attn_mask=attn_mask[:, None], scale=softmax_scale
    )  # (B', H, L, D)
    return containers_from_dense(packed, out.transpose(1, 2))


class PackedAttention(nn.Module):
    """Multi-head self-attention over packed tokens: qkv projection on the T kept tokens, attention
    within each sequence, output projection. forward(packed) -> (T, C).

    ``attn_impl``: ``"auto"`` (defer to ``SPA_ATTN_IMPL``) or ``triton | cpp | torch | ref``;
    ``container_form``: ``"varlen"`` (default) or ``"dense"`` (containers run as ``(B', L)`` + mask).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_impl = attn_impl
        self.container_form = "varlen"

    def forward(self, packed: PackedTokens) -> Tensor:
        x = packed.tokens
        T, C = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)  # (T, H, D) each
        if self.container_form == "dense" and packed.container_len is not None:
            out = containers_dense_attention(q, k, v, packed, softmax_scale=self.scale)
        else:
            impl = None if self.attn_impl == "auto" else self.attn_impl
            out = packed_attention(q, k, v, packed, softmax_scale=self.scale, impl=impl)
        return self.proj(out.reshape(T, C))
