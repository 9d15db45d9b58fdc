"""Truth-comparison utilities: matching, support recovery, calibration."""

import numpy as np
import pytest

from spfa.evaluation import (
    calibration,
    match_factors,
    posterior_checks,
    relative_error,
    support_recovery,
    truth_in_estimate_gauge,
)
from spfa.simulate import simulate


def test_match_factors_undoes_permutation_sign_and_scale():
    sim = simulate("gaussian", p=200, pi0=(0.2, 0.5, 0.7), slab_sd=(1, 1, 1), seed=3)
    order = np.array([2, 0, 1])
    sign = np.array([-1.0, 1.0, -1.0])
    scale = np.array([3.0, 0.5, 2.0])
    # estimate with an extra junk column; factor t sits in column order[t]
    est_l = np.zeros((sim.loadings.shape[0], 4))
    est_f = np.zeros((sim.factors.shape[0], 4))
    est_l[:, order] = sim.loadings * sign * scale
    est_f[:, order] = sim.factors * sign / scale
    est_l[:, 3] = np.random.default_rng(0).normal(size=est_l.shape[0])
    m = match_factors(est_l, est_f, sim.loadings, sim.factors)
    np.testing.assert_array_equal(m.order, order)
    np.testing.assert_array_equal(m.sign, sign)
    np.testing.assert_allclose(m.similarity, 1.0)
    np.testing.assert_allclose(m.loadings_corr, 1.0)
    np.testing.assert_allclose(m.align(est_f), sim.factors / scale)


def test_match_factors_needs_enough_columns():
    with pytest.raises(ValueError, match="at least as many"):
        match_factors(np.ones((5, 1)), np.ones((4, 1)), np.ones((5, 2)), np.ones((4, 2)))


def test_support_recovery_extremes():
    truth = np.array([0.0, 0.0, 1.5, -2.0, 0.0, 0.3])
    perfect = support_recovery(np.abs(truth), truth)
    assert perfect["auroc"] == 1.0 and perfect["average_precision"] == 1.0
    assert perfect["n_nonzero"] == 3
    worst = support_recovery(-np.abs(truth), truth)
    assert worst["auroc"] == 0.0
    assert np.isnan(support_recovery(np.ones(3), np.zeros(3))["auroc"])
    with pytest.raises(ValueError, match="entries"):
        support_recovery(np.ones(3), np.ones(4))


def test_calibration_of_calibrated_and_overconfident_pips():
    rng = np.random.default_rng(0)
    pip = rng.uniform(size=200_000)
    truth = (rng.uniform(size=pip.size) < pip).astype(float)  # P(non-zero | pip) = pip
    cal = calibration(pip, truth)
    assert cal.count.sum() == pip.size
    assert cal.max_gap(50) < 0.01
    overconfident = calibration(np.where(pip > 0.5, 1.0, 0.0), truth)
    assert overconfident.max_gap(50) > 0.2
    # a bin under min_count is ignored
    assert np.isnan(calibration([0.05], [1.0]).max_gap(50))


def test_relative_error():
    assert relative_error([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert relative_error([0.0, 0.0], [3.0, 4.0]) == 1.0


def test_truth_in_estimate_gauge_undoes_order_sign_and_scale(rng):
    L, F = rng.normal(size=(30, 3)), rng.normal(size=(40, 3))
    perm, sign, scale = np.array([2, 0, 1]), np.array([1.0, -1.0, 1.0]), np.array([3.0, 0.5, 2.0])
    # estimate: permuted, sign-flipped, scale moved from F to L, plus an extra empty factor
    est_l = np.zeros((30, 4))
    est_f = np.zeros((40, 4))
    est_l[:, perm] = L * sign * scale
    est_f[:, perm] = F * sign / scale
    est_l[:, 3], est_f[:, 3] = 0.0, 0.0
    match = match_factors(est_l, est_f, L, F)
    true_l, true_f = truth_in_estimate_gauge(match, est_l, est_f, L, F)
    np.testing.assert_allclose(true_l, est_l, atol=1e-12)
    np.testing.assert_allclose(true_f, est_f, atol=1e-12)


def test_posterior_checks_counts_coverage_and_signs():
    from spfa.priors import PointNormalPosterior

    post = PointNormalPosterior([[1.0, 1.0, 0.0, 1.0]], [[5.0, -5.0, 0.0, 5.0]], [[1.0] * 4])
    truth = np.array([[5.5, 4.0, 0.0, 0.0]])
    out = posterior_checks(post, truth, level=0.95)
    # inside: 5.5 in [3.04, 6.96]; 4.0 not in [-6.96, -3.04]; 0 in the point mass; 0 not in slab
    assert out["coverage"] == 0.5 and out["coverage_zero"] == 0.5 and out["coverage_nonzero"] == 0.5
    # confident: entries 0, 1, 3; right sign only for entry 0 (a true zero counts as wrong)
    assert out["n_confident"] == 3 and out["sign_accuracy"] == 1 / 3
