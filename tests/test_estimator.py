"""The estimator's public contract, as a user exercises it."""

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from spfa import PRIORS, SparseFactorAnalysis
from spfa.priors import get_prior, resolve_priors
from spfa.simulate import simulate

FAST = dict(max_iter=400, random_state=0, device="cpu")


@pytest.fixture(scope="module")
def counts():
    sim = simulate("poisson", n=60, p=40, pi0=(0.3, 0.6), slab_sd=(1.0, 1.5), seed=3)
    return sim.x


@pytest.fixture(scope="module")
def fitted(counts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return SparseFactorAnalysis(2, **FAST).fit(counts)


def fit_quiet(est, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, **kw)


def test_fitted_attributes(fitted, counts):
    n, p = counts.shape
    est = fitted
    assert est.components_.shape == (2, p)
    assert est.loadings_.shape == (n, 2)
    assert est.factors_pip_.shape == (p, 2) and est.loadings_pip_.shape == (n, 2)
    assert np.all((est.factors_pip_ >= 0) & (est.factors_pip_ <= 1))
    for name in [
        "loadings_prior_pi_",
        "factors_prior_pi_",
        "loadings_prior_scale_",
        "factors_prior_scale_",
    ]:
        assert getattr(est, name).shape == (2,)
    assert est.intercept_.shape == (p,)
    assert est.n_iter_ >= 1 and len(est.history_["elbo"]) == est.n_iter_
    assert set(est.history_) >= {"elbo", "err", "kl_l", "kl_f"}
    assert np.isfinite(est.elbo_)
    assert not hasattr(est, "noise_variance_") and not hasattr(est, "dispersion_")
    assert est.n_features_in_ == p


def test_transform_inverse_transform_score(fitted, counts):
    Z = fitted.transform(counts)
    assert Z.shape == (counts.shape[0], 2) and Z.dtype == np.float64
    # refitting q(L) with F fixed lands close to the training loadings
    assert np.corrcoef(Z.ravel(), fitted.loadings_.ravel())[0, 1] > 0.95
    M = fitted.inverse_transform(Z)
    assert M.shape == counts.shape and np.all(M > 0)
    score = fitted.score(counts)
    assert np.isfinite(score)
    assert score == pytest.approx(fitted.elbo_ / counts.size, rel=0.02)
    # the score prefers the data the model was fitted to over shuffled columns
    shuffled = np.random.default_rng(0).permuted(counts, axis=1)
    assert fitted.score(shuffled) < score


def test_fit_transform_matches_loadings(counts):
    est = SparseFactorAnalysis(2, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        Z = est.fit_transform(counts)
    np.testing.assert_array_equal(Z, est.loadings_)


@pytest.mark.parametrize("likelihood", ["gaussian", "negative_binomial"])
def test_other_likelihoods_expose_nuisance(likelihood, counts):
    est = fit_quiet(SparseFactorAnalysis(2, likelihood=likelihood, **FAST), counts)
    if likelihood == "gaussian":
        assert est.noise_variance_.shape == (counts.shape[1],)
        assert np.all(est.noise_variance_ > 0)
    else:
        assert est.dispersion_.shape == (counts.shape[1],)
        np.testing.assert_allclose(est.dispersion_ * est.inverse_dispersion_, 1.0)


def test_exp_link(counts):
    est = fit_quiet(SparseFactorAnalysis(2, link="exp", **FAST), counts)
    assert np.all(np.isfinite(est.inverse_transform(est.loadings_)))


def test_pickle_clone_determinism(fitted, counts):
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.components_, fitted.components_)
    np.testing.assert_allclose(again.transform(counts), fitted.transform(counts))
    c = clone(fitted)
    assert c.get_params() == fitted.get_params() and not hasattr(c, "components_")
    refit = fit_quiet(c, counts)
    np.testing.assert_array_equal(refit.components_, fitted.components_)


def test_random_state_changes_mc_draws(counts):
    # softplus: the ELBO is a Monte Carlo estimate (under exp it is exact)
    a = fit_quiet(SparseFactorAnalysis(2, link="softplus", **{**FAST, "random_state": 1}), counts)
    b = fit_quiet(SparseFactorAnalysis(2, link="softplus", **{**FAST, "random_state": 2}), counts)
    assert not np.array_equal(a.components_, b.components_)


def test_pipeline_and_dataframe(counts):
    cols = [f"gene{j}" for j in range(counts.shape[1])]
    df = pd.DataFrame(counts, columns=cols)
    pipe = make_pipeline(FunctionTransformer(), SparseFactorAnalysis(2, **FAST))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        Z = pipe.fit_transform(df)
    assert Z.shape == (counts.shape[0], 2)
    est = pipe[-1]
    assert list(est.feature_names_in_) == cols
    assert list(est.get_feature_names_out()) == ["sparsefactoranalysis0", "sparsefactoranalysis1"]


def test_sparse_input_matches_dense(counts):
    dense = fit_quiet(SparseFactorAnalysis(2, **FAST), counts)
    for fmt in (sp.csr_matrix, sp.csc_matrix):
        est = fit_quiet(SparseFactorAnalysis(2, **FAST), fmt(counts))
        np.testing.assert_allclose(est.components_, dense.components_, rtol=1e-5, atol=1e-6)


def test_missing_entries_drop_out(counts):
    x = counts.copy()
    rng = np.random.default_rng(0)
    holes = rng.uniform(size=x.shape) < 0.1
    x[holes] = np.nan
    est = fit_quiet(SparseFactorAnalysis(2, **FAST), x)
    assert np.all(np.isfinite(est.components_)) and np.isfinite(est.elbo_)
    # the ELBO counts only observed entries: compare per-entry scores
    assert np.isfinite(est.score(x))
    # changing a missing value's placeholder changes nothing
    y = counts.copy()
    y[holes] = 1e6
    y[holes] = np.nan
    np.testing.assert_array_equal(
        fit_quiet(SparseFactorAnalysis(2, **FAST), y).components_, est.components_
    )


def test_size_factors(counts):
    s = np.linspace(0.5, 2.0, counts.shape[0])
    est = fit_quiet(SparseFactorAnalysis(2, **FAST), counts, size_factors=s)
    assert np.isfinite(est.score(counts, size_factors=s))
    assert est.transform(counts, size_factors=s).shape == (counts.shape[0], 2)


def test_all_zero_rows_columns_and_huge_counts():
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(40, 30)).astype(float)
    x[:, 0] = 0
    x[3, :] = 0
    x[5, 7] = 1e5
    for lik in ["poisson", "negative_binomial"]:
        est = fit_quiet(SparseFactorAnalysis(2, likelihood=lik, **FAST), x)
        for name in ["components_", "loadings_", "intercept_"]:
            assert np.all(np.isfinite(getattr(est, name))), (lik, name)
        assert np.all(np.isfinite(est.history_["elbo"]))
        assert np.all(np.isfinite(est.transform(x)))


