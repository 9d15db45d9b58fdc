"""Held-out evaluation: hide entries from a fit and score the fit on them.

Two ways to hold data out, both keeping every row and column in the fit:

* :func:`mask_entries` hides a random subset of entries (they become NaN, which
  the estimator treats as missing) and returns where they were;
* :func:`thin_counts` splits each count ``x`` binomially into
  ``x_test ~ Binomial(x, fraction)`` and ``x_train = x - x_test``. Under a
  Poisson model with mean ``mu`` the two halves are independent Poisson with
  means ``(1 - fraction) mu`` and ``fraction mu``, so the test half is scored
  with size factors multiplied by ``fraction / (1 - fraction)``. Thinning a
  negative binomial gives NB halves with the same dispersion, but they are no
  longer independent, so use masking to compare NB fits.

:func:`heldout_log_likelihood` scores held-out data by the log posterior
predictive density, ``log (1/S) sum_s p(x_ij | eta_ij^(s))`` with ``L, F, b``
drawn jointly from ``q``, averaged over the held-out entries; and
:func:`heldout_score` does the whole split-fit-score round for one estimator.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._validation import (
    check_count_values,
    check_positive_int,
    check_size_factors,
    check_values,
    check_view_counts,
)

__all__ = ["mask_entries", "thin_counts", "heldout_log_likelihood", "heldout_score"]


def _check_fraction(fraction) -> float:
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction!r}")
    return float(fraction)


def _dense(X) -> np.ndarray:
    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-dimensional, got shape {X.shape}")
    return X.astype(np.float64, copy=True)


def mask_entries(X, fraction=0.1, random_state=None):
    """Hide a random ``fraction`` of the observed entries of ``X``.

    Parameters
    ----------
    X : array-like or scipy.sparse matrix of shape (n_samples, n_features)
        NaN entries are already missing and are never chosen. A sparse matrix stays
        sparse: its implicit zeros are observed entries like any other, and the split
        is drawn in blocks of rows (the same split as for its dense form).
    fraction : float in (0, 1), default=0.1
    random_state : int, RandomState or None

    Returns
    -------
    X_train : ndarray, or csr_matrix for sparse ``X``, of shape (n_samples, n_features)
        ``X`` with the held-out entries set to NaN (stored NaN in a sparse matrix).
    heldout : ndarray of bool, or boolean csr_matrix for sparse ``X``
        True at the held-out entries.
    """
    fraction = _check_fraction(fraction)
    rng = check_random_state(random_state)
    if sp.issparse(X):
        return _mask_sparse(X, fraction, rng)
    x = _dense(X)
    heldout = (rng.random_sample(x.shape) < fraction) & ~np.isnan(x)
    if not heldout.any():
        raise ValueError("no entry was held out; increase fraction")
    x[heldout] = np.nan
    return x, heldout


def _mask_sparse(X, fraction, rng):
    """:func:`mask_entries` of a sparse matrix, in memory ``O(nnz + held-out entries)``."""
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.sum_duplicates()
    n, p = X.shape
    rows, cols = [], []
    step = max(1, CHUNK_ENTRIES // max(p, 1))
    for a in range(0, n, step):  # the uniforms of a dense draw, block by block
        r, c = np.nonzero(rng.random_sample((min(a + step, n) - a, p)) < fraction)
        rows.append(r + a)
        cols.append(c)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    stored = X.tocoo()
    missing = np.isnan(stored.data)
    # a held-out position that is already missing (a stored NaN) is not held out
    key = rows.astype(np.int64) * p + cols
    nan_keys = stored.row[missing].astype(np.int64) * p + stored.col[missing]
    chosen = ~np.isin(key, nan_keys)
    rows, cols, key = rows[chosen], cols[chosen], key[chosen]
    if not rows.size:
        raise ValueError("no entry was held out; increase fraction")
    kept = ~np.isin(stored.row.astype(np.int64) * p + stored.col, key)
    train = sp.csr_matrix(
        (
            np.concatenate([stored.data[kept], np.full(rows.size, np.nan)]),
            (np.concatenate([stored.row[kept], rows]), np.concatenate([stored.col[kept], cols])),
        ),
        shape=(n, p),
    )
    heldout = sp.csr_matrix((np.ones(rows.size, dtype=bool), (rows, cols)), shape=(n, p))
    return train, heldout


def thin_counts(X, fraction=0.1, random_state=None):
    """Split counts binomially into a training and a test matrix.

    Parameters
    ----------
    X : array-like or scipy.sparse matrix of shape (n_samples, n_features)
        Non-negative integer counts; a sparse matrix stays sparse.
    fraction : float in (0, 1), default=0.1
        Expected share of each count that goes to the test matrix.
    random_state : int, RandomState or None

    Returns
    -------
    X_train, X_test : same type as ``X`` (ndarray or sparse)
        ``X_train + X_test == X``. Score ``X_test`` with size factors
        multiplied by ``fraction / (1 - fraction)`` (see the module docstring).
    """
    fraction = _check_fraction(fraction)
    rng = check_random_state(random_state)
    if sp.issparse(X):
        counts = sp.csr_matrix(X, dtype=np.float64, copy=True)
        counts.sum_duplicates()
        values = counts.data
    else:
        counts = _dense(X)
        values = counts
    if np.isnan(values).any():
        raise ValueError("thin_counts needs complete counts; X has NaN entries")
    check_count_values(values, fractional="error")
    # a value within the tolerance of an integer is that count: the split is exact
    values[...] = np.rint(values)
    if sp.issparse(counts):
        test = counts.copy()
        test.data = rng.binomial(counts.data.astype(np.int64), fraction).astype(np.float64)
        test.eliminate_zeros()
        train = counts - test
        train.eliminate_zeros()
    else:
        test = rng.binomial(counts.astype(np.int64), fraction).astype(np.float64)
        train = counts - test
    return train, test


#: entries scored at a time: the held-out score works in blocks of rows
CHUNK_ENTRIES = 2**22


def heldout_log_likelihood(
    estimator, X, *, entries=None, size_factors=None, n_draws=100, random_state=0
):
    """Mean log posterior predictive density of held-out entries of the training rows.

    Parameters
    ----------
    estimator : SparseFactorAnalysis
        Fitted to data with the same rows and columns as ``X``.
    X : array-like or scipy.sparse matrix of shape (n_samples, n_features)
        Data to score (the held-out values; other entries are ignored). A
        sparse matrix (e.g. the test half of :func:`thin_counts`) is scored in
        blocks of rows and never densified whole.
    entries : ndarray of bool or boolean sparse matrix, shape (n_samples, n_features), default=None
        Which entries to score; None scores every non-NaN entry.
    size_factors : array-like of shape (n_samples,), default=None
        Size factors of ``X`` (for thinned counts, the training ones times
        ``fraction / (1 - fraction)``); None: the fit's training size factors.
    n_draws : int, default=100
        Joint draws of ``L, F, b`` (and covariate effects ``B``, at the training rows'
        covariates) from ``q``.
    random_state : int, default=0

    Returns
    -------
    float
        ``mean over entries of log (1/S) sum_s p(x_ij | eta^(s)_ij)``; higher is better.

    Notes
    -----
    The rows are scored in blocks of about ``CHUNK_ENTRIES`` entries. Draw
    ``s`` of ``F`` and ``b`` is the same for every block (one seed per draw),
    and each block draws its own rows of ``L``, which ``q`` makes independent
    of the other rows'. Memory is ``O(block)``, whatever ``n``.
    """
    check_is_fitted(estimator)
    n_draws = check_positive_int(n_draws, "n_draws")
    model = estimator.get_model()
    n, p = model.loadings.m, estimator.n_features_in_
    X = sp.csr_matrix(X) if sp.issparse(X) else _dense(X)  # sparse: no copy, own dtype
    check_values(X.data if sp.issparse(X) else X, model.likelihood)
    if X.shape != (n, p):
        raise ValueError(
            f"X has shape {X.shape}; heldout_log_likelihood scores the training rows, ({n}, {p})"
        )
    if model.likelihood.views is not None:  # each count view's counts
        check_view_counts(X, model.likelihood)
    if entries is not None:
        if sp.issparse(entries):
            entries = sp.csr_matrix(entries, dtype=bool)
        else:
            entries = np.asarray(entries, dtype=bool)
        if entries.shape != X.shape:
            raise ValueError(f"entries must have shape {X.shape}, got {entries.shape}")
    s = check_size_factors(size_factors, n, model.likelihood)
    if s is None:  # the rows are the training rows
        s = estimator.training_size_factors_
    device = estimator.device_
    # a fit with covariates: the training rows' own (the rows are the training rows)
    covariates = getattr(estimator, "training_covariates_", None)
    if covariates is not None:
        covariates = torch.as_tensor(covariates, dtype=torch.float32, device=device)

    def generator(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(int(seed))

    rng = check_random_state(random_state)
    global_seeds = rng.randint(2**31 - 1, size=n_draws)
    row_gen = generator(rng.randint(2**31 - 1))
    total, count = 0.0, 0
    step = max(1, CHUNK_ENTRIES // p)
    for a in range(0, n, step):
        e = min(a + step, n)
        x = X[a:e].toarray().astype(np.float64, copy=False) if sp.issparse(X) else X[a:e]
        if entries is None:
            scored = ~np.isnan(x)
        else:
            scored = entries[a:e].toarray() if sp.issparse(entries) else entries[a:e]
        if not model.likelihood.observes_zeros:
            # a zero-truncated model gives the density of a count given that it is non-zero
            scored = scored & ~(np.nan_to_num(x, nan=1.0) == 0)
        if not scored.any():
            continue
        if np.isnan(x[scored]).any():
            raise ValueError("X is NaN at some of the entries to score")
        density = _log_predictive(
            model,
            torch.as_tensor(np.where(scored, x, 0.0), dtype=torch.float32, device=device),
            None if s is None else np.log(s[a:e]),
            torch.arange(a, e, device=device),
            global_seeds,
            row_gen,
            generator,
            None if covariates is None else covariates[a:e],
        )
        mask = torch.as_tensor(scored, device=device)
        total += float(density[mask].sum())
        count += int(scored.sum())
    if count == 0:
        raise ValueError("no entries to score")
    return total / count


def _log_predictive(model, x, log_s, rows, global_seeds, row_gen, make_generator, covariates=None):
    """``log (1/S) sum_s p(x | eta^(s))`` for the block of rows ``rows`` (with their
    ``covariates``), float64."""
    device = x.device
    if log_s is not None:
        log_s = log_s[:, None] if log_s.ndim == 1 else log_s  # a multi-view fit's per view
        log_s = torch.as_tensor(log_s, dtype=torch.float32, device=device)
    running = None
    with torch.no_grad():
        for seed in global_seeds:
            eta = model.sample_eta(
                make_generator(int(seed)), rows=rows, row_generator=row_gen, covariates=covariates
            )
            lp = model.likelihood.log_prob(x, eta, log_s, rows).double()
            running = lp if running is None else torch.logaddexp(running, lp)
    return running - math.log(len(global_seeds))


def heldout_score(
    estimator,
    X,
    *,
    method="mask",
    fraction=0.1,
    size_factors=None,
    covariates=None,
    feature_groups=None,
    n_draws=100,
    random_state=0,
):
    """Hold out part of ``X``, fit a clone of ``estimator`` on the rest, score it.

    Parameters
    ----------
    estimator : SparseFactorAnalysis
        Unfitted template (its parameters are used; it is not modified).
    X : array-like of shape (n_samples, n_features)
    method : {"mask", "thin"}, default="mask"
        Hold out random entries, or binomially thinned counts (count likelihoods).
    fraction : float in (0, 1), default=0.1
    size_factors : array-like of shape (n_samples,), default=None
    covariates : array-like of shape (n_samples, c), default=None
        Known covariates of the rows (see ``SparseFactorAnalysis.fit``).
    feature_groups : array-like of shape (n_features,), default=None
        Each feature's view, for a multi-view ``estimator`` (see
        ``SparseFactorAnalysis.fit``); ``method="thin"`` needs every view to be counts.
    n_draws : int, default=100
        Posterior draws for the predictive density.
    random_state : int, default=0
        Seeds the split and the scoring draws.

    Returns
    -------
    score : float
        Mean held-out log predictive density per held-out entry.
    fitted : SparseFactorAnalysis
        The clone fitted to the training part.
    """
    if method not in ("mask", "thin"):
        raise ValueError(f"method must be 'mask' or 'thin', got {method!r}")
    likelihood = estimator._make_likelihood(feature_groups, fitting=True)
    parts = getattr(likelihood, "parts", [likelihood])
    if method == "thin" and not all(lik.integer_support for lik in parts):
        raise ValueError(
            "method='thin' splits counts; use method='mask' for a Gaussian fit or view"
        )
    fitted = clone(estimator)
    s = None if size_factors is None else np.asarray(size_factors, dtype=np.float64)
    views = {} if feature_groups is None else {"feature_groups": feature_groups}
    if method == "mask":
        x_train, heldout = mask_entries(X, fraction, random_state)
        fitted.fit(x_train, size_factors=s, covariates=covariates, **views)
        score = heldout_log_likelihood(
            fitted,
            X,
            entries=heldout,
            size_factors=s,
            n_draws=n_draws,
            random_state=random_state,
        )
    else:
        x_train, x_test = thin_counts(X, fraction, random_state)
        fitted.fit(x_train, size_factors=s, covariates=covariates, **views)
        base = fitted.training_size_factors_  # given, or the training half's libraries
        base = np.ones(x_test.shape[0]) if base is None else base
        score = heldout_log_likelihood(
            fitted,
            x_test,
            size_factors=base * fraction / (1.0 - fraction),
            n_draws=n_draws,
            random_state=random_state,
        )
    return score, fitted
