"""Summaries and paired comparisons of per-episode results."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import stats as _st

CI_METHOD = "student-t 95% two-sided, std ddof=1, over episodes"


@dataclass(frozen=True)
class Summary:
    """mean, sample std (ddof=1), n, and the half-width of the 95% Student-t interval.

    std and ci95 are None when n < 2 (undefined).
    """

    mean: float
    std: float | None
    n: int
    ci95: float | None
    ci_method: str = CI_METHOD

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Summary of per-episode values: ``t_{0.975, n-1} * std / sqrt(n)`` as the CI half-width."""
    n = len(values)
    if n == 0:
        raise ValueError("cannot summarize zero episodes")
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(mean, None, n, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(_st.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return Summary(mean, std, n, half)


def worst_episode(values: Sequence[float], higher_is_better: bool) -> tuple[float, int]:
    """The worst per-episode value and its index (the lowest accuracy, the highest error; the first
    such episode on a tie)."""
    value = (min if higher_is_better else max)(values)
    return value, list(values).index(value)


@dataclass(frozen=True)
class PairedComparison:
    """A - B on identical episodes: mean difference, paired t-test and Wilcoxon signed-rank test.

    ``wilcoxon_direction``: the side the signed ranks lean to, the sign of W+ - W- of the non-zero
    differences A - B (+1: A tends to be larger, -1: smaller, 0: balanced); a two-sided p-value
    alone does not say which.
    """

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci95_diff: float | None
    t_statistic: float | None
    t_pvalue: float
    wilcoxon_statistic: float | None
    wilcoxon_pvalue: float
    wilcoxon_direction: int = 0


def paired_compare(a: Sequence[float], b: Sequence[float]) -> PairedComparison:
    """Paired tests of two per-episode lists of equal length (same episodes, same order).

    When every difference is zero the tests are undefined; both p-values are then 1.0. A constant
    non-zero difference gives an infinite t statistic and a t p-value of 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    summary = summarize(diffs)
    mean_a, mean_b = math.fsum(a) / len(a), math.fsum(b) / len(b)
    if len(diffs) < 2:
        raise ValueError("paired comparison needs at least 2 episodes")
    if all(d == 0 for d in diffs):  # identical results: no evidence of any difference
        return PairedComparison(len(a), mean_a, mean_b, 0.0, 0.0, None, 1.0, None, 1.0)
    if all(d == diffs[0] for d in diffs):  # constant non-zero difference: t is infinite
        t_stat, t_p = math.copysign(math.inf, diffs[0]), 0.0
    else:
        t = _st.ttest_rel(a, b)
        t_stat, t_p = float(t.statistic), float(t.pvalue)
    w = _st.wilcoxon(a, b, zero_method="wilcox")
    nonzero = [d for d in diffs if d != 0]
    ranks = _st.rankdata([abs(d) for d in nonzero])
    lean = math.fsum(r if d > 0 else -r for d, r in zip(nonzero, ranks))  # W+ - W-
    return PairedComparison(len(a), mean_a, mean_b, summary.mean, summary.ci95,
                            t_stat, t_p, float(w.statistic), float(w.pvalue), (lean > 0) - (lean < 0))
