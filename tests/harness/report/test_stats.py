"""harness/report/stats.py: paired deltas per seed, their interval over seeds, and the verdict."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from harness.report.stats import MIN_SEEDS, mean_interval, paired_delta, verdict

SEEDS = [0, 1, 2, 3, 4]


def _s(values, seeds=SEEDS) -> pd.Series:
    return pd.Series(values, index=list(seeds), dtype=float)


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


def test_paired_noise_only_is_no_detectable_difference():
    base = np.array([0.30, 0.35, 0.28, 0.33, 0.31])
    noise = np.array([0.002, -0.001, 0.0, -0.002, 0.001])  # mean 0
    d = paired_delta(_s(base), _s(base + noise), "abs")
    assert d.low < 0 < d.high
    assert verdict(d) == "no detectable difference"


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
    assert verdict(shuffled) == "no detectable difference"


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
