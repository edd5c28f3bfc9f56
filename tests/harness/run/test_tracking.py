"""harness/run/tracking.py: ``--track`` values, the default MLflow store beside the results, one grid's
runs in an MLflow file store read back with ``MlflowClient``, and (slow) ``spa-harness run
ablations/grids/smoke.yaml --smoke --track mlflow`` on an embedded local Ray, read back the same way."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import flatten_config
from harness.report import write_report_files
from harness.results import ResultsStore
from harness.run import tracking
from harness.run.tracking import TrackingError, TrackingSpec, parse_track

mlflow = pytest.importorskip("mlflow")


def test_parse_track():
    assert parse_track(None) is None
    assert parse_track("mlflow") == TrackingSpec("mlflow", None)
    assert parse_track("MLflow=http://host:5000") == TrackingSpec("mlflow", "http://host:5000")
    assert parse_track("mlflow=sqlite:///a=b.db") == TrackingSpec(
        "mlflow", "sqlite:///a=b.db"
    )  # first '=' only
    with pytest.raises(TrackingError, match="expected one of mlflow, wandb"):
        parse_track("tensorboard")


def test_a_kind_without_its_package_is_a_clear_error(monkeypatch):
    assert parse_track("wandb=team/spa") == TrackingSpec("wandb", "team/spa")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a)
    )
    with pytest.raises(TrackingError, match=r"wandb package is not installed \(pip install"):
        parse_track("wandb")


def test_run_with_a_bad_track_value_exits_2_before_running(tmp_path, capsys):
    from harness.cli import main

    grid = str(Path(__file__).resolve().parents[3] / "ablations" / "grids" / "smoke.yaml")
    assert main(["run", grid, "--results", str(tmp_path), "--track", "tensorboard"]) == 2
    assert "error: --track 'tensorboard': expected one of mlflow, wandb" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # nothing written


def test_default_uri_is_a_file_store_beside_the_results(tmp_path):
    uri = tracking.default_mlflow_uri(str(tmp_path / "results" / "smoke"))
    assert uri == (tmp_path / "results" / "smoke" / "mlruns").as_uri() and uri.startswith("file:")
    assert (
        tracking.default_mlflow_uri((tmp_path / "r" / "e").as_uri())
        == (tmp_path / "r" / "e" / "mlruns").as_uri()
    )
    with pytest.raises(TrackingError, match="--track mlflow=URI"):
        tracking.default_mlflow_uri("s3://bucket/spa/smoke")


def _trial(name, variant, seed=0, ratio=None):
    cfg = {
        "name": name,
        "seed": seed,
        "model": {"variant": variant, "spa": {"ratio": ratio, "selection": "topk"} if ratio else None},
        "train": {"steps": 4, "log_every": 2},
    }
    return cfg


def _row(cfg, h, status="done", **metrics):
    return {
        "name": cfg["name"],
        "seed": cfg["seed"],
        "config_hash": h,
        "status": status,
        "error": None,
        "config_json": json.dumps(cfg),
        **flatten_config(cfg),
        **metrics,
    }


def _log_toy_grid(ref, exp):
    """Two trials that finish (dense, and spa with a curve at steps 2 and 4) and one that fails
    (broken, no curve), then the grid's end: the calls the runner and the trial make."""
    trials = [
        (_trial("dense", "dense"), "h-dense", dict(map=0.30, gmacs=2.0, infer_ms=10.0, kept_fraction=1.0)),
        (
            _trial("spa", "spa", ratio=0.5),
            "h-spa",
            dict(
                map=0.31,
                gmacs=1.5,
                infer_ms=9.0,
                kept_fraction=0.5,
                speedup_vs_dense=1.1,
                gate_recall=math.nan,
            ),
        ),
    ]
    for cfg, h, metrics in trials:
        run_id = tracking.start_trial(ref, cfg, h)
        on_log = tracking.step_logger(ref, run_id)
        for step in (2, 4):
            on_log(
                step,
                {"task_loss": 1.0 / step, "gate_loss": 0.1, "loss": 1.0 / step + 0.1, "kept_fraction": 0.5},
            )
        row = _row(cfg, h, **metrics)
        exp.write_row(h, row)
        tracking.finish_trial(ref, run_id, row, on_log.points)
    failed = _trial("broken", "spa", ratio=0.25)
    run_id = tracking.start_trial(ref, failed, "h-broken")
    row = _row(failed, "h-broken", status="failed", error="RuntimeError: boom", error_type="RuntimeError")
    exp.write_row("h-broken", row)
    tracking.finish_trial(ref, run_id, row)
    tracking.finish_grid(
        ref, exp.uri, {"h-dense": "done", "h-spa": "done", "h-broken": "failed"}, write_report_files
    )


