"""Rendering a comparison ``Report`` (``harness.report.tables``) as Markdown, CSV, HTML or JSON.

Markdown (what ``spa-harness run`` prints at the end and ``report --format md`` gives) shows the
columns people read and fits a 120-column terminal: variant, seeds (when they differ), mAP with its
interval, Δ mAP with its interval, the verdict, the minimum detectable effect (MDE), Δ GMACs %, the
speedup against the baseline with its interval (its header says what was timed: ``fwd``, the
backbone and head; ``e2e``, the whole inference call with its postprocessing), kept fraction and gate
recall. A paragraph above the table names the baseline, the number of seeds and what the intervals
and verdicts are; with fewer than ``harness.report.stats.MIN_SEEDS`` seeds a warning above it says
the deltas cannot be told from noise. Under it: the contrasts the grid declares (a table of their
own), the correction and the level of the MDE, and the noise: the spread of the per-seed differences
and the baseline's own spread of mAP. CSV and JSON hold every column (all metrics, intervals, p-values,
paired-seed counts) and the contrasts; HTML leads with the short table, the contrasts and the Pareto
plot, then the axes, then every column. Every format says
where the rows came from (``harness.report.provenance``): a Provenance section (Markdown, HTML,
JSON) or per-variant columns (CSV, and JSON's table), and a warning above the table when its rows
come from more than one commit.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from harness.report import provenance, stats
from harness.report.tables import TIMED_CALL, TIMED_FORWARD, Report, main_gmacs

__all__ = [
    "WIDTH",
    "display_table",
    "contrast_table",
    "markdown",
    "md_table",
    "csv",
    "json_data",
    "json_text",
    "html_section",
    "html_page",
    "slug",
]

WIDTH = 120  # the terminal the Markdown table must fit

_NICE = {"map": "mAP", "map_50": "mAP50", "map_75": "mAP75", "kept_fraction": "kept", "gate_recall": "gate R"}


def _nice(m: str) -> str:
    return _NICE.get(m, "GMACs" if m.lower() == "gmacs" else m.replace("_median", "").replace("_", " "))


# --- cells --------------------------------------------------------------------------------------------------


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "-".join(map(str, v)) or "()"
    return str(v)


def _decimals(col: pd.Series, digits: int = 3) -> int:
    """Decimals for a column: about ``digits`` significant digits on its largest value, at most four."""
    v = pd.to_numeric(col, errors="coerce").abs().replace([np.inf, -np.inf], np.nan).max()
    if v is None or not np.isfinite(v) or v == 0:
        return 4
    return int(min(4, max(0, digits - 1 - math.floor(math.log10(v)))))


def _pm(mean: float, half: float, decimals: int, sign: str = "") -> str:
    if _missing(mean) or not math.isfinite(mean):
        return "n/a"
    m = f"{mean:{sign},.{decimals}f}"
    return m if _missing(half) or not math.isfinite(half) else f"{m}±{half:,.{decimals}f}"


def _speedup(row: pd.Series) -> str:
    """``1.22x (1.10-1.35)``: geometric mean over seeds and its 95% interval; with one seed, the
    interquartile range of the trial's own timing pairs when it has them."""
    x = row.get("speedup")
    if _missing(x):
        return "n/a"
    cell = f"{x:.2f}x"
    lo, hi = row.get("speedup_lo"), row.get("speedup_hi")
    if not (_missing(lo) or _missing(hi)):
        return f"{cell} ({lo:.2f}-{hi:.2f})"
    q1, q3 = row.get("speedup_vs_dense_q1"), row.get("speedup_vs_dense_q3")
    if row.get("speedup_source") == "same-process" and not (_missing(q1) or _missing(q3)):
        return f"{cell} (IQR {q1:.2f}-{q3:.2f})"
    return cell


# --- the short table ----------------------------------------------------------------------------------------


_TIMED_TAG = {TIMED_FORWARD: "fwd", TIMED_CALL: "e2e"}


def _timed_tag(report: Report) -> str:
    """``fwd`` / ``e2e``: what every speedup of the report timed (``speedup_timed``); ``mixed``."""
    t = report.table
    timed = set(t["speedup_timed"].dropna()) if "speedup_timed" in t else set()
    if len(timed) == 1:
        return _TIMED_TAG.get(next(iter(timed)), next(iter(timed)))
    return "mixed" if timed else "fwd"


