"""spa_core/backbone.py: shapes of SPA vs dense for the presets, per-block infos, odd image sizes,
multiply-adds falling with fewer kept tokens, and an import that stays free of Ray and DeepSpeed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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


def _keep_all_twins(preset="tiny", dtype=torch.float64, **kw):
    """The dense backbone and a keep-all containers SPA backbone without gate scaling with its weights."""
    cfg = dict(
        spa=SPAConfig(selection="all", pack="containers", gate_scaling=False), drop_path_rate=0.0, **kw
    )
    dense = _build(preset, variant="dense", **cfg).to(dtype)
    spa = _build(preset, variant="spa", **cfg).to(dtype)
    missing, unexpected = spa.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(".gate." in k for k in missing)
    return dense, spa


def _features_and_grads(model, x, image_sizes=None):
    """Stage features and the gradients of every non-gate weight and of the input of a loss that
    weighs every output differently."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x, image_sizes).features
    loss = sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in out)
    named = {n: p for n, p in model.named_parameters() if ".gate." not in n}
    grads = torch.autograd.grad(loss, [x, *named.values()])
    return [f.detach() for f in out], dict(zip(["input", *named], grads))


def _assert_twins_agree(dense, spa, x, image_sizes=None, tol=None):
    tol = tol or dict(atol=1e-10, rtol=1e-9)
    (f_dense, g_dense), (f_spa, g_spa) = (_features_and_grads(m, x, image_sizes) for m in (dense, spa))
    for i, (a, b) in enumerate(zip(f_dense, f_spa)):
        torch.testing.assert_close(b, a, **tol, msg=f"stage {i + 1}")
    assert g_dense.keys() == g_spa.keys()
    for name in g_dense:
        torch.testing.assert_close(g_spa[name], g_dense[name], **tol, msg=name)


@pytest.mark.parametrize("spa_stages", [(3, 4), (1, 2, 3, 4)])
@pytest.mark.parametrize("hw", [(64, 64), (96, 96), (112, 112), (100, 76)])
def test_keep_all_backbone_is_the_dense_backbone(spa_stages, hw):
    """A keep-all containers SPA backbone without gate scaling, given the dense backbone's weights,
    computes the dense backbone's features and gradients (input and every weight), float64, at sizes
    whose stage maps are multiples of the window (64 px: 16, 8, 4, 2 for the tiny preset's window 4)
    and at sizes where they are not (96 px: 24, 12, 6, 3; 112 px: 28, 14, 7, 4; 100 x 76: 25 x 19,
    13 x 10, 7 x 5, 4 x 3): Swin's padding and clipped windows, shifted blocks in every stage."""
    dense, spa = _keep_all_twins(spa_stages=spa_stages, depths=(2, 2, 2, 2))
    _assert_twins_agree(dense, spa, torch.randn(2, 3, *hw, dtype=torch.float64))


@pytest.mark.parametrize("pad_keys", ["mask", "attend"])
@pytest.mark.parametrize("size", [96, 112])
def test_keep_all_swin_t_is_the_dense_swin_t(size, pad_keys):
    """The same at the swin_t preset (window 7, SPA stages 3-4): at 96 px the stage-3 map is 6 x 6
    (a clipped window), at 112 px 7 x 7 with a clipped 4 x 4 map at stage 4; stages 1-2 (24, 12 or 28,
    14) are padded, so ``pad_keys`` matters there."""
    dense, spa = _keep_all_twins("swin_t", depths=(2, 2, 2, 2), pad_keys=pad_keys)
    _assert_twins_agree(dense, spa, torch.randn(2, 3, size, size, dtype=torch.float64))


@settings(derandomize=True, max_examples=8, deadline=None)
@given(
    h=st.integers(33, 150),
    w=st.integers(33, 150),
    batch=st.integers(1, 2),
    pad_keys=st.sampled_from(["mask", "attend"]),
    spa_stages=st.sampled_from([(3, 4), (2, 3, 4)]),
    padded=st.booleans(),
    data=st.data(),
)
def test_keep_all_backbone_is_the_dense_backbone_at_any_size(h, w, batch, pad_keys, spa_stages, padded, data):
    """Any image size, with or without batch padding (``image_sizes``: each image real on a top-left
    part of the batch's size), both ``pad_keys``: features and gradients equal (tiny preset, float64)."""
    sizes = None
    if padded:
        sizes = torch.tensor(
            [[data.draw(st.integers(1, h)), data.draw(st.integers(1, w))] for _ in range(batch)]
        )
    dense, spa = _keep_all_twins(spa_stages=spa_stages, pad_keys=pad_keys)
    _assert_twins_agree(dense, spa, torch.randn(batch, 3, h, w, dtype=torch.float64), sizes)


