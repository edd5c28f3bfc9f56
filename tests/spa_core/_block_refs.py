"""Shared references of the block tests: a deterministic SPA block, Swin's attention by its
definition (places, regions, bias), the SPA block by its definition given the runs of tokens that
attend together (per image, per container), and outputs with gradients of a weighted loss."""

from __future__ import annotations

import torch

from spa_core.block import SPABlock
from spa_core.config import SPAConfig
from spa_core.windows import effective_window, window_order

PER_IMAGE = ["varlen", "pad", "mask"]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}


def _block(
    strategy,
    *,
    dim=24,
    heads=2,
    window=2,
    shift=0,
    selection="topk",
    ratio=1.0,
    mlp_on="all",
    dtype=torch.float32,
    seed=0,
    position_bias="swin",
    gate_scaling=True,
):
    torch.manual_seed(seed)
    cfg = SPAConfig(
        selection=selection,
        ratio=ratio,
        pack=strategy,
        mlp_on=mlp_on,
        position_bias=position_bias,
        gate_scaling=gate_scaling,
    )
    blk = SPABlock(dim, heads, window, cfg, shift=shift).to(dtype).eval()
    with torch.no_grad():  # non-trivial gate, norms and bias, so a wrong scaling or offset would show
        blk.gate.score.weight.normal_(0, 0.5)
        blk.gate.score.bias.fill_(0.3)
        blk.norm1.weight.uniform_(0.5, 1.5)
        if blk.attn.relative_position_bias_table is not None:
            blk.attn.relative_position_bias_table.normal_(0, 1.0)
    return blk


def _places(hw, window, shift):
    """(N, 3) row, column, shift region of every raster token, by Swin's definition of the shifted
    map (independent of ``spa_core.windows.token_places``)."""
    H, W = hw
    (Mh, Mw), (sh, sw) = effective_window(hw, window, shift)
    Hp, Wp = -(-H // Mh) * Mh, -(-W // Mw) * Mw
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ri, rj = ((i - sh) % Hp).flatten(), ((j - sw) % Wp).flatten()

    def region(r, size, m, s):
        return torch.zeros_like(r) if s == 0 else (r >= size - m).long() + (r >= size - s).long()

    return torch.stack([i.flatten(), j.flatten(), region(ri, Hp, Mh, sh) * 3 + region(rj, Wp, Mw, sw)], 1)


def _attend(attn, t, places):
    """Reference attention of one sequence with the block's weights: t (n, C), places (n, 3) ->
    (n, C); explicit softmax, Swin's bias from the places (offsets clamped to the table), other shift
    regions masked."""
    n, C = t.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(t).view(n, 3, H, D).permute(1, 2, 0, 3)  # (H, n, D) each
    logits = q @ k.transpose(-1, -2) * attn.scale
    table = attn.relative_position_bias_table
    if table is not None:
        M = attn.window_size
        dy = (places[:, None, 0] - places[None, :, 0]).clamp(-(M - 1), M - 1)
        dx = (places[:, None, 1] - places[None, :, 1]).clamp(-(M - 1), M - 1)
        logits = logits + table[(dy + M - 1) * (2 * M - 1) + dx + M - 1].permute(2, 0, 1)
        logits = logits.masked_fill(places[:, None, 2] != places[None, :, 2], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return attn.proj((p @ v).transpose(0, 1).reshape(n, C))


def _reference(blk, x, mask, runs):
    """The SPA block by definition: ``runs(b, kept)`` lists the groups of image b's kept token ids
    that attend among themselves. x (B, H, W, C), mask (B, N) -> (B, H, W, C)."""
    B, H, W, C = x.shape
    xf = x.reshape(B, H * W, C)
    r = blk.norm1(xf)
    s = blk.gate(r, None)
    r_g = torch.sigmoid(s)[..., None] * r if blk.cfg.gate_scaling else r
    places = _places((H, W), blk.window_size, blk.shift)
    out = torch.zeros_like(xf)
    for b in range(B):
        for run in runs(b, mask[b]):
            if len(run):
                out[b, run] = _attend(blk.attn, r_g[b, run], places[run])
    y = xf + out
    if blk.cfg.mlp_on == "all":
        y = y + blk.mlp(blk.norm2(y))
    else:
        y = y + mask[..., None] * blk.mlp(blk.norm2(y))
    return y.view(B, H, W, C)


def _per_image_runs(b, kept):
    return [kept.nonzero().squeeze(1)]


def _padded_window_order(hw, window, shift):
    """The padded map's places in shifted-window order, each as its real token id (None: padding)."""
    H, W = hw
    (Mh, Mw), (sh, sw) = effective_window(hw, window, shift)
    Hp, Wp = -(-H // Mh) * Mh, -(-W // Mw) * Mw
    idx = torch.arange(Hp * Wp).view(Hp, Wp).roll((-sh, -sw), (0, 1))
    order = idx.view(Hp // Mh, Mh, Wp // Mw, Mw).permute(0, 2, 1, 3).reshape(-1).tolist()
    return [(p // Wp) * W + p % Wp if p // Wp < H and p % Wp < W else None for p in order]


def _container_runs(hw, window, shift, L, mask):
    """Runs of the paper's containers: the kept tokens of all images in shifted-window order, poured
    into containers of L slots; within a container a token attends to its own image's tokens. An
    image that keeps every token pours its padded map, Swin's window padding taking slots (the
    padding attends to no real token)."""
    stream = []
    for b in range(mask.shape[0]):
        if bool(mask[b].all()):
            stream += [(b, j) for j in _padded_window_order(hw, window, shift)]
        else:
            stream += [(b, int(j)) for j in window_order(hw, window, shift) if mask[b, j]]
    runs = {}
    for c in range(0, len(stream), L):
        for b, j in stream[c : c + L]:
            if j is not None:
                runs.setdefault((c, b), []).append(j)
    return lambda b, kept: [torch.tensor(v) for (c, bb), v in runs.items() if bb == b]


def _outputs_and_grads(blk, x, *extra):
    x = x.detach().clone().requires_grad_(True)
    y = blk(x, *extra)
    y = y[0] if isinstance(y, tuple) else y
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(
        y
    )  # a loss that weighs every output differently
    params = {n: p for n, p in blk.named_parameters() if not n.startswith("gate.")}
    grads = torch.autograd.grad((y * w).sum(), [x, *params.values()])
    return y.detach(), dict(zip(["x", *params], grads))