def _delta_decimals(t: pd.DataFrame, acc: str, deltas: pd.DataFrame | None = None) -> int:
    """Decimals for Δ of the primary accuracy: the accuracy's own (``t``), or more where the intervals
    of the deltas (``deltas``, default ``t``) need them to show."""
    d = _decimals(t[acc]) if acc in t else 4
    deltas = t if deltas is None else deltas
    if f"{acc}_delta_hi" not in deltas:
        return d
    half = (deltas[f"{acc}_delta_hi"] - deltas[f"{acc}_delta_lo"]) / 2
    spread = half[half > 1e-12]
    return max(d, _decimals(spread, digits=1)) if len(spread) else d


def _mde(v: Any, decimals: int) -> str:
    return "n/a" if _missing(v) else f"{v:.{decimals}f}"


def display_table(report: Report, table: pd.DataFrame | None = None, axis: str | None = None) -> pd.DataFrame:
    """The table for people (strings): one row per variant (index: the variant, or the axis value
    on an axis table), the columns the module docstring lists."""
    t = report.table if table is None else table
    out = pd.DataFrame(index=t.index)
    if axis is not None:  # rows named by their value on the axis; the baseline keeps its name
        out.index = [v if _missing(a) else _fmt_value(a) for v, a in zip(t.index, t[axis])]
    if "baseline" in t:  # several comparison groups: whom each row is compared with
        out["vs"] = [("n/a" if _missing(b) else b) for b in t["baseline"]]
    if t["n_seeds"].nunique() > 1:
        out["seeds"] = t["n_seeds"].astype(int).astype(str).to_numpy()
    acc = report.primary_accuracy
    is_base = t["verdict"].eq("baseline").to_numpy() if "verdict" in t else np.zeros(len(t), bool)
    if acc and acc in t:
        d = _decimals(t[acc])
        out[_nice(acc)] = [_pm(m, h, d) for m, h in zip(t[acc], t[f"{acc}_ci95"])]
        if f"{acc}_delta" in t:
            half = (t[f"{acc}_delta_hi"] - t[f"{acc}_delta_lo"]) / 2
            dd = _delta_decimals(report.table, acc)  # one precision for the main table and its axes
            out[f"Δ {_nice(acc)}"] = [
                "" if b else _pm(m, h, dd, "+") for m, h, b in zip(t[f"{acc}_delta"], half, is_base)
            ]
            out["verdict"] = t["verdict"].fillna("n/a").to_numpy()
            if f"{acc}_mde" in t:
                out["MDE"] = ["" if b else _mde(x, dd) for x, b in zip(t[f"{acc}_mde"], is_base)]
    g = main_gmacs(report.metrics)
    if g and f"{g}_delta_pct" in t:
        out["Δ GMACs"] = [
            "" if b else ("n/a" if _missing(x) else f"{x:+.1f}%")
            for x, b in zip(t[f"{g}_delta_pct"], is_base)
        ]
    if "speedup" in t and t["speedup"].notna().any():
        vs = report.baseline if report.baseline and len(report.baseline) <= 12 else "baseline"
        header = f"{_timed_tag(report)} speedup vs {vs}"
        out[header] = ["" if b else _speedup(row) for (_, row), b in zip(t.iterrows(), is_base)]
    for m in ("kept_fraction", "gate_recall"):
        if m in t and t[m].notna().any():
            out[_nice(m)] = [("" if _missing(x) else f"{x:.2f}") for x in t[m]]
    out.index.name = axis.rsplit(".", 1)[-1] if axis is not None else "variant"  # the title names it in full
    return out


def contrast_table(report: Report) -> pd.DataFrame:
    """The contrasts for people (strings): one row per declared contrast (index: its label), Δ of the
    primary accuracy (the first variant minus the second, per seed) with its interval, the verdict,
    the MDE and Δ GMACs %."""
    c, acc = report.contrasts, report.primary_accuracy
    out = pd.DataFrame(index=pd.Index(c.index, name="contrast"))
    if not len(c) or not acc or f"{acc}_delta" not in c:
        return out
    dd = max(_delta_decimals(report.table, acc), _delta_decimals(report.table, acc, c))
    half = (c[f"{acc}_delta_hi"] - c[f"{acc}_delta_lo"]) / 2
    out[f"Δ {_nice(acc)}"] = [_pm(m, h, dd, "+") for m, h in zip(c[f"{acc}_delta"], half)]
    out["verdict"] = c["verdict"].fillna("n/a").to_numpy() if "verdict" in c else "n/a"
    if f"{acc}_mde" in c:
        out["MDE"] = [_mde(x, dd) for x in c[f"{acc}_mde"]]
    g = main_gmacs(report.metrics)
    if g and f"{g}_delta_pct" in c:
        out["Δ GMACs"] = ["n/a" if _missing(x) else f"{x:+.1f}%" for x in c[f"{g}_delta_pct"]]
    if c["n_paired"].nunique() > 1 or (len(c) and int(c["n_paired"].iloc[0]) != report.n_seeds):
        out["seeds"] = c["n_paired"].astype(int).astype(str).to_numpy()
    return out