def test_a_grid_in_an_mlflow_file_store(tmp_path):
    exp = ResultsStore(str(tmp_path / "results")).experiment("toy")
    exp.write_manifest({"name": "toy", "source": None})
    ref = tracking.start_grid("mlflow", "toy", exp.uri, harness_run_id="r1", git_commit="abc", trials=2)
    assert ref.uri == (Path(exp.uri) / "mlruns").as_uri()
    _log_toy_grid(ref, exp)

    client = mlflow.tracking.MlflowClient(ref.uri)
    runs = {r.data.tags["mlflow.runName"]: r for r in client.search_runs([ref.experiment_id])}
    assert set(runs) == {"dense", "spa", "broken", "toy r1"}
    spa = runs["spa"]
    assert spa.data.params["model.spa.ratio"] == "0.5" and spa.data.params["train.log_every"] == "2"
    assert runs["dense"].data.params["model.spa"] == "None"
    assert spa.data.metrics["map"] == 0.31 and spa.data.metrics["speedup_vs_dense"] == 1.1
    assert math.isnan(spa.data.metrics["gate_recall"])
    assert (
        "model.spa.ratio" not in spa.data.metrics and "train.steps" not in spa.data.metrics
    )  # config: params
    history = client.get_metric_history(spa.info.run_id, "train/task_loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.25)]
    assert spa.data.metrics["kept_fraction"] == 0.5 and spa.data.metrics["train/kept_fraction"] == 0.5
    assert {k: spa.data.tags[k] for k in ("name", "seed", "config_hash", "status")} == {
        "name": "spa",
        "seed": "0",
        "config_hash": "h-spa",
        "status": "done",
    }
    assert spa.info.status == "FINISHED" and spa.data.tags["mlflow.parentRunId"] == ref.parent_run_id
    broken = runs["broken"]
    assert broken.info.status == "FAILED" and broken.data.tags["status"] == "failed"
    assert broken.data.tags["error"] == "RuntimeError: boom"

    parent = runs["toy r1"]
    assert parent.info.run_id == ref.parent_run_id and parent.info.status == "FAILED"  # one trial failed
    assert parent.data.tags["trials_done"] == "2" and parent.data.tags["trials_failed"] == "1"
    assert "report_error" not in parent.data.tags
    files = {a.path for a in client.list_artifacts(ref.parent_run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/report-plots"} <= files
    html = Path(client.download_artifacts(ref.parent_run_id, "report/report.html", str(tmp_path / "dl")))
    assert "<table" in html.read_text() and "data:image/png;base64," in html.read_text()


def test_a_tracking_failure_inside_a_trial_is_a_warning(tmp_path, caplog):
    ref = tracking.TrackRef("mlflow", (tmp_path / "mlruns").as_uri(), "toy", "12345", "parent", "r1")
    assert tracking.start_trial(ref, _trial("x", "dense"), "h") is None  # no such experiment: no run
    on_log = tracking.step_logger(ref, "no-such-run")
    on_log(2, {"task_loss": 1.0})
    on_log(4, {"task_loss": 0.5})
    assert on_log.points == [(2, {"train/task_loss": 1.0}), (4, {"train/task_loss": 0.5})]
    tracking.finish_trial(ref, "no-such-run", {"status": "done", "map": 0.1})
    warnings = [r.getMessage() for r in caplog.records if r.name == "harness.run.tracking"]
    assert len(warnings) == 3 and all(w.startswith("tracking: cannot") for w in warnings), warnings


_WANDB_KEYS = ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP")


def _offline_wandb_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline, quiet, its settings, cache and artifact staging under ``tmp_path``; its server
    URL is a closed local port, so anything that tries the network fails here instead of leaving."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }


def _read_offline_wandb(folder: Path, env: dict[str, str]) -> dict[str, dict]:
    """The offline runs under ``folder/wandb`` by run name, read with W&B's own reader of its run
    files (``wandb leet inspect --json``): ``record`` (the run record: project, group, job type),
    ``history`` (step -> logged item) and ``final`` (``--summary``: config, summary, tags, state)."""

    def inspect(run_dir: Path, *flags: str) -> str:
        cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_dir)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout

    runs: dict[str, dict] = {}
    for run_dir in sorted((folder / "wandb").glob("offline-run-*")):
        records = [json.loads(line) for line in inspect(run_dir).splitlines() if line.strip()]
        final = json.loads(inspect(run_dir, "--summary"))
        assert final["name"] not in runs, final["name"]
        runs[final["name"]] = {
            "record": next(r["run"] for r in records if r["type"] == "run"),
            "history": {
                r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"
            },
            "artifacts": [r["artifact"] for r in records if r["type"] == "artifact"],
            "final": final,
        }
    return runs


def test_a_grid_in_offline_wandb(tmp_path, monkeypatch):
    for key in _WANDB_KEYS:
        monkeypatch.delenv(key, raising=False)  # offline and the folder beside the results: the defaults
    env = {k: v for k, v in _offline_wandb_env(tmp_path).items() if k != "WANDB_MODE"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    exp = ResultsStore(str(tmp_path / "results")).experiment("toy")
    exp.write_manifest({"name": "toy", "source": None})
    ref = tracking.start_grid(
        "wandb=spa-test", "toy", exp.uri, harness_run_id="r1", git_commit="abc", trials=3
    )
    assert (ref.uri, ref.mode, ref.dir) == ("spa-test", "offline", str(Path(exp.uri).resolve()))
    _log_toy_grid(ref, exp)

    runs = _read_offline_wandb(Path(exp.uri), {**os.environ, **env})
    assert set(runs) == {"dense", "spa", "broken", "toy r1"}
    for name, run in runs.items():
        assert (run["record"]["project"], run["record"]["run_group"]) == ("spa-test", "toy-r1"), name
        assert run["record"]["job_type"] == ("grid" if name == "toy r1" else "trial"), name
    spa, dense, broken = runs["spa"]["final"], runs["dense"]["final"], runs["broken"]["final"]
    assert spa["config"]["model.spa.ratio"] == 0.5 and spa["config"]["train.log_every"] == 2
    assert dense["config"]["model.spa"] is None and dense["config"]["model.variant"] == "dense"
    assert spa["config"]["harness"] == {
        "config_hash": "h-spa",
        "experiment": "toy",
        "harness_run_id": "r1",
        "git_commit": "abc",
    }
    assert (spa["summary"]["map"], spa["summary"]["speedup_vs_dense"], spa["summary"]["gmacs"]) == (
        0.31,
        1.1,
        1.5,
    )
    assert "model.spa.ratio" not in spa["summary"] and "train.steps" not in spa["summary"]  # config
    assert spa["summary"]["kept_fraction"] == 0.5 and spa["summary"]["status"] == "done"
    history = runs["spa"]["history"]
    assert sorted(history) == [2, 4]
    assert [history[s]["train/task_loss"] for s in (2, 4)] == [0.5, 0.25]
    assert all(
        history[s][k] == v
        for s in (2, 4)
        for k, v in (("train/gate_loss", 0.1), ("train/kept_fraction", 0.5))
    )
    assert [history[s]["train/loss"] for s in (2, 4)] == pytest.approx([0.6, 0.35])
    assert (spa["state"], spa["tags"]) == ("finished", ["done"])
    assert runs["broken"]["history"] == {} and (broken["state"], broken["tags"]) == ("failed", ["failed"])
    assert broken["summary"]["error"] == "RuntimeError: boom" and broken["summary"]["status"] == "failed"

    grid = runs["toy r1"]
    assert grid["record"]["run_id"] == ref.parent_run_id and grid["final"]["state"] == "failed"  # one failed
    assert grid["final"]["summary"]["trials_done"] == 2 and grid["final"]["summary"]["trials_failed"] == 1
    assert "report_error" not in grid["final"]["summary"]
    (report,) = grid["artifacts"]
    files = {f["path"] for f in report["manifest"]["contents"]}
    assert report["type"] == "report" and {"report.md", "report.html"} <= files
    assert any(f.startswith("report-plots/") and f.endswith(".png") for f in files), files


ROOT = Path(__file__).resolve().parents[3]


def test_offline_wandb_with_results_off_this_disk_needs_wandb_dir(tmp_path, monkeypatch):
    for key in _WANDB_KEYS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(TrackingError, match="offline W&B runs need WANDB_DIR"):
        tracking.start_grid("wandb", "toy", "s3://bucket/spa/toy", harness_run_id="r1")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    ref = tracking.start_grid("wandb", "toy", "s3://bucket/spa/toy", harness_run_id="r1")
    assert (ref.uri, ref.mode, ref.dir, ref.experiment_id) == ("toy", "offline", str(tmp_path), "toy-r1")
    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.start_grid("wandb", "toy", "s3://bucket/spa/toy", harness_run_id="r1").dir is None


def _run_smoke_grid(store, env, track: str) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """``spa-harness run`` of the smoke grid (CI size) with ``--track track`` into ``store``; its
    output and its rows by config hash."""
    cmd = [sys.executable, "-m", "harness.cli", "run", str(ROOT / "ablations" / "grids" / "smoke.yaml")]
    cmd += ["--smoke", "--results", str(store), "--no-progress", "--no-report", "--track", track]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    rows = [json.loads(f.read_text()) for f in (store / "smoke" / "trials").glob("*/row.json")]
    return p, {row["config_hash"]: row for row in rows}


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one Ray at a time (scripts/test.sh)
def test_smoke_grid_tracked_in_mlflow(tmp_path):
    env = {**os.environ, "SPA_HARNESS_CACHE": str(tmp_path / "data-cache"), "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    store = tmp_path / "results"
    p, rows = _run_smoke_grid(store, env, "mlflow")
    uri = (store / "smoke" / "mlruns").as_uri()
    assert f"tracking: mlflow {uri}" in p.stdout

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("kind") == "grid"]
    trials = {r.data.tags["name"]: r for r in runs if r.data.tags.get("kind") == "trial"}
    assert len(parent) == 1 and len(trials) == 3, [r.data.tags for r in runs]
    for name, run in trials.items():
        tags = run.data.tags
        row = rows[tags["config_hash"]]
        assert (tags["name"], tags["seed"], tags["status"]) == (row["name"], str(row["seed"]), "done"), name
        assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.data.params["train.steps"] == "4" and run.data.params["train.log_every"] == "2"
        assert run.data.params["model.variant"] == row["model.variant"]
        assert run.data.metrics["map"] == pytest.approx(row["map"]) and run.data.metrics[
            "gmacs"
        ] == pytest.approx(row["gmacs"])
        for key in (
            "train/task_loss",
            "train/gate_loss",
            "train/loss",
            "train/kept_fraction",
        ):  # steps 2 and 4
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == [2, 4], (name, key, history)
        kept = [m.value for m in client.get_metric_history(run.info.run_id, "train/kept_fraction")]
        assert all(v == 1.0 for v in kept) if name == "dense" else all(0 < v < 1 for v in kept), (name, kept)
    assert trials["dense"].data.metrics["world_size"] == 2  # its curve came from a Ray Train worker process
    assert "speedup_vs_dense" in trials[next(n for n in trials if n != "dense")].data.metrics
    files = {a.path for a in client.list_artifacts(parent[0].info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= files
    assert parent[0].info.status == "FINISHED" and parent[0].data.tags["trials_done"] == "3"
    assert all("_track_points" not in r for r in rows.values())  # the curve stays out of the rows

    # The same grid under another name: every row is reused (no trial runs), and the new experiment
    # still gets its grid run and one run per trial, tagged reused, naming where the rows came from.
    cmd = [sys.executable, "-m", "harness.cli", "run", str(ROOT / "ablations" / "grids" / "smoke.yaml")]
    cmd += ["--smoke", "--results", str(store), "--name", "smoke-copy", "--no-progress", "--no-report"]
    p = subprocess.run(
        [*cmd, "--track", "mlflow"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("from experiment smoke: its done row is copied") == 3, p.stdout
    client = mlflow.tracking.MlflowClient((store / "smoke-copy" / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("smoke-copy").experiment_id])
    parent = [r for r in runs if r.data.tags.get("kind") == "grid"]
    reused = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(parent) == 1 and len(reused) == 3
    for run in reused:
        row = rows[run.data.tags["config_hash"]]
        assert (run.data.tags["reused"], run.data.tags["reused_from"]) == ("true", "smoke")
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert (
            run.data.metrics["map"] == pytest.approx(row["map"])
            and run.data.tags["git_commit"] == row["git_commit"]
        )


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one Ray at a time (scripts/test.sh)
def test_smoke_grid_tracked_in_offline_wandb(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in _WANDB_KEYS and k != "RAY_ADDRESS"}
    env.update(
        _offline_wandb_env(tmp_path),
        WANDB_DIR=str(tmp_path / "wandb-runs"),
        SPA_HARNESS_CACHE=str(tmp_path / "data-cache"),
        DS_ACCELERATOR="cpu",
    )
    store = tmp_path / "results"
    p, rows = _run_smoke_grid(store, env, "wandb=spa-smoke")
    assert "tracking: wandb spa-smoke" in p.stdout
    assert f"offline W&B runs: {tmp_path / 'wandb-runs'}/wandb (upload: wandb sync" in p.stdout
    assert "tracking: cannot" not in p.stdout + p.stderr  # a trial's tracking failure is only a warning

    runs = _read_offline_wandb(tmp_path / "wandb-runs", env)
    grid = [r for r in runs.values() if r["record"]["job_type"] == "grid"]
    trials = {n: r for n, r in runs.items() if r["record"]["job_type"] == "trial"}
    assert len(grid) == 1 and len(trials) == 3, sorted(runs)
    for name, run in trials.items():
        final = run["final"]
        row = rows[final["config"]["harness"]["config_hash"]]
        assert (final["config"]["name"], final["config"]["seed"]) == (row["name"], row["seed"]) == (name, 0)
        assert (
            run["record"]["run_group"] == grid[0]["record"]["run_group"]
            and run["record"]["project"] == "spa-smoke"
        )
        assert (final["state"], final["tags"], final["summary"]["status"]) == (
            "finished",
            ["done"],
            "done",
        ), name
        assert final["config"]["train.steps"] == 4 and final["config"]["train.log_every"] == 2
        assert final["config"]["model.variant"] == row["model.variant"]
        assert final["config"]["harness"]["git_commit"] == str(row["git_commit"])
        assert final["summary"]["map"] == pytest.approx(row["map"])
        assert final["summary"]["gmacs"] == pytest.approx(row["gmacs"])
        history = run["history"]
        assert sorted(history) == [2, 4], (name, history)
        for step, item in history.items():
            keys = {"train/task_loss", "train/gate_loss", "train/loss", "train/kept_fraction"}
            assert keys <= set(item) and all(math.isfinite(item[k]) for k in keys), (name, step, item)
        kept = [history[s]["train/kept_fraction"] for s in (2, 4)]
        assert all(v == 1.0 for v in kept) if name == "dense" else all(0 < v < 1 for v in kept), (name, kept)
    assert trials["dense"]["final"]["summary"]["world_size"] == 2  # its curve came from a Ray Train worker
    assert "speedup_vs_dense" in trials[next(n for n in trials if n != "dense")]["final"]["summary"]
    assert grid[0]["final"]["state"] == "finished" and grid[0]["final"]["summary"]["trials_done"] == 3
    (report,) = grid[0]["artifacts"]
    assert {"report.md", "report.html"} <= {f["path"] for f in report["manifest"]["contents"]}
    assert all("_track_points" not in r for r in rows.values())  # the curve stays out of the rows
