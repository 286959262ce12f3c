"""Pure interval statistics of a mean (no store, no plotting): Wilson score for 0/1 scores, else a seeded bootstrap."""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson(k: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion k/n (Wilson, JASA 1927)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (Efron & Tibshirani 1993), seeded."""
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """95% interval of the mean of per-sample scores: Wilson when every score is 0 or 1, else the bootstrap."""
    if len(values) and np.all((values == 0) | (values == 1)):
        return wilson(float(values.sum()), len(values))
    return bootstrap_ci(values)


def attack_success_rate(clean_correct: np.ndarray, adv_correct: np.ndarray) -> float:
    """Fraction of clean-correct samples made incorrect; NaN when no sample is correct on clean input."""
    clean_correct, adv_correct = np.asarray(clean_correct, dtype=int), np.asarray(adv_correct, dtype=int)
    n = int(clean_correct.sum())
    return float(((clean_correct == 1) & (adv_correct == 0)).sum() / n) if n else math.nan
