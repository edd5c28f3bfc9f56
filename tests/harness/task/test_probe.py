"""harness/task/probe.py: one batch forward, backward and FLOP trace before training; a stage that
fails is named, and the probe changes nothing the trial then does."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config import trial_from_dict
from harness.errors import describe
from harness.plugins import isolated_registries, load_plugins
from harness.task.probe import probe

PLUGIN = Path(__file__).parents[1] / "run" / "plugins" / "probe_failures.py"


def _cfg(cache, **spa):
    return trial_from_dict(
        {
            "preset": "micro",
            "model": {"spa": {"selection": "topk", "ratio": 0.5, **spa}},
            "train": {"steps": 1, "batch_size": 2, "warmup_steps": 1},
            "data": {"num_train": 4, "num_val": 2, "image_size": 64, "cache_dir": str(cache)},
            "bench": {"batch_size": 2},
        }
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture
def plugin():
    with isolated_registries():
        load_plugins([str(PLUGIN)])
        yield


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "selection, stage, error",
    [
        ("fails_forward", "forward", IndexError),
        ("fails_backward", "backward", RuntimeError),
        ("round_topk", "FLOP trace", TypeError),
    ],
)
def test_the_stage_that_fails_is_named_with_the_plugin_line(cache, plugin, selection, stage, error):
    with pytest.raises(error) as info:
        probe(_cfg(cache, selection=selection), torch.device("cpu"))
    line = describe(info.value).splitlines()[0]
    assert f"probe before training: {stage} of one batch" in line
    assert f"{PLUGIN}:" in line  # the plugin's own line


@pytest.mark.filterwarnings("ignore")
def test_a_sound_variant_passes_and_the_probe_leaves_every_rng_as_it_was(cache):
    cfg = _cfg(cache, selection="random")  # draws from its generator; the dense twin is untouched
    cfg.model.drop_path_rate = 0.3  # stochastic depth draws from torch's global generator
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)  # noqa: NPY002 (the legacy global state is what the probe must keep)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())  # noqa: NPY002
    out = probe(cfg, torch.device("cpu"))
    assert out["probe_s"] > 0
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])  # noqa: NPY002
