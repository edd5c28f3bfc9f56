"""harness/report/command.py (with harness/report/tables.py, axes.py, render.py) and harness/report/plots.py on a hand-made
results store: aggregation over seeds with the 95% CI, deltas vs the dense baseline paired by seed,
per-axis tables, failures and notes, every output format."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest

from harness.report import build_report, compare, report_command, write_report
from harness.report.plots import pareto_front

T975 = {2: 12.706204736174698, 3: 4.302652729911275}  # Student's t, 97.5% quantile, by number of seeds


def _row(name, seed, variant="spa", selection="topk", ratio=0.5, status="done", **metrics):
    spa = variant != "dense"
    return {
        "name": name,
        "seed": seed,
        "status": status,
        "config_hash": f"{name}-{seed}",
        "config.model.variant": variant,
        "config.model.spa.selection": selection if spa else None,
        "config.model.spa.ratio": ratio if spa else None,
        "config.train.steps": 10,
        "error": None,
        **metrics,
    }


def _store() -> pd.DataFrame:
    m = dict  # metric columns, named as the run path names them
    rows = [
        _row(
            "dense",
            0,
            "dense",
            map=0.30,
            map_50=0.50,
            fvcore_gmacs=2.0,
            infer_ms_median=10.0,
            peak_mem_mb=100.0,
        ),
        _row(
            "dense",
            1,
            "dense",
            map=0.32,
            map_50=0.52,
            fvcore_gmacs=2.0,
            infer_ms_median=11.0,
            peak_mem_mb=100.0,
        ),
        _row(
            "dense",
            2,
            "dense",
            map=0.34,
            map_50=0.54,
            fvcore_gmacs=2.0,
            infer_ms_median=12.0,
            peak_mem_mb=100.0,
        ),
    ]
    for sel, ratio, maps, gmacs, ms in [
        ("topk", 0.5, (0.31, 0.33, 0.35), 1.5, (8.0, 9.0, 10.0)),
        ("topk", 0.25, (0.28, 0.30, None), 1.2, (6.0, 7.0, None)),  # third seed failed
        ("random", 0.5, (0.20, 0.22, 0.24), 1.5, (8.0, 8.0, 8.0)),
    ]:
        name = f"selection={sel},ratio={ratio}"
        for seed, (mp, t) in enumerate(zip(maps, ms)):
            if mp is None:
                rows.append(_row(name, seed, selection=sel, ratio=ratio, status="failed",
                                 error="Traceback (most recent call last):\n  File x\nFloatingPointError: NaN loss at step 7"))  # fmt: skip
                continue
            rows.append(_row(name, seed, selection=sel, ratio=ratio, **m(
                map=mp, map_50=mp + 0.2, fvcore_gmacs=gmacs, infer_ms_median=t, peak_mem_mb=80.0,
                kept_fraction=ratio, gate_precision=0.6, gate_recall=0.4 + seed * 0.1, infer_ms_iqr=1.0)))  # fmt: skip
    return pd.DataFrame(rows)


def _ci(values):
    v = np.array(values, dtype=float)
    return T975[len(v)] * v.std(ddof=1) / math.sqrt(len(v))


def test_compare_numbers_by_hand():
    table = compare(_store())
    # the baseline first, then by name (numbers in names compare as numbers)
    assert list(table.index) == ["dense", "selection=random,ratio=0.5", "selection=topk,ratio=0.25",
                                 "selection=topk,ratio=0.5"]  # fmt: skip
    dense, topk = table.loc["dense"], table.loc["selection=topk,ratio=0.5"]
    assert dense["n_seeds"] == 3 and table.loc["selection=topk,ratio=0.25", "n_seeds"] == 2
    assert dense["map"] == pytest.approx(0.32)
    assert dense["map_ci95"] == pytest.approx(_ci([0.30, 0.32, 0.34]))  # 4.3027 * 0.02 / sqrt(3)
    assert dense["map_ci95"] == pytest.approx(0.0496828, rel=1e-5)
    assert table.loc["selection=topk,ratio=0.25", "map_ci95"] == pytest.approx(_ci([0.28, 0.30]))
    # deltas per seed, then averaged: absolute for mAP, percent for compute / time / memory, the
    # speedup as the geometric mean of the per-seed ratios of inference times
    assert topk["map_delta"] == pytest.approx(0.33 - 0.32)
    assert (topk["map_delta_lo"], topk["map_delta_hi"]) == pytest.approx((0.01, 0.01))  # the same every seed
    assert topk["verdict"] == "better" and topk["map_delta_n"] == 3
    assert table.loc["selection=random,ratio=0.5", "map_delta"] == pytest.approx(0.22 - 0.32)
    # seed 2 failed: the pairs are seeds 0 and 1 (-0.02 each), not the means (0.29 - 0.32)
    assert table.loc["selection=topk,ratio=0.25", "map_delta"] == pytest.approx(-0.02)
    assert table.loc["selection=topk,ratio=0.25", "verdict"] == "n/a"  # 2 paired seeds
    assert topk["fvcore_gmacs_delta_pct"] == pytest.approx(-25.0)
    assert table.loc["selection=topk,ratio=0.25", "fvcore_gmacs_delta_pct"] == pytest.approx(-40.0)
    assert topk["infer_ms_median_delta_pct"] == pytest.approx(np.mean([-20.0, -200 / 11, -200 / 12]))
    assert topk["speedup"] == pytest.approx(math.exp(np.mean(np.log([10 / 8, 11 / 9, 12 / 10]))))
    assert (
        topk["speedup_lo"] < topk["speedup"] < topk["speedup_hi"] and topk["speedup_source"] == "cross-trial"
    )
    assert topk["peak_mem_mb_delta_pct"] == pytest.approx(-20.0)
    assert dense["map_delta"] == 0 and dense["speedup"] == 1 and dense["verdict"] == "baseline"
    assert table["map_noise_floor"].tolist() == pytest.approx([0.02] * 4)  # dense's std of mAP over seeds
    assert math.isnan(dense["gate_precision"]) and topk["gate_recall"] == pytest.approx(0.5)
    assert "infer_ms_iqr" not in table  # a single trial's spread is not a comparison column
    assert table.loc["selection=random,ratio=0.5", "infer_ms_median_ci95"] == 0.0


def _paired_store() -> pd.DataFrame:
    """The store of a run whose trials timed their model against a dense twin in their own process."""
    df = _store()
    spa = df["name"] != "dense"
    df.loc[spa, "speedup_vs_dense"] = 0.9
    df.loc[spa, "speedup_vs_dense_q1"] = 0.8
    df.loc[spa, "speedup_vs_dense_q3"] = 1.0
    df.loc[spa, "paired_model_ms"] = 20.0
    df.loc[spa, "paired_dense_ms"] = 18.0
    df.loc[(df["name"] == "selection=topk,ratio=0.5") & (df["seed"] == 1), "speedup_vs_dense"] = 1.2
    return df


def test_speedup_is_the_paired_one_when_trials_measured_it():
    report = build_report(_paired_store())
    t = report.table
    topk = t.loc["selection=topk,ratio=0.5"]
    # the geometric mean over seeds of each trial's same-process ratio, not dense infer ms / variant's
    assert topk["speedup"] == pytest.approx((0.9 * 1.2 * 0.9) ** (1 / 3))
    assert topk["speedup_source"] == "same-process" and topk["speedup_n"] == 3
    assert topk["speedup_cross_trial"] == pytest.approx(math.exp(np.mean(np.log([10 / 8, 11 / 9, 12 / 10]))))
    assert t.loc["dense", "speedup"] == 1.0
    assert t.loc["selection=random,ratio=0.5", "speedup"] == pytest.approx(0.9)
    assert "paired_model_ms" not in t and "paired_dense_ms_delta_pct" not in t  # per-trial detail only
    assert not any("different trials" in n for n in report.notes)
    md = report_command(_paired_store(), fmt="md")
    assert "0.90x (0.90-0.90)" in md  # the random variant: 0.9 every seed
    one_seed = report_command(_paired_store().query("seed == 0"), fmt="md")
    assert "0.90x (IQR 0.80-1.00)" in one_seed  # one seed: the interquartile range of its pairs


def test_speedup_falls_back_to_cross_trial_with_a_note():
    df = _paired_store()
    df.loc[df["name"] == "selection=random,ratio=0.5", "speedup_vs_dense"] = np.nan  # an older trial
    report = build_report(df)
    assert report.table.loc["selection=random,ratio=0.5", "speedup"] == pytest.approx(
        math.exp(np.mean(np.log([10 / 8, 11 / 8, 12 / 8])))
    )
    assert any("selection=random,ratio=0.5 vs dense" in n and "different trials" in n for n in report.notes)
    # a non-dense baseline: no paired timing against it exists
    other = build_report(_paired_store(), baseline="selection=topk,ratio=0.5")
    assert other.table.loc["dense", "speedup"] == pytest.approx(
        math.exp(np.mean(np.log([8 / 10, 9 / 11, 10 / 12])))
    )
    assert any("different trials" in n for n in other.notes)


def test_failures_notes_and_axes():
    report = build_report(_store(), base={"model.spa.selection": "topk", "model.spa.ratio": 0.5})
    assert report.baseline == "dense"
    f = report.failures
    assert len(f) == 1 and f.iloc[0]["status"] == "failed"
    assert f.iloc[0]["error"] == "FloatingPointError: NaN loss at step 7"
    assert f.iloc[0]["variant"] == "selection=topk,ratio=0.25"
    assert any("selection=topk,ratio=0.25 has 2 seed(s), others up to 3" in n for n in report.notes)
    assert any("1 trial(s) failed" in n for n in report.notes)
    assert (
        "selection=topk,ratio=0.25 vs dense: seed(s) 2 only in dense: left out of the paired deltas."
        in report.notes
    )
    assert set(report.axes) == {"model.spa.selection", "model.spa.ratio"}
    ratio = report.axes["model.spa.ratio"]  # selection held at topk
    assert list(ratio.index) == ["dense", "selection=topk,ratio=0.25", "selection=topk,ratio=0.5"]
    sel = report.axes["model.spa.selection"]  # ratio held at 0.5
    assert list(sel.index) == ["dense", "selection=random,ratio=0.5", "selection=topk,ratio=0.5"]
    assert sel["map_delta"].tolist() == pytest.approx([0.0, -0.10, 0.01])


def test_baseline_choice():
    table = compare(_store(), baseline="selection=topk,ratio=0.5")
    assert table.loc["dense", "map_delta"] == pytest.approx(-0.01)
    by_hash = compare(_store(), baseline="selection=topk,ratio=0.5-1")  # a trial's config hash
    assert by_hash.loc["dense", "map_delta"] == pytest.approx(-0.01)
    with pytest.raises(ValueError, match="baseline 'nope' is not a variant"):
        compare(_store(), baseline="nope")
    no_dense = _store().query("name != 'dense'")
    report = build_report(no_dense)
    assert report.baseline is None and "map_delta" not in report.table
    assert any("No dense baseline" in n for n in report.notes)


def test_same_name_different_configs_are_two_variants():
    df = _store()
    df.loc[(df["name"] == "dense") & (df["seed"] == 2), "config.train.steps"] = 20
    table = compare(df)
    dense = [v for v in table.index if v.startswith("dense")]
    assert len(dense) == 2 and all("[" in v for v in dense)


def test_report_formats(tmp_path):
    df = _store()
    md = report_command(df, fmt="md", out=tmp_path)
    assert "| variant" in md and "Δ mAP" in md and "FloatingPointError: NaN loss" in md
    assert "0.320±0.050" in md  # dense mAP with its CI
    assert "## Axis `model.spa.ratio`" in md and "![accuracy_vs_gmacs](plots/accuracy_vs_gmacs.png)" in md
    plots = ("accuracy_vs_gmacs", "axis_model.spa.ratio", "axis_model.spa.selection", "speedup_vs_ratio",
             "gate_pr_vs_ratio")  # fmt: skip
    for name in plots:
        png = (tmp_path / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
    page = report_command(df, fmt="html", out=tmp_path)
    assert page.count("src='data:image/png;base64,") == len(plots) and "<table" in page and "NaN loss" in page
    assert (tmp_path / "index.html").read_text() == page
    data = json.loads(report_command(df, fmt="json"))
    assert data["baseline"] == "dense" and len(data["table"]) == 4 and len(data["failures"]) == 1
    assert data["axes"]["model.spa.ratio"]["held"] == {"model.spa.selection": "topk"}
    assert [r["variant"] for r in data["axes"]["model.spa.ratio"]["rows"]][0] == "dense"
    table = pd.read_csv(io.StringIO(report_command(df, fmt="csv", out=tmp_path)), index_col=0)
    assert table.loc["dense", "map"] == pytest.approx(0.32)
    assert (tmp_path / "failures.csv").exists() and (tmp_path / "axis_model.spa.ratio.csv").exists()
    with pytest.raises(ValueError, match="unknown report format"):
        report_command(df, fmt="pdf")
    out = write_report(df, tmp_path / "all")
    assert sorted(p.name for p in out.glob("*.*") if p.stem in ("report", "index")) == [
        "index.html",
        "report.csv",
        "report.json",
        "report.md",
    ]


def test_pareto_front():
    cost = np.array([1.0, 2.0, 3.0, 1.5, 4.0])
    value = np.array([0.1, 0.3, 0.2, 0.05, 0.4])
    assert pareto_front(cost, value).tolist() == [0, 1, 4]


def test_report_from_a_results_store(tmp_path):
    """The same numbers through the run path's store (rows as JSON files, dotted config keys)."""
    from harness.results import ResultsStore

    exp = ResultsStore(str(tmp_path)).experiment("demo")
    exp.write_manifest({"name": "demo"})
    for i, row in enumerate(_store().to_dict("records")):
        row = {k.removeprefix("config."): v for k, v in row.items()}
        row["config_hash"] = f"h{i:02d}"
        row["gmacs"] = row.pop("fvcore_gmacs", None)
        exp.write_row(row["config_hash"], row)
    table = compare(tmp_path)
    assert table.loc["dense", "map_ci95"] == pytest.approx(_ci([0.30, 0.32, 0.34]))
    assert table.loc["selection=topk,ratio=0.5", "gmacs_delta_pct"] == pytest.approx(-25.0)
    assert len(build_report(tmp_path / "demo").failures) == 1


