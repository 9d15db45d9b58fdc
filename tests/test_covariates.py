"""Known covariates in the model: eta = L F^T + C B^T + b."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from spfa import SparseFactorAnalysis
from spfa.fitting import FitSettings, compute_start, new_model
from spfa.likelihoods import get_likelihood
from spfa.simulate import simulate_batch_effect


def _fit(x, covariates=None, **kw):
    est = SparseFactorAnalysis(**{"n_components": 6, "random_state": 0, **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        return est.fit(x, covariates=covariates)


def _batch_correlation(est, batch_onehot) -> np.ndarray:
    """Each kept factor's largest |correlation| of its loadings with a batch indicator."""
    Z = est.loadings_[:, est.active_components_]
    return np.array(
        [
            max(abs(np.corrcoef(Z[:, j], batch_onehot[:, c])[0, 1]) for c in range(3))
            for j in range(Z.shape[1])
        ]
    )


def _contrasts(coef):
    """The identified part of batch effects beside an intercept: each feature's effects
    less their mean over the batches."""
    return coef - coef.mean(1, keepdims=True)


@pytest.fixture(scope="module")
def sim():
    return simulate_batch_effect(seed=0)


@pytest.fixture(scope="module")
def fits(sim):
    return _fit(sim.x), _fit(sim.x, sim.covariates)


def test_the_batch_leaves_the_factors_when_it_is_a_covariate(sim, fits):
    plain, aware = fits
    assert _batch_correlation(plain, sim.covariates).max() > 0.4  # the batch became factors
    assert _batch_correlation(aware, sim.covariates).max() < 0.2
    # the planted batch effects, as far as they are identified
    r = np.corrcoef(_contrasts(sim.batch_coef).ravel(), _contrasts(aware.covariate_coef_).ravel())
    assert r[0, 1] >= 0.9
    assert aware.covariate_coef_.shape == aware.covariate_coef_sd_.shape == (300, 3)
    assert np.all(aware.covariate_coef_sd_ > 0)
    assert aware.covariate_prior_scale_.shape == (3,)
    assert aware.n_covariates_ == 3 and plain.n_covariates_ == 0
    assert not hasattr(plain, "covariate_coef_")


def test_new_rows_need_their_covariates(sim, fits):
    _, aware = fits
    x, C = sim.x[:20], sim.covariates[:20]
    assert aware.transform(x, covariates=C).shape == (20, 6)
    assert np.isfinite(aware.score(x, covariates=C))
    with pytest.raises(ValueError, match="pass covariates= for these rows"):
        aware.transform(x)
    with pytest.raises(ValueError, match="have 2"):
        aware.transform(x, covariates=C[:, :2])
    with pytest.raises(ValueError, match="had no covariates"):
        fits[0].transform(x, covariates=C)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full((600, 2), np.nan), "NaN or infinity"),
        (np.ones((599, 2)), "one row per sample"),
        (np.array([["a", "b"]] * 600), "must be numeric"),
        (np.ones((600, 0)), "one row per sample"),
    ],
)
def test_bad_covariates_are_a_value_error(sim, bad, match):
    with pytest.raises(ValueError, match=match):
        SparseFactorAnalysis(2, max_iter=5).fit(sim.x, covariates=bad)


def test_inverse_transform_and_sample_with_and_without_the_covariates(sim, fits):
    _, aware = fits
    Z, C = aware.loadings_[:5], sim.covariates[:5]
    with_c = aware.inverse_transform(Z, covariates=C)
    expected = np.exp(Z @ aware.components_ + C @ aware.covariate_coef_.T + aware.intercept_)
    np.testing.assert_allclose(with_c, expected, rtol=1e-10)
    # without: the covariates at zero (batch-corrected)
    np.testing.assert_allclose(
        aware.inverse_transform(Z), np.exp(Z @ aware.components_ + aware.intercept_), rtol=1e-10
    )
    draws = aware.sample(2, random_state=0)
    assert draws.shape == (2, 600, 300) and np.all(draws >= 0)