_LEFT = {"verdict", "vs"}  # text columns; numbers line up on the right


def md_table(t: pd.DataFrame) -> str:
    """A GitHub Markdown table of strings (index as the first column), padded to line up."""
    head = [str(t.index.name or "")] + [str(c) for c in t.columns]
    body = [[str(i)] + [str(x) for x in row] for i, row in zip(t.index, t.to_numpy())]
    w = [max(len(r[j]) for r in [head, *body]) for j in range(len(head))]

    left = [j == 0 or head[j] in _LEFT for j in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| " + " | ".join(c.ljust(w[j]) if left[j] else c.rjust(w[j]) for j, c in enumerate(cells)) + " |"
        )

    rule = (
        "|"
        + "|".join(":" + "-" * (w[j] + 1) if left[j] else "-" * (w[j] + 1) + ":" for j in range(len(w)))
        + "|"
    )
    return "\n".join([line(head), rule, *(line(r) for r in body)])


def _fitted(t: pd.DataFrame, width: int = WIDTH) -> tuple[str, list[str]]:
    """The Markdown table, and a legend when row names too long for ``width`` had to become keys."""
    text = md_table(t)
    widest = max(map(len, text.splitlines()))
    if widest <= width:
        return text, []
    first = max(len(str(t.index.name or "")), *(len(str(i)) for i in t.index))
    room = max(len(str(t.index.name or "")), width - (widest - first))
    renamed = {name: f"v{i}" for i, name in enumerate(t.index) if len(str(name)) > room}
    legend = [f"{k} = {name}" for name, k in renamed.items()]
    short = t.copy()
    short.index = pd.Index([renamed.get(n, n) for n in t.index], name=t.index.name)
    if "vs" in short:
        short["vs"] = short["vs"].map(lambda v: renamed.get(v, v))
    return md_table(short), legend


def _pct(x: float) -> str:
    return f"{100 * x:.2g}%"


def _explanation(report: Report) -> str:
    acc = _nice(report.primary_accuracy or "map")
    n = report.n_seeds
    if report.baseline is not None:
        who = f"Baseline: `{report.baseline}`"
    elif report.baselines:
        who = "Baseline: the dense variant with the same size, data, training and benchmark settings (column `vs`)"
    else:
        return f"No baseline: no deltas. {n} seed(s); values are mean±95% interval over seeds (Student's t)."
    margin = report.comparisons.equivalence_margin
    equivalent = (
        f"equivalent (inside ±{margin:g} by two one-sided tests)" if margin is not None
        else "equivalent (never: the grid declares no margin)"
    )  # fmt: skip
    return (
        f"{who}; {n} seed{'s' if n != 1 else ''}, paired by seed. {acc}: mean±95% interval over seeds (Student's t). "
        f"Δ: the difference from the baseline per seed (Δ {acc} absolute, Δ GMACs in percent), mean±95% "
        f"interval over the paired seeds. verdict on Δ {acc}: better/worse (a paired t-test tells it from 0), "
        f"{equivalent}, inconclusive (neither), n/a (below {stats.MIN_SEEDS} paired seeds); corrected across "
        f"the table, see under it. MDE: the smallest |Δ {acc}| the row's test finds with {_pct(stats.POWER)} "
        f"power. speedup: the baseline's time over the variant's per seed ({_timed(report)}), geometric mean "
        f"(95% interval)."
    )


