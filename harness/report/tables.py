"""Comparison tables: the results store's rows aggregated per variant, with paired deltas against a
baseline.

``build_report(results)`` gives a ``Report``: ``table`` has one row per variant (its seeds
aggregated: mean and 95% interval, Student's t over seeds) and, for every metric with a delta, the
delta against the baseline computed per seed (rows matched by ``seed``) and summarised over the
paired seeds (``harness.report.stats``): absolute for mAP and the other scores (``map_delta``, ``_lo``,
``_hi``, ``_n``), percent for compute, time and memory (``gmacs_delta_pct`` ...), the measured
``speedup`` as a ratio (geometric mean over seeds with its interval), and on the primary accuracy
(mAP) the tests behind the ``verdict`` (``harness.report.stats.judge``): the standard deviation of the
per-seed differences (``map_delta_sd``), the minimum detectable effect (``map_mde``), the p-values of
the difference and equivalence tests with their Holm-corrected values; and the baseline's own
seed-to-seed spread of mAP (``map_noise_floor``). ``contrasts`` holds the paired comparisons the grid
declares between two of its variants (``harness.grid.Comparisons``), with the same columns; the
rows' and the contrasts' verdicts are one family for the correction. Axis tables
(``harness.report.axes``), failed trials and notes complete it.

A variant is a trial config without its seed: the rows of one variant share a ``name`` and every
config column but ``seed`` (and the keys that do not change what a trial computes).
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.config import TrialConfig, flatten_config, trial_to_dict
from harness.grid import Comparisons
from harness.report import stats
from harness.report.axes import AXIS_PREFIX, axis_tables_of, hashable, natural
from harness.report.provenance import Provenance, provenance_of, variant_columns
from harness.results import load

__all__ = ["Report", "build_report", "compare", "axis_tables", "main_gmacs", "is_dense", "PAIRED_SPEEDUP"]

# Metric columns of the store by kind: (kind, pattern, delta): "abs" absolute delta, "pct" percent.
_METRICS = [
    ("accuracy", re.compile(r"^(map|ap)(_|$|\d)", re.I), "abs"),
    ("compute", re.compile(r"gmacs|gflops", re.I), "pct"),
    ("throughput", re.compile(r"samples_per_s|per_s$|throughput", re.I), "pct"),
    ("time", re.compile(r"(_ms|_s|_sec|_seconds)(_median|_mean)?$|latency", re.I), "pct"),
    ("memory", re.compile(r"mem|memory", re.I), "pct"),
    ("params", re.compile(r"param", re.I), "pct"),
    ("speedup", re.compile(r"^speedup_vs_dense$"), None),
    ("selection", re.compile(r"^(kept_fraction|label_fraction)$", re.I), None),
    ("gate", re.compile(r"^gate_(precision|recall|f1)$", re.I), None),
    ("loss", re.compile(r"(^|_)loss$", re.I), None),
]
# Not comparison metrics: spreads of a single trial, per-block details, bookkeeping.
_SKIP = re.compile(
    r"(_std|_iqr|_p\d+|_q\d+|_min|_max|_ci95)$|^kept_fraction_s\d|^(seed|steps|world_size|num_workers|"
    r"retries|attempt|pid|exit_code)$|^paired_|start|end_time|timestamp|version|hash|commit",
    re.I,
)
_CONFIG_PREFIXES = ("config.", "cfg.", "config/")
PAIRED_SPEEDUP = "speedup_vs_dense"  # timed per trial: the variant and the baseline model in one process
# What a speedup timed (``speedup_timed``): the backbone and head forward (the run path's
# ``speedup_timed`` value and its ``forward_ms``), or the detector's whole inference call, score
# threshold and NMS included, whose cost follows how far the model trained (rows measured before the
# forward was timed alone, and ``infer_ms``).
TIMED_FORWARD, TIMED_CALL = "backbone+head", "inference call"
_SPREAD = (f"{PAIRED_SPEEDUP}_q1", f"{PAIRED_SPEEDUP}_q3")  # its quartiles over the trial's pairs
# Config keys that do not define a variant (the seed is paired over; the rest change no result).
_NOT_VARIANT = {"seed", "name", "plugins", "plugin_sources", "resources.timeout_s", "resources.retries",
                "data.num_workers", "data.cache_dir"}  # fmt: skip
_DONE = "done"


@dataclass
class Report:
    """Everything the renderers show; ``table`` is what ``compare`` returns."""

    table: pd.DataFrame  # one row per variant (index: variant label)
    axes: dict[str, pd.DataFrame] = field(default_factory=dict)  # axis name -> its table
    failures: pd.DataFrame = field(default_factory=pd.DataFrame)  # failed / timed-out trials with errors
    notes: list[str] = field(default_factory=list)
    baseline: str | None = None  # the baseline variant's label (when one serves every variant)
    baselines: list[str] = field(default_factory=list)  # every comparison group's baseline
    metrics: dict[str, str] = field(default_factory=dict)  # metric column -> kind
    primary_accuracy: str | None = None  # the mAP column the verdict and the plots use
    inference_time: str | None = None  # the timing column a cross-trial speedup is computed from
    n_seeds: int = 0  # the most seeds any variant has
    noise_floor: dict[str, float] = field(default_factory=dict)  # baseline -> its std of mAP over seeds
    delta_spread: dict[str, float] = field(default_factory=dict)  # baseline -> pooled std of per-seed Δ
    experiment: str | None = None  # the experiment these rows come from (None: merged or unknown)
    comparisons: Comparisons = field(default_factory=Comparisons)  # the grid's margin and contrasts
    contrasts: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per contrast (index: label)
    family: int = 0  # comparisons judged together (rows with a verdict and contrasts)
    mde_alpha: float = math.nan  # the level the minimum detectable effects are stated at
    provenance: Provenance = field(default_factory=Provenance)  # commits, hosts, versions, devices


def compare(results: pd.DataFrame | str | Path, baseline: str | None = None) -> pd.DataFrame:
    """One row per variant: ``n_seeds``, config columns, ``<metric>`` (mean over seeds) and
    ``<metric>_ci95`` (half-width of its 95% interval), and paired deltas vs the baseline (see the
    module docstring). ``results``: the store's DataFrame (``harness.results.load``) or a store path.
    ``baseline``: a variant name (or a trial's config-hash prefix); default the dense variant."""
    return build_report(results, baseline).table


def axis_tables(results: pd.DataFrame | str | Path, baseline: str | None = None) -> dict[str, pd.DataFrame]:
    """A table per ablation axis (``harness.report.axes``), baseline first."""
    return build_report(results, baseline).axes


def build_report(
    results: pd.DataFrame | str | Path,
    baseline: str | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    comparisons: Comparisons | None = None,
) -> Report:
    """The whole report of one set of rows. ``base``: dotted config key -> the grid's base value,
    used to pick the slice an inferred axis is read on (default: the most common value).
    ``comparisons``: the grid's equivalence margin and contrasts (default: none)."""
    # The tables hold one row per variant: filling them column by column costs nothing at that size,
    # and pandas' warning about fragmented frames would only bury the report under noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        df = _load(results)
        report = _build_report(df, baseline, base, comparisons or Comparisons())
        _add_provenance(report, df)
        return report


def _add_provenance(report: Report, df: pd.DataFrame) -> None:
    """The report's provenance (``harness.report.provenance``): its section, and per variant the
    commits, hosts, versions and devices of its done rows as columns of the table."""
    if not len(df):
        return
    key_cols = {k: c for k, c in _config_columns(df).items() if k not in _NOT_VARIANT}
    done = (df["status"].astype(str) == _DONE) if "status" in df.columns else pd.Series(True, index=df.index)
    variants = pd.concat([_variant_labels(df[done], key_cols), _variant_labels(df[~done], key_cols)])
    report.provenance = provenance_of(df, variants.loc[df.index], done)
    per_variant = variant_columns(df[done], variants[done[done].index])
    # copy(): one block per dtype again (the table grew column by column; pandas warns on a
    # fragmented frame when a renderer resets its index)
    report.table = report.table.join(per_variant.drop(columns=report.table.columns, errors="ignore")).copy()


def _build_report(
    results: pd.DataFrame | str | Path,
    baseline: str | None,
    base: Mapping[str, Any] | None,
    comparisons: Comparisons,
) -> Report:
    df = _load(results)
    notes: list[str] = [] if len(df) else ["No trial rows in these results."]
    cfg_cols = _config_columns(df)
    status = df["status"].astype(str) if "status" in df.columns else pd.Series(_DONE, index=df.index)
    done = df[status == _DONE].copy()
    done["_seed"] = done["seed"] if "seed" in done.columns else 0
    failures = _failures(df[status != _DONE])

    metrics = _metric_columns(done, set(cfg_cols.values()))
    key_cols = {k: c for k, c in cfg_cols.items() if k not in _NOT_VARIANT}
    done["_variant"] = _variant_labels(done, key_cols)
    if len(failures):
        failures.insert(0, "variant", _variant_labels(df.loc[failures.index], key_cols))
        for v, n in failures.groupby("variant").size().items():
            notes.append(
                f"{v}: {n} trial(s) failed or timed out (listed below); its statistics exclude them."
            )

    table = _aggregate(done, metrics, key_cols)
    if baseline is not None and baseline not in table.index and "config_hash" in done:
        by_hash = done.loc[done["config_hash"].astype(str).str.startswith(baseline), "_variant"].unique()
        if len(by_hash) == 1:  # a trial's config hash (or a prefix of it) names its variant
            baseline = by_hash[0]
    accuracy = [m for m, k in metrics.items() if k == "accuracy"]
    primary = "map" if "map" in accuracy else (accuracy[0] if accuracy else None)
    report = Report(table=table, failures=failures, notes=notes, metrics=metrics, primary_accuracy=primary,
                    inference_time=_inference_time_column(metrics), comparisons=comparisons)  # fmt: skip
    if baseline is not None:  # the user's baseline serves every variant
        groups = [list(table.index)]
        bases = [_pick_baseline(table, baseline, notes)]
    else:  # each variant against the dense variant of its own context (size, data, training, bench)
        groups = _comparison_groups(table, key_cols)
        bases = [_pick_baseline(table.loc[g], None, notes if len(groups) == 1 else None) for g in groups]
        missing = [v for g, b in zip(groups, bases) if b is None for v in g]
        if len(groups) > 1 and missing:
            notes.append(f"No dense variant shares the settings of {', '.join(missing)}: no deltas for them "
                         "(--baseline names one for all).")  # fmt: skip
    order: list[str] = []
    by_variant = {v: g.set_index("_seed") for v, g in done.groupby("_variant", sort=False)}
    # ("row" | "contrast", name) -> the delta of the primary accuracy that ``_judge`` tests
    judged: dict[tuple[str, str], stats.PairedDelta] = {}
    row_base: dict[str, str] = {}
    for g, b in sorted(zip(groups, bases), key=lambda gb: natural(gb[1] or (gb[0] or [""])[0])):
        members = sorted(g, key=lambda v: (v != b, natural(v)))
        order += members
        if b is not None:
            for r, d in _add_deltas(report, by_variant, b, members).items():
                judged[("row", r)], row_base[r] = d, b
    report.table = report.table.loc[order]
    judged.update({("contrast", c): d for c, d in _add_contrasts(report, by_variant).items()})
    _judge(report, judged, row_base)
    table = report.table
    if "verdict" in table:  # a variant with no verdict reads n/a in every format, as the Markdown shows it
        table["verdict"] = table["verdict"].fillna("n/a")
    if len(groups) > 1:
        table.insert(1, "baseline", pd.Series([None] * len(table), index=table.index, dtype=object))
        for g, b in zip(groups, bases):
            table.loc[g, "baseline"] = b
    if len(table):
        report.n_seeds = most = int(table["n_seeds"].max())
        for v, n in table["n_seeds"].items():
            if n < most:
                notes.append(
                    f"{v} has {n} seed(s), others up to {most}: its mean and interval rest on fewer runs."
                )
    present = [b for b in bases if b is not None]
    report.baseline = present[0] if len(present) == 1 and len(groups) == 1 else None
    report.baselines = present
    for g, b in zip(groups, bases):
        sub = table.loc[[v for v in order if v in g]]
        for axis, t in axis_tables_of(sub, list(key_cols), b, base).items():
            report.axes[axis if len(groups) == 1 else f"{axis} (vs {b or 'no baseline'})"] = t
    return report


# --- loading and columns -------------------------------------------------------------------------------


def _load(results: pd.DataFrame | str | Path) -> pd.DataFrame:
    if isinstance(results, pd.DataFrame):
        return results.reset_index(drop=True)
    return load(results).reset_index(drop=True)


def _config_columns(df: pd.DataFrame) -> dict[str, str]:
    """Dotted config key -> its column in the store (``model.spa.ratio`` or ``config.model.spa.ratio``)."""
    keys = set(flatten_config(trial_to_dict(TrialConfig())))
    keys.add("model.spa")  # null for the dense baseline
    out: dict[str, str] = {}
    for col in df.columns:
        key = str(col)
        for p in _CONFIG_PREFIXES:
            key = key.removeprefix(p)
        if key in keys and key not in out:
            out[key] = col
    return out


def _metric_columns(df: pd.DataFrame, config_cols: set[str]) -> dict[str, str]:
    out = {}
    for col in df.columns:
        name = str(col)
        if col in config_cols or name.startswith(("_", AXIS_PREFIX)) or _SKIP.search(name):
            continue
        if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            continue
        for kind, pat, _ in _METRICS:
            if pat.search(name):
                out[name] = kind
                break
    return out


def _delta_kind(kind: str) -> str | None:
    return next((d for k, _, d in _METRICS if k == kind), None)


def _inference_time_column(metrics: Mapping[str, str]) -> str | None:
    """The time a cross-trial speedup divides: the forward SPA changes (``forward_ms``) before the whole
    inference call (``infer_ms``), whose postprocessing depends on training."""
    times = [m for m, k in metrics.items() if k == "time"]
    for pat in (r"forward.*median", r"forward", r"infer.*median", r"infer", r"median"):
        hit = [m for m in times if re.search(pat, m, re.I) and not re.search(r"train|wall|overhead", m, re.I)]
        if hit:
            return hit[0]
    return None


def main_gmacs(metrics: Mapping[str, str]) -> str | None:
    """The whole-model GMACs column (the run path's ``gmacs``), else the first compute column."""
    cols = [m for m, k in metrics.items() if k == "compute"]
    return "gmacs" if "gmacs" in cols else (cols[0] if cols else None)


def _variant_labels(df: pd.DataFrame, key_cols: Mapping[str, str]) -> pd.Series:
    """``name`` when a name means one config in these rows; ``name [hash]`` where it means several."""
    names = df["name"].astype(str) if "name" in df.columns else pd.Series("trial", index=df.index)
    if not key_cols or not len(df):
        return names
    keys = df[list(key_cols.values())].apply(lambda r: repr(tuple(hashable(v) for v in r)), axis=1)
    digest = keys.map(lambda s: hashlib.sha1(s.encode()).hexdigest()[:6])
    per_name = digest.groupby(names).nunique()
    return pd.Series(
        [n if per_name[n] == 1 else f"{n} [{h}]" for n, h in zip(names, digest)], index=df.index, dtype=object
    )


# --- aggregation ------------------------------------------------------------------------------------------


def _aggregate(done: pd.DataFrame, metrics: Mapping[str, str], key_cols: Mapping[str, str]) -> pd.DataFrame:
    labels = [c for c in done.columns if str(c).startswith(AXIS_PREFIX)]
    rows = []
    for label, g in done.groupby("_variant", sort=False):
        seeds = sorted(g["_seed"].dropna().unique().tolist(), key=str)
        row: dict[str, Any] = {"variant": label, "n_seeds": len(g), "seeds": ",".join(map(str, seeds))}
        for key, col in key_cols.items():
            row[key] = _first(g[col])
        for col in labels:
            row[col] = _first(g[col].dropna())
        for m in metrics:
            iv = stats.mean_interval(g[m].to_numpy(float))
            row[m], row[f"{m}_ci95"] = iv.mean, iv.half_width
        for q in _SPREAD:  # the paired speedup's quartiles over its pairs, averaged over seeds
            if q in g and g[q].notna().any():
                row[q] = float(g[q].mean())
        rows.append(row)
    cols = ["variant", "n_seeds", "seeds", *key_cols, *labels]
    cols += [c for m in metrics for c in (m, f"{m}_ci95")] + [q for q in _SPREAD if any(q in r for r in rows)]
    return pd.DataFrame(rows, columns=cols).set_index("variant")


def _first(s: pd.Series) -> Any:
    return s.iloc[0] if len(s) else None


def is_dense(row: pd.Series) -> bool:
    """Whether a table row is a dense variant (``model.variant`` dense, or no SPA stages)."""
    if "model.variant" in row.index and row["model.variant"] == "dense":
        return True
    stages = row.get("model.spa_stages", "missing")
    return isinstance(stages, list | tuple) and len(stages) == 0


def _pick_baseline(table: pd.DataFrame, baseline: str | None, notes: list[str] | None) -> str | None:
    if not len(table):
        return None
    if baseline is not None:
        if baseline in table.index:
            return baseline
        raise ValueError(
            f"baseline {baseline!r} is not a variant of these results; variants: {', '.join(table.index)}"
        )
    dense = [v for v, row in table.iterrows() if is_dense(row)]
    if not dense:
        if notes is not None:
            notes.append(
                "No dense baseline in these results: deltas and speedups are left out (--baseline names one)."
            )
        return None
    pick = "dense" if "dense" in dense else dense[0]
    if len(dense) > 1 and notes is not None:
        notes.append(
            f"Several dense variants ({', '.join(dense)}); deltas are against {pick!r} (--baseline to choose)."
        )
    return pick


# --- paired deltas ----------------------------------------------------------------------------------------


def _set(table: pd.DataFrame, row: str, col: str, d: stats.Interval) -> None:
    for suffix, value in (("", d.mean), ("_lo", d.low), ("_hi", d.high), ("_n", d.n)):
        table.loc[row, f"{col}{suffix}"] = value


def _metric_deltas(
    report: Report, table: pd.DataFrame, row: str, base: pd.DataFrame, other: pd.DataFrame
) -> stats.PairedDelta | None:
    """Every metric's paired delta of ``other`` against ``base`` into ``table``'s ``row``; returns the
    primary accuracy's (None without one)."""
    acc, out = report.primary_accuracy, None
    for m, kind in report.metrics.items():
        d = _delta_kind(kind)
        if d is None:
            continue
        delta = stats.paired_delta(base[m], other[m], d)
        _set(table, row, f"{m}_delta" if d == "abs" else f"{m}_delta_pct", delta)
        if m == acc:
            out = delta
    return out


def _add_deltas(
    report: Report, by_variant: Mapping[str, pd.DataFrame], base: str, rows: list[str]
) -> dict[str, stats.PairedDelta]:
    """Paired deltas of ``rows`` against ``base`` (per seed, then mean and interval over seeds), the
    measured ``speedup`` and the one the GMACs predict; returns each row's delta of the primary
    accuracy (what ``_judge`` tests), the baseline's own row left out."""
    table, notes, b = report.table, report.notes, by_variant[base]
    acc, it = report.primary_accuracy, report.inference_time
    paired_speedup = is_dense(table.loc[base])
    floor = float(b[acc].std(ddof=1)) if acc and b[acc].notna().sum() >= 2 else math.nan
    report.noise_floor[base] = floor
    cross: list[str] = []
    acc_deltas: dict[str, stats.PairedDelta] = {}
    for r in rows:
        g = by_variant[r]
        table.loc[r, "n_paired"] = len(set(g.index) & set(b.index))
        if acc:
            table.loc[r, f"{acc}_noise_floor"] = floor
        if r == base:
            for m, kind in report.metrics.items():
                d = _delta_kind(kind)
                if d is not None:
                    col = f"{m}_delta" if d == "abs" else f"{m}_delta_pct"
                    _set(table, r, col, stats.Interval(0.0, math.nan, math.nan, len(g)))
        else:
            acc_delta = _metric_deltas(report, table, r, b, g)
            if acc_delta is not None:
                acc_deltas[r] = acc_delta
        if r == base:
            table.loc[r, "verdict"] = "baseline"
            _set(table, r, "speedup", stats.Interval(1.0, math.nan, math.nan, len(g)))
            table.loc[r, "speedup_source"] = "baseline"
            continue
        only_b, only_v = (
            sorted(set(b.index) - set(g.index), key=str),
            sorted(set(g.index) - set(b.index), key=str),
        )
        if only_b or only_v:
            parts = [
                f"seed(s) {', '.join(map(str, s))} only in {who}"
                for s, who in ((only_b, base), (only_v, r))
                if s
            ]
            notes.append(f"{r} vs {base}: {'; '.join(parts)}: left out of the paired deltas.")
        if it is not None:
            _set(table, r, "speedup_cross_trial", stats.paired_delta(b[it], g[it], "ratio"))
        has_paired = PAIRED_SPEEDUP in g and g[PAIRED_SPEEDUP].notna().any()
        if paired_speedup and has_paired:
            seeds_of_base = pd.Series(1.0, index=b.index)
            _set(table, r, "speedup", stats.paired_delta(seeds_of_base, g[PAIRED_SPEEDUP], "given_ratio"))
            table.loc[r, "speedup_source"] = "same-process"
            timed = g["speedup_timed"].dropna() if "speedup_timed" in g else pd.Series(dtype=object)
            table.loc[r, "speedup_timed"] = str(timed.iloc[0]) if len(timed) else TIMED_CALL
        elif it is not None:
            for s in ("", "_lo", "_hi", "_n"):
                table.loc[r, f"speedup{s}"] = table.loc[r, f"speedup_cross_trial{s}"]
            table.loc[r, "speedup_source"] = "cross-trial"
            table.loc[r, "speedup_timed"] = TIMED_FORWARD if it.startswith("forward") else TIMED_CALL
            cross.append(r)
    if cross:
        notes.append(
            f"speedup of {', '.join(cross)} vs {base}: the ratio of inference times measured in different "
            f"trials (no timing against the baseline model in the trial's own process), so it carries the "
            f"load of whatever ran beside each trial."
        )
    gmacs = main_gmacs(report.metrics)
    if gmacs is not None:
        table.loc[rows, "flop_speedup"] = table.loc[base, gmacs] / table.loc[rows, gmacs]
    return acc_deltas


def _add_contrasts(report: Report, by_variant: Mapping[str, pd.DataFrame]) -> dict[str, stats.PairedDelta]:
    """``report.contrasts``: each declared contrast ``a`` vs ``b`` as every metric's paired delta of
    ``a`` against ``b`` (``b`` in the baseline's place); returns each one's delta of the primary
    accuracy. A contrast whose variant has no finished rows is left out with a note."""
    rows = []
    for c in report.comparisons.contrasts:
        missing = [v for v in (c.a, c.b) if v not in by_variant]
        if missing:
            report.notes.append(
                f"contrast {c.label!r}: no finished trials of {', '.join(missing)} in these results; left out."
            )
            continue
        rows.append(c)
    table = pd.DataFrame(
        {"a": [c.a for c in rows], "b": [c.b for c in rows]},
        index=pd.Index([c.label for c in rows], name="contrast"),
    )
    out: dict[str, stats.PairedDelta] = {}
    for c in rows:
        a, b = by_variant[c.a], by_variant[c.b]
        table.loc[c.label, "n_paired"] = len(set(a.index) & set(b.index))
        acc_delta = _metric_deltas(report, table, c.label, b, a)
        if acc_delta is not None:
            out[c.label] = acc_delta
        for who, seeds in ((c.b, sorted(set(b.index) - set(a.index), key=str)),
                           (c.a, sorted(set(a.index) - set(b.index), key=str))):  # fmt: skip
            if seeds:
                report.notes.append(
                    f"contrast {c.label!r}: seed(s) {', '.join(map(str, seeds))} only in {who}: left out of its pairs."
                )
    report.contrasts = table
    return out


def _judge(
    report: Report, deltas: Mapping[tuple[str, str], stats.PairedDelta], row_base: Mapping[str, str]
) -> None:
    """Verdicts on the primary accuracy for every row against its baseline (``row_base``) and every
    contrast, one family for Holm's correction (``harness.report.stats.judge``), and the spread of
    the per-seed differences they rest on."""
    acc, table = report.primary_accuracy, report.table
    if acc is None:
        return
    judgements = stats.judge(deltas, margin=report.comparisons.equivalence_margin)
    report.family = sum(j.verdict != "n/a" for j in judgements.values())
    report.mde_alpha = stats.ALPHA / max(1, report.family)
    for (kind, name), j in judgements.items():
        t = table if kind == "row" else report.contrasts
        t.loc[name, "verdict"] = j.verdict
        for col, value in ((f"{acc}_delta_sd", j.sd), (f"{acc}_mde", j.mde),
                           (f"{acc}_p_difference", j.p_difference), (f"{acc}_p_difference_holm", j.p_difference_holm),
                           (f"{acc}_p_equivalence", j.p_equivalence),
                           (f"{acc}_p_equivalence_holm", j.p_equivalence_holm)):  # fmt: skip
            t.loc[name, col] = value
    for b in dict.fromkeys(row_base.values()):  # the pooled spread of the per-seed Δ from each baseline
        rows = [r for r, rb in row_base.items() if rb == b]
        sd = table.loc[rows, f"{acc}_delta_sd"].to_numpy(float)
        dof = table.loc[rows, f"{acc}_delta_n"].to_numpy(float) - 1
        ok = np.isfinite(sd) & (dof > 0)
        report.delta_spread[b] = (
            float(np.sqrt((dof[ok] * sd[ok] ** 2).sum() / dof[ok].sum())) if ok.any() else math.nan
        )


# Config keys SPA ablates: a variant differs from its dense baseline in these. Every other config key
# is the context of a comparison (backbone size, data, training, benchmark settings), and a variant is
# compared only with a dense baseline of the same context.
_ABLATED = re.compile(
    r"^(model\.variant|model\.spa(\..*)?|model\.spa_stages|model\.extra_stage3_blocks|resources\..*)$"
)


def _comparison_groups(table: pd.DataFrame, key_cols: Mapping[str, str]) -> list[list[str]]:
    ctx = [k for k in key_cols if k in table and not _ABLATED.match(k)]
    if not ctx or not len(table):
        return [list(table.index)]
    keys = table[ctx].apply(lambda r: repr(tuple(hashable(v) for v in r)), axis=1)
    groups: dict[str, list[str]] = {}
    for v, k in keys.items():
        groups.setdefault(k, []).append(v)
    return list(groups.values())


def _failures(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("name", "seed", "status", "config_hash", "error") if c in df.columns]
    out = df[cols].copy()
    if "error" in out:
        out["error"] = out["error"].map(_error_tail)
    return out


def _error_tail(e: Any, limit: int = 400) -> str:
    if e is None or (isinstance(e, float) and math.isnan(e)):
        return "(no error recorded)"
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    tail = lines[-1] if lines else ""
    return tail if len(tail) <= limit else tail[: limit - 3] + "..."
