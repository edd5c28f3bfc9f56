"""spa_core/pack.py: pack/unpack round trips for every registered strategy, and the container layout.

(Named test_pack_unpack.py, not test_pack.py: tests/kernels/test_pack.py holds that basename and the
test folders are not packages.)"""

from __future__ import annotations

import pytest
import torch

from spa_core.config import SPAConfig
from spa_core.pack import containers_dense, containers_from_dense, pack, unpack
from spa_core.registry import PACK_STRATEGIES
from spa_core.windows import window_order

STRATEGIES = list(PACK_STRATEGIES)
COUNTS = [[0, 13, 5, 1], [13, 13], [0, 0, 0], [7]]  # ragged, all, none, one image


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("ordered", [False, True])
def test_pack_unpack_identity(strategy, counts, ordered, mask_with_counts):
    B, N, C = len(counts), 13, 6
    x = torch.randn(B, N, C, dtype=torch.float64)
    mask = mask_with_counts(counts, N)
    order = window_order((13, 1), 4, 2) if ordered else None
    p = pack(x, mask, strategy, cfg=SPAConfig(container_len=4), order=order)

    assert p.tokens.shape == (sum(counts), C)
    assert p.counts.tolist() == counts
    assert p.cu_seqlens.dtype == torch.int32 and int(p.cu_seqlens[-1]) == sum(counts)
    lengths = (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).long()
    assert p.max_seqlen == max(lengths.tolist(), default=0)
    # image-major: every token of sequence i belongs to seq_image[i]
    seq_of_token = torch.repeat_interleave(torch.arange(p.num_seqs), lengths)
    assert torch.equal(p.indices // N, p.seq_image[seq_of_token])
    assert torch.equal(p.tokens, x.reshape(B * N, C)[p.indices])

    # unpack(pack(x)) onto a different base: kept rows come back exactly, the others are untouched
    base = torch.randn(B, N, C, dtype=torch.float64)
    y = unpack(p, p.tokens, base)
    assert torch.equal(y[mask], x[mask])
    assert torch.equal(y[~mask], base[~mask])
    # add=True adds on kept rows only
    y2 = unpack(p, p.tokens, base, add=True)
    assert torch.equal(y2[mask], base[mask] + x[mask])
    assert torch.equal(y2[~mask], base[~mask])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pack_unpack_gradients(strategy, mask_with_counts):
    B, N, C = 3, 9, 4
    mask = mask_with_counts([0, 9, 4], N)
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    base = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    cfg = SPAConfig(container_len=4)

    def f(x, base):
        p = pack(x, mask, strategy, cfg=cfg)
        return unpack(p, p.tokens * 2.0, base)

    assert torch.autograd.gradcheck(f, (x, base))


def test_order_packs_in_window_order_but_indexes_raster():
    H, W, win = 4, 4, 2
    x = torch.arange(16, dtype=torch.float64).view(1, 16, 1)
    mask = torch.ones(1, 16, dtype=torch.bool)
    order = window_order((H, W), win, 0)
    assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    p = pack(x, mask, "containers", cfg=SPAConfig(container_len=4), order=order)
    assert p.tokens.squeeze(1).tolist() == order.tolist()
    assert torch.equal(p.indices, order)


def test_containers_seqlens_cut_at_images_and_containers():
    counts = [3, 0, 6, 2]
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, :c] = True
    p = pack(torch.randn(4, 6, 2), mask, "containers", cfg=SPAConfig(container_len=4))
    # stream: img0 x3 | img2 x6 | img3 x2 = 11 tokens; containers [0,4) [4,8) [8,11)
    assert p.cu_seqlens.tolist() == [0, 3, 4, 8, 9, 11]
    assert p.seq_image.tolist() == [0, 2, 2, 2, 3]
    assert p.seq_container.tolist() == [0, 0, 1, 2, 2]
    assert p.num_containers == 3 and p.max_seqlen == 4


def test_containers_dense_form_round_trip_and_mask():
    counts = [3, 0, 6, 2]
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, :c] = True
    p = pack(torch.randn(4, 6, 2), mask, "containers", cfg=SPAConfig(container_len=4))
    dense, attn_mask = containers_dense(p)
    assert dense.shape == (3, 4, 2) and attn_mask.shape == (3, 4, 4)
    assert torch.equal(dense.reshape(12, 2)[:11], p.tokens) and not dense.reshape(12, 2)[11].any()
    assert torch.equal(containers_from_dense(p, dense), p.tokens)
    img = torch.tensor([[0, 0, 0, 2], [2, 2, 2, 2], [2, 3, 3, -1]])
    expect = (img[:, :, None] == img[:, None, :]) & (img[:, None, :] >= 0)
    assert torch.equal(attn_mask, expect)


def test_unknown_strategy_is_loud():
    with pytest.raises(KeyError, match="pack_strategy.*containers"):
        pack(torch.randn(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), "nope")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_order_packs_each_images_tokens_in_that_order(strategy, mask_with_counts):
    """With ``order``, each image's kept tokens come in that order, indices still point into the raster grid."""
    B, N, C = 4, 13, 6
    x = torch.randn(B, N, C, dtype=torch.float64)
    mask = mask_with_counts([0, 13, 5, 1], N)
    order = window_order((13, 1), 4, 2)
    cfg = SPAConfig(container_len=4)
    p = pack(x, mask, strategy, cfg=cfg, order=order)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(N)
    for b in range(B):
        rows = p.indices[(p.indices // N) == b] % N
        assert sorted(rows.tolist()) == mask[b].nonzero().squeeze(1).tolist()
        assert torch.all(rank[rows][1:] > rank[rows][:-1])  # in order's order
    assert torch.equal(p.tokens, x.reshape(B * N, C)[p.indices])
    with pytest.raises(ValueError, match="permutation of the 13 token positions"):
        pack(x, mask, strategy, cfg=cfg, order=order[:5])
