"""Paired trials: one seed fixes everything that is not the variant (harness/task/detector.py's and
train.py's pairing, harness/grid/expand.py's baseline, harness/task/measure.py's speedup baseline).

Trials of one seed share the initial weights of what they share with dense (by name and shape), the
training batches and evaluation images, and selection's random streams (one generator per SPA block,
none drawing from the global RNG); a variant's speedup is timed against the grid's dense point.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap

import pytest
import torch
from torch import nn

from harness.config import config_hash, trial_from_dict
from harness.grid import load_grid
from harness.task import train as task_train
from harness.task.detector import (
    build_detector,
    init_reference_config,
    pretrained_columns,
    set_selection_generators,
)
from harness.task.measure import DENSE_TWIN, speedup_baseline_config
from harness.task.train import train_variant
from spa_core.backbone import SPABackbone
from spa_core.block import SPABlock
from spa_core.registry import MODEL_VARIANTS

# Variants of one grid: the dense baseline, the gate with containers, top-k, and a variant with an extra
# stage-3 block (built before stage 4 and the head, so it shifts the draws of everything after it).
VARIANTS = {
    "dense": {"variant": "dense"},
    "gate": {"spa": {"selection": "gate", "pack": "containers"}},
    "topk": {"spa": {"selection": "topk", "ratio": 0.5}},
    "extra1": {"extra_stage3_blocks": 1, "spa": {"selection": "gate"}},
}


def _cfg(model: dict, seed: int = 0, cache=None, **over) -> object:
    d = {
        "preset": "micro",
        "seed": seed,
        "model": model,
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_images": 4},
        "data": {"num_train": 12, "num_val": 6, "image_size": 64},
    }
    if cache is not None:
        d["data"]["cache_dir"] = str(cache)
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v}
    return trial_from_dict(d)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pairing-cache")


@pytest.fixture(autouse=True)
def one_thread():
    """The micro models train in a fraction of a second on one thread; more threads on a shared
    machine only wait for each other."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# --- (a) initial weights ------------------------------------------------------------------------------


def test_variants_of_one_seed_start_from_the_dense_weights_they_share():
    dense = _tensors(build_detector(_cfg(VARIANTS["dense"])))
    for name, model in VARIANTS.items():
        mine = _tensors(build_detector(_cfg(model)))
        shared = [k for k, t in mine.items() if k in dense and dense[k].shape == t.shape]
        # the head and stage 4 come after the SPA gates and the extra block in the build order
        assert any(k.startswith("head.") for k in shared) and any(
            k.startswith("backbone.stages.3.") for k in shared
        )
        for k in shared:
            assert torch.equal(mine[k], dense[k]), (name, k)
        if name != "dense":
            assert any(".gate." in k for k in mine if k not in dense), name  # the variant's own parameters
    extra = _tensors(build_detector(_cfg(VARIANTS["extra1"])))
    assert "backbone.stages.2.1.norm1.weight" in extra and "backbone.stages.2.1.norm1.weight" not in dense


def _official_checkpoint(path, seed=7):
    """A dense micro backbone's weights saved as the official Swin code saves them."""
    torch.manual_seed(seed)
    state = build_detector(_cfg(VARIANTS["dense"], seed=seed)).backbone.state_dict()
    out = {}
    for k, v in state.items():
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"layers.\1.blocks.\2.", k)
        k = re.sub(r"^merges\.(\d+)\.", r"layers.\1.downsample.", k)
        if not k.startswith("norms."):
            out[k] = v + 0.5  # away from any initial value
    torch.save({"model": out}, path)
    return out


