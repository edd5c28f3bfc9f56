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
block computes what the Swin block computes, on any map: an image that keeps every real token is
packed over Swin's padded map, in containers of one window's tokens, and padding follows one rule in
both blocks (``pad_keys``; see ``SPABlock``). ``position_bias: none`` drops the table (an ablation of
what position is worth).
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
from spa_core.contracts import check_gate_scores
from spa_core.gate import resize_scores
from spa_core.pack import pack, unpack
from spa_core.registry import GATES
from spa_core.select import select_tokens
from spa_core.windows import (
    effective_window,
    padded_size,
    padding_map,
    padding_window_mask,
    shifted_window_mask,
    token_places,
    window_groups,
    window_order,
    window_partition,
    window_reverse,
)

__all__ = ["Mlp", "DropPath", "WindowAttention", "SwinBlock", "SPABlock", "SPABlockInfo", "PAD_KEYS"]

PAD_KEYS = ("mask", "attend")  # BackboneConfig.pad_keys
# Added to a padding token's shift region (0..8) in an SPA block with pad_keys "mask": padding and
# real tokens then never attend to each other (kernels.position_bias masks pairs of different regions).
_PADDING_REGION = 9


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
        if sample is None:
            n = x.shape[0]
        elif batch is None:
            raise ValueError("DropPath: packed rows (sample given) need the batch size")
        else:
            n = batch
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
        # the bias index per (window, device): made once on the host and copied to the device once,
        # not on every forward (a copy from the host waits for the GPU's queue: a sync per block)
        self._index_cache: dict[tuple[tuple[int, int], torch.device], Tensor] = {}

    def _bias(self, win: tuple[int, int]) -> Tensor:
        device = self.relative_position_bias_table.device
        idx = self._index_cache.get((win, device))
        if idx is None:
            # made outside inference mode: a cached index from an evaluation must serve training too
            with torch.inference_mode(False):
                Mh, Mw = win
                coords = torch.stack(
                    torch.meshgrid(torch.arange(Mh), torch.arange(Mw), indexing="ij")
                ).flatten(1)
                rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (L, L, 2)
                M = self.window_size
                idx = ((rel[..., 0] + M - 1) * (2 * M - 1) + (rel[..., 1] + M - 1)).to(device)  # (L, L)
            self._index_cache[(win, device)] = idx
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
    """Swin block. forward(x: (B, H, W, C), valid: (B, H, W) bool | None) -> (B, H, W, C); any H, W
    (padded to the window, clipped window on small maps).

    ``valid`` marks each image's real tokens (False: batch padding). ``pad_keys="mask"``: padding
    (Swin's window padding and ``valid``'s) and real tokens never attend to each other; ``"attend"``:
    Swin's own rule, the zero padding tokens are keys like any other (``valid`` is then not read)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        pad_keys: str = "mask",
    ) -> None:
        super().__init__()
        if pad_keys not in PAD_KEYS:
            raise ValueError(f"pad_keys must be one of {PAD_KEYS}, got {pad_keys!r}")
        self.window_size, self.shift, self.pad_keys = window_size, shift, pad_keys
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _mask(self, hw: tuple[int, int], valid: Tensor | None, device) -> Tensor | None:
        """``(nW, L, L)`` or, with batch padding, ``(B * nW, L, L)`` bool: the pairs that must not attend."""
        (H, W), M = hw, self.window_size
        win, sft = effective_window(hw, M, self.shift)
        Hp, Wp = padded_size(hw, M)
        if self.pad_keys == "attend" or (valid is None and (Hp, Wp) == (H, W)):
            return shifted_window_mask((Hp, Wp), win, sft, device=device)
        if valid is None:
            return padding_window_mask(hw, M, self.shift, device=device)
        real = valid.new_zeros(valid.shape[0], Hp, Wp)
        real[:, :H, :W] = valid
        groups = window_groups(real, win, sft)  # (B * nW, L)
        blocked = groups[:, :, None] != groups[:, None, :]  # (B * nW, L, L)
        shifted = shifted_window_mask((Hp, Wp), win, sft, device=device)
        if shifted is not None:
            L = groups.shape[1]
            blocked = (blocked.view(valid.shape[0], -1, L, L) | shifted).view(-1, L, L)
        return blocked

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        B, H, W, C = x.shape
        win, sft = effective_window((H, W), self.window_size, self.shift)
        h = self.norm1(x)
        Hp, Wp = padded_size((H, W), self.window_size)
        if (Hp, Wp) != (H, W):
            h = F.pad(h, (0, 0, 0, Wp - W, 0, Hp - H))  # zero tokens at the bottom/right, as Swin
        if any(sft):
            h = torch.roll(h, shifts=(-sft[0], -sft[1]), dims=(1, 2))
        mask = self._mask((H, W), valid, x.device)
        h = window_reverse(self.attn(window_partition(h, win), win, mask), win, (Hp, Wp))  # (B, Hp, Wp, C)
        if any(sft):
            h = torch.roll(h, shifts=sft, dims=(1, 2))
        x = x + self.drop_path(h[:, :H, :W])
        return x + self.drop_path(self.mlp(self.norm2(x)))


@dataclass
class SPABlockInfo:
    """What one SPA block did in a forward: ``logits (B, N)`` gate scores (raster order over ``grid``),
    ``mask (B, N)`` bool kept tokens (never a padding token), ``counts (B,)`` int64, ``kept_fraction``
    float tensor (kept / real tokens), ``valid (B, N)`` bool real tokens or None (no batch padding),
    ``stage`` (1-based) and ``index`` (block index within the stage)."""

    stage: int
    index: int
    logits: Tensor
    grid: tuple[int, int]
    mask: Tensor
    counts: Tensor
    kept_fraction: Tensor
    valid: Tensor | None = None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or a.index is None or b.index is None
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


class SPABlock(nn.Module):
    """SPA block. forward(x: (B, H, W, C), prev_scores: (B, h, w) | None, valid: (B, H, W) bool | None)
    -> (x (B, H, W, C), info).

    ``prev_scores`` is the previous SPA block's score map at its own grid (resized here); the new
    score map is ``info.logits.view(B, H, W)``. ``valid`` marks each image's real tokens (False: batch
    padding): padding is never selected. Works for any N, including maps smaller than a window or a
    container (N < L). ``generator``: the ``torch.Generator`` of the selection's random draws
    (None: torch's default), on any device (``_generator_on``).

    Padding, and why the dense twin is exact at every size: an image that keeps every real token (with
    ``position_bias: swin``) is packed over its padded map, as the Swin block computes it: Swin's
    window padding (zero tokens after the norm) and its batch padding included, in shifted-window order,
    so that with ``L`` = the window's tokens each container is one of Swin's windows. The padding then
    follows ``pad_keys`` as in the Swin block ("mask": padding and real tokens never attend to each
    other; "attend": padding tokens are keys like any other). An image that drops tokens packs only
    its kept real tokens.

    Host syncs per forward: one, the pack's read of the kept counts (``spa_core.pack``), which every
    size after it needs. Selection, places, scaling, attention (FlexAttention on CUDA) and unpack read
    nothing back; the window order, token places and bias indices are cached per device.
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
        pad_keys: str = "mask",
    ) -> None:
        super().__init__()
        check_config(cfg, "spa")  # fail at build time, naming the field, not at the first forward
        if pad_keys not in PAD_KEYS:
            raise ValueError(f"pad_keys must be one of {PAD_KEYS}, got {pad_keys!r}")
        self.cfg = cfg
        self.window_size, self.shift, self.pad_keys = window_size, shift, pad_keys
        self.stage, self.index = stage, index
        self.norm1 = nn.LayerNorm(dim)
        self.gate = GATES.get(cfg.gate)(dim, cfg)
        bias_window = window_size if cfg.position_bias == "swin" else None
        self.attn = PackedAttention(dim, num_heads, attn_impl=cfg.attn_impl, window_size=bias_window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # set for reproducible Gumbel / random selection (any device: see _generator_on)
        self.generator: torch.Generator | None = None
        self._device_generator: tuple[torch.Generator, torch.device, torch.Generator] | None = None
        self._pack_cfgs: dict[int, SPAConfig] = {}

    def _generator_on(self, device: torch.device) -> torch.Generator | None:
        """The generator the selection draws from on ``device``: ``self.generator`` when it is there,
        else a generator on ``device`` seeded once from ``self.generator`` (one draw from it) and kept
        until ``self.generator`` is replaced. Why: a draw on a CPU generator for GPU scores is a copy
        per block and step, and a copy from the host waits for the GPU's queue (a sync). The draws are
        then reproducible per seed on one device type (CUDA's generator is not the CPU's)."""
        g = self.generator
        if g is None or _same_device(g.device, device):
            return g
        cached = self._device_generator
        if cached is None or cached[0] is not g or cached[1] != device:
            seed = int(torch.randint(0, 2**62, (), generator=g, device=g.device))
            cached = (g, device, torch.Generator(device=device).manual_seed(seed))
            self._device_generator = cached
        return cached[2]

    def container_len(self, hw: tuple[int, int]) -> int:
        """The containers' L on a map ``hw``: ``cfg.container_len``, or the tokens of one window (the
        paper's ``M * M``; ``Mh * Mw`` where the map is smaller than the window and Swin clips it)."""
        if self.cfg.container_len is not None:
            return self.cfg.container_len
        (Mh, Mw), _ = effective_window(hw, self.window_size, self.shift)
        return Mh * Mw

    def _pack_cfg(self, hw: tuple[int, int]) -> SPAConfig:
        L = self.container_len(hw)
        cfg = self._pack_cfgs.get(L)
        if cfg is None:
            cfg = self._pack_cfgs[L] = dataclasses.replace(self.cfg, container_len=L)
        return cfg

    def forward(
        self, x: Tensor, prev_scores: Tensor | None = None, valid: Tensor | None = None
    ) -> tuple[Tensor, SPABlockInfo]:
        B, H, W, C = x.shape
        N = H * W
        x = x.reshape(B, N, C)
        r = self.norm1(x)
        prev = resize_scores(prev_scores, (H, W)) if prev_scores is not None else None
        s = check_gate_scores(self.gate(r, prev), r, self.cfg.gate, type(self.gate))  # (B, N)
        generator = self._generator_on(x.device)
        real = None if valid is None else valid.reshape(B, N)
        sel = select_tokens(s, self.cfg, training=self.training, generator=generator, tokens=r, valid=real)
        keep, counts = sel.mask, sel.counts
        if real is not None:  # a plugin policy without ``valid`` may keep padding: dropped here
            keep = keep & real
            counts = keep.sum(1, dtype=torch.int64)
        factor = sel.weight.to(s.dtype)  # (B, N)
        if self.cfg.gate_scaling and sel.gate_scaled:
            factor = torch.sigmoid(s) * factor
        Hp, Wp = padded_size((H, W), self.window_size)
        # only a block with Swin's position bias can be its Swin block; without it padding is never packed
        with_padding = (
            (Hp, Wp) != (H, W) or real is not None
        ) and self.attn.relative_position_bias_table is not None
        if with_padding:
            rows, kept, factor, is_pad = self._padded(r, keep, factor, real, (H, W))
        else:
            rows, kept, is_pad = r, keep, None
            Hp, Wp = H, W
        Np = rows.shape[1]
        order = window_order((H, W), self.window_size, self.shift, device=x.device, padded=with_padding)
        packed = pack(rows, kept, self.cfg.pack, cfg=self._pack_cfg((H, W)), order=order)
        # r_g = factor * r on the kept rows only: the others are never read
        packed = packed.with_tokens(packed.tokens * factor.reshape(-1)[packed.indices].unsqueeze(-1))
        image = torch.div(packed.indices, Np, rounding_mode="floor")  # (T,)
        pos = None
        if self.attn.relative_position_bias_table is not None:
            places = token_places((H, W), self.window_size, self.shift, device=x.device, padded=with_padding)
            pos = places.index_select(0, packed.indices - image * Np)  # (T, 3)
            if is_pad is not None and self.pad_keys == "mask":
                region = pos[:, 2] + _PADDING_REGION * is_pad.reshape(-1)[packed.indices].to(pos.dtype)
                pos = torch.cat([pos[:, :2], region[:, None]], 1)
        out = self.drop_path(self.attn(packed, pos), image, B)  # (T, C)
        if Np != N:  # residual on the padded map, then back to the real tokens
            base = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H)).view(B, Np, C)
        else:
            base = x
        x = unpack(packed, out, base, add=True)  # (B, Np, C): residual on kept tokens only
        if self.cfg.mlp_on == "all":
            x = _crop(x, (Hp, Wp), (H, W))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            flat = x.reshape(B * Np, C)
            t = pack_tokens(flat, packed.indices)  # (T, C)
            flat = unpack_tokens(
                self.drop_path(self.mlp(self.norm2(t)), image, B), packed.indices, flat, add=True
            )
            x = _crop(flat.view(B, Np, C), (Hp, Wp), (H, W))
        kept_fraction = counts.sum().to(torch.float32)
        if real is None:
            kept_fraction = kept_fraction / max(B * N, 1)
        else:
            kept_fraction = kept_fraction / real.sum().clamp(min=1).to(torch.float32)
        info = SPABlockInfo(
            stage=self.stage,
            index=self.index,
            logits=s,
            grid=(H, W),
            mask=keep,
            counts=counts,
            kept_fraction=kept_fraction,
            valid=real,
        )
        return x.view(B, H, W, C), info

    def _padded(
        self, r: Tensor, keep: Tensor, factor: Tensor, real: Tensor | None, hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The padded map's rows ``(B, Np, C)`` (Swin's zero tokens after the norm), what is packed
        ``(B, Np)`` (the kept real tokens; every place of an image that keeps all its real tokens), the
        gate factor ``(B, Np)`` and the padding ``(B, Np)`` bool (window and batch padding)."""
        (H, W), M = hw, self.window_size
        B, N, C = r.shape
        Hp, Wp = padded_size(hw, M)
        pad = padding_map(hw, M, device=r.device)  # (Hp, Wp)
        is_pad = pad.expand(B, Hp, Wp).clone()
        if real is not None:
            is_pad[:, :H, :W] = ~real.view(B, H, W)
        whole = (keep | is_pad[:, :H, :W].reshape(B, N)).all(1)  # (B,) keeps every real token
        kept = is_pad & whole[:, None, None]
        kept[:, :H, :W] |= keep.view(B, H, W)
        if (Hp, Wp) != (H, W):
            r = F.pad(r.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H)).view(B, Hp * Wp, C)
            factor = F.pad(factor.view(B, H, W), (0, Wp - W, 0, Hp - H), value=1.0)
        return r, kept.view(B, Hp * Wp), factor.reshape(B, Hp * Wp), is_pad.view(B, Hp * Wp)


def _crop(x: Tensor, padded: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """(B, Hp*Wp, C) on the padded map -> (B, H*W, C), the real tokens."""
    if padded == hw:
        return x
    B, _, C = x.shape
    return x.view(B, *padded, C)[:, : hw[0], : hw[1]].reshape(B, hw[0] * hw[1], C)
