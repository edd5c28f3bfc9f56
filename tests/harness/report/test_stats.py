"""harness/report/stats.py: paired deltas per seed, their interval over seeds, and the verdicts: the
difference test, TOST against a margin, Holm's correction and the minimum detectable effect, on
synthetic rows with a known effect, a known null and a known equivalence."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from harness.report.stats import (
    ALPHA,
    MIN_SEEDS,
    POWER,
    PairedDelta,
    difference_p,
    equivalence_p,
    holm,
    judge,
    mean_interval,
    min_detectable_effect,
    paired_delta,
    t_test_power,
)

SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(autouse=True, scope="module")
def _holm_without_a_full_garbage_collection():
    """statsmodels' Holm correction (``multipletests``, method ``holm``) runs ``gc.collect()`` on every
    call: 0.1-0.2 s of CPU in a process holding torch. This module calls it thousands of times
    (property tests, simulated tables); a collection changes no p-value."""
    import gc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gc, "collect", lambda *a, **k: 0)
        yield


def _s(values, seeds=SEEDS) -> pd.Series:
    return pd.Series(values, index=list(seeds), dtype=float)


def verdict(d, margin=None) -> str:
    """The verdict of one comparison alone (a family of one)."""
    return judge({"row": d}, margin=margin)["row"].verdict


def test_known_effect_is_better_and_its_interval_excludes_zero():
    rng = np.random.default_rng(0)
    base = rng.normal(0.30, 0.02, size=5)
    variant = base + 0.05 + rng.normal(0.0, 0.002, size=5)
    d = paired_delta(_s(base), _s(variant), "abs")
    assert d.n == 5 and d.seeds == tuple(SEEDS)
    assert d.low > 0 and d.mean == pytest.approx(0.05, abs=0.003)
    assert d.low < 0.05 < d.high
    assert verdict(d) == "better"
    assert verdict(paired_delta(_s(variant), _s(base), "abs")) == "worse"


def test_paired_noise_only_is_inconclusive_without_a_margin_and_equivalent_within_one():
    base = np.array([0.30, 0.35, 0.28, 0.33, 0.31])
    noise = np.array([0.002, -0.001, 0.0, -0.002, 0.001])  # mean 0
    d = paired_delta(_s(base), _s(base + noise), "abs")
    assert d.low < 0 < d.high
    assert verdict(d) == "inconclusive"
    assert verdict(d, margin=0.01) == "equivalent"  # the 90% interval (+-0.0015) is well inside +-0.01
    assert verdict(d, margin=0.001) == "inconclusive"  # and not inside +-0.001


def test_fewer_than_three_seeds_give_no_verdict():
    d = paired_delta(_s([0.30, 0.32], [0, 1]), _s([0.40, 0.42], [0, 1]), "abs")
    assert d.n == 2 < MIN_SEEDS and d.low > 0  # decisive-looking, and still no verdict
    assert verdict(d) == "n/a"
    one = paired_delta(_s([0.3], [0]), _s([0.4], [0]), "abs")
    assert one.mean == pytest.approx(0.1) and math.isnan(one.low) and verdict(one) == "n/a"


def test_pairing_uses_the_pairs():
    """A large per-seed offset shared by both sides: unpaired, the effect drowns; paired, it is clear."""
    offset = np.array([-0.10, 0.05, 0.12, -0.04, 0.0])
    base = 0.30 + offset
    variant = base + 0.01 + np.array([0.001, -0.001, 0.0005, -0.0005, 0.0])
    unpaired = sps.ttest_ind(variant, base, equal_var=False)
    assert unpaired.pvalue > 0.5  # the seeds' spread (~0.08) hides a 0.01 effect
    d = paired_delta(_s(base), _s(variant), "abs")
    assert d.low > 0 and d.mean == pytest.approx(0.01, abs=1e-6)
    assert verdict(d) == "better"
    shuffled = paired_delta(_s(base), _s(variant[[1, 2, 3, 4, 0]]), "abs")  # pairs broken
    assert verdict(shuffled) == "inconclusive"


def test_unmatched_seeds_are_dropped_and_listed():
    base = _s([0.30, 0.31, 0.32, 0.33], [0, 1, 2, 3])
    variant = _s([0.41, 0.42, 0.43, 0.44], [1, 2, 3, 7])
    d = paired_delta(base, variant, "abs")
    assert d.seeds == (1, 2, 3) and d.only_baseline == (0,) and d.only_variant == (7,)
    assert d.per_seed == pytest.approx((0.10, 0.10, 0.10))  # by seed; by position it would read 0.11
    nan_seed = paired_delta(base, _s([0.41, np.nan, 0.43, 0.44], [0, 1, 2, 3]), "abs")
    assert nan_seed.seeds == (0, 2, 3) and nan_seed.only_baseline == (1,)  # a NaN is not a measurement


def test_percent_and_ratio_kinds():
    base, variant = _s([10.0, 20.0, 40.0], [0, 1, 2]), _s([8.0, 16.0, 32.0], [0, 1, 2])
    pct = paired_delta(base, variant, "pct")
    assert pct.mean == pytest.approx(-20.0) and pct.low == pytest.approx(-20.0)
    ratio = paired_delta(base, variant, "ratio")  # baseline time / variant time
    assert ratio.mean == pytest.approx(1.25) and ratio.high == pytest.approx(1.25)
    given = paired_delta(None, _s([1.0, 2.0, 4.0], [0, 1, 2]), "given_ratio")
    assert given.mean == pytest.approx(2.0)  # the geometric mean
    logs = np.log([1.0, 2.0, 4.0])
    half = sps.t.ppf(0.975, 2) * logs.std(ddof=1) / math.sqrt(3)
    assert (given.low, given.high) == pytest.approx((2.0 * math.exp(-half), 2.0 * math.exp(half)))
    with pytest.raises(ValueError, match="unknown delta kind"):
        paired_delta(base, variant, "log")


def test_mean_interval_is_student_t():
    iv = mean_interval([0.30, 0.32, 0.34])
    assert iv.mean == pytest.approx(0.32) and iv.half_width == pytest.approx(
        4.302652729911275 * 0.02 / math.sqrt(3)
    )
    assert mean_interval([]).n == 0 and math.isnan(mean_interval([1.0]).half_width)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    base=st.lists(st.floats(0.01, 1.0), min_size=3, max_size=8),
    shift=st.floats(-0.5, 0.5),
)
def test_a_constant_shift_is_recovered_whatever_the_seeds_do(base, shift):
    seeds = list(range(len(base)))
    d = paired_delta(_s(base, seeds), _s(np.array(base) + shift, seeds), "abs")
    assert d.mean == pytest.approx(shift, abs=1e-9)
    assert d.high - d.low == pytest.approx(0.0, abs=1e-9)  # the seeds' spread cancels in the pairs


# --- the tests behind a verdict ---------------------------------------------------------------------------


def _delta(d) -> object:
    """A ``PairedDelta`` whose per-seed differences are ``d`` (variant - baseline on seeds 0..n-1)."""
    d = np.asarray(d, dtype=float)
    seeds = list(range(len(d)))
    return paired_delta(_s(np.zeros(len(d)), seeds), _s(d, seeds), "abs")


def test_the_difference_test_is_scipys_paired_t_test():
    rng = np.random.default_rng(3)
    base = rng.normal(0.3, 0.05, 6)
    variant = base + rng.normal(0.004, 0.003, 6)
    assert difference_p(variant - base) == pytest.approx(sps.ttest_rel(variant, base).pvalue, rel=1e-9)
    assert math.isnan(difference_p([0.1]))  # one seed: no test


def test_tost_is_two_one_sided_t_tests_by_hand():
    d = np.array([0.004, -0.002, 0.006, 0.001, 0.003])
    m, n = 0.01, len(d)
    se = d.std(ddof=1) / math.sqrt(n)
    p_low = sps.t.sf((d.mean() + m) / se, n - 1)  # H0: mean <= -m
    p_high = sps.t.cdf((d.mean() - m) / se, n - 1)  # H0: mean >= m
    assert equivalence_p(d, m) == pytest.approx(max(p_low, p_high), rel=1e-9)
    assert math.isnan(equivalence_p(d, None))
    with pytest.raises(ValueError, match="margin must be positive"):
        equivalence_p(d, -0.01)


def test_identical_differences_need_no_spread_to_decide():
    """An exact null (every per-seed difference 0, as keep-all without gate scaling gives) is
    equivalent within any margin; a constant shift is a difference, equivalent only inside the margin."""
    zero = _delta([0.0] * 5)
    assert difference_p([0.0] * 5) == 1.0 and equivalence_p([0.0] * 5, 0.01) == 0.0
    assert verdict(zero) == "inconclusive" and verdict(zero, margin=0.01) == "equivalent"
    shift = _delta([0.02] * 5)
    assert verdict(shift) == "better" and verdict(shift, margin=0.01) == "better"
    assert (
        verdict(shift, margin=0.05) == "equivalent"
    )  # significant, and inside what the grid calls irrelevant
    assert verdict(_delta([-0.02] * 5), margin=0.01) == "worse"
    assert judge({"r": zero})["r"].mde == 0.0


def test_a_significant_difference_inside_the_margin_reads_equivalent():
    d = _delta([0.002, 0.0021, 0.0019, 0.002, 0.0022])  # clearly above 0, clearly below 0.01
    j = judge({"r": d}, margin=0.01)["r"]
    assert j.p_difference < ALPHA and j.p_equivalence < ALPHA and j.verdict == "equivalent"
    assert judge({"r": d})["r"].verdict == "better"


def test_fewer_than_three_seeds_are_left_out_of_the_family():
    few, ok = _delta([0.5, 0.6]), _delta([0.01, 0.012, 0.011, 0.013])
    out = judge({"few": few, "ok": ok})
    assert out["few"].verdict == "n/a" and math.isnan(out["few"].p_difference) and math.isnan(out["few"].mde)
    assert out["ok"].mde_alpha == ALPHA  # a family of one: the two-seed row is not counted
    assert out["ok"].p_difference_holm == out["ok"].p_difference


def test_holm_by_hand():
    adjusted = holm([0.01, 0.04, 0.03, np.nan])
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04, made monotone: 0.03, 0.06, 0.06
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert holm([]).shape == (0,)


@settings(derandomize=True, max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.floats(0.0, 1.0), st.just(math.nan)), min_size=1, max_size=12),
    st.sampled_from([0.01, 0.05, 0.1]),
)
def test_holm_never_rejects_more_than_uncorrected_nor_fewer_than_bonferroni(p, alpha):
    p = np.asarray(p)
    adjusted = holm(p, alpha)
    ok = np.isfinite(p)
    assert np.array_equal(np.isfinite(adjusted), ok)  # NaN in, NaN out
    assert np.all(adjusted[ok] >= p[ok] - 1e-12) and np.all(adjusted[ok] <= 1.0)
    k = int(ok.sum())
    raw, corrected, bonferroni = p[ok] < alpha, adjusted[ok] < alpha, p[ok] * k < alpha
    assert not np.any(corrected & ~raw)  # Holm rejects nothing the uncorrected test keeps
    assert not np.any(bonferroni & ~corrected)  # and everything Bonferroni rejects


@settings(derandomize=True, max_examples=100, deadline=None)
@given(
    n=st.integers(3, 10),
    effect=st.floats(0.02, 1.0),
    sign=st.sampled_from([1.0, -1.0]),
    nulls=st.integers(0, 7),
    margin=st.one_of(st.none(), st.floats(0.001, 0.009)),
    seed=st.integers(0, 2**16),
)
def test_a_big_effect_with_small_noise_is_always_better_or_worse(n, effect, sign, nulls, margin, seed):
    """Whatever else the table holds (up to 7 null rows sharing the correction) and whatever margin
    the grid declares below the effect."""
    rng = np.random.default_rng(seed)
    margin = None if margin is None else margin * effect
    rows = {"effect": _delta(sign * effect + rng.normal(0, effect / 50, n))}
    rows.update({f"null{i}": _delta(rng.normal(0, effect / 50, n)) for i in range(nulls)})
    out = judge(rows, margin=margin)
    assert out["effect"].verdict == ("better" if sign > 0 else "worse")
    assert out["effect"].mde < effect  # an effect this size is one the test was powered to see


@settings(derandomize=True, max_examples=150, deadline=None)
@given(
    d=st.lists(st.floats(-0.05, 0.05), min_size=3, max_size=10),
    margin=st.floats(0.001, 0.05),
)
def test_equivalent_exactly_when_the_90_percent_interval_sits_inside_the_margin(d, margin):
    """TOST at 5% for one comparison: equivalent if and only if the 90% (1 - 2 alpha) interval of the
    mean difference lies inside (-margin, margin)."""
    iv = mean_interval(d, level=1 - 2 * ALPHA)
    inside = -margin < iv.low and iv.high < margin
    edge = min(abs(iv.low + margin), abs(iv.high - margin))
    if edge < 1e-9 * max(1.0, margin):  # on the boundary float rounding decides either way
        return
    is_equivalent = verdict(_delta(d), margin=margin) == "equivalent"
    assert is_equivalent == inside or (np.ptp(d) == 0 and inside == (abs(d[0]) < margin))


@settings(derandomize=True, max_examples=60, deadline=None)
@given(sd=st.floats(1e-4, 1.0), n=st.integers(2, 30), alpha=st.sampled_from([0.05, 0.01, 0.05 / 6]))
def test_the_mde_shrinks_with_more_seeds_and_scales_with_the_noise(sd, n, alpha):
    mde = min_detectable_effect(sd, n, alpha=alpha)
    assert 0 < min_detectable_effect(sd, n + 1, alpha=alpha) < mde
    assert min_detectable_effect(2 * sd, n, alpha=alpha) == pytest.approx(2 * mde, rel=1e-6)
    assert min_detectable_effect(sd, n, alpha=alpha / 2) > mde  # a stricter test needs a bigger effect
    assert math.isnan(min_detectable_effect(sd, 1))
    assert t_test_power(mde / sd, n, alpha) == pytest.approx(POWER, abs=1e-6)


@pytest.mark.parametrize(("n", "alpha"), [(3, 0.05), (3, 0.05 / 6), (7, 0.05 / 6), (20, 0.01)])
def test_the_power_function_is_statsmodels(n, alpha):
    """The noncentral-t power the MDE is solved from agrees with statsmodels' ``TTestPower.power``
    (whose own solver stops short at 3 seeds and a corrected alpha)."""
    from statsmodels.stats.power import TTestPower

    compared = 0
    for effect in (0.3, 1.0, 2.5):
        ours, theirs = (
            t_test_power(effect, n, alpha),
            TTestPower().power(effect_size=effect, nobs=n, alpha=alpha),
        )
        if math.isnan(theirs):  # scipy's noncentral t cdf far in its tail (ours reads that tail as sf)
            assert ours == pytest.approx(1.0, abs=1e-6)
            continue
        assert ours == pytest.approx(theirs, rel=1e-6)
        compared += 1
    assert compared >= 2
    assert t_test_power(0.0, n, alpha) == pytest.approx(alpha)  # no effect: the test's own level


@pytest.mark.parametrize(("n", "alpha"), [(3, 0.05), (3, 0.05 / 6), (6, 0.05), (7, 0.05 / 6)])
def test_the_mde_is_detected_with_the_stated_power(n, alpha):
    """Simulated paired experiments with a true effect equal to the MDE: the two-sided t-test at
    ``alpha`` rejects in about POWER of them (an independent check of statsmodels' noncentral t)."""
    sims = 20_000
    mde = min_detectable_effect(1.0, n, alpha=alpha)
    d = np.random.default_rng(n).normal(mde, 1.0, size=(sims, n))
    rejected = sps.ttest_1samp(d, 0.0, axis=1).pvalue < alpha
    assert rejected.mean() == pytest.approx(POWER, abs=4 * math.sqrt(POWER * (1 - POWER) / sims))


def _family_error(tables: int, rows: int, n: int, effect: float, margin: float | None, claim: set[str]):
    """Over ``tables`` simulated tables of ``rows`` comparisons (true effect ``effect``, per-seed SD 1),
    the share with any verdict in ``claim``, corrected (``judge``) and uncorrected."""
    rng = np.random.default_rng(7)
    corrected = uncorrected = 0
    for _ in range(tables):  # judge reads the per-seed differences only
        deltas = {i: PairedDelta(math.nan, math.nan, math.nan, n, per_seed=tuple(rng.normal(effect, 1.0, n)))
                  for i in range(rows)}  # fmt: skip
        out = judge(deltas, margin=margin)
        corrected += any(j.verdict in claim for j in out.values())
        p = [j.p_difference if claim & {"better", "worse"} else j.p_equivalence for j in out.values()]
        uncorrected += any(x < ALPHA for x in p)
    return corrected / tables, uncorrected / tables


def test_a_known_null_keeps_the_family_wise_error_of_better_or_worse_under_alpha():
    corrected, uncorrected = _family_error(1500, 5, 5, 0.0, None, {"better", "worse"})
    tol = 3 * math.sqrt(ALPHA * (1 - ALPHA) / 1500)
    assert corrected <= ALPHA + tol
    assert uncorrected > 0.15  # five rows tested at 5% each: about 23% of tables hold a false claim


def test_a_true_effect_at_the_margin_is_rarely_called_equivalent():
    """Rows whose true difference is exactly the margin (the equivalence tests' null): the share of
    tables calling any of them equivalent stays under alpha."""
    corrected, uncorrected = _family_error(1500, 4, 8, 0.5, 0.5, {"equivalent"})
    tol = 3 * math.sqrt(ALPHA * (1 - ALPHA) / 1500)
    assert corrected <= ALPHA + tol and uncorrected > corrected
