"""spa_core/backbone.py: shapes of SPA vs dense for the presets, per-block infos, odd image sizes,
multiply-adds falling with fewer kept tokens, and an import that stays free of Ray and DeepSpeed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kernels
from spa_core.backbone import BackboneFeatures, SPABackbone, build_backbone, stage_grids
from spa_core.block import SPABlock, SwinBlock
from spa_core.config import SPAConfig, backbone_preset
from spa_core.registry import MODEL_VARIANTS, PACK_STRATEGIES, SELECTION_POLICIES
from spa_core.select import Selection


def _build(name="tiny", **kw):
    torch.manual_seed(0)
    return build_backbone(backbone_preset(name, **kw)).eval()


def _shapes(out):
    return [tuple(f.shape) for f in out.features]


@pytest.mark.parametrize("hw", [(64, 64), (70, 45)])
def test_tiny_spa_and_dense_shapes(hw):
    x = torch.randn(2, 3, *hw)
    spa, dense = _build(variant="spa"), _build(variant="dense")
    with torch.no_grad():
        o_spa, o_dense = spa(x), dense(x)
    grids = stage_grids(hw, 4)
    expect = [(2, c, *g) for c, g in zip(spa.stage_channels, grids)]
    assert _shapes(o_spa) == _shapes(o_dense) == expect
    assert spa.stage_channels == dense.stage_channels == [32, 64, 128, 256]
    assert o_dense.blocks == []
    # tiny: depths (1, 1, 2, 1), SPA stages 3-4 -> 3 SPA blocks in forward order
    assert [(b.stage, b.index, b.grid) for b in o_spa.blocks] == [
        (3, 0, grids[2]),
        (3, 1, grids[2]),
        (4, 0, grids[3]),
    ]
    assert spa.label_grids(hw) == [grids[2], grids[3]]
    for b in o_spa.blocks:
        N = b.grid[0] * b.grid[1]
        assert b.logits.shape == b.mask.shape == (2, N) and b.mask.dtype == torch.bool
        assert torch.equal(b.counts, b.mask.sum(1))
        torch.testing.assert_close(b.kept_fraction, b.mask.float().mean())


def test_swin_t_forward_224():
    x = torch.randn(1, 3, 224, 224)
    for variant in ("spa", "dense"):
        model = _build("swin_t", variant=variant)
        with torch.no_grad():
            out = model(x)
        assert _shapes(out) == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
        assert len(out.blocks) == (8 if variant == "spa" else 0)  # 6 in stage 3, 2 in stage 4


def test_gate_scores_chain_through_blocks_and_stages():
    # s = max(f(r), s_prev): at inference every block keeps at least what the previous one kept,
    # and a stage-4 token is kept if any stage-3 token merged into it was
    model = _build(spa=SPAConfig(selection="gate"), extra_stage3_blocks=1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 72, 56))
    (a, b, c, d) = out.blocks
    assert [x.stage for x in out.blocks] == [3, 3, 3, 4]
    for prev, nxt in ((a, b), (b, c)):
        assert (nxt.logits >= prev.logits).all() and (nxt.mask >= prev.mask).all()
    merged = torch.nn.functional.max_pool2d(c.mask.view(2, 1, *c.grid).float(), 2, ceil_mode=True)
    assert (d.mask.view(2, 1, *d.grid) >= merged.bool()).all()


def test_config_places_spa_blocks():
    m = _build(spa_stages=(2, 3, 4), extra_stage3_blocks=2)
    assert [[isinstance(b, SPABlock) for b in s] for s in m.stages] == [[False], [True], [True] * 4, [True]]
    assert [[b.shift for b in s] for s in m.stages] == [[0], [0], [0, 2, 0, 2], [0]]
    m = _build(spa_stages=(4,))
    assert all(isinstance(b, SwinBlock) for s in m.stages[:3] for b in s) and isinstance(
        m.stages[3][0], SPABlock
    )
    for dense in (_build(variant="dense"), _build(spa=None), _build(spa_stages=())):
        assert not any(isinstance(b, SPABlock) for b in dense.modules())


def test_registered_variants_build():
    assert {"spa", "dense"} <= set(MODEL_VARIANTS)
    for name in MODEL_VARIANTS:
        assert isinstance(MODEL_VARIANTS.get(name)(backbone_preset("micro")), SPABackbone)
    with pytest.raises(KeyError, match="model_variant"):
        build_backbone(backbone_preset("micro", variant="nope"))


def test_training_forward_backward_with_drop_path():
    torch.manual_seed(0)
    model = build_backbone(backbone_preset("micro", drop_path_rate=0.3)).train()
    out = model(torch.randn(2, 3, 48, 40))
    sum(f.mean() for f in out.features).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "gate" in n)


def _macs(model, x, op=None):
    kernels.register_flop_handles()  # varlen attention and CPU SDPA formulas for flop_counter
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    if op is None:
        return counter.get_total_flops() // 2  # torch counts 2 flops per multiply-add
    return sum(v for k, v in counter.get_flop_counts()["Global"].items() if op in str(k)) // 2


def test_multiply_adds_fall_as_fewer_tokens_are_kept():
    x = torch.randn(2, 3, 64, 64)
    models = [_build(spa=SPAConfig(selection="topk", ratio=r)) for r in (1.0, 0.5, 0.1, 0.0)]
    macs = [_macs(m, x) for m in models]
    assert macs[0] > macs[1] > macs[2] > macs[3], macs
    attn = [_macs(m, x, "varlen_attention") for m in models]  # the SPA attention itself
    assert attn[0] > attn[1] > attn[2] > attn[3] == 0, attn
    # the gate's own threshold: a stricter threshold keeps fewer tokens and costs less
    macs_gate = [_macs(_build(spa=SPAConfig(selection="gate", threshold=t)), x) for t in (0.01, 0.99)]
    assert macs_gate[0] > macs_gate[1], macs_gate
    # the dense baseline costs about what SPA keeping everything costs (tiny: stage-3/4 maps fit a window)
    assert abs(_macs(_build(variant="dense"), x) - macs[0]) < 0.01 * macs[0]


def test_mask_strategy_saves_nothing_in_attention():
    x = torch.randn(2, 3, 64, 64)
    full, half = (_build(spa=SPAConfig(selection="topk", ratio=r, pack="mask")) for r in (1.0, 0.5))
    sdpa = "scaled_dot_product"  # mask runs SDPA densely over all N tokens, as do the Swin blocks
    assert _macs(half, x, sdpa) == _macs(full, x, sdpa)
    assert _macs(half, x) < _macs(full, x)  # only the projections shrink with the kept tokens


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("strategy", list(PACK_STRATEGIES))
def test_fvcore_traces_the_backbone(strategy):
    from fvcore.nn import FlopCountAnalysis

    x = torch.randn(1, 3, 64, 64)
    totals = []
    for r in (1.0, 0.25):
        model = BackboneFeatures(_build("micro", spa=SPAConfig(selection="topk", ratio=r, pack=strategy)))
        fa = FlopCountAnalysis(model, x).set_op_handle(**kernels.FVCORE_HANDLES)
        totals.append(fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total())
    assert totals[0] > totals[1] > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("strategy", ["containers", "varlen"])
def test_fvcore_count_is_the_same_on_the_gpu_attention_path(strategy, compiled_on_cpu, monkeypatch):
    """fvcore's count (what ``harness.measure`` records) with the GPU's attention path forced on CPU
    (FlexAttention compiled, ``compiled_on_cpu``) equals the torch path's: the trace runs the custom
    op's torch path (``kernels._dispatch.counting_flops``), not the compiled function, which
    ``torch.jit.trace`` cannot trace. The forward itself ran the compiled function."""
    from fvcore.nn import FlopCountAnalysis

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the dispatcher pick "triton" on CPU tensors
    x = torch.randn(2, 3, 64, 64)
    counts, unsupported = [], []
    for impl in ("triton", "torch"):
        spa = SPAConfig(selection="topk", ratio=0.4, pack=strategy, attn_impl=impl)
        model = BackboneFeatures(_build("micro", spa=spa, spa_stages=(2, 3, 4)))
        with torch.no_grad():
            model(x)
            fa = FlopCountAnalysis(model, x).set_op_handle(**kernels.FVCORE_HANDLES)
            counts.append(fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).by_operator())
            unsupported.append(fa.unsupported_ops())
    assert compiled_on_cpu.graphs >= 1  # the triton model's forward ran the compiled FlexAttention
    assert counts[0] == counts[1] and counts[0]["varlen_attention"] > 0
    assert unsupported[0] == unsupported[1]


def test_import_does_not_pull_ray_or_deepspeed():
    code = (
        "import sys, spa_core, spa_core.backbone, spa_core.loss; "
        "bad = [m for m in ('ray', 'deepspeed', 'harness') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2])
    )


@pytest.mark.parametrize("spa_stages", [(3, 4), (1, 2, 3, 4)])
def test_keep_all_backbone_is_the_dense_backbone(spa_stages):
    """A keep-all containers SPA backbone without gate scaling, given the dense backbone's weights,
    computes the dense backbone's features and gradients: every stage grid of a 64-px image (16, 8,
    4, 2 for the tiny preset's window 4; the last a clipped 2 x 2 window) is a multiple of its window."""
    cfg = dict(
        spa_stages=spa_stages,
        spa=SPAConfig(selection="all", pack="containers", gate_scaling=False),
        depths=(2, 2, 2, 2),
    )  # two blocks per stage: unshifted and shifted
    dense = _build(variant="dense", **cfg).double()
    spa = _build(variant="spa", **cfg).double()
    missing, unexpected = spa.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(".gate." in k for k in missing)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    feats, grads = [], []
    for model in (dense, spa):
        out = model(x).features
        loss = sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in out)
        named = {n: p for n, p in model.named_parameters() if ".gate." not in n}
        feats.append(out)
        grads.append(dict(zip(named, torch.autograd.grad(loss, list(named.values())))))
    for a, b in zip(*feats):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-10, rtol=1e-9, msg=name)


