"""Window geometry of Swin (Liu et al., 2021) as used by the SPA backbone (arXiv 2410.23608).

A feature map ``(B, H, W, C)`` is cut into ``Mh x Mw`` windows after an optional cyclic shift. When
the map is smaller than the window in a dimension, the window is clipped to the map there and that
dimension is not shifted (timm's rule, per dimension; Swin's original applies it to both at once).
Maps not divisible by the window are padded at the bottom/right, as Swin does for detection.

``token_places`` gives every token's (row, column, shift region): what an SPA block hands to the
attention op so that packed tokens get Swin's relative position bias and shift mask.

``window_order`` gives the same grouping as a permutation of the (unpadded) tokens: SPA packs the
selected tokens in this order, so a container of ``L = M*M`` slots holds spatial neighbours, and the
shift of every second block changes which neighbours share a container. With ``padded=True`` both
cover the padded map's ``Hp * Wp`` places (padding included, raster order over the padded map): what
an SPA block uses for an image that keeps every token, so that its containers are Swin's windows.
``padding_window_mask`` is Swin's shift mask plus the separation of padding from real tokens
(``BackboneConfig.pad_keys: mask``).
"""

from __future__ import annotations

from functools import lru_cache, wraps

import torch
from torch import Tensor

__all__ = [
    "effective_window",
    "padded_size",
    "padding_map",
    "padding_window_mask",
    "window_groups",
    "window_partition",
    "window_reverse",
    "window_order",
    "shifted_window_mask",
    "token_places",
]


def _cached(maxsize: int):
    """``lru_cache`` for the geometry tensors, made outside inference mode: a tensor created under
    ``torch.inference_mode`` (an evaluation) cannot be saved for backward, so a cached one would break
    every later training step that reads it."""

    def deco(fn):
        @wraps(fn)
        def made_normally(*args):
            with torch.inference_mode(False):
                return fn(*args)

        return lru_cache(maxsize=maxsize)(made_normally)

    return deco


