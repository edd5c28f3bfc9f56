"""harness/run/rows.py: what a row carries of its trial's config."""

from __future__ import annotations

import json

import pandas as pd

from harness.config import config_hash, trial_from_dict
from harness.report import compare
from harness.run.rows import RunInfo, TrialSpec, base_row


def test_a_plugin_trials_row_is_compared_with_the_dense_row():
    """``plugin_sources`` is part of a trial's identity (its hash, its config_json), not a setting the
    report groups variants by: a plugin's variant gets its deltas against the grid's dense variant."""
    rows = []
    for seed in range(3):
        dense = trial_from_dict({"name": "dense", "seed": seed, "model": {"variant": "dense"}})
        plugin = trial_from_dict({"name": "mine", "seed": seed})
        plugin.plugin_sources = {"selection_policy:mine": "sha256:0123456789abcdef"}
        for cfg, m in ((dense, 0.30), (plugin, 0.31)):
            row = base_row(TrialSpec(cfg, config_hash(cfg)), RunInfo("run", "commit"), 1)
            row.update(status="done", map=m + 0.01 * seed, gmacs=1.0, error=None)
            rows.append(row)
    assert not any(k.startswith("plugin_sources") for k in rows[1])
    assert json.loads(rows[1]["config_json"])["plugin_sources"] == {
        "selection_policy:mine": "sha256:0123456789abcdef"
    }
    table = compare(pd.DataFrame(rows))
    assert table.loc["dense", "verdict"] == "baseline"
    assert abs(table.loc["mine", "map_delta"] - 0.01) < 1e-9 and table.loc["mine", "verdict"] == "better"
