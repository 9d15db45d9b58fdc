"""Point-normal (spike-and-slab) prior and posterior: spfa's default family.

For an ``m x k`` matrix with columns indexed by factor ``k``::

    prior      g_k = pi_k N(0, 1/tau_k) + (1 - pi_k) delta_0
    posterior  q(theta_ik) = alpha_ik N(mu_ik, 1/nu_ik) + (1 - alpha_ik) delta_0

``pi_k`` and ``tau_k`` are learned (empirical Bayes). The KL divergence is the
analytic one of Carbonetto & Stephens (2012)::

    KL = alpha log(alpha/pi) + (1-alpha) log((1-alpha)/(1-pi))
         + alpha/2 [log(nu/tau) - 1 + tau (mu^2 + 1/nu)]

written from logits so that it is finite for every parameter value (no
``S log S`` NaN patching). Moments::

    E[theta] = alpha mu     V[theta] = alpha/nu + alpha (1 - alpha) mu^2
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special

from .._convert import to_numpy
from ..posterior import Posterior, check_same_shape
from ..special import normal_logpdf
from .base import PointMassFamily, as_tensor_like, start_second_moment

__all__ = [
    "PointNormal",
    "PointNormalPosterior",
    "point_normal_kl",
    "point_normal_moments",
    "PIP_START",
]

#: starting posterior inclusion probability (and prior pi) of every entry
PIP_START = 0.9


def point_normal_kl(
    logits: torch.Tensor,
    mean: torch.Tensor,
    log_prec: torch.Tensor,
    prior_logit: torch.Tensor,
    prior_log_prec: torch.Tensor,
) -> torch.Tensor:
    """Elementwise ``KL(q || g)`` of point-normal posterior and prior.

    Parameters
    ----------
    logits, mean, log_prec : Tensor of shape (m, k)
        Posterior inclusion log-odds, slab mean and slab log-precision.
    prior_logit, prior_log_prec : Tensor of shape (k,)
        Prior inclusion log-odds and slab log-precision.

    Returns
    -------
    Tensor of shape (m, k)
        Differentiable in every argument, by gradients written out (one pass each way,
        no graph of the elementwise operations).
    """
    return _PointNormalKL.apply(logits, mean, log_prec, prior_logit, prior_log_prec)


def point_normal_moments(
    logits: torch.Tensor, mean: torch.Tensor, log_prec: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[theta] = alpha mu`` and ``V[theta] = alpha / nu + alpha (1 - alpha) mu^2``,
    elementwise, shaped like ``mean`` (arguments as in :func:`point_normal_kl`);
    differentiable by gradients written out."""
    return _PointNormalMoments.apply(logits, mean, log_prec)


class _PointNormalKL(torch.autograd.Function):
    """The KL and its gradients, with ``alpha = sigmoid(logits)``, ``tau = e^prior_log_prec``
    and the slab term ``T = (log nu - log tau - 1 + tau (mu^2 + 1/nu)) / 2``::

        d/dlogits  = alpha (1 - alpha) (logits - prior_logit + T)
        d/dmu      = alpha tau mu
        d/dlog nu  = alpha (1 - tau / nu) / 2
        d/dprior_logit    = sigmoid(prior_logit) - alpha
        d/dprior_log_prec = alpha (tau (mu^2 + 1/nu) - 1) / 2

    (the spike's log-odds derivatives cancel to ``logits - prior_logit``)."""

    @staticmethod
    def forward(ctx, logits, mean, log_prec, prior_logit, prior_log_prec):
        alpha = torch.sigmoid(logits)
        tau = torch.exp(prior_log_prec)
        slab_var = torch.exp(-log_prec)
        # log sigma(z) = -softplus(-z), log(1 - sigma(z)) = -softplus(z)
        kl_spike = alpha * (F.softplus(-prior_logit) - F.softplus(-logits)) + (1 - alpha) * (
            F.softplus(prior_logit) - F.softplus(logits)
        )
        slab = 0.5 * (log_prec - prior_log_prec - 1.0 + tau * (mean**2 + slab_var))
        ctx.save_for_backward(logits, alpha, mean, slab_var, slab, prior_logit, tau)
        return kl_spike + alpha * slab

    @staticmethod
    def backward(ctx, grad):
        logits, alpha, mean, slab_var, slab, prior_logit, tau = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_alpha = grad * alpha
        out = [None] * 5
        if need[0]:
            out[0] = g_alpha * (1 - alpha) * (logits - prior_logit + slab)
        if need[1]:
            out[1] = g_alpha * tau * mean
        if need[2]:
            out[2] = 0.5 * g_alpha * (1 - tau * slab_var)
        if need[3]:
            out[3] = (grad * torch.sigmoid(prior_logit) - g_alpha).sum_to_size(prior_logit.shape)
        if need[4]:
            prior_second = tau * (mean**2 + slab_var) - 1
            out[4] = (0.5 * g_alpha * prior_second).sum_to_size(tau.shape)
        return tuple(out)


