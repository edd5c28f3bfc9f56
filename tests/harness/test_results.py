"""The results store: atomic rows, loading a store or one experiment, reuse across experiments, states."""

import json
import math
import os
import time

import pandas as pd
import pyarrow.fs as pafs
import pytest

from harness import results
from harness.results import Experiment, ResultsStore, load, trial_states


def _row(h, status="done", **extra):
    row = {
        "name": f"t-{h}",
        "config_hash": h,
        "status": status,
        "gmacs": 0.5 if status == "done" else None,
        "error": None if status == "done" else "boom",
        "end_time": time.time(),
        "model.spa.ratio": 0.25,
        "model.spa_stages": [3, 4],
    }
    row.update(extra)
    return row


def _experiment(root, name, rows):
    exp = ResultsStore(str(root)).experiment(name)
    exp.write_manifest(
        {"name": name, "trials": [{"name": r["name"], "config_hash": r["config_hash"]} for r in rows]}
    )
    for r in rows:
        exp.write_row(r["config_hash"], r)
    return exp


def test_rows_are_written_atomically_and_read_back(tmp_path):
    exp = _experiment(tmp_path, "e", [_row("aaa")])
    folder = tmp_path / "e" / "trials" / "aaa"
    assert sorted(p.name for p in folder.iterdir()) == ["row.json"]  # no temporary file left behind
    assert exp.read_row("aaa")["gmacs"] == 0.5
    with pytest.raises(ValueError, match="status"):
        exp.write_row("bbb", _row("bbb", status="weird"))


def test_nan_becomes_null_so_rows_are_strict_json(tmp_path):
    _experiment(tmp_path, "e", [_row("aaa", map=math.nan, inf=math.inf)])
    data = json.loads((tmp_path / "e" / "trials" / "aaa" / "row.json").read_text())
    assert data["map"] is None and data["inf"] is None


def test_a_crash_mid_write_leaves_the_old_row(tmp_path, monkeypatch):
    exp = _experiment(tmp_path, "e", [_row("aaa")])
    before = (tmp_path / "e" / "trials" / "aaa" / "row.json").read_bytes()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        exp.write_row("aaa", _row("aaa", gmacs=9.0))
    assert (tmp_path / "e" / "trials" / "aaa" / "row.json").read_bytes() == before


def test_load_one_experiment_and_the_whole_store(tmp_path):
    _experiment(tmp_path, "a", [_row("h1"), _row("h2", status="failed")])
    _experiment(tmp_path, "b", [_row("h2"), _row("h3", status="timeout")])
    one = load(tmp_path / "a")
    assert set(one["config_hash"]) == {"h1", "h2"} and set(one["experiment"]) == {"a"}
    assert {"status", "config_hash", "gmacs", "error", "name", "experiment"} <= set(one.columns)
    assert one["model.spa_stages"].iloc[0] == (3, 4)  # lists come back hashable
    store = load(tmp_path)
    assert sorted(store["config_hash"]) == ["h1", "h2", "h3"]  # one row per config hash ...
    assert store.set_index("config_hash").loc["h2", "status"] == "done"  # ... preferring the done one
    assert len(load(tmp_path, dedupe=False)) == 4


def test_load_of_an_empty_store_has_the_columns(tmp_path):
    df = load(tmp_path / "nothing")
    assert isinstance(df, pd.DataFrame) and len(df) == 0
    assert {"status", "config_hash", "gmacs"} <= set(df.columns)


def test_reuse_copies_a_finished_trial_byte_for_byte(tmp_path):
    store = ResultsStore(str(tmp_path))
    a = _experiment(tmp_path, "a", [_row("h1"), _row("h2", status="failed")])
    a.write_config("h1", {"name": "t-h1"})
    a.write_text("h1", "log.txt", "hello\n")
    assert store.find_done("h1", exclude="b").name == "a"
    assert store.find_done("h2") is None  # a failed row is not reused
    b = store.experiment("b")
    b.copy_trial_from(a, "h1")
    for f in ("row.json", "config.json", "log.txt"):
        assert (tmp_path / "b" / "trials" / "h1" / f).read_bytes() == (
            tmp_path / "a" / "trials" / "h1" / f
        ).read_bytes()
    assert (
        json.loads((tmp_path / "b" / "trials" / "h1" / "reused.json").read_text())["from_experiment"] == "a"
    )


