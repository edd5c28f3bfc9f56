"""Attention over packed tokens: the "attention" of Select and Pack Attention (arXiv 2410.23608).

``packed_attention`` runs attention within every sequence of a ``PackedTokens`` through its pack
strategy's ``attend`` (``spa_core.strategies``), one of the layouts here: ``attend_varlen``
(containers and varlen) -> ``kernels.varlen_attention``; ``attend_padded`` (pad) -> the sequences
padded to the longest, one batched SDPA with a key mask; ``attend_masked`` (mask) -> every image dense
over all N positions with the unselected keys masked (the correctness control: no saving).

With a ``kernels.position_bias.PositionBias`` every layout adds Swin's relative position bias to
each packed pair from the tokens' (row, column) places and keeps Swin's shift mask (tokens of
different shift regions do not attend), so an SPA block is a Swin block that attends on fewer tokens.

One switch picks the kernel implementation (timm's ``TIMM_FUSED_ATTN`` habit): the
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
from kernels.position_bias import PositionBias, empty_output, pair_bias
from kernels.seqlens import sequence_ids
from spa_core.contracts import check_attention
from spa_core.pack import PackedTokens, containers_dense, containers_from_dense
from spa_core.registry import PACK_STRATEGIES

__all__ = [
    "packed_attention",
    "attend_varlen",
    "attend_padded",
    "attend_masked",
    "containers_dense_attention",
    "PackedAttention",
]


def _grid_mask(filled: Tensor, pos: Tensor | None, bias: PositionBias | None) -> Tensor:
    """SDPA's mask over rows of P slots (``filled: (R, P)`` bool): a filled query sees the filled
    keys of its row (with ``bias``: plus Swin's bias, minus other shift regions, from ``pos (R, P, 3)``);
    an empty query slot sees every key with no bias (finite, and dropped afterwards)."""
    q_filled, k_filled = filled[:, None, :, None], filled[:, None, None, :]  # (R, 1, P, 1), (R, 1, 1, P)
    if bias is None:
        return k_filled | ~q_filled  # (R, 1, P, P) bool
    if pos is None:
        raise ValueError("_grid_mask: a position bias needs pos (R, P, 3)")
    b = pair_bias(pos, pos, bias.table, bias.window)  # (R, H, P, P), -inf across regions
    b = b.masked_fill(~k_filled, float("-inf"))
    return torch.where(q_filled, b, torch.zeros((), dtype=b.dtype, device=b.device))


def _padded_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    row: Tensor,
    col: Tensor,
    shape: tuple[int, int],
    scale,
    bias: PositionBias | None = None,
):
    """q, k, v: (T, H, D) placed at (row, col) of a (R, P) grid -> SDPA per row, keys limited to the
    filled slots -> (T, H, D). Empty query slots attend to everything (finite, then dropped)."""
    R, P = shape
    T, H, D = q.shape
    flat = row * P + col  # (T,)
    qg, kg, vg = (
        t.new_zeros(R * P, H, D).index_copy(0, flat, t).view(R, P, H, D).transpose(1, 2) for t in (q, k, v)
    )  # (R, H, P, D) each
    filled = torch.zeros(R * P, dtype=torch.bool, device=q.device)
    filled = filled.scatter(0, flat, torch.ones_like(flat, dtype=torch.bool)).view(R, P)  # traceable
    pos = None
    if bias is not None:
        pos = bias.pos.new_zeros(R * P, 3).index_copy(0, flat, bias.pos).view(R, P, 3)
    attn_mask = _grid_mask(filled, pos, bias)
    if attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn_mask, scale=scale)  # (R, H, P, D)
    return out.transpose(1, 2).reshape(R * P, H, D).index_select(0, flat)


def attend_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    packed: PackedTokens,
    *,
    softmax_scale: float | None = None,
    impl=None,
    bias: PositionBias | None = None,
) -> Tensor:
    """Every sequence of ``packed`` through ``kernels.varlen_attention`` (containers, varlen)."""
    return varlen_attention(
        q, k, v, packed.cu_seqlens, packed.max_seqlen, softmax_scale, impl=impl, bias=bias
    )


def attend_padded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    packed: PackedTokens,
    *,
    softmax_scale: float | None = None,
    impl=None,
    bias: PositionBias | None = None,
) -> Tensor:
    """The sequences padded to the longest, one batched SDPA with a key mask (pad)."""
    seq = sequence_ids(packed.cu_seqlens, q.shape[0])  # (T,)
    col = torch.arange(q.shape[0], device=q.device) - packed.cu_seqlens.to(torch.int64)[seq]
    return _padded_sdpa(q, k, v, seq, col, (packed.num_seqs, packed.max_seqlen), softmax_scale, bias)


def attend_masked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    packed: PackedTokens,
    *,
    softmax_scale: float | None = None,
    impl=None,
    bias: PositionBias | None = None,
) -> Tensor:
    """Every image dense over all N positions, the unselected keys masked (mask: no saving)."""
    N = packed.num_tokens
    image = torch.div(packed.indices, N, rounding_mode="floor")
    return _padded_sdpa(q, k, v, image, packed.indices % N, (packed.batch_size, N), softmax_scale, bias)


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    packed: PackedTokens,
    *,
    softmax_scale: float | None = None,
    impl=None,
    bias: PositionBias | None = None,
) -> Tensor:
    """Attention within each sequence of ``packed``, laid out by its strategy's ``attend``
    (``PACK_STRATEGIES[packed.strategy]``). q, k, v: (T, H, D) -> (T, H, D).

    impl: kernel implementation for the varlen layout (None: ``SPA_ATTN_IMPL``, default auto);
    bias: Swin's relative position bias and shift mask from the tokens' places (``pos (T, 3)``).
    An empty pack (no image kept a token) gives an empty output that a backward still reaches q
    and the bias table through (zero gradients): every parameter gets a gradient on every step, so
    data-parallel ranks fill the same gradient buckets.
    """
    if q.shape[0] == 0:
        return empty_output(q, bias)
    attend = PACK_STRATEGIES.get(packed.strategy).attend
    out = attend(q, k, v, packed, softmax_scale=softmax_scale, impl=impl, bias=bias)
    return check_attention(out, q, packed.strategy, attend)


def containers_dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    packed: PackedTokens,
    *,
    softmax_scale: float | None = None,
    bias: PositionBias | None = None,
) -> Tensor:
    """The paper's form of container attention: ``(B', L)`` containers, block-diagonal mask, one SDPA.
    Same result as ``packed_attention`` on a containers pack. q, k, v: (T, H, D) -> (T, H, D)."""
    if q.shape[0] == 0:
        return empty_output(q, bias)
    (qc, kc, vc), same_image = zip(*(containers_dense(packed, t) for t in (q, k, v)))  # (B', L, H, D)
    same_image = same_image[0]  # (B', L, L): both filled, same image
    filled = same_image.any(-1)  # (B', L)
    pos = containers_dense(packed, bias.pos)[0] if bias is not None else None  # (B', L, 3)
    attn_mask = _grid_mask(filled, pos, bias)
    if bias is None:
        attn_mask = attn_mask & (same_image[:, None] | ~filled[:, None, :, None])
    else:
        attn_mask = attn_mask.masked_fill(~same_image[:, None] & filled[:, None, :, None], float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=attn_mask, scale=softmax_scale
    )  # (B', H, L, D)
    return containers_from_dense(packed, out.transpose(1, 2))


class PackedAttention(nn.Module):
    """Multi-head self-attention over packed tokens: qkv projection on the T kept tokens, attention
    within each sequence, output projection. forward(packed, pos=None) -> (T, C).

    ``window_size``: when given, the module holds Swin's learnable ``relative_position_bias_table``
    (``((2M-1)^2, H)``, the name and shape of ``spa_core.block.WindowAttention``'s, so a dense block's
    weights load unchanged) and applies it to every packed pair from ``pos (T, 3)`` (row, column,
    shift region of each token: ``spa_core.windows.token_places``); see ``kernels.position_bias``.
    ``attn_impl``: ``"auto"`` (defer to ``SPA_ATTN_IMPL``) or ``triton | cpp | torch | ref``;
    ``container_form``: ``"varlen"`` (default) or ``"dense"`` (containers run as ``(B', L)`` + mask).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_impl: str = "auto",
        window_size: int | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        if window_size is not None:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * window_size - 1) ** 2, num_heads)
            )
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.register_parameter("relative_position_bias_table", None)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_impl = attn_impl
        self.container_form = "varlen"

    def forward(self, packed: PackedTokens, pos: Tensor | None = None) -> Tensor:
        x = packed.tokens
        T, C = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)  # (T, H, D) each
        bias = None
        if self.window_size is not None:  # it holds the bias table
            if pos is None:
                raise ValueError(
                    "PackedAttention with a position bias table needs pos (T, 3) of the packed tokens"
                )
            bias = PositionBias(pos, self.relative_position_bias_table.to(q.dtype), self.window_size)
        if self.container_form == "dense" and packed.container_len is not None:
            out = containers_dense_attention(q, k, v, packed, softmax_scale=self.scale, bias=bias)
        else:
            impl = None if self.attn_impl == "auto" else self.attn_impl
            out = packed_attention(q, k, v, packed, softmax_scale=self.scale, impl=impl, bias=bias)
        return self.proj(out.reshape(T, C))
