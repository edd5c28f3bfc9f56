"""A real two-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head and one added
node, each its own raylet): the smoke grid submitted as a Ray job (docs/cluster.md) lands every row
in a shared store, and a trial whose node dies mid-run is retried to ``done`` without waiting on
what its dead attempt held. Token authentication is as this machine has it (on when
``~/.ray/auth_token`` exists)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.results import load, trial_states

ROOT = Path(__file__).resolve().parents[3]
SMOKE = "ablations/grids/smoke.yaml"

# The "cluster" xdist group runs these clusters on one worker, one at a time (scripts/test.sh); an
# embedded Ray of the "ray" group may run beside them (Ray picks free ports for both).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]


@pytest.fixture
def cluster_factory(monkeypatch):
    """Start ``Cluster(head_args, *node_args)`` bound to 127.0.0.1; shut down after the test."""
    import ray._private.ray_constants as ray_constants
    import ray._private.utils as ray_utils
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1, not the routable IP
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started, temp_dirs = [], []

    def _own_temp_dir() -> str:
        # Nodes on one machine share Ray's temp dir by default, and with it the job's unpacked
        # working_dir: the first node to finish with it deletes it under the others.
        # Short, under /tmp: Ray's socket paths inside it must stay under 107 bytes.
        temp_dirs.append(tempfile.mkdtemp(prefix="spa-ray-", dir="/tmp"))
        return temp_dirs[-1]

    def make(head: dict, *nodes: dict):
        # Nodes sharing 127.0.0.1 need ports of their own (the dashboard agents' default is one port).
        head_dir = _own_temp_dir()
        cluster = Cluster(
            initialize_head=True, head_node_args={**_local_node(), "temp_dir": head_dir, **head}
        )
        started.append(cluster)
        # The head too has a temp dir of its own (docs/cluster.md: every node its own), so nothing of
        # this cluster's is in /tmp/ray beside the embedded Rays of the other test worker. A job's
        # driver finds its cluster by "auto": the address file in the head's temp dir, written here as
        # `ray start --head --temp-dir` writes it (Cluster writes it to /tmp/ray); without it "auto"
        # takes any GCS running on the machine.
        ray_utils.write_ray_address(cluster.gcs_address, head_dir)
        added = [cluster.add_node(**_local_node(), temp_dir=_own_temp_dir(), **n) for n in nodes]
        cluster.wait_for_nodes()
        return cluster, added

    yield make
    for cluster in started:
        cluster.shutdown()
    for path in temp_dirs:
        shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_node() -> dict:
    return {
        "node_ip_address": "127.0.0.1",
        "dashboard_agent_listen_port": _free_port(),
        "metrics_export_port": _free_port(),
    }


def _head_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def test_smoke_grid_as_a_ray_job_runs_on_both_nodes_into_a_shared_store(cluster_factory, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # One CPU per node: the 2-worker trial can only run with a worker on each node. The largest trial
    # takes the whole cluster, so trials run one at a time and each Tune function's node is Ray's choice.
    cluster, _ = cluster_factory(
        dict(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0),
        dict(num_cpus=1),
    )
    client = JobSubmissionClient("http://" + cluster.head_node.address_info["webui_url"])
    commit = _head_commit() or "0" * 40

    def run_job(store: Path) -> tuple[object, str]:
        submit = dict(
            entrypoint=f"{sys.executable} -m harness.cli run {SMOKE} --smoke --results file://{store} "
            "--no-progress --no-report",
            runtime_env={
                "working_dir": str(ROOT),
                "excludes": [".git", "results", "*.egg-info"],
                "env_vars": {
                    "DS_ACCELERATOR": "cpu",
                    "SPA_HARNESS_GIT_COMMIT": commit,
                    "SPA_HARNESS_CACHE": str(tmp_path / "cache"),
                },
            },
        )
        for _ in range(60):  # the head's job agent comes up a little after the node
            try:
                job = client.submit_job(**submit)
                break
            except RuntimeError as e:
                if "No available agent" not in str(e):
                    raise
                time.sleep(1)
        deadline = time.time() + 600
        while not client.get_job_status(job).is_terminal():
            assert time.time() < deadline, client.get_job_logs(job)[-3000:]
            time.sleep(2)
        return client.get_job_status(job), client.get_job_logs(job)

    # one folder both nodes see (they share this machine's disk)
    store = tmp_path / "results"
    status, logs = run_job(store)
    if status == JobStatus.FAILED and "Failed to download runtime_env file package" in logs:
        # Ray's own GCS package store lost the uploaded working_dir under a running job once in CI
        # (ray-project/ray#36703, open upstream; not reproduced here): the submission is Ray's, so it
        # gets one more, into a fresh store. Any other failure, or this one twice, fails the test.
        store = tmp_path / "results-resubmitted"
        status, logs = run_job(store)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "smoke: 3 done" in logs
    df = load(store / "smoke")
    assert sorted(df["status"]) == ["done"] * 3
    assert df["node_id"].notna().all() and df["hostname"].notna().all()
    assert all(isinstance(n, str) and len(n) == 56 for n in df["node_id"])  # Ray's hex node ids
    assert set(df["node_id"]) <= {n.node_id for n in cluster.list_all_nodes()}, df[["name", "node_id"]]
    # the job's working_dir has no .git: the commit comes from the runtime env
    assert set(df["git_commit"]) == {commit}
    assert {s["state"] for s in trial_states(store / "smoke")} == {"done"}


NODE_LOSS_GRID = """\
name: nodeloss
base:
  preset: micro
  model.variant: dense
  data: {image_size: 64, num_train: 48, num_val: 16}
  train: {steps: 40, batch_size: 4, warmup_steps: 1, log_every: 10}
  bench: {batch_size: 2, warmup: 1, repeats: 2}
