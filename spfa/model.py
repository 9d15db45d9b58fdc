"""The torch module: variational posteriors on L and F, intercept, likelihood, ELBO.

    x_ij | eta_ij ~ Lik(s_i h(eta_ij), theta_j),   eta = L F^T + C B^T + 1 b^T

with a prior family (:mod:`spfa.priors`) on ``L`` (``[n, k]``) and on ``F``
(``[p, k]``) and,
optionally, a per-feature intercept ``b_j ~ N(b0, 1/tau_b)`` whose prior is
learned (so it shrinks to ``b0`` when the features share a baseline), and
effects ``B`` (``[p, c]``) of known covariates ``C`` (``[n, c]``, given with the
data; :class:`spfa.priors.CovariateEffects`). Under the fully factorised ``q``
the linear predictor has moments (DESIGN.md)::

    E[eta] = E[L] E[F]^T + C E[B]^T + E[b]
    V[eta] = (V[L] + E[L]^2) V[F]^T + V[L] (E[F]^2)^T + C^2 V[B]^T + V[b]

(the covariates enter as known loadings, of variance 0, whose factors are ``B``),
and the ELBO is ``sum_ij E_q[log p(x_ij | eta_ij)] - KL_L - KL_F - KL_b`` over the
observed entries, ``KL_b`` counting the intercept's and the covariate effects' KL.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .expectation import Expectation
from .likelihoods import Likelihood
from .linear_predictor import LinearPredictor
from .priors import CovariateEffects, NormalEffect, ViewFamily, get_prior

__all__ = ["ELBOTerms", "SparseFactorModel"]


@dataclass
class ELBOTerms:
    """The ELBO's terms, kept apart for logging (scalars)."""

    #: expected log-likelihood of the observed entries (TensorBoard ``loss/err``)
    err: torch.Tensor
    #: KL divergence of the loadings' posterior from their prior
    kl_l: torch.Tensor
    #: KL divergence of the factors' posterior from their prior
    kl_f: torch.Tensor
    #: KL divergence of the per-feature effects' posterior from their prior: the
    #: intercept's and the covariate effects' (0 without either)
    kl_b: torch.Tensor
    #: a multi-view fit's ``err`` split by view, ``[n_views]`` (None otherwise)
    err_by_view: torch.Tensor | None = None

    @property
    def elbo(self) -> torch.Tensor:
        return self.err - self.kl_l - self.kl_f - self.kl_b

    def stacked(self) -> torch.Tensor:
        """``[elbo, err, kl_l, kl_f, kl_b]`` as one detached tensor (one sync to read)."""
        return torch.stack([self.elbo, self.err, self.kl_l, self.kl_f, self.kl_b]).detach()

    NAMES = ("elbo", "err", "kl_l", "kl_f", "kl_b")


