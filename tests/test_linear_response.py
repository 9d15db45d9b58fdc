"""The posteriors widened for the other side's uncertainty (spfa.linear_response)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import optimize
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis, linear_response
from spfa.data import RowBatches
from spfa.likelihoods import get_likelihood
from spfa.linear_response import _derivatives, _extra_variance, _sums, propagated_variances
from spfa.simulate import MATCHED_FIT, simulate, simulate_views


def _brute_force(g, h, a, b, v, tau, other=None):
    """``diag(sum_j J_ij V_j J_ij^T)`` with ``J_ij = A_i^{-1} C_ij``, entry by entry;
    ``other``: the variance of one more effect on ``b``'s side, coefficient 1 on ``a``'s."""
    m, k = a.shape
    out = np.zeros((m, k))
    for i in range(m):
        A = np.diag(tau) - sum(min(h[i, j], 0.0) * np.outer(b[j], b[j]) for j in range(len(b)))
        acc = np.zeros((k, k))
        for j in range(len(b)):
            # columns: b_j's k entries, then the other effect's
            own = h[i, j] * np.outer(b[j], a[i]) + g[i, j] * np.eye(k)
            C = np.hstack([own, h[i, j] * b[j][:, None]])
            V = np.diag(np.append(v[j], 0.0 if other is None else other[i, j]))
            J = np.linalg.solve(A, C)
            acc += J @ V @ J.T
        out[i] = np.diag(acc)
    return out


def test_the_sums_over_entries_match_the_brute_force_response():
    rng = np.random.default_rng(0)
    m, q, k = 4, 9, 3
    g, h = rng.normal(size=(m, q)), rng.normal(size=(m, q)) - 0.5  # some h > 0: clipped in A
    a, b = rng.normal(size=(m, k)), rng.normal(size=(q, k))
    v, tau = rng.uniform(0.1, 1.0, size=(q, k)), rng.uniform(0.5, 2.0, size=k)
    t = [torch.as_tensor(z) for z in (g, h, a, b, v)]
    got = _extra_variance(*_sums(*t), torch.as_tensor(tau)).numpy()
    np.testing.assert_allclose(got, _brute_force(g, h, a, b, v, tau), rtol=1e-10)
    other = rng.uniform(0.1, 1.0, size=(m, q))  # e.g. an intercept's and covariates' variance
    got = _extra_variance(*_sums(*t, torch.as_tensor(other)), torch.as_tensor(tau)).numpy()
    np.testing.assert_allclose(got, _brute_force(g, h, a, b, v, tau, other), rtol=1e-10)


def test_the_response_is_how_the_best_loading_moves_with_the_factors():
    """Oracle: the row's MAP loadings given F and the intercept b, solved by scipy and
    differentiated in F and b by central differences; their variance under Var(F) and
    Var(b) is what the module adds."""
    rng = np.random.default_rng(1)
    p, k = 40, 2
    f, b = rng.normal(0, 0.5, size=(p, k)), rng.normal(0.5, 0.3, size=p)
    v, tau = rng.uniform(0.01, 0.05, size=(p, k)), np.array([1.0, 4.0])
    x = rng.poisson(np.exp(f @ np.array([0.8, -0.5]) + b)).astype(float)
    vb = rng.uniform(0.01, 0.05, size=p)

    def best(f, b=b):
        def neg(z):
            eta = f @ z + b
            value = -(x @ eta - np.exp(eta).sum()) + 0.5 * tau @ z**2
            return value, -(f.T @ (x - np.exp(eta))) + tau * z

        def hess(z):
            return f.T @ (np.exp(f @ z + b)[:, None] * f) + np.diag(tau)

        res = optimize.minimize(
            neg, np.zeros(k), jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-13}
        )
        z = res.x
        for _ in range(3):  # trust-exact can stop near 1e-7: polish by Newton's steps
            z = z - np.linalg.solve(hess(z), neg(z)[1])
        return z

    l_star, step = best(f), 1e-5
    jac = np.zeros((k, p, k))  # d l* / d f_ja
    for j in range(p):
        for a in range(k):
            up, down = f.copy(), f.copy()
            up[j, a] += step
            down[j, a] -= step
            jac[:, j, a] = (best(up) - best(down)) / (2 * step)
    oracle = np.einsum("cja,ja,dja->cd", jac, v, jac).diagonal()
    jac_b = np.zeros((k, p))  # d l* / d b_j
    for j in range(p):
        up, down = b.copy(), b.copy()
        up[j] += step
        down[j] -= step
        jac_b[:, j] = (best(f, up) - best(f, down)) / (2 * step)
    oracle_b = oracle + (jac_b**2) @ vb

    lik = get_likelihood("poisson", link="exp")
    eta = torch.as_tensor(f @ l_star + b)[None]
    g, h = _derivatives(lik, torch.as_tensor(x)[None], None, eta, None, None)
    t = [torch.as_tensor(z) for z in (l_star[None], f, v)]
    got = _extra_variance(*_sums(g, h, *t), torch.as_tensor(tau)).numpy()[0]
    np.testing.assert_allclose(got, oracle, rtol=1e-4)
    got = _extra_variance(*_sums(g, h, *t, torch.as_tensor(vb)), torch.as_tensor(tau)).numpy()[0]
    np.testing.assert_allclose(got, oracle_b, rtol=1e-4)
    assert (oracle_b > oracle * 1.01).all()  # the intercept's share is not negligible here


@pytest.fixture(scope="module")
def fitted():
    sim = simulate(seed=1, likelihood="poisson")
    est = SparseFactorAnalysis(2, random_state=0, max_iter=300, **MATCHED_FIT)
    est.fit(sim.x)
    return est, sim


def test_fit_widens_both_sides_and_reports_the_widened_summaries(fitted):
    est, sim = fitted
    model = est.get_model()
    kept = est.active_components_
    assert kept.any()
    for side in ("loadings", "factors"):
        extra = getattr(est, f"{side}_propagated_var_")
        assert extra.shape == getattr(est, f"{side}_sd_").shape
        assert np.isfinite(extra).all() and (extra >= 0).all()
        widened = getattr(est, f"{side}_posterior")()
        plain = getattr(model, side).posterior()
        assert (widened.sd >= plain.sd).all()
        assert (widened.sd[:, kept] > plain.sd[:, kept]).any()
        np.testing.assert_array_equal(getattr(est, f"{side}_sd_"), widened.sd)
        np.testing.assert_array_equal(getattr(est, f"{side}_lfsr_"), widened.lfsr)
        np.testing.assert_array_equal(widened.pip, plain.pip)
        np.testing.assert_array_equal(widened.mean, plain.mean)
    # the loadings, fitted with the factors as if known, gain more than the factors
    rel = {}
    for side in ("loadings", "factors"):
        slab_var = getattr(model, side).posterior().slab_sd[:, kept] ** 2
        rel[side] = np.median(getattr(est, f"{side}_propagated_var_")[:, kept] / slab_var)
    assert rel["loadings"] > rel["factors"]


def test_new_rows_are_widened_and_a_saved_fit_keeps_its_widening(fitted, tmp_path):
    est, sim = fitted
    (model, _, _), _ = est._fit_rows(sim.x[:10], None)
    widened = est.loadings_posterior(sim.x[:10])
    assert (widened.sd >= model.loadings.posterior().sd).all()
    assert (widened.sd > model.loadings.posterior().sd).any()
    path = tmp_path / "fit.spfa"
    est.save(path)
    back = SparseFactorAnalysis.load(path)
    np.testing.assert_array_equal(back.factors_posterior().sd, est.factors_posterior().sd)
    np.testing.assert_array_equal(back.loadings_posterior().sd, est.loadings_posterior().sd)


def test_new_rows_are_not_widened_where_the_training_rows_were_not(fitted):
    """A fit whose loadings stayed mean-field (widening not finite, or interrupted)
    summarises new rows the same way, not one side widened and the other not."""
    est, sim = fitted
    (model, _, _), _ = est._fit_rows(sim.x[:10], None)
    plain = model.loadings.posterior()
    est.loadings_propagated_var_, kept = None, est.loadings_propagated_var_
    try:
        np.testing.assert_allclose(est.loadings_posterior(sim.x[:10]).sd, plain.sd)
    finally:
        est.loadings_propagated_var_ = kept
    assert (est.loadings_posterior(sim.x[:10]).sd > plain.sd).any()


def test_planted_loadings_are_covered_after_widening():
    """The sanity checks' Gaussian design, seed 2: mean-field 95 % intervals of the dense
    factor's 90 non-zero loadings cover 81 (0.90); widened, 87 (0.97)."""
    from simulations.peers import fit_spfa
    from simulations.sanity_checks import DESIGNS, K, _gauged_posteriors
    from spfa.evaluation import match_factors, posterior_checks
    from spfa.priors.point_normal import PointNormalPosterior

    sim = simulate(seed=2, **DESIGNS["gaussian"])
    fit = fit_spfa(sim.x, K, "gaussian", None, 2)
    match = match_factors(fit.loadings, fit.factors, sim.loadings, sim.factors)
    (_, post, truth), _ = _gauged_posteriors(fit, sim, match)
    dense = match.order[0]
    plain = fit.estimator.get_model().loadings.posterior()

    def covered(p):
        cols = [dense]
        one = PointNormalPosterior(p.pip[:, cols], p.slab_mean[:, cols], p.slab_sd[:, cols])
        return posterior_checks(one, truth[:, [dense]])["coverage_nonzero"]

    assert covered(plain) < 0.93 <= covered(post)