def effective_window(hw: tuple[int, int], window: int, shift: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window ``(Mh, Mw)`` and shift ``(sh, sw)`` used on a map of size ``hw``: clipped to the map,
    no shift in a dimension the window already covers."""
    H, W = hw
    win = (min(window, H), min(window, W))
    sft = (shift if H > window else 0, shift if W > window else 0)
    return win, sft


def padded_size(hw: tuple[int, int], window: int) -> tuple[int, int]:
    """``(Hp, Wp)``: the map ``hw`` padded at the bottom/right to multiples of its effective window."""
    (Mh, Mw), _ = effective_window(hw, window, 0)
    return -(-hw[0] // Mh) * Mh, -(-hw[1] // Mw) * Mw


def window_partition(x: Tensor, win: tuple[int, int]) -> Tensor:
    """x: (B, H, W, C) with H % Mh == W % Mw == 0 -> (B * nW, Mh * Mw, C)."""
    B, H, W, C = x.shape
    Mh, Mw = win
    x = x.view(B, H // Mh, Mh, W // Mw, Mw, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Mh * Mw, C)  # (B*nW, Mh*Mw, C)


def window_reverse(windows: Tensor, win: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """windows: (B * nW, Mh * Mw, C) -> (B, H, W, C); inverse of ``window_partition``."""
    Mh, Mw = win
    H, W = hw
    C = windows.shape[-1]
    x = windows.view(-1, H // Mh, W // Mw, Mh, Mw, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


@_cached(256)
def _window_order_cpu(H: int, W: int, window: int, shift: int, padded: bool) -> Tensor:
    (Mh, Mw), (sh, sw) = effective_window((H, W), window, shift)
    Hp, Wp = padded_size((H, W), window)
    if padded:
        idx = torch.arange(Hp * Wp).view(Hp, Wp)
    else:
        idx = torch.full((Hp, Wp), -1, dtype=torch.int64)
        idx[:H, :W] = torch.arange(H * W).view(H, W)
    if sh or sw:
        idx = torch.roll(idx, shifts=(-sh, -sw), dims=(0, 1))  # as Swin rolls the features
    order = window_partition(idx[None, :, :, None], (Mh, Mw)).reshape(-1)
    return order[order >= 0].contiguous()


@_cached(256)
def _window_order_on(H: int, W: int, window: int, shift: int, padded: bool, device: torch.device) -> Tensor:
    return _window_order_cpu(H, W, window, shift, padded).to(device)


def window_order(
    hw: tuple[int, int], window: int, shift: int = 0, device=None, padded: bool = False
) -> Tensor:
    """Raster token ids ``(N,) int64`` (``N = H*W``) listed window by window (each window in raster
    order) after the cyclic shift; padding positions are left out, so this is a permutation of
    ``range(N)``. ``padded``: the ids of the padded map's ``Hp * Wp`` raster places instead, padding
    included (``(Hp*Wp,)``, every window whole). Cached per geometry and device (do not modify the
    result in place)."""
    return _window_order_on(
        int(hw[0]), int(hw[1]), int(window), int(shift), bool(padded), torch.device(device or "cpu")
    )


@_cached(64)
def _shifted_window_mask_cpu(Hp: int, Wp: int, Mh: int, Mw: int, sh: int, sw: int) -> Tensor:
    img = torch.zeros(1, Hp, Wp, 1)
    cnt = 0
    for hs in (slice(0, -Mh), slice(-Mh, -sh), slice(-sh, None)) if sh else (slice(None),):
        for ws in (slice(0, -Mw), slice(-Mw, -sw), slice(-sw, None)) if sw else (slice(None),):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, (Mh, Mw)).squeeze(-1)  # (nW, Mh*Mw)
    return win[:, None, :] != win[:, :, None]  # (nW, L, L) True where attention is blocked


def shifted_window_mask(padded_hw: tuple[int, int], win: tuple[int, int], sft: tuple[int, int], device=None):
    """Swin's mask for shifted windows: ``(nW, L, L) bool``, True between tokens that the cyclic shift
    brought together from different regions (they must not attend). None when not shifted."""
    if not any(sft):
        return None
    return _shifted_window_mask_on(*padded_hw, *win, *sft, torch.device(device or "cpu"))


@_cached(64)
def _shifted_window_mask_on(
    Hp: int, Wp: int, Mh: int, Mw: int, sh: int, sw: int, device: torch.device
) -> Tensor:
    return _shifted_window_mask_cpu(Hp, Wp, Mh, Mw, sh, sw).to(device)


@_cached(256)
def _token_places_cpu(H: int, W: int, window: int, shift: int, padded: bool) -> Tensor:
    (Mh, Mw), (sh, sw) = effective_window((H, W), window, shift)
    Hp, Wp = padded_size((H, W), window)
    if padded:
        H, W = Hp, Wp

    def region(n: int, size: int, m: int, s: int) -> Tensor:
        # Swin's mask labels the rolled padded map by the slices (0:-m), (-m:-s), (-s:) per dimension;
        # a token at raster place i sits at (i - s) mod size of the rolled map
        if not s:
            return torch.zeros(n, dtype=torch.int32)
        rolled = (torch.arange(n) - s) % size
        return (rolled >= size - m).to(torch.int32) + (rolled >= size - s).to(torch.int32)

    rows = torch.arange(H, dtype=torch.int32).repeat_interleave(W)
    cols = torch.arange(W, dtype=torch.int32).repeat(H)
    reg = region(H, Hp, Mh, sh).repeat_interleave(W) * 3 + region(W, Wp, Mw, sw).repeat(H)
    return torch.stack([rows, cols, reg], dim=1).contiguous()  # (N, 3)


@_cached(256)
def _token_places_on(H: int, W: int, window: int, shift: int, padded: bool, device: torch.device) -> Tensor:
    return _token_places_cpu(H, W, window, shift, padded).to(device)


def token_places(
    hw: tuple[int, int], window: int, shift: int = 0, device=None, padded: bool = False
) -> Tensor:
    """``(N, 3) int32`` per raster token: its row, its column, and its region of Swin's shift mask
    (``3 * row_region + col_region``, each 0..2; 0 everywhere when the block is not shifted). Two
    tokens that Swin's shifted windows would put in one window attend to each other exactly when
    their regions are equal (``shifted_window_mask``'s rule, per token instead of per window); the
    regions are those of the padded map, so they hold for maps that are not multiples of the window.
    ``padded``: the places of the padded map's ``Hp * Wp`` raster places instead (``(Hp*Wp, 3)``).
    Cached per geometry and device (do not modify the result in place)."""
    return _token_places_on(
        int(hw[0]), int(hw[1]), int(window), int(shift), bool(padded), torch.device(device or "cpu")
    )


@_cached(64)
def _padding_map_cpu(H: int, W: int, window: int) -> Tensor:
    Hp, Wp = padded_size((H, W), window)
    pad = torch.ones(Hp, Wp, dtype=torch.bool)
    pad[:H, :W] = False
    return pad


@_cached(64)
def _padding_map_on(H: int, W: int, window: int, device: torch.device) -> Tensor:
    return _padding_map_cpu(H, W, window).to(device)


def padding_map(hw: tuple[int, int], window: int, device=None) -> Tensor:
    """``(Hp, Wp) bool``: True at the places Swin's padding adds to the map ``hw`` (bottom rows, right
    columns). Cached per geometry and device (do not modify the result in place)."""
    return _padding_map_on(int(hw[0]), int(hw[1]), int(window), torch.device(device or "cpu"))


def window_groups(labels: Tensor, win: tuple[int, int], sft: tuple[int, int]) -> Tensor:
    """Per-place labels of padded maps ``(B, Hp, Wp)`` -> ``(B * nW, Mh * Mw)``: each window's labels
    after Swin's cyclic shift, in the order of ``window_partition``."""
    if any(sft):
        labels = torch.roll(labels, shifts=(-sft[0], -sft[1]), dims=(1, 2))
    return window_partition(labels[..., None], win).squeeze(-1)


@_cached(64)
def _padding_window_mask_cpu(H: int, W: int, window: int, shift: int) -> Tensor:
    win, sft = effective_window((H, W), window, shift)
    pad = window_groups(_padding_map_cpu(H, W, window)[None], win, sft)  # (nW, L)
    blocked = pad[:, :, None] != pad[:, None, :]  # (nW, L, L)
    Hp, Wp = padded_size((H, W), window)
    shifted = shifted_window_mask((Hp, Wp), win, sft)
    return blocked if shifted is None else blocked | shifted


@_cached(64)
def _padding_window_mask_on(H: int, W: int, window: int, shift: int, device: torch.device) -> Tensor:
    return _padding_window_mask_cpu(H, W, window, shift).to(device)


def padding_window_mask(hw: tuple[int, int], window: int, shift: int = 0, device=None) -> Tensor:
    """``(nW, L, L) bool``, True where a Swin block with ``pad_keys: mask`` blocks attention on the map
    ``hw``: Swin's shift mask, and every pair of a padding place and a real token (padding attends only
    to padding of its own region, so no row is empty). Cached (do not modify the result in place)."""
    return _padding_window_mask_on(
        int(hw[0]), int(hw[1]), int(window), int(shift), torch.device(device or "cpu")
    )
