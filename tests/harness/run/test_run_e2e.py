"""End to end: ``spa-harness run`` on an embedded local Ray (a subprocess, as a user runs it).

Smoke-sized grids on CPU: the built-in 3-trial smoke grid (dense on 2 workers, SPA at two ratios),
reuse of finished trials and failure isolation (resume after the driver is SIGKILLed: test_soak.py).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.results import load

ROOT = Path(__file__).resolve().parents[3]
SMOKE = ROOT / "ablations" / "grids" / "smoke.yaml"
FAILING = Path(__file__).parent / "plugins" / "failing_variants.py"

# The "ray" xdist group runs every test that starts Ray on one worker, one at a time (scripts/test.sh).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

# What every finished row carries (task metrics, measurements, provenance, config).
DONE_COLUMNS = [
    "task_loss",
    "gate_loss",
    "map",
    "map_50",
    "kept_fraction",
    "num_params",
    "backbone_params",
    "gmacs",
    "flop_images",
    "backbone_gmacs",
    "analytic_attn_gmacs",
    "fvcore_attn_gmacs",
    "forward_ms",
    "forward_ms_iqr",
    "forward_samples_per_s",
    "infer_ms",
    "infer_ms_iqr",
    "infer_samples_per_s",
    "train_step_ms",
    "train_step_ms_iqr",
    "train_step_samples_per_s",
    "train_samples_per_s",
    "peak_mem_mb",
    "peak_mem_kind",
    "wall_s",
    "work_s",
    "overhead_s",
    "start_time",
    "end_time",
    "config_json",
    "config_hash",
    "git_commit",
    "torch_version",
    "deepspeed_version",
    "ray_version",
    "fvcore_version",
    "triton_version",
    "device",
    "workers",
    "world_size",
    "model.variant",
    "model.depths",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e["SPA_HARNESS_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    e["DS_ACCELERATOR"] = "cpu"
    return e


def _cli(*args, env, timeout=600, check=True):
    cmd = [sys.executable, "-m", "harness.cli", *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
        )
    return p


def _rows(store, experiment):
    folder = Path(store) / experiment / "trials"
    return {p.parent.name: p.read_bytes() for p in sorted(folder.glob("*/row.json"))}


def test_smoke_grid_end_to_end_then_reused(tmp_path, env):
    store = tmp_path / "results"
    grid = SMOKE.relative_to(ROOT)  # as a user in the checkout names it
    first = _cli("run", grid, "--smoke", "--results", store, "--no-progress", env=env)
    df = load(store / "smoke")
    assert len(df) == 3 and set(df["status"]) == {"done"}, df[["name", "status", "error"]]
    # --no-progress: still a start and an end line per trial, the end naming host and node
    for name, h in zip(df["name"], df["config_hash"]):
        assert f"smoke: started {name} ({h})" in first.stdout, first.stdout
        assert re.search(
            rf"smoke: done {re.escape(name)} \({h}\) in \d+ s on \S+ \(node [0-9a-f]{{8}}\)", first.stdout
        )
    manifest = json.loads((store / "smoke" / "experiment.json").read_text())
    assert manifest["source"] == str(grid)  # not the resolved path
    assert {t["state"] for t in manifest["trials"]} == {"done"}  # true at the end, not "pending"
    missing = [c for c in DONE_COLUMNS if c not in df.columns or df[c].isna().any()]
    assert not missing, missing
    assert "model.spa.ratio" in df.columns and "model.spa" in df.columns  # null for the dense baseline
    assert all(c.startswith("kept_fraction_s") for c in df.columns if c.startswith("kept_fraction_s"))
    by = df.set_index("name")
    dense = by.loc["dense"]
    spa = by[by["model.variant"] == "spa"]
    assert len(spa) == 2
    assert (spa["gmacs"] < dense["gmacs"]).all() and (spa["backbone_gmacs"] < dense["backbone_gmacs"]).all()
    assert dense["world_size"] == 2 and dense["workers"] == 2  # data-parallel on 2 Ray Train workers
    assert dense["dp_param_max_diff"] == 0  # ... whose replicas stayed in step
    assert (spa["world_size"] == 1).all()
    # SPA trials timed themselves against a dense twin in their own process; the dense trial has no twin
    paired = spa[["speedup_vs_dense_q1", "speedup_vs_dense", "speedup_vs_dense_q3", "paired_dense_ms"]]
    assert paired.notna().all().all() and (paired > 0).all().all()
    assert (spa["speedup_vs_dense_q1"] <= spa["speedup_vs_dense"]).all()
    assert (spa["speedup_vs_dense"] <= spa["speedup_vs_dense_q3"]).all()
    assert pd.isna(dense.get("speedup_vs_dense"))
    assert (spa["speedup_timed"] == "backbone+head").all()  # the forward SPA changes, without NMS
    assert (df["overhead_s"] >= 0).all() and (df["wall_s"] >= df["work_s"]).all()
    for h in df["config_hash"]:
        files = {p.name for p in (store / "smoke" / "trials" / h).iterdir()}
        assert {"row.json", "config.json", "log.txt"} <= files
    assert (store / "smoke" / "trials" / dense["config_hash"] / "log.rank1.txt").is_file()

    # Running the grid again runs nothing: every row stays byte-identical.
    before = _rows(store, "smoke")
    again = _cli(
        "run", SMOKE, "--smoke", "--results", store, "--no-progress", "--no-report", env=env, timeout=120
    )
    assert "3 done" in again.stdout
    assert _rows(store, "smoke") == before
    assert "3 trial(s) already done in this experiment, kept" in again.stdout
    # An overlapping grid under another experiment name reuses them too (copied, not re-run), and says so.
    copy = _cli(
        "run",
        SMOKE,
        "--smoke",
        "--results",
        store,
        "--name",
        "copy",
        "--no-progress",
        "--no-report",
        env=env,
        timeout=120,
    )
    assert _rows(store, "copy") == before
    for name, h in zip(df["name"], df["config_hash"]):
        assert f"copy: reused {name} ({h}) from experiment smoke" in copy.stdout, copy.stdout
    assert "rows not run again: 3 reused from experiment smoke (--rerun runs them)" in copy.stdout
    status = _cli("status", store / "copy", env=env, timeout=60)
    assert "3 done" in status.stdout and status.stdout.count("reused from smoke") == 3
    assert len(re.findall(r"\(node [0-9a-f]{8}\)", status.stdout)) == 3


def test_failures_are_recorded_and_the_grid_goes_on(tmp_path, env):
    # Run one at a time, in this order: the 2-worker trial after the stuck 2-worker one only gets its
    # CPUs if the timed-out trial's Ray Train workers and placement group were released.
    grid = tmp_path / "failing.yaml"
    grid.write_text(f"""
