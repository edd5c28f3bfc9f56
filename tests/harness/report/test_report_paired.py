"""The comparison report's paired statistics end to end (harness/report/command.py with tables, axes, render):
verdicts and intervals on rows with a known effect, the correction across a table, the equivalence
margin and the contrasts a grid declares, the minimum detectable effect, the few-seeds warning, the
noise line, the 120-column table, named grid axes, one section per experiment, and where ``--out``
writes."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.grid import Comparisons, Contrast
from harness.report import build_report, build_reports, report_command
from harness.report.stats import ALPHA, holm, min_detectable_effect
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
        rows.append(result_row("dense", s, map=base, gmacs=2.0, infer_ms=10.0 + s, forward_ms=8.0 + s))
        for name, (sel, ratio, effect) in effects.items():
            noise = rng.normal(0.0, 0.002)
            rows.append(result_row(name, s, sel, ratio, map=base + effect + noise,
                                   gmacs=2.0 * (0.5 + ratio / 2), infer_ms=9.0 + s, forward_ms=7.0 + s,
                                   speedup_vs_dense=1.1 + 0.01 * s, speedup_vs_dense_q1=1.05,
                                   speedup_vs_dense_q3=1.15, speedup_timed="backbone+head",
                                   kept_fraction=ratio, gate_recall=0.8))  # fmt: skip
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
        assert t.loc[null, "verdict"] == "inconclusive", null  # no margin declared: never equivalent
        assert t.loc[null, "map_delta_lo"] < 0 < t.loc[null, "map_delta_hi"]
    # the seeds' offset (std 0.05) is the baseline's noise floor; the paired deltas do not carry it
    assert report.noise_floor["dense"] == pytest.approx(rows.query("name == 'dense'")["map"].std(ddof=1))
    assert report.noise_floor["dense"] > 5 * (t.loc["gate", "map_delta_hi"] - t.loc["gate", "map_delta_lo"])
    # the noise the verdicts rest on: each row's spread of its per-seed differences (about 0.002 here)
    per_seed = rows.pivot(index="seed", columns="name", values="map")
    for v in DEFAULT_VARIANTS:
        assert t.loc[v, "map_delta_sd"] == pytest.approx((per_seed[v] - per_seed["dense"]).std(ddof=1))
    assert 0.0005 < report.delta_spread["dense"] < 0.005 < report.noise_floor["dense"]
    md = report_command(_grid_rows(5), fmt="md")
    noise = " ".join(ln for ln in md.split("\n\n") if ln.startswith("Noise:")).replace("\n", " ")
    sds = t["map_delta_sd"].dropna()
    assert f"per-seed Δ mAP from `dense`: SD {sds.min():.4f}-{sds.max():.4f} over its rows" in noise
    assert f"(pooled {report.delta_spread['dense']:.4f})" in noise
    assert f"`dense`'s own SD of mAP: {report.noise_floor['dense']:.4f} over 5 seeds" in noise
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
        "variant", "mAP", "Δ mAP", "verdict", "MDE", "Δ GMACs", "fwd speedup vs dense", "kept", "gate R",
    ]  # fmt: skip
    assert any(ln.startswith("| gate-nosup ") and "inconclusive" in ln for ln in table)
    assert "fwd: the backbone and head forward, without score threshold and NMS" in " ".join(md.split())
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
                "speedup_hi", "speedup_n", "speedup_source", "speedup_timed", "verdict", "map_noise_floor",
                "map_delta_sd", "map_mde", "map_p_difference", "map_p_difference_holm", "map_p_equivalence",
                "map_p_equivalence_holm", "n_paired", "seeds"):  # fmt: skip
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


# --- what the grid declares: the equivalence margin and the contrasts ------------------------------------

GATE_VS_RANDOM = Contrast("gate vs random-0.5", "gate", "random-0.5")


def test_a_contrast_is_paired_per_seed_with_its_interval_and_verdict():
    rows = _grid_rows(5)
    report = build_report(rows, comparisons=Comparisons(0.01, (GATE_VS_RANDOM,)))
    c = report.contrasts.loc["gate vs random-0.5"]
    per_seed = rows.pivot(index="seed", columns="name", values="map")
    d = per_seed["gate"] - per_seed["random-0.5"]  # gate +0.05 and random -0.08 against dense: +0.13
    assert (c["a"], c["b"], c["n_paired"], c["map_delta_n"]) == ("gate", "random-0.5", 5, 5)
    assert c["map_delta"] == pytest.approx(d.mean()) and c["map_delta_sd"] == pytest.approx(d.std(ddof=1))
    assert c["map_delta_lo"] < 0.13 < c["map_delta_hi"] and c["verdict"] == "better"
    assert c["gmacs_delta_pct"] == pytest.approx(
        0.0
    )  # the same compute: where the tokens are is all that differs
    reverse = build_report(rows, comparisons=Comparisons(None, (Contrast("r", "random-0.5", "gate"),)))
    assert reverse.contrasts.loc["r", "map_delta"] == pytest.approx(-d.mean())
    assert reverse.contrasts.loc["r", "verdict"] == "worse"


def test_contrasts_are_shown_under_the_main_table_and_in_every_format(tmp_path):
    rows = _grid_rows(5)
    comparisons = Comparisons(0.01, (GATE_VS_RANDOM, Contrast("topk", "topk-0.5", "topk-0.75")))
    md = report_command(rows, fmt="md", comparisons=comparisons)
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| contrast "))
    assert (
        lines.index(_table_lines(md)[0])
        < head
        < next(i for i, ln in enumerate(lines) if ln.startswith("## "))
    )
    assert [c.strip() for c in lines[head].split("|")[1:-1]] == [
        "contrast",
        "Δ mAP",
        "verdict",
        "MDE",
        "Δ GMACs",
    ]
    assert any(ln.startswith("| gate vs random-0.5 ") and "| better " in ln for ln in lines)
    assert any(ln.startswith("| topk ") and "| equivalent " in ln for ln in lines)
    assert max(len(ln) for ln in lines) <= 120
    table = pd.read_csv(io.StringIO(report_command(rows, fmt="csv", comparisons=comparisons)), index_col=0)
    assert table["row"].tolist() == ["variant"] * 7 + ["contrast"] * 2
    assert table.loc["gate vs random-0.5", "verdict"] == "better" and table.loc["topk", "a"] == "topk-0.5"
    data = json.loads(report_command(rows, fmt="json", comparisons=comparisons))
    assert [c["contrast"] for c in data["contrasts"]] == ["gate vs random-0.5", "topk"]
    assert data["verdicts"]["family"] == 8 and data["verdicts"]["equivalence_margin"] == 0.01
    page = report_command(rows, fmt="html", comparisons=comparisons)
    assert page.index("<td>gate vs random-0.5</td>") < page.index("Every column")
    # the prose above and under the tables renders its code spans: no stray backticks on the page
    prose = re.findall(r"<p>(.*?)</p>", page, flags=re.S)
    assert any("<code>contrasts:</code>" in p for p in prose) and any(
        "<code>dense</code>" in p for p in prose
    )
    assert not any("`" in p for p in prose)
    report_command(rows, fmt="csv", out=tmp_path, comparisons=comparisons)
    assert pd.read_csv(tmp_path / "contrasts.csv", index_col=0).loc["topk", "verdict"] == "equivalent"


def test_equivalent_needs_the_grids_margin():
    rows = _grid_rows(5)
    nulls = ["topk-0.5", "topk-0.75", "gate-nosup"]  # true effect 0, per-seed noise 0.002
    without = build_report(rows).table
    assert (without.loc[nulls, "verdict"] == "inconclusive").all()
    assert without["map_p_equivalence"].isna().all()
    within = build_report(rows, comparisons=Comparisons(0.01)).table
    assert (within.loc[nulls, "verdict"] == "equivalent").all()
    assert within.loc["gate", "verdict"] == "better" and within.loc["random-0.5", "verdict"] == "worse"
    tight = build_report(rows, comparisons=Comparisons(0.0005)).table  # inside the noise: not shown
    assert not (tight.loc[nulls, "verdict"] == "equivalent").any()
    md = report_command(rows, fmt="md", comparisons=Comparisons(0.01))
    assert "equivalent (inside ±0.01 by two one-sided tests)" in " ".join(md.split())
    assert "equivalent (never: the grid declares no margin)" in " ".join(
        report_command(rows, fmt="md").split()
    )


def _rows_with_differences(diffs: dict[str, list[float]]) -> pd.DataFrame:
    """Rows whose per-seed mAP differences from dense are exactly ``diffs`` (dense itself varies by seed)."""
    n = len(next(iter(diffs.values())))
    rows = [result_row("dense", s, map=0.4 + 0.03 * s, gmacs=2.0) for s in range(n)]
    for name, d in diffs.items():
        rows += [result_row(name, s, "topk", 0.5, map=0.4 + 0.03 * s + d[s], gmacs=1.5) for s in range(n)]
    return pd.DataFrame(rows)


def test_the_verdicts_are_holm_corrected_across_the_table_and_the_rule_is_named_under_it():
    """A row whose paired t-test gives p = 0.03 alone: better in a table of one, inconclusive among six
    comparisons (Holm: 0.03 x 6 > 0.05)."""
    hit = [0.010, 0.004, 0.012, 0.002, 0.007]
    alone = build_report(_rows_with_differences({"hit": hit})).table
    p = alone.loc["hit", "map_p_difference"]
    assert 0.01 < p < ALPHA and alone.loc["hit", "verdict"] == "better"
    nulls = {f"null{i}": list(np.random.default_rng(i).normal(0, 0.004, 5)) for i in range(4)}
    report = build_report(
        _rows_with_differences({"hit": hit, **nulls}),
        comparisons=Comparisons(None, (Contrast("c", "null0", "null1"),)),
    )
    t = report.table
    judged = [*t["map_p_difference"].drop("dense"), report.contrasts.loc["c", "map_p_difference"]]
    assert report.family == 6 and report.mde_alpha == pytest.approx(ALPHA / 6)
    assert list(t["map_p_difference_holm"].drop("dense")) == pytest.approx(list(holm(judged)[:5]))
    assert t.loc["hit", "map_p_difference"] == pytest.approx(p)  # the raw p does not depend on the others
    assert t.loc["hit", "verdict"] == "inconclusive"
    md = " ".join(report_command(_rows_with_differences({"hit": hit, **nulls}), fmt="md").split())
    assert (
        "Verdicts: Holm's correction across the 5 comparisons of this report (5 rows) at 5% family-wise" in md
    )
    assert "MDE at 80% power and 1% two-sided (5%/5, Holm's strictest step)" in md


def test_every_row_shows_its_minimum_detectable_effect():
    diffs = {"a": [0.01, 0.02, 0.0, 0.015, 0.005], "b": [0.001, -0.001, 0.0, 0.002, -0.002]}
    report = build_report(_rows_with_differences(diffs))
    t = report.table
    for name, d in diffs.items():
        sd = float(np.std(d, ddof=1))
        assert t.loc[name, "map_mde"] == pytest.approx(min_detectable_effect(sd, 5, alpha=ALPHA / 2))
    assert t.loc["a", "map_mde"] > t.loc["b", "map_mde"] and np.isnan(t.loc["dense", "map_mde"])
    md = report_command(_rows_with_differences(diffs), fmt="md")
    head, *body = ([c.strip() for c in ln.split("|")[1:-1]] for ln in _table_lines(md) if "---" not in ln)
    cells = dict(zip(head, next(r for r in body if r[0] == "a")))
    decimals = len(cells["Δ mAP"].split("±")[1].split(".")[1])  # the MDE at the precision of the delta
    assert cells["MDE"] == f"{t.loc['a', 'map_mde']:.{decimals}f}"
    two = build_report(_rows_with_differences({k: v[:2] for k, v in diffs.items()})).table
    assert two["map_mde"].isna().all() and (two["verdict"].drop("dense") == "n/a").all()


def test_margin_and_contrasts_come_from_the_experiment_json_or_its_grid_file(tmp_path):
    rows = _grid_rows(3, {k: DEFAULT_VARIANTS[k] for k in ("gate", "random-0.5", "topk-0.5")})
    declared = Comparisons(0.02, (GATE_VS_RANDOM,))
    store = tmp_path / "store"
    _write(store, "manifest", rows)
    exp = ResultsStore(str(store)).experiment("manifest")
    exp.write_manifest({"name": "manifest", "source": None, "report": declared.to_dict()})
    got = build_reports(store / "manifest")["manifest"]
    assert got.comparisons == declared and list(got.contrasts.index) == ["gate vs random-0.5"]
    # an older experiment without them: its grid file's
    grid = tmp_path / "g.yaml"
    grid.write_text(
        "axes:\n  selection:\n    gate: {model.spa.selection: gate}\n    random-0.5: {model.spa.selection: random}\n"
        "    topk-0.5: {model.spa.selection: topk}\npoints:\n  - {name: dense, model.variant: dense}\n"
        "equivalence_margin: 0.03\ncontrasts: {where: [gate, random-0.5]}\n"
    )
    _write(store, "old", rows, str(grid))
    old = build_reports(store / "old")["old"]
    assert old.comparisons.equivalence_margin == 0.03 and list(old.contrasts.index) == ["where"]
    # a damaged entry: none, with a note
    _write(store, "bad", rows)
    ResultsStore(str(store)).experiment("bad").write_manifest(
        {"name": "bad", "report": {"equivalence_margin": -1}}
    )
    bad = build_reports(store / "bad")["bad"]
    assert bad.comparisons == Comparisons() and any("equivalence_margin" in n for n in bad.notes)
    # several experiments merged: the margin only when they agree
    assert build_reports(store, merge=True)[None].comparisons == Comparisons()


def test_a_contrast_of_a_variant_without_rows_is_left_out_with_a_note():
    report = build_report(_grid_rows(3), comparisons=Comparisons(None, (Contrast("x", "gate", "gone"),)))
    assert len(report.contrasts) == 0 and any("contrast 'x'" in n and "gone" in n for n in report.notes)


def test_the_speedup_header_says_what_was_timed():
    """Rows timed by the current run path carry ``speedup_timed`` (backbone and head): ``fwd``. Rows of
    an older run timed the whole inference call, NMS included: ``e2e``. A cross-trial speedup divides
    ``forward_ms`` when the rows have it, not ``infer_ms``."""

    def header(md: str) -> str:
        return next(c.strip() for c in _table_lines(md)[0].split("|") if "speedup" in c)

    rows = _grid_rows(3, {"gate": DEFAULT_VARIANTS["gate"]})
    assert header(report_command(rows, fmt="md")) == "fwd speedup vs dense"
    older = rows.drop(columns=["speedup_timed"])
    md = " ".join(report_command(older, fmt="md").split())
    assert "| e2e speedup vs dense |" in md and "e2e: the whole inference call, NMS included" in md
    cross = rows.drop(columns=["speedup_vs_dense", "speedup_timed"])
    t = build_report(cross).table
    assert (
        t.loc["gate", "speedup_source"] == "cross-trial" and t.loc["gate", "speedup_timed"] == "backbone+head"
    )
    per_seed = cross.pivot(index="seed", columns="name", values="forward_ms")
    assert t.loc["gate", "speedup"] == pytest.approx(
        np.exp(np.log(per_seed["dense"] / per_seed["gate"]).mean())
    )
    no_forward = build_report(cross.drop(columns=["forward_ms"])).table
    assert no_forward.loc["gate", "speedup_timed"] == "inference call"


def test_contrasts_are_judged_without_a_dense_baseline_too():
    rows = _grid_rows(4)
    rows = rows[rows["name"] != "dense"]
    report = build_report(rows, comparisons=Comparisons(None, (GATE_VS_RANDOM,)))
    assert report.baselines == [] and report.family == 1
    assert report.contrasts.loc["gate vs random-0.5", "verdict"] == "better"
    md = " ".join(report_command(rows, fmt="md", comparisons=Comparisons(None, (GATE_VS_RANDOM,))).split())
    assert "| gate vs random-0.5 |" in md and "across the 1 comparison of this report (1 contrast)" in md