def test_convergence_warning_on_max_iter(counts):
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        SparseFactorAnalysis(2, max_iter=60, tol=0, random_state=0).fit(counts)


def test_converges_without_warning_by_default(counts):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = SparseFactorAnalysis(2, random_state=0).fit(counts)
    assert est.n_iter_ < est.max_iter


def test_tensorboard_tags_written(tmp_path, counts):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    est = fit_quiet(SparseFactorAnalysis(2, log_dir=tmp_path, **{**FAST, "max_iter": 100}), counts)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/elbo", "loss/err", "loss/kl_l", "loss/kl_f"} <= tags
    assert {"prior/loadings_pi/0", "prior/factors_scale/1"} <= tags
    elbo = [e.value for e in acc.Scalars("loss/elbo")]
    np.testing.assert_allclose(elbo, est.history_["elbo"], rtol=1e-5)


def test_cuda_unavailable_is_an_error(counts):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="cuda is not available"):
        SparseFactorAnalysis(2, device="cuda").fit(counts)


@pytest.mark.parametrize("device", ["mps", "xpu", "meta:0"])
def test_other_unavailable_devices_are_a_value_error(counts, device):
    backend = getattr(torch, device.split(":")[0], None)
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        pytest.skip(f"{device} is available here")
    with pytest.raises(ValueError, match="is not available"):
        SparseFactorAnalysis(2, device=device).fit(counts)


