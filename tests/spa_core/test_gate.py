"""spa_core/gate.py: the linear scorer and its fusion with the previous block's scores."""

from __future__ import annotations

import torch

from spa_core.config import SPAConfig
from spa_core.gate import LinearGate, resize_scores
from spa_core.registry import GATES


def test_linear_gate_fuses_by_elementwise_max():
    assert GATES.get("linear") is LinearGate
    g = LinearGate(8, SPAConfig())
    x = torch.randn(2, 5, 8)
    own = g(x)
    assert own.shape == (2, 5)
    torch.testing.assert_close(own, x @ g.score.weight[0] + g.score.bias)
    prev = torch.zeros(2, 5)
    torch.testing.assert_close(g(x, prev), torch.maximum(own, prev))


def test_resize_scores_down_by_max_and_up_by_nearest():
    s = torch.arange(16.0).view(1, 4, 4)
    assert resize_scores(s, (4, 4)).shape == (1, 16)
    assert resize_scores(s, (2, 2)).view(2, 2).tolist() == [[5.0, 7.0], [13.0, 15.0]]
    up = resize_scores(torch.tensor([[[1.0, 2.0]]]), (2, 4)).view(2, 4)
    assert up.tolist() == [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    # an odd map merged after padding: cell (i, j) holds rows 2i..2i+1 and columns 2j..2j+1 only
    odd = resize_scores(24.0 - torch.arange(25.0).view(1, 5, 5), (3, 3)).view(3, 3)
    assert odd.tolist() == [[24.0, 22.0, 20.0], [14.0, 12.0, 10.0], [4.0, 2.0, 0.0]]
