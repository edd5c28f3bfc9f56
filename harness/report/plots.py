"""Plots of a comparison report (matplotlib, Agg: no display needed), returned as PNG bytes.

- ``accuracy_vs_gmacs``: mAP against GMACs per variant with 95% interval bars on both axes (where
  the seeds give one), the Pareto front (no other variant is both cheaper and more accurate) drawn
  as a step line, the dense baseline marked;
- ``axis_<axis>``: per axis table, Δ mAP against the baseline per axis value with its paired 95%
  interval, and the speedup with its interval;
- ``speedup_vs_ratio``: measured speedup over the baseline against the kept fraction (or the
  configured selection ratio), with the speedup the GMACs alone predict (the ideal FLOP line); its
  title says what was timed (the backbone and head forward, or the whole inference call of older rows);
- ``gate_pr_vs_ratio``: gate precision and recall against the kept fraction.

A plot whose columns the results lack is left out.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.report.render import slug
from harness.report.tables import TIMED_CALL, TIMED_FORWARD, main_gmacs

if TYPE_CHECKING:
    from harness.report.tables import Report

__all__ = ["render_plots", "pareto_front"]


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both (lower ``cost``, higher ``value``), by cost."""
    order = np.lexsort((-value, cost))
    front, best = [], -math.inf
    for i in order:
        if np.isfinite(cost[i]) and np.isfinite(value[i]) and value[i] > best:
            front.append(i)
            best = value[i]
    return np.array(front, dtype=int)


def render_plots(report: Report) -> dict[str, bytes]:
    """Plot name -> PNG bytes, for the plots the report's columns allow."""
    figs = {"accuracy_vs_gmacs": _accuracy_vs_gmacs(report)}
    for axis, t in report.axes.items():
        figs[f"axis_{slug(axis)}"] = _axis_deltas(report, axis, t)
    figs["speedup_vs_ratio"] = _speedup_vs_ratio(report)
    figs["gate_pr_vs_ratio"] = _gate_pr_vs_ratio(report)
    out = {}
    for name, fig in figs.items():
        if fig is not None:
            buf = io.BytesIO()
            FigureCanvasAgg(fig)
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            out[name] = buf.getvalue()
    return out


def _gmacs(report: Report) -> str | None:
    return main_gmacs(report.metrics)


def _bounds(t: pd.DataFrame, col: str) -> np.ndarray | None:
    """``(2, n)`` distances from ``col`` down to ``col_lo`` and up to ``col_hi`` (0 where unknown)."""
    if f"{col}_lo" not in t or t[f"{col}_lo"].isna().all():
        return None
    mid = t[col].to_numpy(float)
    lo = np.nan_to_num(mid - t[f"{col}_lo"].to_numpy(float))
    hi = np.nan_to_num(t[f"{col}_hi"].to_numpy(float) - mid)
    return np.vstack([lo, hi])


def _axis_deltas(report: Report, axis: str, t: pd.DataFrame) -> Figure | None:
    acc = report.primary_accuracy
    delta = f"{acc}_delta" if acc else None
    t = t.drop(index=[b for b in report.baselines if b in t.index])
    if delta is None or delta not in t or t[delta].isna().all():
        return None
    name = t.attrs.get("axis", axis)
    labels = [str(v) for v in t.iloc[:, 0]]
    x = np.arange(len(t))
    panels = 2 if "speedup" in t and t["speedup"].notna().any() else 1
    fig = Figure(figsize=(4.2 * panels + 1.0, 3.8))
    ax = fig.add_subplot(1, panels, 1)
    ax.errorbar(x, t[delta], yerr=_bounds(t, delta), fmt="o", capsize=4, color="tab:blue")
    ax.axhline(0.0, color="0.5", lw=1)
    ax.set_ylabel(f"Δ {acc} vs baseline (paired, 95% interval)")
    if panels == 2:
        sp = fig.add_subplot(1, panels, 2)
        sp.errorbar(x, t["speedup"], yerr=_bounds(t, "speedup"), fmt="s", capsize=4, color="tab:orange")
        sp.axhline(1.0, color="0.5", lw=1)
        sp.set_ylabel(f"{_timed(report)} speedup vs baseline (x, 95% interval)")
    for a in fig.axes:
        a.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        a.set_xlabel(name)
        a.grid(alpha=0.3)
    fig.suptitle(f"axis {name}")
    fig.tight_layout()
    return fig


