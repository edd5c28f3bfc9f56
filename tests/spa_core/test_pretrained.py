"""spa_core/pretrained.py: a timm Swin (random weights, saved to disk) and the same weights in the
official Swin layout load into the backbone, whose stage features then equal timm's on the same input
(dense and keep-all SPA, float64); SPA blocks get their Swin block's weights; what has no source is
listed; wrong checkpoints fail naming the key."""

from __future__ import annotations

import re

import pytest
import torch

from spa_core.backbone import SPABackbone, build_backbone
from spa_core.config import SPAConfig, backbone_preset
from spa_core.pretrained import PretrainedError, checkpoint_layout, load_pretrained, read_checkpoint
from tests._timm import TIMM_ARGS, import_timm, timm_swin

# A timm Swin of this project's presets' shapes, random weights (tests/_timm.py).
_TIMM_ARGS, _timm_model = TIMM_ARGS, timm_swin
import_timm()
from timm.models.swin_transformer import SwinTransformer  # noqa: E402

_KEEP_ALL = SPAConfig(selection="all", pack="containers", gate_scaling=False)


def _official(timm_state: dict) -> dict:
    """The same weights as the official Swin code saves them: downsample at the end of the stage
    before, the classifier as ``head``, the buffers it keeps (``relative_position_index``, the shift
    masks), under ``"model"``."""
    out = {}
    for k, v in timm_state.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
        if k.endswith("attn.relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.zeros(4, 4, dtype=torch.long)
        if k.endswith("norm1.weight"):
            out[k.replace("norm1.weight", "attn_mask")] = torch.zeros(2, 4, 4)
    return {"model": out}


def _ours(preset: str, variant: str, **kw) -> SPABackbone:
    torch.manual_seed(1)
    kw = {"spa": _KEEP_ALL, "drop_path_rate": 0.0, **kw}
    return build_backbone(backbone_preset(preset, variant=variant, **kw)).eval()


def _compare(ours: SPABackbone, theirs: torch.nn.Module, x: torch.Tensor, tol: dict) -> None:
    """Our four stage maps against timm's stage outputs passed through our (unloaded) output norms."""
    with torch.no_grad():
        feats = ours(x).features
        inter = theirs.forward_intermediates(x, norm=False, output_fmt="NCHW", intermediates_only=True)
        assert len(inter) == len(feats) == 4
        for i, (f, t) in enumerate(zip(feats, inter)):
            expect = ours.norms[i](t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # timm is NHWC inside
            assert f.shape == expect.shape
            torch.testing.assert_close(f, expect, **tol, msg=f"stage {i + 1}")


F64 = dict(atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("layout", ["timm", "official"])
@pytest.mark.parametrize("variant", ["dense", "spa"])
@pytest.mark.parametrize("preset", ["tiny", "micro"])
def test_features_equal_timm_after_loading(tmp_path, preset, variant, layout):
    """A timm Swin of the preset's architecture, saved in either layout, loaded here: every stage's
    features equal timm's (float64), dense and keep-all SPA (stages 3-4); what the load lists."""
    theirs = _timm_model(preset).double()
    state = theirs.state_dict() if layout == "timm" else _official(theirs.state_dict())
    path = tmp_path / f"swin_{layout}.pth"
    torch.save(state, path)
    ours = _ours(preset, variant, pretrained=str(path)).double()
    load = ours.pretrained_load
    assert load.layout == layout and load.source == str(path) and len(load.sha256) == 64
    expect_missing = ["norms"] + (
        [f"stages.{s}.{j}.gate" for s in (2, 3) for j in range(len(ours.stages[s]))]
        if variant == "spa"
        else []
    )
    assert sorted(load.missing) == sorted(expect_missing)
    assert all(
        k.startswith(("head.", "norm.")) or "relative_position_index" in k or "attn_mask" in k
        for k in load.ignored
    )
    assert {"norm.weight", "norm.bias"} <= set(load.ignored)
    _compare(ours, theirs, torch.randn(2, 3, 128, 128, dtype=torch.float64), F64)


@pytest.mark.parametrize("variant", ["dense", "spa"])
def test_swin_t_features_equal_timm_swin_tiny_patch4_window7_224(tmp_path, variant):
    """timm's ``swin_tiny_patch4_window7_224`` architecture (random weights) at 224 px, loaded into
    the ``swin_t`` preset: the stage features equal timm's (float64)."""
    theirs = _timm_model("swin_t").double()
    path = tmp_path / "swin_t.pth"
    torch.save(theirs.state_dict(), path)
    ours = _ours("swin_t", variant, pretrained=str(path)).double()
    _compare(ours, theirs, torch.randn(1, 3, 224, 224, dtype=torch.float64), F64)


def test_spa_blocks_take_their_swin_blocks_weights_and_the_rest_stays_initialised(tmp_path):
    """Every SPA block holds its Swin block's tensors; gates, output norms and the blocks
    ``extra_stage3_blocks`` adds keep the values a build without a checkpoint gives them."""
    theirs = _timm_model("tiny")
    state = theirs.state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    cfg = dict(spa=SPAConfig(), extra_stage3_blocks=2)
    loaded = _ours("tiny", "spa", pretrained=str(path), **cfg)
    fresh = _ours("tiny", "spa", **cfg)
    assert sorted(loaded.pretrained_load.missing) == sorted(
        ["norms", "stages.2.0.gate", "stages.2.1.gate", "stages.2.2", "stages.2.3", "stages.3.0.gate"]
    )
    own, initial = loaded.state_dict(), fresh.state_dict()
    for i in range(4):
        for j in range(_TIMM_ARGS["tiny"]["depths"][i]):
            for name, value in own.items():
                prefix = f"stages.{i}.{j}."
                if name.startswith(prefix) and ".gate." not in name:
                    torch.testing.assert_close(
                        value, state[f"layers.{i}.blocks.{j}.{name[len(prefix) :]}"], rtol=0, atol=0
                    )
    for name in own:
        if name.startswith(("norms.", "stages.2.2.", "stages.2.3.")) or ".gate." in name:
            assert torch.equal(own[name], initial[name]), name
    torch.testing.assert_close(
        own["merges.0.reduction.weight"], state["layers.1.downsample.reduction.weight"]
    )


def test_state_dict_safetensors_and_layout_detection(tmp_path):
    theirs = _timm_model("micro")
    state = theirs.state_dict()
    assert checkpoint_layout(state) == "timm" and checkpoint_layout(_official(state)["model"]) == "official"
    ours = _ours("micro", "dense")
    load = load_pretrained(ours, {"state_dict": state})  # nested dicts unwrap; no file, no hash
    assert load.source == "<state dict>" and load.sha256 is None and load.loaded
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert read_checkpoint(path).keys() == state.keys()
    assert load_pretrained(_ours("micro", "dense"), path).layout == "timm"
    with pytest.raises(FileNotFoundError, match="no download"):
        read_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(PretrainedError, match="not a Swin checkpoint"):
        load_pretrained(ours, {"encoder.weight": torch.zeros(1)})


def _expect_error(state, match, preset="micro", **kw):
    model = _ours(preset, "spa", **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError, match=match):
        load_pretrained(model, state)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing copied before the check failed


def test_a_shape_mismatch_names_the_key():
    state = _timm_model("micro").state_dict()
    state["layers.2.blocks.0.mlp.fc1.weight"] = state["layers.2.blocks.0.mlp.fc1.weight"][:-1]
    _expect_error(
        state,
        r"'layers\.2\.blocks\.0\.mlp\.fc1\.weight' has shape \(255, 64\).*'stages\.2\.0\.mlp\.fc1\.weight' has \(256, 64\)",
    )


@pytest.mark.parametrize(
    "key", ["absolute_pos_embed", "layers.0.blocks.0.attn.q_bias", "layers.1.downsample.conv.weight"]
)
def test_a_key_that_maps_nowhere_is_named(key):
    state = _timm_model("micro").state_dict()
    state[key] = torch.zeros(3)
    _expect_error(state, re.escape(f"checkpoint key {key!r} maps to nothing"))


def test_a_block_the_backbone_does_not_have_is_named():
    state = _timm_model("tiny").state_dict()  # stage 3 has 2 blocks
    _expect_error(
        state,
        r"'layers\.2\.blocks\.1\.norm1\.weight'.*maps to 'stages\.2\.1\.norm1\.weight'",
        preset="micro",
        embed_dim=32,
        num_heads=(1, 2, 4, 8),
    )


def test_a_backbone_block_without_source_is_an_error():
    """A deeper backbone than the checkpoint (other than the extra stage-3 blocks) is refused: its
    extra blocks would silently stay random in a "pretrained" model."""
    state = _timm_model("micro").state_dict()
    _expect_error(state, r"have no source.*stages\.1\.1\.", depths=(1, 2, 1, 1))


def test_a_window_that_differs_is_refused_with_the_reason():
    torch.manual_seed(0)
    args = {**_TIMM_ARGS["micro"], "window_size": 8}
    state = SwinTransformer(img_size=256, num_classes=10, **args).state_dict()
    _expect_error(
        state,
        r"relative position table for window 8 \(225 rows\).*window is 4 \(49 rows\).*windows must match",
    )


def test_loading_refuses_another_model():
    with pytest.raises(PretrainedError, match="SPABackbone"):
        load_pretrained(torch.nn.Linear(2, 2), _timm_model("micro").state_dict())


def test_a_two_conv_stem_is_refused_with_the_setting_that_loads():
    """A Swin checkpoint has one patch-embedding conv: a ``patch2`` stem would keep its own random
    stem under "pretrained" weights, so loading names the setting instead."""
    _expect_error(
        _timm_model("micro").state_dict(), r"model\.stem 'patch2'.*set model\.stem: patch", stem="patch2"
    )
