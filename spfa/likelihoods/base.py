"""The base class of the observation models and of the wrappers around them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..expectation import Expectation
from ..links import Link, get_link

__all__ = ["Likelihood", "LikelihoodWrapper"]


class Likelihood(torch.nn.Module):
    """Base class of the observation models ``p(x_ij | eta_ij)``.

    Parameters
    ----------
    link : str or Link, default="softplus"
        Maps the linear predictor to the mean. Ignored by :class:`Gaussian`.

    Notes
    -----
    Every elementwise method takes optional index tensors ``rows`` and
    ``cols`` saying which entries ``x`` holds, so that per-feature (and
    per-sample) parameters can be gathered:

    * ``cols=None`` -- ``x`` is a grid ``[n, p]`` over all features, of all
      samples (``rows=None``) or of the samples ``rows`` (``[n]``);
    * ``cols`` given -- ``x`` is a list of entries ``[m]``, entry ``e`` at
      sample ``rows[e]`` and feature ``cols[e]`` (``log_s`` is then ``[m]``).

    ``eta`` may carry leading dimensions (e.g. ``[S, n, p]`` or ``[S, m]``,
    draws or quadrature nodes), which broadcast against ``x``. ``log_s`` is
    the log size factor, ``[n, 1]`` on a grid, or ``None``. Helpers
    :meth:`per_feature` and :meth:`per_entry` do the gathering.

    A new likelihood subclasses this class, sets the class attributes below
    and implements :meth:`log_prob` (and :meth:`sample`, and for a count
    model :meth:`log_neg_log_prob_zero` and :meth:`scipy_distribution`, which
    the zero-inflated and zero-truncated wrappers build on);
    :func:`spfa.testing.check_likelihood` checks it in one call.
    """

    #: name under which the likelihood is registered in ``LIKELIHOODS``
    name: str = ""
    #: the model's support is the non-negative integers: the data are validated
    #: as counts
    integer_support: bool = False
    #: the mean is ``s h(eta)`` with a positive link ``h`` (checked on
    #: construction), so that size factors ``s`` apply
    positive_mean: bool = False
    #: the variance of ``x`` is a function of its mean (Poisson, NB): the start's
    #: SVD weights the working residual by it. False: a free per-feature noise
    #: variance (Gaussian), which the start learns from the SVD's residual, so
    #: the SVD itself is unweighted
    variance_from_mean: bool = True
    #: the unit of ``eta`` on these data: the optimiser steps the parameters in
    #: ``eta``'s units (the factors' and intercept's locations) this many times the
    #: learning rate, so a fit does not depend on the data's units. 1 for the count
    #: likelihoods, whose ``eta`` is on the link's (unitless) scale; the Gaussian sets
    #: the data's scale in :meth:`initialize`
    data_unit: float = 1.0
    #: False for a model of the non-zero entries only (zero-truncated): the
    #: estimator then fits the non-zero entries and nothing else
    observes_zeros: bool = True
    #: the partition of the features into views (:class:`spfa.views.FeatureViews`) of a
    #: likelihood per view (:class:`spfa.likelihoods.Views`); None for one likelihood
    views = None
    #: attribute paths (relative to this module, as in its ``state_dict``) of
    #: the parameters with one row per sample (``[n, d]``): like the loadings
    #: they are refitted for new samples and not shared
    row_parameters: tuple[str, ...] = ()
    #: gather per-sample parameters with sparse gradients (set by the model
    #: during minibatch training, so that SparseAdam updates only the batch's rows)
    sparse_rows: bool = False

    def __init__(self, link: str | Link = "softplus"):
        super().__init__()
        self.link = get_link(link)
        if self.positive_mean and not self.link.positive:
            raise ValueError(
                f"the {self.name} likelihood needs a positive link, not {self.link.name!r}"
            )

    @property
    def residual_weights(self) -> bool:
        """Whether the start's working weights are taken again from the low-rank fit's
        residual (a free noise variance is only known then); by default where the variance
        is not a function of the mean."""
        return not self.variance_from_mean

    # -- set-up ---------------------------------------------------------------
    def initialize(self, feature_mean: np.ndarray, feature_var: np.ndarray) -> None:
        """Create the per-feature nuisance parameters from data summaries.

        Parameters
        ----------
        feature_mean, feature_var : ndarray of shape (p,)
            Per-feature mean of ``x / s`` and variance of the residual from the
            initial low-rank fit, on the data scale.
        """

    def initialize_rows(self, n_samples: int) -> None:
        """Create the per-sample parameters listed in ``row_parameters`` (if any).

        Parameters
        ----------
        n_samples : int
        """

    def variance_function(self, mu: np.ndarray) -> np.ndarray:
        """Variance of ``x`` at mean ``mu``, used to weight the initialisation.

        Parameters
        ----------
        mu : ndarray of shape (..., p)
            Means on the data scale, one per feature in the last dimension.

        Returns
        -------
        ndarray of the shape of ``mu``
        """
        return np.ones_like(mu)

    # -- indexing helpers -----------------------------------------------------
    @staticmethod
    def per_feature(param: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        """A per-feature parameter ``[p]`` (or a scalar) on the grid or at the entries ``cols``."""
        return param if cols is None or param.dim() == 0 else param[cols]

    def per_entry(
        self,
        row_factors: torch.Tensor,
        feature_factors: torch.Tensor,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
    ) -> torch.Tensor:
        """Low-rank term ``U V^T`` (``U``: ``[n, d]``, ``V``: ``[p, d]``) at the entries.

        Returns ``[n, p]`` on the grid (``[len(rows), p]`` for given rows) and
        ``[m]`` at listed entries.
        """
        if rows is None:
            u = row_factors
        elif self.sparse_rows:
            u = F.embedding(rows, row_factors, sparse=True)
        else:
            u = row_factors[rows]
        if cols is None:
            return u @ feature_factors.T
        return (u * feature_factors[cols]).sum(-1)

    def log_mean(self, eta: torch.Tensor, log_s: torch.Tensor | None) -> torch.Tensor:
        """``log(s h(eta))``, stable for every finite ``eta`` (positive links only)."""
        log_mu = self.link.log(eta)
        return log_mu if log_s is None else log_mu + log_s

    # -- model ----------------------------------------------------------------
    def log_prob(
        self,
        x: torch.Tensor,
        eta: torch.Tensor,
        log_s: torch.Tensor | None,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Elementwise ``log p(x | eta)``.

        Parameters
        ----------
        x : Tensor of shape (n, p) or (m,)
        eta : Tensor, broadcastable with ``x`` (e.g. (S, n, p))
        log_s : Tensor of shape (n, 1) or (m,), or None
        rows, cols : LongTensor of shape (n,) or (m,), optional
            See the class notes.

        Returns
        -------
        Tensor of the broadcast shape of ``x`` and ``eta``
        """
        raise NotImplementedError

    def log_neg_log_prob_zero(
        self,
        eta: torch.Tensor,
        log_s: torch.Tensor | None,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``log(-log p(0 | eta))`` at the entries, in log space (count models).

        The one quantity from which the wrappers build what they need, e.g.
        ``log(1 - p(0)) = log1mexp_from_log(a)`` (:func:`spfa.special.log1mexp_from_log`)
        for zero truncation; it stays accurate where ``p(0)`` rounds to 1.

        Parameters
        ----------
        eta, log_s, rows, cols
            As in :meth:`log_prob`.

        Returns
        -------
        Tensor of the shape of ``eta``
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement log_neg_log_prob_zero()"
        )

    def mean(self, eta: torch.Tensor, log_s: torch.Tensor | None = None) -> torch.Tensor:
        """``E[x | eta]`` on the grid of all features, ``s h(eta)`` for most models.

        Parameters
        ----------
        eta : Tensor of shape (..., n, p)
        log_s : Tensor of shape (n, 1), optional

        Returns
        -------
        Tensor of shape (..., n, p)
        """
        mu = self.link(eta)
        return mu if log_s is None else mu * torch.exp(log_s)

    def expected_log_prob(
        self,
        x: torch.Tensor,
        eta_mean: torch.Tensor,
        eta_var: torch.Tensor,
        log_s: torch.Tensor | None,
        expectation: Expectation,
        generator: torch.Generator | None = None,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``E_q[log p(x | eta)]`` for ``eta ~ N(eta_mean, eta_var)``, elementwise.

        Estimated by the rule ``expectation`` (Monte Carlo draws or
        Gauss--Hermite nodes, :mod:`spfa.expectation`); a likelihood with a
        closed form overrides this.

        Parameters
        ----------
        x : Tensor of shape (n, p) or (m,)
        eta_mean, eta_var : Tensor of the shape of ``x``
        log_s, rows, cols
            As in :meth:`log_prob`.
        expectation : Expectation
        generator : torch.Generator, optional
            For a random rule.

        Returns
        -------
        Tensor of the shape of ``x``
        """
        eta, weights = expectation.points(eta_mean, eta_var, generator)
        return (weights * self.log_prob(x, eta, log_s, rows, cols)).sum(0)

    @property
    def closed_form(self) -> bool:
        """Whether :meth:`expected_log_prob` is exact whatever the rule (no Monte Carlo
        noise in the ELBO); False by default."""
        return False

    def grid_expected_log_prob(self, x, mask, eta, log_s, cache=None, rows=None):
        """``sum_ij mask_ij E_q[log p(x_ij | eta_ij)]`` over a grid, from ``eta`` in
        factored form, or None to have it summed from :meth:`expected_log_prob`.

        The hook of a likelihood whose closed form can skip the grids of
        ``E[eta]`` and ``V[eta]`` (the Poisson under the exp link); the default
        has none.

        Parameters
        ----------
        x : Tensor of shape (n, p)
            Data, 0 where missing.
        mask : Tensor of shape (n, p) or None
            1 for observed, 0 for missing entries.
        eta : LinearPredictor
            :class:`spfa.linear_predictor.LinearPredictor` of the grid's rows.
        log_s : Tensor of shape (n, 1) or None
        cache : dict, optional
            Kept with ``x`` between calls, for sums of the data alone.
        rows : Tensor of int, optional
            The grid's samples (for per-sample parameters).

        Returns
        -------
        Tensor (scalar) or None
        """
        return None

    def sample(self, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw data at the grid mean of the training rows.

        Parameters
        ----------
        mean : ndarray of shape (..., n, p)
            What :meth:`mean` gives (times the size factors).
        rng : numpy.random.Generator

        Returns
        -------
        ndarray of shape (..., n, p), float64
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement sample()")

    def scipy_distribution(self, mean: np.ndarray):
        """The distribution of ``x`` at the grid mean ``mean`` as a frozen scipy.stats object.

        Optional; the zero-truncated wrapper draws from it by its inverse CDF.

        Parameters
        ----------
        mean : ndarray of shape (..., n, p)
            As in :meth:`sample`.

        Returns
        -------
        scipy.stats frozen distribution of the shape of ``mean``
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement scipy_distribution()")

    def fitted_attributes(self) -> dict[str, np.ndarray]:
        """Fitted nuisance parameters, exposed by the estimator as attributes."""
        return {}

    def extra_repr(self) -> str:
        return f"link={self.link.name!r}"


class LikelihoodWrapper(Likelihood):
    """A likelihood that changes part of a ``base`` likelihood and forwards the rest.

    The base is a submodule (its parameters' state keys start with
    ``base.``); the link, the support, the per-sample parameters, the
    initialisation, the variance function, the mean, the fitted attributes and
    every attribute the wrapper does not define itself (e.g. the negative
    binomial's ``inverse_dispersion`` and ``set_inverse_dispersion``) are the
    base's. A subclass overrides what it changes, typically :meth:`log_prob`
    and :meth:`sample`.

    Parameters
    ----------
    base : Likelihood
    name : str, optional
        The instance's name; by default the class's, or if that is empty
        ``name_prefix + "_" + base.name``.
    """

    #: prefix of the default name of an instance
    name_prefix: str = "wrapped"

    def __init__(self, base: Likelihood, name: str | None = None):
        if not isinstance(base, Likelihood):
            raise ValueError(
                f"{type(self).__name__} wraps a Likelihood instance, got {type(base).__name__}"
            )
        # not Likelihood.__init__: the link is the base's
        torch.nn.Module.__init__(self)
        self.base = base
        if name is not None:
            self.name = name
        elif not type(self).name:
            self.name = f"{self.name_prefix}_{base.name}"

    # -- forwarded to the base --------------------------------------------------
    @property
    def link(self) -> Link:
        return self.base.link

    @property
    def integer_support(self) -> bool:
        return self.base.integer_support

    @property
    def positive_mean(self) -> bool:
        return self.base.positive_mean

    @property
    def variance_from_mean(self) -> bool:
        return self.base.variance_from_mean

    @property
    def row_parameters(self) -> tuple[str, ...]:
        return tuple(f"base.{name}" for name in self.base.row_parameters)

    @property
    def sparse_rows(self) -> bool:
        return self.base.sparse_rows

    @sparse_rows.setter
    def sparse_rows(self, value: bool) -> None:
        self.base.sparse_rows = bool(value)

    def initialize(self, feature_mean, feature_var):
        self.base.initialize(feature_mean, feature_var)

    def initialize_rows(self, n_samples):
        self.base.initialize_rows(n_samples)

    def variance_function(self, mu):
        return self.base.variance_function(mu)

    def log_mean(self, eta, log_s):
        return self.base.log_mean(eta, log_s)

    def mean(self, eta, log_s=None):
        return self.base.mean(eta, log_s)

    def sample(self, mean, rng):
        return self.base.sample(mean, rng)

    def fitted_attributes(self):
        return self.base.fitted_attributes()

    def extra_repr(self) -> str:
        return ""  # the base's repr follows as the child module's

    def __getattr__(self, name: str):
        """Parameters, buffers and submodules of the wrapper first, then the base's attributes.

        A dotted ``name`` (an entry of :attr:`row_parameters`, e.g.
        ``"base.dispersion_rows"``) is resolved step by step.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        head, dot, rest = name.partition(".")
        if dot:
            return getattr(getattr(self, head), rest)
        base = self.__dict__.get("_modules", {}).get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)
