"""Adversarial inputs and faults: each handled, with a ValueError that names the problem
or a finite fit, never a NaN result, another exception type or a silent change of data."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis
from spfa.heldout import heldout_log_likelihood
from spfa.model import ELBOTerms

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
FAST = {"max_iter": 200, "random_state": 0}


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    L, F = rng.normal(size=(40, 2)), rng.normal(size=(15, 2))
    return rng.poisson(np.exp(0.5 + 0.5 * L @ F.T)).astype(float)


def test_duplicate_sparse_entries_are_summed_as_scipy_reads_them(counts):
    """A CSR matrix with a duplicate (i, j) is fitted as the sum, like its dense form;
    the caller's matrix is not modified."""
    dense = sp.csr_matrix(counts)
    coo = dense.tocoo()
    # split every stored value v into (v - 1) + 1 at the same (i, j): same matrix to scipy
    keep = coo.data > 1
    rows = np.concatenate([coo.row, coo.row[keep]])
    cols = np.concatenate([coo.col, coo.col[keep]])
    vals = np.concatenate([np.where(keep, coo.data - 1, coo.data), np.ones(keep.sum())])
    order = np.lexsort((cols, rows))
    dup = sp.csr_matrix(
        (vals[order], cols[order], np.r_[0, np.cumsum(np.bincount(rows, minlength=40))]),
        shape=counts.shape,
    )
    assert not dup.has_canonical_format
    np.testing.assert_array_equal(dup.toarray(), counts)
    before = dup.data.copy()
    a = SparseFactorAnalysis(2, **FAST).fit(dup)
    b = SparseFactorAnalysis(2, **FAST).fit(dense)
    np.testing.assert_allclose(a.loadings_, b.loadings_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dup.data, before)  # the input is untouched


@pytest.mark.parametrize("likelihood", ["gaussian", "poisson"])
def test_values_beyond_float32_range_are_refused(likelihood):
    X = np.ones((10, 4))
    X[3, 2] = 1e39
    with pytest.raises(ValueError, match="beyond float32's range"):
        SparseFactorAnalysis(2, likelihood=likelihood, **FAST).fit(X)


@pytest.mark.parametrize(
    "bad, match", [(np.inf, "infinite values"), (-3.0, "negative values"), (1e40, "float32")]
)
def test_heldout_scoring_validates_x(counts, bad, match):
    est = SparseFactorAnalysis(2, **FAST).fit(counts)
    X = counts.copy()
    X[1, 1] = bad
    with pytest.raises(ValueError, match=match):
        heldout_log_likelihood(est, X, n_draws=2)
    with pytest.raises(ValueError, match=match):
        heldout_log_likelihood(est, sp.csr_matrix(X), n_draws=2)


def test_fit_inside_no_grad_works(counts):
    ref = SparseFactorAnalysis(2, **FAST).fit(counts)
    with torch.no_grad():
        est = SparseFactorAnalysis(2, **FAST).fit(counts)
        Z = est.transform(counts[:5])
    np.testing.assert_allclose(est.loadings_, ref.loadings_, rtol=1e-6)
    assert np.isfinite(Z).all()


@pytest.mark.parametrize(
    "change",
    [
        {"n_components": 3},
        {"likelihood": "gaussian"},
        {"link": "softplus"},
        {"prior": "point_exponential"},
        {"fit_intercept": False},
        {"library_size": False},
    ],
)
def test_structural_parameters_changed_after_fit_are_named(counts, change):
    est = SparseFactorAnalysis(2, **FAST).fit(counts)
    est.set_params(**change)
    name = next(iter(change))
    for method in (
        lambda: est.transform(counts[:3]),
        lambda: est.inverse_transform(np.zeros((1, 2))),
        est.factors_posterior,
        lambda: est.score(counts[:3]),
    ):
        with pytest.raises(ValueError, match=f"parameters changed since fit \\({name}="):
            method()


def test_settings_that_do_not_shape_the_model_may_change_after_fit(counts):
    est = SparseFactorAnalysis(2, **FAST).fit(counts)
    est.set_params(max_iter=50, learning_rate=0.01, verbose=0, tol=1e-3)
    assert np.isfinite(est.transform(counts[:3])).all()


