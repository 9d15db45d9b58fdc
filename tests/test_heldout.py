"""Held-out splits, the posterior predictive score, and choosing k with it."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis
from spfa.heldout import heldout_log_likelihood, heldout_score, mask_entries, thin_counts
from spfa.simulate import MATCHED_FIT, simulate


@pytest.fixture(scope="module")
def sim():
    return simulate("poisson", n=150, p=200, pi0=(0.5, 0.6, 0.7), slab_sd=(1.0, 1.0, 1.0), seed=3)


def test_mask_entries(rng):
    x = rng.poisson(2.0, size=(50, 40)).astype(float)
    x[0, 0] = np.nan
    train, heldout = mask_entries(x, 0.2, random_state=0)
    assert not heldout[0, 0]
    assert np.all(np.isnan(train[heldout])) and abs(heldout.mean() - 0.2) < 0.03
    keep = ~heldout & ~np.isnan(x)
    np.testing.assert_array_equal(train[keep], x[keep])
    with pytest.raises(ValueError, match="fraction"):
        mask_entries(x, 1.0)


def test_thin_counts_splits_each_count_binomially(rng):
    x = rng.poisson(5.0, size=(200, 100)).astype(float)
    train, test = thin_counts(x, 0.3, random_state=1)
    np.testing.assert_array_equal(train + test, x)
    assert train.min() >= 0 and test.min() >= 0
    assert abs(test.sum() / x.sum() - 0.3) < 0.01
    xs = sp.random(
        300,
        80,
        density=0.05,
        format="csr",
        random_state=2,
        data_rvs=lambda k: rng.integers(1, 9, k),
    )
    train_s, test_s = thin_counts(xs, 0.5, random_state=3)
    assert sp.issparse(train_s) and sp.issparse(test_s)
    assert abs(train_s + test_s - xs).max() == 0
    assert np.all(test_s.data > 0) and np.all(train_s.data > 0)  # no stored zeros
    with pytest.raises(ValueError, match="integer"):
        thin_counts(x + 0.5)
    with pytest.raises(ValueError, match="NaN"):
        thin_counts(np.array([[1.0, np.nan]]))


def test_heldout_log_likelihood_matches_scipy_monte_carlo(sim):
    x_train, heldout = mask_entries(sim.x, 0.1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SparseFactorAnalysis(
            3, max_iter=300, random_state=0, device="cpu", **MATCHED_FIT
        ).fit(x_train)
    ours = heldout_log_likelihood(est, sim.x, entries=heldout, n_draws=400)
    # independent path: numpy draws of L, F, b from the summaries, scipy log-pmf
    rng = np.random.default_rng(5)
    S = 400
    L = est.loadings_posterior().sample(S, rng)
    F = est.factors_posterior().sample(S, rng)
    state = est.state_dict_
    b = state["intercept.mean"].double().numpy() + np.exp(
        0.5 * state["intercept.log_var"].double().numpy()
    ) * rng.standard_normal((S, 1, sim.x.shape[1]))
    eta = np.einsum("snk,spk->snp", L, F) + b
    mu = np.logaddexp(0.0, eta)  # softplus
    logpmf = stats.poisson.logpmf(sim.x[None], mu)
    ref = (logsumexp(logpmf, axis=0) - np.log(S))[heldout].mean()
    assert abs(ours - ref) < 0.01 * abs(ref)
    with pytest.raises(ValueError, match="training rows"):
        heldout_log_likelihood(est, sim.x[:10])
    with pytest.raises(ValueError, match="NaN"):
        heldout_log_likelihood(est, x_train, entries=heldout)


def test_heldout_log_likelihood_in_blocks_of_rows_and_from_sparse(sim, monkeypatch):
    """Sparse test counts are scored without densifying; blocks of rows agree with one block."""
    import spfa.heldout as heldout_module

    x_train, x_test = thin_counts(sp.csr_matrix(sim.x), 0.2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SparseFactorAnalysis(3, max_iter=200, random_state=0, device="cpu").fit(x_train)
    s = np.full(sim.x.shape[0], 0.25)
    whole = heldout_log_likelihood(est, x_test, size_factors=s, n_draws=300)
    dense = heldout_log_likelihood(est, x_test.toarray(), size_factors=s, n_draws=300)
    assert dense == pytest.approx(whole, rel=1e-6)  # same blocks, same draws
    monkeypatch.setattr(heldout_module, "CHUNK_ENTRIES", 7 * sim.x.shape[1])  # 22 blocks
    monkeypatch.setattr(sp.csr_matrix, "toarray", _refuse_more_than(7))
    blocks = heldout_log_likelihood(est, x_test, size_factors=s, n_draws=300)
    assert blocks == pytest.approx(whole, rel=5e-3)  # other draws of L: Monte Carlo only
    assert np.isfinite(blocks) and blocks < 0


def _refuse_more_than(max_rows):
    dense = sp.csr_matrix.toarray

    def toarray(self, *args, **kwargs):
        assert self.shape[0] <= max_rows, f"densified {self.shape[0]} rows"
        return dense(self, *args, **kwargs)

    return toarray


@pytest.mark.parametrize("method", ["mask", "thin"])
def test_heldout_score_picks_the_planted_number_of_factors(sim, method):
    """Rank 3 planted: the held-out score rises up to k = 3 and is flat after it
    (the extra factors are pruned), so the smallest k within a tenth of the
    gain over k = 1 of the best is 3."""
    scores, kept = {}, {}
    for k in (1, 2, 3, 5):
        est = SparseFactorAnalysis(k, random_state=0, device="cpu", **MATCHED_FIT)
        scores[k], fitted = heldout_score(est, sim.x, method=method, fraction=0.2)
        kept[k] = fitted.n_effective_components_
    assert scores[1] < scores[2] < scores[3]
    best = max(scores.values())
    chosen = min(k for k, v in scores.items() if v >= best - 0.1 * (best - scores[1]))
    assert chosen == 3, scores
    assert kept[5] == 3


def test_choose_k_picks_the_planted_number_of_factors(sim):
    from spfa import choose_k

    choice = choose_k(
        SparseFactorAnalysis(random_state=0, device="cpu", **MATCHED_FIT),
        sim.x,
        [1, 3, 2, 5],
        fraction=0.2,
    )
    assert [row["k"] for row in choice.table] == [1, 2, 3, 5]
    assert choice.k == 3, choice.table
    assert choice.table[-1]["n_effective"] == 3
    with pytest.raises(ValueError, match="two candidates"):
        choose_k(SparseFactorAnalysis(), sim.x, [3])
    with pytest.raises(ValueError, match="tolerance"):
        choose_k(SparseFactorAnalysis(), sim.x, [1, 2], tolerance=1.0)


def test_heldout_score_rejects_unknown_method(sim):
    with pytest.raises(ValueError, match="method"):
        heldout_score(SparseFactorAnalysis(2), sim.x, method="bootstrap")
    with pytest.raises(ValueError, match="use method='mask'"):
        heldout_score(SparseFactorAnalysis(2, likelihood="gaussian"), sim.x, method="thin")


def test_thinning_counts_with_float_noise_splits_the_integers_they_are():
    """A CSV export's 2.9999999999999 is the count 3: both halves are exact non-negative
    integers summing to it (a real CellTypist matrix gave -7e-14 in the training half)."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(30, 12)).astype(float)
    noisy = counts + rng.uniform(-1e-9, 1e-9, size=counts.shape) * (counts > 0)
    for X in (noisy, sp.csr_matrix(noisy)):
        train, test = thin_counts(X, 0.5, random_state=0)
        train, test = (m.toarray() if sp.issparse(m) else m for m in (train, test))
        assert train.min() >= 0 and test.min() >= 0
        np.testing.assert_array_equal(train + test, counts)
        np.testing.assert_array_equal(train, np.rint(train))