class _PointNormalMoments(torch.autograd.Function):
    """The moments and their gradients given those of ``E`` (``gm``) and ``V`` (``gv``)::

    d/dlogits = alpha (1 - alpha) (gm mu + gv (1/nu + (1 - 2 alpha) mu^2))
    d/dmu     = alpha (gm + 2 (1 - alpha) mu gv)
    d/dlog nu = -gv alpha / nu
    """

    @staticmethod
    def forward(ctx, logits, mean, log_prec):
        alpha = torch.sigmoid(logits)
        slab_var = torch.exp(-log_prec)
        ctx.save_for_backward(alpha, mean, slab_var)
        return alpha * mean, alpha * slab_var + alpha * (1 - alpha) * mean**2

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        alpha, mean, slab_var = ctx.saved_tensors
        spread = alpha * (1 - alpha)
        g_logits = spread * (grad_mean * mean + grad_var * (slab_var + (1 - 2 * alpha) * mean**2))
        g_mean = alpha * grad_mean + 2 * spread * mean * grad_var
        return g_logits, g_mean, -grad_var * alpha * slab_var


class PointNormal(PointMassFamily):
    """Point-normal prior and variational posterior on an ``m x k`` matrix.

    Parameters
    ----------
    m, k : int
        Shape of the matrix.
    """

    name = "point_normal"
    widens = True
    sign_symmetric = True
    prior_parameter_names = ("prior_logit", "prior_log_prec")

    def _moments(self, logits, mu, log_prec):
        return point_normal_moments(logits, mu, log_prec)

    def _kl(self, logits, mean, log_prec):
        return point_normal_kl(logits, mean, log_prec, self.prior_logit, self.prior_log_prec)

    def _sample(self, generator, logits, mean, log_prec):
        pip = torch.sigmoid(logits)
        on = torch.rand(mean.shape, generator=generator, device=mean.device) < pip
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return torch.where(on, mean + torch.exp(-0.5 * log_prec) * eps, torch.zeros_like(mean))

    def _draw(self, n_draws, generator, logits, mean, log_prec):
        shape = (n_draws,) + tuple(mean.shape)
        kw = dict(generator=generator, dtype=mean.dtype, device=mean.device)
        on = torch.rand(shape, **kw) < torch.sigmoid(logits)
        eps = torch.randn(shape, **kw)
        value = torch.where(on, mean + torch.exp(-0.5 * log_prec) * eps, torch.zeros(()))
        return {"value": value, "on": on}

    def _log_density(self, latent, prior, logits, mean, log_prec):
        if prior:
            logits, mean, log_prec = self.prior_logit, torch.zeros(()), self.prior_log_prec
        slab = normal_logpdf(latent["value"], mean, -0.5 * log_prec)
        return self._spike_log_density(latent["on"], slab, logits)

    @torch.no_grad()
    def start_prior_(self, values):
        tau = 1.0 / start_second_moment(values)
        self.prior_logit.fill_(special.logit(PIP_START))
        self.prior_log_prec.copy_(as_tensor_like(np.log(tau), self.prior_log_prec))

    @torch.no_grad()
    def start_(self, values, precision, rows=None):
        index = self._index(rows)
        tau = torch.exp(self.prior_log_prec)
        self.logits[index] = special.logit(PIP_START)
        # E[theta] = alpha mu: start the slab mean so that E[theta] = values
        self.mean[index] = as_tensor_like(values, self.mean) / PIP_START
        self.log_prec[index] = torch.log(as_tensor_like(precision, self.log_prec) + tau)

    @torch.no_grad()
    def start_posterior_(self, values, precision, rows=None):
        """The normal-means posterior of each entry given ``values`` observed with
        ``precision`` ``P``: slab precision ``P + tau``, slab mean ``P v / (P + tau)``,
        and inclusion log-odds ``logit(pi)`` plus the log Bayes factor
        ``log N(v; 0, 1/tau + 1/P) - log N(v; 0, 1/P)``; an entry with ``P = 0``
        starts at the prior."""
        index = self._index(rows)
        tau = torch.exp(self.prior_log_prec)
        v = as_tensor_like(values, self.mean)
        data_prec = as_tensor_like(precision, self.log_prec).expand_as(v)
        prec = data_prec + tau
        informed = data_prec > 0
        safe = torch.where(informed, data_prec, torch.ones_like(data_prec))
        log_bf = normal_logpdf(v, 0.0, 0.5 * torch.log(1.0 / tau + 1.0 / safe)) - normal_logpdf(
            v, 0.0, -0.5 * torch.log(safe)
        )
        self.mean[index] = data_prec * v / prec
        self.log_prec[index] = torch.log(prec)
        self.logits[index] = self.prior_logit + torch.where(informed, log_bf, 0.0)

    @torch.no_grad()
    def update_prior_(self):
        alpha = self._update_spike_()
        second = alpha * (self.mean**2 + torch.exp(-self.log_prec))
        self.prior_log_prec.copy_(torch.log(alpha.sum(0)) - torch.log(second.sum(0)))

    def prior_precision(self):
        return torch.exp(self.prior_log_prec)

    def prior_summary(self):
        return {
            "prior_pi": torch.sigmoid(self.prior_logit) * self.active,
            "prior_scale": torch.exp(-0.5 * self.prior_log_prec),
        }

    @torch.no_grad()
    def posterior(self, extra_var=None) -> PointNormalPosterior:
        slab_sd = torch.exp(-0.5 * self._widened(self.log_prec, extra_var))
        return PointNormalPosterior(to_numpy(self.pip), to_numpy(self.mean), to_numpy(slab_sd))