name: failing
plugins: [{FAILING}]
base:
  preset: micro
  model.spa.selection: topk
resources: {{workers: 1, cpus_per_worker: 1, timeout_s: 300}}
points:
  - {{name: explode, model.variant: explode}}
  - {{name: nan, model.variant: nan_features}}
  - {{name: slow, train.grad_accum: 5000, resources.timeout_s: 8}}  # --smoke sets train.steps
  - {{name: stuck2, train.grad_accum: 5000, resources.workers: 2, resources.timeout_s: 30}}
  - {{name: ok2, resources.workers: 2}}
""")
    store = tmp_path / "results"
    p = _cli(
        "run",
        grid,
        "--smoke",
        "--results",
        store,
        "--max-concurrent",
        "1",
        "--no-progress",
        "--no-report",
        env=env,
        check=False,
    )
    assert p.returncode == 1, p.stderr[-3000:]  # some trials failed: not a success
    df = load(store).set_index("name")
    ok2 = df.loc["ok2"]
    assert ok2["status"] == "done" and ok2["world_size"] == 2 and ok2["gmacs"] > 0, ok2.get("error")
    explode = df.loc["explode"]
    assert explode["status"] == "failed" and "boom: the explode variant fails" in explode["error"]
    assert explode["error_type"] == "RuntimeError" and "failing_variants.py" in explode["traceback"]
    assert (store / "failing" / "trials" / explode["config_hash"] / "error.txt").is_file()
    nan = df.loc["nan"]
    assert (
        nan["status"] == "failed"
        and nan["error_type"] == "NonFiniteLossError"
        and "non-finite" in nan["error"]
    )
    for name, limit in (("slow", 8), ("stuck2", 30)):
        assert df.loc[name, "status"] == "timeout" and f"timeout_s={limit}" in df.loc[name, "error"]
    status = _cli("status", store, env=env, timeout=60).stdout
    assert "timeout" in status and "failed" in status and "done" in status
