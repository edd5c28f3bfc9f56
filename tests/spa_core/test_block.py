"""spa_core/block.py: the SPA block against its definitions (dense attention, per-image and
per-container loops), strategies against each other, gradients, padding, controls and the gate's
scaling. The Swin block is in test_swin_block.py, keep-all against it in test_block_keep_all.py."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spa_core.block import SPABlock, SwinBlock
from spa_core.config import ConfigError, SPAConfig
from tests.spa_core._block_refs import (
    PER_IMAGE,
    TOL,
    _block,
    _container_runs,
    _outputs_and_grads,
    _per_image_runs,
    _reference,
)


@pytest.mark.parametrize("strategy", PER_IMAGE)
@pytest.mark.parametrize("hw", [(4, 4), (3, 5)])
def test_all_selected_equals_dense_global_attention(strategy, hw):
    blk = _block(strategy)
    x = torch.randn(2, *hw, 24)
    with torch.no_grad():
        y, info = blk(x)
        ref = _reference(blk, x, torch.ones(2, hw[0] * hw[1], dtype=torch.bool), _per_image_runs)
    assert info.counts.tolist() == [hw[0] * hw[1]] * 2 and float(info.kept_fraction) == 1.0
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


@pytest.mark.parametrize("hw,window,shift", [((5, 5), 2, 0), ((5, 5), 2, 1), ((3, 3), 4, 2), ((7, 6), 3, 1)])
@pytest.mark.parametrize("counts", ["all", "ragged"])
def test_containers_equal_per_container_loop(fixed_policy, mask_with_counts, hw, window, shift, counts):
    N = hw[0] * hw[1]
    blk = _block("containers", window=window, shift=shift, selection=fixed_policy.name)
    fixed_policy.mask = mask_with_counts([N, N, N] if counts == "all" else [0, N, N // 3], N)
    x = torch.randn(3, *hw, 24)
    with torch.no_grad():
        y, _ = blk(x)
        runs = _container_runs(hw, window, blk.shift, blk.container_len(hw), fixed_policy.mask)
        ref = _reference(blk, x, fixed_policy.mask, runs)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


@pytest.mark.parametrize("mlp_on", ["all", "selected"])
def test_any_selection_strategies_agree_with_per_image_loop(fixed_policy, mask_with_counts, mlp_on):
    hw, N = (5, 4), 20
    fixed_policy.mask = mask_with_counts([0, N, 1, 7], N, seed=3)
    x = torch.randn(4, *hw, 24)
    outs = {}
    for strategy in PER_IMAGE:
        blk = _block(strategy, selection=fixed_policy.name, mlp_on=mlp_on)  # same seed: same weights
        with torch.no_grad():
            outs[strategy], info = blk(x)
            ref = _reference(blk, x, fixed_policy.mask, _per_image_runs)
        assert info.counts.tolist() == [0, N, 1, 7]
        torch.testing.assert_close(outs[strategy], ref, **TOL[torch.float32])
    torch.testing.assert_close(outs["varlen"], outs["pad"], **TOL[torch.float32])
    torch.testing.assert_close(outs["varlen"], outs["mask"], **TOL[torch.float32])
    # an image that keeps nothing only goes through the MLP (or, with mlp_on="selected", is unchanged)
    if mlp_on == "selected":
        assert torch.equal(outs["varlen"][0], x[0])


def test_containers_dense_form_equals_varlen_form(fixed_policy, mask_with_counts):
    hw, N = (6, 5), 30
    fixed_policy.mask = mask_with_counts([30, 0, 11, 29], N, seed=1)
    blk = _block("containers", window=3, shift=1, selection=fixed_policy.name)
    x = torch.randn(4, *hw, 24)
    with torch.no_grad():
        y_varlen, _ = blk(x)
        blk.attn.container_form = "dense"
        y_dense, _ = blk(x)
    torch.testing.assert_close(y_dense, y_varlen, **TOL[torch.float32])


@pytest.mark.parametrize("strategy", ["containers", *PER_IMAGE])
def test_gradcheck_block(fixed_policy, mask_with_counts, strategy):
    hw, N = (3, 3), 9
    fixed_policy.mask = mask_with_counts([0, N, 4], N, seed=2)
    blk = _block(
        strategy, dim=8, heads=2, window=2, shift=1, selection=fixed_policy.name, dtype=torch.float64
    )
    x = torch.randn(3, *hw, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: blk(t)[0], (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    # and the parameters (the gate among them) receive gradients
    blk(x)[0].pow(2).sum().backward()
    assert blk.gate.score.weight.grad is not None and blk.gate.score.weight.grad.abs().sum() > 0
    assert blk.attn.qkv.weight.grad.abs().sum() > 0


def test_gradcheck_containers_every_jacobian_entry(fixed_policy):
    # full (not fast-mode) gradcheck on the smallest map whose containers cut at image and container
    # boundaries: counts 0, 6, 3 with L = 4 -> sequences [4 | 2, 2 | 1] tokens
    fixed_policy.mask = torch.tensor([[False] * 6, [True] * 6, [True, False, True, True, False, False]])
    blk = _block(
        "containers", dim=4, heads=2, window=2, shift=1, selection=fixed_policy.name, dtype=torch.float64
    )
    x = torch.randn(3, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: blk(t)[0], (x,), eps=1e-6, atol=1e-5)


@settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # the policy's mask is set per example
)
@given(
    counts=st.lists(st.sampled_from([0, 0, 1, 5, 16]), min_size=1, max_size=3),
    strategy=st.sampled_from(["containers", *PER_IMAGE]),
    position_bias=st.sampled_from(["swin", "none"]),
    mlp_on=st.sampled_from(["all", "selected"]),
    gate_scaling=st.booleans(),
    container_form=st.sampled_from(["varlen", "dense"]),
    hw=st.sampled_from([(4, 4), (3, 5)]),  # 3x5: padded to whole windows of 2
)
def test_every_parameter_gets_a_gradient_whatever_is_kept(
    fixed_policy, mask_with_counts, counts, strategy, position_bias, mlp_on, gate_scaling, container_form, hw
):
    """Which parameters get a gradient does not depend on what the images keep: under DeepSpeed ZeRO a
    rank whose images keep no token in a block must fill the same gradient buckets as the others.
    With every image empty, the parameters that only kept tokens reach get zeros."""
    blk = _block(
        strategy,
        dim=8,
        heads=2,
        window=2,
        shift=1,
        selection=fixed_policy.name,
        mlp_on=mlp_on,
        position_bias=position_bias,
    )
    blk.cfg.gate_scaling = gate_scaling
    blk.attn.container_form = container_form
    n = hw[0] * hw[1]
    counts = [min(k, n) for k in counts]
    x = torch.randn(len(counts), *hw, 8)

    def grads(mask):
        fixed_policy.mask = mask
        blk.zero_grad(set_to_none=True)
        blk(x)[0].pow(2).sum().backward()
        return {n: p.grad for n, p in blk.named_parameters() if p.grad is not None}

    got = grads(mask_with_counts(counts, n, seed=len(counts)))
    full = grads(torch.ones(len(counts), n, dtype=torch.bool))
    assert set(got) == set(full)
    if gate_scaling:  # the gate reaches the loss through the scaled tokens: every parameter is used
        assert set(got) == {n for n, _ in blk.named_parameters()}
    if not any(counts):
        for name, g in got.items():
            reaches_all_tokens = mlp_on == "all" and name.startswith(("mlp.", "norm2."))
            assert reaches_all_tokens or not g.any(), name


def test_gate_training_straight_through_reaches_gate():
    blk = _block("varlen", selection="gate").train()
    blk.generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 24)
    y, info = blk(x)
    assert 0 < int(info.counts.sum()) < 32
    y.sum().backward()
    assert blk.gate.score.weight.grad.abs().sum() > 0


def test_selection_draws_on_a_generator_of_the_inputs_device(monkeypatch):
    """A generator on another device (the harness's CPU generators for a GPU model) is replaced by one
    on the inputs' device, seeded once from it (one draw) and kept until the block's generator is
    replaced: no copy of random draws from the host in every block and step. The other device is
    played by the CPU here (``_same_device`` patched to say no)."""
    import spa_core.block as block_module

    blk = _block("varlen", selection="gate")
    source = torch.Generator().manual_seed(11)
    blk.generator = source
    cpu = torch.device("cpu")
    assert blk._generator_on(cpu) is source  # same device: the generator itself, no derivation
    monkeypatch.setattr(block_module, "_same_device", lambda a, b: False)
    derived = blk._generator_on(cpu)
    assert derived is not source and blk._generator_on(cpu) is derived  # made once
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(11)))
    assert torch.equal(
        torch.rand(5, generator=derived), torch.rand(5, generator=torch.Generator().manual_seed(seed))
    )
    blk.generator = torch.Generator().manual_seed(11)  # replaced (same seed): derived anew, same stream
    again = blk._generator_on(cpu)
    assert again is not derived
    assert torch.equal(
        torch.rand(5, generator=again), torch.rand(5, generator=torch.Generator().manual_seed(seed))
    )
    blk.generator = None
    assert blk._generator_on(cpu) is None


def test_attn_impl_switch_gives_same_result(monkeypatch, fixed_policy, mask_with_counts):
    """The environment switch and the module attribute (which wins) pick the attention kernel that
    runs, and every kernel gives the same block."""
    va = sys.modules["kernels.varlen_attention"]  # the module (the package exports a function of its name)
    ran = []
    for name in ("_varlen_attention_cpp", "_varlen_attention_torch", "varlen_attention_ref"):
        real = getattr(va, name)
        monkeypatch.setattr(
            va, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k)
        )
    fixed_policy.mask = mask_with_counts([3, 16], 16)
    blk = _block("varlen", window=4, selection=fixed_policy.name)
    x = torch.randn(2, 4, 4, 24)
    outs = []
    expect = {
        "torch": "_varlen_attention_torch",
        "ref": "varlen_attention_ref",
        "cpp": "_varlen_attention_cpp",
    }
    for impl in ("torch", "ref", "cpp"):
        monkeypatch.setenv("SPA_ATTN_IMPL", impl)
        ran.clear()
        with torch.no_grad():
            outs.append(blk(x)[0])
        assert ran == [expect[impl]], (impl, ran)
    monkeypatch.setenv("SPA_ATTN_IMPL", "torch")
    blk.attn.attn_impl = "ref"  # the module attribute wins over the environment
    ran.clear()
    with torch.no_grad():
        outs.append(blk(x)[0])
    assert ran == ["varlen_attention_ref"]
    for other in outs[1:]:
        torch.testing.assert_close(outs[0], other, **TOL[torch.float32])
    monkeypatch.setenv("SPA_ATTN_IMPL", "nonsense")
    blk.attn.attn_impl = "auto"
    with pytest.raises(ValueError, match="nonsense"):
        blk(x)


def test_prev_scores_fused_by_max():
    blk = _block("varlen", selection="topk", ratio=0.5)
    x = torch.randn(1, 4, 4, 24)
    with torch.no_grad():
        _, own = blk(x)
        prev = torch.full((1, 2, 2), 50.0)
        prev[0, 0, 0] = -50.0  # the top-left quarter keeps its own scores
        _, fused = blk(x, prev)
    s = fused.logits.view(4, 4)
    assert torch.equal(s[:2, :2], own.logits.view(4, 4)[:2, :2])
    assert (s.flatten()[torch.tensor([2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])] == 50.0).all()


@pytest.mark.parametrize(
    "field,value",
    [
        ("pack", "nope"),
        ("selection", "nope"),
        ("gate", "nope"),
        ("mlp_on", "some"),
        ("threshold", 1.0),
        ("ratio", -0.1),
        ("gumbel_tau", 0.0),
        ("container_len", 0),
        ("position_bias", "learned"),
        ("label_coverage", 0.0),
        ("attn_impl", "fast"),
    ],
)
def test_bad_config_fails_at_build_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^spa\.{field}: .*{value!r}"):
        SPABlock(8, 2, 2, SPAConfig(**{field: value}))


@pytest.mark.parametrize("strategy", ["containers", *PER_IMAGE])
def test_padding_is_never_selected_nor_read(fixed_policy, strategy):
    """An image that drops tokens never keeps batch padding (``info.mask`` is False there, the kept
    fraction counts real tokens only), and its real tokens' outputs do not depend on the padding's
    values: the same block on the image alone gives the same outputs."""
    hw, N = (6, 7), 42
    valid = torch.zeros(2, *hw, dtype=torch.bool)
    valid[0, :4, :5] = True
    valid[1] = True
    keep = torch.zeros(2, N, dtype=torch.bool)
    keep[:, ::3] = True  # ragged: some padding places among them, dropped by the block
    fixed_policy.mask = keep
    blk = _block(strategy, dim=8, window=3, shift=1, selection=fixed_policy.name, dtype=torch.float64)
    x = torch.randn(2, *hw, 8, dtype=torch.float64)
    with torch.no_grad():
        y, info = blk(x, None, valid)
    assert torch.equal(info.mask, keep & valid.view(2, N))
    assert float(info.kept_fraction) == pytest.approx(float((keep & valid.view(2, N)).sum()) / 62)
    assert torch.equal(info.valid, valid.view(2, N))
    x2 = x.clone()
    x2[0][~valid[0]] = 100.0  # other padding values: nothing real may move
    with torch.no_grad():
        y2, _ = blk(x2, None, valid)
    torch.testing.assert_close(y2[0][valid[0]], y[0][valid[0]], **TOL[torch.float64])


@settings(
    derandomize=True,
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # the policy's mask is set per example
@given(
    counts_seed=st.integers(0, 10_000),
    hw=st.sampled_from([(4, 4), (5, 3), (6, 6), (2, 7)]),
    window=st.integers(2, 4),
    shift=st.integers(0, 2),
    mlp_on=st.sampled_from(["all", "selected"]),
)
def test_per_image_strategies_agree_for_any_selection(fixed_policy, hw, window, shift, counts_seed, mlp_on):
    """varlen, pad and mask give the same block, with the bias and shift mask, for any selection
    (images keeping nothing, one token, everything); forward and gradients of input and bias table."""
    shift = min(shift, window - 1)
    N = hw[0] * hw[1]
    g = torch.Generator().manual_seed(counts_seed)
    counts = [0, N, 1, int(torch.randint(0, N + 1, (1,), generator=g))]
    mask = torch.zeros(4, N, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, torch.randperm(N, generator=g)[:c]] = True
    fixed_policy.mask = mask
    x = torch.randn(4, *hw, 8, dtype=torch.float64, generator=g)
    results = {}
    for strategy in PER_IMAGE:
        blk = _block(
            strategy,
            dim=8,
            window=window,
            shift=shift,
            selection=fixed_policy.name,
            mlp_on=mlp_on,
            dtype=torch.float64,
        )
        results[strategy] = _outputs_and_grads(blk, x)
    for strategy in PER_IMAGE[1:]:
        torch.testing.assert_close(results[strategy][0], results["varlen"][0], **TOL[torch.float64])
        for name in ("x", "attn.relative_position_bias_table", "attn.qkv.weight"):
            torch.testing.assert_close(
                results[strategy][1][name],
                results["varlen"][1][name],
                **TOL[torch.float64],
                msg=f"{strategy} {name}",
            )


@pytest.mark.parametrize("strategy", ["containers", *PER_IMAGE])
def test_bias_table_gradient_equals_reference(fixed_policy, mask_with_counts, strategy):
    """The bias table's gradient through packed attention equals the gradient through the
    definition (``_reference``), on a ragged shifted pack."""
    hw, N = (4, 6), 24
    fixed_policy.mask = mask_with_counts([N, 0, 7, 1], N, seed=5)
    blk = _block(strategy, dim=8, window=3, shift=1, selection=fixed_policy.name, dtype=torch.float64)
    x = torch.randn(4, *hw, 8, dtype=torch.float64)
    table = blk.attn.relative_position_bias_table
    runs = (
        _container_runs(hw, 3, 1, blk.container_len(hw), fixed_policy.mask)
        if strategy == "containers"
        else _per_image_runs
    )
    (g_blk,) = torch.autograd.grad(blk(x)[0].pow(2).sum(), table)
    (g_ref,) = torch.autograd.grad(_reference(blk, x, fixed_policy.mask, runs).pow(2).sum(), table)
    assert g_ref.abs().sum() > 0
    torch.testing.assert_close(g_blk, g_ref, **TOL[torch.float64])


def test_position_bias_none_has_no_table_and_ignores_places():
    blk = _block("varlen", position_bias="none", window=2)
    assert blk.attn.relative_position_bias_table is None
    assert "attn.relative_position_bias_table" not in blk.state_dict()
    x = torch.randn(2, 4, 4, 24)
    with (
        torch.no_grad()
    ):  # without bias, attention over a sequence does not depend on the order of its tokens
        y, _ = blk(x)
        ref = _reference(blk, x, torch.ones(2, 16, dtype=torch.bool), _per_image_runs)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


@pytest.mark.parametrize("cls", ["swin", "spa"])
def test_an_evaluation_under_inference_mode_does_not_break_later_training(cls):
    """The cached geometry (window order, places, shift masks, bias indices) is made outside
    inference mode: an inference tensor in a cache would fail every later backward."""
    torch.manual_seed(0)
    hw, window, shift = (12, 20), 4, 2  # a geometry no other test caches first
    blk = (
        SwinBlock(8, 2, window, shift)
        if cls == "swin"
        else _block("containers", dim=8, window=window, shift=shift)
    )
    with torch.inference_mode():
        blk(torch.randn(2, *hw, 8))
    x = torch.randn(2, *hw, 8, requires_grad=True)
    y = blk(x)
    (y[0] if isinstance(y, tuple) else y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("policy", ["random", "gate_random", "gate_norm"])
@pytest.mark.parametrize("training", [True, False])
def test_controls_do_not_borrow_the_gates_scores(policy, training):
    """A control whose places are not the gate's enters attention unscaled: with ``gate_scaling`` on
    it computes exactly what it computes with it off (the same draws), and in training no gradient of
    its output reaches the gate's weights (the gate's count is a hard decision; no score scales a token)."""
    outs, grads = [], []
    for scaling in (True, False):
        blk = _block("containers", selection=policy, ratio=0.4, gate_scaling=scaling, window=4, shift=2)
        blk.train(training)
        blk.generator = torch.Generator().manual_seed(7)
        x = torch.randn(3, 8, 8, 24, generator=torch.Generator().manual_seed(1))
        y, info = blk(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), info.mask))
        grads.append(blk.gate.score.weight.grad)
    assert torch.equal(outs[0][1], outs[1][1])
    assert 0 < int(outs[0][1].sum()) < outs[0][1].numel()  # some kept, some not: scaling would show
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)
    for g in grads:
        assert g is None or not g.any()


def test_the_gate_scales_its_own_tokens():
    """The counterpart: the gate's kept tokens are scaled by its scores, so ``gate_scaling`` changes
    the output (the test above would catch a block that ignored the flag for every policy)."""
    outs = []
    for scaling in (True, False):
        blk = _block("containers", selection="gate", gate_scaling=scaling, window=4, shift=2).eval()
        x = torch.randn(3, 8, 8, 24, generator=torch.Generator().manual_seed(1))
        outs.append(blk(x)[0].detach())
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("training", [True, False])
def test_keep_none_skipping_the_block_is_the_identity(training):
    """The positive control: ``selection: none`` with ``mlp_on: selected`` keeps no token, so the block
    passes every token through unchanged (the SPA stage reduces to its patch merge)."""
    blk = _block("containers", selection="none", mlp_on="selected", window=4, shift=2).train(training)
    x = torch.randn(2, 8, 8, 24, generator=torch.Generator().manual_seed(3))
    y, info = blk(x)
    assert not info.mask.any() and info.counts.tolist() == [0, 0]
    assert torch.equal(y, x)
