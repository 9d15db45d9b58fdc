"""The scikit-learn estimator: ``SparseFactorAnalysis``."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._validation import (
    check_data,
    check_positive_float,
    check_positive_int,
    check_size_factors,
    dense_rows,
    resolve_device,
)
from .data import RowBatches
from .expectation import get_expectation
from .initialization import PIP_INIT, initialize
from .likelihoods import get_likelihood
from .model import SparseFactorModel
from .monitor import Monitor
from .persistence import load_estimator, save_estimator
from .posterior import PointNormalPosterior
from .training import train

__all__ = ["SparseFactorAnalysis"]

#: Monte Carlo draws used by ``score`` (a fixed-seed, low-noise evaluation)
N_SCORE_SAMPLES = 32
#: most sampled linear-predictor entries (draws x n x p) per pruning evaluation
PRUNE_BUDGET = 2**25
#: most entries (rows x p) made dense at once: the initial SVD sees a random subset of
#: rows beyond this, and row-wise work (projections, summaries) runs in chunks of it
INIT_ENTRIES = 2**24


class SparseFactorAnalysis(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse factor analysis with spike-and-slab (point-normal) priors.

    Fits ``X ~ Lik(s h(L F^T + b))`` with point-normal variational posteriors
    on the loadings ``L`` (``n x k``) and factors ``F`` (``p x k``), whose
    inclusion probability and slab scale are learned per factor and side, by
    maximising a reparameterised Monte Carlo ELBO with Adam.

    Parameters
    ----------
    n_components : int, default=10
        Number of factors ``k``; unsupported ones are pruned (``pi_k -> 0``).
    likelihood : str or Likelihood, default="poisson"
        Observation model, a name registered in
        :data:`spfa.likelihoods.LIKELIHOODS` -- ``"gaussian"``, ``"poisson"``,
        ``"negative_binomial"`` (per-feature dispersion),
        ``"negative_binomial_shared"``, ``"negative_binomial_full"`` (per-entry
        dispersion with a rank-1 term), ``"zinb"`` (zero-inflated NB),
        ``"zt_poisson"``, ``"zt_negative_binomial"`` (zero-truncated: fitted to
        the non-zero entries only) -- or any
        :class:`spfa.likelihoods.Likelihood` instance (e.g.
        ``NegativeBinomial(dispersion="full", dispersion_rank=2)``).
    link : {"softplus", "exp", "sigmoid"} or Link, default="softplus"
        Link ``h`` of the count likelihoods; the Gaussian always uses the
        identity. ``"sigmoid"`` bounds ``h`` by 1 (``Sigmoid(scale)`` by
        ``scale``): with library sizes as size factors, ``h`` is then the
        expected proportion of a sample's counts in a feature.
    expectation : {"mc", "quadrature"}, default="mc"
        How the expected log-likelihood ``E_q[log p(x | eta)]`` over the
        Gaussian of each linear predictor is computed: Monte Carlo draws
        (local reparameterisation; unbiased, noisy) or Gauss--Hermite
        quadrature (deterministic; see :mod:`spfa.expectation`). The issue
        that asked for it called this ``estimator``; in scikit-learn that name
        means a wrapped estimator object, hence ``expectation``. The Gaussian
        ELBO is exact and ignores it.
    n_mc_samples : int, default=1
        Monte Carlo draws of the linear predictor per step (``expectation="mc"``).
    n_quadrature_nodes : int, default=8
        Gauss--Hermite nodes per entry (``expectation="quadrature"``); each
        costs one likelihood evaluation, like one Monte Carlo draw.
    max_iter : int, default=3000
        Maximum number of passes over the data: optimiser steps in full-batch
        training, steps / number of batches with ``batch_size`` (as in
        scikit-learn's stochastic solvers).
    tol : float, default=1e-4
        Relative ELBO change between windows of 50 steps under which (or under
        twice its Monte Carlo standard error) the fit has reached a plateau;
        the second plateau ends it (the first reduces the step size). With
        ``batch_size``, windows are whole passes (at least 50 steps) compared
        by ``tol`` alone.
    learning_rate : float, default=0.05
        Adam step size.
    batch_size : int or None, default=None
        Rows (samples) per step of stochastic variational inference; None
        uses all rows each step. Each step's ELBO is an unbiased estimate: the
        batch's expected log-likelihood and loadings' KL, scaled by the number
        of batches, minus the factors' and intercept's KL. Only the batch's
        loadings are updated (``torch.optim.SparseAdam``). Sparse input stays
        compressed on the device and one batch at a time is made dense, so
        memory is ``O(batch_size p + (n + p) k + nnz)``.
    fit_intercept : bool, default=True
        Learn a per-feature intercept ``b`` in the linear predictor (the
        per-gene baseline expression of single-cell data), with a normal
        prior whose mean and spread are learned: baselines that really differ
        stay free, a shared baseline shrinks to one value.
    device : {"auto", "cpu", "cuda", ...} or torch.device, default="auto"
        Where the tensors live; ``"auto"`` picks CUDA when available. Asking for
        an unavailable device raises ``ValueError`` (no silent fallback).
    random_state : int, RandomState or None, default=None
        Seeds the Monte Carlo draws and the randomised SVD of the initialisation.
    log_dir : str or path, default=None
        Write a TensorBoard run here (tags ``loss/elbo``, ``loss/err``,
        ``loss/kl_l``, ``loss/kl_f`` and ``prior/...``).
    verbose : bool, default=False
        Print the ELBO once per window.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Posterior mean of the factors, ``E[F]^T``.
    loadings_ : ndarray of shape (n_samples, n_components)
        Posterior mean of the training loadings, ``E[L]``.
    loadings_pip_, factors_pip_ : ndarray of shape (n_samples | n_features, n_components)
        Posterior inclusion probabilities.
    intercept_ : ndarray of shape (n_features,)
        Posterior mean of the per-feature intercept on the linear-predictor
        scale (zeros if ``fit_intercept=False``).
    intercept_prior_mean_, intercept_prior_scale_ : float
        Learned normal prior of the intercept (``fit_intercept=True`` only).
    loadings_prior_pi_, factors_prior_pi_ : ndarray of shape (n_components,)
        Learned prior inclusion probability per factor.
    loadings_prior_scale_, factors_prior_scale_ : ndarray of shape (n_components,)
        Learned prior slab standard deviation per factor.
    loadings_sd_, factors_sd_ : ndarray of shape (n_samples | n_features, n_components)
        Posterior standard deviations (of the point-normal mixture).
    loadings_lfsr_, factors_lfsr_ : ndarray of shape (n_samples | n_features, n_components)
        Local false sign rates: the posterior probability that the entry's
        sign is not that of its posterior mean (the point mass counts as
        wrong). Credible intervals: :meth:`factors_posterior`,
        :meth:`loadings_posterior`.
    active_components_ : ndarray of bool, shape (n_components,)
        False for a factor pruned after training: removing it did not lower
        the ELBO, so empirical Bayes set its ``pi`` to 0 (its loadings,
        factors, PIPs and prior ``pi`` are reported as exactly 0). Pruned
        factors come last.
    n_effective_components_ : int
        Number of factors kept (``active_components_.sum()``).
    elbo_contribution_ : ndarray of shape (n_components,)
        ELBO lost (nats) when the factor alone is switched off, the others as
        fitted; 0 for a pruned factor. Factors are ordered by it, largest
        first. The per-window priors in ``history_`` follow this order; the
        TensorBoard ``prior/...`` tags keep the order of training.
    explained_variance_ratio_ : ndarray of shape (n_components,)
        Gaussian only: the observed variance of the feature-centred term
        ``E[l_k] E[f_k]^T`` over that of ``X`` (terms are not orthogonal, so
        the ratios need not add up to at most 1).
    noise_variance_ : ndarray of shape (n_features,)
        Gaussian likelihood only.
    dispersion_, inverse_dispersion_ : ndarray of shape (n_features,)
        Negative binomial likelihoods only: variance is ``mu + dispersion_ *
        mu^2``. For ``"negative_binomial_full"`` the per-feature baseline
        ``exp(a_j)`` of ``r_ij = exp(a_j + u_i . v_j)``.
    dispersion_row_factors_, dispersion_feature_factors_ : ndarray of shape (n, d), (p, d)
        ``"negative_binomial_full"`` only: ``u`` and ``v`` of the training rows.
    zero_inflation_ : ndarray of shape (n_features,)
        ``"zinb"`` only: the probability of an extra zero per feature.
    training_size_factors_ : ndarray of shape (n_samples,) or None
        The ``size_factors`` given to ``fit`` (used by :meth:`sample`).
    elbo_ : float
        ELBO of the training data (mean over the last window of steps).
    n_iter_ : int
        Passes over the data (optimiser steps in full-batch training).
    history_ : dict of lists
        ``"elbo"``, ``"err"``, ``"kl_l"``, ``"kl_f"`` per pass (per step in
        full-batch training, a pass's mean with ``batch_size``); the learned
        priors per window (``"step"`` gives the pass of each entry).
    device_ : torch.device
        Device the fit ran on.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Defined when ``X`` had string column names.

    Examples
    --------
    >>> import numpy as np
    >>> from spfa import SparseFactorAnalysis
    >>> X = np.random.default_rng(0).poisson(1.0, size=(50, 30))
    >>> est = SparseFactorAnalysis(n_components=2, max_iter=200, random_state=0)
    >>> Z = est.fit_transform(X)  # doctest: +SKIP
    >>> Z.shape  # doctest: +SKIP
    (50, 2)
    """

    def __init__(
        self,
        n_components=10,
        *,
        likelihood="poisson",
        link="softplus",
        expectation="mc",
        n_mc_samples=1,
        n_quadrature_nodes=8,
        max_iter=3000,
        tol=1e-4,
        learning_rate=0.05,
        batch_size=None,
        fit_intercept=True,
        device="auto",
        random_state=None,
        log_dir=None,
        verbose=False,
    ):
        self.n_components = n_components
        self.likelihood = likelihood
        self.link = link
        self.expectation = expectation
        self.n_mc_samples = n_mc_samples
        self.n_quadrature_nodes = n_quadrature_nodes
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.fit_intercept = fit_intercept
        self.device = device
        self.random_state = random_state
        self.log_dir = log_dir
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _make_likelihood(self):
        return get_likelihood(self.likelihood, self.link)

    def _check_params(self):
        check_positive_int(self.n_components, "n_components")
        check_positive_int(self.n_mc_samples, "n_mc_samples")
        check_positive_int(self.n_quadrature_nodes, "n_quadrature_nodes")
        get_expectation(self.expectation, 1)  # ValueError for an unknown rule
        check_positive_int(self.max_iter, "max_iter")
        check_positive_float(self.tol, "tol", allow_zero=True)
        check_positive_float(self.learning_rate, "learning_rate")
        if self.batch_size is not None:
            check_positive_int(self.batch_size, "batch_size")
        return self._make_likelihood(), resolve_device(self.device)

    def _data(self, X, size_factors, *, reset, likelihood):
        """Validated ``X`` (dense with NaN, or CSR: never densified) and size factors."""
        X = check_data(self, X, reset=reset, count=likelihood.is_count)
        s = check_size_factors(size_factors, X.shape[0])
        if s is not None and not likelihood.is_count:
            raise ValueError(
                "size_factors are only used by count likelihoods, "
                f"not by {type(likelihood).__name__}"
            )
        if not likelihood.observes_zeros:
            # a zero-truncated model sees the observed non-zero entries only
            values = X.data if sp.issparse(X) else X
            if not np.any((values != 0) & ~np.isnan(values)):
                raise ValueError(
                    f"X has no observed non-zero entries; the {likelihood.name} "
                    "likelihood fits only those"
                )
        return X, s

    def _batches(self, X, s, likelihood, seed: int) -> RowBatches:
        """The data on the device, in batches of ``batch_size`` rows (one batch if None):
        dense blocks, or for a zero-truncated likelihood only the entries it fits."""
        return RowBatches(
            X,
            None if s is None else np.log(s),
            self.batch_size,
            entries=not likelihood.observes_zeros,
            device=self.device_,
            seed=seed,
        )

    def _init_block(self, X, s, likelihood, rng):
        """The rows that the initial SVD sees, dense: all of them, or a random
        subset when there are more than ``INIT_ENTRIES`` entries.

        Returns ``(rows or None, x, mask, size factors of those rows)``.
        """
        n, p = X.shape
        rows = None
        if n * p > INIT_ENTRIES:
            m = min(n, max(INIT_ENTRIES // p, 2 * self.n_components + 2))
            rows = np.sort(rng.choice(n, size=m, replace=False))
        x, mask = dense_rows(X, rows)
        if not likelihood.observes_zeros:
            nonzero = x != 0 if mask is None else (x != 0) & (mask > 0)
            mask = nonzero.astype(np.float64)
        s_rows = s if s is None or rows is None else s[rows]
        return rows, x, mask, s_rows

    def _expectation(self, n_mc_samples: int):
        """The rule for ``E_q[log p]``; Monte Carlo with ``n_mc_samples`` draws."""
        n = self.n_quadrature_nodes if self.expectation == "quadrature" else n_mc_samples
        return get_expectation(self.expectation, n)

    def _generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device_)
        gen.manual_seed(int(seed))
        return gen

    def _row_state_keys(self) -> set[str]:
        """State keys with one row per training sample (not shared with new rows)."""
        row_params = self._make_likelihood().row_parameters
        keys = {"loadings.logits", "loadings.mean", "loadings.log_prec"}
        return keys | {f"likelihood.{name}" for name in row_params}

    def _global_state(self) -> dict:
        local = self._row_state_keys()
        return {k: v for k, v in self._state.items() if k not in local}

    def _build_model(self, n_rows: int) -> SparseFactorModel:
        """Model with the fitted global parameters and fresh loadings for ``n_rows``."""
        likelihood = self._make_likelihood()
        p = self.n_features_in_
        likelihood.initialize(np.ones(p), np.ones(p))
        model = SparseFactorModel(
            n_rows, p, self.n_components, likelihood, fit_intercept=self.fit_intercept
        )
        state = {k: torch.as_tensor(v) for k, v in self._global_state().items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= self._row_state_keys(), (missing, unexpected)
        return model.to(self.device_)

    def _training_model(self) -> SparseFactorModel:
        """The fitted model with the training rows' loadings."""
        model = self._build_model(self._state["loadings.mean"].shape[0])
        local = {k: torch.as_tensor(self._state[k]) for k in self._row_state_keys()}
        missing, unexpected = model.load_state_dict(local, strict=False)
        assert not unexpected, unexpected
        return model.to(self.device_)

    # ---------------------------------------------------------------------- fit
    def fit(self, X, y=None, *, size_factors=None, init_loadings=None, init_factors=None):
        """Fit the model to ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_features)
            Data; NaN marks a missing entry. Counts (non-negative integers,
            possibly stored as floats) for the count likelihoods.
        y : Ignored
        size_factors : array-like of shape (n_samples,), default=None
            Positive per-sample scale of the mean (count likelihoods); None means 1.
        init_loadings : array-like of shape (n_samples, n_components), default=None
        init_factors : array-like of shape (n_features, n_components), default=None
            Starting posterior means of ``L`` and ``F`` in place of spfa's own
            (a weighted SVD); give both or neither. Simulations use them to
            start at the truth.

        Returns
        -------
        self
        """
        self._fit(X, size_factors, init_loadings, init_factors)
        return self

    def fit_transform(self, X, y=None, *, size_factors=None, init_loadings=None, init_factors=None):
        """Fit, then return the posterior mean loadings ``E[L]`` of ``X``, ``(n, k)``."""
        self._fit(X, size_factors, init_loadings, init_factors)
        return self.loadings_.copy()

    def _check_start(self, init_loadings, init_factors, n, p):
        if init_loadings is None and init_factors is None:
            return None
        if init_loadings is None or init_factors is None:
            raise ValueError("init_loadings and init_factors must be given together")
        k = self.n_components
        out = []
        given = (("init_loadings", init_loadings, n), ("init_factors", init_factors, p))
        for name, a, rows in given:
            a = np.asarray(a, dtype=np.float64)
            if a.shape != (rows, k):
                raise ValueError(f"{name} must have shape ({rows}, {k}), got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name} contains NaN or infinity")
            out.append(a)
        return tuple(out)

    def _fit(self, X, size_factors, init_loadings=None, init_factors=None):
        likelihood, device = self._check_params()
        X, s = self._data(X, size_factors, reset=True, likelihood=likelihood)
        n, p = X.shape
        k = self.n_components
        if k > min(n, p):
            raise ValueError(
                f"n_components={k} is larger than the data allow: "
                f"min(n_samples, n_features) = {min(n, p)}"
            )
        start = self._check_start(init_loadings, init_factors, n, p)
        self.device_ = device
        rng = check_random_state(self.random_state)
        sub, x0, mask0, s0 = self._init_block(X, s, likelihood, rng)
        start0 = start if start is None or sub is None else (start[0][sub], start[1])
        init = initialize(x0, mask0, s0, k, likelihood, self.fit_intercept, rng, start=start0)
        del x0, mask0

        model = SparseFactorModel(n, p, k, likelihood, fit_intercept=self.fit_intercept)
        with torch.no_grad():
            for side in ("loadings", "factors", "intercept"):
                module, values = getattr(model, side), getattr(init, side)
                for name, value in (values or {}).items():
                    if sub is not None and side == "loadings" and not name.startswith("prior"):
                        continue  # the subset's loadings; all rows' come from the projection
                    getattr(module, name).copy_(torch.as_tensor(value))
        model.to(device)
        if sub is not None:
            self._init_loadings(model, X, s, None if start is None else start[0])

        gen = self._generator(rng.randint(2**31 - 1))
        data = self._batches(X, s, likelihood, seed=rng.randint(2**31 - 1))
        expectation = self._expectation(self.n_mc_samples)

        def objective():
            return data.step_terms(model, expectation, gen)

        monitor = Monitor(model, self.log_dir)
        try:
            result = self._train(model, objective, data, monitor)
        finally:
            monitor.close()

        elbo = self._paired_elbo(model, data)
        self.elbo_contribution_, order = self._prune_and_rank(model, elbo)
        self.training_size_factors_ = s
        self._store(model, result, monitor, order)
        if not likelihood.is_count:
            self.explained_variance_ratio_ = self._explained_variance_ratio(X)
        self.elbo_ = (
            float(np.mean(result.history["elbo"][-50:])) if result.history["elbo"] else float("nan")
        )
        if not result.converged and not result.message:
            warnings.warn(
                f"SparseFactorAnalysis stopped at max_iter={self.max_iter} before the "
                "ELBO converged; increase max_iter or learning_rate",
                ConvergenceWarning,
                stacklevel=3,
            )
        return self

    def _train(self, model, objective, data: RowBatches, monitor=None):
        """Adam over everything that requires a gradient; with several batches,
        the loadings of each batch's rows by SparseAdam (only where used), and
        ``max_iter``, the stopping rule and the history count passes."""
        passes = data.n_batches
        model.sparse_rows = passes > 1
        local = model.row_parameters() if passes > 1 else []
        params = [p for p in model.parameters() if p.requires_grad]
        params = [p for p in params if all(p is not q for q in local)]
        try:
            result = train(
                model,
                objective,
                params,
                sparse_params=local,
                n_observed=data.n_observed,
                max_iter=self.max_iter * passes,
                check_every=50 if passes == 1 else passes * -(-50 // passes),
                steps_per_record=passes,
                tol=self.tol,
                learning_rate=self.learning_rate,
                on_window=monitor,
                verbose=self.verbose,
            )
        finally:
            model.sparse_rows = False
        result.n_iter = result.n_iter // passes
        return result

    def _paired_elbo(self, model: SparseFactorModel, data: RowBatches):
        """A function evaluating the ELBO with common random numbers (fixed seed).

        Differences of its values between two settings of ``active`` are paired
        comparisons, free of most Monte Carlo noise (quadrature has none).
        """
        expectation = self._expectation(
            max(1, min(N_SCORE_SAMPLES, PRUNE_BUDGET // data.n_evaluated))
        )

        def elbo() -> float:
            with torch.no_grad():
                terms = data.total_terms(model, expectation, self._generator(0))
            return float(terms.elbo)

        return elbo

    @staticmethod
    def _switch(model: SparseFactorModel, k: int, on: bool) -> None:
        for side in (model.loadings, model.factors):
            side.active[k] = 1.0 if on else 0.0

    def _prune_and_rank(self, model: SparseFactorModel, elbo) -> tuple[np.ndarray, np.ndarray]:
        """Switch off the factors the data do not support; order the rest by ELBO contribution.

        *Pruning.* A factor the data do not support ends training with a
        posterior close to its prior and a tiny slab scale; its ``pi`` is then
        not identified and its PIPs are meaningless. Empirical Bayes takes the
        boundary ``pi = 0`` wherever the ELBO there is at least as high.
        Factors are tried from the smallest ``||E[l_k]|| ||E[f_k]||`` up; the
        ELBO is evaluated with common random numbers, so each comparison is
        paired.

        *Ranking.* The contribution of factor ``k`` is ``ELBO - ELBO(without
        k)`` with the other kept factors as fitted (paired draws); 0 for a
        pruned factor. A factor tried after the last pruned one was tried in
        exactly that state, so its trial is reused; only the factors tried
        before a later pruning are evaluated again. Typically the pruned
        factors are the smallest and are tried first, and the whole selection
        costs ``k + 1`` evaluations of the ELBO rather than ``2k + 1``.

        The model is permuted in place (kept factors by decreasing
        contribution, pruned ones last); returns the contributions in the new
        order and the permutation (new factor ``i`` was factor ``order[i]`` in
        training).
        """
        with torch.no_grad():
            size = model.loadings.moments().mean.norm(dim=0) * model.factors.moments().mean.norm(
                dim=0
            )
        tried = torch.argsort(size).tolist()
        best = elbo()
        without: dict[int, float] = {}
        last_pruned = -1
        for position, k in enumerate(tried):
            self._switch(model, k, False)
            trial = elbo()
            if np.isfinite(trial) and trial >= best:
                best, last_pruned = trial, position
                if self.verbose:
                    print(f"pruned factor {k}: the ELBO is no lower without it")
            else:
                self._switch(model, k, True)
                without[k] = trial
        # `best` is the ELBO of the kept factors, with the same draws
        contribution = np.zeros(len(tried))
        for position, k in enumerate(tried):
            if k not in without:
                continue
            if position < last_pruned:  # tried while a later-pruned factor was still on
                self._switch(model, k, False)
                without[k] = elbo()
                self._switch(model, k, True)
            contribution[k] = best - without[k]
        active = model.factors.active.cpu().numpy() > 0
        order = np.lexsort((-contribution, ~active))
        index = torch.as_tensor(order, device=model.factors.active.device)
        model.loadings.permute_(index)
        model.factors.permute_(index)
        return contribution[order], order

    def _store(self, model: SparseFactorModel, result, monitor: Monitor, order) -> None:
        self._state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            ml, _ = model.loadings.moments()
            mf, _ = model.factors.moments()
            self.loadings_ = ml.cpu().double().numpy()
            self.components_ = mf.T.cpu().double().numpy()
        loadings, factors = self._posterior(model.loadings), self._posterior(model.factors)
        self.loadings_pip_, self.factors_pip_ = loadings.pip, factors.pip
        self.loadings_sd_, self.factors_sd_ = loadings.sd, factors.sd
        self.loadings_lfsr_, self.factors_lfsr_ = loadings.lfsr, factors.lfsr
        with torch.no_grad():
            self.intercept_ = model.intercept_mean().detach().cpu().double().numpy()
            if model.intercept is not None:
                self.intercept_prior_mean_ = float(model.intercept.prior_mean)
                self.intercept_prior_scale_ = float(model.intercept.prior_scale)
        for key, value in monitor.priors().items():
            setattr(self, key + "_", value)
        for key, value in model.likelihood.fitted_attributes().items():
            setattr(self, key, value)
        self.active_components_ = model.factors.active.cpu().numpy() > 0
        self.n_effective_components_ = int(self.active_components_.sum())
        self.n_iter_ = result.n_iter
        self.history_ = dict(result.history)
        # per-window priors were recorded in training order; report them in the final one
        for key, windows in monitor.prior_history.items():
            if key != "step":
                windows = [[w[i] for i in order] for w in windows]
            self.history_[key] = windows
        self._n_features_out = self.n_components

    # ---------------------------------------------------------------- transform
    def _fit_loadings(self, X, size_factors):
        """Fit ``q(L)`` of new rows with the factors and priors held fixed."""
        check_is_fitted(self)
        likelihood = self._make_likelihood()
        X, s = self._data(X, size_factors, reset=False, likelihood=likelihood)
        model = self._build_model(X.shape[0])
        self._init_loadings(model, X, s)
        model.requires_grad_(False)
        # the new rows' own parameters: q(L) and any per-sample likelihood parameters
        params = model.row_parameters()
        for prm in params:
            prm.requires_grad_(True)
        rng = check_random_state(self.random_state)
        gen = self._generator(rng.randint(2**31 - 1))
        data = self._batches(X, s, likelihood, seed=rng.randint(2**31 - 1))
        expectation = self._expectation(self.n_mc_samples)

        def objective():
            return data.step_terms(model, expectation, gen)

        result = self._train(model, objective, data)
        return model, data, result

    def _init_loadings(self, model, X, s, means=None) -> None:
        """Start ``q(L)`` of every row of ``X`` from the fitted factors, in chunks of rows.

        The slab means come from a ridge projection of the linearised data
        onto ``E[F]`` (or from ``means``, ``(n, k)``), the precisions from
        their coordinate-ascent values given ``F``.
        """
        loadings = model.loadings
        n, p = X.shape
        chunk = max(1, INIT_ENTRIES // p)
        with torch.no_grad():
            loadings.logits.fill_(float(np.log(PIP_INIT / (1 - PIP_INIT))))
            for a in range(0, n, chunk):
                rows = np.arange(a, min(a + chunk, n))
                x, mask = dense_rows(X, rows)
                s_rows = None if s is None else s[rows]
                start = self._project(model, x, mask, s_rows) if means is None else means[rows]
                index = torch.as_tensor(rows, device=loadings.mean.device)
                loadings.mean[index] = torch.as_tensor(
                    start / PIP_INIT, dtype=loadings.mean.dtype, device=loadings.mean.device
                )
                loadings.log_prec[index] = self._start_log_prec(model, mask, len(rows)).to(
                    loadings.log_prec
                )

    def _project(self, model, x, mask, s) -> np.ndarray:
        """Ridge projection of the linearised data onto ``E[F]``: start of ``E[L]``."""
        with torch.no_grad():
            mf = model.factors.moments().mean.double().cpu().numpy()
            b = model.intercept_mean().double().cpu().numpy()
            lik = model.likelihood
            mu0 = lik.mean(torch.as_tensor(b)).double().numpy()
        slope = lik.link.derivative(b)
        y = x if s is None else x / s[:, None]
        z = (y - mu0) / slope
        if mask is not None:
            z = z * mask
        if lik.is_count:
            var = lik.variance_function(np.maximum(np.abs(mu0), 1e-12))
            w = slope**2 / np.maximum(var, 1e-300)
        else:
            w = 1.0 / self._noise_variance(model)
        tau = self._loadings_prior_precision(model)
        gram = (mf * w[:, None]).T @ mf + np.diag(tau)
        return np.linalg.solve(gram, ((z * w) @ mf).T).T

    def _start_log_prec(self, model, mask, n_rows: int) -> torch.Tensor:
        with torch.no_grad():
            mf, vf = model.factors.moments()
            second = (mf**2 + vf).double().cpu().numpy()
        if model.likelihood.is_count:
            w = np.ones(second.shape[0])
        else:
            w = 1.0 / self._noise_variance(model)
        tau = self._loadings_prior_precision(model)
        if mask is None:
            return torch.as_tensor(np.log(np.tile(w @ second + tau, (n_rows, 1))))
        return torch.as_tensor(np.log((mask * w) @ second + tau))

    @staticmethod
    def _noise_variance(model) -> np.ndarray:
        with torch.no_grad():
            return model.likelihood.noise_variance.double().cpu().numpy()

    @staticmethod
    def _loadings_prior_precision(model) -> np.ndarray:
        with torch.no_grad():
            return torch.exp(model.loadings.prior_log_prec).double().cpu().numpy()

    def transform(self, X, *, size_factors=None):
        """Posterior mean loadings ``E[L]`` of new rows, ``(n_samples, n_components)``.

        The factors, intercept, priors and nuisance parameters are held at
        their fitted values; only ``q(L)`` of the new rows is optimised.
        """
        model, _, _ = self._fit_loadings(X, size_factors)
        with torch.no_grad():
            return model.loadings.moments().mean.cpu().double().numpy()

    @staticmethod
    def _posterior(side) -> PointNormalPosterior:
        with torch.no_grad():
            return PointNormalPosterior(
                side.pip.cpu().double().numpy(),
                side.mean.cpu().double().numpy(),
                side.slab_sd().cpu().double().numpy(),
            )

    def _explained_variance_ratio(self, X) -> np.ndarray:
        """Gaussian: share of the observed variance of each feature-centred factor term.

        With ``o`` the observed entries, ``count_j``, ``A = o^T l`` and
        ``B = o^T l^2``, the centred term ``l_k f_k^T`` has observed sum of squares
        ``sum_j f_jk^2 (B_jk - A_jk^2 / count_j)``; every sum is accumulated over
        chunks of rows, so no ``n x p`` array is formed.
        """
        n, p = X.shape
        k = self.n_components
        count, s1, s2 = np.zeros(p), np.zeros(p), np.zeros(p)
        a_sum, b_sum = np.zeros((p, k)), np.zeros((p, k))
        chunk = max(1, INIT_ENTRIES // p)
        for a in range(0, n, chunk):
            rows = np.arange(a, min(a + chunk, n))
            x, mask = dense_rows(X, rows)
            obs = np.ones_like(x) if mask is None else mask
            lo = self.loadings_[rows]
            count += obs.sum(0)
            s1 += x.sum(0)
            s2 += (x**2).sum(0)
            a_sum += obs.T @ lo
            b_sum += obs.T @ lo**2
        count = np.maximum(count, 1.0)
        total = float((s2 - s1**2 / count).sum())
        if total <= 0:  # constant features: nothing to explain
            return np.zeros(k)
        explained = ((b_sum - a_sum**2 / count[:, None]) * self.components_.T**2).sum(0)
        return explained / total

    def factors_posterior(self) -> PointNormalPosterior:
        """Posterior of the factors ``F``, ``(n_features, n_components)``.

        Gives mean, sd, PIP, local false sign rate and credible intervals of
        every entry, accounting for the point mass at zero
        (see :class:`spfa.posterior.PointNormalPosterior`).
        """
        check_is_fitted(self)
        return self._posterior(self._training_model().factors)

    def loadings_posterior(self, X=None, *, size_factors=None) -> PointNormalPosterior:
        """Posterior of the loadings ``L``, ``(n_samples, n_components)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), default=None
            None gives the training rows' posterior; new rows are fitted as in
            :meth:`transform` (factors and priors held fixed).
        size_factors : array-like of shape (n_samples,), default=None
            Of the new rows.
        """
        check_is_fitted(self)
        if X is None:
            if size_factors is not None:
                raise ValueError("size_factors are only used with new rows X")
            return self._posterior(self._training_model().loadings)
        model, _, _ = self._fit_loadings(X, size_factors)
        return self._posterior(model.loadings)

    def top_features(self, n_top=10, *, min_pip=0.5) -> list[dict]:
        """The features that make up each factor, strongest first.

        Within each factor, the features with PIP at least ``min_pip`` are
        ranked by the size of their posterior mean effect ``|E[f_jk]|`` (which
        is PIP times slab mean, so it weighs confidence and size together).
        Pruned factors have no features (their PIPs are 0).

        Parameters
        ----------
        n_top : int, default=10
            At most this many features per factor.
        min_pip : float in [0, 1], default=0.5

        Returns
        -------
        list of dict
            One record per (factor, feature), ready for ``pandas.DataFrame``:
            ``component``, ``rank``, ``feature`` (the input's column name, or
            ``"x<j>"``), ``index`` (column number), ``pip``, ``mean``, ``sd``,
            ``lfsr``.
        """
        check_is_fitted(self)
        n_top = check_positive_int(n_top, "n_top")
        if not (isinstance(min_pip, numbers.Real) and 0 <= min_pip <= 1):
            raise ValueError(f"min_pip must lie in [0, 1], got {min_pip!r}")
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            names = np.array([f"x{j}" for j in range(self.n_features_in_)], dtype=object)
        post = self.factors_posterior()
        mean, sd, lfsr = post.mean, post.sd, post.lfsr
        records = []
        for k in np.flatnonzero(self.active_components_):
            keep = np.flatnonzero(post.pip[:, k] >= min_pip)
            ranked = keep[np.argsort(-np.abs(mean[keep, k]), kind="stable")][:n_top]
            for rank, j in enumerate(ranked):
                records.append(
                    {
                        "component": int(k),
                        "rank": rank,
                        "feature": str(names[j]),
                        "index": int(j),
                        "pip": float(post.pip[j, k]),
                        "mean": float(mean[j, k]),
                        "sd": float(sd[j, k]),
                        "lfsr": float(lfsr[j, k]),
                    }
                )
        return records

    def inverse_transform(self, Z):
        """Expected data ``h(Z E[F]^T + b)`` on the mean scale (size factor 1).

        Parameters
        ----------
        Z : array-like of shape (n_samples, n_components)

        Returns
        -------
        ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        Z = np.asarray(Z, dtype=np.float64)
        if Z.ndim != 2 or Z.shape[1] != self.n_components:
            raise ValueError(f"Z must have shape (n_samples, {self.n_components}), got {Z.shape}")
        eta = torch.as_tensor(Z @ self.components_ + self.intercept_)
        likelihood = self._make_likelihood()
        return likelihood.mean(eta).double().numpy()

    def score(self, X, y=None, *, size_factors=None):
        """ELBO per observed entry of ``X`` (higher is better).

        ``q(L)`` of the rows of ``X`` is fitted as in :meth:`transform`; the ELBO
        counts their expected log-likelihood, their loadings' KL and the
        factors' KL, estimated with 32 fixed-seed Monte Carlo draws
        (``N_SCORE_SAMPLES``). To score entries held out of the training
        rows, use :mod:`spfa.heldout`.
        """
        model, data, _ = self._fit_loadings(X, size_factors)
        gen = self._generator(0)
        with torch.no_grad():
            terms = data.total_terms(model, self._expectation(N_SCORE_SAMPLES), gen)
        return float(terms.elbo) / data.n_observed

    def sample(self, n_draws=1, *, size_factors=None, random_state=None):
        """Posterior predictive data sets for the training rows.

        Each draw takes ``L``, ``F`` and ``b`` jointly from the posterior ``q``,
        then data from the likelihood at ``s h(L F^T + b)`` with the fitted
        nuisance parameters (Gaussian noise variance, NB dispersion), for
        posterior predictive checks.

        Parameters
        ----------
        n_draws : int, default=1
        size_factors : array-like of shape (n_samples,), default=None
            None uses the training size factors (``training_size_factors_``).
        random_state : int, RandomState or None, default=None

        Returns
        -------
        ndarray of shape (n_draws, n_samples, n_features)
        """
        check_is_fitted(self)
        n_draws = check_positive_int(n_draws, "n_draws")
        model = self._training_model()
        n = model.loadings.mean.shape[0]
        s = check_size_factors(size_factors, n)
        if s is None:
            s = self.training_size_factors_
        if s is not None and not model.likelihood.is_count:
            raise ValueError("size_factors are only used by count likelihoods")
        rng = check_random_state(random_state)
        gen = self._generator(rng.randint(2**31 - 1))
        data_rng = np.random.default_rng(rng.randint(2**31 - 1))
        out = np.empty((n_draws, n, self.n_features_in_))
        with torch.no_grad():
            for d in range(n_draws):
                mean = model.likelihood.mean(model.sample_eta(gen)).double().cpu().numpy()
                if s is not None:
                    mean = mean * s[:, None]
                out[d] = model.likelihood.sample(mean, data_rng)
        return out

    def save(self, path) -> None:
        """Save the fitted estimator to ``path``, in a format that runs no code on load.

        The file holds tensors, numbers and JSON only: the parameters, the
        fitted attributes (feature names and history included), the model
        state, and the spfa and file-format versions (see
        :mod:`spfa.persistence`). Read it with :meth:`load`. Pickling also works,
        but a pickle can execute code when loaded: share saved files instead.
        """
        check_is_fitted(self)
        save_estimator(self, path)

    @classmethod
    def load(cls, path, *, device="cpu"):
        """Load an estimator written by :meth:`save`.

        Parameters
        ----------
        path : str or path
        device : {"cpu", "cuda", "auto", ...}, default="cpu"
            Where later ``transform`` / ``score`` calls run; a model fitted on
            a GPU loads on a CPU-only machine.

        Returns
        -------
        SparseFactorAnalysis

        Raises
        ------
        ValueError
            If the file is corrupt, not an spfa model, written by a newer file
            format, or holds anything but tensors and plain data (a file
            crafted to run code on load is refused, not run).
        """
        return load_estimator(cls, path, device=device)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = True
        try:
            tags.input_tags.positive_only = self._make_likelihood().is_count
        except ValueError:
            pass
        return tags
