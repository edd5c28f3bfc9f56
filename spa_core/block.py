"""Transformer blocks of the SPA backbone (SPT, arXiv 2410.23608): Swin's windowed block and the SPA block.

``SwinBlock``: pre-norm (shifted-)window attention with relative position bias, then an MLP (Liu et al.,
2021); the dense baseline and stages 1-2 of SPT.

``SPABlock``: gate -> select -> pack -> attention -> unpack, then the MLP::

    r = norm1(x);  s = gate(r, s_prev);  keep = policy(s, tokens=r)
    r_g = sigmoid(s) * w * r                        # w: the straight-through multiplier of the policy
                                                    #    (computed on the kept rows only; without
                                                    #    gate_scaling, or for a policy whose places
                                                    #    are not the gate's: w * r)
    x = x + unpack(attn(pack(r_g, keep), places))   # kept tokens only; the others pass unchanged
    x = x + mlp(norm2(x))                           # on all tokens (default) or only the kept ones

Tokens are packed in shifted-window order (``spa_core.windows.window_order``), shifted every second
block as in Swin, so the paper's containers hold spatial neighbours and regroup from block to block.

An SPA block is the Swin block it replaces plus selection: it holds the same
``relative_position_bias_table`` and applies it to every packed pair from the two tokens' (row,
column) places, and in a shifted block keeps Swin's shift mask (tokens of different shift regions do
not attend; ``spa_core.windows.token_places``, ``kernels.position_bias``). Inside one window that is
exactly Swin's attention; for two tokens of one container but different windows the offset is
clamped to the table's range. So with every token kept and ``gate_scaling`` off, a containers SPA
block computes what the Swin block computes, on any map whose sides are multiples of the window (on
other maps Swin pads the map and its zero padding tokens take part in attention, where SPA packs
only real tokens). ``position_bias: none`` drops the table (an ablation of what position is worth).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import pack_tokens, unpack_tokens
from spa_core.attention import PackedAttention
from spa_core.config import SPAConfig, check_config
from spa_core.gate import resize_scores
from spa_core.pack import pack, unpack
from spa_core.registry import GATES
from spa_core.select import select_tokens
from spa_core.windows import (
    effective_window,
    shifted_window_mask,
    token_places,
    window_order,
    window_partition,
    window_reverse,
)

__all__ = ["Mlp", "DropPath", "WindowAttention", "SwinBlock", "SPABlock", "SPABlockInfo"]


class Mlp(nn.Module):
    """Linear -> GELU -> Linear. (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample: ``forward(x, sample=None)``; x (B, ...) or (T, ...) with
    ``sample: (T,)`` the image of every row (packed tokens)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, sample: Tensor | None = None, batch: int | None = None) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        n = batch if sample is not None else x.shape[0]
        m = x.new_empty(n).bernoulli_(keep) / keep  # (B,)
        m = m[sample] if sample is not None else m
        return x * m.view(-1, *([1] * (x.dim() - 1)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with Swin's relative position bias.

    forward(x: (B*nW, Mh*Mw, C), win (Mh, Mw), mask: (nW, L, L) bool | None) -> same shape. The bias
    table is sized for the configured window; clipped windows index into it.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._index_cache: dict[tuple[int, int], Tensor] = {}

    def _bias(self, win: tuple[int, int]) -> Tensor:
        idx = self._index_cache.get(win)
        if idx is None:
            # made outside inference mode: a cached index from an evaluation must serve training too
            with torch.inference_mode(False):
                Mh, Mw = win
                coords = torch.stack(
                    torch.meshgrid(torch.arange(Mh), torch.arange(Mw), indexing="ij")
                ).flatten(1)
                rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (L, L, 2)
                M = self.window_size
                idx = (rel[..., 0] + M - 1) * (2 * M - 1) + (rel[..., 1] + M - 1)  # (L, L)
            self._index_cache[win] = idx
        idx = idx.to(self.relative_position_bias_table.device)
        return self.relative_position_bias_table[idx].permute(2, 0, 1)  # (H, L, L)

    def forward(self, x: Tensor, win: tuple[int, int], mask: Tensor | None = None) -> Tensor:
        Bw, L, C = x.shape
        q, k, v = self.qkv(x).view(Bw, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self._bias(win).to(q.dtype)[None]  # (1, H, L, L)
        if mask is not None:
            nW = mask.shape[0]
            bias = bias.expand(Bw // nW, nW, -1, L, L).masked_fill(mask[None, :, None], float("-inf"))
            bias = bias.reshape(Bw, -1, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (Bw, H, L, D)
        return self.proj(out.transpose(1, 2).reshape(Bw, L, C))


class SwinBlock(nn.Module):
    """Swin block. forward(x: (B, H, W, C)) -> (B, H, W, C); any H, W (padded to the window, clipped
    window on small maps)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        win, sft = effective_window((H, W), self.window_size, self.shift)
        h = self.norm1(x)
        ph, pw = (-H) % win[0], (-W) % win[1]
        if ph or pw:
            h = F.pad(h, (0, 0, 0, pw, 0, ph))  # zero tokens at the bottom/right, as Swin
        Hp, Wp = H + ph, W + pw
        if any(sft):
            h = torch.roll(h, shifts=(-sft[0], -sft[1]), dims=(1, 2))
        mask = shifted_window_mask((Hp, Wp), win, sft, device=x.device)
        h = window_reverse(self.attn(window_partition(h, win), win, mask), win, (Hp, Wp))  # (B, Hp, Wp, C)
        if any(sft):
            h = torch.roll(h, shifts=sft, dims=(1, 2))
        x = x + self.drop_path(h[:, :H, :W])
        return x + self.drop_path(self.mlp(self.norm2(x)))


@dataclass
class SPABlockInfo:
    """What one SPA block did in a forward: ``logits (B, N)`` gate scores (raster order over ``grid``),
    ``mask (B, N)`` bool kept tokens, ``counts (B,)`` int64, ``kept_fraction`` float tensor (kept / B*N),
    ``stage`` (1-based) and ``index`` (block index within the stage)."""

    stage: int
    index: int
    logits: Tensor
    grid: tuple[int, int]
    mask: Tensor
    counts: Tensor
    kept_fraction: Tensor


class SPABlock(nn.Module):
    """SPA block. forward(x: (B, H, W, C), prev_scores: (B, h, w) | None) -> (x (B, H, W, C), info).

    ``prev_scores`` is the previous SPA block's score map at its own grid (resized here); the new
    score map is ``info.logits.view(B, H, W)``. Works for any N, including maps smaller than a window
    or a container (N < L).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        cfg: SPAConfig,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        stage: int = 0,
        index: int = 0,
    ) -> None:
        super().__init__()
        check_config(cfg, "spa")  # fail at build time, naming the field, not at the first forward
        if cfg.container_len is None:
            cfg = dataclasses.replace(cfg, container_len=window_size**2)  # the paper: L = M * M
        self.cfg = cfg
        self.window_size, self.shift = window_size, shift
        self.stage, self.index = stage, index
        self.norm1 = nn.LayerNorm(dim)
        self.gate = GATES.get(cfg.gate)(dim, cfg)
        bias_window = window_size if cfg.position_bias == "swin" else None
        self.attn = PackedAttention(dim, num_heads, attn_impl=cfg.attn_impl, window_size=bias_window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.generator: torch.Generator | None = None  # set for reproducible Gumbel / random selection

    def forward(self, x: Tensor, prev_scores: Tensor | None = None) -> tuple[Tensor, SPABlockInfo]:
        B, H, W, C = x.shape
        N = H * W
        x = x.reshape(B, N, C)
        r = self.norm1(x)
        prev = resize_scores(prev_scores, (H, W)) if prev_scores is not None else None
        s = self.gate(r, prev)  # (B, N)
        sel = select_tokens(s, self.cfg, training=self.training, generator=self.generator, tokens=r)
        factor = sel.weight.to(s.dtype)  # (B, N)
        if self.cfg.gate_scaling and sel.gate_scaled:
            factor = torch.sigmoid(s) * factor
        order = window_order((H, W), self.window_size, self.shift, device=x.device)  # (N,)
        packed = pack(r, sel.mask, self.cfg.pack, cfg=self.cfg, order=order)
        # r_g = factor * r on the kept rows only: the others are never read
        packed = packed.with_tokens(packed.tokens * factor.reshape(-1)[packed.indices].unsqueeze(-1))
        image = torch.div(packed.indices, N, rounding_mode="floor")  # (T,)
        pos = None
        if self.attn.relative_position_bias_table is not None:
            places = token_places((H, W), self.window_size, self.shift, device=x.device)  # (N, 3)
            pos = places.index_select(0, packed.indices - image * N)  # (T, 3)
        out = self.drop_path(self.attn(packed, pos), image, B)  # (T, C)
        x = unpack(packed, out, x, add=True)  # (B, N, C): residual on kept tokens only
        if self.cfg.mlp_on == "all":
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            flat = x.reshape(B * N, C)
            t = pack_tokens(flat, packed.indices)  # (T, C)
            flat = unpack_tokens(
                self.drop_path(self.mlp(self.norm2(t)), image, B), packed.indices, flat, add=True
            )
            x = flat.view(B, N, C)
        info = SPABlockInfo(
            stage=self.stage,
            index=self.index,
            logits=s,
            grid=(H, W),
            mask=sel.mask,
            counts=sel.counts,
            kept_fraction=sel.counts.sum().to(torch.float32) / max(B * N, 1),
        )
        return x.view(B, H, W, C), info