class PointNormalPosterior(Posterior):
    """Posterior of an ``(m, k)`` matrix with independent point-normal entries.

    ``q(theta) = alpha N(mu, s^2) + (1 - alpha) delta_0``:

    * ``cdf(t) = alpha Phi((t - mu) / s) + (1 - alpha) 1[t >= 0]``;
    * ``lfsr = (1 - alpha) + alpha Phi(-|mu| / s)``;
    * quantiles in closed form, tail probabilities with ``scipy.special`` on
      the smaller tail so that they keep their relative precision.

    Parameters
    ----------
    pip : ndarray of shape (m, k)
        Posterior inclusion probability ``alpha``; 0 for a pruned factor.
    slab_mean : ndarray of shape (m, k)
        Mean ``mu`` of the slab (the normal component).
    slab_sd : ndarray of shape (m, k)
        Standard deviation ``s > 0`` of the slab.
    """

    #: the constructor's arrays, each with one row per entry's row (stacked by views)
    fields = ("pip", "slab_mean", "slab_sd")

    def __init__(self, pip, slab_mean, slab_sd):
        names = ("pip", "slab_mean", "slab_sd")
        self.pip, self.slab_mean, self.slab_sd = check_same_shape(names, (pip, slab_mean, slab_sd))
        if np.any((self.pip < 0) | (self.pip > 1)) or np.any(~(self.slab_sd > 0)):
            raise ValueError("pip must lie in [0, 1] and slab_sd must be > 0")

    @property
    def zero_mass(self):
        return 1.0 - self.pip

    @property
    def mean(self):
        """Posterior mean ``alpha mu``."""
        return self.pip * self.slab_mean

    @property
    def var(self):
        """Posterior variance ``alpha s^2 + alpha (1 - alpha) mu^2``."""
        a = self.pip
        return a * self.slab_sd**2 + a * (1.0 - a) * self.slab_mean**2

    def prob_below_zero(self):
        return self.pip * special.ndtr(-self.slab_mean / self.slab_sd)

    def prob_above_zero(self):
        return self.pip * special.ndtr(self.slab_mean / self.slab_sd)

    @property
    def lfsr(self):
        """Local false sign rate ``(1 - alpha) + alpha Phi(-|mu| / s)``."""
        return (1.0 - self.pip) + self.pip * special.ndtr(-np.abs(self.slab_mean) / self.slab_sd)

    @property
    def sign(self):
        """The sign the lfsr refers to: that of ``mu`` (0 where ``alpha = 0``)."""
        return np.where(self.pip > 0, np.sign(self.slab_mean), 0.0)

    def cdf(self, t):
        t = np.asarray(t, dtype=np.float64)
        slab = special.ndtr((t - self.slab_mean) / self.slab_sd)
        return self.pip * slab + (1.0 - self.pip) * (t >= 0)

    def quantile(self, q):
        q = self._check_levels(q)
        a, mu, s = self.pip, self.slab_mean, self.slab_sd
        below = a * special.ndtr(-mu / s)  # mass of the slab below 0
        with np.errstate(divide="ignore", invalid="ignore"):
            # lower part: alpha Phi((t - mu)/s) = q
            lower = mu + s * special.ndtri(q / a)
            # upper part: alpha (1 - Phi((t - mu)/s)) = 1 - q, solved on the upper tail
            upper = mu - s * special.ndtri((1.0 - q) / a)
        return np.where(q <= below, lower, np.where(q <= below + (1.0 - a), 0.0, upper))

    def sample(self, n_draws, random_state=None):
        rng = np.random.default_rng(random_state)
        shape = (n_draws,) + self.shape
        on = rng.random(shape) < self.pip
        return np.where(on, self.slab_mean + self.slab_sd * rng.standard_normal(shape), 0.0)