@pytest.mark.parametrize(
    "likelihood", ["zinb", "zip", "zt_poisson", "negative_binomial_full", "gaussian"]
)
def test_inverse_transform_of_every_likelihood_is_finite(counts, likelihood):
    X = counts if likelihood != "gaussian" else np.log1p(counts)
    est = SparseFactorAnalysis(2, likelihood=likelihood, **FAST).fit(X)
    M = est.inverse_transform(est.loadings_)
    assert M.shape == X.shape and np.isfinite(M).all()


def _degenerate():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(30, 1)), rng.normal(size=(1, 20))
    return {
        "exactly rank one": u @ v,
        "identical rows": np.tile(v, (30, 1)),
        "constant": np.full((30, 20), 2.5),
        "all zero": np.zeros((30, 20)),
        "rank one and constant columns": np.hstack([u @ v, np.ones((30, 3))]),
    }


@pytest.mark.parametrize("name", list(_degenerate()))
def test_degenerate_gaussian_data_give_a_finite_fit(name):
    """Data the model explains exactly: the noise floor keeps every result finite."""
    X = _degenerate()[name]
    est = SparseFactorAnalysis(2, likelihood="gaussian", random_state=0).fit(X)
    assert np.isfinite(est.elbo_) and np.isfinite(est.elbo_contribution_).all()
    Z = est.transform(X)
    M = est.inverse_transform(Z)
    assert np.isfinite(Z).all() and np.isfinite(M).all()
    np.testing.assert_allclose(M, X, atol=0.02 * max(1.0, np.abs(X).max()))


def test_elbo_is_that_of_the_returned_model(counts):
    """elbo_ is the pruned, ranked model's ELBO on the training data: no factor can be
    switched off for a higher one, and it is finite where training had to roll back."""
    est = SparseFactorAnalysis(3, learning_rate=50.0, **FAST).fit(counts)
    assert np.isfinite(est.elbo_)
    assert np.all(est.elbo_contribution_[est.active_components_] > 0)


# ---------------------------------------------------------------- fault injection
class _Fault:
    """Wraps ``RowBatches.step_terms``: at step ``at`` it raises ``error`` or returns
    non-finite terms."""

    def __init__(self, monkeypatch, at, error=None, nan=False):
        import spfa.data

        self.calls = 0
        original = spfa.data.RowBatches.step_terms

        def step_terms(batches, model, expectation, generator):
            self.calls += 1
            terms = original(batches, model, expectation, generator)
            if self.calls == at:
                if error is not None:
                    raise error
                if nan:
                    return ELBOTerms(terms.err * float("nan"), terms.kl_l, terms.kl_f, terms.kl_b)
            return terms

        monkeypatch.setattr(spfa.data.RowBatches, "step_terms", step_terms)


@pytest.mark.parametrize("at", [130, 333])
def test_an_interrupted_fit_keeps_its_last_checked_state(counts, monkeypatch, at):
    _Fault(monkeypatch, at, KeyboardInterrupt())
    est = SparseFactorAnalysis(3, max_iter=1000, tol=0.0, random_state=0)  # no early stop
    with pytest.raises(KeyboardInterrupt, match="interrupted at step"):
        est.fit(counts)
    # fitted, from the last window the stopping rule checked (every 50 steps)
    assert est.n_iter_ == at - 1 and len(est.history_["elbo"]) == (at - 1) // 50 * 50
    assert np.isfinite(est.elbo_) and np.isfinite(est.components_).all()
    monkeypatch.undo()
    assert np.isfinite(est.transform(counts[:4])).all()


def test_an_interrupt_before_the_first_checked_window_keeps_the_previous_state(counts, monkeypatch):
    from sklearn.exceptions import NotFittedError

    _Fault(monkeypatch, 7, KeyboardInterrupt())
    est = SparseFactorAnalysis(3, max_iter=1000, random_state=0)
    with pytest.raises(KeyboardInterrupt, match="no window was completed"):
        est.fit(counts)
    with pytest.raises(NotFittedError):
        est.transform(counts)