@pytest.mark.cuda
def test_fit_on_cuda_matches_cpu(counts):
    cpu = fit_quiet(SparseFactorAnalysis(2, likelihood="gaussian", **FAST), counts)
    gpu = fit_quiet(
        SparseFactorAnalysis(2, likelihood="gaussian", **{**FAST, "device": "cuda"}), counts
    )
    assert gpu.device_.type == "cuda"
    np.testing.assert_allclose(gpu.components_, cpu.components_, atol=1e-3)


# ---------------------------------------------------------------- bad input
BAD_X = [
    (np.array([[1.0, -1.0], [2.0, 3.0]]), "negative"),
    (np.array([[1.0, np.inf], [2.0, 3.0]]), "infinity"),
    (np.ones(5), "2D array"),
    (np.ones((2, 2, 2)), "dim"),
    (np.empty((0, 3)), "0 sample"),
    (np.empty((3, 0)), "0 feature"),
    (np.full((3, 3), np.nan), "no observed entries"),
    (sp.csr_matrix(np.array([[1.0, -2.0], [0.0, 1.0]])), "negative"),
]


@pytest.mark.parametrize("X,match", BAD_X)
def test_bad_x(X, match):
    with pytest.raises(ValueError, match=match):
        SparseFactorAnalysis(1).fit(X)


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(n_components=0), "n_components"),
        (dict(n_components=2.5), "n_components"),
        (dict(n_components=50), "larger than the data allow"),
        (dict(likelihood="zeta"), "unknown likelihood"),
        (dict(prior="horseshoe"), "unknown prior"),
        (dict(prior={"loadings": "point_normal"}), "exactly the keys"),
        (dict(link="logit"), "unknown link"),
        (dict(n_mc_samples=0), "n_mc_samples"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=-1.0), "tol"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(device="quantum"), "device"),
    ],
)
def test_bad_params(params, match, counts):
    with pytest.raises(ValueError, match=match):
        SparseFactorAnalysis(**{"n_components": 2, **params}).fit(counts[:10, :10])


@pytest.mark.parametrize(
    "s,match",
    [
        (np.ones(3), "shape"),
        (np.r_[np.ones(59), 0.0], "positive"),
        (np.r_[np.ones(59), -1.0], "positive"),
        (np.r_[np.ones(59), np.nan], "positive"),
    ],
)
def test_bad_size_factors(s, match, counts, fitted):
    with pytest.raises(ValueError, match=match):
        SparseFactorAnalysis(2).fit(counts, size_factors=s)
    with pytest.raises(ValueError, match=match):
        fitted.transform(counts, size_factors=s)


def test_size_factors_rejected_for_gaussian(counts):
    with pytest.raises(ValueError, match="size_factors"):
        SparseFactorAnalysis(2, likelihood="gaussian").fit(counts, size_factors=np.ones(60))


def test_feature_mismatch_and_not_fitted(fitted, counts):
    with pytest.raises(ValueError, match="features"):
        fitted.transform(counts[:, :10])
    with pytest.raises(NotFittedError):
        SparseFactorAnalysis(2).transform(counts)
    with pytest.raises(ValueError, match="Z must have shape"):
        fitted.inverse_transform(np.ones((3, 5)))


def test_start_from_given_loadings_and_factors():
    sim = simulate("poisson", seed=4)
    est = SparseFactorAnalysis(3, random_state=0, max_iter=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(sim.x, init_loadings=sim.loadings, init_factors=sim.factors)
    assert np.all(np.isfinite(est.loadings_))
    with pytest.raises(ValueError, match="together"):
        est.fit(sim.x, init_loadings=sim.loadings)
    with pytest.raises(ValueError, match=r"init_factors must have shape \(500, 3\)"):
        est.fit(sim.x, init_loadings=sim.loadings, init_factors=sim.factors[:, :2])
    bad = sim.loadings.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="init_loadings contains NaN"):
        est.fit(sim.x, init_loadings=bad, init_factors=sim.factors)


