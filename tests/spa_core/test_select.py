"""spa_core/select.py: per-image variable counts, 0 and N, the straight-through gate."""

from __future__ import annotations

import pytest
import torch

from spa_core.config import SPAConfig
from spa_core.registry import SELECTION_POLICIES
from spa_core.select import select_tokens


def _scores():
    s = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    s[0] = -10.0  # keeps nothing
    s[1] = 10.0  # keeps everything
    return s


def test_gate_inference_is_the_plain_threshold():
    s = _scores()
    sel = select_tokens(s, SPAConfig(selection="gate", threshold=0.5), training=False)
    assert torch.equal(sel.mask, torch.sigmoid(s) > 0.5)
    assert sel.counts.tolist() == [0, 10, int((s[2] > 0).sum())]
    assert torch.equal(sel.weight, torch.ones_like(s))


def test_gate_training_is_hard_straight_through():
    s = _scores().requires_grad_(True)
    cfg = SPAConfig(selection="gate", threshold=0.5, gumbel_tau=1.0)
    sel = select_tokens(s, cfg, training=True, generator=torch.Generator().manual_seed(1))
    assert sel.counts[0] == 0 and sel.counts[1] == 10  # +-10 logits survive logistic noise here
    assert torch.equal(sel.weight.detach(), sel.mask.to(s.dtype))  # hard values
    (sel.weight * torch.arange(10.0)).sum().backward()
    assert s.grad[2].abs().sum() > 0  # the soft sample's gradient reaches the logits


def test_gate_noise_varies_and_is_reproducible():
    s = torch.zeros(4, 500)
    cfg = SPAConfig(selection="gate")
    a = select_tokens(s, cfg, training=True, generator=torch.Generator().manual_seed(3))
    b = select_tokens(s, cfg, training=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.mask, b.mask)
    assert 0.4 < a.mask.float().mean() < 0.6  # logistic noise around a 0.5 threshold


@pytest.mark.parametrize("ratio,k", [(0.0, 0), (0.25, 2), (0.5, 5), (1.0, 10)])
def test_topk_keeps_the_best(ratio, k):
    s = _scores()
    sel = select_tokens(s, SPAConfig(selection="topk", ratio=ratio), training=True)
    assert sel.counts.tolist() == [k] * 3
    for b in range(3):
        kept, dropped = s[b][sel.mask[b]], s[b][~sel.mask[b]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def test_random_ignores_scores_and_keeps_the_ratio():
    s = _scores()
    cfg = SPAConfig(selection="random", ratio=0.3)
    a = select_tokens(s, cfg, training=False, generator=torch.Generator().manual_seed(0))
    b = select_tokens(-s, cfg, training=False, generator=torch.Generator().manual_seed(0))
    assert a.counts.tolist() == [3, 3, 3] and torch.equal(a.mask, b.mask)


def test_every_policy_returns_the_contract():
    s = _scores()
    for name in SELECTION_POLICIES:
        sel = select_tokens(s, SPAConfig(selection=name), training=False)
        assert sel.mask.shape == s.shape and sel.mask.dtype == torch.bool
        assert sel.counts.dtype == torch.int64 and torch.equal(sel.counts, sel.mask.sum(1))
        assert sel.weight.shape == s.shape


def test_bad_settings_are_loud():
    with pytest.raises(KeyError, match="selection_policy"):
        select_tokens(_scores(), SPAConfig(selection="nope"), training=False)
    with pytest.raises(ValueError, match="ratio"):
        select_tokens(_scores(), SPAConfig(selection="topk", ratio=1.5), training=False)
