"""Reports: the results store turned into comparison tables relative to the dense baseline, and plots.

``compare(results)`` gives one row per variant (its seeds aggregated: mean and 95% confidence
interval, Student's t over the seeds), the measured columns of the store (COCO mAP, GMACs, timings,
memory, kept fraction, gate precision/recall) and deltas against the dense baseline: absolute for mAP
(``map_delta``), percent for compute, time and memory (``gmacs_delta_pct``), and ``speedup`` (the
baseline's inference time over the variant's). ``build_report`` adds a table per ablation axis (the
variants that differ from the base only along that axis, with the baseline on top), the failed trials
with their errors (never dropped) and notes (a variant with fewer seeds than the others, a missing
baseline). ``report_command`` renders it all for ``spa-harness report`` as Markdown, CSV, HTML (with
the plots, PNG files made by matplotlib's Agg backend, embedded) or JSON.

A variant is a trial config without its seed: the rows of one variant share a ``name`` and every
config column but ``seed`` (and the keys that do not change what a trial computes).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Report", "compare", "build_report", "axis_tables", "report_command", "write_report", "FORMATS"]

FORMATS = ("md", "csv", "html", "json")

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
_PAIRED = "speedup_vs_dense"  # measured per trial, the variant and its dense twin in one process
_SPREAD = (f"{_PAIRED}_q1", f"{_PAIRED}_q3")  # its quartiles over the trial's pairs
# Config keys that do not define a variant (the seed is aggregated over; the rest change no result).
_NOT_VARIANT = {"seed", "name", "plugins", "resources.timeout_s", "resources.retries", "data.num_workers",
                "data.cache_dir"}  # fmt: skip
_DONE = "done"


@dataclass
class Report:
    """Everything ``report_command`` renders; ``table`` is what ``compare`` returns."""

    table: pd.DataFrame  # one row per variant (index: variant label)
    axes: dict[str, pd.DataFrame] = field(default_factory=dict)  # axis key -> its table
    failures: pd.DataFrame = field(default_factory=pd.DataFrame)  # failed / timed-out trials with errors
    notes: list[str] = field(default_factory=list)
    baseline: str | None = None  # the baseline variant's label (when one serves every variant)
    baselines: list[str] = field(default_factory=list)  # every comparison group's baseline
    metrics: dict[str, str] = field(default_factory=dict)  # metric column -> kind
    primary_accuracy: str | None = None  # the mAP column the plots use
    inference_time: str | None = None  # the timing column speedup is computed from


def compare(results: pd.DataFrame | str | Path, baseline: str | None = None) -> pd.DataFrame:
    """One row per variant, seeds aggregated (``<metric>`` mean, ``<metric>_ci95`` half-width of the
    95% CI), ``n_seeds``, and deltas vs the dense baseline (``<metric>_delta`` absolute for mAP and
    other scores, ``<metric>_delta_pct`` for compute, time, memory), plus ``speedup``.

    ``results``: the store's DataFrame (``harness.results.load``) or a store path. ``baseline``: a
    variant name (or a trial's config-hash prefix); default the dense variant.
    """
    return build_report(results, baseline).table


def axis_tables(results: pd.DataFrame | str | Path, baseline: str | None = None) -> dict[str, pd.DataFrame]:
    """A table per ablation axis: the variants differing from the base only along it, baseline first."""
    return build_report(results, baseline).axes


def build_report(
    results: pd.DataFrame | str | Path, baseline: str | None = None, *, base: Mapping[str, Any] | None = None
) -> Report:
    """The whole report. ``base``: dotted config key -> the grid's base value, used to pick each axis
    table's rows (default: the most common value of every axis among the variants)."""
    df = _load(results)
    notes: list[str] = []
    cfg_cols = _config_columns(df)
    status = df["status"].astype(str) if "status" in df.columns else pd.Series(_DONE, index=df.index)
    done = df[status == _DONE].copy()
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
    inference_time = _inference_time_column(metrics)
    if baseline is not None:  # the user's baseline serves every variant
        groups = [list(table.index)]
        bases = [_pick_baseline(table, baseline, notes)]
    else:  # each variant against the dense variant of its own context (size, data, training, bench)
        groups = _comparison_groups(table, key_cols)
        bases = [_pick_baseline(table.loc[g], None, notes if len(groups) == 1 else None) for g in groups]
        missing = [v for g, b in zip(groups, bases) if b is None for v in g]
        if len(groups) > 1 and missing:
            notes.append(
                f"No dense variant shares the settings of {', '.join(missing)}: no deltas for them "
                "(--baseline names one for all)."
            )
    order: list[str] = []
    for g, b in sorted(zip(groups, bases), key=lambda gb: _natural(gb[1] or gb[0][0])):
        members = sorted(g, key=lambda v: (v != b, _natural(v)))
        order += members
        if b is not None:
            _add_deltas(table, b, members, metrics, inference_time, notes)
    table = table.loc[order]
    if len(groups) > 1:
        table.insert(1, "baseline", pd.Series([None] * len(table), index=table.index, dtype=object))
        for g, b in zip(groups, bases):
            table.loc[g, "baseline"] = b
    if len(table) and "n_seeds" in table:
        most = int(table["n_seeds"].max())
        for v, n in table["n_seeds"].items():
            if n < most:
                notes.append(f"{v} has {n} seed(s), others up to {most}: its mean and CI rest on fewer runs.")
    accuracy = [m for m, k in metrics.items() if k == "accuracy"]
    present = [b for b in bases if b is not None]
    report = Report(
        table=table,
        failures=failures,
        notes=notes,
        baseline=present[0] if len(present) == 1 and len(groups) == 1 else None,
        baselines=present,
        metrics=metrics,
        primary_accuracy=("map" if "map" in accuracy else (accuracy[0] if accuracy else None)),
        inference_time=inference_time,
    )
    for g, b in zip(groups, bases):
        for axis, t in _axis_tables(table.loc[[v for v in order if v in g]], key_cols, b, base).items():
            report.axes[axis if len(groups) == 1 else f"{axis} (vs {b or 'no baseline'})"] = t
    return report


# --- loading and columns -------------------------------------------------------------------------------


def _load(results: pd.DataFrame | str | Path) -> pd.DataFrame:
    if isinstance(results, pd.DataFrame):
        return results.reset_index(drop=True)
    from harness import results as store  # the run path's results store

    return store.load(results).reset_index(drop=True)


def _config_columns(df: pd.DataFrame) -> dict[str, str]:
    """Dotted config key -> its column in the store (``model.spa.ratio`` or ``config.model.spa.ratio``)."""
    from harness.config import TrialConfig, flatten_config, trial_to_dict

    keys = set(flatten_config(trial_to_dict(TrialConfig())))
    keys.add("model.spa")  # null for the dense baseline
    out: dict[str, str] = {}
    for col in df.columns:
        key = str(col)
        for p in _CONFIG_PREFIXES:
            if key.startswith(p):
                key = key[len(p) :]
        if key in keys and key not in out:
            out[key] = col
    return out


def _metric_columns(df: pd.DataFrame, config_cols: set[str]) -> dict[str, str]:
    out = {}
    for col in df.columns:
        name = str(col)
        if col in config_cols or name.startswith("_") or _SKIP.search(name):
            continue
        if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            continue
        for kind, pat, _ in _METRICS:
            if pat.search(name):
                out[name] = kind
                break
    return out


def _delta_kind(kind: str) -> str | None:
    for k, _, d in _METRICS:
        if k == kind:
            return d
    return None


def _inference_time_column(metrics: Mapping[str, str]) -> str | None:
    times = [m for m, k in metrics.items() if k == "time"]
    for pat in (r"(infer|forward).*median", r"(infer|forward)", r"median"):
        hit = [m for m in times if re.search(pat, m, re.I) and not re.search(r"train|wall|overhead", m, re.I)]
        if hit:
            return hit[0]
    return None


def _hashable(v: Any) -> Any:
    if isinstance(v, list | tuple | np.ndarray):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _variant_labels(df: pd.DataFrame, key_cols: Mapping[str, str]) -> pd.Series:
    """``name`` when a name means one config in this store; ``name [hash]`` where it means several."""
    names = df["name"].astype(str) if "name" in df.columns else pd.Series("trial", index=df.index)
    if not key_cols:
        return names
    keys = df[list(key_cols.values())].apply(lambda r: repr(tuple(_hashable(v) for v in r)), axis=1)
    digest = keys.map(lambda s: hashlib.sha1(s.encode()).hexdigest()[:6])
    per_name = digest.groupby(names).nunique()
    return pd.Series(
        [n if per_name[n] == 1 else f"{n} [{h}]" for n, h in zip(names, digest)], index=df.index, dtype=object
    )


# --- aggregation -------------------------------------------------------------------------------------------


def _ci95(values: pd.Series) -> float:
    v = values.dropna().to_numpy(dtype=float)
    if len(v) < 2:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def _aggregate(done: pd.DataFrame, metrics: Mapping[str, str], key_cols: Mapping[str, str]) -> pd.DataFrame:
    rows = []
    for label, g in done.groupby("_variant", sort=False):
        row: dict[str, Any] = {"variant": label, "n_seeds": len(g)}
        for key, col in key_cols.items():
            row[key] = _first(g[col])
        for m in metrics:
            row[m] = float(g[m].mean()) if g[m].notna().any() else math.nan
            row[f"{m}_ci95"] = _ci95(g[m])
        for q in _SPREAD:  # the paired speedup's quartiles over its pairs, averaged over seeds
            if q in g and g[q].notna().any():
                row[q] = float(g[q].mean())
        rows.append(row)
    cols = ["variant", "n_seeds", *key_cols, *[c for m in metrics for c in (m, f"{m}_ci95")]]
    cols += [q for q in _SPREAD if any(q in r for r in rows)]
    return pd.DataFrame(rows, columns=cols).set_index("variant")


def _first(s: pd.Series) -> Any:
    return s.iloc[0] if len(s) else None


def _is_dense(row: pd.Series) -> bool:
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
    dense = [v for v, row in table.iterrows() if _is_dense(row)]
    if not dense:
        if notes is None:
            return None
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


def _add_deltas(
    table: pd.DataFrame,
    base: str,
    rows: list[str],
    metrics: Mapping[str, str],
    inference_time: str | None,
    notes: list[str] | None = None,
) -> None:
    """Deltas of ``rows`` against ``base``: absolute for scores, percent for costs; the measured
    ``speedup`` and the one the GMACs predict (``flop_speedup``).

    ``speedup`` is the paired one (``speedup_vs_dense``: each trial timed its model against a dense
    twin in its own process) when the baseline is dense and the trial measured it; otherwise, with a
    note, the baseline's inference time over the variant's, two timings taken in different trials under
    whatever else ran beside them (``speedup_cross_trial``, always kept for reference)."""
    b = table.loc[base]
    for m, kind in metrics.items():
        d = _delta_kind(kind)
        if d == "abs":
            table.loc[rows, f"{m}_delta"] = table.loc[rows, m] - b[m]
        elif d == "pct":
            table.loc[rows, f"{m}_delta_pct"] = (
                100.0 * (table.loc[rows, m] - b[m]) / b[m] if b[m] else math.nan
            )
    if inference_time is not None:
        table.loc[rows, "speedup_cross_trial"] = b[inference_time] / table.loc[rows, inference_time]
        table.loc[rows, "speedup"] = table.loc[rows, "speedup_cross_trial"]
    if _PAIRED in table and _is_dense(b):
        paired = table.loc[rows, _PAIRED]
        fallback = table.loc[rows, "speedup"] if "speedup" in table else math.nan
        table.loc[rows, "speedup"] = paired.where(paired.notna(), fallback)
        table.loc[base, "speedup"] = 1.0
        unpaired = [r for r in rows if r != base and math.isnan(table.loc[r, _PAIRED])]
    else:
        unpaired = [r for r in rows if r != base]
    if inference_time is not None and unpaired and notes is not None:
        notes.append(
            f"speedup of {', '.join(unpaired)} vs {base}: the ratio of inference times measured in different "
            f"trials (no paired timing against a dense twin in the trial), so it carries the load of "
            f"whatever ran beside each trial."
        )
    gmacs = _main_gmacs(metrics)
    if gmacs is not None:
        table.loc[rows, "flop_speedup"] = b[gmacs] / table.loc[rows, gmacs]


def _main_gmacs(metrics: Mapping[str, str]) -> str | None:
    """The whole-model GMACs column (the run path's ``gmacs``), else the first compute column."""
    cols = [m for m, k in metrics.items() if k == "compute"]
    return "gmacs" if "gmacs" in cols else (cols[0] if cols else None)


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
    keys = table[ctx].apply(lambda r: repr(tuple(_hashable(v) for v in r)), axis=1)
    groups: dict[str, list[str]] = {}
    for v, k in keys.items():
        groups.setdefault(k, []).append(v)
    return list(groups.values())


# --- axis tables ----------------------------------------------------------------------------------------


def _axis_tables(
    table: pd.DataFrame, key_cols: Mapping[str, str], base_label: str | None, base: Mapping[str, Any] | None
) -> dict[str, pd.DataFrame]:
    if not len(table) or not key_cols:
        return {}
    variants = table.drop(index=[base_label]) if base_label is not None else table
    values = {k: variants[k].map(_hashable) for k in key_cols if k in variants and k != "model.variant"}
    varying = {k: v for k, v in values.items() if v.dropna().nunique() >= 2}
    # Keys that vary together (a preset and the sizes it sets) are one axis, named by its first key.
    groups: dict[tuple, list[str]] = {}
    for k, v in varying.items():
        codes = tuple(pd.factorize(v.astype(str))[0])
        groups.setdefault(codes, []).append(k)
    axes = [keys[0] for keys in groups.values()]
    base_vals = {}
    for k in axes:
        v = varying[k]
        want = _hashable(base[k]) if base and k in base else None
        if want is not None and want in set(v):
            base_vals[k] = want
        else:  # the most common value; ties go to the first in the results' order
            counts = v.value_counts(dropna=True, sort=False)
            base_vals[k] = counts.index[int(np.argmax(counts.to_numpy()))]
    out = {}
    for axis in axes:
        # The slice of the grid this axis is read on: the variants that agree on every other axis,
        # choosing the agreeing group with the most values of this axis (ties: the one closest to
        # the base). A one-factor grid (points) and a crossed one both give every axis its table.
        others = [k for k in axes if k != axis]
        slices: dict[tuple, list[str]] = {}
        for v in variants.index:
            slices.setdefault(tuple(varying[k][v] for k in others), []).append(v)

        def score(
            item: tuple[tuple, list[str]], axis: str = axis, others: list[str] = others
        ) -> tuple[int, int]:
            held, members = item
            return (varying[axis][members].nunique(), sum(h == base_vals[k] for h, k in zip(held, others)))

        held, keep = max(slices.items(), key=score)
        if varying[axis][keep].nunique() < 2:
            continue
        rows = ([base_label] if base_label is not None else []) + sorted(
            keep, key=lambda v: _sort_key(varying[axis][v])
        )
        t = table.loc[rows].copy()
        t[axis] = [None if r == base_label else varying[axis][r] for r in rows]
        t = t[[axis, *[c for c in t.columns if c != axis]]]
        t.attrs["held"] = {k: h for k, h in zip(others, held)}
        t.attrs["axis"] = axis
        out[axis] = t
    return out


def _natural(s: str) -> list:
    """``topk-0.25 < topk-0.5 < topk-0.75``, ``stage 2 < stage 10``."""
    return [
        (0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
        for t in re.split(r"(\d+(?:\.\d+)?)", s)
        if t
    ]


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, int | float) else (1, 0, str(v))


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


# --- rendering ----------------------------------------------------------------------------------------------

_NICE = {
    "map": "mAP",
    "map_50": "mAP50",
    "map_75": "mAP75",
    "map_small": "mAP_S",
    "map_medium": "mAP_M",
    "map_large": "mAP_L",
    "infer_ms": "infer ms",
    "train_step_ms": "train step ms",
    "peak_mem_mb": "peak mem MB",
    "kept_fraction": "kept",
    "gate_precision": "gate P",
    "gate_recall": "gate R",
    "gate_f1": "gate F1",
}


def _display_metrics(report: Report) -> list[tuple[str, bool, bool]]:
    """The columns people read, as (metric, show the value, show the delta): mAP (and its delta),
    mAP50, GMACs (and the backbone's change), inference time with the speedup, training step time,
    memory, kept fraction, gate precision/recall. Everything else stays in csv/json."""
    by_kind: dict[str, list[str]] = {}
    for m, k in report.metrics.items():
        by_kind.setdefault(k, []).append(m)
    acc = [m for m in ("map", "map_50") if m in report.metrics] or by_kind.get("accuracy", [])[:2]
    out = [(m, True, i == 0) for i, m in enumerate(acc)]
    compute = by_kind.get("compute", [])
    main = "gmacs" if "gmacs" in compute else (compute[0] if compute else None)
    if main:
        out.append((main, True, True))
    if "backbone_gmacs" in compute:
        out.append(("backbone_gmacs", False, True))
    if report.inference_time:
        out.append((report.inference_time, True, False))
    train = [m for m in by_kind.get("time", []) if "train" in m and "step" in m] or [
        m for m in by_kind.get("time", []) if "train" in m
    ]
    out += [(m, True, True) for m in train[:1]]
    memory = sorted(by_kind.get("memory", []), key=lambda m: "peak" not in m)[:1]
    out += [(m, True, True) for m in memory]
    out += [
        (m, True, False) for m in ("kept_fraction", "gate_precision", "gate_recall") if m in report.metrics
    ]
    return out


def _nice(m: str) -> str:
    if m in _NICE:
        return _NICE[m]
    if m.lower() == "gmacs":
        return "GMACs"
    if "gmacs" in m.lower():
        return m.lower().replace("_gmacs", " GMACs").replace("_", " ")
    return m.replace("_median", "").replace("_", " ")


def _display(report: Report, table: pd.DataFrame, axis: str | None = None) -> pd.DataFrame:
    """The table for people: ``mean ± ci`` strings, deltas signed."""
    out = pd.DataFrame(index=table.index)
    if axis is not None:
        out[axis] = table[axis].map(lambda v: "(baseline)" if _missing(v) else _fmt_value(v))
    if "baseline" in table:  # several comparison groups: whom each row is compared with
        out["vs"] = table["baseline"].map(lambda v: "n/a" if _missing(v) else v)
    out["seeds"] = table["n_seeds"]
    for m, value, delta in _display_metrics(report):
        if m not in table or table[m].isna().all():
            continue
        if value:
            d = _decimals(table[m])
            out[_nice(m)] = [_pm(a, b, d) for a, b in zip(table[m], table[f"{m}_ci95"])]
        if delta and f"{m}_delta" in table:
            out[f"Δ {_nice(m)}"] = table[f"{m}_delta"].map(lambda x: _signed(x, "{:+.4f}"))
        if delta and f"{m}_delta_pct" in table:
            out[f"Δ {_nice(m)} %"] = table[f"{m}_delta_pct"].map(lambda x: _signed(x, "{:+.1f}%"))
        if m == report.inference_time and "speedup" in table:
            out["speedup"] = [_speedup_cell(table, v) for v in table.index]
    out.index.name = "variant"
    return out


def _speedup_cell(table: pd.DataFrame, v: str) -> str:
    """``1.02x``, with the interquartile range of its pairs when it is the paired speedup."""
    x = table.loc[v, "speedup"]
    cell = _signed(x, "{:.2f}x")
    if _PAIRED in table and all(q in table for q in _SPREAD) and x == table.loc[v, _PAIRED]:
        q1, q3 = (table.loc[v, q] for q in _SPREAD)
        if not (_missing(q1) or _missing(q3)):
            cell += f" ({q1:.2f}-{q3:.2f})"
    return cell


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "-".join(map(str, v)) or "()"
    return str(v)


def _decimals(col: pd.Series) -> int:
    """Decimals for a column: about four significant digits on its largest value, at most four."""
    v = col.abs().replace([np.inf, -np.inf], np.nan).max()
    if v is None or not np.isfinite(v) or v == 0:
        return 4
    return int(min(4, max(0, 3 - math.floor(math.log10(v)))))


def _pm(mean: float, ci: float, decimals: int = 4) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    m = f"{mean:,.{decimals}f}"
    return m if ci is None or not math.isfinite(ci) else f"{m} ± {ci:,.{decimals}f}"


def _signed(x: float, fmt: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else fmt.format(x)


def _markdown(report: Report, images: Mapping[str, str] | None = None) -> str:
    parts = ["# SPA vs dense: comparison", ""]
    parts.append(_baseline_line(report))
    parts += ["", _md_table(_display(report, report.table)), ""]
    for axis, t in report.axes.items():
        parts += [
            f"## Axis `{axis}` ({_held(t)})",
            "",
            _md_table(_display(report, t, t.attrs.get("axis", axis))),
            "",
        ]
    if images:
        parts += ["## Plots", ""] + [f"![{k}]({v})" for k, v in images.items()] + [""]
    parts += _failures_md(report)
    if report.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(parts)


def _md_table(t: pd.DataFrame) -> str:
    return t.to_markdown(disable_numparse=True, colalign=["left"] + ["right"] * len(t.columns))


def _held(t: pd.DataFrame) -> str:
    held = t.attrs.get("held") or {}
    if not held:
        return "the only axis"
    return "others held at " + ", ".join(f"{k}={_fmt_value(v)}" for k, v in held.items())


def _baseline_line(report: Report) -> str:
    ci = "mean ± 95% CI over seeds (Student's t)"
    how = (
        "absolute for mAP, percent for compute, time and memory; speedup = dense inference time / variant's, "
        "median over pairs of calls alternating in the variant's own trial process (interquartile range of "
        "the pairs), against a dense twin of the variant"
    )
    if report.baseline is not None:
        return f"Values: {ci}. Deltas vs the baseline `{report.baseline}`: {how}."
    if report.baselines:
        return (
            f"Values: {ci}. Deltas vs the dense variant with the same backbone size, data, training and "
            f"benchmark settings (column `baseline`): {how}."
        )
    return f"Values: {ci}. No baseline: no deltas."


def _failures_md(report: Report) -> list[str]:
    if not len(report.failures):
        return ["## Failed trials", "", "None.", ""]
    return ["## Failed trials", "", report.failures.to_markdown(index=False), ""]


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
.wide{overflow-x:auto}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.plots img{max-width:560px;margin:0 1em 1em 0;border:1px solid #ddd}
.note{color:#8a4b00}
"""


def _html(report: Report, images: Mapping[str, bytes]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>SPA comparison</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>SPA vs dense: comparison</h1>",
        f"<p>{esc(_baseline_line(report))}</p>",
        _table_html(_display(report, report.table)),
    ]
    for axis, t in report.axes.items():
        parts += [f"<h2>Axis <code>{esc(axis)}</code> ({esc(_held(t))})</h2>",
                  _table_html(_display(report, t, t.attrs.get("axis", axis)))]  # fmt: skip
    if images:
        parts.append("<h2>Plots</h2><div class='plots'>")
        for name, png in images.items():
            data = base64.b64encode(png).decode()
            parts.append(f"<img alt='{esc(name)}' title='{esc(name)}' src='data:image/png;base64,{data}'>")
        parts.append("</div>")
    parts.append("<h2>Failed trials</h2>")
    parts.append(report.failures.to_html(index=False, border=0) if len(report.failures) else "<p>None.</p>")
    if report.notes:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li class='note'>{esc(n)}</li>" for n in report.notes) + "</ul>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _table_html(t: pd.DataFrame) -> str:
    return f"<div class='wide'>{t.reset_index().to_html(index=False, border=0)}</div>"


def _json(report: Report) -> str:
    def frame(t: pd.DataFrame) -> list[dict[str, Any]]:
        return json.loads(t.reset_index().to_json(orient="records", default_handler=str))

    return json.dumps(
        {
            "baseline": report.baseline,
            "baselines": report.baselines,
            "table": frame(report.table),
            "axes": {
                k: {"axis": t.attrs.get("axis", k), "held": t.attrs.get("held", {}), "rows": frame(t)}
                for k, t in report.axes.items()
            },
            "failures": json.loads(report.failures.to_json(orient="records")) if len(report.failures) else [],
            "notes": report.notes,
        },
        indent=2,
        default=lambda o: o.item() if hasattr(o, "item") else str(o),  # numpy scalars in held values
    )


def report_command(
    results: pd.DataFrame | str | Path,
    baseline: str | None = None,
    fmt: str = "md",
    out: str | Path | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> str:
    """``spa-harness report``: the report as text in ``fmt`` (md, csv, html, json), returned; with
    ``out`` also written to ``out/report.<fmt>``, plots to ``out/plots/*.png`` (md and html)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    report = build_report(results, baseline, base=base)
    out_dir = Path(out) if out is not None else None
    pngs: dict[str, bytes] = {}
    if fmt in ("md", "html"):
        from harness.plots import render_plots

        pngs = render_plots(report)
        if out_dir is not None:
            (out_dir / "plots").mkdir(parents=True, exist_ok=True)
            for name, png in pngs.items():
                (out_dir / "plots" / f"{name}.png").write_bytes(png)
    if fmt == "md":
        text = _markdown(report, {k: f"plots/{k}.png" for k in pngs} if out_dir is not None else None)
    elif fmt == "html":
        text = _html(report, pngs)
    elif fmt == "csv":
        text = report.table.to_csv()
    else:
        text = _json(report)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"report.{fmt}").write_text(text)
        if fmt == "csv":
            for axis, t in report.axes.items():
                (out_dir / f"axis_{_slug(axis)}.csv").write_text(t.to_csv())
            report.failures.to_csv(out_dir / "failures.csv", index=False)
    return text


def write_report(
    results: pd.DataFrame | str | Path, out: str | Path, formats=FORMATS, baseline: str | None = None
) -> Path:
    """Every format in ``formats`` into ``out``; returns ``out``."""
    for fmt in formats:
        report_command(results, baseline, fmt, out)
    return Path(out)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
