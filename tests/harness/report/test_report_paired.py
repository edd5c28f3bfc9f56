"""The comparison report's paired statistics end to end (harness/report/command.py with tables, axes, render):
verdicts and intervals on rows with a known effect, the few-seeds warning, the noise floor, the
120-column table, named grid axes, one section per experiment, and where ``--out`` writes."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.report import build_report, build_reports, report_command
from harness.results import ResultsStore
from tests.harness._helpers import DEFAULT_VARIANTS, result_row


def _grid_rows(seeds: int, effects=DEFAULT_VARIANTS, seed_offset: float = 0.05) -> pd.DataFrame:
    """Rows of the default grid: every seed moves every variant's mAP by the same large offset (what
    a seed does to both trials of a pair), plus a small noise of the variant's own."""
    rng = np.random.default_rng(1)
    offsets = rng.normal(0.0, seed_offset, size=seeds)
    rows = []
    for s in range(seeds):
        base = 0.40 + offsets[s]
        rows.append(result_row("dense", s, map=base, gmacs=2.0, infer_ms=10.0 + s))
        for name, (sel, ratio, effect) in effects.items():
            noise = rng.normal(0.0, 0.002)
            rows.append(result_row(name, s, sel, ratio, map=base + effect + noise,
                                   gmacs=2.0 * (0.5 + ratio / 2), infer_ms=9.0 + s,
                                   speedup_vs_dense=1.1 + 0.01 * s, speedup_vs_dense_q1=1.05,
                                   speedup_vs_dense_q3=1.15, kept_fraction=ratio, gate_recall=0.8))  # fmt: skip
    return pd.DataFrame(rows)


def _table_lines(md: str) -> list[str]:
    return [ln for ln in md.splitlines() if ln.startswith("|")]


def test_known_effects_get_their_verdicts():
    rows = _grid_rows(5)
    report = build_report(rows)
    t = report.table
    assert t.loc["gate", "verdict"] == "better"
    assert t.loc["gate", "map_delta_lo"] > 0 and t.loc["gate", "map_delta"] == pytest.approx(0.05, abs=0.004)
    assert t.loc["random-0.5", "verdict"] == "worse" and t.loc["topk-0.25", "verdict"] == "worse"
    for null in ("topk-0.5", "topk-0.75", "gate-nosup"):
        assert t.loc[null, "verdict"] == "no detectable difference", null
        assert t.loc[null, "map_delta_lo"] < 0 < t.loc[null, "map_delta_hi"]
    # the seeds' offset (std 0.05) is the baseline's noise floor; the paired deltas do not carry it
    assert report.noise_floor["dense"] == pytest.approx(rows.query("name == 'dense'")["map"].std(ddof=1))
    assert report.noise_floor["dense"] > 5 * (t.loc["gate", "map_delta_hi"] - t.loc["gate", "map_delta_lo"])
    md = report_command(_grid_rows(5), fmt="md")
    assert "Noise floor (the baseline's own seed-to-seed spread of mAP): `dense`" in md
    assert "WARNING" not in md


def test_two_seeds_warn_above_the_table_and_give_no_verdict():
    md = report_command(_grid_rows(2), fmt="md")
    lines = md.splitlines()
    warn = next(i for i, ln in enumerate(lines) if "WARNING: 2 seed(s) per variant" in ln)
    assert warn < lines.index(_table_lines(md)[0])
    assert "cannot be told from noise" in md
    assert (build_report(_grid_rows(2)).table["verdict"].drop("dense") == "n/a").all()
    data = json.loads(report_command(_grid_rows(2), fmt="json"))
    assert "cannot be told from noise" in data["warning"]
    assert {r["verdict"] for r in data["table"]} == {"baseline", "n/a"}


def test_the_markdown_table_fits_120_columns():
    md = report_command(_grid_rows(5), fmt="md")
    table = _table_lines(md)
    assert max(len(ln) for ln in md.splitlines()) <= 120
    assert [c.strip() for c in table[0].split("|")[1:-1]] == [
        "variant", "mAP", "Δ mAP", "verdict", "Δ GMACs", "speedup vs dense", "kept", "gate R",
    ]  # fmt: skip
    assert any(ln.startswith("| gate-nosup ") and "no detectable difference" in ln for ln in table)
    assert any("1.12x (1." in ln for ln in table)  # the speedup with its interval over seeds
    # names too long for the width become keys, with a legend under the table
    long = _grid_rows(3).replace(
        {"name": {n: f"selection={n},supervision=labels,stages=3-4" for n in DEFAULT_VARIANTS}}
    )
    long["config_hash"] = long["name"] + long["seed"].astype(str)
    md = report_command(long, fmt="md")
    assert max(len(ln) for ln in _table_lines(md)) <= 120
    assert "v1 = selection=gate,supervision=labels,stages=3-4" in md


def test_csv_and_json_hold_every_column():
    df = _grid_rows(3)
    table = pd.read_csv(io.StringIO(report_command(df, fmt="csv")), index_col=0)
    for col in ("map_delta", "map_delta_lo", "map_delta_hi", "map_delta_n", "gmacs_delta_pct_lo", "speedup_lo",
                "speedup_hi", "speedup_n", "speedup_source", "verdict", "map_noise_floor", "n_paired", "seeds"):  # fmt: skip
        assert col in table, col
    assert table.loc["gate", "map_noise_floor"] == pytest.approx(df.query("name == 'dense'")["map"].std())
    data = json.loads(report_command(df, fmt="json"))
    assert data["noise_floor"]["dense"] == pytest.approx(df.query("name == 'dense'")["map"].std())
    assert data["n_seeds"] == 3 and "paired by seed" in data["interval"]


