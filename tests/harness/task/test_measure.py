"""Measurements: the FLOP formulas by hand and against fvcore's count, fvcore with the real selection,
timings, memory."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.config import BaselineConfig, trial_from_dict
from harness.task.measure import (
    DENSE_TWIN,
    analytic_attention_macs,
    dense_twin_config,
    fvcore_macs,
    paired_speedup,
    peak_memory,
    reset_peak_memory,
    speedup_baseline_config,
    timed,
)


def _cfg(**model):
    return trial_from_dict({"preset": "micro", "model": model, "data": {"image_size": 64}})


def test_dense_formula_by_hand():
    cfg = _cfg(variant="dense")  # micro: embed 16, depths (1, 1, 1, 1), window 4
    # 64x64 images, patch 4: grids 16x16, 8x8, 4x4, 2x2 (the last clips the window to 2x2)
    expect = 0
    for (h, w), c in zip([(16, 16), (8, 8), (4, 4), (2, 2)], [16, 32, 64, 128]):
        m2 = min(4, h) * min(4, w)
        expect += 4 * h * w * c * c + 2 * m2 * h * w * c
    assert analytic_attention_macs(cfg, [], (64, 64), batch=1) == expect
    assert analytic_attention_macs(cfg, [], (64, 64), batch=3) == 3 * expect


def test_dense_formula_counts_the_padded_map():
    """72 px: grids 18x18, 9x9, 5x5, 3x3; Swin pads each to windows of 4 (the last clipped to 3)
    before its projections, which run on the padding too."""
    cfg = _cfg(variant="dense")
    expect = 0
    for hp, c, m2 in [(20, 16, 16), (12, 32, 16), (8, 64, 16), (3, 128, 9)]:
        expect += 4 * hp * hp * c * c + 2 * m2 * hp * hp * c
    assert analytic_attention_macs(cfg, [], (72, 72), batch=1) == expect


def test_spa_containers_formula_by_hand():
    cfg = _cfg(spa_stages=[3], spa={"pack": "containers", "container_len": 8})
    counts = torch.tensor([5, 9])  # two images keep 14 of 16 tokens at stage 3: two containers of 8
    block = SimpleNamespace(stage=3, index=0, counts=counts)
    dense_part = sum(
        2 * (4 * h * w * c * c + 2 * min(4, h) * min(4, w) * h * w * c)
        for (h, w), c in [((16, 16), 16), ((8, 8), 32), ((2, 2), 128)]
    )
    n, c = 16, 64
    # the scorer on 2 x 16 tokens, projections on 14; sequences 5 | 3 (container 0), 6 (container 1)
    spa_part = 2 * n * c + 4 * 14 * c * c + 2 * c * (25 + 9 + 36)
    assert analytic_attention_macs(cfg, [block], (64, 64), batch=2) == dense_part + spa_part


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@settings(max_examples=24, deadline=None)
@given(
    pack=st.sampled_from(["containers", "varlen", "pad", "mask"]),
    position_bias=st.sampled_from(["swin", "none"]),
    selection=st.sampled_from(["topk", "random", "gate", "all"]),
    ratio=st.sampled_from([0.0, 0.1, 0.41, 0.43, 1.0]),
    size=st.sampled_from([(64, 64), (40, 56), (72, 72), (100, 36)]),
    stages=st.sampled_from([(3, 4), (2, 3, 4), (4,)]),
    container_len=st.sampled_from([None, 3, 7]),
    mlp_on=st.sampled_from(["all", "selected"]),
    batch=st.integers(1, 3),
)
def test_the_analytic_column_equals_fvcore_and_follows_the_kept_tokens(
    pack, position_bias, selection, ratio, size, stages, container_len, mlp_on, batch
):
    """The formula and the traced count of the attention modules and gates agree exactly, for any
    strategy, selection, kept fraction, map size (padded, clipped windows) and container length."""
    from harness.task.detector import build_detector

    spa = {"pack": pack, "selection": selection, "ratio": ratio, "container_len": container_len,
           "mlp_on": mlp_on, "position_bias": position_bias}  # fmt: skip
    cfg = trial_from_dict({"preset": "micro", "model": {"spa_stages": list(stages), "spa": spa},
                           "head": {"in_stages": [2, 3, 4]}})  # fmt: skip
    torch.manual_seed(0)
    det = build_detector(cfg).eval()
    images = torch.randn(batch, 3, *size)
    with torch.no_grad():
        blocks = det(images)["backbone"].blocks
    analytic = analytic_attention_macs(cfg, blocks, size, batch)
    assert analytic == fvcore_macs(det, images)["attn"]


@pytest.mark.filterwarnings("ignore")
def test_fvcore_counts_the_real_selection_spa_below_dense():
    from harness.task.detector import build_detector

    images = torch.randn(2, 3, 64, 64)
    macs = {}
    for name, model in (
        ("dense", {"variant": "dense"}),
        ("half", {"spa": {"selection": "topk", "ratio": 0.5}}),
        ("tenth", {"spa": {"selection": "topk", "ratio": 0.1}}),
    ):
        torch.manual_seed(0)
        det = build_detector(_cfg(**model)).eval()
        macs[name] = fvcore_macs(det, images)
    assert macs["tenth"]["backbone"] < macs["half"]["backbone"] < macs["dense"]["backbone"]
    assert macs["tenth"]["total"] < macs["half"]["total"] < macs["dense"]["total"]
    assert 0 < macs["half"]["attn"] < macs["half"]["backbone"] < macs["half"]["total"]
    assert "varlen_attention" not in macs["half"]["unsupported"]  # kernels' handle counts it


def test_timed_reports_median_and_iqr():
    """Calls of known durations (sleeps of 10, 30, 20, 50, 40 ms after two warm-up calls): the median
    is the middle one's, the IQR the spread of the middle half, and the warm-up is left out."""
    sleeps = iter([0.2, 0.2, 0.010, 0.030, 0.020, 0.050, 0.040])
    out = timed(lambda: time.sleep(next(sleeps)), warmup=2, repeats=5, device=torch.device("cpu"))
    assert 30 <= out["median"] < 55  # sleep() overshoots (more on a loaded machine), never undershoots
    assert 10 <= out["iqr"] < 45  # percentiles 25 and 75 of 10..50 ms: 20 and 40