def test_pretrained_weights_reach_every_variant_and_the_rest_is_paired(tmp_path):
    """With ``model.pretrained`` every variant's backbone holds the checkpoint's weights; what the
    checkpoint has no source for is shared with dense as usual (output norms) or the variant's own
    (gates, extra stage-3 block); ``pretrained_columns`` says what was left as initialised."""
    path = tmp_path / "swin.pth"
    ckpt = _official_checkpoint(path)
    models = {n: build_detector(_cfg({**m, "pretrained": str(path)})) for n, m in VARIANTS.items()}
    dense = _tensors(models["dense"])
    for name, model in models.items():
        mine = _tensors(model)
        assert torch.equal(
            mine["backbone.stages.0.0.attn.qkv.weight"], ckpt["layers.0.blocks.0.attn.qkv.weight"]
        )
        assert torch.equal(
            mine["backbone.merges.2.reduction.weight"], ckpt["layers.2.downsample.reduction.weight"]
        )
        for k in ("backbone.norms.0.weight", "head.cls_logits.weight"):
            if k in mine:
                assert torch.equal(mine[k], dense[k]), (name, k)
        cols = pretrained_columns(model)
        assert len(cols["pretrained_sha256"]) == 64
        missing = cols["pretrained_missing"].split(", ")
        assert "norms" in missing and (name == "dense") == (not any(m.endswith(".gate") for m in missing))
        assert ("stages.2.1" in missing) == (name == "extra1")
    plain = pretrained_columns(build_detector(_cfg(VARIANTS["dense"])))
    assert plain == {"pretrained_missing": None, "pretrained_sha256": None}


def test_a_plugin_variant_that_builds_in_another_order_shares_the_dense_weights():
    """A variant that draws a module of its own before anything else: every later draw moves, yet what
    it shares with dense starts as dense does."""

    def prefixed(cfg):
        first = nn.Linear(8, 8)  # drawn before the backbone's own modules
        backbone = SPABackbone(dataclasses.replace(cfg, spa_stages=()))  # Swin blocks: dense plus a prefix
        backbone.prefix = first
        return backbone

    MODEL_VARIANTS.register("test-prefixed", prefixed)
    try:
        mine = _tensors(build_detector(_cfg({"variant": "test-prefixed"})))
    finally:
        MODEL_VARIANTS.unregister("test-prefixed")
    dense = _tensors(build_detector(_cfg(VARIANTS["dense"])))
    shared = [k for k in mine if k in dense and dense[k].shape == mine[k].shape]
    assert len(shared) == len(dense)
    for k in shared:
        assert torch.equal(mine[k], dense[k]), k
    assert "backbone.prefix.weight" in mine


def test_another_seed_gives_other_weights_and_the_global_rng_is_neither_read_nor_changed():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = _tensors(build_detector(_cfg(VARIANTS["gate"], seed=0)))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)
    again = _tensors(build_detector(_cfg(VARIANTS["gate"], seed=0)))
    other = _tensors(build_detector(_cfg(VARIANTS["gate"], seed=1)))
    drawn = [k for k, t in a.items() if t.ndim >= 2]  # weight matrices and kernels are drawn at random
    assert drawn
    for k in a:
        assert torch.equal(a[k], again[k]), k
    for k in drawn:
        assert not torch.equal(a[k], other[k]), k


def test_the_init_reference_is_the_dense_network_without_extra_blocks():
    cfg = _cfg({"extra_stage3_blocks": 4, "spa": {"selection": "gate"}})
    ref = init_reference_config(cfg)
    assert ref.model.variant == "dense" and ref.model.spa is None and ref.model.extra_stage3_blocks == 0
    assert (ref.head, ref.seed, ref.model.depths, ref.model.embed_dim) == (
        cfg.head,
        cfg.seed,
        cfg.model.depths,
        cfg.model.embed_dim,
    )


# --- (b) batches --------------------------------------------------------------------------------------


def _record_batches(cfg, monkeypatch) -> dict[str, list]:
    """Train and evaluate ``cfg``; the images and targets every forward saw, by mode."""
    seen: dict[str, list] = {"train": [], "eval": []}
    real = task_train.build_detector

    def recording(c, **kw):
        model = real(c, **kw)

        def hook(module, args):
            images, targets, sizes = args
            seen["train" if module.training else "eval"].append(
                (
                    images.clone(),
                    [(t["image_id"], t["boxes"].clone(), t["labels"].clone()) for t in targets],
                    None if sizes is None else sizes.clone(),
                )
            )

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(task_train, "build_detector", recording)
    train_variant(cfg, progress=False)
    monkeypatch.setattr(task_train, "build_detector", real)
    return seen


