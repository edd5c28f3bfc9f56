"""harness/task/checkpoint.py with train_variant: a run interrupted after a checkpoint and run again
resumes there and ends with the uninterrupted run's numbers; on a local folder and on an object
store (an S3 server, moto, on 127.0.0.1). Each trains the micro preset three times: slow on a shared
2-core machine (30 s of CPU, 2 minutes of wall time seen)."""

from __future__ import annotations

import json
import math

import pytest

from harness.config import trial_from_dict
from harness.task.checkpoint import Checkpointer
from harness.task.train import train_variant

pytestmark = pytest.mark.filterwarnings("ignore")

# The numbers a resumed run must give exactly as the uninterrupted one does.
COMPARED = ("task_loss", "gate_loss", "map", "map_50", "gate_recall", "gate_precision", "kept_fraction")


class _Interrupted(Exception):
    pass


def _cfg(cache, steps=7, accum=1):
    return trial_from_dict(
        {
            "preset": "micro",
            "seed": 4,
            # random selection draws from its block's generator, stochastic depth from torch's RNG
            "model": {"drop_path_rate": 0.3, "spa": {"selection": "random", "ratio": 0.5}},
            "train": {
                "steps": steps,
                "batch_size": 2,
                "grad_accum": accum,
                "warmup_steps": 2,
                "log_every": 1,
            },
            # 5 training images: 2 batches per epoch, so the run resumes across epochs
            "data": {"num_train": 5, "num_val": 4, "image_size": 64, "cache_dir": str(cache)},
        }
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt-cache")


def _backend(kind):
    if kind == "torch":
        from harness.task.backend import TorchBackend

        return TorchBackend("cpu")
    from harness.task.distributed import DeepSpeedBackend

    return DeepSpeedBackend()


def _interrupted_then_resumed(cfg, uri, kind, stop_at):
    """Train with checkpoints every 2 optimizer steps, stopped at micro-step ``stop_at``, then again."""

    def stop(step, metrics):
        if step == stop_at:
            raise _Interrupted

    ckpt = Checkpointer(uri, every=2)
    with pytest.raises(_Interrupted):
        train_variant(cfg, backend=_backend(kind), progress=False, on_log=stop, checkpoints=ckpt)
    marker = ckpt.latest()
    resumed = train_variant(
        cfg, backend=_backend(kind), progress=False, checkpoints=Checkpointer(uri, every=2)
    )
    return marker, resumed


def _same(a, b):
    for k in COMPARED:
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


@pytest.mark.slow
@pytest.mark.parametrize("kind, accum", [("torch", 1), ("deepspeed", 1), ("deepspeed", 2)])
def test_an_interrupted_run_resumes_at_its_checkpoint_with_the_same_result(
    tmp_path, cache, kind, accum, request
):
    if kind == "deepspeed":
        request.getfixturevalue("one_process_group")
    cfg = _cfg(cache, accum=accum)
    plain = train_variant(cfg, backend=_backend(kind), progress=False)
    assert plain["resumed_step"] == 0
    marker, resumed = _interrupted_then_resumed(cfg, str(tmp_path / "ckpt"), kind, stop_at=5 * accum + 1)
    assert marker["optimizer_step"] == 4 and marker["micro_step"] == 4 * accum  # the last before the stop
    assert resumed["resumed_step"] == 4 and resumed["steps"] == 7
    _same(plain, resumed)
    # only the last checkpoint is kept (step 7, the end of training)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step00000007"]
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["optimizer_step"] == 7


@pytest.mark.slow
def test_a_finished_trainings_checkpoint_skips_training(tmp_path, cache):
    """A trial whose evaluation failed after training resumes at its last step: no step is run."""
    cfg = _cfg(cache, steps=3)
    first = train_variant(
        cfg, backend=_backend("torch"), progress=False, checkpoints=Checkpointer(str(tmp_path), 5)
    )
    again = train_variant(
        cfg, backend=_backend("torch"), progress=False, checkpoints=Checkpointer(str(tmp_path), 5)
    )
    assert again["resumed_step"] == 3 and again["train_time_s"] == pytest.approx(
        first["train_time_s"], abs=0.05
    )
    _same(first, again)
    Checkpointer(str(tmp_path), 5).clear()
    assert not tmp_path.exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_world_size_is_not_resumed(tmp_path, cache, caplog):
    cfg = _cfg(cache, steps=2)
    train_variant(cfg, backend=_backend("torch"), progress=False, checkpoints=Checkpointer(str(tmp_path), 1))
    marker = json.loads((tmp_path / "latest.json").read_text())
    (tmp_path / "latest.json").write_text(json.dumps({**marker, "world_size": 8}))
    out = train_variant(
        cfg, backend=_backend("torch"), progress=False, checkpoints=Checkpointer(str(tmp_path), 1)
    )
    assert out["resumed_step"] == 0 and "saved by 8 ranks, not 1" in caplog.text


@pytest.mark.slow
def test_checkpoints_on_an_object_store(tmp_path, cache, monkeypatch):
    """The store may be s3://: the backend writes to a local folder, each rank uploads its files,
    and a resumed run downloads them."""
    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(
            Bucket="spa"
        )
        uri = f"s3://spa/exp/trials/h/checkpoint?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        cfg = _cfg(cache)
        plain = train_variant(cfg, backend=_backend("torch"), progress=False)
        marker, resumed = _interrupted_then_resumed(cfg, uri, "torch", stop_at=6)
        assert marker["optimizer_step"] == 4 and resumed["resumed_step"] == 4
        _same(plain, resumed)
        fs, path = pafs.FileSystem.from_uri(uri)
        names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))
        assert names == ["latest.json", "step00000007"]
        assert fs.get_file_info(f"{path}/step00000007/train_state.rank0.pt").size > 0
    finally:
        server.stop()


def test_the_interval_is_checked():
    with pytest.raises(ValueError, match="at least 1 optimizer step"):
        Checkpointer("/tmp/x", 0)
    assert Checkpointer("/tmp/x", 3).due(3, 10) and Checkpointer("/tmp/x", 3).due(10, 10)
    assert not Checkpointer("/tmp/x", 3).due(4, 10)
