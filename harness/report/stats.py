"""Paired statistics for comparison tables: per-seed deltas against a baseline, their 95% interval
over seeds, the tests behind a verdict, and the smallest effect those tests can see.

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

Verdicts (``judge``), on the per-seed differences ``d`` of the primary accuracy, for every comparison
of one table at once (its rows against their baseline and the contrasts the grid declares):

- a difference test: two-sided one-sample t-test of ``mean(d) = 0`` (scipy.stats.ttest_1samp);
- an equivalence test against the grid's margin ``m``: two one-sided t-tests (TOST, Schuirmann
  1987; statsmodels' ``DescrStatsW.ttost_mean``) of ``mean(d) <= -m`` and ``mean(d) >= m``, its p the
  larger of the two; it rejects at ``ALPHA`` exactly when the ``1 - 2 ALPHA`` (90%) interval of the
  mean lies inside ``(-m, m)``;
- Holm's step-down correction (statsmodels' ``multipletests``) across the table's comparisons, once
  over the difference tests and once over the equivalence tests. Each family's chance of one false
  claim is at most ``ALPHA``; a comparison's two null hypotheses (``mean = 0`` and ``|mean| >= m``)
  cannot both be true, so each comparison can be wrong in one way only;
- the verdict: ``equivalent`` when the corrected equivalence test rejects (the margin declares
  smaller differences irrelevant, so a significant difference inside it is reported as equivalent,
  its sign left to the delta), else ``better`` / ``worse`` when the corrected difference test rejects,
  else ``inconclusive``; ``n/a`` below ``MIN_SEEDS`` paired seeds;
- the minimum detectable effect: the smallest ``|mean(d)|`` the difference test finds with
  probability ``POWER`` at ``ALPHA / k`` for ``k`` comparisons (Holm's strictest step, so the power
  holds whatever the other rows show), given the comparison's standard deviation of ``d`` over its
  seeds: the t statistic follows a noncentral t (scipy.stats.nct) whose power is solved for the
  effect (scipy.optimize.brentq). statsmodels' ``TTestPower.solve_power`` is not used: it stops at
  an effect of 10 standard deviations and returns effects short of the power asked for at 3 seeds
  and a corrected alpha (at 3 seeds, alpha 0.05/6: power 0.69, not 0.8).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pandas as pd
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW

__all__ = [
    "MIN_SEEDS",
    "LEVEL",
    "ALPHA",
    "POWER",
    "CORRECTION",
    "KINDS",
    "VERDICTS",
    "Interval",
    "PairedDelta",
    "Judgement",
    "mean_interval",
    "paired_delta",
    "difference_p",
    "equivalence_p",
    "holm",
    "min_detectable_effect",
    "t_test_power",
    "verdict",
    "judge",
]

MIN_SEEDS = 3  # below this many paired seeds a verdict is not given
LEVEL = 0.95
ALPHA = 1 - LEVEL  # the family-wise error rate of a table's verdicts (each family: see the module docstring)
POWER = 0.8  # the power at which the minimum detectable effect is stated
CORRECTION = "Holm"
KINDS = ("abs", "pct", "ratio", "given_ratio")
VERDICTS = ("better", "worse", "equivalent", "inconclusive", "n/a")


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


# --- tests, correction, power, verdicts ---------------------------------------------------------------


def _finite(d: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(d, dtype=float)
    return v[np.isfinite(v)]


def _spread(v: np.ndarray) -> float:
    """The standard deviation over seeds, 0 when every value is the same number (a shift the pairing
    removed exactly, or an exact null): float rounding of the mean must not read as noise."""
    return 0.0 if np.all(v == v[0]) else float(v.std(ddof=1))


def difference_p(d: Sequence[float] | np.ndarray) -> float:
    """Two-sided p of the one-sample t-test of ``mean(d) = 0`` on the per-seed differences ``d: (n,)``
    (NaNs dropped); NaN below 2 values. Identical values: 1 when they are 0, else 0 (no spread
    leaves no doubt)."""
    v = _finite(d)
    if len(v) < 2:
        return math.nan
    if _spread(v) == 0:
        return 1.0 if v[0] == 0 else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-constant values: t is large, p tiny
        return float(stats.ttest_1samp(v, 0.0).pvalue)


def equivalence_p(d: Sequence[float] | np.ndarray, margin: float | None) -> float:
    """p of the two one-sided t-tests (TOST) of ``mean(d) <= -margin`` and ``mean(d) >= margin`` on the
    per-seed differences ``d: (n,)``: the larger p of the two. Below ``ALPHA`` exactly when the
    ``1 - 2 ALPHA`` interval of the mean lies inside ``(-margin, margin)``. NaN without a margin or
    below 2 values; identical values: 0 inside the margin, else 1."""
    v = _finite(d)
    if margin is None or not math.isfinite(margin) or len(v) < 2:
        return math.nan
    if margin <= 0:
        raise ValueError(f"the equivalence margin must be positive, got {margin}")
    if _spread(v) == 0:
        return 0.0 if abs(v[0]) < margin else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p, _, _ = DescrStatsW(v).ttost_mean(-margin, margin)
    return float(p)


def holm(pvalues: Sequence[float] | np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Holm-adjusted p-values of ``pvalues: (k,)`` (statsmodels' ``multipletests``): reject where the
    adjusted p is below ``alpha``. NaNs (comparisons without a test) stay NaN and are not counted in
    the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=alpha, method="holm")[1]
    return out


def t_test_power(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample t-test on ``n`` values at ``alpha`` against a true mean of
    ``effect`` standard deviations: ``P(|T| > t_crit)`` for ``T`` noncentral t with ``n - 1`` degrees
    of freedom and noncentrality ``effect * sqrt(n)``."""
    df, nc = n - 1, abs(effect) * math.sqrt(n)
    crit = stats.t.isf(alpha / 2, df)
    # P(T < -crit) as P(-T > crit), -T noncentral t at -nc: scipy's cdf far in the tail is NaN there
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


