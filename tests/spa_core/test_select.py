"""spa_core/select.py: per-image variable counts, 0 and N, the straight-through gate."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_core.config import ConfigError, SPAConfig
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


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_scores", "bf16_autocast"])
@pytest.mark.parametrize("policy", ["gate", "gate_random"])
def test_gate_decision_is_float32_for_bfloat16_scores(policy, autocast):
    """Noise, soft sample, decision and straight-through weight in float32 for bfloat16 scores (a model
    in bf16, or under autocast): the decision equals the float32 one on the same scores and draws,
    and the gradient still reaches the bf16 scores. In bf16 the draws would be rounded to 8 bits."""
    s = torch.randn(4, 784, generator=torch.Generator().manual_seed(5)).bfloat16().requires_grad_(True)
    cfg = SPAConfig(selection=policy, threshold=0.5)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp:
        sel = select_tokens(s, cfg, training=True, generator=torch.Generator().manual_seed(6))
    ref = select_tokens(s.detach().float(), cfg, training=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(sel.mask, ref.mask)
    assert sel.weight.dtype == torch.float32 and torch.equal(sel.weight.detach(), ref.weight)
    if policy == "gate":
        sel.weight.sum().backward()
        assert s.grad.dtype == torch.bfloat16 and s.grad.abs().sum() > 0


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
        sel = select_tokens(s, SPAConfig(selection=name), training=False, tokens=torch.randn(*s.shape, 4))
        assert sel.mask.shape == s.shape and sel.mask.dtype == torch.bool
        assert sel.counts.dtype == torch.int64 and torch.equal(sel.counts, sel.mask.sum(1))
        assert sel.weight.shape == s.shape


def test_bad_settings_are_loud():
    with pytest.raises(ConfigError, match="selection: unknown selection_policy 'nope'"):
        select_tokens(_scores(), SPAConfig(selection="nope"), training=False)
    with pytest.raises(ConfigError, match="ratio: expected a value >= 0.0 and <= 1.0, got 1.5"):
        select_tokens(_scores(), SPAConfig(selection="topk", ratio=1.5), training=False)
    with pytest.raises(ConfigError, match="threshold"):
        select_tokens(_scores(), SPAConfig(selection="gate", threshold=1.0), training=True)


# ---------------------------------------------------------------------------------------------------
# the keep-all control and the compute-matched controls


def _cfg(selection, **kw):
    return SPAConfig(selection=selection, **kw)


def test_all_keeps_every_token():
    s = torch.randn(3, 17)
    sel = select_tokens(s, _cfg("all"), training=True)
    assert sel.mask.all() and sel.counts.tolist() == [17] * 3 and torch.equal(sel.weight, torch.ones(3, 17))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("policy", ["gate_random", "gate_norm"])
def test_controls_keep_the_gates_count_per_image(policy, training):
    """A compute-matched control keeps exactly as many tokens per image as the gate's decision with
    the same random stream, at other places."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 50, generator=g) * 2
    s[0] = -20.0  # an image the gate drops entirely
    s[1] = 20.0  # and one it keeps entirely
    tokens = torch.randn(6, 50, 8, generator=g)
    gate = select_tokens(s, _cfg("gate"), training=training, generator=torch.Generator().manual_seed(7))
    ctrl = select_tokens(
        s, _cfg(policy), training=training, generator=torch.Generator().manual_seed(7), tokens=tokens
    )
    assert torch.equal(ctrl.counts, gate.counts) and torch.equal(ctrl.mask.sum(1), ctrl.counts)
    assert ctrl.counts[0] == 0 and ctrl.counts[1] == 50
    assert not torch.equal(ctrl.mask[2:], gate.mask[2:])  # the places differ from the gate's


def test_gate_norm_keeps_the_tokens_farthest_from_their_image_mean():
    tokens = torch.zeros(1, 10, 4)
    far = [2, 7, 9]
    tokens[0, 2, 0], tokens[0, 7, 0], tokens[0, 9, 1] = 10.0, -20.0, 30.0  # the rest sit near the mean
    s = torch.tensor([[5.0] * 3 + [-5.0] * 7])  # the gate keeps 3 (its own three)
    sel = select_tokens(s, _cfg("gate_norm"), training=False, tokens=tokens)
    assert sel.mask[0].nonzero().squeeze(1).tolist() == far


