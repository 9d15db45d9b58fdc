"""Multi-view fits: a likelihood per view of the features, a prior per view and factor."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import optimize, stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score

from spfa import SparseFactorAnalysis
from spfa.expectation import get_expectation
from spfa.likelihoods import Gaussian, Poisson, Views, view_likelihood
from spfa.priors import PRIORS, ViewFamily
from spfa.simulate import simulate_views
from spfa.testing import priors as prior_checks
from spfa.views import FeatureViews

LIKELIHOODS = {"rna": "poisson", "adt": "gaussian"}


@pytest.fixture(scope="module")
def two_views():
    """A small two-view design with shared and view-specific factors, and its fit."""
    sim = simulate_views(
        n=200,
        views=(("rna", "poisson", 120), ("adt", "gaussian", 30)),
        activity=((1, 1, 0), (1, 0, 1)),
        seed=1,
    )
    est = SparseFactorAnalysis(5, likelihood=LIKELIHOODS, link="softplus", random_state=0)
    est.fit(sim.x, feature_groups=sim.feature_groups)
    return sim, est


def _match(truth, estimate):
    """Estimated factor matched to each true factor by |correlation| of the loadings."""
    corr = np.abs(np.corrcoef(truth.T, estimate.T)[: truth.shape[1], truth.shape[1] :])
    rows, cols = optimize.linear_sum_assignment(-np.nan_to_num(corr))
    return cols[np.argsort(rows)], corr[rows, cols]


# ---------------------------------------------------------------------- the partition
def test_feature_views_split_and_join_round_trip():
    views = FeatureViews(["b", "a", "b", "b", "a"], ["a", "b"])
    assert views.of.tolist() == [1, 0, 1, 1, 0]
    assert [idx.tolist() for idx in views.index] == [[1, 4], [0, 2, 3]]
    assert views.local.tolist() == [0, 0, 1, 2, 1]
    values = np.arange(10.0).reshape(2, 5)
    parts = views.split(values)
    assert parts[0].tolist() == [[1.0, 4.0], [6.0, 9.0]]
    np.testing.assert_array_equal(views.join(parts), values)
    tensor = torch.as_tensor(values)
    assert torch.equal(views.join(views.split(tensor)), tensor)
    assert torch.equal(views.join(views.split(tensor.T, 0), 0), tensor.T)
    assert views.groups.tolist() == ["b", "a", "b", "b", "a"]
    # views in consecutive blocks: split into views of the tensor's memory, joined back
    blocks = FeatureViews(["a", "a", "b", "b", "b"], ["a", "b"])
    assert blocks.contiguous and not views.contiguous
    parts = blocks.split(tensor)
    assert parts[1].data_ptr() == tensor[:, 2:].data_ptr()
    assert torch.equal(blocks.join(parts), tensor)


@pytest.mark.parametrize(
    "groups, names, match",
    [
        (["a", "c"], ["a", "b"], "no likelihood"),
        (["a", "a"], ["a", "b"], "no features"),
        ([["a"], ["b"]], ["a", "b"], "1-D"),
        (["a", "a"], ["a", "a"], "distinct"),
    ],
)
def test_feature_views_bad_input(groups, names, match):
    with pytest.raises(ValueError, match=match):
        FeatureViews(groups, names)


# ---------------------------------------------------------------- the prior per view
@pytest.mark.parametrize("family", sorted(PRIORS))
def test_view_family_passes_the_prior_checks(family):
    """KL against Monte Carlo of its own draws, summaries, state, EB update, switching
    and permuting (spfa.testing's checks) on a family split into two views."""

    class TwoViews(ViewFamily):
        def __init__(self, m, k):
            groups = np.where(np.arange(m) % 3 == 0, "a", "b")
            super().__init__(PRIORS[family], FeatureViews(groups, ["b", "a"]), k)

    fam = prior_checks._family(TwoViews, 0)
    prior_checks._check_monte_carlo(family, fam, 0)
    prior_checks._check_summaries(family, fam)
    prior_checks._check_state(family, TwoViews, fam)
    prior_checks._check_update(family, fam)
    prior_checks._check_switch_and_permute(family, prior_checks._family(TwoViews, 0))


def test_view_family_learns_its_prior_per_view():
    """A factor with entries in one view only: the EB update gives it inclusion near 1
    there and near 0 in the other view, and its KL splits by view."""
    views = FeatureViews(["a"] * 6 + ["b"] * 4, ["a", "b"])
    fam = ViewFamily(PRIORS["point_normal"], views, 2)
    with torch.no_grad():
        for part, on in zip(fam.parts, (8.0, -8.0), strict=True):
            part.logits[:, 0] = on
        fam.update_prior_()
    pi = fam.prior_summary()["prior_pi"].detach()
    assert pi.shape == (2, 2)
    assert float(pi[0, 0]) > 0.99 and float(pi[0, 1]) < 0.01
    with torch.no_grad():
        assert torch.allclose(fam.kl_by_view().sum(), fam.kl())
    # one active buffer: switching a factor off switches it off in every view
    fam.active[1] = 0.0
    assert all(float(part.active[1]) == 0.0 for part in fam.parts)
    fam.double()
    fam.active[0] = 0.0
    assert all(float(part.active[0]) == 0.0 for part in fam.parts)


# ------------------------------------------------------------ the likelihood per view
def _views_likelihood():
    views = FeatureViews(["g", "c", "c", "g", "c"], ["c", "g"])
    lik = Views({"c": Poisson("softplus"), "g": Gaussian()}, views)
    lik.initialize(np.ones(5), np.array([1.0, 1.0, 1.0, 2.0, 1.0]))
    return lik, views


def test_views_log_prob_matches_scipy_on_grid_and_entries():
    """Each view's features get its own log-probability (scipy's), on a grid and at
    listed entries, with size factors on the count view only."""
    lik, views = _views_likelihood()
    lik.requires_grad_(False)
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(4, 5)).astype(float)
    x[:, views.index[1]] = rng.normal(size=(4, 2))
    eta = rng.normal(size=(4, 5))
    log_s = np.log(rng.uniform(0.5, 2.0, size=(4, 1)))
    var = lik.parts[1].noise_variance.detach().double().numpy()
    mu = np.log1p(np.exp(eta)) * np.exp(log_s)
    expected = stats.poisson.logpmf(x, mu)
    g = views.index[1]
    expected[:, g] = stats.norm.logpdf(x[:, g], eta[:, g], np.sqrt(var))
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    grid = lik.log_prob(t(x), t(eta), t(log_s)).numpy()
    np.testing.assert_allclose(grid, expected, rtol=1e-5, atol=1e-5)
    rows, cols = np.nonzero(np.ones((4, 5)))
    entries = lik.log_prob(
        t(x[rows, cols]),
        t(eta[rows, cols]),
        t(log_s[rows, 0]),
        torch.as_tensor(rows),
        torch.as_tensor(cols),
    ).numpy()
    np.testing.assert_allclose(entries, expected[rows, cols], rtol=1e-5, atol=1e-5)
    # the expected log-probability: each view's own rule (the Gaussian's closed form)
    rule = get_expectation("quadrature", 40)
    ell = lik.expected_log_prob(t(x), t(eta), t(np.full((4, 5), 1e-8)), t(log_s), rule)
    np.testing.assert_allclose(ell.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_view_likelihood_builds_each_view_with_its_link():
    lik = view_likelihood(
        {"rna": "negative_binomial", "adt": "gaussian"}, {"rna": "softplus"}, ["adt", "rna"]
    )
    assert [p.name for p in lik.parts] == ["negative_binomial", "gaussian"]
    assert lik.parts[0].link.name == "softplus"
    assert lik.positive_mean and not lik.integer_support
    with pytest.raises(ValueError, match="no likelihood"):
        view_likelihood({"rna": "poisson"}, {"protein": "exp"}, ["rna"])
    with pytest.raises(ValueError, match="only non-zero"):
        view_likelihood({"rna": "zt_poisson", "adt": "gaussian"}, "exp", ["rna", "adt"])


# ------------------------------------------------------------------------- fitting
def test_views_fit_recovers_which_factor_lives_where(two_views):
    """view_elbo_contribution_ tells shared from view-specific factors: AUROC 1 against
    the planted activity after matching factors to the truth by their loadings."""
    sim, est = two_views
    kept = est.active_components_
    assert est.view_elbo_contribution_.shape == (2, 5)
    assert np.all(est.view_elbo_contribution_[:, ~kept] == 0)
    assert list(est.view_names_) == ["rna", "adt"]
    match, corr = _match(sim.loadings, est.loadings_[:, kept])
    assert corr.min() > 0.8
    score = est.view_elbo_contribution_[:, kept][:, match]
    share = score / np.abs(score).sum(1, keepdims=True)
    assert roc_auc_score(sim.activity.ravel(), share.ravel()) >= 0.9
    # each view's prior, per factor; each view's nuisance parameters on its own features
    assert est.factors_prior_pi_.shape == (5, 2)
    rna = sim.feature_groups == "rna"
    assert np.isnan(est.noise_variance_[rna]).all()
    assert np.isfinite(est.noise_variance_[~rna]).all()


def test_views_fit_recovers_each_views_mean(two_views):
    """Planted truth: each view's E[x] is recovered (relative error), and the count
    view's intercepts are on its link's scale, the Gaussian view's on the data's."""
    sim, est = two_views
    model = est.get_model()
    log_s = torch.log(torch.as_tensor(est.training_size_factors_, dtype=torch.float32))
    with torch.no_grad():
        mean = model.fitted_mean(log_s).numpy()
    for view in ("rna", "adt"):
        at = sim.feature_groups == view
        error = np.linalg.norm(mean[:, at] - sim.mean[:, at]) / np.linalg.norm(sim.mean[:, at])
        assert error < 0.25, view
        assert np.corrcoef(est.intercept_[at], sim.intercept[at])[0, 1] > 0.8, view


def test_views_sparse_minibatch_transform_and_save(two_views, tmp_path):
    """Sparse X and minibatches fit the same model; new rows, score and a saved fit work
    with the views; the library sizes are the count view's."""
    sim, est = two_views
    x = sim.x.copy()
    x[:, sim.feature_groups == "adt"] -= 100.0  # a Gaussian view's level: not in s
    est2 = SparseFactorAnalysis(5, likelihood=LIKELIHOODS, link="softplus", random_state=0)
    est2.fit(sp.csr_matrix(x), feature_groups=sim.feature_groups)
    np.testing.assert_allclose(est2.training_size_factors_, est.training_size_factors_)
    assert abs(est2.n_effective_components_ - est.n_effective_components_) <= 1
    batched = SparseFactorAnalysis(
        5, likelihood=LIKELIHOODS, link="softplus", batch_size=50, max_iter=100, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 100 passes: enough here
        batched.fit(sp.csr_matrix(sim.x), feature_groups=sim.feature_groups)
    assert np.isfinite(batched.elbo_) and batched.view_elbo_contribution_.shape == (2, 5)
    new = est.transform(sim.x[:20])
    assert new.shape == (20, 5) and np.isfinite(new).all()
    assert np.isfinite(est.score(sim.x[:20]))
    path = tmp_path / "views.spfa"
    est.save(path)
    loaded = SparseFactorAnalysis.load(path)
    assert list(loaded.feature_groups_) == list(sim.feature_groups)
    np.testing.assert_allclose(loaded.transform(sim.x[:20]), new, rtol=1e-4, atol=1e-4)


def test_views_bad_input():
    sim = simulate_views(
        n=30, views=(("rna", "poisson", 8), ("adt", "gaussian", 4)), activity=((1,), (1,))
    )
    est = SparseFactorAnalysis(2, likelihood=LIKELIHOODS, max_iter=5)
    with pytest.raises(ValueError, match="feature_groups"):
        est.fit(sim.x)
    with pytest.raises(ValueError, match="one view name per feature"):
        est.fit(sim.x, feature_groups=sim.feature_groups[:-1])
    with pytest.raises(ValueError, match="dict"):
        SparseFactorAnalysis(2, max_iter=5).fit(sim.x, feature_groups=sim.feature_groups)
    negative = sim.x.copy()
    negative[0, 0] = -1.0  # a count view's feature
    with pytest.raises(ValueError, match="Negative"):
        est.fit(negative, feature_groups=sim.feature_groups)
    # a Gaussian view's negative values are its data
    negative[0, 0], negative[0, -1] = 0.0, -5.0
    est.set_params(max_iter=5)
    with pytest.warns(ConvergenceWarning):  # not converged in 5 steps
        est.fit(negative, feature_groups=sim.feature_groups)


def test_views_size_factors_per_view():
    """Each count view's library sizes are its own; a Gaussian view's factor is 1; given
    size factors (one per row, or per row and view) scale the count views only."""
    sim = simulate_views(
        n=60, views=(("rna", "poisson", 20), ("adt", "poisson", 6)), activity=((1,), (1,))
    )
    lik = {"rna": "poisson", "adt": "poisson"}
    est = SparseFactorAnalysis(2, likelihood=lik, max_iter=50, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(sim.x, feature_groups=sim.feature_groups)
        for v, view in enumerate(("rna", "adt")):
            lib = sim.x[:, sim.feature_groups == view].sum(1)
            np.testing.assert_allclose(
                est.training_size_factors_[:, v], np.maximum(lib, 0.5) / lib.mean()
            )
        np.testing.assert_allclose(
            est.library_size_mean_,
            [sim.x[:, sim.feature_groups == v].sum(1).mean() for v in ("rna", "adt")],
        )
        # new rows on the training scale, view by view
        _, s_new = est._data(sim.x[:5], None, likelihood=est._make_likelihood())
        np.testing.assert_allclose(s_new, est.training_size_factors_[:5])
        mixed = SparseFactorAnalysis(2, likelihood=LIKELIHOODS, max_iter=50, random_state=0)
        given = np.linspace(0.5, 2.0, 60)
        mixed.fit(sim.x, feature_groups=sim.feature_groups, size_factors=given)
        np.testing.assert_allclose(mixed.training_size_factors_, np.c_[given, np.ones(60)])
        per_view = np.c_[given, given[::-1]]
        est.fit(sim.x, feature_groups=sim.feature_groups, size_factors=per_view)
        np.testing.assert_allclose(est.training_size_factors_, per_view)
    with pytest.raises(ValueError, match="one per view"):
        est.fit(sim.x, feature_groups=sim.feature_groups, size_factors=np.ones((60, 3)))


def test_views_on_anndata(two_views):
    """spfa.anndata.fit takes the views from a column of adata.var and records them."""
    anndata = pytest.importorskip("anndata")
    import spfa.anndata

    sim, est = two_views
    adata = anndata.AnnData(sim.x)
    adata.var["feature_types"] = np.where(
        sim.feature_groups == "rna", "Gene Expression", "Antibody Capture"
    )
    lik = {"Gene Expression": "poisson", "Antibody Capture": "gaussian"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = spfa.anndata.fit(
            adata,
            5,
            likelihood=lik,
            link="softplus",
            feature_groups="feature_types",
            max_iter=60,
            random_state=0,
            verbose=False,
        )
    info = adata.uns["spfa"]
    assert info["views"] == ["Gene Expression", "Antibody Capture"]
    assert info["view_elbo_contribution"].shape == (2, 5)
    assert list(fitted.feature_groups_) == list(adata.var["feature_types"])
    with pytest.raises(ValueError, match="no column"):
        spfa.anndata.fit(adata, 5, likelihood=lik, feature_groups="modality", verbose=False)


def test_views_posterior_summaries_and_tensorboard(tmp_path):
    """The factors' posterior over every feature (intervals, top features) and each
    view's prior per factor in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sim = simulate_views(
        n=60, views=(("rna", "poisson", 20), ("adt", "gaussian", 6)), activity=((1,), (1,))
    )
    est = SparseFactorAnalysis(
        2, likelihood=LIKELIHOODS, max_iter=60, random_state=0, log_dir=tmp_path
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(sim.x, feature_groups=sim.feature_groups)
    post = est.factors_posterior()
    lower, upper = post.interval(0.9)
    assert lower.shape == (26, 2) and np.all(lower <= upper)
    np.testing.assert_allclose(post.mean, est.components_.T, rtol=1e-5, atol=1e-6)
    assert np.all((est.factors_pip_ >= 0) & (est.factors_pip_ <= 1))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "prior/factors_pi/rna/0" in tags and "prior/factors_pi/adt/0" in tags


def test_views_review_fixes(two_views, tmp_path):
    """Size factors given to sample() leave a Gaussian view unscaled; a refit needs its
    own feature_groups; the active buffer is saved once; held-out scores check each count
    view's counts."""
    from spfa.heldout import heldout_log_likelihood, heldout_score

    sim, est = two_views
    adt = sim.feature_groups == "adt"
    base = est.sample(5, random_state=0)[:, :, adt]
    scaled = est.sample(5, size_factors=np.full(200, 10.0), random_state=0)[:, :, adt]
    assert abs(scaled.mean() - base.mean()) < 0.1  # tenfold before the fix
    assert abs(scaled.std() - base.std()) < 0.1
    refit = SparseFactorAnalysis(5, likelihood=LIKELIHOODS, max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        refit.fit(sim.x, feature_groups=sim.feature_groups)
    with pytest.raises(ValueError, match="feature_groups"):
        refit.fit(sim.x)
    state = est.get_model().state_dict()
    assert "factors.active" in state and not any(".parts." in k and "active" in k for k in state)
    model = est.get_model()
    state["factors.active"] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    model.load_state_dict(state)
    assert [float(p.active[1]) for p in model.factors.parts] == [0.0, 0.0]
    bad = sim.x.copy()
    bad[0, 0] = -3.0  # an rna (count) feature
    with pytest.raises(ValueError, match="Negative"):
        heldout_log_likelihood(est, bad)
    with pytest.raises(ValueError, match="method='mask'"):
        heldout_score(est, sim.x, method="thin", feature_groups=sim.feature_groups)
    template = SparseFactorAnalysis(3, likelihood=LIKELIHOODS, max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        score, fitted = heldout_score(
            template, sim.x, method="mask", feature_groups=sim.feature_groups, n_draws=5
        )
    assert np.isfinite(score) and fitted.view_elbo_contribution_.shape == (2, 3)


def test_views_nuisance_of_other_shapes_and_save(tmp_path):
    """A view likelihood with per-sample and low-rank dispersion parameters: per-feature
    arrays on all features, the rest under the view's number; the fit saves and loads."""
    sim = simulate_views(
        n=40, views=(("rna", "poisson", 12), ("adt", "gaussian", 4)), activity=((1,), (1,))
    )
    lik = {"rna": "negative_binomial_full", "adt": "gaussian"}
    est = SparseFactorAnalysis(2, likelihood=lik, max_iter=20, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(sim.x, feature_groups=sim.feature_groups)
    assert est.noise_variance_.shape == (16,)
    extra = [name for name in vars(est) if name.endswith("_view0_")]
    assert extra, "the count view's per-sample dispersion factors"
    path = tmp_path / "nb.spfa"
    est.save(path)
    loaded = SparseFactorAnalysis.load(path)
    np.testing.assert_array_equal(loaded.components_, est.components_)


def test_views_anndata_transform_from_disk(two_views, tmp_path):
    anndata = pytest.importorskip("anndata")
    import spfa.anndata

    sim, est = two_views
    adata = anndata.AnnData(sim.x[:20])
    adata.write_h5ad(tmp_path / "new.h5ad")
    backed = anndata.read_h5ad(tmp_path / "new.h5ad", backed="r")
    loadings = spfa.anndata.transform(backed, est)
    np.testing.assert_allclose(loadings, est.transform(sim.x[:20]), rtol=1e-4, atol=1e-4)


def test_views_second_review_fixes(two_views):
    """Per-feature nuisance parameters of other trailing shapes in two views are kept per
    view; states holding a copy of ``active`` per view still load; a mis-shaped X gets the
    shape message."""
    from spfa.heldout import heldout_log_likelihood
    from spfa.likelihoods import NegativeBinomial

    sim = simulate_views(
        n=40, views=(("a", "poisson", 5), ("b", "poisson", 4)), activity=((1,), (1,))
    )
    lik = {
        "a": NegativeBinomial(dispersion="full", dispersion_rank=1),
        "b": NegativeBinomial(dispersion="full", dispersion_rank=2),
    }
    est = SparseFactorAnalysis(2, likelihood=lik, max_iter=10, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(sim.x, feature_groups=sim.feature_groups)
    assert np.isfinite(est.elbo_)
    _, fitted = two_views
    model = fitted.get_model()
    state = model.state_dict()
    state.update({f"factors.parts.{v}.active": state["factors.active"] for v in (0, 1)})
    model.load_state_dict(state)  # strict: the legacy keys are taken, not unexpected
    with pytest.raises(ValueError, match="scores the training rows"):
        heldout_log_likelihood(fitted, sim.x[:, :10])


def test_an_interrupt_while_measuring_the_views_keeps_the_fit(monkeypatch):
    """Ctrl-C while each factor's contribution to each view is measured (factors switched
    off one by one) keeps the fit with every factor as trained; those contributions are
    NaN (not measured) and the interrupt goes on."""
    from spfa import fitting

    original = fitting.view_contribution

    before = []

    def interrupted(model, elbo):
        before.append(model.factors.active.clone())
        calls = []

        def faulty(by_view=False):
            calls.append(1)
            if len(calls) == 2:  # the first kept factor is switched off
                raise KeyboardInterrupt
            return elbo(by_view=by_view)

        return original(model, faulty)

    monkeypatch.setattr(fitting, "view_contribution", interrupted)
    sim = simulate_views(n=60, views=(("rna", "poisson", 30), ("adt", "gaussian", 10)), seed=2)
    est = SparseFactorAnalysis(2, likelihood=LIKELIHOODS, max_iter=100, random_state=0)
    with pytest.raises(KeyboardInterrupt, match="views' contributions.*holds that fit"):
        est.fit(sim.x, feature_groups=sim.feature_groups)
    assert est.view_elbo_contribution_.shape == (2, 2)
    assert np.isnan(est.view_elbo_contribution_).all()
    kept = est.active_components_
    assert kept.any() and np.isfinite(est.elbo_contribution_[kept]).all()
    # every factor as it was before the measurement, the one switched off included
    np.testing.assert_array_equal(kept, before[0].numpy() > 0)
    np.testing.assert_array_equal(est.get_model().factors.active.numpy() > 0, kept)