def test_pruned_factors_are_switched_off_and_reported():
    """Planted rank 1, asked for 3: the two extra factors are pruned, exactly."""
    sim = simulate("gaussian", n=100, p=300, pi0=(0.2,), slab_sd=(1.0,), seed=5)
    est = SparseFactorAnalysis(3, likelihood="gaussian", random_state=0).fit(sim.x)
    assert est.active_components_.sum() == 1 and est.n_effective_components_ == 1
    # the kept factor comes first, the pruned ones after it with no contribution
    np.testing.assert_array_equal(est.active_components_, [True, False, False])
    assert est.elbo_contribution_[0] > 0 and np.all(est.elbo_contribution_[1:] == 0)
    assert est.explained_variance_ratio_[0] > 0.3 and np.all(est.explained_variance_ratio_[1:] == 0)
    assert est.factors_lfsr_[:, 1:].min() == 1.0
    off = ~est.active_components_
    for attr in ("loadings_pip_", "factors_pip_", "loadings_"):
        assert np.all(getattr(est, attr)[:, off] == 0), attr
    assert np.all(est.components_[off] == 0)
    assert np.all(est.loadings_prior_pi_[off] == 0)
    # new rows: the pruned factors stay off
    assert np.all(est.transform(sim.x[:10])[:, off] == 0)


@pytest.mark.parametrize("late_prune", [False, True])
def test_prune_and_rank_reuses_trials_exactly(late_prune):
    """Contributions equal ELBO(kept) - ELBO(kept without k), evaluated directly."""
    from spfa.fitting import prune_and_rank
    from spfa.likelihoods import Gaussian
    from spfa.model import SparseFactorModel

    k = 4
    model = SparseFactorModel(6, 5, k, Gaussian())
    with torch.no_grad():  # sizes ||E[l_k]|| ||E[f_k]|| increase with k: tried in order 0..3
        model.loadings.logits.fill_(5.0)
        model.factors.logits.fill_(5.0)
        model.loadings.mean.copy_(torch.arange(1.0, k + 1).expand(6, k))
    # factor 0 and (late_prune) factor 2 lower the ELBO; factors 1 and 3 interact
    weight = np.array([-1.0, 2.0, -0.5 if late_prune else 1.0, 3.0])
    calls = []

    def elbo():
        on = model.factors.active.numpy().copy()
        calls.append(on)
        return float(weight @ on + 0.7 * on[1] * on[3])

    contribution, order, _ = prune_and_rank(model, elbo)
    kept = sorted({1, 3} | (set() if late_prune else {2}))
    np.testing.assert_array_equal(np.sort(order[: len(kept)]), kept)
    final = np.isin(np.arange(k), kept).astype(float)
    direct = {}
    for j in kept:
        without = final.copy()
        without[j] = 0
        direct[j] = float(weight @ final + 0.7 * final[1] * final[3]) - float(
            weight @ without + 0.7 * without[1] * without[3]
        )
    np.testing.assert_allclose(contribution[: len(kept)], [direct[j] for j in order[: len(kept)]])
    assert np.all(contribution[len(kept) :] == 0)
    assert np.all(np.diff(contribution[: len(kept)]) <= 0)
    # one evaluation per factor plus the start; a late pruning re-evaluates the earlier kept ones
    assert len(calls) == k + 1 + (1 if late_prune else 0)
    np.testing.assert_array_equal(model.factors.active.numpy(), final[order])