@functools.lru_cache(maxsize=256)
def _standardised_mde(n: int, alpha: float, power: float) -> float:
    """The effect in units of the differences' standard deviation that a two-sided one-sample t-test
    on ``n`` values detects with probability ``power`` at ``alpha``."""
    if t_test_power(0.0, n, alpha) >= power:
        return 0.0
    high = 1.0
    while t_test_power(high, n, alpha) < power:  # power rises with the effect towards 1
        high *= 2
    return float(
        optimize.brentq(lambda e: t_test_power(e, n, alpha) - power, 0.0, high, xtol=1e-10, rtol=1e-10)
    )


def min_detectable_effect(sd: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest ``|mean(d)|`` a two-sided paired t-test on ``n`` seeds detects with probability
    ``power`` at ``alpha``, for per-seed differences with standard deviation ``sd``. NaN below 2 seeds
    or without a finite ``sd``."""
    if n < 2 or not math.isfinite(sd) or sd < 0:
        return math.nan
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha}, power={power}")
    return sd * _standardised_mde(int(n), float(alpha), float(power))


def verdict(
    mean: float,
    n: int,
    p_difference: float,
    p_equivalence: float = math.nan,
    *,
    alpha: float = ALPHA,
    higher_is_better: bool = True,
    min_seeds: int = MIN_SEEDS,
) -> str:
    """The verdict of one comparison from its (corrected) p-values (see the module docstring):
    ``equivalent``, else ``better`` / ``worse`` by the sign of ``mean``, else ``inconclusive``;
    ``n/a`` below ``min_seeds`` paired seeds or without a difference test."""
    if n < min_seeds or not math.isfinite(p_difference):
        return "n/a"
    if math.isfinite(p_equivalence) and p_equivalence < alpha:
        return "equivalent"
    if p_difference < alpha:
        return "better" if (mean > 0) == higher_is_better else "worse"
    return "inconclusive"


@dataclass(frozen=True)
class Judgement:
    """The tests of one comparison in its table's family (see ``judge``)."""

    verdict: str
    sd: float  # standard deviation of the per-seed differences
    mde: float  # minimum detectable effect at ``mde_alpha``, ``POWER``
    mde_alpha: float  # ALPHA / the family's size
    p_difference: float  # uncorrected
    p_difference_holm: float
    p_equivalence: float  # uncorrected; NaN without a margin
    p_equivalence_holm: float


K = TypeVar("K", bound=Hashable)


def judge(
    deltas: Mapping[K, PairedDelta],
    *,
    margin: float | None = None,
    alpha: float = ALPHA,
    power: float = POWER,
    higher_is_better: bool = True,
    min_seeds: int = MIN_SEEDS,
) -> dict[K, Judgement]:
    """The verdict of every comparison of one table, corrected across them (see the module
    docstring). ``deltas``: comparison -> its ``abs`` ``PairedDelta`` (``per_seed`` the differences).
    The family is the comparisons with at least ``min_seeds`` paired seeds; the others get ``n/a``
    and NaN tests."""
    keys = list(deltas)
    per_seed = {k: _finite(deltas[k].per_seed) for k in keys}
    family = [k for k in keys if len(per_seed[k]) >= min_seeds]
    p_diff = {k: difference_p(per_seed[k]) for k in family}
    p_equiv = {k: equivalence_p(per_seed[k], margin) for k in family}
    adj_diff = dict(zip(family, holm([p_diff[k] for k in family], alpha)))
    adj_equiv = dict(zip(family, holm([p_equiv[k] for k in family], alpha)))
    mde_alpha = alpha / max(1, len(family))
    out = {}
    for k in keys:
        v = per_seed[k]
        if k not in family:
            sd = _spread(v) if len(v) >= 2 else math.nan
            out[k] = Judgement("n/a", sd, math.nan, mde_alpha, *(math.nan,) * 4)
            continue
        sd = _spread(v)
        mean = float(v.mean())
        out[k] = Judgement(
            verdict=verdict(
                mean,
                len(v),
                adj_diff[k],
                adj_equiv[k],
                alpha=alpha,
                higher_is_better=higher_is_better,
                min_seeds=min_seeds,
            ),
            sd=sd,
            mde=min_detectable_effect(sd, len(v), alpha=mde_alpha, power=power),
            mde_alpha=mde_alpha,
            p_difference=p_diff[k],
            p_difference_holm=adj_diff[k],
            p_equivalence=p_equiv[k],
            p_equivalence_holm=adj_equiv[k],
        )
    return out