def _timed(report: Report) -> str:
    t = report.table
    sources = set(t["speedup_source"].dropna()) if "speedup_source" in t else set()
    timed = set(t["speedup_timed"].dropna()) if "speedup_timed" in t else set()
    what = []
    if TIMED_FORWARD in timed:
        what.append("fwd: the backbone and head forward, without score threshold and NMS")
    if TIMED_CALL in timed:
        what.append(
            "e2e: the whole inference call, NMS included, whose load depends on how far each model trained"
        )
    same = "timed in the variant's trial process against the baseline model"
    cross = "from the two trials' times"
    if "same-process" in sources and "cross-trial" in sources:
        where = f"{same}, or {cross} where the trial has no such timing (see the notes)"
    else:
        where = same if "same-process" in sources else cross
    return "; ".join([*what, where])


def _judgement(report: Report) -> str | None:
    """The line under the tables: the family the verdicts were corrected over, the margin, the MDE's
    level and power."""
    if not report.primary_accuracy or report.family == 0:
        return None
    acc, k = _nice(report.primary_accuracy), report.family
    judged = [v for v in stats.VERDICTS if v != "n/a"]
    n_rows = int(report.table["verdict"].isin(judged).sum()) if "verdict" in report.table else 0
    n_contrasts = k - n_rows
    what = ", ".join(
        f"{n} {word}{'s' if n != 1 else ''}" for n, word in ((n_rows, "row"), (n_contrasts, "contrast")) if n
    )
    margin = report.comparisons.equivalence_margin
    return (
        f"Verdicts: {stats.CORRECTION}'s correction across the {k} comparison{'s' if k != 1 else ''} of this "
        f"report ({what}) at {_pct(stats.ALPHA)} family-wise, once over the difference tests (paired t, Δ = 0) "
        f"and once over the equivalence tests (TOST, "
        + (f"margin ±{margin:g} {acc}; equivalent when the 90% interval lies inside it)" if margin is not None
           else "none: the grid declares no `equivalence_margin`)")
        + f". MDE at {_pct(stats.POWER)} power and {_pct(report.mde_alpha)} two-sided ({_pct(stats.ALPHA)}/{k}, "
        f"Holm's strictest step), from each comparison's SD of its per-seed Δ {acc}."
    )  # fmt: skip


def _warning(report: Report) -> str | None:
    if not report.baselines or report.n_seeds >= stats.MIN_SEEDS:
        return None
    return (
        f"WARNING: {report.n_seeds} seed(s) per variant: these deltas cannot be told from noise (a verdict "
        f"needs {stats.MIN_SEEDS} or more paired seeds; set `seeds: {stats.MIN_SEEDS}` in the grid)."
    )


def _noise_floor(report: Report) -> str | None:
    """The noise line: the spread of the per-seed differences (what the verdicts rest on), per
    baseline the range over its rows and their pooled SD, and the baseline's own spread of mAP."""
    acc = report.primary_accuracy
    if acc is None or not report.noise_floor:
        return None
    t, nice = report.table, _nice(acc)
    parts = []
    for b, s in report.noise_floor.items():
        n = int(t.loc[b, "n_seeds"])
        rows = t[t["baseline"] == b] if "baseline" in t else t
        sd = rows[f"{acc}_delta_sd"].dropna() if f"{acc}_delta_sd" in rows else pd.Series(dtype=float)
        pooled = report.delta_spread.get(b, math.nan)
        if len(sd) and not _missing(pooled):
            spread = f"{sd.min():.4f}" if len(sd) == 1 else f"{sd.min():.4f}-{sd.max():.4f} over its rows"
            diffs = f"per-seed Δ {nice} from `{b}`: SD {spread}" + (
                f" (pooled {pooled:.4f})" if len(sd) > 1 else ""
            )
        else:
            diffs = f"per-seed Δ {nice} from `{b}`: no spread (fewer than 2 paired seeds)"
        own = "one seed: unknown" if _missing(s) else f"{s:.4f} over {n} seeds"
        parts.append(f"{diffs}; `{b}`'s own SD of {nice}: {own}")
    return "Noise: " + "; ".join(parts) + ". The verdicts and MDEs rest on the first."


_CONTRASTS = (
    "Contrasts the grid declares (`contrasts:`): Δ is the first variant minus the second, per seed; interval, "
    "verdict and MDE as above."
)


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, break_on_hyphens=False)


def _held(t: pd.DataFrame) -> str:
    held = t.attrs.get("held") or {}
    if not held:
        return "the only axis"
    return "others held at " + ", ".join(f"{k}={_fmt_value(v)}" for k, v in held.items())


