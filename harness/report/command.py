"""``spa-harness report``: a results store turned into comparison reports, one per experiment.

``report_command(results)`` loads the rows (``harness.results.load``), builds one ``Report`` per
experiment (``harness.report.tables.build_report``: seeds aggregated, deltas paired by seed against the
dense baseline, a verdict, axis tables, failures, notes), or one for all of them with ``merge``, and
renders it (``harness.report.render``) as Markdown, CSV, HTML (plots from ``harness.report.plots`` embedded) or
JSON. ``compare``, ``build_report``, ``axis_tables`` and ``Report`` are re-exported from
``harness.report.tables``.

The grid's axes: rows that record them (``axis.<name>`` columns, see ``harness.report.axes``) give each
axis its table under its own name. For rows that do not, the experiment's grid file (the ``source``
its ``experiment.json`` names) is read again and its labels are used when every trial name of the
experiment is one of the grid's; otherwise the axes are inferred from the config columns.

How the grid judges its rows (its equivalence margin and contrasts, ``harness.grid.Comparisons``)
comes from the experiment's ``experiment.json`` (``report``, written by the run), else from its grid
file; ``comparisons=`` sets it for every experiment (rows given as a DataFrame have no other source).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from harness.grid import Comparisons, load_grid
from harness.report import render
from harness.report.axes import AXIS_PREFIX
from harness.report.plots import render_plots
from harness.report.tables import Report, axis_tables, build_report, compare
from harness.results import Experiment, load

__all__ = [
    "FORMATS",
    "Report",
    "compare",
    "build_report",
    "build_reports",
    "axis_tables",
    "report_command",
    "write_report",
    "write_report_files",
]

FORMATS = ("md", "csv", "html", "json")


def build_reports(
    results: pd.DataFrame | str | Path,
    baseline: str | None = None,
    *,
    merge: bool = False,
    base: Mapping[str, Any] | None = None,
    comparisons: Comparisons | None = None,
) -> dict[str | None, Report]:
    """Experiment name -> its ``Report`` (key None when the rows name no experiment). With ``merge``
    one report over every row (a store's copies of one trial counted once). ``comparisons``: the
    equivalence margin and contrasts for every experiment (default: each experiment's own)."""
    df = _load(results, merge)
    several = "experiment" in df and df["experiment"].nunique() > 1
    names = [str(n) for n in df["experiment"].dropna().unique()] if "experiment" in df else []
    notes: dict[str, list[str]] = {}
    if comparisons is not None or isinstance(results, pd.DataFrame):
        declared = {n: comparisons or Comparisons() for n in names}
    else:
        declared = {n: _declared(str(results), n, notes.setdefault(n, [])) for n in names}
    if merge or not several:
        name = None if several or "experiment" not in df or not len(df) else str(df["experiment"].iloc[0])
        found = set(declared.values())
        merged = comparisons or (found.pop() if len(found) == 1 else Comparisons())
        report = build_report(df, baseline, base=base, comparisons=merged)
        report.notes += [n for ns in notes.values() for n in ns]
        if len(found) > 1:
            report.notes.append("The merged experiments declare different equivalence margins or contrasts: none "
                                "are used here (each experiment's own apply without --merge).")  # fmt: skip
        report.experiment = name
        return {name: report}
    out: dict[str | None, Report] = {}
    for name, rows in df.groupby("experiment", sort=True):
        comp = declared.get(str(name), Comparisons())
        try:
            report = build_report(rows, baseline, base=base, comparisons=comp)
        except ValueError as e:  # the named baseline belongs to another experiment
            report = build_report(rows, None, base=base, comparisons=comp)
            report.notes.append(f"{e}; this experiment is compared with its own dense variant.")
        report.notes += notes.get(str(name), [])
        report.experiment = str(name)
        out[str(name)] = report
    return out


def _load(results: pd.DataFrame | str | Path, merge: bool) -> pd.DataFrame:
    if isinstance(results, pd.DataFrame):
        return results.reset_index(drop=True)
    df = load(results, dedupe=merge)
    if not any(str(c).startswith(AXIS_PREFIX) for c in df.columns):
        df = _with_grid_labels(df, str(results))
    return df


def _manifest(uri: str, name: str) -> dict[str, Any]:
    """The ``experiment.json`` of experiment ``name`` at ``uri`` (a store, or the experiment itself)."""
    parent = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
    exp = next((e for e in (Experiment(uri, name), Experiment(parent, name)) if e.exists()), None)
    return (exp.read_manifest() or {}) if exp is not None else {}


def _declared(uri: str, name: str, notes: list[str]) -> Comparisons:
    """Experiment ``name``'s margin and contrasts: its ``experiment.json``'s ``report``, else its grid
    file's (an experiment run before the manifest held them), else none."""
    manifest = _manifest(uri, name)
    if "report" in manifest:
        try:
            return Comparisons.from_dict(manifest["report"])
        except ValueError as e:
            notes.append(f"experiment.json of {name}: {e}; no equivalence margin or contrasts are used.")
            return Comparisons()
    source = manifest.get("source")
    if not source or not Path(source).is_file():
        return Comparisons()
    try:
        return load_grid(source).comparisons
    except Exception:  # a grid edited or broken since the run: judged without a margin or contrasts
        return Comparisons()


def _with_grid_labels(df: pd.DataFrame, uri: str) -> pd.DataFrame:
    """``axis.<name>`` columns from each experiment's grid file, where its trial names all match."""
    if "experiment" not in df or not len(df):
        return df
    for name in df["experiment"].dropna().unique():
        source = _manifest(uri, name).get("source")
        labels = _grid_labels(source)
        rows = df["experiment"] == name
        if not labels or not set(df.loc[rows, "name"].astype(str)) <= set(labels):
            continue
        for axis in sorted({a for lab in labels.values() for a in lab}):
            col = f"{AXIS_PREFIX}{axis}"
            if col not in df:
                df[col] = pd.Series(None, index=df.index, dtype=object)
            df.loc[rows, col] = [labels[str(n)].get(axis) for n in df.loc[rows, "name"]]
    return df


def _grid_labels(source: str | None) -> dict[str, dict[str, str]] | None:
    """The grid file's trial name -> {axis: value label}, or None when it cannot be read."""
    if not source or not Path(source).is_file():
        return None
    try:
        return load_grid(source).labels
    except Exception:  # a grid edited or broken since the run: the axes are inferred instead
        return None


def _format(fmt: str | None, out: Path | None) -> str:
    if fmt is None:
        suffix = out.suffix.lstrip(".").lower() if out is not None else ""
        fmt = suffix if suffix in FORMATS else "md"
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    return fmt


def _title(name: str | None) -> str:
    return f"SPA vs dense: {name}" if name else "SPA vs dense: comparison"


def report_command(
    results: pd.DataFrame | str | Path,
    baseline: str | None = None,
    fmt: str | None = None,
    out: str | Path | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    merge: bool = False,
    comparisons: Comparisons | None = None,
    warn: Callable[[str], None] | None = None,
) -> str:
    """``spa-harness report``: the report as text in ``fmt`` (md, csv, html, json; default: the
    suffix of ``out``, else md), returned. ``out`` a file (``report.html``): written there, plots
    embedded (html) or beside it in ``<stem>-plots/`` (md); ``out`` a folder: ``out/index.html`` or
    ``out/report.<fmt>``, plots in ``out/plots/``, and for csv also each axis table, the failures and
    the provenance. Several experiments in ``results`` give one section each, unless ``merge``.
    ``comparisons``: see ``build_reports``. ``warn``: called with each report's provenance warning
    (rows from several commits), whatever the format."""
    out_path = Path(out) if out is not None else None
    fmt = _format(fmt, out_path)
    is_file = out_path is not None and out_path.suffix.lstrip(".").lower() in FORMATS
    reports = build_reports(results, baseline, merge=merge, base=base, comparisons=comparisons)
    for name, r in reports.items():
        if warn is not None and r.provenance.warning:
            warn((f"{name}: " if name else "") + r.provenance.warning.removeprefix("WARNING: "))
    several = len(reports) > 1
    if is_file:
        target, plots_dir, rel = (
            out_path,
            out_path.parent / f"{out_path.stem}-plots",
            f"{out_path.stem}-plots",
        )
    elif out_path is not None:
        target = out_path / ("index.html" if fmt == "html" else f"report.{fmt}")
        plots_dir, rel = out_path / "plots", "plots"
    else:
        target = plots_dir = rel = None

    pngs: dict[str | None, dict[str, bytes]] = {}
    if fmt in ("md", "html"):
        for name, r in reports.items():
            pngs[name] = {
                (f"{render.slug(name)}-{k}" if several else k): v for k, v in render_plots(r).items()
            }
        if plots_dir is not None and (fmt == "md" or not is_file):  # a single html file embeds them only
            plots_dir.mkdir(parents=True, exist_ok=True)
            for images in pngs.values():
                for k, png in images.items():
                    (plots_dir / f"{k}.png").write_bytes(png)
    level = 2 if several else 1
    if fmt == "md":
        parts = [f"# SPA vs dense: {len(reports)} experiments", ""] if several else []
        for name, r in reports.items():
            links = {k: f"{rel}/{k}.png" for k in pngs[name]} if rel is not None else None
            parts.append(render.markdown(r, links, title=_title(name), level=level))
        text = "\n".join(parts)
    elif fmt == "html":
        sections = [render.html_section(r, pngs[name], level, _title(name)) for name, r in reports.items()]
        if several:
            sections.insert(0, f"<h1>SPA vs dense: {len(reports)} experiments</h1>")
        text = render.html_page(sections)
    elif fmt == "csv":
        text = render.csv(reports)
    else:
        text = render.json_text(reports)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        if fmt == "csv" and not is_file:
            _write_csv_parts(reports, out_path)
    return text


def _write_csv_parts(reports: Mapping[str | None, Report], out: Path) -> None:
    for name, r in reports.items():
        prefix = f"{render.slug(name)}-" if len(reports) > 1 and name else ""
        for axis, t in r.axes.items():
            t.to_csv(out / f"{prefix}axis_{render.slug(axis)}.csv")
        if len(r.contrasts):
            r.contrasts.to_csv(out / f"{prefix}contrasts.csv")
        r.failures.to_csv(out / f"{prefix}failures.csv", index=False)
        r.provenance.table.to_csv(out / f"{prefix}provenance.csv", index=False)


def write_report(
    results: pd.DataFrame | str | Path,
    out: str | Path,
    formats: Iterable[str] = FORMATS,
    baseline: str | None = None,
    *,
    merge: bool = False,
) -> Path:
    """Every format in ``formats`` into the folder ``out``; returns ``out``."""
    for fmt in formats:
        report_command(results, baseline, fmt, out, merge=merge)
    return Path(out)


def write_report_files(experiment_uri: str, folder: Path) -> list[Path]:
    """One experiment's report as ``report.md`` (plots in ``report-plots/``) and ``report.html`` in
    ``folder``; the files written (what a tracked grid's parent run gets)."""
    report_command(experiment_uri, fmt="md", out=folder / "report.md")
    report_command(experiment_uri, fmt="html", out=folder / "report.html")
    return sorted(folder.iterdir())
