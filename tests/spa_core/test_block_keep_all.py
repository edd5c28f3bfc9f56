"""spa_core/block.py: an SPA block keeping every token, without gate scaling, is the Swin block
(outputs and every gradient) through each pack strategy and CPU path, at any size; pad_keys."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_core.block import SPABlock, SwinBlock
from spa_core.config import SPAConfig
from tests.spa_core._block_refs import (
    TOL,
    _outputs_and_grads,
)


def _twins(dim, heads, window, shift, pack="containers", dtype=torch.float64, seed=0, pad_keys="mask"):
    """A Swin block and a keep-all SPA block (no gate scaling) with the Swin block's weights."""
    torch.manual_seed(seed)
    swin = SwinBlock(dim, heads, window_size=window, shift=shift, pad_keys=pad_keys).to(dtype)
    with torch.no_grad():
        for p in swin.parameters():
            p.normal_(0, 0.3)
    spa = SPABlock(
        dim,
        heads,
        window,
        SPAConfig(selection="all", pack=pack, gate_scaling=False),
        shift=shift,
        pad_keys=pad_keys,
    )
    missing, unexpected = spa.to(dtype).load_state_dict(swin.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("gate.") for k in missing), (missing, unexpected)
    return swin, spa


@settings(derandomize=True, max_examples=25, deadline=None)
@given(
    window=st.integers(2, 5),
    nh=st.integers(1, 3),
    nw=st.integers(1, 3),
    shifted=st.booleans(),
    batch=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
)
def test_keep_all_containers_equal_swin_block(window, nh, nw, shifted, batch, heads):
    """Outputs and gradients (input, qkv, proj, norms, MLP and the bias table) of a keep-all
    containers SPA block equal the Swin block's, on maps that are multiples of the window, shifted or
    not: containers of L = M*M in shifted-window order are Swin's windows, and the bias and shift mask
    follow the tokens' places."""
    hw = (nh * window, nw * window)
    shift = window // 2 if shifted else 0
    swin, spa = _twins(8, heads, window, shift)
    x = torch.randn(batch, *hw, 8, dtype=torch.float64)
    y_swin, g_swin = _outputs_and_grads(swin, x)
    y_spa, g_spa = _outputs_and_grads(spa, x)
    torch.testing.assert_close(y_spa, y_swin, **TOL[torch.float64])
    assert g_spa.keys() == g_swin.keys()
    for name in g_swin:
        torch.testing.assert_close(g_spa[name], g_swin[name], **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("impl", ["ref", "torch", "cpp"])
@pytest.mark.parametrize("shift", [0, 2])
def test_keep_all_equals_swin_through_each_cpu_path(impl, shift):
    """The same equality in float32 through every CPU implementation of the attention op."""
    swin, spa = _twins(16, 2, 4, shift, dtype=torch.float32)
    spa.attn.attn_impl = impl
    x = torch.randn(2, 8, 12, 16)
    y_swin, g_swin = _outputs_and_grads(swin, x)
    y_spa, g_spa = _outputs_and_grads(spa, x)
    torch.testing.assert_close(y_spa, y_swin, atol=2e-5, rtol=1e-4)
    for name in g_swin:
        torch.testing.assert_close(g_spa[name], g_swin[name], atol=5e-5, rtol=1e-4, msg=name)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    window=st.integers(2, 5),
    h=st.integers(1, 17),
    w=st.integers(1, 17),
    shifted=st.booleans(),
    batch=st.integers(1, 3),
    heads=st.sampled_from([1, 2]),
    pad_keys=st.sampled_from(["mask", "attend"]),
    batch_padding=st.booleans(),
    data=st.data(),
)
def test_keep_all_containers_equal_swin_block_at_every_size(
    window, h, w, shifted, batch, heads, pad_keys, batch_padding, data
):
    """The same equality on any map, multiple of the window or not, smaller than it or not, with or
    without batch padding (each image real on a top-left part of its own size), for both ``pad_keys``:
    an image that keeps every real token packs its padded map, so its containers are Swin's windows
    and its padding takes part in attention exactly as in the Swin block. Outputs and gradients."""
    shift = window // 2 if shifted else 0
    valid = None
    if batch_padding:
        valid = torch.zeros(batch, h, w, dtype=torch.bool)
        for b in range(batch):
            valid[b, : data.draw(st.integers(1, h)), : data.draw(st.integers(1, w))] = True
    swin, spa = _twins(8, heads, window, shift, pad_keys=pad_keys)
    x = torch.randn(batch, h, w, 8, dtype=torch.float64)
    y_swin, g_swin = _outputs_and_grads(swin, x, valid)
    y_spa, g_spa = _outputs_and_grads(spa, x, None, valid)
    torch.testing.assert_close(y_spa, y_swin, **TOL[torch.float64])
    assert g_spa.keys() == g_swin.keys()
    for name in g_swin:
        torch.testing.assert_close(g_spa[name], g_swin[name], **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("hw", [(6, 8), (7, 10), (3, 9)])
def test_pad_keys_decide_whether_window_padding_is_attended(hw):
    """Where Swin pads the map, "mask" and "attend" give different blocks (the option matters), and a
    keep-all SPA block follows its Swin block in both. (Unshifted: in a shifted block Swin's shift
    mask already keeps a padding of at most ``M - shift`` rows away from the real tokens.)"""
    x = torch.randn(2, *hw, 8, dtype=torch.float64)
    outs = {}
    for pad_keys in ("mask", "attend"):
        swin, spa = _twins(8, 2, 4, 0, pad_keys=pad_keys)
        with torch.no_grad():
            outs[pad_keys] = swin(x)
            torch.testing.assert_close(spa(x)[0], outs[pad_keys], **TOL[torch.float64])
    assert not torch.allclose(outs["mask"], outs["attend"], atol=1e-6)