resources: {workers: 2, cpus_per_worker: 1, timeout_s: 400, retries: 1}
points:
  - name: dp2
seeds: 1
"""


@pytest.mark.parametrize("replaced", [True, False], ids=["node-replaced", "node-gone"])
def test_a_trial_whose_node_dies_is_retried_or_fails_with_rays_error_inside_its_timeout(
    cluster_factory, tmp_path, monkeypatch, replaced
):
    """The node goes once rank 0 started. Replaced: the retry runs to done. Gone for good: the retry's
    worker group cannot start, and the trial fails with Ray Train's error after the start timeout
    (not after Ray Train's endless startup retries, which would outlast the trial's timeout_s)."""
    import ray

    # A retry whose workers cannot start gives up after this, instead of Ray Train's endless retries.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    cluster, (node,) = cluster_factory(dict(num_cpus=1), dict(num_cpus=1))
    grid = tmp_path / "nodeloss.yaml"
    grid.write_text(NODE_LOSS_GRID)
    store = tmp_path / "results"
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "SPA_HARNESS_CACHE": str(tmp_path / "cache")}
    t0 = time.time()
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            str(grid),
            "--results",
            f"file://{store}",
            "--no-progress",
            "--no-report",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # The 2-worker group spans both nodes (one CPU each); once rank 0 started, the node goes.
        trials = store / "nodeloss" / "trials"
        while not list(trials.glob("*/placement_groups.json")):
            assert driver.poll() is None and time.time() - t0 < 300, (
                driver.stdout.read() if driver.poll() else ""
            )
            time.sleep(0.5)
        cluster.remove_node(node, allow_graceful=False)
        if replaced:
            cluster.add_node(**_local_node(), num_cpus=1)
        out, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
    wall = time.time() - t0
    row = load(store / "nodeloss").iloc[0]
    assert wall < 400, wall  # the retry did not wait out the trial timeout on the dead attempt
    assert row["ray_version"] == ray.__version__ and row["attempt"] == 2
    if replaced:
        assert driver.returncode == 0 and row["status"] == "done", out[-4000:]
    else:
        assert driver.returncode == 1 and row["status"] == "failed", out[-4000:]
        assert "without an error report" not in row["error"]
        assert "worker group startup timed out" in row["error"], row["error"]  # Ray Train's own words
