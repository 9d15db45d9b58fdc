"""The scikit-learn estimator: parameters, validation, conversion; the work is in
:mod:`spfa.fitting`."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import fitting
from ._validation import (
    check_covariates,
    check_data,
    check_positive_float,
    check_positive_int,
    check_size_factors,
    check_start,
    clear_fitted,
    default_size_factors,
    library_size_factors,
    resolve_device,
    view_library_sizes,
    view_size_factors,
    warn_missing_size_factors,
)
from .distributed import SINGLE, current_group
from .expectation import get_expectation
from .likelihoods import get_likelihood, view_likelihood
from .persistence import load_estimator, save_estimator
from .posterior import Posterior, top_features
from .priors import resolve_priors
from .progress import verbosity

__all__ = ["SparseFactorAnalysis"]

#: Adam's steps are this many units at most (in log coordinates, a factor e^1000): a larger
#: learning rate cannot be meant, and overflows float32 in the optimiser
MAX_LEARNING_RATE = 1e3


def _check_ranks_agree(
    group, n_features: int, s, C, settings, structure: dict, likelihood=None
) -> None:
    """A data-parallel fit's ranks must fit the same features with the same model, and
    all give (or all not give) size factors and covariates: otherwise their collectives
    would not line up. A ValueError on every rank naming the first disagreement."""
    if not group.parallel:
        return
    params = repr(sorted((k, repr(v)) for k, v in structure.items()))
    checks = (
        ("n_features", n_features),
        ("n_components", settings.n_components),
        ("batch_size", settings.batch_size or 0),
        ("max_iter", settings.max_iter),
        ("whether size_factors are given", int(s is not None)),
        ("the number of covariates", 0 if C is None else C.shape[1]),
        ("the model's parameters (likelihood, link, prior, ...)", zlib.crc32(params.encode())),
        ("feature_groups", zlib.crc32("\x00".join(_groups(likelihood)).encode())),
    )
    lows, highs = group.bounds([v for _, v in checks])
    for (what, _), a, b in zip(checks, lows, highs, strict=True):
        if a != b:
            raise ValueError(
                f"the ranks of a data-parallel fit disagree on {what}; every rank must fit "
                "the same features with the same parameters, and give size_factors and "
                "covariates alike"
            )


def _groups(likelihood) -> list[str]:
    views = getattr(likelihood, "views", None)
    return [] if views is None else views.groups.tolist()


class SparseFactorAnalysis(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse factor analysis with learned sparse priors on loadings and factors.

    Fits ``X ~ Lik(s h(L F^T + b))`` with variational posteriors on the
    loadings ``L`` (``n x k``) and factors ``F`` (``p x k``) from a prior
    family whose hyperparameters are learned per factor and side, by
    maximising a reparameterised ELBO with Adam.

    Parameters
    ----------
    n_components : int, default=30
        Number of factors ``k``; those the data do not support are pruned, so a
        generous ``k`` costs time rather than accuracy (chosen on real counts: see the
        README). At most ``min(n_samples, n_features)``.
    prior : str or dict, default="point_normal"
        Prior family (:data:`spfa.priors.PRIORS`) of both ``L`` and ``F``, or
        ``{"loadings": name, "factors": name}``: ``"point_normal"``
        (spike-and-slab), ``"point_exponential"`` (point mass plus exponential:
        non-negative, parts-based) or ``"normal_mixture"`` (adaptive
        shrinkage: a scale mixture of normals, no exact zeros).
    likelihood : str, Likelihood or dict, default="poisson"
        A name in :data:`spfa.likelihoods.LIKELIHOODS` or an instance; or one per view,
        ``{view: name}``, for a multi-view fit (``fit(X, feature_groups=g)``).
    link : {"exp", "softplus", "sigmoid"}, Link or dict, default="exp"
        Link ``h`` of the count likelihoods; the Gaussian uses the identity.
        Under ``"exp"`` the Poisson ELBO is exact (no Monte Carlo noise). A dict gives
        each view its own (views it leaves out take ``"exp"``).
    expectation : {"mc", "quadrature"}, default="mc"
        ``E_q[log p(x | eta)]`` by Monte Carlo draws (local
        reparameterisation) or Gauss--Hermite quadrature (:mod:`spfa.expectation`).
    n_mc_samples, n_quadrature_nodes : int, default=1, 8
        Monte Carlo draws per step; Gauss--Hermite nodes per entry.
    max_iter : int, default=3000
        Passes over the data (optimiser steps in full-batch training).
    tol : float, default=1e-4
        Relative ELBO change between 50-step windows (or twice its MC error) that
        is a plateau; the first plateau divides the step size, the second ends the fit.
    learning_rate : float, default=0.05
    batch_size : int or None, default=None
        Rows per step of stochastic VI; None uses all rows each step. Sparse
        input stays compressed on the device.
    fit_intercept : bool, default=True
        Per-feature intercept ``b`` with a learned normal prior.
    library_size : bool, default=True
        Count likelihoods: rows given no ``size_factors`` get their library size
        (row total) over the training rows' mean (half a count for an empty row);
        False: size factor 1.
    device : {"auto", "cpu", "cuda", ...} or torch.device, default="auto"
        An unavailable device is a ``ValueError`` (no silent fallback).
    random_state : int, RandomState or None, default=None
    log_dir : str or path, default=None
        Write a TensorBoard run here (``loss/...``, ``prior/...``).
    verbose : bool or {0, 1, 2}, default=False
        0/False: silent. 1/True: a progress bar on stderr for fits and transforms
        that last over a second, with the ELBO per entry, and the ``"spfa"``
        logger's INFO records (start repairs, pruning). 2: also DEBUG records (the
        ELBO per window). See :mod:`spfa.progress`.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Posterior mean of the factors, ``E[F]^T``. Under the sign-symmetric priors
        (point-normal, normal mixture) each factor's largest ``|E[F]|`` entry is
        positive (its loadings are negated with it; the fit is unchanged).
    loadings_ : ndarray of shape (n_samples, n_components)
        Posterior mean of the training loadings, ``E[L]``.
    loadings_pip_, factors_pip_, loadings_sd_, factors_sd_, loadings_lfsr_, factors_lfsr_ :
        ndarray of shape (n_samples | n_features, n_components): posterior
        inclusion probability (1 for a family without a point mass), sd and
        local false sign rate, of the posteriors widened for the other side's
        uncertainty. Intervals: :meth:`factors_posterior`.
    loadings_propagated_var_, factors_propagated_var_ : ndarray or None
        Of shape (n_samples | n_features, n_components).
        The variance each normal component of ``q(L)`` (``q(F)``) gains from the
        uncertainty of ``F`` (``L``): :mod:`spfa.linear_response`. None where it is not
        widened: a point-exponential prior, or a widening that was not finite or was
        interrupted (the posteriors then stay mean-field).
    loadings_prior_<key>_, factors_prior_<key>_ : ndarray of shape (n_components, ...)
        The learned prior per factor: ``pi`` and ``scale`` for the point
        families, ``scale`` and ``weights`` for the normal mixture.
    intercept_, intercept_prior_mean_, intercept_prior_scale_ : ndarray (p,), float, float
    active_components_ : ndarray of bool, shape (n_components,)
        False for a factor pruned after training; pruned factors come last.
    n_effective_components_ : int
    elbo_contribution_ : ndarray of shape (n_components,)
        ELBO lost (nats) without each factor; factors are ordered by it. A minibatch fit
        of more than 2^23 entries estimates it from a random subset of its batches. NaN
        where a Ctrl-C stopped the fit while it first pruned and ranked the factors: they
        are then kept as trained, in training order and sign.
    explained_variance_ratio_ : ndarray of shape (n_components,)
        Gaussian only (NaN if a Ctrl-C stopped its pass over the data).
    noise_variance_, dispersion_, inverse_dispersion_, zero_inflation_, ... :
        The likelihood's fitted nuisance parameters.
    covariate_coef_, covariate_coef_sd_ : ndarray of shape (n_features, n_covariates)
        Posterior mean and sd of the covariates' effects ``B`` (fits given ``covariates``).
    covariate_prior_scale_ : ndarray of shape (n_covariates,)
        Each covariate's learned prior sd of its effects.
    n_covariates_ : int
        The number of covariates (0 without).
    view_names_, feature_groups_ : ndarray of str, shape (n_views,) and (n_features,)
        A multi-view fit's views, and each feature's.
    view_elbo_contribution_ : ndarray of shape (n_views, n_components)
        A multi-view fit's ELBO contribution of each factor in each view: what the view's
        expected log-likelihood, less its factors' KL, loses without the factor (0 for a
        pruned factor; NaN if a Ctrl-C stopped its measurement). ``factors_prior_<key>_``
        are then ``(n_components, n_views)``, ``training_size_factors_``
        ``(n_samples, n_views)`` (each count view's library sizes; 1 for the others), and
        per-feature nuisance parameters are NaN on the views without them.
    training_covariates_ : ndarray of shape (n_samples, n_covariates) or None
    training_size_factors_ : ndarray of shape (n_samples,) or None
    library_size_mean_ : float or None
        The training rows' mean library size when their size factors came from it.
    state_dict_ : dict of Tensor
        The fitted torch module's state (:meth:`get_model` rebuilds it).
    elbo_, n_iter_ : float, int
        ELBO of the fitted model (pruned factors off) on the training data, with
        fixed-seed draws where it has no closed form (a minibatch fit of more than
        2^23 entries estimates it from a random subset of its batches); passes. After a
        Ctrl-C during the first pruning, the last ELBO training recorded (with Monte Carlo
        noise where the ELBO has no closed form).
    n_rollbacks_ : int
        Windows of training that went non-finite and were rolled back with a smaller
        step (logged at INFO with what went non-finite).
    history_ : dict of lists
        ``"elbo"``, ``"err"``, ``"kl_l"``, ``"kl_f"``, ``"kl_b"`` per pass,
        and the learned priors per window (``"step"``).
    device_ : torch.device
    n_features_in_, feature_names_in_ : int, ndarray of str

    Notes
    -----
    *Data-parallel fits.* When a ``torch.distributed`` process group of more than
    one rank is initialised (e.g. under ``torchrun``), ``fit(X)`` treats ``X`` as
    this rank's rows and fits one model of every rank's rows
    (:mod:`spfa.distributed`): the global parameters (``components_``, priors,
    intercept, nuisance parameters, ``elbo_``, ``history_``) come out identical on
    every rank, while ``loadings_`` and the other per-sample attributes are this
    rank's rows. Every rank must call ``fit`` with the same parameters and
    features; ``random_state`` is taken from rank 0, ``log_dir`` is written by
    rank 0 only, library sizes are scaled by every rank's mean, and ``batch_size``
    gives every rank the number of batches the largest rank needs. Each rank
    validates its own rows (at least two, with the checks of one process); a
    rank's bad input, or ranks that disagree on the features, the parameters or
    whether they give ``size_factors`` and ``covariates``, is a ``ValueError`` on
    every rank. On GPUs (nccl) each process must first select its own device
    (``torch.cuda.set_device(local_rank)``) and pass ``device="cuda"``. A Ctrl-C
    reaches each process on its own: under ``torchrun`` the launcher stops them all.
    ``transform``, ``score`` and the rest work on the rows they are given, in
    this process.

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
        n_components=30,
        *,
        prior="point_normal",
        likelihood="poisson",
        link="exp",
        expectation="mc",
        n_mc_samples=1,
        n_quadrature_nodes=8,
        max_iter=3000,
        tol=1e-4,
        learning_rate=0.05,
        batch_size=None,
        fit_intercept=True,
        library_size=True,
        device="auto",
        random_state=None,
        log_dir=None,
        verbose=False,
    ):
        self.n_components = n_components
        self.prior = prior
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
        self.library_size = library_size
        self.device = device
        self.random_state = random_state
        self.log_dir = log_dir
        self.verbose = verbose

    # ------------------------------------------------------------- validation
    #: parameters that shape the fitted model: changing them after ``fit`` (``set_params``)
    #: leaves a model that no longer matches the fitted state
    STRUCTURAL_PARAMS = (
        "n_components",
        "likelihood",
        "link",
        "prior",
        "fit_intercept",
        "library_size",
    )

    def _structure(self) -> dict:
        params = self.get_params(deep=False)
        return {name: params[name] for name in self.STRUCTURAL_PARAMS}

    def _check_fitted(self) -> None:
        """Fitted, and with the parameters the fit had (a ValueError names a change)."""
        check_is_fitted(self)
        fitted = getattr(self, "fitted_params_", None)  # None in files saved before it
        if fitted is None:
            return
        now = self._structure()
        changed = [name for name in fitted if name in now and now[name] != fitted[name]]
        if changed:
            diffs = ", ".join(f"{n}={fitted[n]!r} at fit, {now[n]!r} now" for n in changed)
            raise ValueError(
                f"parameters changed since fit ({diffs}): the fitted model no longer matches "
                "them; refit, or set them back"
            )

    def _make_likelihood(self, feature_groups=None, fitting=False):
        """The likelihood; for a likelihood per view (a dict), over the views of
        ``feature_groups`` (in ``fit``: ``fitting=True``, where they must be given) or of
        the fitted ``feature_groups_``."""
        if not isinstance(self.likelihood, Mapping):
            if feature_groups is not None:
                raise ValueError(
                    "feature_groups names each feature's view: give likelihood as a dict "
                    "{view: likelihood} for a multi-view fit"
                )
            return get_likelihood(self.likelihood, self.link)
        if feature_groups is None and not fitting:
            feature_groups = getattr(self, "feature_groups_", None)
        if feature_groups is None:
            raise ValueError(
                "a likelihood per view (a dict) needs fit(X, feature_groups=g), g naming "
                "each feature's view"
            )
        return view_likelihood(self.likelihood, self.link, feature_groups)

    def _settings(self, device=None, group=SINGLE) -> fitting.FitSettings:
        get_expectation(self.expectation, 1)  # ValueError for an unknown rule
        return fitting.FitSettings(
            n_components=check_positive_int(self.n_components, "n_components"),
            priors=resolve_priors(self.prior),
            fit_intercept=bool(self.fit_intercept),
            expectation=self.expectation,
            n_mc_samples=check_positive_int(self.n_mc_samples, "n_mc_samples"),
            n_quadrature_nodes=check_positive_int(self.n_quadrature_nodes, "n_quadrature_nodes"),
            max_iter=check_positive_int(self.max_iter, "max_iter"),
            tol=check_positive_float(self.tol, "tol", allow_zero=True),
            learning_rate=check_positive_float(
                self.learning_rate, "learning_rate", maximum=MAX_LEARNING_RATE
            ),
            batch_size=None
            if self.batch_size is None
            else check_positive_int(self.batch_size, "batch_size"),
            device=device or resolve_device(self.device),
            log_dir=self.log_dir,
            verbose=verbosity(self.verbose),
            group=group,
        )

    def _fit_data(self, X, size_factors, covariates, likelihood, settings):
        """What ``fit`` fits: validated ``X`` (dense with NaN, CSR or rows on disk: never
        densified), size factors (given, or from library sizes) and covariates. Across
        the ranks of a data-parallel fit each rank validates its own rows, every rank
        raises if any does, the ranks must agree on what they fit, and library sizes are
        scaled by every rank's mean."""
        group = settings.group

        def validated():
            X_ = check_data(self, X, reset=True, likelihood=likelihood)
            s_ = check_size_factors(size_factors, X_.shape[0], likelihood)
            return X_, s_, check_covariates(covariates, X_.shape[0])

        X, s, C = group.agree(validated)
        _check_ranks_agree(group, X.shape[1], s, C, settings, self._structure(), likelihood)
        library = s is None and self.library_size and likelihood.positive_mean
        if group.parallel and library:  # against every rank's mean
            lib = view_library_sizes(X, likelihood)
            total, rows = group.sum(lib.sum(0), X.shape[0])
            if not np.all(total > 0):
                raise ValueError(
                    "every row of every rank's X is empty, so library sizes cannot scale the mean"
                )
            mean = np.asarray(total / rows, dtype=float)
            self.library_size_mean_ = float(mean) if mean.ndim == 0 else mean
            return X, library_size_factors(X, self.library_size_mean_, lib)[0], C
        s, self.library_size_mean_ = default_size_factors(X, s, likelihood, self.library_size)
        return X, s, C

    def _data(self, X, size_factors, *, likelihood):
        """New rows: validated ``X`` and size factors (given, or from library sizes on the
        training scale)."""
        X = check_data(self, X, reset=False, likelihood=likelihood)
        s = check_size_factors(size_factors, X.shape[0], likelihood)
        mean = getattr(self, "library_size_mean_", None)  # None in files saved before it
        warn_missing_size_factors(self.training_size_factors_, s, mean is not None)
        return X, default_size_factors(X, s, likelihood, mean is not None, mean)[0]

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        X,
        y=None,
        *,
        size_factors=None,
        covariates=None,
        feature_groups=None,
        init_loadings=None,
        init_factors=None,
    ):
        """Fit the model to ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix, DataFrame} of shape (n_samples, n_features)
            Data; NaN marks a missing entry. Counts for the count likelihoods.
        y : Ignored
        size_factors : array-like of shape (n_samples,), default=None
            Positive per-sample scale of the mean (count likelihoods); None: library
            sizes (``library_size=True``) or 1.
        covariates : array-like of shape (n_samples, c), default=None
            Known covariates (a one-hot batch, continuous covariates): the model is
            ``eta = L F^T + C B^T + b`` with per-feature effects ``B`` (``(p, c)``, a
            normal prior per covariate, learned: ``covariate_coef_``), so that the
            factors describe the variation beyond them. New rows then need theirs.
        feature_groups : array-like of str, shape (n_features,), default=None
            Each feature's view, for a likelihood per view (``likelihood`` a dict
            ``{view: likelihood}``): every view has its own likelihood, link and
            nuisance parameters, the loadings are shared, and each factor's prior on the
            factors is learned per view (``factors_prior_pi_`` is ``(k, n_views)``), so
            that a factor can be active in one view and absent in another
            (``view_elbo_contribution_``).
        init_loadings, init_factors : array-like of shape (n_samples | n_features, n_components)
            Starting posterior means of ``L`` and ``F`` in place of spfa's own
            (a weighted SVD); give both or neither.

        Returns
        -------
        self
        """
        previous = dict(vars(self))
        try:
            fit = self._fit(
                X, size_factors, covariates, init_loadings, init_factors, feature_groups
            )
        except BaseException:
            # a fit that fails (or a second Ctrl-C) leaves the previous fit as it was
            vars(self).clear()
            vars(self).update(previous)
            raise
        if fit.result.interrupted:
            # the fit keeps the last checked state, and the interrupt goes on to the caller
            raise KeyboardInterrupt(
                f"SparseFactorAnalysis.fit {fit.result.message}; the estimator holds that fit"
            )
        if not fit.result.converged and not fit.result.message:
            advice = "increase max_iter or learning_rate"
            if fit.result.n_rollbacks:
                advice = (
                    f"{fit.result.n_rollbacks} window(s) went non-finite and were rolled back "
                    "with a smaller step; lower learning_rate or increase max_iter"
                )
            warnings.warn(
                f"SparseFactorAnalysis stopped at max_iter={self.max_iter} before the "
                f"ELBO converged; {advice}",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _fit(
        self, X, size_factors, covariates, init_loadings, init_factors, feature_groups=None
    ) -> fitting.Fit:
        group = current_group()
        settings = self._settings(group=group)
        # every rank raises if any rank's views are bad (none waits in a collective)
        likelihood = group.agree(lambda: self._make_likelihood(feature_groups, fitting=True))
        clear_fitted(self)  # a refit (e.g. with another prior) leaves nothing stale
        X, s, C = self._fit_data(X, size_factors, covariates, likelihood, settings)
        n_rows = int(group.sum(X.shape[0]))  # every rank's
        start = group.agree(
            lambda: check_start(
                init_loadings, init_factors, *X.shape, settings.n_components, n_total=n_rows
            )
        )
        self.device_ = settings.device
        rng = check_random_state(self.random_state)
        if group.parallel:  # every rank draws the start's and the fit's randomness alike
            rng = np.random.RandomState(group.seed(rng.randint(2**31 - 1)))
        fit = fitting.fit_model(X, s, likelihood, settings, rng, start, C)
        if fit.result.interrupted and not fit.result.history["elbo"]:
            raise KeyboardInterrupt(
                f"SparseFactorAnalysis.fit {fit.result.message}: no window was completed, "
                "so the estimator keeps its state from before the fit"
            )
        for name, value in fitting.fit_attributes(fit, X, group).items():
            setattr(self, name, value)
        self.training_size_factors_ = s
        self.training_covariates_ = C
        self.n_covariates_ = 0 if C is None else C.shape[1]
        self.fitted_params_ = self._structure()
        self._n_features_out = self.n_components
        return fit

    def fit_transform(self, X, y=None, **fit_params):
        """Fit, then return the posterior mean loadings ``E[L]`` of ``X``, ``(n, k)``."""
        return self.fit(X, **fit_params).loadings_.copy()

    def get_model(self):
        """The fitted :class:`spfa.model.SparseFactorModel` (training rows), on ``device_``."""
        self._check_fitted()
        n = self.state_dict_["loadings.mean"].shape[0]
        settings = self._settings(self.device_)
        likelihood = self._make_likelihood()
        return fitting.build_model(self.state_dict_, n, self.n_features_in_, likelihood, settings)

    # -------------------------------------------------------------- new rows
    def _fit_rows(self, X, size_factors, covariates=None):
        self._check_fitted()
        likelihood = self._make_likelihood()
        X, s = self._data(X, size_factors, likelihood=likelihood)
        C = check_covariates(covariates, X.shape[0], getattr(self, "n_covariates_", 0))
        settings = self._settings(self.device_)
        rng = check_random_state(self.random_state)
        fit = fitting.fit_rows(self.state_dict_, X, s, likelihood, settings, rng, C)
        return fit, settings

    def transform(self, X, *, size_factors=None, covariates=None):
        """``E[L]`` of new rows, ``(n, k)``: their ``q(L)`` is fitted, all else held fixed
        (rows of a fit with covariates need theirs)."""
        (model, _, _), _ = self._fit_rows(X, size_factors, covariates)
        return model.loadings.posterior().mean

    def score(self, X, y=None, *, size_factors=None, covariates=None):
        """ELBO per observed entry of ``X`` (``q(L)`` fitted as in :meth:`transform`),
        with fixed-seed Monte Carlo draws. Held-out scores: :mod:`spfa.heldout`."""
        (model, data, _), settings = self._fit_rows(X, size_factors, covariates)
        return fitting.score_rows(model, data, settings)

    # -------------------------------------------------------------- summaries
    def factors_posterior(self) -> Posterior:
        """Posterior of ``F``, ``(n_features, n_components)``: mean, sd, pip, lfsr, intervals
        (widened for the loadings' uncertainty: :mod:`spfa.linear_response`)."""
        extra = getattr(self, "factors_propagated_var_", None)
        return self.get_model().factors.posterior(extra)

    def loadings_posterior(self, X=None, *, size_factors=None, covariates=None) -> Posterior:
        """Posterior of ``L``: of the training rows, or of new rows ``X`` (fitted as in
        :meth:`transform`); widened for the factors' uncertainty
        (:mod:`spfa.linear_response`) where the training rows' posterior is."""
        if X is None:
            if size_factors is not None or covariates is not None:
                raise ValueError("size_factors and covariates are only used with new rows X")
            extra = getattr(self, "loadings_propagated_var_", None)
            return self.get_model().loadings.posterior(extra)
        (model, data, _), _ = self._fit_rows(X, size_factors, covariates)
        widened = getattr(self, "loadings_propagated_var_", None) is not None
        return fitting.rows_posterior(model, data, widen=widened)

    def top_features(self, n_top=10, *, min_pip=0.5) -> list[dict]:
        """The features of each kept factor with PIP >= ``min_pip``, ranked by
        ``|E[f_jk]|``: records ``component, rank, feature, index, pip, mean, sd, lfsr``
        (see :func:`spfa.posterior.top_features`)."""
        self._check_fitted()
        default = np.array([f"x{j}" for j in range(self.n_features_in_)], dtype=object)
        names = getattr(self, "feature_names_in_", default)
        post = self.factors_posterior()
        return top_features(post, self.active_components_, names, n_top, min_pip)

    def inverse_transform(self, Z, *, covariates=None):
        """Expected data ``h(Z E[F]^T + C E[B]^T + b)`` on the mean scale (size factor 1),
        ``(n, p)``. Without ``covariates`` (of a fit that had them) the covariates' effect
        is left out: the mean with the covariates at 0 (for a one-hot batch, corrected
        for it)."""
        self._check_fitted()
        Z = np.asarray(Z, dtype=np.float64)
        if Z.ndim != 2 or Z.shape[1] != self.n_components:
            raise ValueError(f"Z must have shape (n_samples, {self.n_components}), got {Z.shape}")
        fitted = getattr(self, "n_covariates_", 0)
        C = None
        if covariates is not None:
            C = check_covariates(covariates, Z.shape[0], fitted)
        lik = fitting.fitted_likelihood(
            self.state_dict_, self.n_features_in_, self._make_likelihood(), self._settings("cpu")
        )
        eta = Z @ self.components_ + self.intercept_
        if C is not None:
            eta = eta + C @ self.covariate_coef_.T
        with torch.no_grad():
            return lik.double().mean(torch.as_tensor(eta)).numpy()

    def sample(self, n_draws=1, *, size_factors=None, covariates=None, random_state=None):
        """Posterior predictive data sets of the training rows, ``(n_draws, n, p)``:
        ``L, F, B, b`` drawn jointly from ``q``, data from the likelihood, scaled by
        ``size_factors`` and at ``covariates`` (default: the training ones)."""
        model = self.get_model()
        n_draws = check_positive_int(n_draws, "n_draws")
        s = check_size_factors(size_factors, model.loadings.m, model.likelihood)
        if s is not None and model.likelihood.views is not None:
            s = view_size_factors(s, model.likelihood)
        s = self.training_size_factors_ if s is None else s
        fitted = getattr(self, "n_covariates_", 0)
        C = getattr(self, "training_covariates_", None)
        if covariates is not None:
            C = check_covariates(covariates, model.loadings.m, fitted)
        rng = check_random_state(random_state)
        return fitting.sample_data(model, s, n_draws, self.n_features_in_, rng, C)

    # ------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Save the fit to ``path`` in a format that runs no code on load
        (:mod:`spfa.persistence`); read it with :meth:`load`."""
        self._check_fitted()
        save_estimator(self, path)

    @classmethod
    def load(cls, path, *, device="cpu"):
        """Load an estimator written by :meth:`save`, onto ``device``; ValueError if the
        file is corrupt, foreign, of a newer format or holds anything but plain data."""
        return load_estimator(cls, path, device=device)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = True
        try:
            tags.input_tags.positive_only = self._make_likelihood().positive_mean
        except ValueError:
            pass
        return tags