def test_a_matrix_that_is_not_positive_definite_gives_nan_not_an_error():
    curvature = torch.zeros((2, 2, 2), dtype=torch.float64)
    M = torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone()
    curvature[1] = -3.0 * torch.eye(2)  # A = diag(tau) - 3 I: indefinite in row 1
    got = _extra_variance(curvature, M, torch.tensor([1.0, 2.0]))
    np.testing.assert_allclose(got[0], [1.0, 0.25])
    assert torch.isnan(got[1]).all()


def test_row_chunks_and_feature_blocks_do_not_change_the_result(fitted, monkeypatch):
    est, sim = fitted
    model = est.get_model()
    data = RowBatches(sim.x, None, None, entries=False, device="cpu", seed=0)
    whole = propagated_variances(model, data)
    k = model.factors.k
    monkeypatch.setattr(linear_response, "CHUNK_ENTRIES", 7 * sim.x.shape[1])
    monkeypatch.setattr(linear_response, "FACTOR_ENTRIES", 11 * k * k)
    parts = propagated_variances(model, data)
    for side in ("loadings", "factors"):
        np.testing.assert_allclose(parts[side], whole[side], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(whole[side], getattr(est, f"{side}_propagated_var_"))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_the_intercept_and_covariate_effects_widen_the_loadings_only(monkeypatch):
    """Their means enter eta, so their variance moves the best loadings too (the oracle
    test checks the intercept's share); the factors' widening does not count them."""
    sim = simulate(seed=3, likelihood="poisson")
    C = np.random.default_rng(0).normal(size=(sim.x.shape[0], 2))
    est = SparseFactorAnalysis(2, random_state=0, max_iter=150, **MATCHED_FIT)
    est.fit(sim.x, covariates=C)
    model = est.get_model()
    data = RowBatches(sim.x, None, None, entries=False, device="cpu", seed=0, covariates=C)
    full = propagated_variances(model, data)
    np.testing.assert_allclose(full["loadings"], est.loadings_propagated_var_)
    sums = linear_response._sums
    monkeypatch.setattr(linear_response, "_sums", lambda *args: sums(*args[:5]))
    without = propagated_variances(model, data)
    kept = est.active_components_
    assert (full["loadings"] >= without["loadings"]).all()
    assert (full["loadings"][:, kept] > without["loadings"][:, kept]).all()
    np.testing.assert_array_equal(full["factors"], without["factors"])
    # the other effects' variance built by hand: V[b_j] + sum_c z_ic^2 V[B_jc]
    with torch.no_grad():
        z = torch.as_tensor(C, dtype=torch.float32)
        eta = model.linear_predictor(None, z).mean()
        ml, (mf, vf) = model.loadings.moments()[0], model.factors.moments()
        other = model.intercept.moments()[1] + z**2 @ model.covariate_effects.moments()[1].T
        tau = model.loadings.prior_precision()
        tau = torch.where(model.factors.active > 0, tau, torch.ones_like(tau))
    x = torch.as_tensor(sim.x, dtype=eta.dtype)
    g, h = _derivatives(model.likelihood, x, None, eta, None, None)
    by_hand = _extra_variance(*_sums(g, h, ml, mf, vf, other), tau).numpy()
    np.testing.assert_allclose(full["loadings"], by_hand, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_multi_view_fit_is_widened_with_each_views_likelihood_and_prior():
    """Each view's features respond through their own likelihood and their view's prior
    precision; the loadings sum the views' terms."""
    sim = simulate_views(
        n=80, views=(("rna", "poisson", 30), ("adt", "gaussian", 10)), activity=((1, 1), (1, 0))
    )
    # the views' features interleaved, as a user's matrix may have them
    order = np.random.default_rng(0).permutation(sim.x.shape[1])
    x_all, groups = sim.x[:, order], sim.feature_groups[order]
    est = SparseFactorAnalysis(
        2,
        likelihood={"rna": "poisson", "adt": "gaussian"},
        library_size=False,
        max_iter=150,
        random_state=0,
    )
    est.fit(x_all, feature_groups=groups)
    model = est.get_model()
    views, parts = model.likelihood.views, model.likelihood.parts
    assert not views.contiguous

    def tau(family):  # the module's: 1 for a switched-off factor
        t = family.prior_precision().detach()
        return torch.where(model.factors.active > 0, t, torch.ones_like(t))

    with torch.no_grad():
        eta = model.linear_predictor().mean()
        ml, vl = model.loadings.moments()
        mf, vf = model.factors.moments()
        x = torch.as_tensor(x_all, dtype=eta.dtype)
        # the intercept's variance moves the loadings too
        vb = model.intercept.moments()[1]
    curv_l, M_l, extra_f = 0, 0, []
    for lik, family, xv, ev, mv, vv, bv in zip(
        parts,
        model.factors.parts,
        *(views.split(t, -1) for t in (x, eta)),
        *(views.split(t, 0) for t in (mf, vf, vb)),
        strict=True,
    ):
        g, h = _derivatives(lik, xv, None, ev, None, None)
        c, M = _sums(g, h, ml, mv, vv, bv)
        curv_l, M_l = curv_l + c, M_l + M
        c, M = _sums(g.T, h.T, mv, ml, vl)
        extra_f.append(_extra_variance(c, M, tau(family)))
    np.testing.assert_allclose(
        est.loadings_propagated_var_,
        _extra_variance(curv_l, M_l, tau(model.loadings)).numpy(),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        est.factors_propagated_var_, views.join([e.numpy() for e in extra_f], 0), rtol=1e-5
    )
    kept = est.active_components_
    assert (est.factors_propagated_var_[:, kept] > 0).any(axis=0).all()
    post = est.factors_posterior()
    assert (post.sd >= model.factors.posterior().sd).all()
    np.testing.assert_array_equal(post.mean, model.factors.posterior().mean)
    with pytest.raises(ValueError, match="shape"):
        model.factors.posterior(np.zeros((3, 2)))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_zero_truncated_fit_is_widened_over_its_entries():
    """Its data are a list of the non-zero entries: in any batching, the sums over them
    are those of the grid with the zeros masked."""
    sim = simulate(seed=3, likelihood="poisson", n=200, p=300, intercept=np.full(300, 1.0))
    X = sp.csr_matrix(sim.x)
    est = SparseFactorAnalysis(
        2, likelihood="zt_poisson", random_state=0, library_size=False, max_iter=100
    )
    est.fit(X)
    kept = est.active_components_
    assert kept.any()
    model = est.get_model()
    whole = propagated_variances(
        model, RowBatches(X, None, None, entries=True, device="cpu", seed=0)
    )
    batches = propagated_variances(
        model, RowBatches(X, None, 17, entries=True, device="cpu", seed=0)
    )
    with torch.no_grad():
        eta = model.linear_predictor().mean()
        (ml, vl), (mf, vf) = model.loadings.moments(), model.factors.moments()
        vb = model.intercept.moments()[1]
        tau = {}
        for side in ("loadings", "factors"):
            t = getattr(model, side).prior_precision()
            tau[side] = torch.where(model.factors.active > 0, t, torch.ones_like(t))
    x = torch.as_tensor(sim.x, dtype=eta.dtype)
    g, h = _derivatives(model.likelihood, x, (x > 0).to(x.dtype), eta, None, None)
    grid = {
        "loadings": _extra_variance(*_sums(g, h, ml, mf, vf, vb), tau["loadings"]),
        "factors": _extra_variance(*_sums(g.T, h.T, mf, ml, vl), tau["factors"]),
    }
    for side in ("loadings", "factors"):
        np.testing.assert_allclose(whole[side], getattr(est, f"{side}_propagated_var_"))
        np.testing.assert_allclose(batches[side], whole[side], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(whole[side], grid[side].numpy(), rtol=1e-5, atol=1e-12)
        assert (whole[side][:, kept] > 0).all()


def test_an_interrupt_while_widening_keeps_the_fit(monkeypatch):
    """Ctrl-C in the pass after training loses nothing: the estimator holds the fit, with
    mean-field posteriors, and the interrupt goes on to the caller."""
    from spfa import fitting

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "propagated_variances", interrupted)
    sim = simulate(seed=1, likelihood="poisson")
    est = SparseFactorAnalysis(2, random_state=0, max_iter=100)
    with pytest.raises(KeyboardInterrupt, match="widening.*holds that fit"):
        est.fit(sim.x)
    assert est.loadings_propagated_var_ is None and est.factors_propagated_var_ is None
    model = est.get_model()
    np.testing.assert_array_equal(est.loadings_sd_, model.loadings.posterior().sd)
    np.testing.assert_array_equal(est.factors_posterior().sd, model.factors.posterior().sd)
    assert np.isfinite(est.elbo_) and est.components_.shape == (2, sim.x.shape[1])


def test_a_family_whose_mean_moves_with_its_scale_is_not_widened():
    sim = simulate(seed=1, likelihood="poisson")
    est = SparseFactorAnalysis(2, prior="point_exponential", random_state=0, max_iter=100)
    with pytest.warns(ConvergenceWarning):
        est.fit(sim.x)
    assert est.loadings_propagated_var_ is None and est.factors_propagated_var_ is None
    plain = est.get_model().factors.posterior()
    np.testing.assert_array_equal(est.factors_posterior().sd, plain.sd)
    np.testing.assert_array_equal(est.components_, plain.mean.T)
    with pytest.raises(ValueError, match="not widened"):
        est.get_model().factors.posterior(np.zeros(plain.shape))


@pytest.mark.parametrize("bad", [-1.0, np.nan, "shape"])
def test_a_bad_widening_is_refused(fitted, bad):
    est, _ = fitted
    family = est.get_model().factors
    extra = (
        np.zeros((family.m + 1, family.k)) if bad == "shape" else np.full((family.m, family.k), bad)
    )
    with pytest.raises(ValueError, match="extra_var must be finite, non-negative"):
        family.posterior(extra)
