"""Point-normal (spike-and-slab) prior and variational posterior on a matrix.

For an ``m x k`` matrix ``M`` (loadings: ``m = n``; factors: ``m = p``) with
columns indexed by factor ``k``::

    prior      m_ik ~ pi_k N(0, 1/tau_k) + (1 - pi_k) delta_0
    posterior  q(m_ik) = alpha_ik N(mu_ik, 1/nu_ik) + (1 - alpha_ik) delta_0

``pi_k`` and ``tau_k`` are learned (empirical Bayes). The KL divergence is the
analytic one of Carbonetto & Stephens (2012)::

    KL = alpha log(alpha/pi) + (1-alpha) log((1-alpha)/(1-pi))
         + alpha/2 [log(nu/tau) - 1 + tau (mu^2 + 1/nu)]

written from logits so that it is finite for every parameter value (no
``S log S`` NaN patching). Moments::

    E[m] = alpha mu     V[m] = alpha/nu + alpha (1 - alpha) mu^2
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["PointNormal", "Moments", "point_normal_kl"]


class Moments(NamedTuple):
    """First two posterior moments of a point-normal matrix, each ``[m, k]``."""

    mean: torch.Tensor
    var: torch.Tensor


def point_normal_kl(
    logits: torch.Tensor,
    mean: torch.Tensor,
    log_prec: torch.Tensor,
    prior_logit: torch.Tensor,
    prior_log_prec: torch.Tensor,
) -> torch.Tensor:
    """Elementwise ``KL(q || p)`` of point-normal posterior and prior.

    Parameters
    ----------
    logits, mean, log_prec : Tensor of shape (m, k)
        Posterior inclusion log-odds, slab mean and slab log-precision.
    prior_logit, prior_log_prec : Tensor of shape (k,)
        Prior inclusion log-odds and slab log-precision.

    Returns
    -------
    Tensor of shape (m, k)
    """
    alpha = torch.sigmoid(logits)
    # log sigma(z) = -softplus(-z), log(1 - sigma(z)) = -softplus(z)
    kl_spike = alpha * (F.softplus(-prior_logit) - F.softplus(-logits)) + (1 - alpha) * (
        F.softplus(prior_logit) - F.softplus(logits)
    )
    tau = torch.exp(prior_log_prec)
    kl_slab = (
        0.5 * alpha * (log_prec - prior_log_prec - 1.0 + tau * (mean**2 + torch.exp(-log_prec)))
    )
    return kl_spike + kl_slab


class PointNormal(torch.nn.Module):
    """Point-normal variational posterior on an ``m x k`` matrix, with its prior.

    A factor can be switched off (``active[k] = 0``): that is the boundary
    ``pi_k = 0`` of the prior, where ``q`` is the point mass at zero, so the
    factor's entries have mean, variance, PIP and KL exactly zero.

    Parameters
    ----------
    m, k : int
        Shape of the matrix.
    """

    def __init__(self, m: int, k: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(m, k))
        self.mean = torch.nn.Parameter(torch.zeros(m, k))
        self.log_prec = torch.nn.Parameter(torch.zeros(m, k))
        self.prior_logit = torch.nn.Parameter(torch.zeros(k))
        self.prior_log_prec = torch.nn.Parameter(torch.zeros(k))
        self.register_buffer("active", torch.ones(k))

    def variational_parameters(self) -> list[torch.nn.Parameter]:
        return [self.logits, self.mean, self.log_prec]

    def prior_parameters(self) -> list[torch.nn.Parameter]:
        return [self.prior_logit, self.prior_log_prec]

    @property
    def pip(self) -> torch.Tensor:
        """Posterior inclusion probabilities ``alpha``, ``[m, k]`` (0 for a switched-off factor)."""
        return torch.sigmoid(self.logits) * self.active

    @property
    def prior_pi(self) -> torch.Tensor:
        """Prior inclusion probability per factor, ``[k]`` (0 for a switched-off factor)."""
        return torch.sigmoid(self.prior_logit) * self.active

    @property
    def prior_scale(self) -> torch.Tensor:
        """Prior slab standard deviation per factor, ``[k]``."""
        return torch.exp(-0.5 * self.prior_log_prec)

    def _rows(self, rows: torch.Tensor | None, sparse: bool) -> tuple[torch.Tensor, ...]:
        """``(logits, mean, log_prec)`` of all rows, or of ``rows`` (``[b]``).

        With ``sparse=True`` the rows are gathered by an embedding lookup whose
        gradient is a sparse tensor: only the rows used get an update
        (:class:`torch.optim.SparseAdam`), as minibatch training needs.
        """
        params = (self.logits, self.mean, self.log_prec)
        if rows is None:
            return params
        if sparse:
            return tuple(F.embedding(rows, w, sparse=True) for w in params)
        return tuple(w[rows] for w in params)

    def moments(self, rows: torch.Tensor | None = None, sparse: bool = False) -> Moments:
        """Posterior mean and variance of each entry (of the rows ``rows``)."""
        logits, mu, log_prec = self._rows(rows, sparse)
        alpha = torch.sigmoid(logits) * self.active
        mean = alpha * mu
        var = alpha * torch.exp(-log_prec) + alpha * (1 - alpha) * mu**2
        return Moments(mean, var)

    def kl(self, rows: torch.Tensor | None = None, sparse: bool = False) -> torch.Tensor:
        """``sum KL(q || p)`` over all entries, or over the rows ``rows`` (scalar)."""
        logits, mean, log_prec = self._rows(rows, sparse)
        kl = point_normal_kl(logits, mean, log_prec, self.prior_logit, self.prior_log_prec)
        return (kl * self.active).sum()

    def slab_sd(self) -> torch.Tensor:
        """Slab standard deviation ``1/sqrt(nu)`` of each entry, ``[m, k]``."""
        return torch.exp(-0.5 * self.log_prec)

    @torch.no_grad()
    def sample(
        self, generator: torch.Generator | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One draw from ``q`` of the whole matrix, ``[m, k]``, or of the rows ``rows``."""
        logits, mean, log_prec = self._rows(rows, sparse=False)
        pip = torch.sigmoid(logits) * self.active
        on = torch.rand(mean.shape, generator=generator, device=mean.device) < pip
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return torch.where(on, mean + torch.exp(-0.5 * log_prec) * eps, torch.zeros_like(mean))

    @torch.no_grad()
    def permute_(self, order: torch.Tensor) -> None:
        """Reorder the factors in place: new factor ``i`` is old factor ``order[i]``."""
        for tensor in (self.logits, self.mean, self.log_prec):
            tensor.copy_(tensor[:, order])
        for tensor in (self.prior_logit, self.prior_log_prec, self.active):
            tensor.copy_(tensor[order])

    def set_prior_trainable(self, trainable: bool) -> None:
        for p in self.prior_parameters():
            p.requires_grad_(trainable)


