"""Paired statistics for comparison tables: per-seed deltas against a baseline, their 95% interval
over seeds, and a verdict.

Trials of one seed are paired: the seed fixes data order, augmentation, the evaluation batch, the
initial weights a variant shares with the baseline and selection's random streams, so whatever the
seed does to a score it does to both trials. The difference is therefore taken per seed first and
only then summarised over seeds (Student's t on the paired differences), which removes the
seed-to-seed variation the two trials share. Bouthillier et al., "Accounting for Variance in Machine
Learning Benchmarks" (MLSys 2021), argue for exactly this design.

Delta kinds: ``abs`` (variant - baseline; mAP and the other scores), ``pct`` (100 * (variant -
baseline) / baseline; compute, times, memory), ``ratio`` (baseline / variant: a speedup from two
times) and ``given_ratio`` (the variant's row already holds a ratio, e.g. ``speedup_vs_dense`` timed
in its own process). Ratios are summarised on the log scale (geometric mean) and the interval is
exponentiated, so it is never negative and ``2x`` and ``0.5x`` are the same distance from ``1x``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "MIN_SEEDS",
    "LEVEL",
    "KINDS",
    "VERDICTS",
    "Interval",
    "PairedDelta",
    "mean_interval",
    "paired_delta",
    "verdict",
]

MIN_SEEDS = 3  # below this many paired seeds a verdict is not given
LEVEL = 0.95
KINDS = ("abs", "pct", "ratio", "given_ratio")
VERDICTS = ("better", "worse", "no detectable difference", "n/a")


@dataclass(frozen=True)
class Interval:
    """A mean (or geometric mean) and its ``LEVEL`` interval over ``n`` values; ``nan`` bounds when
    ``n < 2`` (one value has no spread)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (the ``±`` of a symmetric interval)."""
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class PairedDelta(Interval):
    """A paired delta: ``Interval`` over the seeds both sides have, plus which seeds had no pair."""

    seeds: tuple = ()  # the paired seeds, sorted
    only_baseline: tuple = ()  # seeds the baseline has and the variant does not
    only_variant: tuple = ()
    per_seed: tuple = field(default=(), compare=False)  # the per-seed deltas, in ``seeds`` order


def mean_interval(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> Interval:
    """Mean of ``values: (n,)`` (NaNs dropped) and its Student-t interval at ``level``."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def _per_seed(s: pd.Series) -> pd.Series:
    """One finite value per seed (repeated rows of one seed are averaged)."""
    s = pd.to_numeric(s, errors="coerce").astype(float)
    s = s[np.isfinite(s.to_numpy())]
    return s.groupby(level=0).mean() if len(s) else s


def paired_delta(
    baseline: pd.Series | None, variant: pd.Series, kind: str = "abs", level: float = LEVEL
) -> PairedDelta:
    """The delta of ``variant`` against ``baseline`` per seed, then its mean and interval over seeds.

    ``baseline``, ``variant``: one metric, indexed by seed (``(n_seeds,)``; NaN means not measured).
    ``kind``: one of ``KINDS``. For ``given_ratio`` ``variant`` holds the ratio itself and
    ``baseline`` only says which seeds the baseline has (``None``: every seed of the variant).
    Seeds present on one side only are left out and listed in ``only_baseline`` / ``only_variant``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown delta kind {kind!r}; expected one of: {', '.join(KINDS)}")
    v = _per_seed(variant)
    if baseline is None:
        b = pd.Series(1.0, index=v.index)
    else:
        b = _per_seed(baseline)
    seeds = sorted(set(v.index) & set(b.index), key=_seed_order)
    only_b = tuple(sorted(set(b.index) - set(v.index), key=_seed_order))
    only_v = tuple(sorted(set(v.index) - set(b.index), key=_seed_order))
    bv, vv = b.reindex(seeds).to_numpy(float), v.reindex(seeds).to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "abs":
            d = vv - bv
        elif kind == "pct":
            d = np.where(bv != 0, 100.0 * (vv - bv) / bv, np.nan)
        elif kind == "ratio":
            d = np.where((bv > 0) & (vv > 0), np.log(bv / vv), np.nan)
        else:
            d = np.where(vv > 0, np.log(vv), np.nan)
    iv = mean_interval(d, level)
    if kind in ("ratio", "given_ratio"):
        iv = Interval(math.exp(iv.mean), math.exp(iv.low), math.exp(iv.high), iv.n)
        d = np.exp(d)
    return PairedDelta(
        iv.mean, iv.low, iv.high, iv.n, tuple(seeds), only_b, only_v, tuple(float(x) for x in d)
    )


def _seed_order(s: object) -> tuple:
    return (0, s, "") if isinstance(s, int | float | np.integer | np.floating) else (1, 0, str(s))


def verdict(
    delta: Interval, *, higher_is_better: bool = True, null: float = 0.0, min_seeds: int = MIN_SEEDS
) -> str:
    """``better`` / ``worse`` when the interval excludes ``null`` (0 for a difference, 1 for a ratio)
    on that side, ``no detectable difference`` when it holds ``null``, ``n/a`` with fewer than
    ``min_seeds`` paired seeds or no interval."""
    if delta.n < min_seeds or not (math.isfinite(delta.low) and math.isfinite(delta.high)):
        return "n/a"
    if delta.low > null:
        return "better" if higher_is_better else "worse"
    if delta.high < null:
        return "worse" if higher_is_better else "better"
    return "no detectable difference"
