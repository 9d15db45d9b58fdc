"""Observation models ``p(x_ij | eta_ij)`` and their expected log-likelihoods.

A likelihood is a small :class:`torch.nn.Module` that owns its per-feature
nuisance parameters (noise variance, inverse dispersion) and supplies

* ``log_prob(x, eta, log_s)`` -- elementwise ``log p(x | eta)``;
* ``expected_log_prob(x, eta_mean, eta_var, log_s, expectation, generator)`` --
  elementwise ``E_q[log p(x | eta)]`` for ``eta ~ N(eta_mean, eta_var)``; the
  base class estimates it by Monte Carlo or quadrature, a subclass with a
  closed form overrides it;
* ``mean(eta, log_s)`` -- the mean on the data scale, ``s * h(eta)``.

Modules: :mod:`.base` (:class:`Likelihood`, :class:`LikelihoodWrapper`),
:mod:`.gaussian`, :mod:`.poisson`, :mod:`.negative_binomial`, and the wrappers
:mod:`.zero_inflated` and :mod:`.zero_truncated`, which turn any count
likelihood (one implementing ``log_neg_log_prob_zero``) into its
zero-inflated or zero-truncated version.

Adding a likelihood: subclass :class:`Likelihood` (or wrap one), check it
with :func:`spfa.testing.check_likelihood` and add a builder ``link ->
Likelihood`` to ``LIKELIHOODS`` (or pass an instance to the estimator).
Shapes: ``x``, ``eta`` are ``[n, p]`` (or broadcastable, e.g. ``[S, n, p]``
for ``eta``), ``log_s`` is ``[n, 1]`` or ``None``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

from ..links import Link
from ..views import FeatureViews
from .base import Likelihood, LikelihoodWrapper
from .gaussian import Gaussian
from .negative_binomial import NegativeBinomial, NegativeBinomialFull, NegativeBinomialShared
from .poisson import Poisson
from .views import ViewLinks, Views
from .zero_inflated import ZeroInflated, ZeroInflatedNegativeBinomial
from .zero_truncated import ZeroTruncated, ZeroTruncatedNegativeBinomial, ZeroTruncatedPoisson

__all__ = [
    "Likelihood",
    "LikelihoodWrapper",
    "Gaussian",
    "Poisson",
    "NegativeBinomial",
    "NegativeBinomialShared",
    "NegativeBinomialFull",
    "ZeroInflated",
    "ZeroTruncated",
    "ZeroInflatedNegativeBinomial",
    "ZeroTruncatedPoisson",
    "ZeroTruncatedNegativeBinomial",
    "Views",
    "ViewLinks",
    "LIKELIHOODS",
    "get_likelihood",
    "view_likelihood",
]

#: name -> builder ``link -> Likelihood`` of every registered likelihood; each
#: builds an instance whose ``name`` is its key
LIKELIHOODS: dict[str, Callable[[str | Link], Likelihood]] = {
    "gaussian": Gaussian,
    "poisson": Poisson,
    "negative_binomial": NegativeBinomial,
    "negative_binomial_shared": NegativeBinomialShared,
    "negative_binomial_full": NegativeBinomialFull,
    "zinb": ZeroInflatedNegativeBinomial,
    "zip": lambda link="softplus": ZeroInflated(Poisson(link), name="zip"),
    "zt_poisson": ZeroTruncatedPoisson,
    "zt_negative_binomial": ZeroTruncatedNegativeBinomial,
}


def get_likelihood(likelihood: str | Likelihood, link: str | Link = "softplus") -> Likelihood:
    """Build a fresh likelihood from a registered name, or copy a given instance.

    Parameters
    ----------
    likelihood : str or Likelihood
        A key of ``LIKELIHOODS``, or an instance (deep-copied; ``link`` is then
        ignored).
    link : str or Link, default="softplus"

    Returns
    -------
    Likelihood
        Not yet initialised (see :meth:`Likelihood.initialize`).

    Raises
    ------
    ValueError
        If the name is not registered, or the link is unknown or does not suit
        the likelihood.
    """
    if isinstance(likelihood, Likelihood):
        return copy.deepcopy(likelihood)
    if isinstance(likelihood, str) and likelihood in LIKELIHOODS:
        return LIKELIHOODS[likelihood](link)
    raise ValueError(
        f"unknown likelihood {likelihood!r}; expected one of {sorted(LIKELIHOODS)} "
        "or a spfa.likelihoods.Likelihood instance"
    )


def view_likelihood(likelihoods, link, feature_groups) -> Views:
    """A likelihood per view (:class:`Views`) from ``{view: name or instance}``.

    Parameters
    ----------
    likelihoods : mapping of str to (str or Likelihood)
        Each view's likelihood, as :func:`get_likelihood` takes it.
    link : str, Link or mapping of str to (str or Link)
        Every view's link, or a link per view (views it leaves out take ``"exp"``).
    feature_groups : array-like of str, shape (p,)
        Each feature's view.
    """
    names = list(likelihoods)
    if isinstance(link, Mapping):
        unknown = sorted(set(link) - set(names))
        if unknown:
            raise ValueError(f"link names views {unknown} that have no likelihood: {names}")
        links = {v: link.get(v, "exp") for v in names}
    else:
        links = dict.fromkeys(names, link)
    views = FeatureViews(feature_groups, names)
    return Views({v: get_likelihood(likelihoods[v], links[v]) for v in names}, views)