def test_trial_states_cover_done_failed_running_interrupted_pending(tmp_path):
    exp = _experiment(tmp_path, "e", [_row("h1"), _row("h2", status="failed")])
    manifest = exp.read_manifest()
    manifest["trials"] += [
        {"name": "r", "config_hash": "h3"},
        {"name": "i", "config_hash": "h4"},
        {"name": "p", "config_hash": "h5"},
    ]
    exp.write_manifest(manifest)
    exp.heartbeat("h3", {"attempt": 1, "start_time": time.time()})
    exp.write_bytes(exp.trial_path("h4", "running.json"), results.dumps({"heartbeat": time.time() - 3600}))
    states = {s["config_hash"]: s["state"] for s in trial_states(tmp_path)}
    assert states == {"h1": "done", "h2": "failed", "h3": "running", "h4": "interrupted", "h5": "pending"}
    exp.write_row("h3", _row("h3"))
    assert not (tmp_path / "e" / "trials" / "h3" / "running.json").exists()  # the row replaces the marker


def test_trial_states_say_where_a_trial_ran_or_runs_and_from_which_commit(tmp_path):
    where = {"hostname": "node-a", "node_id": "f" * 56, "git_commit": "c" * 40}
    exp = _experiment(tmp_path, "e", [_row("h1", **where), _row("h2", status="failed")])
    manifest = exp.read_manifest()
    manifest["trials"][0]["reused_from"] = "older"
    manifest["trials"].append({"name": "r", "config_hash": "h3"})
    exp.write_manifest(manifest)
    exp.heartbeat("h3", {"attempt": 1, "start_time": time.time(), "hostname": "node-b", "node_id": "e" * 56})
    by = {s["config_hash"]: s for s in trial_states(tmp_path)}
    assert {k: by["h1"][k] for k in where} == where
    assert by["h1"]["detail"].endswith(", reused from older")
    assert (by["h2"]["hostname"], by["h2"]["git_commit"]) == (None, None)  # the row does not say
    assert (by["h3"]["state"], by["h3"]["hostname"], by["h3"]["node_id"]) == ("running", "node-b", "e" * 56)


def test_uri_stores_and_object_store_writes(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/store"
    _experiment(uri, "e", [_row("h1")])
    assert list(load(uri)["config_hash"]) == ["h1"]
    assert list(load(f"{uri}/e")["config_hash"]) == ["h1"]

    # A filesystem that is not the local one (as S3 is) gets a single direct write, no rename.
    def fake_filesystem(u):
        if u.startswith("s3://obj"):
            return pafs.SubTreeFileSystem(str(tmp_path / "obj"), pafs.LocalFileSystem()), u[
                len("s3://obj") :
            ].strip("/")
        return pafs.LocalFileSystem(), u

    monkeypatch.setattr(results, "_filesystem", fake_filesystem)
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("no rename on object stores"))
    exp = Experiment("s3://obj", "e")
    exp.write_row("h9", _row("h9"))
    assert exp.read_row("h9")["config_hash"] == "h9"
    assert (tmp_path / "obj" / "e" / "trials" / "h9" / "row.json").is_file()


@pytest.mark.parametrize("damage", [b'{"status": "do', b"", b"[1, 2]", b'{"status": "weird"}', b"\xff\xfe"])
def test_a_damaged_row_is_not_done_and_is_named(tmp_path, damage):
    exp = _experiment(tmp_path, "e", [_row("h1"), _row("h2")])
    path = tmp_path / "e" / "trials" / "h2" / "row.json"
    path.write_bytes(damage)
    assert exp.read_row("h2") is None and exp.read_row("h1")["status"] == "done"
    found = results.damaged_files(tmp_path)
    assert [d.path for d in found] == [str(path)] and str(path) in str(found[0])
    assert results.damaged_files(tmp_path / "e") == found  # one experiment's folder too
    states = {s["config_hash"]: s for s in trial_states(tmp_path)}
    assert states["h2"]["state"] == "pending" and states["h2"]["damaged"] == str(path)
    assert states["h2"]["detail"].startswith(f"damaged row file: {path}: ")
    assert list(load(tmp_path)["config_hash"]) == ["h1"]
    assert ResultsStore(str(tmp_path)).find_done("h2") is None  # not reused elsewhere either


def test_a_damaged_manifest_is_named(tmp_path):
    _experiment(tmp_path, "e", [_row("h1")])
    (tmp_path / "e" / "experiment.json").write_text("{")
    assert [d.path for d in results.damaged_files(tmp_path / "e")] == [
        str(tmp_path / "e" / "experiment.json")
    ]
    assert [s["config_hash"] for s in trial_states(tmp_path / "e")] == ["h1"]  # listed from the trial folders