class _PruneFault:
    """Wraps ``spfa.fitting.prune_and_rank``: its ``nth`` call raises KeyboardInterrupt
    at the ELBO's ``at``-th evaluation (some factors then switched off); ``entered`` and
    ``returned`` record the model's state when each call begins and ends."""

    def __init__(self, monkeypatch, nth, at):
        from spfa import fitting

        self.entered, self.returned = [], []
        original = fitting.prune_and_rank

        def prune_and_rank(model, elbo, group):
            self.entered.append(_state(model))
            calls = []

            def faulty(*args, **kwargs):
                calls.append(1)
                if len(self.entered) == nth and len(calls) == at:
                    raise KeyboardInterrupt
                return elbo(*args, **kwargs)

            out = original(model, faulty, group)
            self.returned.append(_state(model))
            return out

        monkeypatch.setattr(fitting, "prune_and_rank", prune_and_rank)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state(est, state):
    assert set(est.state_dict_) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(est.state_dict_[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("during", ["comparing", "orienting"])
def test_an_interrupt_while_pruning_keeps_the_trained_fit(monkeypatch, during):
    """Ctrl-C in the pass that prunes and ranks the factors (factors switched off for the
    comparison, or the factors already permuted and being given their signs) keeps the
    model as trained: every factor on, in training order, with contributions NaN (not
    measured) and a finite ELBO; the interrupt goes on."""
    from spfa import fitting
    from spfa.simulate import simulate

    fault = _PruneFault(monkeypatch, nth=1, at=3 if during == "comparing" else 0)
    if during == "orienting":

        def orient_(model):
            raise KeyboardInterrupt

        monkeypatch.setattr(fitting, "orient_", orient_)
    x = simulate(seed=1, likelihood="poisson").x
    est = SparseFactorAnalysis(4, max_iter=150, random_state=0)
    with pytest.raises(KeyboardInterrupt, match="pruning and ranking.*holds that fit"):
        est.fit(x)
    _assert_state(est, fault.entered[0])
    assert est.active_components_.all() and np.isnan(est.elbo_contribution_).all()
    assert np.isfinite(est.elbo_) and est.elbo_ == est.history_["elbo"][-1]
    assert est.loadings_propagated_var_ is None  # not widened: the fit stopped there
    monkeypatch.undo()
    assert np.isfinite(est.transform(x[:4])).all()


def test_an_interrupt_while_pruning_again_keeps_the_first_pruned_fit(monkeypatch):
    """Ctrl-C while the fit prunes again after training on without the pruned factors
    keeps the first pruned and ranked fit."""
    from spfa.simulate import simulate

    fault = _PruneFault(monkeypatch, nth=2, at=2)
    x = simulate(seed=1, likelihood="poisson").x
    est = SparseFactorAnalysis(4, max_iter=400, random_state=0)
    with pytest.raises(KeyboardInterrupt, match="pruning again.*first pruned fit was kept"):
        est.fit(x)
    assert len(fault.entered) == 2  # it did prune a factor, and trained on
    _assert_state(est, fault.returned[0])
    assert not est.active_components_.all() and np.isfinite(est.elbo_contribution_).all()
    # the record is the first training's, the priors' windows included
    assert est.history_["step"][-1] == len(est.history_["elbo"]) == est.n_iter_
    assert np.isfinite(est.elbo_)


def test_an_interrupt_while_measuring_explained_variance_keeps_the_fit(counts, monkeypatch):
    """The Gaussian fit's explained variance is a pass over the data after training: a
    Ctrl-C there keeps the fit, with that attribute NaN, and goes on."""
    from spfa import fitting

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "explained_variance_ratio", interrupted)
    est = SparseFactorAnalysis(2, likelihood="gaussian", **FAST)
    with pytest.raises(KeyboardInterrupt, match="explained_variance_ratio_.*holds that fit"):
        est.fit(np.log1p(counts))
    assert np.isnan(est.explained_variance_ratio_).all()
    assert np.isfinite(est.components_).all() and np.isfinite(est.elbo_)
    monkeypatch.undo()
    assert np.isfinite(est.transform(np.log1p(counts[:4]))).all()


def test_an_interrupted_transform_says_nothing_was_kept(counts, interrupt_at):
    est = SparseFactorAnalysis(2, **FAST).fit(counts)
    interrupt_at(3)
    with pytest.raises(KeyboardInterrupt, match="new rows' loadings, which were not kept"):
        est.transform(counts[:5])


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_refit_leaves_the_previous_fit_intact(counts, monkeypatch, error):
    est = SparseFactorAnalysis(2, **FAST).fit(counts)
    before = {k: v for k, v in vars(est).items()}
    components = est.components_.copy()
    # a refit on other data that fails during training (an interrupt before the first
    # checked window has no state to keep)
    _Fault(monkeypatch, 3, error)
    with pytest.raises(type(error)):
        est.fit(counts[:, :10])
    monkeypatch.undo()
    assert set(vars(est)) == set(before) and est.n_features_in_ == counts.shape[1]
    np.testing.assert_array_equal(est.components_, components)
    assert np.isfinite(est.transform(counts[:4])).all()
    # and one that fails validation
    with pytest.raises(ValueError):
        est.fit(-counts)
    np.testing.assert_array_equal(est.components_, components)


def test_a_failed_first_fit_leaves_the_estimator_unfitted(counts, monkeypatch):
    from sklearn.exceptions import NotFittedError

    _Fault(monkeypatch, 10, RuntimeError("boom"))
    est = SparseFactorAnalysis(2, **FAST)
    with pytest.raises(RuntimeError, match="boom"):
        est.fit(counts)
    assert not hasattr(est, "n_features_in_")
    with pytest.raises(NotFittedError):
        est.transform(counts)


@pytest.mark.parametrize("at", [1, 49, 50, 160])
def test_a_non_finite_step_is_rolled_back_and_the_fit_is_finite(counts, monkeypatch, at):
    fault = _Fault(monkeypatch, at, nan=True)
    est = SparseFactorAnalysis(3, **FAST).fit(counts)
    assert fault.calls > at
    assert np.isfinite(est.elbo_) and np.isfinite(est.components_).all()
    assert np.isfinite(est.history_["elbo"]).all()


@pytest.mark.parametrize("c", [1e-6, 1e-3, 1e3, 1e6])
def test_gaussian_fits_do_not_depend_on_the_data_units(c):
    """The same data in other units: the same factors kept, the same fit in those units
    and the same ELBO up to the density's change of units, -n p log c."""
    rng = np.random.default_rng(0)
    G = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 30)) + rng.normal(size=(60, 30))
    ref = SparseFactorAnalysis(3, likelihood="gaussian", random_state=0).fit(G)
    est = SparseFactorAnalysis(3, likelihood="gaussian", random_state=0).fit(G * c)
    assert est.n_effective_components_ == ref.n_effective_components_ == 3
    np.testing.assert_allclose(
        est.inverse_transform(est.loadings_) / c, ref.inverse_transform(ref.loadings_), atol=0.05
    )
    assert est.elbo_ / G.size + np.log(c) == pytest.approx(ref.elbo_ / G.size, abs=2e-3)
    np.testing.assert_allclose(est.noise_variance_ / c**2, ref.noise_variance_, rtol=0.05)