def test_gate_norm_without_tokens_says_what_it_needs():
    with pytest.raises(ValueError, match="tokens"):
        select_tokens(torch.randn(2, 5), _cfg("gate_norm"), training=False)


def test_gate_random_places_are_uniform():
    """Over many draws every place is kept about equally often (counts fixed by the gate)."""
    s = torch.zeros(1, 8)
    s[0, :4] = 10.0  # the gate keeps the first four
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(8)
    for _ in range(800):
        hits += select_tokens(s, _cfg("gate_random"), training=False, generator=g).mask[0].float()
    assert hits.sum() == 3200 and (hits - 400).abs().max() < 80  # binomial sd ~ 14


@settings(max_examples=60, deadline=None)
@given(
    selection=st.sampled_from(["gate", "topk", "random", "all", "none", "gate_random", "gate_norm"]),
    ratio=st.floats(0.0, 1.0),
    training=st.booleans(),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 40)),
    seed=st.integers(0, 2**16),
)
def test_with_valid_every_builtin_policy_decides_over_the_real_tokens(
    selection, ratio, training, shape, seed
):
    """Any real extent (an image may have no real token, or be all real): no padding is kept; the
    ratio policies keep ``round(ratio * n_real)`` of each image; the compute-matched controls keep
    the gate's count of real tokens; ``valid`` all true is the call without it."""
    g = torch.Generator().manual_seed(seed)
    B, N = shape
    scores = torch.randn(B, N, generator=g) * 3
    tokens = torch.randn(B, N, 4, generator=g)
    valid = torch.rand(B, N, generator=g) < torch.rand(B, 1, generator=g)
    cfg = SPAConfig(selection=selection, ratio=ratio, threshold=0.5)

    def run(v, name=selection):
        c = SPAConfig(selection=name, ratio=ratio, threshold=0.5)
        return select_tokens(scores, c, training=training, generator=torch.Generator().manual_seed(1),
                             tokens=tokens, valid=v)  # fmt: skip

    sel = run(valid)
    assert not (sel.mask & ~valid).any()
    assert torch.equal(sel.counts, sel.mask.sum(1))
    n_real = valid.sum(1).tolist()
    if selection in ("topk", "random"):
        assert sel.counts.tolist() == [min(n, round(ratio * n)) for n in n_real]
    if selection == "all":
        assert torch.equal(sel.mask, valid)
    if selection in ("gate_random", "gate_norm") and not training:  # no noise: the gate's own decision
        assert torch.equal(sel.counts, run(valid, "gate").counts)
    everything = torch.ones(B, N, dtype=torch.bool)
    plain = select_tokens(
        scores, cfg, training=training, generator=torch.Generator().manual_seed(1), tokens=tokens
    )
    assert torch.equal(run(everything).counts, plain.counts)


def test_a_plugin_policy_without_valid_is_called_as_before():
    """The ``valid`` parameter is optional in the contract: a policy without it is called without it."""
    seen = []

    def mine(scores, *, cfg, training, generator=None, tokens=None):
        seen.append(1)
        return select_tokens(scores, SPAConfig(selection="all"), training=training)

    SELECTION_POLICIES.register("no_valid_param", mine)
    try:
        s = torch.randn(2, 6)
        sel = select_tokens(
            s, SPAConfig(selection="no_valid_param"), training=False, valid=torch.ones(2, 6, dtype=torch.bool)
        )
        assert seen == [1] and sel.mask.all()
    finally:
        SELECTION_POLICIES.unregister("no_valid_param")


def test_none_keeps_no_token():
    sel = select_tokens(torch.randn(3, 17), _cfg("none"), training=True)
    assert not sel.mask.any() and sel.counts.tolist() == [0] * 3 and not sel.gate_scaled