def test_peak_memory_sees_a_big_allocation():
    device = torch.device("cpu")
    reset_peak_memory(device)
    base, kind = peak_memory(device)
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    x += 1
    peak, _ = peak_memory(device)
    assert kind == "rss_peak" and peak >= base + 48


@pytest.mark.filterwarnings("ignore")
def test_paired_speedup_times_the_model_against_its_dense_twin():
    from harness.task.detector import build_detector

    cfg = trial_from_dict(
        {
            "preset": "micro",
            "model": {"spa": {"selection": "topk", "ratio": 0.5}},
            "data": {"image_size": 64, "num_train": 8, "num_val": 4},
            "bench": {"batch_size": 2, "warmup": 1, "repeats": 5},
        }
    )
    twin = dense_twin_config(cfg)
    assert twin.model.is_dense and twin.model.spa is None and not cfg.model.is_dense
    assert (twin.model.depths, twin.model.embed_dim, twin.data, twin.bench) == (
        cfg.model.depths,
        cfg.model.embed_dim,
        cfg.data,
        cfg.bench,
    )
    assert not any(type(m).__name__ == "SPABlock" for m in build_detector(twin).modules())

    torch.manual_seed(0)
    det = build_detector(cfg).train()
    out = paired_speedup(cfg, SimpleNamespace(device=torch.device("cpu")), det)
    assert out["paired_repeats"] == 5 and out["paired_model_ms"] > 0 and out["paired_dense_ms"] > 0
    assert 0 < out["speedup_vs_dense_q1"] <= out["speedup_vs_dense"] <= out["speedup_vs_dense_q3"]
    assert out["speedup_baseline"] == DENSE_TWIN  # no grid baseline attached
    assert det.training  # its mode restored
    assert paired_speedup(twin, SimpleNamespace(device=torch.device("cpu")), det) == {}  # dense: no twin


