"""Correlation statistics of the alignment study: Pearson, Spearman, partial correlation and
percentile bootstrap intervals, in float64 NumPy (no SciPy at run time; tests compare with it).

Every function takes 1-D sequences of equal length ``n`` (points of the study, e.g. mean CKA and
perplexity at one step of one arm) and returns plain floats; a constant input gives NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _vectors(*columns: Sequence[float], at_least: int = 3) -> list[np.ndarray]:
    arrays = [np.asarray(c, dtype=np.float64).ravel() for c in columns]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"correlation needs sequences of one length, got {[len(a) for a in arrays]}")
    if n < at_least:
        raise ValueError(f"correlation needs at least {at_least} points, got {n}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("correlation inputs must be finite (a NaN perplexity or CKA?)")
    return arrays


def rank(x: Sequence[float]) -> np.ndarray:
    """Ranks 1…n, ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else float("nan")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r."""
    return _pearson(*_vectors(x, y))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's r of the ranks (ties averaged)."""
    x, y = _vectors(x, y)
    return _pearson(rank(x), rank(y))


def _residual(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    design = np.column_stack([np.ones(len(z)), z])
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    return v - design @ coef


def partial_correlation(x: Sequence[float], y: Sequence[float], z: Sequence[float], *, ranks: bool = True) -> float:
    """Correlation of ``x`` and ``y`` with ``z`` held fixed: the Pearson r of the residuals of
    ``x`` and ``y`` after a least-squares line on ``z`` (on ranks when ``ranks``: partial Spearman)."""
    x, y, z = _vectors(x, y, z, at_least=4)
    if ranks:
        x, y, z = rank(x), rank(y), rank(z)
    return _pearson(_residual(x, z), _residual(y, z))


def bootstrap_interval(
    statistic: Callable[..., float], *columns: Sequence[float], resamples: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*columns)``: points resampled with replacement
    (the same indices for every column), ``resamples`` times; resamples giving NaN (e.g. a constant
    draw) are dropped. Returns ``(low, high)``."""
    arrays = _vectors(*columns)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        with np.errstate(invalid="ignore", divide="ignore"):
            values.append(statistic(*(a[idx] for a in arrays)))
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