def test_a_named_axis_gets_its_table_with_every_value():
    """A plugin grid whose named ``selection`` axis changes the gate and the ratio together: the table
    is ``selection`` with all its values, not ``model.spa.gate`` at one ratio."""
    rows = []
    for s in range(3):
        rows.append(result_row("dense", s, map=0.3, gmacs=2.0))
        for label, gate, ratio in (("norm-0.25", "feature_norm", 0.25), ("norm-0.5", "feature_norm", 0.5),
                                   ("linear", "linear", 0.5)):  # fmt: skip
            r = result_row(label, s, "topk", ratio, map=0.3, gmacs=1.5)
            rows.append({**r, "model.spa.gate": gate, "axis.selection": label})
    report = build_report(pd.DataFrame(rows))
    assert list(report.axes) == ["selection"]
    t = report.axes["selection"]
    assert t["selection"].tolist() == [None, "linear", "norm-0.25", "norm-0.5"]  # None: the baseline
    md = report_command(pd.DataFrame(rows), fmt="md")
    assert "## Axis `selection` (the only axis)" in md and "| norm-0.25 " in md


def _write(store, experiment: str, rows: pd.DataFrame, source: str | None = None) -> None:
    exp = ResultsStore(str(store)).experiment(experiment)
    exp.write_manifest({"name": experiment, "source": source})
    for row in rows.drop(columns=["experiment"]).to_dict("records"):
        row["config_hash"] = f"{experiment}-{row['config_hash']}"
        exp.write_row(row["config_hash"], row)


def test_named_axes_from_the_experiments_grid_file(tmp_path):
    grid = tmp_path / "plug.yaml"
    grid.write_text(
        "name: plug\naxes:\n  selection:\n    topk-0.5: {model.spa.selection: topk, model.spa.ratio: 0.5}\n"
        "    gate: {model.spa.selection: gate}\npoints:\n  - {name: dense, model.variant: dense}\nseeds: 3\n"
    )
    rows = _grid_rows(3, {k: DEFAULT_VARIANTS[k] for k in ("topk-0.5", "gate")})
    _write(tmp_path / "store", "plug", rows, str(grid))
    report = build_report(rows)  # rows without the labels: the axis is inferred from the config
    assert "selection" not in report.axes
    named = build_reports(tmp_path / "store" / "plug")["plug"]
    assert list(named.axes) == ["selection"]
    assert named.axes["selection"]["selection"].tolist() == [None, "gate", "topk-0.5"]


def test_each_experiment_is_reported_apart_unless_merged(tmp_path, capsys):
    store = tmp_path / "store"
    _write(store, "first", _grid_rows(3, {"gate": DEFAULT_VARIANTS["gate"]}))
    _write(store, "second", _grid_rows(3, {"topk-0.5": DEFAULT_VARIANTS["topk-0.5"]}))
    reports = build_reports(store)
    assert list(reports) == ["first", "second"]
    assert list(reports["first"].table.index) == ["dense", "gate"]
    md = report_command(store, fmt="md")
    assert "# SPA vs dense: 2 experiments" in md
    assert md.index("## SPA vs dense: first") < md.index("## SPA vs dense: second")
    merged = build_reports(store, merge=True)
    assert list(merged) == [None] and list(merged[None].table.index) == ["dense", "gate", "topk-0.5"]
    assert main(["report", str(store), "--merge", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out), index_col=0)
    assert "experiment" not in table and len(table) == 3
    csv = report_command(store, fmt="csv")
    assert pd.read_csv(io.StringIO(csv))["experiment"].tolist() == ["first", "first", "second", "second"]


def test_out_names_a_file_or_a_folder(tmp_path, capsys):
    store = tmp_path / "store"
    _write(store, "exp", _grid_rows(3, {"gate": DEFAULT_VARIANTS["gate"]}))
    page = tmp_path / "web" / "page.html"
    assert main(["report", str(store), "--out", str(page)]) == 0  # the format from the suffix
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "src='data:image/png;base64," in text
    assert text.index("<table") < text.index("alt='accuracy_vs_gmacs'") < text.index("Every column")
    assert sorted(p.name for p in page.parent.iterdir()) == ["page.html"]  # the plots are embedded
    assert "table-layout:fixed" in text and "overflow-wrap:anywhere" in text  # no scrolling at 1400 px
    assert main(["report", str(store), "--format", "html", "--out", str(tmp_path / "dir")]) == 0
    assert (tmp_path / "dir" / "index.html").read_text().count("<table") >= 2
    assert (tmp_path / "dir" / "plots" / "accuracy_vs_gmacs.png").exists()
    assert "report written to" in capsys.readouterr().out


@pytest.mark.parametrize("order", [1, 2])
def test_pairs_are_matched_by_seed_not_by_row_order(order):
    rows = _grid_rows(4, {"gate": DEFAULT_VARIANTS["gate"]})
    shuffled = rows.sample(frac=1.0, random_state=order)
    a, b = build_report(rows).table, build_report(shuffled).table
    for col in ("map_delta", "map_delta_lo", "map_delta_hi", "speedup", "gmacs_delta_pct"):
        assert b.loc["gate", col] == pytest.approx(a.loc["gate", col]), col
    assert b.loc["gate", "verdict"] == "better"