def normal_kl(
    mean: torch.Tensor,
    log_var: torch.Tensor,
    prior_mean: torch.Tensor,
    prior_log_prec: torch.Tensor,
) -> torch.Tensor:
    """Elementwise ``KL(N(mean, exp(log_var)) || N(prior_mean, exp(-prior_log_prec)))``."""
    tau = torch.exp(prior_log_prec)
    return 0.5 * (
        tau * (torch.exp(log_var) + (mean - prior_mean) ** 2) - 1.0 - prior_log_prec - log_var
    )


class NormalEffect(torch.nn.Module):
    """Gaussian random effect per feature with a learned normal prior (empirical Bayes).

    ``b_j ~ N(b0, 1/tau)``, ``q(b_j) = N(m_j, v_j)``. Used for the intercept: when
    the features' baselines really differ (genes) the learned ``1/tau`` is wide
    and ``b`` is effectively free; when they do not, ``b`` shrinks to ``b0``
    instead of spending one noisy free parameter per feature.

    Parameters
    ----------
    m : int
        Number of effects (features).
    """

    def __init__(self, m: int):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.zeros(m))
        self.log_var = torch.nn.Parameter(torch.zeros(m))
        self.prior_mean = torch.nn.Parameter(torch.zeros(()))
        self.prior_log_prec = torch.nn.Parameter(torch.zeros(()))

    def moments(self) -> Moments:
        return Moments(self.mean, torch.exp(self.log_var))

    def kl(self) -> torch.Tensor:
        return normal_kl(self.mean, self.log_var, self.prior_mean, self.prior_log_prec).sum()

    @property
    def prior_scale(self) -> torch.Tensor:
        return torch.exp(-0.5 * self.prior_log_prec)

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``b`` from ``q``, ``[m]``."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + torch.exp(0.5 * self.log_var) * eps