def markdown(
    report: Report, images: Mapping[str, str] | None = None, *, title: str | None = None, level: int = 1
) -> str:
    """The report as Markdown; ``images``: plot name -> path to link; ``level``: the title's heading level."""
    h = "#" * level
    parts = [f"{h} {title or 'SPA vs dense: comparison'}", ""]
    warn = _warning(report)
    if warn:
        parts += [*_wrap(f"**{warn}**"), ""]
    if report.provenance.warning:
        parts += [*_wrap(f"**{report.provenance.warning}**"), ""]
    parts += [*_wrap(_explanation(report)), ""]
    table, legend = _fitted(display_table(report))
    parts += [table, ""]
    if legend:
        parts += [*legend, ""]
    if len(report.contrasts):
        table, legend = _fitted(contrast_table(report))
        parts += [*_wrap(_CONTRASTS), "", table, ""] + ([*legend, ""] if legend else [])
    for line in (_judgement(report), _noise_floor(report)):
        if line:
            parts += [*_wrap(line), ""]
    for axis, t in report.axes.items():
        table, legend = _fitted(display_table(report, t, t.attrs.get("axis", axis)))
        parts += [f"{h}# Axis `{axis}` ({_held(t)})", "", table, "", *legend] + ([""] if legend else [])
    if images:
        parts += [f"{h}# Plots", ""] + [f"![{k}]({v})" for k, v in images.items()] + [""]
    parts += [f"{h}# Failed trials", ""]
    if len(report.failures):
        f = report.failures[[c for c in ("variant", "seed", "status", "error") if c in report.failures]]
        parts += [f.to_markdown(index=False), ""]
    else:
        parts += ["None.", ""]
    parts += provenance.markdown(report.provenance, level)
    if report.notes:
        parts += [f"{h}# Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(parts)


def csv(reports: Mapping[str | None, Report]) -> str:
    """Every column of every report's table; with several experiments, an ``experiment`` column first.
    Where a report has contrasts they follow its variants as rows of their own, a ``row`` column
    saying which is which (``variant`` / ``contrast``; a contrast's ``a`` and ``b`` its two variants)."""
    frames = []
    contrasts = any(len(r.contrasts) for r in reports.values())
    for name, r in reports.items():
        parts = [r.table.copy()]
        if contrasts:
            parts[0].insert(0, "row", "variant")
            if len(r.contrasts):
                c = r.contrasts.copy()
                c.insert(0, "row", "contrast")
                c.index.name = parts[0].index.name
                parts.append(c)
        t = pd.concat(parts) if len(parts) > 1 else parts[0]
        if len(reports) > 1:
            t.insert(0, "experiment", name)
        frames.append(t)
    return pd.concat(frames).to_csv() if frames else ""


# --- JSON ---------------------------------------------------------------------------------------------------


def _records(t: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(t.reset_index().to_json(orient="records", default_handler=str))


def json_data(report: Report) -> dict[str, Any]:
    """One report as plain data (what ``json_text`` writes)."""
    return {
        "experiment": report.experiment,
        "baseline": report.baseline,
        "baselines": report.baselines,
        "n_seeds": report.n_seeds,
        "interval": f"{int(stats.LEVEL * 100)}% Student-t over seeds; deltas paired by seed",
        "warning": _warning(report),
        "noise_floor": {b: (None if _missing(s) else s) for b, s in report.noise_floor.items()},
        "delta_spread": {b: (None if _missing(s) else s) for b, s in report.delta_spread.items()},
        "verdicts": {
            "correction": f"{stats.CORRECTION} across {report.family} comparisons, separately for the difference "
            "tests (paired t) and the equivalence tests (TOST)",
            "alpha": stats.ALPHA,
            "equivalence_margin": report.comparisons.equivalence_margin,
            "family": report.family,
            "mde_power": stats.POWER,
            "mde_alpha": None if _missing(report.mde_alpha) else report.mde_alpha,
            "text": _judgement(report),
        },
        "speedup_timed": _timed(report) if "speedup_timed" in report.table else None,
        "table": _records(report.table),
        "contrasts": _records(report.contrasts) if len(report.contrasts) else [],
        "axes": {
            k: {"axis": t.attrs.get("axis", k), "held": t.attrs.get("held", {}), "rows": _records(t)}
            for k, t in report.axes.items()
        },  # fmt: skip
        "failures": _records(report.failures.set_index(report.failures.columns[0]))
        if len(report.failures)
        else [],
        "notes": report.notes,
        "provenance": provenance.json_data(report.provenance),
    }


def json_text(reports: Mapping[str | None, Report]) -> str:
    """One report's data, or ``{"experiments": {name: data}}`` for several."""
    data = {k: json_data(r) for k, r in reports.items()}
    obj = next(iter(data.values())) if len(data) == 1 else {"experiments": data}
    return json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))