def test_axis_tables_of_the_default_grid_layout():
    """Named-axis / one-factor grids: every axis gets the slice where the others agree."""
    rows = [_row("dense", 0, "dense", map=0.3)]
    for name, sel, ratio, sup in [
        ("topk-0.25", "topk", 0.25, "labels"), ("topk-0.5", "topk", 0.5, "labels"),
        ("topk-0.75", "topk", 0.75, "labels"), ("random-0.5", "random", 0.5, "labels"),
        ("gate", "gate", 0.5, "labels"), ("gate-nosup", "gate", 0.5, "none"),
    ]:  # fmt: skip
        rows.append(
            {**_row(name, 0, selection=sel, ratio=ratio, map=0.2), "config.model.spa.supervision": sup}
        )
    report = build_report(pd.DataFrame(rows))
    assert {k: list(t.index) for k, t in report.axes.items()} == {
        "model.spa.selection": ["dense", "gate", "random-0.5", "topk-0.5"],
        "model.spa.ratio": ["dense", "topk-0.25", "topk-0.5", "topk-0.75"],
        "model.spa.supervision": ["dense", "gate", "gate-nosup"],
    }
    assert report.axes["model.spa.ratio"].attrs["held"] == {
        "model.spa.selection": "topk",
        "model.spa.supervision": "labels",
    }
    assert (
        "## Axis `model.spa.supervision` (others held at model.spa.selection=gate, model.spa.ratio=0.5)"
        in (report_command(pd.DataFrame(rows)))
    )