def _x_ratio(report: Report, t: pd.DataFrame) -> tuple[pd.Series, str] | None:
    if "kept_fraction" in t and t["kept_fraction"].notna().any():
        return t["kept_fraction"], "kept fraction (measured, SPA blocks)"
    if "model.spa.ratio" in t:
        return t["model.spa.ratio"].astype(float), "selection ratio (configured)"
    return None


def _fig(title: str) -> Figure:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def _err(t: pd.DataFrame, col: str) -> np.ndarray | None:
    ci = t.get(f"{col}_ci95")
    return None if ci is None or ci.isna().all() else ci.fillna(0).to_numpy(float)


def _accuracy_vs_gmacs(report: Report) -> Figure | None:
    t, acc, g = report.table, report.primary_accuracy, _gmacs(report)
    if acc is None or g is None or t[[acc, g]].dropna().empty:
        return None
    fig = _fig(f"{acc} vs compute (the Pareto front: no variant cheaper and better)")
    ax = fig.axes[0]
    x, y = t[g].to_numpy(float), t[acc].to_numpy(float)
    ax.errorbar(x, y, xerr=_err(t, g), yerr=_err(t, acc), fmt="o", color="tab:blue", ecolor="0.6",
                capsize=3, label="variant")  # fmt: skip
    for xi, yi, name in zip(x, y, t.index):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(x, y)
    if len(front):
        ax.step(x[front], y[front], where="post", color="tab:green", lw=1.5, label="Pareto front")
        ax.scatter(x[front], y[front], s=90, facecolors="none", edgecolors="tab:green")
    if report.baselines:
        b = t.loc[report.baselines]
        ax.scatter(b[g], b[acc], marker="s", s=80, color="tab:red", zorder=3,
                   label=f"dense baseline{'s' if len(b) > 1 else ''}")  # fmt: skip
    ax.set_xlabel(f"{g} per image (fvcore: one multiply-add counted once)")
    ax.set_ylabel(f"{acc} (mean, 95% interval over seeds)")
    ax.legend(fontsize=8)
    return fig


def _timed(report: Report) -> str:
    """What the report's speedups timed, for a plot's labels."""
    t = report.table
    timed = set(t["speedup_timed"].dropna()) if "speedup_timed" in t else set()
    if timed == {TIMED_CALL}:
        return "inference call (NMS included)"
    return "forward (backbone + head)" if timed <= {TIMED_FORWARD} else "mixed"


def _speedup_vs_ratio(report: Report) -> Figure | None:
    t = report.table
    if "speedup" not in t:
        return None
    t = t.drop(index=report.baselines)
    t = t[t["speedup"].notna()]
    xr = _x_ratio(report, t)
    if xr is None or t.empty:
        return None
    x, xlabel = xr
    fig = _fig(f"{_timed(report)} speedup over the dense baseline")
    ax = fig.axes[0]
    ax.errorbar(x, t["speedup"], yerr=_bounds(t, "speedup"), fmt="o", color="tab:blue", capsize=3, zorder=3,
                label="measured speedup (95% interval)")  # fmt: skip
    for xi, yi, name in zip(x, t["speedup"], t.index):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if "flop_speedup" in t:
        order = np.argsort(x.to_numpy(float))
        # one baseline: a line through the ideal points; several (one per context): the points alone
        style = "--" if len(report.baselines) <= 1 else "none"
        ax.plot(x.to_numpy(float)[order], t["flop_speedup"].to_numpy(float)[order], linestyle=style,
                color="tab:orange", marker="x", label="ideal (GMACs ratio)")  # fmt: skip
    ax.axhline(1.0, color="0.5", lw=1, label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("speedup (x)")
    ax.legend(fontsize=8)
    return fig


def _gate_pr_vs_ratio(report: Report) -> Figure | None:
    t = report.table
    cols = [c for c in ("gate_precision", "gate_recall") if c in t and t[c].notna().any()]
    if not cols:
        return None
    t = t[t[cols].notna().any(axis=1)]
    xr = _x_ratio(report, t)
    if xr is None:
        return None
    x, xlabel = xr
    fig = _fig("gate precision / recall vs selection")
    ax = fig.axes[0]
    for c, color in zip(cols, ("tab:purple", "tab:olive")):
        ax.errorbar(x, t[c], yerr=_err(t, c), fmt="o", color=color, capsize=3, label=c.replace("_", " "))
    for xi, yi, name in zip(x, t[cols[0]], t.index):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("vs selection labels")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return fig
