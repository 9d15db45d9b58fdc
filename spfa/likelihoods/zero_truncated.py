"""Zero truncation of any count likelihood: a model of the non-zero entries."""

from __future__ import annotations

import numpy as np

from ..links import Link
from ..special import log1mexp_from_log
from .base import Likelihood, LikelihoodWrapper
from .negative_binomial import NegativeBinomial
from .poisson import Poisson

__all__ = ["ZeroTruncated", "ZeroTruncatedPoisson", "ZeroTruncatedNegativeBinomial"]


class ZeroTruncated(LikelihoodWrapper):
    """``x_ij | x_ij > 0 ~ base(x_ij | eta_ij)`` truncated at zero.

    ``log p(x | x > 0) = log p_base(x) - log(1 - p_base(0))``, the second term
    from :func:`spfa.special.log1mexp_from_log` of the base's
    ``log(-log p_base(0))`` (e.g. ``log mu`` for the Poisson), so it stays
    finite (and tends to ``log p_base(x) - log(-log p_base(0))``) where
    ``p_base(0)`` rounds to 1.

    Only the non-zero entries are fitted (``observes_zeros = False``), at a
    cost that scales with their number rather than ``n p``. The model then
    says how large a count is *given* that it is non-zero; it says nothing
    about which entries are zero (whether a zero is biological, technical or
    a dropped entry), so it cannot be used to predict or score zeros, and
    a feature that is rarely non-zero is barely informed. ``mean`` and
    ``inverse_transform`` give the base's (untruncated) mean ``s h(eta)``;
    ``sample`` draws from the truncated distribution at every entry.

    Parameters
    ----------
    base : Likelihood
        A count likelihood that observes zeros and implements
        ``log_neg_log_prob_zero`` (and ``scipy_distribution``, for ``sample``),
        e.g. :class:`Poisson` or :class:`NegativeBinomial`.
    name : str, optional
        By default the class's, or ``"zero_truncated_" + base.name``.

    Raises
    ------
    ValueError
        If ``base`` is not such a likelihood.
    """

    observes_zeros = False
    name_prefix = "zero_truncated"

    def __init__(self, base: Likelihood, name: str | None = None):
        if isinstance(base, Likelihood) and not (
            base.integer_support
            and base.observes_zeros
            and type(base).log_neg_log_prob_zero is not Likelihood.log_neg_log_prob_zero
        ):
            raise ValueError(
                "zero truncation needs a count likelihood that observes zeros and implements "
                f"log_neg_log_prob_zero, not {type(base).__name__}"
            )
        super().__init__(base, name)

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        log_a = self.base.log_neg_log_prob_zero(eta, log_s, rows, cols)
        return self.base.log_prob(x, eta, log_s, rows, cols) - log1mexp_from_log(log_a)

    def sample(self, mean, rng):
        """Inverse-CDF draws on ``(p(0), 1)`` from the base's ``scipy_distribution``.

        Where ``p(0)`` rounds to 1 in float64 (``P(x > 0)`` below about
        ``1e-16``) the draw is 1: ``P(x >= 2 | x > 0)`` is then of the order of
        ``P(x > 0)`` (times ``(1 + 1/r) / 2`` for the negative binomial), far
        below what any number of draws could detect.
        """
        dist = self.base.scipy_distribution(mean)
        u = rng.uniform(dist.cdf(0), 1.0)
        # the truncated support starts at 1 (ppf may round a u just above p(0) to 0)
        return np.where(u < 1.0, np.maximum(dist.ppf(u), 1.0), 1.0).astype(np.float64)


class ZeroTruncatedPoisson(ZeroTruncated):
    """``ZeroTruncated(Poisson(link))``.

    Parameters
    ----------
    link : str or Link, default="softplus"
    """

    name = "zt_poisson"

    def __init__(self, link: str | Link = "softplus"):
        super().__init__(Poisson(link))


class ZeroTruncatedNegativeBinomial(ZeroTruncated):
    """``ZeroTruncated(NegativeBinomial(link, dispersion="feature"))``.

    Parameters
    ----------
    link : str or Link, default="softplus"
    """

    name = "zt_negative_binomial"

    def __init__(self, link: str | Link = "softplus"):
        super().__init__(NegativeBinomial(link, dispersion="feature"))