def test_the_linear_predictor_takes_the_covariates_as_known_loadings():
    """Moments of eta against their definition, and against Monte Carlo draws."""
    torch.manual_seed(0)
    n, p, k, c = 7, 5, 2, 3
    lik = get_likelihood("poisson", "exp")
    lik.initialize(np.ones(p), np.ones(p))
    settings = FitSettings(
        k, {"loadings": "point_normal", "factors": "point_normal"}, True, "mc", 1, 8, 1, 0.0,
        0.05, None, torch.device("cpu"),
    )  # fmt: skip
    model = new_model(n, p, lik, settings, c)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(0.3 * torch.randn_like(prm))
    C = torch.randn(n, c, dtype=torch.float32)
    mean, var = model.eta_moments(covariates=C)
    ml, vl = model.loadings.moments()
    mf, vf = model.factors.moments()
    mc, vc = model.covariate_effects.moments()
    mb, vb = model.intercept.moments()
    torch.testing.assert_close(mean, ml @ mf.T + C @ mc.T + mb)
    expected_var = (vl + ml**2) @ vf.T + vl @ (mf**2).T + (C**2) @ vc.T + vb
    torch.testing.assert_close(var, expected_var)
    # the entries' path gives the grid's values
    rows, cols = torch.tensor([0, 3, 6, 6]), torch.tensor([4, 0, 2, 1])
    m_e, v_e = model.eta_moments(rows, cols, C[rows])
    torch.testing.assert_close(m_e, mean[rows, cols])
    torch.testing.assert_close(v_e, var[rows, cols])
    # Monte Carlo: joint draws of L, F, B, b
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([model.sample_eta(gen, covariates=C) for _ in range(40000)]).double()
    n_draws = draws.shape[0]
    se_mean = (draws.var(0) / n_draws).sqrt()
    assert torch.all((draws.mean(0) - mean).abs() <= 5 * se_mean)
    square = (draws - draws.mean(0)) ** 2
    se_var = (square.var(0) / n_draws).sqrt()
    assert torch.all((square.mean(0) - var).abs() <= 5 * se_var)


def test_the_streamed_start_fits_the_covariates_as_the_whole_data_start(sim):
    lik = get_likelihood("poisson", "exp")
    settings = FitSettings(
        3, {"loadings": "point_normal", "factors": "point_normal"}, True, "mc", 1, 8, 1, 0.0,
        0.05, None, torch.device("cpu"),
    )  # fmt: skip
    X = sp.csr_matrix(sim.x)
    model = new_model(*X.shape, lik, settings, 3)
    whole, _ = compute_start(
        model, X, None, settings, np.random.RandomState(0), None, sim.covariates
    )
    streamed_settings = FitSettings(**{**vars(settings), "batch_size": 64})
    streamed, _ = compute_start(
        model, X, None, streamed_settings, np.random.RandomState(0), None, sim.covariates
    )
    assert whole.loading_blocks is None and streamed.loading_blocks is not None
    np.testing.assert_allclose(streamed.covariate_coef, whole.covariate_coef, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        streamed.covariate_precision, whole.covariate_precision, rtol=1e-8, atol=1e-10
    )
    r = np.corrcoef(_contrasts(sim.batch_coef).ravel(), _contrasts(whole.covariate_coef).ravel())
    assert r[0, 1] > 0.8  # already at the start


def test_minibatches_of_sparse_rows_and_a_saved_fit_take_covariates(sim, tmp_path):
    est = _fit(sp.csr_matrix(sim.x), sim.covariates, batch_size=100)
    assert _batch_correlation(est, sim.covariates).max() < 0.2
    path = tmp_path / "fit.spfa"
    est.save(path)
    back = SparseFactorAnalysis.load(path)
    x, C = sim.x[:30], sim.covariates[:30]
    np.testing.assert_allclose(back.covariate_coef_, est.covariate_coef_)
    np.testing.assert_allclose(
        back.transform(x, covariates=C), est.transform(x, covariates=C), rtol=1e-5, atol=1e-6
    )


def test_heldout_scores_count_the_covariates(sim):
    from spfa.heldout import heldout_score

    est = SparseFactorAnalysis(4, random_state=0, max_iter=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aware, _ = heldout_score(est, sim.x, method="thin", covariates=sim.covariates, n_draws=20)
        plain, _ = heldout_score(est, sim.x, method="thin", n_draws=20)
    # the same k with the batch in the model predicts held-out counts better
    assert aware > plain


def test_choose_k_fits_the_covariates_at_every_k(sim, monkeypatch):
    import spfa.model_selection as model_selection

    seen = []
    original = model_selection.heldout_score

    def spy(*args, **kw):
        seen.append(kw.get("covariates"))
        return original(*args, **kw)

    monkeypatch.setattr(model_selection, "heldout_score", spy)
    est = SparseFactorAnalysis(random_state=0, max_iter=100, tol=1e-3)
    x, C = sim.x[:200, :100], sim.covariates[:200]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        choice = model_selection.choose_k(est, x, [1, 3], covariates=C, n_draws=5)
    assert len(seen) == 2 and all(c is C for c in seen)
    assert choice.k in (1, 3)