# --- HTML ---------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1340px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px;table-layout:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:normal;overflow-wrap:anywhere}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
table.full{table-layout:fixed;width:100%;font-size:12px}
img{max-width:100%;height:auto}.plots img{margin:0 1em 1em 0;border:1px solid #ddd}
.warn{color:#a00;font-weight:bold}.note{color:#8a4b00}p{max-width:100%}
"""


def _img(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return f"<img alt='{html.escape(name)}' title='{html.escape(name)}' src='data:image/png;base64,{data}'>"


def _html_table(t: pd.DataFrame, cls: str = "") -> str:
    return t.reset_index().to_html(index=False, border=0, classes=cls or None, na_rep="")


def _full(t: pd.DataFrame) -> pd.DataFrame:
    """Every column, one line per column and one column per variant (readable without scrolling)."""
    cells = t.map(lambda v: "" if _missing(v) else (f"{v:.6g}" if isinstance(v, float) else _fmt_value(v)))
    out = cells.T
    out.index.name, out.columns.name = "column", None
    return out


def _prose(text: str) -> str:
    """A line of the text report as HTML: escaped, its Markdown code spans (`dense`) as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def html_section(
    report: Report, images: Mapping[str, bytes], level: int = 1, title: str | None = None
) -> str:
    """One report as an HTML fragment: the short table and the Pareto plot first, then the axes
    (each with its plot), the other plots, every column, failures and notes."""
    esc, h, h2 = html.escape, f"h{level}", f"h{level + 1}"
    parts = [f"<{h}>{esc(title or 'SPA vs dense: comparison')}</{h}>"]
    warn = _warning(report)
    if warn:
        parts.append(f"<p class='warn'>{esc(warn)}</p>")
    parts += [w for w in [provenance.html_warning(report.provenance)] if w]
    parts += [f"<p>{_prose(_explanation(report))}</p>", _html_table(display_table(report))]
    if len(report.contrasts):
        parts += [f"<p>{_prose(_CONTRASTS)}</p>", _html_table(contrast_table(report))]
    for line in (_judgement(report), _noise_floor(report)):
        if line:
            parts.append(f"<p>{_prose(line)}</p>")
    shown = set()
    if "accuracy_vs_gmacs" in images:
        parts.append(f"<div class='plots'>{_img('accuracy_vs_gmacs', images['accuracy_vs_gmacs'])}</div>")
        shown.add("accuracy_vs_gmacs")
    for axis, t in report.axes.items():
        parts += [f"<{h2}>Axis <code>{esc(axis)}</code> ({esc(_held(t))})</{h2}>",
                  _html_table(display_table(report, t, t.attrs.get("axis", axis)))]  # fmt: skip
        key = f"axis_{slug(axis)}"
        if key in images:
            parts.append(f"<div class='plots'>{_img(key, images[key])}</div>")
            shown.add(key)
    rest = {k: v for k, v in images.items() if k not in shown}
    if rest:
        parts.append(
            f"<{h2}>Plots</{h2}><div class='plots'>" + "".join(_img(k, v) for k, v in rest.items()) + "</div>"
        )
    parts += [f"<{h2}>Every column</{h2}>", _html_table(_full(report.table), "full")]
    if len(report.contrasts):
        parts += [f"<{h2}>Every column of the contrasts</{h2}>", _html_table(_full(report.contrasts), "full")]
    parts.append(f"<{h2}>Failed trials</{h2}>")
    parts.append(
        _html_table(report.failures.set_index(report.failures.columns[0]))
        if len(report.failures)
        else "<p>None.</p>"
    )
    parts.append(provenance.html_section(report.provenance, level))
    if report.notes:
        parts.append(
            f"<{h2}>Notes</{h2}><ul>"
            + "".join(f"<li class='note'>{esc(n)}</li>" for n in report.notes)
            + "</ul>"
        )
    return "\n".join(parts)


def html_page(sections: Sequence[str], title: str = "SPA comparison") -> str:
    """A self-contained page (plots embedded) holding ``sections`` (``html_section`` fragments)."""
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    return "\n".join([head, f"<style>{_CSS}</style></head><body>", *sections, "</body></html>"])


def slug(s: str) -> str:
    """``s`` as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