def test_each_variant_compared_with_the_dense_of_its_own_context():
    """A store holding two grids (different data sizes): deltas never cross between them."""
    rows = []
    for size, dense_map, spa_map, dense_g, spa_g in [(64, 0.10, 0.12, 1.0, 0.8), (128, 0.30, 0.27, 4.0, 3.0)]:
        for name, variant, m, g in [("dense", "dense", dense_map, dense_g), ("spa", "spa", spa_map, spa_g)]:
            rows.append(
                {**_row(name, 0, variant, map=m, gmacs=g, infer_ms=g * 10), "config.data.image_size": size}
            )
    report = build_report(pd.DataFrame(rows))
    t = report.table
    assert report.baseline is None and len(report.baselines) == 2
    spa = t[t.index.str.startswith("spa")]
    small, large = spa.index[spa["data.image_size"] == 64][0], spa.index[spa["data.image_size"] == 128][0]
    assert t.loc[small, "map_delta"] == pytest.approx(0.02) and t.loc[large, "map_delta"] == pytest.approx(
        -0.03
    )
    assert t.loc[small, "gmacs_delta_pct"] == pytest.approx(-20.0) and t.loc[
        large, "flop_speedup"
    ] == pytest.approx(4 / 3)
    assert t.loc[small, "baseline"] != t.loc[large, "baseline"]
    assert "column `vs`" in report_command(pd.DataFrame(rows))
    # an explicit baseline serves every variant
    forced = compare(pd.DataFrame(rows), baseline=t.loc[small, "baseline"])
    assert forced.loc[large, "map_delta"] == pytest.approx(0.27 - 0.10)


def test_csv_verdict_reads_n_a_where_the_markdown_does():
    """A variant with no verdict (here: no dense variant shares its training steps) reads ``n/a`` in
    the CSV as in the Markdown, not a blank cell."""
    rows = []
    for s in range(3):
        rows.append(_row("dense", s, "dense", map=0.30 + 0.01 * s))
        rows.append(_row("topk", s, map=0.31 + 0.01 * s))
        rows.append({**_row("topk-long", s, map=0.35), "config.train.steps": 20})
    df = pd.DataFrame(rows)
    table = pd.read_csv(io.StringIO(report_command(df, fmt="csv")), index_col=0, keep_default_na=False)
    verdicts = dict(zip(table.index, table["verdict"]))
    long = [v for v in verdicts if "20" in v or "long" in v]
    assert long and all(verdicts[v] == "n/a" for v in long), verdicts
    assert "" not in verdicts.values()
