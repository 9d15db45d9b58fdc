"""Zero inflation of any count likelihood."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..links import Link
from .base import Likelihood, LikelihoodWrapper
from .negative_binomial import NegativeBinomial

__all__ = ["ZeroInflated", "ZeroInflatedNegativeBinomial"]

# pi_j starts at 0.05: free to grow where zeros are in excess, or to vanish
_START_LOGIT = math.log(0.05 / 0.95)


class ZeroInflated(LikelihoodWrapper):
    """``x_ij ~ pi_j delta_0 + (1 - pi_j) base(x_ij | eta_ij)``: zero inflation of a count model.

    A per-feature zero-inflation probability ``pi_j = sigmoid(psi_j)`` (as in
    scVI's ZINB). In log space,
    ``log p(0) = logaddexp(logsigmoid(psi), logsigmoid(-psi) + log p_base(0))`` and
    ``log p(x > 0) = logsigmoid(-psi) + log p_base(x)``, finite with finite
    gradients for every ``psi``. The mean is ``(1 - pi) s h(eta)``; the link,
    the per-sample parameters and the variance function (which only weights
    the initialisation) are the base's.

    ``log p_base(0)`` is the base's ``log_prob`` at the zero entries (the same
    value as ``-exp(base.log_neg_log_prob_zero)``, from one evaluation of the
    base for all entries, and free of the ``exp`` overflow at huge means).

    Parameters
    ----------
    base : Likelihood
        A count likelihood that observes zeros (``integer_support`` and
        ``observes_zeros``), e.g. :class:`Poisson` or :class:`NegativeBinomial`.
    name : str, optional
        By default the class's, or ``"zero_inflated_" + base.name``.

    Raises
    ------
    ValueError
        If ``base`` is not such a likelihood.
    """

    name_prefix = "zero_inflated"

    def __init__(self, base: Likelihood, name: str | None = None):
        if isinstance(base, Likelihood) and not (base.integer_support and base.observes_zeros):
            raise ValueError(
                f"zero inflation needs a count likelihood that observes zeros, "
                f"not {type(base).__name__}"
            )
        super().__init__(base, name)

    def initialize(self, feature_mean, feature_var):
        super().initialize(feature_mean, feature_var)
        start = torch.full((np.size(feature_mean),), _START_LOGIT, dtype=torch.float32)
        self.zero_logit = torch.nn.Parameter(start)

    @property
    def zero_inflation(self) -> torch.Tensor:
        """``pi_j``, shape ``[p]``."""
        return torch.sigmoid(self.zero_logit)

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        psi = self.per_feature(self.zero_logit, cols)
        log_keep = F.logsigmoid(-psi) + self.base.log_prob(x, eta, log_s, rows, cols)
        return torch.where(x > 0, log_keep, torch.logaddexp(F.logsigmoid(psi), log_keep))

    def mean(self, eta, log_s=None):
        return torch.sigmoid(-self.zero_logit) * self.base.mean(eta, log_s)

    def sample(self, mean, rng):
        keep = 1.0 - self.zero_inflation.detach().cpu().double().numpy()
        counts = self.base.sample(mean / keep, rng)
        return np.where(rng.uniform(size=np.shape(counts)) < keep, counts, 0.0)

    def fitted_attributes(self):
        out = self.base.fitted_attributes()
        out["zero_inflation_"] = self.zero_inflation.detach().cpu().double().numpy()
        return out


class ZeroInflatedNegativeBinomial(ZeroInflated):
    """``ZeroInflated(NegativeBinomial(link, dispersion="feature"))``: the ZINB.

    Parameters
    ----------
    link : str or Link, default="softplus"
    """

    name = "zinb"

    def __init__(self, link: str | Link = "softplus"):
        super().__init__(NegativeBinomial(link, dispersion="feature"))