class SparseFactorModel(torch.nn.Module):
    """Sparse factor model ``x ~ Lik(s h(L F^T + b))``.

    Parameters
    ----------
    n_samples, n_features, n_components : int
        ``n``, ``p`` and ``k``.
    likelihood : Likelihood
        Observation model (owns its nuisance parameters).
    fit_intercept : bool
        Learn a per-feature intercept ``b`` (``[p]``) with an empirical-Bayes
        normal prior; otherwise ``b = 0``.
    loadings_prior, factors_prior : str
        Names of the prior families of ``L`` and ``F`` (:data:`spfa.priors.PRIORS`).
    n_covariates : int
        ``c``: the number of known covariates whose effects ``B`` are learned (0: none).
    """

    def __init__(
        self,
        n_samples: int,
        n_features: int,
        n_components: int,
        likelihood: Likelihood,
        fit_intercept: bool = True,
        loadings_prior: str = "point_normal",
        factors_prior: str = "point_normal",
        n_covariates: int = 0,
    ):
        super().__init__()
        self.loadings = get_prior(loadings_prior)(n_samples, n_components)
        views = likelihood.views  # a multi-view likelihood's features
        if views is None:
            self.factors = get_prior(factors_prior)(n_features, n_components)
        else:  # a prior per view and factor
            self.factors = ViewFamily(get_prior(factors_prior), views, n_components)
        self.likelihood = likelihood
        self.fit_intercept = fit_intercept
        self.intercept = NormalEffect(n_features) if fit_intercept else None
        self.covariate_effects = (
            CovariateEffects(n_features, n_covariates) if n_covariates else None
        )
        likelihood.initialize_rows(n_samples)
        self.sparse_rows = False
        self._fixed = None  # see fixed_globals
        #: this process's share of the global parameters' KL: ``1 / size`` on each of
        #: the ranks of a data-parallel fit (:mod:`spfa.distributed`), whose ELBO terms
        #: then add up over the ranks to the whole ELBO
        self.global_share = 1.0

    @property
    def sparse_rows(self) -> bool:
        """Gather a batch's per-sample parameters (loadings, and the likelihood's
        ``row_parameters``) with sparse gradients, for minibatch training with
        SparseAdam; False: dense gradients, for Adam over all rows."""
        return self.likelihood.sparse_rows

    @sparse_rows.setter
    def sparse_rows(self, value: bool) -> None:
        self.likelihood.sparse_rows = bool(value)

    def row_parameters(self) -> list[torch.nn.Parameter]:
        """Every per-sample parameter: the loadings' and the likelihood's."""
        own = [self.likelihood.get_parameter(name) for name in self.likelihood.row_parameters]
        return self.loadings.variational_parameters() + own

    def location_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters in ``eta``'s units: the factors' and the intercept's locations
        (the loadings are unitless)."""
        effects = [e for e in (self.intercept, self.covariate_effects) if e is not None]
        own = [getattr(e, name) for e in effects for name in e.location_parameter_names]
        return self.factors.location_parameters() + own

    def linear_predictor(
        self, rows: torch.Tensor | None = None, covariates: torch.Tensor | None = None
    ) -> LinearPredictor:
        """``eta`` on the grid of all features (of all samples, or of the samples
        ``rows``, whose covariates are ``covariates``) in factored form: its moments
        are not built until asked for."""
        ml, vl = self._row_moments(rows, covariates)
        return LinearPredictor(ml, vl, *self._global_moments())

    def _row_moments(self, rows, covariates) -> tuple[torch.Tensor, torch.Tensor]:
        """The loadings' moments, and the covariates as known loadings of variance 0
        (zeros when none are given: the mean without the covariates' effect)."""
        ml, vl = self.loadings.moments(rows, sparse=self.sparse_rows)
        if self.covariate_effects is None:
            return ml, vl
        if covariates is None:
            covariates = ml.new_zeros((ml.shape[0], self.covariate_effects.n_covariates))
        covariates = covariates.to(ml.dtype)
        return torch.cat([ml, covariates], 1), torch.cat([vl, torch.zeros_like(covariates)], 1)

    def _global_moments(self) -> tuple:
        """``(mf, vf, mb, vb)``: the factors' moments, followed by the covariate effects'
        columns, and the intercept's (None without one), cached inside
        :meth:`fixed_globals`."""
        if self._fixed is not None:
            return self._fixed["moments"]
        mf, vf = self.factors.moments()
        if self.covariate_effects is not None:
            mc, vc = self.covariate_effects.moments()
            mf, vf = torch.cat([mf, mc], 1), torch.cat([vf, vc], 1)
        mb = vb = None
        if self.intercept is not None:
            mb, vb = self.intercept.moments()
        return mf, vf, mb, vb

    def _global_kl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(KL_F, KL_b)`` (``KL_b`` 0 without an intercept), cached inside
        :meth:`fixed_globals`."""
        if self._fixed is not None:
            return self._fixed["kl"]
        kl_f = self.factors.kl()
        kl_b = self.intercept.kl() if self.intercept is not None else kl_f.new_zeros(())
        if self.covariate_effects is not None:
            kl_b = kl_b + self.covariate_effects.kl()
        return kl_f, kl_b

    @contextlib.contextmanager
    def fixed_globals(self):
        """Within the block, the factors' and intercept's moments and KL are computed
        once and reused: for fitting rows with everything else held fixed (their
        parameters must not change inside the block). Nested blocks share the outer cache."""
        if self._fixed is not None:
            yield
            return
        with torch.no_grad():
            self._fixed = {"moments": self._global_moments(), "kl": self._global_kl()}
        try:
            yield
        finally:
            self._fixed = None

    def eta_moments(
        self,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``eta`` under ``q``.

        Parameters
        ----------
        rows, cols : Tensor of int, optional
            ``cols=None``: the grid ``[n, p]`` of all samples (or of the samples
            ``rows``); both given: the entries ``(rows[e], cols[e])``, ``[m]``,
            at a cost of ``m k`` rather than ``n p k``.
        covariates : Tensor, optional
            The covariates of those samples (``[n, c]``) or entries (``[m, c]``);
            None: the mean without the covariates' effect.
        """
        if cols is None:
            return self.linear_predictor(rows, covariates).moments()
        ml, vl = self._row_moments(rows, covariates)
        mf, vf, mb, vb = self._global_moments()
        mf, vf = mf[cols], vf[cols]
        mean = (ml * mf).sum(-1)
        var = ((vl + ml**2) * vf + vl * mf**2).sum(-1)
        if mb is not None:
            mean = mean + mb[cols]
            var = var + vb[cols]
        return mean, var

    def intercept_mean(self) -> torch.Tensor:
        """``E[b]``, ``[p]`` (zeros without an intercept)."""
        if self.intercept is None:
            return self.factors.active.new_zeros(self.factors.m)
        return self.intercept.mean

    def elbo_terms(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        log_s: torch.Tensor | None,
        expectation: Expectation,
        generator: torch.Generator | None = None,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
        scale: float = 1.0,
        cache: dict | None = None,
        covariates: torch.Tensor | None = None,
    ) -> ELBOTerms:
        """The ELBO's terms for data ``x``.

        Parameters
        ----------
        x : Tensor of shape (n, p), or (m,) with ``cols``
            Data, with missing entries set to any finite value; or the values
            of the entries ``(rows[e], cols[e])`` (e.g. the non-zeros of a
            sparse matrix, for a zero-truncated likelihood).
        mask : Tensor shaped like ``x``, or None
            1 for observed, 0 for missing entries; None if all are observed.
        log_s : Tensor of shape (n, 1) or None
            Log size factors of all samples.
        expectation : Expectation
            How ``E_q[log p(x | eta)]`` is estimated (ignored by closed forms).
        rows, cols : Tensor of int, optional
            See :meth:`eta_moments`.
        batch : Tensor of int, optional
            The samples of a minibatch: their loadings' KL is counted (all
            samples' when None).
        scale : float
            Factor on the batch's terms (expected log-likelihood and loadings'
            KL), e.g. the number of batches, so that the result is an unbiased
            estimate of the whole data set's ELBO; the factors' and intercept's
            KL are counted once (``global_share`` of it on each rank of a
            data-parallel fit).
        cache : dict, optional
            Kept with the batch ``x`` between calls: where a likelihood keeps
            what depends on the data alone (e.g. ``sum lgamma(x + 1)``).
        covariates : Tensor of shape (n, c), optional
            The covariates of all samples (indexed by ``rows`` like ``log_s``).
        """
        if covariates is not None and rows is not None:
            covariates = covariates[rows]
        if log_s is not None and rows is not None:
            log_s = log_s[rows]
        if log_s is not None and cols is not None:
            log_s = log_s.squeeze(-1)
        total = by_view = None
        if cols is None:
            eta = self.linear_predictor(rows, covariates)
            total = self.likelihood.grid_expected_log_prob(x, mask, eta, log_s, cache, rows)
        if total is None:
            mean, var = eta.moments() if cols is None else self.eta_moments(rows, cols, covariates)
            ll = self.likelihood.expected_log_prob(
                x, mean, var, log_s, expectation, generator, rows, cols
            )
            ll = ll if mask is None else ll * mask
            views = self.likelihood.views
            if views is None:
                total = ll.sum()
            else:  # summed per view as well, for each view's share of the ELBO
                by_view = _sum_by_view(ll, views, cols)
                total = by_view.sum()
        kl_l = self.loadings.kl(batch, sparse=self.sparse_rows)
        kl_f, kl_b = self._global_kl()
        if self.global_share != 1.0:
            kl_f, kl_b = self.global_share * kl_f, self.global_share * kl_b
        by_view = None if by_view is None else scale * by_view
        return ELBOTerms(scale * total, scale * kl_l, kl_f, kl_b, by_view)

    @torch.no_grad()
    def sample_eta(
        self,
        generator: torch.Generator | None = None,
        rows: torch.Tensor | None = None,
        row_generator: torch.Generator | None = None,
        covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draw of ``eta = L F^T + C B^T + b`` with ``L, F, B, b`` drawn jointly from
        ``q``.

        Parameters
        ----------
        generator : torch.Generator, optional
            Draws ``F`` and ``b`` (and ``L`` unless ``row_generator`` is given).
        rows : Tensor of int, optional
            Draw only these samples' loadings: ``eta`` is ``[len(rows), p]``
            rather than ``[n, p]``.
        row_generator : torch.Generator, optional
            Draws the loadings, so that one seed of ``generator`` gives the
            same ``F`` and ``b`` to every block of rows.
        covariates : Tensor of shape (len(rows) or n, c), optional
            The samples' covariates (None: ``eta`` without their effect).
        """
        loadings = self.loadings.sample(row_generator or generator, rows)
        eta = loadings @ self.factors.sample(generator).T
        if self.intercept is not None:
            eta = eta + self.intercept.sample(generator)
        if self.covariate_effects is not None:
            effects = self.covariate_effects.sample(generator)
            if covariates is not None:
                eta = eta + covariates.to(eta.dtype) @ effects.T
        return eta

    def fitted_mean(
        self, log_s: torch.Tensor | None = None, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Plug-in mean ``s h(E[eta])`` on the data scale, ``[n, p]``."""
        return self.likelihood.mean(self.linear_predictor(None, covariates).mean(), log_s)


def _sum_by_view(ll: torch.Tensor, views, cols: torch.Tensor | None) -> torch.Tensor:
    """The sums of the entries' terms ``ll`` (a grid ``[n, p]``, or entries ``[m]`` at
    features ``cols``) over each view's features, ``[n_views]``."""
    of = views.tensors(ll.device)["of"]
    per = ll.sum(0) if cols is None else ll
    at = of if cols is None else of[cols]
    return per.new_zeros(views.n_views).index_add(0, at, per)
