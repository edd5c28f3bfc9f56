"""harness/run/placement.py: where a trial's Ray Train workers go. A trial of several GPU workers
is packed strictly on one node (the Tune trial's group and Ray Train's); CPU trials may spread."""

import pytest

from harness.config import config_hash, trial_from_dict
from harness.run import trial as trial_mod
from harness.run.placement import placement_strategy
from harness.run.rows import RunInfo, TrialSpec
from harness.run.runner import trial_placement_group
from harness.run.trial import TrialContext
from harness.run.worker import WorkerJob
from tests.harness.run._fake_trainer import install_fake_trainer


def _cfg(workers, gpus):
    return trial_from_dict(
        {"preset": "micro", "resources": {"workers": workers, "gpus_per_worker": gpus, "cpus_per_worker": 8}}
    )


@pytest.mark.parametrize(
    "workers, gpus, strategy",
    [(8, 1, "STRICT_PACK"), (2, 0.5, "STRICT_PACK"), (2, 0, "PACK"), (1, 1, "PACK"), (1, 0, "PACK")],
)
def test_several_gpu_workers_are_packed_on_one_node(workers, gpus, strategy):
    cfg = _cfg(workers, gpus)
    assert placement_strategy(cfg) == strategy
    assert trial_placement_group(cfg).strategy == strategy


@pytest.mark.parametrize("gpus, strategy", [(1, "STRICT_PACK"), (0, "PACK")])
def test_ray_train_gets_the_strategy(tmp_path, monkeypatch, gpus, strategy):
    seen = install_fake_trainer(monkeypatch)
    cfg = _cfg(8, gpus)
    job = WorkerJob(TrialSpec(cfg, config_hash(cfg)), str(tmp_path), "exp", launched=0.0)
    trial_mod._fit_ray_train(job, TrialContext(str(tmp_path), "exp", RunInfo("r", "c")), attempt=1)
    assert seen["scaling_config"].placement_strategy == strategy and seen["scaling_config"].num_workers == 8
    assert seen["torch_config"].backend == ("nccl" if gpus else "gloo")
