"""Axis tables: for each axis of a grid, the variants that differ only along it, baseline on top.

Two sources, in this order:

- the grid's own axes, when the rows record them: a column ``axis.<axis name>`` holding the trial's
  value label on that axis (``axis.selection = topk-0.5`` for a named axis whose values are labelled
  config diffs, ``axis.model.spa.ratio = 0.25`` for a config-key axis; empty for a point). Each axis
  gets its table under its own name with every value it has in the rows;
- otherwise the config columns: the keys whose values differ between variants, keys that vary
  together (a preset and the sizes it sets) read as one axis named by its first key.

An axis is read on the slice of the grid where every other axis agrees, choosing the agreeing group
with the most values of this axis (ties: the one closest to the base), so a one-factor grid (points)
and a crossed one both give every axis its table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["AXIS_PREFIX", "axis_tables_of", "hashable", "natural"]

AXIS_PREFIX = "axis."


def hashable(v: Any) -> Any:
    """``v`` as a hashable value (lists and arrays as tuples, NaN as None) for grouping."""
    if isinstance(v, list | tuple | np.ndarray):
        return tuple(hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, hashable(x)) for k, x in v.items()))
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def natural(s: str) -> list:
    """Sort key: ``topk-0.25 < topk-0.5 < topk-0.75``, ``stage 2 < stage 10``."""
    return [
        (0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
        for t in re.split(r"(\d+(?:\.\d+)?)", str(s))
        if t
    ]


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, int | float) else (1, 0, natural(str(v)))


def axis_tables_of(
    table: pd.DataFrame,
    config_keys: Sequence[str],
    base_label: str | None,
    base: Mapping[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """Axis name -> its table: ``table``'s rows (baseline first) with the axis value as the first
    column (None on the baseline row); ``attrs["axis"]`` the axis, ``attrs["held"]`` the values the
    other axes are held at. ``table``: one row per variant (``harness.report.tables``), with ``axis.*``
    label columns when the rows record the grid's axes. ``base``: dotted config key -> the grid's
    base value (inferred axes only)."""
    if not len(table):
        return {}
    variants = table.drop(index=[base_label]) if base_label is not None else table
    labelled = [c for c in table.columns if str(c).startswith(AXIS_PREFIX)]
    if labelled and variants[labelled].notna().any().any():
        values = {c[len(AXIS_PREFIX) :]: variants[c].map(hashable) for c in labelled}
        rows = variants.index[variants[labelled].notna().all(axis=1)]
        values = {a: v[rows] for a, v in values.items() if v[rows].nunique() >= 2}
        return _tables(table, values, base_label, _most_common)
    keys = [k for k in config_keys if k in variants and k != "model.variant"]
    values = {k: variants[k].map(hashable) for k in keys}
    varying = {k: v for k, v in values.items() if v.dropna().nunique() >= 2}
    groups: dict[tuple, list[str]] = {}
    for k, v in varying.items():  # keys that vary together are one axis
        groups.setdefault(tuple(pd.factorize(v.astype(str))[0]), []).append(k)
    axes = {ks[0]: varying[ks[0]] for ks in groups.values()}

    def base_value(axis: str, v: pd.Series) -> Any:
        want = hashable(base[axis]) if base and axis in base else None
        return want if want is not None and want in set(v) else _most_common(axis, v)

    return _tables(table, axes, base_label, base_value)


def _most_common(axis: str, v: pd.Series) -> Any:
    """The most common value; ties go to the first in the rows' order."""
    counts = v.value_counts(dropna=True, sort=False)
    return counts.index[int(np.argmax(counts.to_numpy()))]


def _tables(
    table: pd.DataFrame,
    axes: Mapping[str, pd.Series],
    base_label: str | None,
    base_value: Callable[[str, pd.Series], Any],
) -> dict[str, pd.DataFrame]:
    held_at = {a: base_value(a, v) for a, v in axes.items()}
    out = {}
    for axis, v in axes.items():
        others = [k for k in axes if k != axis]
        slices: dict[tuple, list[str]] = {}
        for label in v.index:
            slices.setdefault(tuple(axes[k].get(label) for k in others), []).append(label)

        def score(item: tuple[tuple, list[str]], v: pd.Series = v, others: list[str] = others) -> tuple:
            held, members = item
            return (v[members].nunique(), sum(h == held_at[k] for h, k in zip(held, others)))

        held, keep = max(slices.items(), key=score)
        if v[keep].nunique() < 2:
            continue
        rows = ([base_label] if base_label is not None else []) + sorted(keep, key=lambda r: _sort_key(v[r]))
        t = table.loc[rows].drop(columns=[axis], errors="ignore")
        t.insert(
            0, axis, pd.Series([None if r == base_label else v[r] for r in rows], index=rows, dtype=object)
        )
        t.attrs["held"] = dict(zip(others, held))
        t.attrs["axis"] = axis
        out[axis] = t
    return out
