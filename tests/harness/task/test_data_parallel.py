"""Two data-parallel ranks under DeepSpeed ZeRO-1 and ZeRO-2 (gloo on CPU, child processes): each rank
draws its own per-step randomness from the same initial weights, a rank that keeps no token does
not hang and its parameters get the same gradients' set, and a sharded evaluation scores exactly
what one process scores.

Each scenario starts two Python processes that import torch and DeepSpeed: about a minute each on
a loaded 2-core machine, so the module is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from _ranks import launch

from harness.config import trial_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

TIMEOUT_S = 600.0  # two ranks starting DeepSpeed on a loaded 2-core machine; a hang ends here


def _cfg_dict(cache, stage, **over) -> dict:
    base = {
        "preset": "micro",
        "seed": 3,
        "model": {"drop_path_rate": 0.3, "spa": {"selection": "random", "ratio": 0.5}},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "zero_stage": stage, "eval_images": 4},
        "data": {"num_train": 8, "num_val": 6, "image_size": 64, "cache_dir": str(cache), "num_workers": 1},
    }
    for k, v in over.items():
        base[k] = {**base[k], **v}
    return base


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The built-in set, made once here (not by two ranks at once)."""
    from harness.task.data import build_datasets

    path = tmp_path_factory.mktemp("dp-cache")
    build_datasets(trial_from_dict(_cfg_dict(path, 1)).data, progress=False)
    return path


@pytest.mark.parametrize("stage", [1, 2])
def test_ranks_draw_their_own_masks_noise_and_workers_from_shared_weights(tmp_path, cache, stage):
    ranks = launch("train", 2, tmp_path, {"cfg": _cfg_dict(cache, stage)}, TIMEOUT_S)
    assert ranks is not None, "the ranks did not finish"
    r0, r1 = ranks
    assert r0["checksum"] == r1["checksum"]  # the same initial weights
    assert len(r0["masks"]) == len(r1["masks"]) > 0
    # the random policy's draws depend on its generator only: the same stream would give equal masks
    assert any(not torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"]))
    assert not torch.equal(r0["rng"], r1["rng"])  # stochastic depth's global RNG
    assert None not in r0["worker_seeds"] + r1["worker_seeds"]
    assert set(r0["worker_seeds"]).isdisjoint(r1["worker_seeds"])  # the loader workers' augmentation
    for name, p in r0["final"].items():  # data parallel: still one model after training
        assert torch.equal(p, r1["final"][name]), name
    assert r0["metrics"]["map"] == r1["metrics"]["map"]  # scored once, handed to every rank


@pytest.mark.parametrize("stage", [1, 2])
def test_a_rank_that_keeps_no_token_does_not_hang_and_grads_the_same_parameters(tmp_path, cache, stage):
    """Rank 1 keeps no token in any SPA block, rank 0 half of them (images without objects do this
    to a gate). Both ranks must give a gradient to the same parameters (the attention of an empty
    pack still reaches its position-bias table), else ZeRO's gradient buckets differ between ranks
    (gloo then reports a collective size mismatch; NCCL may hang). Needs spa_core's empty-pack
    gradient (the kernel branch's ``empty_output``): without it this test fails."""
    cfg = _cfg_dict(
        cache, stage, model={"drop_path_rate": 0.0, "spa": {"selection": "keeps_nothing_on_rank_1"}}
    )
    cfg["data"]["num_workers"] = 0
    ranks = launch("zero_kept", 2, tmp_path, {"cfg": cfg}, TIMEOUT_S)
    assert ranks is not None, "a rank whose images keep no token hung the collective"
    r0, r1 = ranks
    assert all(m.any() for m in r0["masks"]) and not any(m.any() for m in r1["masks"])
    assert r1["grads"] == r0["grads"], sorted(r0["grads"] ^ r1["grads"])
    tables = {n for n in r0["params"] if n.endswith("relative_position_bias_table")}
    assert tables and tables <= r1["grads"]  # what an empty pack's attention used to leave out
    for name, p in r0["final"].items():
        assert torch.equal(p, r1["final"][name]), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_evaluation_equals_one_process(tmp_path, cache, stage):
    """Five images in batches of 2 on two ranks: rank 0 gets batches 0 and 2, rank 1 batch 1 (and
    under ZeRO-3 runs it again, discarded, so the collective forwards match)."""
    from harness.task.data import build_datasets
    from harness.task.detector import build_detector
    from harness.task.train import evaluate_variant, train_variant

    d = _cfg_dict(cache, stage, model={"drop_path_rate": 0.0, "spa": {"selection": "gate"}})
    d["train"].update(eval_images=5, steps=12)
    d["data"]["num_workers"] = 0
    cfg = trial_from_dict(d)
    # weights worth scoring: a few steps in this process, then the same weights everywhere
    model = build_detector(cfg)
    real = train_variant.__globals__["build_detector"]
    train_variant.__globals__["build_detector"] = lambda c, **kw: model
    try:
        train_variant(cfg, progress=False)
    finally:
        train_variant.__globals__["build_detector"] = real
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    _, val = build_datasets(cfg.data, progress=False)
    one = evaluate_variant(model, val, cfg)
    ranks = launch("evaluate", 2, tmp_path, {"cfg": d, "weights": str(tmp_path / "weights.pt")}, TIMEOUT_S)
    assert ranks is not None, "the sharded evaluation hung"
    ids = ranks[0]["ids"]
    batch = [ids[0:2], ids[2:4], ids[4:5]]
    assert ranks[0]["forwards"] == [batch[0], batch[2]]  # batches dealt round-robin...
    assert ranks[1]["forwards"] == [batch[1]] + ([batch[1]] if stage == 3 else [])  # ...ZeRO-3 in step
    assert [r["scored"] for r in ranks] == [1, 0]  # COCOeval once, on rank 0
    for r in ranks:
        got = r["metrics"]
        assert got.keys() == one.keys()
        for k, v in one.items():
            assert got[k] == v or (math.isnan(got[k]) and math.isnan(v)), (k, got[k], v)
    assert one["map_50"] > 0 and one["eval_images"] == 5 and 0 < one["kept_fraction"] < 1
