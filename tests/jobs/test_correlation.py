"""The study's correlation statistics against SciPy on fixed data."""

import numpy as np
import pytest
from scipy import stats

from hf_sdft.jobs.correlation import bootstrap_interval, partial_correlation, pearson, rank, spearman


@pytest.fixture
def points():
    rng = np.random.default_rng(3)
    z = rng.normal(size=40)
    x = z + 0.7 * rng.normal(size=40)
    y = -0.8 * z + 0.5 * x + 0.6 * rng.normal(size=40)
    return x, y, z


def test_ranks_average_ties():
    np.testing.assert_allclose(rank([3.0, 1.0, 3.0, 2.0, 3.0]), stats.rankdata([3.0, 1.0, 3.0, 2.0, 3.0]))


def test_pearson_and_spearman_match_scipy(points):
    x, y, _ = points
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    tied = np.round(x, 0)  # many ties
    assert spearman(tied, y) == pytest.approx(stats.spearmanr(tied, y).statistic, abs=1e-12)


@pytest.mark.parametrize("ranks", [False, True])
def test_partial_correlation_matches_the_three_correlation_formula(points, ranks):
    x, y, z = points
    r = (lambda a, b: stats.spearmanr(a, b).statistic) if ranks else (lambda a, b: stats.pearsonr(a, b).statistic)
    rxy, rxz, ryz = r(x, y), r(x, z), r(y, z)
    expected = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
    assert partial_correlation(x, y, z, ranks=ranks) == pytest.approx(expected, abs=1e-10)
    assert abs(expected - rxy) > 0.05  # controlling for z changes the figure here


def test_bootstrap_interval_matches_scipy_percentile_bootstrap(points):
    x, y, _ = points
    ours = bootstrap_interval(spearman, x, y, resamples=4000, seed=1)
    ref = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                          n_resamples=4000, method="percentile", random_state=2).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.04) and ours[1] == pytest.approx(ref.high, abs=0.04)
    assert ours[0] < spearman(x, y) < ours[1]


def test_constant_input_gives_nan_and_bad_input_errors():
    assert np.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        pearson([1, 2], [2, 1])
    with pytest.raises(ValueError, match="finite"):
        spearman([1, 2, float("nan")], [1, 2, 3])