def test_keep_all_tiny_is_the_dense_tiny_at_800_by_1216():
    """The paper's input size at the tiny preset (stage maps 200 x 304, 100 x 152, 50 x 76 and 25 x 38,
    the last two padded for window 4; shifted blocks in stage 3), float64, forward and gradients."""
    dense, spa = _keep_all_twins()
    _assert_twins_agree(dense, spa, torch.randn(1, 3, 800, 1216, dtype=torch.float64))


@pytest.mark.slow
def test_keep_all_swin_t_is_the_dense_swin_t_at_800_by_1216():
    """The paper's input size at the swin_t preset (window 7: every stage map, 200 x 304 down to
    25 x 38, is padded), float32 (float64 would take minutes here): features to 1e-4 (they are
    layer-normed, so of order 1) and every gradient to 1e-4 of its largest entry."""
    dense, spa = _keep_all_twins("swin_t", dtype=torch.float32)
    x = torch.randn(1, 3, 800, 1216)
    (f_dense, g_dense), (f_spa, g_spa) = (_features_and_grads(m, x) for m in (dense, spa))
    for i, (a, b) in enumerate(zip(f_dense, f_spa)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"stage {i + 1}")
    for name in g_dense:
        scale = float(g_dense[name].abs().max())
        torch.testing.assert_close(g_spa[name], g_dense[name], atol=1e-4 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("stem", ["patch", "patch2"])
@pytest.mark.parametrize("variant", ["dense", "spa"])
def test_an_image_padded_into_a_batch_keeps_its_features(variant, stem):
    """``pad_keys: mask`` with ``image_sizes``: a 100 x 75 image alone and the same image padded (with
    zeros, at the bottom/right) into a 128 x 128 batch beside another image give the same features
    on its real tokens (dense and keep-all SPA, either stem), zero features on its padding; ``attend``
    does not."""
    img = torch.randn(1, 3, 100, 75, dtype=torch.float64)
    batch = torch.zeros(2, 3, 128, 128, dtype=torch.float64)
    batch[0, :, :100, :75] = img[0]
    batch[1] = torch.randn(3, 128, 128, dtype=torch.float64)
    sizes = torch.tensor([[100, 75], [128, 128]])
    for pad_keys in ("mask", "attend"):
        dense, spa = _keep_all_twins(pad_keys=pad_keys, stem=stem)
        model = dense if variant == "dense" else spa
        with torch.no_grad():
            alone = model(img).features
            out = model(batch, sizes)
        assert [tuple(v.shape) for v in out.valid] == [(2, 32, 32), (2, 16, 16), (2, 8, 8), (2, 4, 4)]
        same = []
        for a, f, v in zip(alone, out.features, out.valid):
            h, w = a.shape[-2:]
            assert bool(v[0, :h, :w].all()) and not bool(v[0].sum() > h * w)
            same.append(torch.allclose(f[0, :, :h, :w], a[0], atol=1e-10, rtol=1e-9))
            if pad_keys == "mask":
                assert bool((f[0][:, ~v[0]] == 0).all())
        assert all(same) if pad_keys == "mask" else not all(same), same


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


@settings(max_examples=25, deadline=None)
@given(
    stem=st.sampled_from(["patch", "patch2"]),
    patch=st.sampled_from([2, 4, 6, 8]),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    data=st.data(),
)
def test_a_token_of_either_stem_reads_only_its_own_patch(stem, patch, h, w, data):
    """Changing one pixel of an image of any size changes the stage-1 token of its patch and no
    other, for Swin's one-conv embedding and the two-conv one: the patch grid (and with it padding's
    place and the selection labels' grid) does not depend on the stem."""
    from spa_core.backbone import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(patch, 3, 8, stem).double()
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    y, x2 = data.draw(st.integers(0, h - 1)), x.clone()
    xx = data.draw(st.integers(0, w - 1))
    x2[1, :, y, xx] += 1.0
    with torch.no_grad():
        a, b = embed(x), embed(x2)
    assert a.shape == (2, -(-h // patch), -(-w // patch), 8)
    changed = (a - b).abs().amax(-1) > 1e-12
    assert not changed[0].any()
    assert changed[1].nonzero().tolist() == [[y // patch, xx // patch]]