def _same_batches(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (ia, ta, sa), (ib, tb, sb) in zip(a, b):
        if not torch.equal(ia, ib) or len(ta) != len(tb):
            return False
        if (sa is None) != (sb is None) or (sa is not None and not torch.equal(sa, sb)):
            return False
        for (ida, ba, la), (idb, bb, lb) in zip(ta, tb):
            if ida != idb or not torch.equal(ba, bb) or not torch.equal(la, lb):
                return False
    return True


# Swin's pipeline: keep-ratio, multi-scale, flips and crops drawn per sample (and a padded batch)
KEEP_RATIO = {
    "resize": "keep_ratio",
    "scale": [96, 64],
    "train_short_sides": [48, 64],
    "flip": 0.5,
    "crop_prob": 0.5,
}


@pytest.mark.parametrize("data", [{}, KEEP_RATIO], ids=["square", "keep_ratio"])
def test_variants_of_one_seed_see_the_same_training_batches_and_eval_images(cache, monkeypatch, data):
    # 12 images in batches of 4: 5 steps cross into the second epoch (a new permutation)
    runs = {
        name: _record_batches(_cfg(model, cache=cache, train={"steps": 5}, data=data), monkeypatch)
        for name, model in VARIANTS.items()
    }
    ref = runs["dense"]
    assert len(ref["train"]) == 5 and sum(len(t) for _, t, _ in ref["eval"]) == 4
    for name, seen in runs.items():
        assert _same_batches(seen["train"], ref["train"]), name
        assert _same_batches(seen["eval"], ref["eval"]), name
    padded = [s is not None for _, _, s in ref["train"] + ref["eval"]]
    # keep-ratio batches are padded where their sizes differ (crops, scales), squares never
    assert any(padded) if data else not any(padded)
    other = _record_batches(
        _cfg(VARIANTS["dense"], seed=1, cache=cache, train={"steps": 5}, data=data), monkeypatch
    )
    assert not _same_batches(other["train"], ref["train"])  # the seed picks the order
    assert _same_batches(other["eval"], ref["eval"])  # evaluation: the first images, in order


# --- (c) selection's random streams -------------------------------------------------------------------


def _spa_blocks(model: nn.Module) -> dict[tuple[int, int], SPABlock]:
    return {(m.stage, m.index): m for m in model.modules() if isinstance(m, SPABlock)}


def test_every_spa_block_has_its_own_generator_keyed_by_seed_stage_and_index():
    blocks = _spa_blocks(build_detector(_cfg({"spa_stages": [2, 3, 4], "spa": {"selection": "random"}})))
    assert set(blocks) == {(2, 0), (3, 0), (4, 0)}
    gens = [b.generator for b in blocks.values()]
    assert all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in gens)
    assert len({g.initial_seed() for g in gens}) == len(gens)  # one stream per block
    # the stream of block (4, 0) depends on the seed, the stage and the index, not on the other blocks
    # nor on the selection policy
    alone = _spa_blocks(build_detector(_cfg({"spa_stages": [4], "spa": {"selection": "gate"}})))
    assert alone[(4, 0)].generator.initial_seed() == blocks[(4, 0)].generator.initial_seed()
    other_seed = _spa_blocks(build_detector(_cfg({"spa_stages": [4]}, seed=1)))
    assert other_seed[(4, 0)].generator.initial_seed() != blocks[(4, 0)].generator.initial_seed()
    # a module without a generator attribute, or with another kind of value, is left alone
    plain = nn.Linear(2, 2)
    plain.generator = "not a torch generator"
    assert set_selection_generators(plain, 0) == 0 and plain.generator == "not a torch generator"


@pytest.mark.filterwarnings("ignore")
def test_the_global_rng_after_training_does_not_depend_on_selection(cache):
    """Random selection and Gumbel noise draw from their blocks' generators: training random, top-k,
    gate or dense leaves torch's global RNG in the same state."""
    states = {}
    for name, model in (
        ("random", {"spa": {"selection": "random", "ratio": 0.5}}),
        ("topk", VARIANTS["topk"]),
        ("gate", VARIANTS["gate"]),
        ("dense", VARIANTS["dense"]),
    ):
        train_variant(_cfg(model, cache=cache), progress=False)
        states[name] = torch.get_rng_state()
    for name, state in states.items():
        assert torch.equal(state, states["topk"]), name


def test_random_selection_draws_the_same_tokens_in_two_variants_of_one_seed():
    """Same seed, same block: the same stream, whatever else the variant changes (here the pack)."""
    a = build_detector(_cfg({"spa": {"selection": "random", "pack": "containers"}})).train()
    b = build_detector(_cfg({"spa": {"selection": "random", "pack": "varlen"}})).train()
    images = torch.randn(2, 3, 64, 64)
    masks_a = [i.mask for i in a.backbone(images).blocks]
    masks_b = [i.mask for i in b.backbone(images).blocks]
    assert [m.tolist() for m in masks_a] == [m.tolist() for m in masks_b]
    assert 0 < int(masks_a[0].sum()) < masks_a[0].numel()