@pytest.mark.filterwarnings("ignore")
def test_paired_speedup_times_the_model_against_the_grids_baseline(monkeypatch):
    """A variant with extra stage-3 blocks is timed against the grid's dense point (without them), not
    against its own dense twin (with them)."""
    import harness.task.detector as detector_mod
    import harness.task.measure as measure_mod

    cfg = trial_from_dict(
        {
            "preset": "micro",
            "model": {"extra_stage3_blocks": 2, "spa": {"selection": "topk"}},
            "data": {"image_size": 64, "num_train": 8, "num_val": 4},
            "bench": {"batch_size": 2, "warmup": 0, "repeats": 2},
        }
    )
    dense = trial_from_dict({"preset": "micro", "model": {"variant": "dense"}})
    cfg.baseline = BaselineConfig(name="swin", model=dense.model, head=dense.head)
    twin, name = speedup_baseline_config(cfg)
    assert name == "swin" and twin.model == dense.model and twin.head == dense.head and twin.data == cfg.data
    assert twin.baseline is None and dense_twin_config(cfg).model.extra_stage3_blocks == 2

    built = []
    real = detector_mod.build_detector
    monkeypatch.setattr(measure_mod, "build_detector", lambda c: built.append(c) or real(c))
    det = real(cfg)
    out = paired_speedup(cfg, SimpleNamespace(device=torch.device("cpu")), det, torch.randn(2, 3, 64, 64))
    assert out["speedup_baseline"] == "swin" and out["speedup_vs_dense"] > 0
    assert [c.model for c in built] == [dense.model]  # the twin timed is the baseline's model


@pytest.mark.filterwarnings("ignore")
def test_fvcore_counts_every_stage_the_forward_computes():
    """The trace keeps the features the head does not read: the eager forward computes them (a
    trace drops work whose result reaches no output)."""
    from fvcore.nn import FlopCountAnalysis

    import kernels
    from harness.task.detector import build_detector
    from spa_core.backbone import BackboneFeatures

    cfg = trial_from_dict(
        {
            "preset": "micro",
            "model": {"variant": "dense"},
            "head": {"in_stages": [2, 3]},
            "data": {"image_size": 64},
        }
    )
    torch.manual_seed(0)
    det = build_detector(cfg).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fca = FlopCountAnalysis(BackboneFeatures(det.backbone), (images,)).set_op_handle(
            **kernels.FVCORE_HANDLES
        )
        backbone = fca.total()  # all four stages
    macs = fvcore_macs(det, images)
    assert macs["backbone"] == backbone
    assert macs["total"] > backbone


def test_a_plugin_pack_strategy_brings_its_own_flop_formula_into_the_row():
    """A pack strategy registered by a plugin is counted by its own formula in the trial's
    analytic column; the Swin blocks keep W-MSA's."""
    import dataclasses

    from spa_core.attention import attend_varlen
    from spa_core.pack import pack_varlen
    from spa_core.registry import PACK_STRATEGIES
    from spa_core.strategies import PackStrategy

    seen = []

    def formula(counts, n, c, container_len):
        seen.append((list(counts), n, c, container_len))
        return 1000.0 * sum(counts)

    def pack(x, mask, *, cfg, order=None):
        return dataclasses.replace(pack_varlen(x, mask, cfg=cfg, order=order), strategy="plugin_formula")

    PACK_STRATEGIES.register("plugin_formula", PackStrategy(pack, attend_varlen, formula))
    seen.clear()  # the registration's probe called it once (spa_core.contracts)
    try:
        cfg = _cfg(spa_stages=[3], spa={"pack": "plugin_formula"})
        block = SimpleNamespace(stage=3, index=0, counts=torch.tensor([5, 9]))
        dense_part = sum(
            2 * (4 * h * w * c * c + 2 * min(4, h) * min(4, w) * h * w * c)
            for (h, w), c in zip([(16, 16), (8, 8), (2, 2)], [16, 32, 128])
        )
        gate = 2 * 16 * 64  # the scorer over 2 images of 16 tokens, 64 channels
        assert analytic_attention_macs(cfg, [block], (64, 64), batch=2) == dense_part + gate + 14000.0
        assert seen == [([5, 9], 16, 64, 16)]  # stage 3 of micro at 64 px: 4x4 tokens, 64 channels, L = 4^2
    finally:
        PACK_STRATEGIES.unregister("plugin_formula")


# --- the speedup times what SPA changes, not how far a model trained ---------------------------------------


def _keep_all_cfg(repeats: int = 3):
    return trial_from_dict(
        {
            "preset": "micro",
            "model": {"spa": {"selection": "all"}},
            "data": {"image_size": 64, "num_train": 8, "num_val": 8},
            "bench": {"batch_size": 8, "warmup": 1, "repeats": repeats, "train_step": False},
        }
    )


@pytest.fixture
def postprocess_calls(monkeypatch):
    """Every call of the detector's postprocessing (score threshold and NMS), counted."""
    import harness.task.detector as detector_mod

    calls = []
    real = detector_mod.fcos_postprocess

    def counted(*args, **kwargs):
        calls.append(kwargs.get("score_thresh"))
        return real(*args, **kwargs)

    monkeypatch.setattr(detector_mod, "fcos_postprocess", counted)
    return calls


