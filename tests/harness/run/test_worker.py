"""A real one-worker trial in this process (DeepSpeed on a one-process gloo group, micro preset):
a variant that cannot be traced fails at the probe, before training; a measurement that fails after
training leaves the row its metrics, names the failure, and error.txt keeps the whole traceback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import ray.tune

from harness.config import config_hash, trial_from_dict
from harness.plugins import isolated_registries, load_plugins, plugin_sources
from harness.report.tables import build_report
from harness.results import ResultsStore
from harness.run.rows import RunInfo, TrialSpec, tune_payload
from harness.run.trial import TrialContext, trial_trainable

PLUGIN = Path(__file__).parent / "plugins" / "probe_failures.py"

# torch appends a schema dump to some internal asserts (seen: fvcore's trace of a plugin's scatter)
_DUMP = (
    "0 INTERNAL ASSERT FAILED at alias_analysis.cpp:617, please report a bug to PyTorch.\n"
    "Argument types: Tensor, int, Tensor, bool, \n\nCandidates:\n"
    "\taten::scatter.value(Tensor self, int dim, Tensor index, Scalar value) -> Tensor"
)


def _spec(tmp_path, steps=2, **spa):
    cfg = trial_from_dict(
        {
            "name": "t",
            "preset": "micro",
            "plugins": [str(PLUGIN)],
            "model": {"spa": {"selection": "topk", "ratio": 0.5, **spa}},
            "train": {"steps": steps, "batch_size": 2, "warmup_steps": 1},
            "data": {"num_train": 4, "num_val": 2, "image_size": 64, "cache_dir": str(tmp_path / "cache")},
            "bench": {"batch_size": 2, "warmup": 0, "repeats": 1},
        }
    )
    with isolated_registries():  # the plugin's source is part of the trial, as a grid makes it
        load_plugins(cfg.plugins)
        cfg.plugin_sources = plugin_sources(cfg)
    return TrialSpec(cfg, config_hash(cfg))


@pytest.fixture
def run_trial(tmp_path, monkeypatch, one_process_group):
    monkeypatch.setattr(ray.tune, "report", lambda *a, **k: None)
    exp = ResultsStore(str(tmp_path / "store")).experiment("exp")
    ctx = TrialContext(str(tmp_path / "store"), "exp", RunInfo("run-1", "abc"))

    def run(spec):
        exp.write_manifest({"trials": [{"name": spec.cfg.name, "config_hash": spec.config_hash}]})
        with isolated_registries():
            trial_trainable({"trial": tune_payload(spec.config_hash)}, ctx, {spec.config_hash: spec})
        return exp.read_row(spec.config_hash), exp

    return run


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_a_flop_count_that_fails_after_training_keeps_the_rows_metrics(tmp_path, monkeypatch, run_trial):
    from harness.task import measure as measure_mod

    def untraceable(*a, **k):
        raise RuntimeError(_DUMP)

    # measure() counts through this name; the probe before training holds its own reference
    monkeypatch.setattr(measure_mod, "fvcore_macs", untraceable)
    spec = _spec(tmp_path)
    row, exp = run_trial(spec)
    assert row["status"] == "done" and row["error"] is None
    assert math.isfinite(row["map"]) and row["steps"] == 2 and row["probe_s"] > 0
    assert "gmacs" not in row and row["infer_ms"] > 0 and row["speedup_vs_dense"] > 0  # the others ran
    assert row["measure_failed"] == "flops"
    error_file = exp.trial_uri(spec.config_hash, "error.txt")
    assert row["measure_error"] == (
        "RuntimeError: 0 INTERNAL ASSERT FAILED at alias_analysis.cpp:617, please report a bug to PyTorch. "
        f"[in untraceable at {__file__}:{untraceable.__code__.co_firstlineno + 1}; "
        f"measurement 'flops' after training; full traceback: {error_file}]"
    )
    text = Path(error_file).read_text()
    assert text.startswith("measurement 'flops':\nTraceback (most recent call last):")
    assert "in flops" in text and "in untraceable" in text and "aten::scatter.value" in text  # whole

    report = build_report(exp.path)
    (failure,) = report.failures.to_dict("records")
    assert failure["status"] == "done, flops failed"
    assert failure["error"].startswith("RuntimeError: 0 INTERNAL ASSERT FAILED")  # not the dump's end
    assert any("flops failed" in n for n in report.notes)
    assert report.table["map"].notna().all()  # the trial's mAP counts


@pytest.mark.filterwarnings("ignore")
def test_a_variant_that_cannot_be_traced_fails_at_the_probe_before_training(tmp_path, monkeypatch, run_trial):
    from harness.run import worker

    trained = []
    monkeypatch.setattr(worker, "train_variant", lambda *a, **k: trained.append(1))
    spec = _spec(tmp_path, steps=10**6, selection="round_topk")
    row, exp = run_trial(spec)
    assert not trained
    assert row["status"] == "failed" and row["error_type"] == "TypeError"
    first = row["error"].splitlines()[0]
    assert first.startswith("TypeError: type Tensor doesn't define __round__ method [in round_topk at ")
    assert "probe before training: FLOP trace of one batch" in first
    text = Path(exp.trial_uri(spec.config_hash, "error.txt")).read_text()
    assert text.startswith("Traceback (most recent call last):") and "in train_worker" in text