def test_posterior_summaries_agree_with_attributes(fitted, counts):
    post = fitted.factors_posterior()
    np.testing.assert_allclose(post.mean, fitted.components_.T, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(post.pip, fitted.factors_pip_)
    np.testing.assert_allclose(post.sd, fitted.factors_sd_)
    np.testing.assert_allclose(post.lfsr, fitted.factors_lfsr_)
    train = fitted.loadings_posterior()
    np.testing.assert_allclose(train.mean, fitted.loadings_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(train.sd, fitted.loadings_sd_)
    lower, upper = train.interval(0.9)
    assert np.all(lower <= train.mean) and np.all(train.mean <= upper)
    # new rows: the same fit as transform
    new = fitted.loadings_posterior(counts[:7])
    np.testing.assert_allclose(new.mean, fitted.transform(counts[:7]), rtol=1e-6, atol=1e-12)
    assert new.shape == (7, 2) and np.all(new.sd > 0)
    with pytest.raises(ValueError, match="only used with new rows"):
        fitted.loadings_posterior(size_factors=np.ones(len(counts)))


def test_factors_are_ordered_by_elbo_contribution():
    # planted factor 0 is weaker than factor 1: the fit lists the strong one first
    sim = simulate("gaussian", n=120, p=200, pi0=(0.6, 0.3), slab_sd=(1.0, 1.5), seed=11)
    est = SparseFactorAnalysis(2, likelihood="gaussian", random_state=0).fit(sim.x)
    assert est.n_effective_components_ == 2
    c = est.elbo_contribution_
    assert c[0] >= c[1] > 0
    assert est.explained_variance_ratio_[0] > est.explained_variance_ratio_[1]
    strong = np.abs(np.corrcoef(est.components_[0], sim.factors[:, 1])[0, 1])
    assert strong > 0.9
    # the per-window prior history is in the final order too
    assert np.allclose(est.history_["factors_prior_pi"][-1], est.factors_prior_pi_, atol=0.05)


def test_top_features_use_dataframe_column_names():
    sim = simulate("poisson", n=80, p=60, pi0=(0.7,), slab_sd=(1.5,), seed=2)
    genes = [f"gene{j}" for j in range(60)]
    est = SparseFactorAnalysis(1, **FAST)
    fit_quiet(est, pd.DataFrame(sim.x, columns=genes))
    top = est.top_features(5)
    assert 0 < len(top) <= 5
    assert [r["rank"] for r in top] == list(range(len(top)))
    sizes = [abs(r["mean"]) for r in top]
    assert sizes == sorted(sizes, reverse=True)
    assert all(r["pip"] >= 0.5 and r["feature"] == genes[r["index"]] for r in top)
    # the features picked are truly in the factor
    assert all(sim.factors[r["index"], 0] != 0 for r in top)
    table = pd.DataFrame(top)
    assert list(table.columns) == [
        "component",
        "rank",
        "feature",
        "index",
        "pip",
        "mean",
        "sd",
        "lfsr",
    ]
    assert est.top_features(5, min_pip=1.0) == [] or all(
        r["pip"] == 1.0 for r in est.top_features(5, min_pip=1.0)
    )
    with pytest.raises(ValueError, match="min_pip"):
        est.top_features(min_pip=2)
    with pytest.raises(ValueError, match="n_top"):
        est.top_features(0)


def test_sample_gaussian_matches_posterior_moments():
    sim = simulate("gaussian", n=40, p=30, pi0=(0.3,), slab_sd=(1.5,), seed=6)
    est = SparseFactorAnalysis(1, likelihood="gaussian", random_state=0).fit(sim.x)
    draws = est.sample(3000, random_state=1)
    assert draws.shape == (3000, 40, 30)
    model = est.get_model()
    with torch.no_grad():
        mean, var = (t.double().numpy() for t in model.eta_moments())
    total = var + est.noise_variance_
    se = np.sqrt(total / draws.shape[0])
    assert np.mean(np.abs(draws.mean(0) - mean) < 4 * se) > 0.99
    np.testing.assert_allclose(draws.var(0).mean(), total.mean(), rtol=0.03)
    again = est.sample(2, random_state=1)
    np.testing.assert_array_equal(again, draws[:2])


def test_sample_counts_respect_size_factors(counts):
    s = np.linspace(0.5, 4.0, counts.shape[0])
    est = fit_quiet(SparseFactorAnalysis(2, **FAST), counts, size_factors=s)
    scaled = est.sample(400, random_state=0)  # the training size factors by default
    unit = est.sample(400, size_factors=np.ones_like(s), random_state=0)
    assert np.all(scaled == np.round(scaled)) and scaled.min() >= 0
    ratio = scaled.sum(axis=(0, 2)) / unit.sum(axis=(0, 2))
    np.testing.assert_allclose(ratio, s, rtol=0.15)
    with pytest.raises(ValueError, match="size_factors"):
        est.sample(1, size_factors=np.ones(3))


def test_one_row_cannot_be_fitted_but_can_be_transformed(fitted, counts):
    # one row has no variance to fit (the Gaussian start was NaN before this check)
    with pytest.raises(ValueError, match="1 sample"):
        SparseFactorAnalysis(1, likelihood="gaussian").fit(np.ones((1, 5)))
    assert fitted.transform(counts[:1]).shape == (1, 2)


@pytest.mark.parametrize(
    "prior", [*sorted(PRIORS), {"loadings": "normal_mixture", "factors": "point_normal"}]
)
def test_every_prior_fits_transforms_and_round_trips(prior, counts, tmp_path):
    est = fit_quiet(SparseFactorAnalysis(2, prior=prior, max_iter=150, random_state=0), counts)
    names = resolve_priors(prior)
    Z = est.transform(counts[:7])
    assert Z.shape == (7, 2) and np.all(np.isfinite(Z))
    for side, values in (("loadings", est.loadings_), ("factors", est.components_)):
        if get_prior(names[side]).support == "nonnegative":  # exactly
            assert np.all(values >= 0)
            if side == "loadings":
                assert np.all(Z >= 0)
    for post in (est.factors_posterior(), est.loadings_posterior()):
        lower, upper = post.interval(0.9)
        assert np.all(lower <= upper) and np.all(post.cdf(upper) >= 0.95 - 1e-9)
        assert np.all((post.lfsr >= 0) & (post.lfsr <= 1))
    assert np.all(np.isfinite(est.factors_prior_scale_))
    est.save(tmp_path / "fit.spfa")
    again = SparseFactorAnalysis.load(tmp_path / "fit.spfa")
    assert again.prior == prior
    np.testing.assert_array_equal(again.transform(counts[:7]), Z)


def test_counts_as_users_have_them(counts):
    """Float noise within 1e-6 of an integer is a count; other non-negative values are
    fitted (continuous extension) with one warning; thinning refuses them."""
    from spfa import NonIntegerCountsWarning
    from spfa.heldout import thin_counts

    noisy = counts + np.random.default_rng(0).uniform(-2e-7, 2e-7, counts.shape)
    noisy[counts == 0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonIntegerCountsWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = SparseFactorAnalysis(2, **FAST).fit(noisy)
    b = fit_quiet(SparseFactorAnalysis(2, **FAST), counts)
    # float32 training amplifies the 2e-7 input noise to ~2e-3 over 400 Adam steps
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-2)
    scaled = counts * 0.37  # e.g. normalised counts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = SparseFactorAnalysis(2, **FAST).fit(scaled)
        kinds = [w.category for w in caught]
        assert kinds.count(NonIntegerCountsWarning) == 1
        assert np.all(np.isfinite(est.components_)) and np.isfinite(est.score(scaled))
    with pytest.raises(ValueError, match="non-integer"):
        thin_counts(scaled, 0.5, random_state=0)


def _steep_counts():
    """Rare features, each with one large count (as mitochondrial or ribosomal
    outliers in 10x data): on the tangent of the exp link at the feature's mean,
    a count of 100 at a mean of 0.5 / 200 is a deviation of 4e4 in eta."""
    rng = np.random.default_rng(0)
    x = rng.poisson(0.5, size=(200, 30)).astype(float)
    x[:, 25:] = 0.0
    x[rng.integers(200, size=5), np.arange(25, 30)] = 100.0
    return x


def _start_elbo(est, x, start=None):
    from sklearn.utils import check_random_state

    from spfa import fitting

    settings = est._settings()
    model = fitting.new_model(*x.shape, est._make_likelihood(), settings)
    init, sub = fitting.compute_start(model, x, None, settings, check_random_state(0), start)
    fitting.apply_start(model, init, sub, x, None, settings, start)
    data = settings.batches(x, None, model.likelihood, seed=0)
    return fitting.paired_elbo(data, model, settings)(), model


def test_exp_link_start_stays_within_the_data_range():
    """The working response is capped at the exact link-scale deviation, so the
    start's eta stays near log of the largest count, not 4e4."""
    x = _steep_counts()
    est = SparseFactorAnalysis(3, link="exp", random_state=0, device="cpu")
    elbo, model = _start_elbo(est, x)
    assert np.isfinite(elbo)
    mean, _ = model.eta_moments()
    assert mean.max().item() < np.log(x.max()) + 2.0


def _overflowing_start(x):
    rng = np.random.default_rng(1)
    return 10.0 * rng.normal(size=(x.shape[0], 3)), 10.0 * rng.normal(size=(x.shape[1], 3))


def test_exp_link_recovers_from_an_overflowing_start():
    x = _steep_counts()
    start = _overflowing_start(x)
    est = SparseFactorAnalysis(3, link="exp", max_iter=300, random_state=0, device="cpu")
    assert not np.isfinite(_start_elbo(est, x, start)[0])
    est = fit_quiet(est, x, init_loadings=start[0], init_factors=start[1])
    assert np.isfinite(est.elbo_) and np.all(np.isfinite(est.components_))
    assert np.isfinite(est.score(x))


def test_a_start_that_cannot_be_made_finite_is_an_error(monkeypatch):
    from spfa import fitting

    monkeypatch.setattr(fitting, "START_SHRINK_LIMIT", 1.0)
    x = _steep_counts()
    start = _overflowing_start(x)
    est = SparseFactorAnalysis(3, link="exp", max_iter=50, random_state=0, device="cpu")
    with pytest.raises(RuntimeError, match="not finite at the start.*'exp' link"):
        est.fit(x, init_loadings=start[0], init_factors=start[1])


def test_size_factors_are_not_dropped_silently_in_model_selection(counts):
    """GridSearchCV passes size_factors to fit but not to score unless routing is on:
    spfa warns there; with routing, the scores use them."""
    import sklearn
    from sklearn.model_selection import GridSearchCV

    from spfa import SizeFactorsWarning

    s = np.linspace(0.5, 2.0, counts.shape[0])
    search = GridSearchCV(
        SparseFactorAnalysis(max_iter=60, random_state=0, device="cpu"),
        {"n_components": [1, 2]},
        cv=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(SizeFactorsWarning, match="metadata_routing"):
            search.fit(counts, size_factors=s)
    with sklearn.config_context(enable_metadata_routing=True):
        est = SparseFactorAnalysis(max_iter=60, random_state=0, device="cpu")
        est.set_fit_request(size_factors=True).set_score_request(size_factors=True)
        routed = GridSearchCV(est, {"n_components": [1, 2]}, cv=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("error", SizeFactorsWarning)
            routed.fit(counts, size_factors=s)
    assert np.all(np.isfinite(routed.cv_results_["mean_test_score"]))


def test_library_sizes_are_the_default_size_factors(counts):
    """Count fits given no size_factors use library size over the training mean; new
    rows get theirs on the same scale, so nothing is dropped in model selection."""
    import scipy.sparse as sp
    from sklearn.model_selection import cross_val_score

    from spfa import SizeFactorsWarning
    from spfa._validation import library_sizes

    lib = counts.sum(axis=1)
    est = fit_quiet(SparseFactorAnalysis(2, **FAST), counts)
    np.testing.assert_allclose(est.training_size_factors_, lib / lib.mean())
    assert est.library_size_mean_ == pytest.approx(lib.mean())
    given = fit_quiet(SparseFactorAnalysis(2, **FAST), counts, size_factors=lib / lib.mean())
    np.testing.assert_allclose(est.components_, given.components_, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("error", SizeFactorsWarning)
        new = est.transform(counts[:10] * 2)  # twice the depth: twice the size factors
        assert np.all(np.isfinite(cross_val_score(SparseFactorAnalysis(2, **FAST), counts, cv=2)))
    np.testing.assert_allclose(
        new, est.transform(counts[:10] * 2, size_factors=2 * lib[:10] / lib.mean())
    )
    # a row with missing entries counts at its observed rate; sparse input agrees
    x = counts.astype(float)
    x[0, : x.shape[1] // 2] = np.nan
    x[1] = 0.0
    got = library_sizes(x)
    assert got[0] == pytest.approx(np.nansum(x[0]) * 2) and got[1] == 0.0
    np.testing.assert_allclose(library_sizes(sp.csr_matrix(x)), got)
    # an empty row gets half a count, not log 0
    with_empty = fit_quiet(SparseFactorAnalysis(2, **FAST), x)
    assert with_empty.training_size_factors_[1] == pytest.approx(0.5 / library_sizes(x).mean())
    assert np.all(np.isfinite(with_empty.components_))
    off = fit_quiet(SparseFactorAnalysis(2, library_size=False, **FAST), counts)
    assert off.training_size_factors_ is None and off.library_size_mean_ is None
    gauss = fit_quiet(SparseFactorAnalysis(2, likelihood="gaussian", **FAST), counts)
    assert gauss.training_size_factors_ is None
    with pytest.raises(ValueError, match="every row of X is empty"):
        SparseFactorAnalysis(1, **FAST).fit(np.zeros((5, 4)))


def test_exp_link_transform_of_training_rows_matches_the_fit():
    """New rows start from the same capped working response as the fit: on rare
    features with large counts the projection no longer overflows, and transform
    of the training rows lands near the training loadings."""
    x = _steep_counts()
    est = fit_quiet(SparseFactorAnalysis(3, link="exp", random_state=0, device="cpu"), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("error", RuntimeWarning)  # no non-finite roll-backs
        z = est.transform(x)
    # the rows' own fit reaches the ELBO the fit gave them, or better ...
    assert est.score(x) * x.size >= est.elbo_ - 1e-3 * abs(est.elbo_)
    # ... and lands near the training loadings (the overflowing start put them 10.5 away;
    # 0.30 of 2.84 where a refit of the rows finds a higher ELBO than the fit's rows)
    scale = np.abs(est.loadings_).max()
    assert np.abs(z - est.loadings_).max() < 0.15 * scale


def test_sign_convention_largest_factor_entry_positive_and_fit_unchanged():
    """Each kept factor's largest |E[F]| is positive; negating a factor's loadings and
    factors together leaves the (exact) ELBO as it was, and orient_ undoes it."""
    from spfa.fitting import orient_, paired_elbo

    rng = np.random.default_rng(3)
    L = rng.normal(size=(80, 3))
    F = -np.abs(rng.normal(size=(30, 3))) * (rng.random((30, 3)) < 0.4)  # negative programs
    X = rng.poisson(np.exp(0.3 + L @ F.T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SparseFactorAnalysis(n_components=3, random_state=0).fit(X)
    comp = est.components_[est.active_components_]
    top = np.abs(comp).argmax(axis=1)
    assert np.all(comp[np.arange(len(comp)), top] > 0)

    model = est.get_model()
    settings = est._settings()
    data = settings.batches(X.astype(float), est.training_size_factors_, model.likelihood, 0)
    elbo = paired_elbo(data, model, settings, subset=False)
    before = elbo()
    fitted = {k: v.clone() for k, v in model.state_dict().items()}
    flips = torch.tensor([-1.0, 1.0, -1.0])
    model.loadings.flip_(flips)
    model.factors.flip_(flips)
    assert not torch.equal(model.factors.mean, fitted["factors.mean"])
    assert elbo() == pytest.approx(before, rel=1e-6)
    orient_(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, fitted[key], msg=key)


def test_a_fit_that_prunes_trains_on_without_the_pruned_factors(monkeypatch):
    """Factors pruned after training leave the kept ones fitted beside them: the fit
    trains on to the next plateau and ranks again, and keeps the better of the two; a fit
    that prunes nothing does not train on."""
    import spfa.fitting as fitting

    calls, elbos = [], []
    train, prune = fitting._train, fitting.prune_and_rank

    def spy_train(*args, description="fit", **kw):
        calls.append(description)
        return train(*args, description=description, **kw)

    def spy_prune(model, elbo, *args):
        out = prune(model, elbo, *args)
        elbos.append(out[2])
        return out

    monkeypatch.setattr(fitting, "_train", spy_train)
    monkeypatch.setattr(fitting, "prune_and_rank", spy_prune)
    sim = simulate("poisson", n=100, p=200, seed=1)
    est = SparseFactorAnalysis(6, random_state=0).fit(sim.x)
    assert est.n_effective_components_ < 6
    assert calls == ["fit", "refit"]
    assert est.elbo_ == max(elbos) and len(est.history_["elbo"]) == est.n_iter_
    assert len(est.history_["step"]) == len(est.history_["factors_prior_pi"])
    calls.clear()
    rng = np.random.default_rng(0)
    strong = rng.poisson(np.exp(1.0 + np.outer(rng.normal(size=100), rng.normal(size=50))))
    est = SparseFactorAnalysis(1, random_state=0).fit(strong)
    assert est.n_effective_components_ == 1 and calls == ["fit"]
