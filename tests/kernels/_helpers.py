"""Helpers shared by the attention kernels' tests: random token places for Swin's bias, and torch's
SDPA per sequence (one of the two torch computations the error bound is measured against)."""

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.position_bias import pair_bias


def random_places(T: int, side: int, regions: int, generator: torch.Generator) -> Tensor:
    """(T, 3) int32 places: row and column on a side x side grid (a side beyond the window gives
    clamped offsets), and a shift region in 0..regions-1."""
    rows = torch.randint(0, side, (T,), generator=generator)
    cols = torch.randint(0, side, (T,), generator=generator)
    region = torch.randint(0, regions, (T,), generator=generator)
    return torch.stack([rows, cols, region], 1).to(torch.int32)


def sdpa_per_sequence(q, k, v, cu_seqlens, scale=None, bias=None) -> Tensor:
    """Torch's SDPA kernel, one call per sequence (the bias as a float mask): (T, H, D) -> (T, H, D)."""
    bounds = cu_seqlens.tolist()
    outs = [q[:0]]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
            mask = None if bias is None else pair_bias(bias.pos[s:e], bias.pos[s:e], bias.table, bias.window)
            outs.append(
                F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(0, 1)
            )
    return torch.cat(outs)
