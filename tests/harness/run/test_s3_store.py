"""The results store on an object store: an S3 server (moto) on 127.0.0.1, reached through the
pyarrow filesystem of an ``s3://`` URI, as a cluster run's store is (docs/cluster.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.results import Experiment, ResultsStore, join_uri, load, split_uri, trial_states

ROOT = Path(__file__).resolve().parents[3]
SMOKE = ROOT / "ablations" / "grids" / "smoke.yaml"
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 with one bucket; its endpoint ``host:port``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="spa")
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_uri(s3_server, monkeypatch, request):
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    prefix = request.node.name.replace("[", "-").replace("]", "")
    return f"s3://spa/{prefix}?endpoint_override={s3_server}&scheme=http&region=us-east-1"


def test_uri_joins_keep_the_query_at_the_end():
    uri = "s3://b/p?endpoint_override=h:1&scheme=http"
    assert join_uri(uri, "e", "trials") == "s3://b/p/e/trials?endpoint_override=h:1&scheme=http"
    assert split_uri(join_uri(uri, "e")) == (uri, "e")
    assert join_uri("/a/b", "c") == "/a/b/c"


def test_rows_written_to_s3_read_back_as_done_failed_and_pending(s3_uri):
    exp = ResultsStore(s3_uri).experiment("grid")
    exp.write_manifest(
        {
            "name": "grid",
            "trials": [{"name": n, "config_hash": h} for n, h in (("a", "h1"), ("b", "h2"), ("c", "h3"))],
        }
    )
    exp.write_row("h1", {"name": "a", "config_hash": "h1", "status": "done", "gmacs": 1.5, "wall_s": 2.0})
    exp.write_row(
        "h2",
        {
            "name": "b",
            "config_hash": "h2",
            "status": "failed",
            "gmacs": None,
            "error": "ActorDiedError: the node died",
        },
    )
    assert ResultsStore(s3_uri).experiments() == ["grid"]
    assert exp.read_row("h1")["gmacs"] == 1.5
    states = {s["name"]: s for s in trial_states(s3_uri)}
    assert {n: s["state"] for n, s in states.items()} == {"a": "done", "b": "failed", "c": "pending"}
    assert states["b"]["detail"] == "ActorDiedError: the node died"
    # one experiment's own URI reads the same
    assert [s["state"] for s in trial_states(exp.uri)] == ["done", "failed", "pending"]
    df = load(s3_uri)
    assert sorted(df["status"]) == ["done", "failed"]
    assert set(load(exp.uri)["config_hash"]) == {"h1", "h2"}
    assert Experiment(*split_uri(exp.uri)).read_row("h2")["status"] == "failed"


def _cli(*args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_on_a_cluster_refuses_a_local_results_path(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # never reached: refused before Ray starts
    p = _cli("run", SMOKE, "--results", tmp_path / "results", "--smoke", env=env, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "path on this machine only" in lines[0] and "--results-shared" in lines[0]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("results", ["s3://bucket/spa", "file:///shared/spa", "SHARED"])
def test_results_every_node_sees_are_accepted_on_a_cluster(results, tmp_path):
    from harness.run.runner import results_problem

    shared = results == "SHARED"
    assert results_problem(str(tmp_path) if shared else results, "head:6379", shared=shared) is None
    assert results_problem(str(tmp_path), None) is None  # embedded Ray: every trial runs here
    assert "absolute path" in results_problem("file://results", "head:6379")


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one Ray at a time (scripts/test.sh)
def test_smoke_grid_on_embedded_ray_into_s3_finishes_every_row(s3_uri, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS, DS_ACCELERATOR="cpu", SPA_HARNESS_CACHE=str(tmp_path / "cache"))
    p = _cli("run", SMOKE, "--results", s3_uri, "--smoke", "--no-progress", "--no-report", env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "3 done" in p.stdout
    df = load(s3_uri)
    assert sorted(df["status"]) == ["done"] * 3
    assert df["node_id"].notna().all() and df["hostname"].notna().all()
    assert {s["state"] for s in trial_states(s3_uri)} == {"done"}