@pytest.mark.filterwarnings("ignore")
def test_the_timed_forward_never_runs_the_postprocessing(postprocess_calls):
    """``paired_speedup`` times the backbone and head of both models and never the score threshold and
    NMS, whose cost follows how many boxes a head lets through; ``measure`` calls them only for
    ``infer_ms`` (the whole inference call, by design) and once to read the kept counts."""
    from contextlib import nullcontext

    from harness.task.detector import build_detector
    from harness.task.measure import SPEEDUP_TIMED, measure

    cfg = _keep_all_cfg()
    det = build_detector(cfg).eval()
    images = torch.randn(8, 3, 64, 64)
    out = paired_speedup(cfg, SimpleNamespace(device=torch.device("cpu")), det, images)
    assert postprocess_calls == [] and out["speedup_timed"] == SPEEDUP_TIMED == "backbone+head"
    backend = SimpleNamespace(
        device=torch.device("cpu"), engine=det, world_size=1, gathered_parameters=nullcontext
    )
    row = measure(cfg, backend, det)
    bc = cfg.bench
    assert len(postprocess_calls) == (bc.warmup + bc.repeats) + 1  # infer_ms's calls and the kept counts
    assert row["forward_ms"] > 0 and row["infer_ms"] > 0 and row["speedup_timed"] == "backbone+head"


@pytest.mark.filterwarnings("ignore")
def test_the_bench_times_every_grid_model_without_postprocessing(postprocess_calls, tmp_path):
    from harness.bench.common import Timing
    from harness.bench.grid import GridRunner

    grid = tmp_path / "g.yaml"
    grid.write_text(
        "base: {preset: micro, data: {image_size: 64, num_train: 8, num_val: 4}, bench: {batch_size: 2}}\n"
        "points:\n  - {name: dense, model.variant: dense}\n  - {name: keep-all, model.spa.selection: all}\n"
    )
    rows = list(GridRunner(grid, Timing(reps=3, warmup=1)).rows())
    assert [r["model"] for r in rows] == ["dense", "keep-all"]
    assert len(postprocess_calls) == 2  # one inference call per model for its kept fraction, none timed


@pytest.mark.filterwarnings("ignore")
def test_the_speedup_of_keep_all_does_not_move_with_how_many_boxes_pass_the_threshold():
    """Keep-all against dense, the model letting every box through to NMS (score threshold 0, what an
    untrained head does at 0.05) or none (threshold above 1, a trained head on an empty image). Here
    postprocessing 800 boxes costs about twice the forward (25 ms of CPU against 13), so a speedup
    timing the whole inference call moves by about 2.8x between the two; timing the forward, it moves
    by noise only. Timed in CPU time on one thread (on a shared 2-core machine wall time is mostly
    waiting, and a second torch thread spinning while it waits adds CPU time: the forward took 800 ms
    of wall and 240 ms of CPU for 13 ms of work under a load of 18), three calls each, alternated,
    medians compared within 1.6x. Measured so with the whole inference call timed instead: 0.93x
    with every box, 2.5x with none; with the forward: 0.88x and 0.88x."""
    from harness.task.detector import build_detector

    cfg = _keep_all_cfg(repeats=9)
    det = build_detector(cfg).eval()
    images = torch.randn(8, 3, 64, 64)
    backend = SimpleNamespace(device=torch.device("cpu"))
    boxes, speedups = {}, {"many": [], "none": []}
    threads = torch.get_num_threads()
    for threshold, load in ((0.0, "many"), (1.01, "none")):
        det.score_thresh = threshold
        with torch.no_grad():
            boxes[load] = sum(len(d["boxes"]) for d in det(images)["detections"])
    assert boxes["many"] >= 8 * 50 and boxes["none"] == 0  # the two loads differ as training makes them
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            for threshold, load in ((0.0, "many"), (1.01, "none")):
                det.score_thresh = threshold
                out = paired_speedup(cfg, backend, det, images, clock=time.process_time)
                speedups[load].append(out["speedup_vs_dense"])
    finally:
        torch.set_num_threads(threads)
    many, none = np.median(speedups["many"]), np.median(speedups["none"])
    assert 1 / 1.6 < many / none < 1.6, speedups
