"""spa_core/block.py's Swin block: windows are a permutation and local, the shift mixes windows,
odd sizes, padding masked or attended, the block equal to its definition; the GPU path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels import triton_available
from spa_core.block import SwinBlock
from spa_core.windows import effective_window, window_order
from tests.spa_core._block_refs import (
    PER_IMAGE,
    TOL,
    _block,
)


def _swin(shift, pad_keys="mask"):
    torch.manual_seed(0)
    blk = SwinBlock(16, 2, window_size=4, shift=shift, pad_keys=pad_keys).double().eval()
    with torch.no_grad():  # weights large enough for one token to visibly move its window
        for p in blk.parameters():
            p.normal_(0, 0.1)
    return blk


@pytest.mark.parametrize("hw,window,shift", [((8, 8), 4, 0), ((8, 8), 4, 2), ((5, 7), 4, 2), ((3, 2), 7, 3)])
def test_window_order_is_a_permutation(hw, window, shift):
    order = window_order(hw, window, shift)
    assert sorted(order.tolist()) == list(range(hw[0] * hw[1]))


def test_swin_block_windows_are_local():
    blk = _swin(0)
    x = torch.randn(1, 8, 8, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 0, 0] += torch.randn(
        16, dtype=torch.float64
    )  # a token of the top-left window (not a constant: LayerNorm)
    with torch.no_grad():
        y, y2 = blk(x), blk(x2)
    changed = (y - y2).abs().amax(-1)[0] > 1e-12
    assert changed[:4, :4].all() and not changed[4:].any() and not changed[:, 4:].any()


def test_swin_block_shift_mixes_windows_and_handles_odd_sizes():
    blk = _swin(2)
    x = torch.randn(2, 8, 8, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 3, 3] += torch.randn(16, dtype=torch.float64)
    with torch.no_grad():
        changed = (blk(x) - blk(x2)).abs().amax(-1)[0] > 1e-12
    assert changed[2:6, 2:6].all() and changed.sum() == 16  # the shifted window around (3, 3)
    for hw in [(5, 7), (3, 2), (1, 1)]:
        with torch.no_grad():
            assert blk(torch.randn(2, *hw, 16, dtype=torch.float64)).shape == (2, *hw, 16)


def test_spa_block_on_maps_smaller_than_a_container():
    for strategy in ["containers", *PER_IMAGE]:
        blk = _block(strategy, window=7, selection="topk", ratio=0.5)  # L = 49 > N
        for hw in [(1, 1), (2, 3)]:
            x = torch.randn(2, *hw, 24)
            with torch.no_grad():
                y, info = blk(x)
            assert y.shape == x.shape and info.grid == hw


def _swin_reference(blk, x, valid=None):
    """Swin's shifted-window block by its definition, densely: token p attends to token q iff, after
    the cyclic shift of the zero-padded map, both fall in the same window and came from the same
    region (and, with ``pad_keys: mask``, both are real or both are padding: Swin's zero padding and
    the False places of ``valid (B, H, W)``); the bias is the relative position inside the window."""
    B, H, W, C = x.shape
    M = blk.window_size
    (Mh, Mw), (sh, sw) = effective_window((H, W), M, blk.shift)
    Hp, Wp = -(-H // Mh) * Mh, -(-W // Mw) * Mw
    h = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    h[:, :H, :W] = blk.norm1(x)
    i, j = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    ri, rj = ((i - sh) % Hp).flatten(), ((j - sw) % Wp).flatten()  # coordinates after the shift

    def region(r, size, m, s):
        return torch.zeros_like(r) if s == 0 else (r >= size - m).long() + (r >= size - s).long()

    key = torch.stack([ri // Mh, rj // Mw, region(ri, Hp, Mh, sh), region(rj, Wp, Mw, sw)], 1)
    allowed = (key[:, None] == key[None]).all(-1)  # (P, P)
    if blk.pad_keys == "mask":
        real = torch.zeros(B, Hp, Wp, dtype=torch.bool)
        real[:, :H, :W] = True if valid is None else valid
        real = real.reshape(B, Hp * Wp)
        allowed = allowed & (real[:, :, None] == real[:, None, :])[:, None]  # (B, 1, P, P)
    dy = (ri % Mh)[:, None] - (ri % Mh)[None]
    dx = (rj % Mw)[:, None] - (rj % Mw)[None]
    bias = blk.attn.relative_position_bias_table[(dy + M - 1) * (2 * M - 1) + dx + M - 1].permute(2, 0, 1)
    a = blk.attn
    nh = a.num_heads
    q, k, v = a.qkv(h.reshape(B, Hp * Wp, C)).view(B, -1, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * a.scale + bias
    out = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v  # (B, nh, P, D)
    out = a.proj(out.transpose(1, 2).reshape(B, Hp, Wp, C))[:, :H, :W]
    y = x + out
    return y + blk.mlp(blk.norm2(y))


@pytest.mark.parametrize("pad_keys", ["mask", "attend"])
@pytest.mark.parametrize("hw,shift", [((8, 8), 0), ((8, 8), 2), ((6, 10), 2), ((5, 7), 2), ((3, 9), 2)])
def test_swin_block_equals_its_definition(hw, shift, pad_keys):
    blk = _swin(shift, pad_keys)
    x = torch.randn(2, *hw, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _swin_reference(blk, x), **TOL[torch.float64])
    # batch padding: image 0 real on 4 x 3 places, image 1 everywhere
    valid = torch.zeros(2, *hw, dtype=torch.bool)
    valid[0, :4, :3] = True
    valid[1] = True
    with torch.no_grad():
        torch.testing.assert_close(blk(x, valid), _swin_reference(blk, x, valid), **TOL[torch.float64])


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_with_masked_padding_ignores_the_padding(shift):
    """With ``pad_keys: mask`` a real token's output does not depend on how much padding its map or
    batch adds: an 5 x 7 image alone equals the same image padded into a 9 x 13 batch (window 4, so
    Swin's own padding differs too); with ``attend`` it does depend on it."""
    x = torch.randn(1, 5, 7, 16, dtype=torch.float64)
    big = torch.randn(1, 9, 13, 16, dtype=torch.float64)  # the padding's values must not matter either
    big[:, :5, :7] = x
    valid = torch.zeros(1, 9, 13, dtype=torch.bool)
    valid[:, :5, :7] = True
    for pad_keys in ("mask", "attend"):
        blk = _swin(shift, pad_keys)
        with torch.no_grad():
            alone, padded = blk(x), blk(big, valid)[:, :5, :7]
        if pad_keys == "mask":
            torch.testing.assert_close(padded, alone, **TOL[torch.float64])
        else:
            assert not torch.allclose(padded, alone, atol=1e-6)


_GPU_PATH_SCRIPT = """
import torch
from spa_core.block import SPABlock
from spa_core.config import SPAConfig
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
for pack in ("containers", "varlen"):
    blk = SPABlock(16, 2, 2, SPAConfig(selection="topk", ratio=0.6, pack=pack), shift=1).to(device).eval()
    x = torch.randn(3, 4, 4, 16, device=device, requires_grad=device == "cuda")
    outs = []
    for impl in ("torch", "triton"):
        blk.attn.attn_impl = impl  # the per-module switch
        with torch.set_grad_enabled(device == "cuda"):  # FlexAttention's CPU path is forward only
            y, _ = blk(x)
        g = torch.autograd.grad(y.pow(2).sum(), x)[0] if device == "cuda" else y
        outs.append((y.detach(), g))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
"""


@pytest.mark.triton
def test_block_on_the_gpu_path_matches_torch():
    """The SPA block with the GPU path (FlexAttention for attention, with the bias and shift mask; the
    Triton pack kernels), forward on CPU under TRITON_INTERPRET and forward and backward on CUDA, equals
    the torch path. A subprocess: TRITON_INTERPRET must be set before Triton is first imported."""
    if not triton_available():
        pytest.skip("triton not importable")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", _GPU_PATH_SCRIPT], check=True, env=env, timeout=600)
