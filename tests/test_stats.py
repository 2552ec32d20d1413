"""Confidence intervals and paired tests against scipy's own implementations."""
import math
import random

import numpy as np
import pytest
from scipy import stats as st

from metabench.stats import paired_compare, summarize


@pytest.mark.parametrize("n", [2, 5, 30, 600])
def test_ci_matches_scipy_t_interval(n):
    rng = random.Random(n)
    values = [rng.random() for _ in range(n)]
    s = summarize(values)
    low, high = st.t.interval(0.95, n - 1, loc=np.mean(values), scale=st.sem(values))
    assert s.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert s.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert s.ci95 == pytest.approx((high - low) / 2, rel=1e-10)
    assert s.n == n and "student-t" in s.ci_method


def test_single_episode_has_no_interval():
    s = summarize([0.4])
    assert (s.mean, s.std, s.ci95, s.n) == (0.4, None, None, 1)
    with pytest.raises(ValueError):
        summarize([])


def test_paired_tests_match_scipy():
    rng = random.Random(3)
    a = [rng.choice([0.6, 0.8, 1.0]) for _ in range(50)]
    b = [min(1.0, x + rng.choice([-0.2, 0.0, 0.2])) for x in a]
    c = paired_compare(a, b)
    t = st.ttest_rel(a, b)
    w = st.wilcoxon(a, b)
    assert (c.t_statistic, c.t_pvalue) == pytest.approx((t.statistic, t.pvalue))
    assert (c.wilcoxon_statistic, c.wilcoxon_pvalue) == pytest.approx((w.statistic, w.pvalue))
    assert c.mean_diff == pytest.approx(np.mean(a) - np.mean(b))
    greater = st.wilcoxon(a, b, alternative="greater").pvalue  # the side the signed ranks lean to
    assert c.wilcoxon_direction == (1 if greater < 0.5 else -1)
    assert paired_compare(b, a).wilcoxon_direction == -c.wilcoxon_direction


def test_wilcoxon_direction_follows_most_episodes_not_the_mean():
    b = [0.5] * 10
    a = [0.45] * 9 + [5.0]  # nine episodes lower, one far higher: the mean is higher
    c = paired_compare(a, b)
    assert c.mean_diff > 0 and c.wilcoxon_direction == -1
    assert paired_compare([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]).wilcoxon_direction == 0


def test_identical_results_give_no_evidence_and_constant_shift_is_certain():
    a = [0.5, 0.7, 0.9]
    same = paired_compare(a, a)
    assert same.t_pvalue == 1.0 and same.wilcoxon_pvalue == 1.0
    shifted = paired_compare([x + 0.1 for x in a], a)
    assert shifted.t_pvalue == 0.0 and math.isinf(shifted.t_statistic)
    with pytest.raises(ValueError):
        paired_compare([1.0], [1.0, 2.0])
