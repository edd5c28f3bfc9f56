"""spa_core/strategies.py: one registered object per pack strategy (pack, attend, FLOP formula); a
strategy without its formula is refused; the formulas against hand counts (their agreement with
fvcore: tests/harness/task/test_measure.py); a plugin strategy runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spa_core.attention import attend_varlen
from spa_core.block import SPABlock
from spa_core.config import SPAConfig
from spa_core.pack import pack_varlen
from spa_core.registry import PACK_STRATEGIES
from spa_core.strategies import PackStrategy, container_lengths


def test_every_builtin_is_one_object_with_its_formula():
    for name in ("containers", "varlen", "pad", "mask"):
        s = PACK_STRATEGIES.get(name)
        assert isinstance(s, PackStrategy) and PACK_STRATEGIES.origin(name) == "builtin"


@pytest.mark.parametrize(
    "bad",
    [lambda x, mask, *, cfg, order=None: None, object(), PackStrategy(pack_varlen, attend_varlen, None)],
)
def test_a_strategy_without_a_flop_formula_is_refused_at_registration(bad):
    with pytest.raises(TypeError, match="attention_macs, its FLOP formula"):
        PACK_STRATEGIES.register("no_formula", bad)
    assert "no_formula" not in PACK_STRATEGIES


def test_formulas_against_hand_counts():
    counts, n, c, L = [5, 0, 9], 16, 8, 4
    gate_proj = 4 * 14 * 64  # qkv and projection over T = 14 (the gate's scorer is the harness's)
    f = {name: PACK_STRATEGIES.get(name).attention_macs(counts, n, c, L) for name in PACK_STRATEGIES}
    # containers of 4: image 0 -> 4 | 1, image 2 -> 3 | 4 | 2 (cut at image and container boundaries)
    assert f["containers"] == gate_proj + 2 * 8 * (16 + 1 + 9 + 16 + 4)
    assert f["varlen"] == gate_proj + 2 * 8 * (25 + 81)
    assert f["pad"] == gate_proj + 2 * 8 * 3 * 81  # every image padded to 9
    assert f["mask"] == gate_proj + 2 * 8 * 3 * 256  # every image dense over N = 16
    assert PACK_STRATEGIES.get("mask").attention_macs([0, 0], n, c, L) == 0  # attention skipped


@pytest.mark.parametrize("counts", [[5, 0, 9], [0], [16, 16], [1, 2, 3, 4, 5, 6], [7]])
@pytest.mark.parametrize("L", [1, 3, 4, 16, 50])
def test_container_lengths_are_the_kernels_cuts(counts, L):
    from kernels import container_seqlens

    cu = container_seqlens(torch.tensor(counts), L)[0].long()
    assert container_lengths(counts, L) == (cu[1:] - cu[:-1]).tolist()


def test_a_plugin_strategy_packs_attends_and_counts_through_its_own_object():
    """A plugin's strategy (here varlen's layout with a formula of its own) drives the block."""
    calls = []

    def attend(*args, **kw):
        calls.append("attend")
        return attend_varlen(*args, **kw)

    def pack(x, mask, *, cfg, order=None):
        calls.append("pack")
        return dataclasses.replace(pack_varlen(x, mask, cfg=cfg, order=order), strategy="plugin_pack")

    PACK_STRATEGIES.register("plugin_pack", PackStrategy(pack, attend, lambda counts, n, c, L: 42.0))
    assert calls == ["pack", "attend"]  # the registration's probe (spa_core.contracts)
    calls.clear()
    try:
        torch.manual_seed(0)
        blk = SPABlock(8, 2, 2, SPAConfig(selection="topk", ratio=0.5, pack="plugin_pack")).eval()
        torch.manual_seed(0)
        ref = SPABlock(8, 2, 2, SPAConfig(selection="topk", ratio=0.5, pack="varlen")).eval()
        x = torch.randn(2, 4, 4, 8)
        with torch.no_grad():
            torch.testing.assert_close(blk(x)[0], ref(x)[0])
        assert calls == ["pack", "attend"]
        assert PACK_STRATEGIES.get("plugin_pack").attention_macs([1], 4, 8, 4) == 42.0
    finally:
        PACK_STRATEGIES.unregister("plugin_pack")
