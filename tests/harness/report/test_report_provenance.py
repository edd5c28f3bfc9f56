"""harness/report/provenance.py through ``report_command``: every format says which commits, hosts,
package versions and devices the rows came from, and warns when one table's rows come from more than
one commit."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.report import build_report, report_command
from harness.report.provenance import provenance_of
from tests.harness._helpers import result_row

C1, C2 = "c0ffee" + "1" * 34, "deadbeef" + "2" * 32 + "+dirty"
S1, S2 = C1[:12], C2[:12] + "+dirty"  # as the report shows them
NODE_A, NODE_B = "a1b2c3d4" + "0" * 48, "e5f6a7b8" + "0" * 48


def _rows(commits: list[str]) -> pd.DataFrame:
    """Dense and topk-0.5 over len(commits)//2 seeds; row i recorded commit commits[i]."""
    rows = []
    for i, commit in enumerate(commits):
        name, sel = ("dense", None) if i % 2 == 0 else ("topk-0.5", "topk")
        row = result_row(name, i // 2, sel, 0.5 if sel else None, map=0.3 + 0.01 * i, gmacs=1.0 + (i % 2))
        row.update(
            git_commit=commit,
            hostname="host-a" if i % 2 == 0 else "host-b",
            node_id=NODE_A if i % 2 == 0 else NODE_B,
            torch_version="2.13.0",
            ray_version="2.60.0",
            deepspeed_version="0.18.2",
            python_version="3.11.9",
            device="cpu (Test CPU, 1 threads)",
        )
        rows.append(row)
    return pd.DataFrame(rows)


def test_every_format_shows_where_the_rows_came_from():
    df = _rows([C1] * 6)
    md = report_command(df, fmt="md")
    section = md.split("## Provenance", 1)[1].split("## Notes", 1)[0]
    for text in ("| commit ", S1, "host-a (node a1b2c3d4)", "host-b (node e5f6a7b8)", "2.13.0",
                 "2.60.0", "0.18.2", "cpu (Test CPU, 1 threads)"):  # fmt: skip
        assert text in section, (text, section)
    commit_line = next(ln for ln in section.splitlines() if ln.startswith("| commit"))
    assert [c.strip() for c in commit_line.strip("|").split("|")] == ["commit", S1, "6", "all"]
    assert "WARNING: the rows" not in md

    html = report_command(df, fmt="html")
    assert "<h2>Provenance</h2>" in html and "host-b (node e5f6a7b8)" in html and "0.18.2" in html

    data = json.loads(report_command(df, fmt="json"))
    prov = data["provenance"]
    assert prov["warning"] is None and prov["commits"] == {C1: 6}
    whats = {(r["what"], r["value"]): r["trials"] for r in prov["rows"]}
    assert whats[("commit", S1)] == 6 and whats[("host", "host-a (node a1b2c3d4)")] == 3
    assert whats[("torch", "2.13.0")] == whats[("ray", "2.60.0")] == whats[("deepspeed", "0.18.2")] == 6
    assert whats[("device", "cpu (Test CPU, 1 threads)")] == 6

    table = pd.read_csv(io.StringIO(report_command(df, fmt="csv")), index_col=0)
    assert table.loc["dense", "git_commit"] == C1 and table.loc["dense", "hosts"] == "host-a (node a1b2c3d4)"
    assert table.loc["topk-0.5", "hosts"] == "host-b (node e5f6a7b8)"
    assert (table["deepspeed_version"] == "0.18.2").all() and (table["ray_version"] == "2.60.0").all()


def test_a_table_whose_rows_come_from_two_commits_warns_in_every_format(tmp_path):
    df = _rows([C1, C1, C1, C1, C2, C2])
    warning = "WARNING: the rows of this table come from 2 commits"
    md = report_command(df, fmt="md")
    assert warning in md.split("|", 1)[0]  # above the table
    assert f"{S1} (4 trials), {S2} (2 trials)" in md
    assert warning in report_command(df, fmt="html")
    assert json.loads(report_command(df, fmt="json"))["provenance"]["warning"].startswith(warning)
    table = pd.read_csv(io.StringIO(report_command(df, fmt="csv")), index_col=0)
    assert table.loc["dense", "git_commit"] == f"{C1}; {C2}"  # the variant that mixes them
    said = []
    report_command(df, fmt="csv", out=tmp_path / "out", warn=said.append)
    assert len(said) == 1 and said[0].startswith("exp: the rows of this table come from 2 commits")
    prov = pd.read_csv(tmp_path / "out" / "provenance.csv")
    assert list(prov.columns) == ["what", "value", "trials", "variants"]
    assert set(prov.loc[prov["what"] == "commit", "trials"]) == {4, 2}


def test_failed_rows_count_in_provenance_but_not_in_the_commit_warning():
    df = _rows([C1, C1])
    failed = {**df.iloc[1].to_dict(), "status": "failed", "config_hash": "f", "git_commit": C2, "map": None}
    report = build_report(pd.concat([df, pd.DataFrame([failed])], ignore_index=True))
    assert report.provenance.warning is None and report.provenance.commits == {C1: 2}
    commits = report.provenance.table[report.provenance.table["what"] == "commit"]
    assert dict(zip(commits["value"], commits["trials"])) == {S1: 2, S2: 1}


def test_rows_without_provenance_columns_say_so():
    df = pd.DataFrame([result_row("dense", s, map=0.3) for s in range(3)])
    md = report_command(df, fmt="md")
    assert "## Provenance\n\nNo provenance columns in these rows." in md
    assert json.loads(report_command(df, fmt="json"))["provenance"] == {
        "warning": None,
        "commits": {},
        "rows": [],
    }


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([C1, C2, "unknown", None]), min_size=1, max_size=12))
def test_the_warning_is_raised_exactly_when_done_rows_name_several_commits(commits):
    df = _rows(commits)
    done = pd.Series(True, index=df.index)
    variants = df["name"].astype(str)
    prov = provenance_of(df, variants, done)
    named = [c for c in commits if c is not None]
    assert prov.commits == {c: named.count(c) for c in set(named)}
    assert (prov.warning is not None) == (len(set(named)) > 1)
    lines = prov.table[prov.table["what"] == "commit"]
    assert lines["trials"].sum() == len(named)  # a row without a commit is in no line
    hosts = prov.table[prov.table["what"] == "host"]
    assert hosts["trials"].sum() == len(commits)
    assert all(v == "all" or set(v.split(", ")) <= {"dense", "topk-0.5"} for v in prov.table["variants"])


@pytest.mark.parametrize("fmt", ["md", "csv", "html", "json"])
def test_a_store_on_disk_reports_its_provenance_in_every_format(tmp_path, fmt):
    from harness.results import ResultsStore

    exp = ResultsStore(str(tmp_path)).experiment("exp")
    df = _rows([C1, C2])
    exp.write_manifest({"name": "exp", "trials": []})
    for row in df.to_dict("records"):
        exp.write_row(row["config_hash"], {k: v for k, v in row.items() if k != "experiment"})
    said = []
    text = report_command(str(tmp_path / "exp"), fmt=fmt, warn=said.append)
    assert said and "come from 2 commits" in said[0]
    assert S2 in text or C2 in text
