"""Point-normal posterior summaries against scipy and Monte Carlo."""

import numpy as np
import pytest
from scipy import stats

from spfa.priors import PointNormalPosterior


@pytest.fixture
def post(rng):
    shape = (40, 3)
    pip = rng.uniform(0, 1, shape)
    pip[0] = [0.0, 1.0, 0.5]
    return PointNormalPosterior(pip, rng.normal(0, 2, shape), rng.uniform(0.1, 2, shape))


def test_moments_and_lfsr_match_monte_carlo(post):
    draws = post.sample(200_000, random_state=1)
    se = post.sd / np.sqrt(draws.shape[0])
    np.testing.assert_array_less(np.abs(draws.mean(0) - post.mean), 5 * se + 1e-12)
    centred = draws - draws.mean(0)
    var_se = np.sqrt(((centred**2 - post.var) ** 2).mean(0) / draws.shape[0])
    np.testing.assert_array_less(np.abs((centred**2).mean(0) - post.var), 5 * var_se + 1e-12)
    p_nonneg, p_nonpos = (draws >= 0).mean(0), (draws <= 0).mean(0)
    np.testing.assert_allclose(post.lfsr, np.minimum(p_nonneg, p_nonpos), atol=0.005)


def test_cdf_matches_scipy_mixture(post):
    t = np.linspace(-3, 3, 7)[:, None, None]
    slab = stats.norm.cdf(t, loc=post.slab_mean, scale=post.slab_sd)
    expected = post.pip * slab + (1 - post.pip) * (t >= 0)
    np.testing.assert_allclose(post.cdf(t), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("q", [1e-6, 0.025, 0.3, 0.5, 0.7, 0.975, 1 - 1e-6])
def test_quantile_inverts_cdf(post, q):
    t = post.quantile(q)
    # smallest t with cdf(t) >= q: cdf at t reaches q, just below t it does not
    assert np.all(post.cdf(t) >= q - 1e-9)
    below = post.cdf(t - 1e-7 * np.maximum(1, np.abs(t)))
    assert np.all(below <= q + 1e-9)


def test_interval_of_pure_slab_is_normal_interval(rng):
    mu, sd = rng.normal(size=(5, 2)), rng.uniform(0.5, 2, (5, 2))
    post = PointNormalPosterior(np.ones((5, 2)), mu, sd)
    lower, upper = post.interval(0.9)
    ref = stats.norm.interval(0.9, loc=mu, scale=sd)
    np.testing.assert_allclose(lower, ref[0], rtol=1e-10)
    np.testing.assert_allclose(upper, ref[1], rtol=1e-10)


def test_point_mass_enters_intervals_and_lfsr():
    # pip 0: the point mass; pip 0.5 with a slab far from 0: the interval reaches 0
    post = PointNormalPosterior([[0.0, 0.5, 0.99]], [[3.0, 10.0, 10.0]], [[1.0, 1.0, 1.0]])
    lower, upper = post.interval(0.95)
    assert lower[0, 0] == upper[0, 0] == 0.0
    assert lower[0, 1] == 0.0 and upper[0, 1] > 10
    assert lower[0, 2] > 7
    np.testing.assert_allclose(post.lfsr[0], [1.0, 0.5, 0.01 + 0.99 * stats.norm.cdf(-10)])
    np.testing.assert_array_equal(post.sign[0], [0.0, 1.0, 1.0])


def test_intervals_cover_draws_from_the_posterior_at_nominal_rate(post):
    # if the truth is drawn from q itself, a level-0.8 interval holds it with
    # probability >= 0.8 (exactly 0.8 unless the point mass straddles a tail)
    truth = post.sample(4000, random_state=2)
    lower, upper = post.interval(0.8)
    inside = ((lower <= truth) & (truth <= upper)).mean(0)
    slab_only = (post.pip == 1.0) | (post.lfsr < 0.05)
    assert np.all(inside >= 0.8 - 0.03)
    np.testing.assert_allclose(inside[slab_only], 0.8, atol=0.03)


def test_bad_arguments(post):
    with pytest.raises(ValueError, match="one shape"):
        PointNormalPosterior(np.ones((2, 2)), np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="pip must lie"):
        PointNormalPosterior([[1.5]], [[0.0]], [[1.0]])
    with pytest.raises(ValueError, match="level"):
        post.interval(1.0)
    with pytest.raises(ValueError, match="strictly between"):
        post.quantile(0.0)