def test_thinning_sums_duplicate_sparse_entries():
    """A CSR matrix with a duplicate (i, j) means their sum, as scipy defines it."""
    X = sp.csr_matrix((np.array([2.0, 3.0, 1.0]), np.array([0, 0, 1]), np.array([0, 2, 3])), (2, 2))
    assert not X.has_canonical_format
    train, test = thin_counts(X, 0.5, random_state=0)
    np.testing.assert_array_equal((train + test).toarray(), X.toarray())
    assert train.has_canonical_format and test.has_canonical_format


def test_masking_a_sparse_matrix_keeps_it_sparse_and_splits_as_its_dense_form():
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.3, size=(50, 20)).astype(float)
    dense[3, 4] = np.nan  # already missing: never held out
    X = sp.csr_matrix(dense)  # the NaN is stored
    train_d, held_d = mask_entries(dense, 0.2, random_state=5)
    train_s, held_s = mask_entries(X, 0.2, random_state=5)
    assert sp.issparse(train_s) and sp.issparse(held_s)
    np.testing.assert_array_equal(held_s.toarray(), held_d)
    np.testing.assert_array_equal(train_s.toarray(), train_d)  # NaN where held out or missing
    assert not held_d[3, 4]
    # and a fit scores the same held-out entries either way
    est = SparseFactorAnalysis(2, max_iter=200, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = heldout_score(est, dense, method="mask", fraction=0.2, random_state=5, n_draws=5)[0]
        b = heldout_score(est, X, method="mask", fraction=0.2, random_state=5, n_draws=5)[0]
    assert a == pytest.approx(b, rel=1e-4)
