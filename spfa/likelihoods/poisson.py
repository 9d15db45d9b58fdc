"""The Poisson likelihood."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from ..links import Exp
from .base import Likelihood

#: largest full batch (entries) whose transpose is kept for the factors' gradient: the
#: copy's memory (at most 128 MiB of float32) is bounded, beyond it the product reads x
TRANSPOSE_ENTRIES = 2**25

__all__ = ["Poisson"]


class Poisson(Likelihood):
    """``x_ij ~ Poisson(mu_ij)`` with ``mu_ij = s_i h(eta_ij)``.

    ``log p = x log mu - mu - lgamma(x + 1)``, with ``log mu`` evaluated
    stably by the link (no ``log(softplus)`` underflow), and
    ``log(-log p(0)) = log mu``. Under the exp link ``E_q[log p]`` is exact
    (the lognormal mean), so the ELBO has no Monte Carlo noise.

    Parameters
    ----------
    link : str or Link, default="softplus"
        A positive link.
    """

    name = "poisson"
    integer_support = True
    positive_mean = True

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        log_mu = self.log_mean(eta, log_s)
        return x * log_mu - torch.exp(log_mu) - torch.lgamma(x + 1.0)

    def expected_log_prob(
        self, x, eta_mean, eta_var, log_s, expectation, generator=None, rows=None, cols=None
    ):
        """Closed form under the exp link, ``x (m + log s) - s exp(m + v/2) - lgamma(x + 1)``
        (the rule ``expectation`` is then not used); the rule otherwise."""
        if not self.closed_form:
            return super().expected_log_prob(
                x, eta_mean, eta_var, log_s, expectation, generator, rows, cols
            )
        log_mu = eta_mean if log_s is None else eta_mean + log_s
        return x * log_mu - torch.exp(log_mu + 0.5 * eta_var) - torch.lgamma(x + 1.0)

    @property
    def closed_form(self) -> bool:
        return isinstance(self.link, Exp)

    def grid_expected_log_prob(self, x, mask, eta, log_s, cache=None, rows=None):
        """Under the exp link, the closed form summed without the grids of ``E[eta]`` and
        ``V[eta]``: ``sum x E[eta]`` as ``sum (x E[F]) * E[L] + colsums(x) E[b]``,
        and ``sum s E_q[e^eta]`` by :func:`spfa.linear_predictor.sum_exp_product`, whose
        grid's memory is kept in ``cache`` with the batch and reused."""
        if not self.closed_form:
            return None
        cache = {} if cache is None else cache
        if "poisson" not in cache:
            with torch.no_grad():
                cache["poisson"] = (x.sum(0), x.sum(1, keepdim=True), torch.lgamma(x + 1.0).sum())
                cache["grid"] = torch.empty_like(x)
        # x^T contiguous for the factors' gradient, where it pays: a batch used at every
        # step (the full batch), on the CPU (MKL's product from x's column order is 4x
        # slower there; copying per minibatch would cost more), within a memory bound
        if "xt" not in cache and eta.mf.requires_grad and torch.is_grad_enabled():
            reused = cache.get("reused", False) and x.device.type == "cpu"
            small = x.numel() <= TRANSPOSE_ENTRIES
            cache["xt"] = x.T.contiguous() if reused and small else None
        column_sums, row_sums, log_factorials = cache["poisson"]
        linear = eta.sum_times_mean(x, column_sums, cache.get("xt"))
        if log_s is not None:
            linear = linear + (row_sums * log_s).sum()
        expected_mean = eta.sum_lognormal_mean(log_s, mask, cache["grid"])
        return linear - expected_mean - log_factorials

    def log_neg_log_prob_zero(self, eta, log_s, rows=None, cols=None):
        return self.log_mean(eta, log_s)

    def variance_function(self, mu):
        return mu

    def sample(self, mean, rng):
        return rng.poisson(mean).astype(np.float64)

    def scipy_distribution(self, mean):
        return stats.poisson(mean)