def _pattern_policy(scores, *, cfg, training, generator=None, tokens=None):
    """Keeps token j of image b iff (3j + 5b) % 7 < b + 2: ragged counts, the same in every run."""
    B, N = scores.shape
    j, b = torch.arange(N)[None, :], torch.arange(B)[:, None]
    mask = (3 * j + 5 * b) % 7 < b + 2
    return Selection(mask=mask, counts=mask.sum(1), weight=torch.ones(B, N))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("strategy", ["containers", "varlen"])
def test_mlp_on_selected_skips_exactly_the_unselected_tokens_mlp(strategy):
    """fvcore's count of ``mlp_on: selected`` is that of ``mlp_on: all`` less, per SPA block, the
    norm2 + MLP of every unselected token, counted by hand: ``(B*N - T) * (5C + 2 * C * 4C)`` (fvcore
    counts a LayerNorm with affine weights as 5 multiply-adds per element, a Linear as in * out per
    row), with ragged counts per image."""
    from fvcore.nn import FlopCountAnalysis

    x = torch.randn(3, 3, 64, 64)
    SELECTION_POLICIES.register("test_pattern", _pattern_policy)
    try:
        totals = []
        for mlp_on in ("all", "selected"):
            spa = SPAConfig(selection="test_pattern", pack=strategy, mlp_on=mlp_on)
            bb = _build("micro", spa=spa, depths=(1, 1, 2, 1))
            fa = FlopCountAnalysis(BackboneFeatures(bb), x).set_op_handle(**kernels.FVCORE_HANDLES)
            totals.append(fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total())
            with torch.no_grad():
                blocks = bb(x).blocks
    finally:
        SELECTION_POLICIES.unregister("test_pattern")
    skipped = 0
    for blk in blocks:
        (h, w), C = blk.grid, 16 * 2 ** (blk.stage - 1)
        assert len(set(blk.counts.tolist())) > 1  # ragged
        skipped += (len(blk.counts) * h * w - int(blk.counts.sum())) * (5 * C + 2 * C * 4 * C)
    assert len(blocks) == 3 and skipped > 0
    assert totals[0] - totals[1] == skipped
