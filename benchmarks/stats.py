"""Paired comparisons over seeds: the statistics every comparison table of the benchmarks shows.

A run of model A and a run of the baseline with the same seed share the data, the split and the
order of the examples; what differs is the model (and its initial weights). Their difference d_s
per seed s is one observation, and over n seeds

    mean  d_bar = sum_s d_s / n,    sd = sqrt(sum_s (d_s - d_bar)^2 / (n - 1))
    95% CI      d_bar -/+ t_{0.975, n-1} * sd / sqrt(n)         (Student's t, n - 1 degrees of freedom)
    p-value     two-sided paired t-test of mean d = 0: t = d_bar / (sd / sqrt(n))

(scipy.stats.ttest_rel). With fewer than 2 seeds neither the interval nor p exists (NaN).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

__all__ = ["paired_difference", "CONFIDENCE"]

CONFIDENCE = 0.95


def paired_difference(treatment: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> Dict[str, float]:
    """Mean of treatment - reference over paired seeds with its t interval and paired t-test p.

    Returns {"n", "mean", "std" (of the differences), "low", "high" (the interval), "p"}; NaN
    where undefined (n < 2, or a NaN in the inputs: a metric without support in some seed).
    """
    treatment, reference = np.asarray(treatment, float), np.asarray(reference, float)
    if treatment.shape != reference.shape or treatment.ndim != 1:
        raise ValueError(f"paired_difference: expected two 1-D sequences of the same length (paired by seed), "
                         f"got shapes {treatment.shape} and {reference.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_difference: confidence must be in (0, 1), got {confidence!r}")
    differences = treatment - reference
    n = int(differences.size)
    nan = float("nan")
    if n == 0 or np.isnan(differences).any():
        return dict(n=n, mean=nan if n == 0 else float(np.mean(differences)), std=nan, low=nan, high=nan, p=nan)
    mean = float(differences.mean())
    if n < 2:
        return dict(n=n, mean=mean, std=nan, low=nan, high=nan, p=nan)
    from scipy import stats

    std = float(differences.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    # Identical pairs (std 0) give no t statistic: p is 1 when they agree exactly, else 0.
    p = float(stats.ttest_rel(treatment, reference).pvalue) if std > 0 else (1.0 if mean == 0 else 0.0)
    return dict(n=n, mean=mean, std=std, low=mean - half, high=mean + half, p=p)