# --- (d) the speedup's baseline -----------------------------------------------------------------------


def _write(tmp_path, text: str):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_paper_like_grid_times_every_variant_against_its_dense_point(tmp_path):
    grid = load_grid(
        _write(
            tmp_path,
            """
        base:
          preset: micro
          model: {extra_stage3_blocks: 4, spa: {selection: gate}}
        points:
          - {name: dense, model: {variant: dense, extra_stage3_blocks: 0}}
          - {name: spt}
          - {name: topk-50, model.spa.selection: topk}
        seeds: 2
    """,
        )
    )
    by_name = {(t.name, t.seed): t for t in grid.trials}
    dense = by_name[("dense", 0)]
    assert dense.baseline is None
    for name in ("spt", "topk-50"):
        for seed in (0, 1):
            cfg = by_name[(name, seed)]
            assert cfg.model.extra_stage3_blocks == 4 and cfg.baseline.name == "dense"
            twin, label = speedup_baseline_config(cfg)
            assert label == "dense"
            assert twin.model == dense.model and twin.head == dense.head
            assert twin.model.extra_stage3_blocks == 0
            assert (twin.seed, twin.data, twin.bench) == (cfg.seed, cfg.data, cfg.bench)
            # the baseline is not part of what the trial computes
            assert config_hash(cfg) == config_hash(dataclasses.replace(cfg, baseline=None))
    # the timing twin starts from the dense trial's own initial weights
    twin_weights = _tensors(build_detector(speedup_baseline_config(by_name[("spt", 0)])[0]))
    dense_weights = _tensors(build_detector(dense))
    assert twin_weights.keys() == dense_weights.keys()
    assert all(torch.equal(twin_weights[k], dense_weights[k]) for k in dense_weights)


def test_without_a_dense_point_the_speedup_falls_back_to_the_dense_twin(tmp_path):
    grid = load_grid(
        _write(
            tmp_path,
            """
        base: {preset: micro, model: {extra_stage3_blocks: 4}}
        axes: {model.spa.selection: [gate, topk]}
    """,
        )
    )
    for cfg in grid.trials:
        assert cfg.baseline is None
        twin, label = speedup_baseline_config(cfg)
        assert label == DENSE_TWIN and twin.model.variant == "dense" and twin.model.extra_stage3_blocks == 4


def test_with_several_dense_variants_each_trial_gets_the_nearest(tmp_path):
    grid = load_grid(
        _write(
            tmp_path,
            """
        base: {preset: micro}
        axes:
          model.embed_dim: [16, 32]
          selection:
            dense: {model.variant: dense}
            topk: {model.spa.selection: topk}
    """,
        )
    )
    for cfg in grid.trials:
        if cfg.model.variant == "dense":
            continue
        assert cfg.baseline.model.embed_dim == cfg.model.embed_dim
        assert cfg.baseline.name == f"embed_dim={cfg.model.embed_dim},dense"


# --- DeepSpeed -----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")
def test_under_deepspeed_zero3_the_engine_wraps_the_paired_initial_weights(
    one_process_group, cache, monkeypatch
):
    """The model DeepSpeed is handed (before ZeRO-3 partitions it) is the one build_detector makes from
    the seed: the dense reference's weights where it shares them."""
    from harness.task.distributed import DeepSpeedBackend

    cfg = _cfg(VARIANTS["extra1"], cache=cache, train={"steps": 1, "zero_stage": 3})
    handed = {}
    real_setup = DeepSpeedBackend.setup

    def setup(self, model, c):
        handed.update({k: t.detach().clone() for k, t in _tensors(model).items()})
        return real_setup(self, model, c)

    monkeypatch.setattr(DeepSpeedBackend, "setup", setup)
    train_variant(cfg, backend=DeepSpeedBackend(), progress=False)
    expect = _tensors(build_detector(cfg))
    dense = _tensors(build_detector(_cfg(VARIANTS["dense"])))
    assert handed.keys() == expect.keys()
    assert all(torch.equal(handed[k], expect[k]) for k in expect)
    assert all(
        torch.equal(handed[k], dense[k]) for k in dense if k in handed and handed[k].shape == dense[k].shape
    )
