"""Where a report's rows came from: the commits, hosts, package versions and devices they record.

Every row carries ``git_commit`` (the driver's commit when the trial ran), ``hostname`` and
``node_id`` (where its process ran), ``torch_version``, ``ray_version``, ``deepspeed_version``,
``python_version`` and ``device`` (``harness.run.rows``, ``harness.provenance``). A report shows them
in two forms:

- ``Provenance.table``: one line per distinct value of each aspect (``what``: commit, host, torch,
  ray, deepspeed, python, device), with the number of trials and the variants that carry it; the
  Markdown and HTML reports print it as their Provenance section, JSON holds it;
- ``variant_columns``: per variant, the distinct values of each aspect joined by ``; `` (columns
  ``git_commit``, ``hosts``, ``torch_version``, ...), which the report's table gets, so its CSV says
  where each variant's rows came from.

``Provenance.warning`` is set when the done rows (those the table aggregates) come from more than one
commit: their deltas may mix code versions.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.provenance import node_label, short_commit

__all__ = [
    "ASPECTS",
    "Provenance",
    "provenance_of",
    "variant_columns",
    "markdown",
    "html_section",
    "html_warning",
    "json_data",
]

# (what, the row's column, the per-variant column); the host is hostname and node_id together
ASPECTS = (
    ("commit", "git_commit", "git_commit"),
    ("host", "hostname", "hosts"),
    ("torch", "torch_version", "torch_version"),
    ("ray", "ray_version", "ray_version"),
    ("deepspeed", "deepspeed_version", "deepspeed_version"),
    ("python", "python_version", "python_version"),
    ("device", "device", "device"),
)
_LISTED = 6  # variants named in a line before "and N more"
_COLUMNS = ("what", "value", "trials", "variants")


@dataclass
class Provenance:
    """``table``: columns what, value, trials, variants; ``commits``: done trials per commit."""

    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(_COLUMNS)))
    commits: dict[str, int] = field(default_factory=dict)  # full commit -> done trials

    @property
    def warning(self) -> str | None:
        if len(self.commits) <= 1:
            return None
        parts = ", ".join(
            f"{short_commit(c)} ({n} trial{'s' if n != 1 else ''})" for c, n in sorted(self.commits.items())
        )
        return (
            f"WARNING: the rows of this table come from {len(self.commits)} commits ({parts}): they may "
            "not have run the same code (see Provenance; --rerun runs every trial again at one commit)."
        )


def _values(df: pd.DataFrame, column: str, short: bool = True) -> pd.Series:
    """The aspect's value per row, as text ("" where a row lacks it); a commit shortened to 12
    digits unless not ``short``."""
    if column == "hostname":
        hosts = df["hostname"] if "hostname" in df else pd.Series(None, index=df.index)
        nodes = df["node_id"] if "node_id" in df else pd.Series(None, index=df.index)
        return pd.Series([node_label(h, n) for h, n in zip(hosts, nodes)], index=df.index, dtype=object)
    if column not in df:
        return pd.Series("", index=df.index, dtype=object)
    out = df[column].map(lambda v: "" if v is None or v != v else str(v))
    return out.map(short_commit) if column == "git_commit" and short else out


def provenance_of(df: pd.DataFrame, variants: pd.Series, done: pd.Series) -> Provenance:
    """The provenance of the rows ``df`` (every status); ``variants``: each row's variant label,
    ``done``: whether each row is done (the table's rows, which the commit warning is about)."""
    lines = []
    every = set(variants)
    for what, column, _ in ASPECTS:
        values = _values(df, column)
        for value, rows in values.groupby(values, sort=True):
            if not value:
                continue
            names = sorted(set(variants[rows.index]))
            more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
            shown = "all" if set(names) == every else ", ".join(names[:_LISTED]) + more
            lines.append({"what": what, "value": value, "trials": len(rows), "variants": shown})
    table = pd.DataFrame(lines, columns=list(_COLUMNS))
    commits = df.loc[done, "git_commit"].dropna().astype(str) if "git_commit" in df else pd.Series(dtype=str)
    counts = {c: int(n) for c, n in commits[commits != ""].value_counts().sort_index().items()}
    return Provenance(table, counts)


def variant_columns(df: pd.DataFrame, variants: pd.Series) -> pd.DataFrame:
    """Per variant (index), each aspect's distinct values over its rows joined by ``; ``."""
    cols: dict[str, pd.Series] = {}
    for _, column, name in ASPECTS:
        values = _values(df, column, short=False)  # a CSV reader gets whole commits
        if not values.astype(bool).any():
            continue
        cols[name] = values.groupby(variants).agg(lambda v: "; ".join(sorted({x for x in v if x})))
    return pd.DataFrame(cols)


# --- rendering -------------------------------------------------------------------------------------


def markdown(p: Provenance, level: int = 1) -> list[str]:
    """The Provenance section as Markdown lines (heading at ``level + 1``)."""
    parts = [f"{'#' * (level + 1)} Provenance", ""]
    if not len(p.table):
        return parts + ["No provenance columns in these rows.", ""]
    return parts + [p.table.to_markdown(index=False), ""]


def html_section(p: Provenance, level: int = 1) -> str:
    """The Provenance section as an HTML fragment (heading at ``level + 1``)."""
    h2 = f"h{level + 1}"
    if not len(p.table):
        return f"<{h2}>Provenance</{h2}><p>No provenance columns in these rows.</p>"
    return f"<{h2}>Provenance</{h2}>" + p.table.to_html(index=False, border=0, escape=True, na_rep="")


def html_warning(p: Provenance) -> str | None:
    return f"<p class='warn'>{html.escape(p.warning)}</p>" if p.warning else None


def json_data(p: Provenance) -> dict[str, Any]:
    return {
        "warning": p.warning,
        "commits": p.commits,
        "rows": p.table.to_dict(orient="records"),
    }