def test_a_rolled_back_window_says_what_went_non_finite(counts, monkeypatch, caplog):
    import logging

    _Fault(monkeypatch, 20, nan=True)
    with caplog.at_level(logging.INFO, logger="spfa"):
        est = SparseFactorAnalysis(2, **FAST).fit(counts)
    assert est.n_rollbacks_ == 1
    assert any("non-finite the expected log-likelihood" in r.getMessage() for r in caplog.records)


def test_a_fit_that_rolled_back_advises_a_smaller_step(counts):
    with pytest.warns(ConvergenceWarning, match="rolled back with a smaller step"):
        SparseFactorAnalysis(2, learning_rate=50.0, max_iter=100, random_state=0).fit(counts)


@pytest.mark.parametrize("prior", ["point_normal", "point_exponential", "normal_mixture"])
def test_a_start_with_nothing_to_say_about_the_prior_scale_is_finite(prior):
    """Constant counts with an unobserved row (found by the fuzz layer): the start's
    values are ~0, whose inverse mean square overflowed float32 in the prior's start."""
    X = np.ones((8, 2))
    X[0] = np.nan
    est = SparseFactorAnalysis(1, likelihood="negative_binomial", prior=prior, **FAST).fit(X)
    assert np.isfinite(est.elbo_) and np.isfinite(est.transform(X[1:])).all()


def test_a_factor_the_start_barely_sees_starts_finite_under_the_normal_mixture():
    """Found by the fuzz layer: two observed rows and k = 2 leave the second factor with a
    subnormal precision, whose inverse overflowed float32 in the mixture's responsibilities."""
    X = np.array([[np.nan, np.nan], [0.0, 3.0], [3.0, 1.0]])
    est = SparseFactorAnalysis(2, likelihood="gaussian", prior="normal_mixture", **FAST).fit(X)
    assert np.isfinite(est.elbo_) and np.isfinite(est.components_).all()


def test_a_learning_rate_beyond_any_meaning_is_refused_by_name(counts):
    """Found by the fuzz layer: 8.5e36 overflowed float32 inside Adam (a RuntimeError)."""
    with pytest.raises(ValueError, match="learning_rate must be"):
        SparseFactorAnalysis(2, learning_rate=8.5e36).fit(counts)
