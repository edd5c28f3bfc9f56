"""The SPA backbone (SPT, arXiv 2410.23608) and its dense baseline: a four-stage Swin-style hierarchy.

Patch embedding (stride ``patch_size``; ``cfg.stem`` says how: ``PatchEmbed``), then four stages of
blocks at strides 4/8/16/32 (patch 4) with patch merging between them. Stages named in
``spa_stages`` are built from SPA blocks, the others from Swin blocks (shifted windows every second
block in both); ``extra_stage3_blocks`` deepens stage 3 (the paper adds 4, paid for by the savings).
The dense baseline (``variant="dense"``, ``spa=None`` or no ``spa_stages``) is the same network with
Swin blocks everywhere. Any image size works: the image is padded to the patch size, odd maps are
padded before merging, windows are padded or clipped.

``forward(images, image_sizes=None) -> BackboneOutput(features, blocks, valid)``: the four stage maps
(each layer-normed, as Swin for detection), one ``SPABlockInfo`` per SPA block in forward order, and
each stage's real tokens. ``image_sizes: (B, 2)`` (height, width) in pixels says how much of each
image of a padded batch is real (padding at the bottom/right): SPA never selects padding, and with
``pad_keys: mask`` (the default) padding is never attended to, merged into a real token or output
(its features are zero), so an image's features do not depend on the batch it is padded into.

``cfg.pretrained``: ``build_backbone`` loads a Swin checkpoint (``spa_core.pretrained``) into the
model and keeps what it did as ``model.pretrained_load``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_core.block import SPABlock, SPABlockInfo, SwinBlock
from spa_core.config import BackboneConfig, stem_problem
from spa_core.pretrained import load_pretrained
from spa_core.registry import MODEL_VARIANTS

__all__ = [
    "BackboneOutput",
    "BackboneFeatures",
    "SPABackbone",
    "PatchEmbed",
    "PatchMerging",
    "build_backbone",
    "stage_grids",
    "valid_masks",
]


@dataclass
class BackboneOutput:
    """features: 4 maps (B, C_i, H_i, W_i) at strides 4/8/16/32 (patch 4); blocks: SPA block infos;
    valid: per stage (B, H_i, W_i) bool real tokens, or None (no ``image_sizes`` given: all real)."""

    features: list[Tensor]
    blocks: list[SPABlockInfo]
    valid: list[Tensor] | None = None


class PatchEmbed(nn.Module):
    """images (B, 3, H, W) -> tokens (B, ceil(H/p), ceil(W/p), C), then LayerNorm. ``stem="patch"``
    (Swin): one stride-p conv (``proj``). ``"patch2"``: a 2 x 2 stride-2 conv to C/2 channels
    (``proj``), LayerNorm over channels (``mid_norm``), GELU, a (p/2) x (p/2) conv of that stride
    (``proj2``). Both read each p x p patch alone: a token depends on its own pixels only."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, stem: str = "patch") -> None:
        super().__init__()
        self.patch_size = patch_size
        if stem == "patch":
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        elif stem == "patch2":
            if patch_size % 2 or dim < 2:
                raise ValueError(
                    f"stem 'patch2' needs an even patch_size and embed_dim >= 2, got {patch_size}, {dim}"
                )
            self.proj = nn.Conv2d(in_chans, dim // 2, kernel_size=2, stride=2)
            self.mid_norm = nn.LayerNorm(dim // 2)
            self.proj2 = nn.Conv2d(dim // 2, dim, kernel_size=patch_size // 2, stride=patch_size // 2)
        else:
            raise ValueError(f"unknown stem {stem!r}; known: patch, patch2")
        self.stem = stem
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        ph, pw = (-x.shape[2]) % p, (-x.shape[3]) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        x = self.proj(x)
        if self.stem == "patch2":
            x = F.gelu(self.mid_norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            x = self.proj2(x)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C): 2x2 neighbours concatenated, LayerNorm, Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1
        )  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


def stage_grids(image_hw: tuple[int, int], patch_size: int, num_stages: int = 4) -> list[tuple[int, int]]:
    """Token grid (H_i, W_i) of every stage for an image of ``image_hw``."""
    h, w = -(-image_hw[0] // patch_size), -(-image_hw[1] // patch_size)
    grids = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = -(-h // 2), -(-w // 2)
        grids.append((h, w))
    return grids


def valid_masks(image_sizes: Tensor, grids: list[tuple[int, int]], patch_size: int) -> list[Tensor]:
    """Real tokens of every stage: image_sizes (B, 2) int (height, width) of each image's real pixels
    (the rest of the batch's ``(H, W)`` is padding at the bottom/right); grids: the stages' (H_i, W_i)
    (``stage_grids``) -> per stage (B, H_i, W_i) bool. A token is real if any real pixel falls in it
    (``ceil`` at the patch embedding and at every merge, as the grids themselves)."""
    sizes = torch.as_tensor(image_sizes).to(torch.int64)
    if sizes.dim() != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes must be (B, 2) (height, width), got {tuple(sizes.shape)}")
    ext = torch.div(sizes + patch_size - 1, patch_size, rounding_mode="floor")  # (B, 2) tokens
    out = []
    for i, (h, w) in enumerate(grids):
        if i:
            ext = torch.div(ext + 1, 2, rounding_mode="floor")
        rows = torch.arange(h, device=ext.device)[None, :, None] < ext[:, 0, None, None]
        cols = torch.arange(w, device=ext.device)[None, None, :] < ext[:, 1, None, None]
        out.append(rows & cols)  # (B, h, w)
    return out


class SPABackbone(nn.Module):
    """Swin-style hierarchy with SPA blocks in ``cfg.spa_stages``; see the module docstring.

    Attributes: ``stage_channels: list[int]``, ``cfg``. ``label_grids(image_hw)`` gives the grids at
    which the SPA blocks need selection labels.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if len(cfg.depths) != 4 or len(cfg.num_heads) != 4:
            raise ValueError(f"depths and num_heads must have 4 entries, got {cfg.depths}, {cfg.num_heads}")
        bad = [s for s in cfg.spa_stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"spa_stages are 1-based stage numbers in 1..4, got {cfg.spa_stages}")
        problem = stem_problem(cfg)
        if problem:
            raise ValueError(problem)
        self.cfg = cfg
        spa_stages = () if cfg.is_dense else tuple(cfg.spa_stages)
        depths = list(cfg.depths)
        depths[2] += cfg.extra_stage3_blocks
        self.stage_channels = [cfg.embed_dim * 2**i for i in range(4)]
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.stem)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.norms = nn.ModuleList()
        k = 0
        for i, (depth, heads, dim) in enumerate(zip(depths, cfg.num_heads, self.stage_channels)):
            blocks = nn.ModuleList()
            for j in range(depth):
                shift = 0 if j % 2 == 0 else cfg.window_size // 2
                common = dict(
                    dim=dim,
                    num_heads=heads,
                    window_size=cfg.window_size,
                    shift=shift,
                    mlp_ratio=cfg.mlp_ratio,
                    drop_path=dpr[k],
                    pad_keys=cfg.pad_keys,
                )
                if i + 1 in spa_stages and cfg.spa is not None:  # spa_stages is empty without cfg.spa
                    blocks.append(SPABlock(cfg=cfg.spa, stage=i + 1, index=j, **common))
                else:
                    blocks.append(SwinBlock(**common))
                k += 1
            self.stages.append(blocks)
            self.merges.append(PatchMerging(dim) if i < 3 else nn.Identity())
            self.norms.append(nn.LayerNorm(dim))
        self.spa_stages = spa_stages
        self.apply(_init_weights)

    def label_grids(self, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """The distinct grids (H, W) of the SPA blocks for an image of ``image_hw``, in stage order."""
        grids = stage_grids(image_hw, self.cfg.patch_size)
        return [grids[s - 1] for s in sorted(self.spa_stages)]

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> BackboneOutput:
        """images (B, 3, H, W); image_sizes (B, 2) int real (height, width) per image, or None (every
        pixel real) -> ``BackboneOutput`` (see the module docstring)."""
        x = self.patch_embed(images)  # (B, H1, W1, C1)
        valid = None
        if image_sizes is not None:
            grids = stage_grids((images.shape[-2], images.shape[-1]), self.cfg.patch_size)
            valid = valid_masks(torch.as_tensor(image_sizes, device=x.device), grids, self.cfg.patch_size)
        masked = valid is not None and self.cfg.pad_keys == "mask"
        features, infos = [], []
        prev = None  # previous SPA block's score map (B, h, w)
        for i, blocks in enumerate(self.stages):
            v = valid[i] if valid is not None else None
            for blk in cast(nn.ModuleList, blocks):
                if isinstance(blk, SPABlock):
                    x, info = blk(x, prev, v)
                    prev = info.logits.view(x.shape[0], *info.grid)
                    if v is not None:  # padding's scores reach no real token through the max
                        prev = prev.masked_fill(~v, float("-inf"))
                    infos.append(info)
                else:
                    x = blk(x, v)
            if masked and v is not None:  # padding is merged into no real token and outputs nothing
                x = x.masked_fill(~v[..., None], 0.0)
            f = self.norms[i](x)
            if masked and v is not None:
                f = f.masked_fill(~v[..., None], 0.0)
            features.append(f.permute(0, 3, 1, 2).contiguous())  # (B, C_i, H_i, W_i)
            x = self.merges[i](x)
        return BackboneOutput(features=features, blocks=infos, valid=valid)


class BackboneFeatures(nn.Module):
    """A backbone whose forward returns only ``tuple(features)``: what ``torch.jit.trace`` (and so
    fvcore's ``FlopCountAnalysis``) accepts as an output."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        return tuple(self.backbone(images, image_sizes).features)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@MODEL_VARIANTS.register("spa")
def build_spa(cfg: BackboneConfig) -> SPABackbone:
    """SPA blocks in ``cfg.spa_stages`` (dense if ``cfg.spa`` is None or no stages are named)."""
    return SPABackbone(cfg)


@MODEL_VARIANTS.register("dense")
def build_dense(cfg: BackboneConfig) -> SPABackbone:
    """The dense Swin baseline: the same network with Swin blocks everywhere and no gates."""
    return SPABackbone(dataclasses.replace(cfg, variant="dense", spa_stages=()))


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone ``MODEL_VARIANTS[cfg.variant]`` builds from ``cfg``; with ``cfg.pretrained`` the
    Swin checkpoint at that path is loaded into it (``spa_core.pretrained.load_pretrained``; what it
    loaded, what had no source and what it ignored are kept as ``model.pretrained_load``)."""
    model = MODEL_VARIANTS.get(cfg.variant)(cfg)
    if cfg.pretrained is not None:
        model.pretrained_load = load_pretrained(model, cfg.pretrained)
    return model
