"""Point-exponential prior and posterior: non-negative loadings or factors.

For parts-based programmes (as flashier's non-negative EBMF), each entry is
zero or positive::

    prior      g_k = pi_k Exp(lambda_k) + (1 - pi_k) delta_0
    posterior  q(theta_ik) = alpha_ik N+(mu_ik, s_ik^2) + (1 - alpha_ik) delta_0

with ``N+(mu, s^2)`` the normal truncated to ``theta > 0``. With ``z = mu / s``,
``r(z) = phi(z) / Phi(z)`` (the inverse Mills ratio) and ``m(z) = z + r(z)``::

    E+[theta] = s m(z)        V+[theta] = s^2 (1 - r(z) m(z))
    H(N+) = log(sqrt(2 pi e) s) + log Phi(z) - z r(z) / 2
    KL = alpha log(alpha/pi) + (1-alpha) log((1-alpha)/(1-pi))
         + alpha [-H(N+) - log lambda + lambda E+[theta]]

so ``E[theta] >= 0`` exactly. ``mu / s << 0`` is common (an entry shrunk
towards zero), where ``z + r(z)`` and ``1 - r m`` cancel catastrophically:
they are computed in float64 (:func:`spfa.special.truncated_normal_moments`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special

from .._convert import to_numpy
from ..posterior import Posterior, check_same_shape
from ..special import normal_logpdf, truncated_normal_draw, truncated_normal_moments
from .base import PointMassFamily, as_tensor_like, start_second_moment
from .point_normal import PIP_START

__all__ = ["PointExponential", "PointExponentialPosterior"]

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


class PointExponential(PointMassFamily):
    """Point-exponential prior, point-truncated-normal posterior (non-negative).

    Parameters
    ----------
    m, k : int
        Shape of the matrix.
    """

    name = "point_exponential"
    support = "nonnegative"
    # ``mean`` and ``log_prec``: location mu and log 1 / s^2 of the slab's
    # (untruncated) normal
    prior_parameter_names = ("prior_logit", "prior_log_rate")

    def _slab(self, mu, log_prec):
        s = torch.exp(-0.5 * log_prec)
        m, v, h = truncated_normal_moments(mu / s)
        return s, m, v, h

    def _moments(self, logits, mu, log_prec):
        alpha = torch.sigmoid(logits)
        s, m, v, _ = self._slab(mu, log_prec)
        return alpha * s * m, alpha * s**2 * (v + (1 - alpha) * m**2)

    def _kl(self, logits, mu, log_prec):
        alpha, kl_spike = self._spike_kl(logits)
        s, m, _, h = self._slab(mu, log_prec)
        entropy = _HALF_LOG_2PI_E - 0.5 * log_prec + h
        rate = torch.exp(self.prior_log_rate)
        return kl_spike + alpha * (-entropy - self.prior_log_rate + rate * s * m)

    def _sample(self, generator, logits, mu, log_prec):
        on = torch.rand(mu.shape, generator=generator, device=mu.device) < torch.sigmoid(logits)
        uniform = torch.rand(mu.shape, generator=generator, device=mu.device, dtype=torch.float64)
        slab = truncated_normal_draw(mu, torch.exp(-0.5 * log_prec), uniform)
        return torch.where(on, slab, torch.zeros_like(mu))

    def _draw(self, n_draws, generator, logits, mu, log_prec):
        shape = (n_draws,) + tuple(mu.shape)
        on = torch.rand(shape, generator=generator, dtype=mu.dtype, device=mu.device)
        on = on < torch.sigmoid(logits)
        uniform = torch.rand(shape, generator=generator, dtype=torch.float64, device=mu.device)
        slab = truncated_normal_draw(mu.expand(shape), torch.exp(-0.5 * log_prec), uniform)
        return {"value": torch.where(on, slab, torch.zeros(())), "on": on}

    def _log_density(self, latent, prior, logits, mu, log_prec):
        value = latent["value"]
        if prior:
            slab = self.prior_log_rate - torch.exp(self.prior_log_rate) * value
            return self._spike_log_density(latent["on"], slab, self.prior_logit)
        log_sd = -0.5 * log_prec
        slab = normal_logpdf(value, mu, log_sd) - torch.special.log_ndtr(mu * torch.exp(-log_sd))
        return self._spike_log_density(latent["on"], slab, logits)

    @torch.no_grad()
    def start_prior_(self, values):
        positive = np.maximum(np.asarray(values, dtype=float), 0.0)
        # E_g[theta^2 | slab] = 2 / lambda^2
        rate = np.sqrt(2.0 / start_second_moment(positive))
        self.prior_logit.fill_(special.logit(PIP_START))
        self.prior_log_rate.copy_(as_tensor_like(np.log(rate), self.prior_log_rate))

    @torch.no_grad()
    def start_(self, values, precision, rows=None):
        index = self._index(rows)
        positive = np.maximum(np.asarray(values, dtype=float), 0.0)
        self.logits[index] = special.logit(PIP_START)
        self.mean[index] = as_tensor_like(positive, self.mean) / PIP_START
        prec = as_tensor_like(precision, self.log_prec) + self.prior_precision()
        self.log_prec[index] = torch.log(prec)

    @torch.no_grad()
    def update_prior_(self):
        alpha = self._update_spike_()
        s, m, _, _ = self._slab(self.mean, self.log_prec)
        self.prior_log_rate.copy_(torch.log(alpha.sum(0)) - torch.log((alpha * s * m).sum(0)))

    def prior_precision(self):
        # a normal with the slab's second moment 2 / lambda^2
        return 0.5 * torch.exp(2.0 * self.prior_log_rate)

    def prior_summary(self):
        return {
            "prior_pi": torch.sigmoid(self.prior_logit) * self.active,
            "prior_scale": torch.exp(-self.prior_log_rate),
        }

    @torch.no_grad()
    def posterior(self, extra_var=None) -> PointExponentialPosterior:
        # not widened: a truncated normal's mean moves with its scale
        scale = torch.exp(-0.5 * self._widened(self.log_prec, extra_var))
        return PointExponentialPosterior(to_numpy(self.pip), to_numpy(self.mean), to_numpy(scale))


class PointExponentialPosterior(Posterior):
    """Posterior of an ``(m, k)`` matrix with independent point-truncated-normal entries.

    ``q(theta) = alpha N+(loc, scale^2) + (1 - alpha) delta_0``, every draw
    ``>= 0``: the lfsr is ``1 - alpha`` and the reported sign is positive.

    Parameters
    ----------
    pip : ndarray of shape (m, k)
    loc, scale : ndarray of shape (m, k)
        Location and scale (``> 0``) of the normal that is truncated to ``theta > 0``.
    """

    #: the constructor's arrays, each with one row per entry's row (stacked by views)
    fields = ("pip", "loc", "scale")

    def __init__(self, pip, loc, scale):
        names = ("pip", "loc", "scale")
        self.pip, self.loc, self.scale = check_same_shape(names, (pip, loc, scale))
        if np.any((self.pip < 0) | (self.pip > 1)) or np.any(~(self.scale > 0)):
            raise ValueError("pip must lie in [0, 1] and scale must be > 0")
        m, v, _ = truncated_normal_moments(torch.from_numpy(self.loc / self.scale))
        self._m, self._v = m.numpy(), v.numpy()

    @property
    def zero_mass(self):
        return 1.0 - self.pip

    @property
    def mean(self):
        return self.pip * self.scale * self._m

    @property
    def var(self):
        a, s = self.pip, self.scale
        return a * s**2 * (self._v + (1.0 - a) * self._m**2)

    def prob_below_zero(self):
        return np.zeros(self.shape)

    def prob_above_zero(self):
        return self.pip

    def _upper_tail(self, t) -> np.ndarray:
        """``P+(theta > t)`` for ``t >= 0`` (of the truncated normal alone)."""
        z = self.loc / self.scale
        log_tail = special.log_ndtr((self.loc - t) / self.scale) - special.log_ndtr(z)
        return np.exp(np.minimum(log_tail, 0.0))

    def cdf(self, t):
        t = np.asarray(t, dtype=np.float64)
        inside = 1.0 - self._upper_tail(np.maximum(t, 0.0))
        return np.where(t < 0, 0.0, (1.0 - self.pip) + self.pip * inside)

    def quantile(self, q):
        q = self._check_levels(q)
        a = self.pip
        with np.errstate(divide="ignore", invalid="ignore"):
            # P+(theta > t) = (1 - q) / alpha, solved on the upper tail in log space
            log_p = np.log((1.0 - q) / a) + special.log_ndtr(self.loc / self.scale)
            direct = self.loc - self.scale * special.ndtri(np.exp(log_p))
            # where exp(log_p) underflows, the exponential tail of rate -z / scale
            expo = -self.scale * np.log((1.0 - q) / a) / np.maximum(-self.loc / self.scale, 1.0)
        slab = np.where(log_p < -700, expo, direct)
        return np.where(q <= 1.0 - a, 0.0, np.maximum(slab, 0.0))

    def sample(self, n_draws, random_state=None):
        rng = np.random.default_rng(random_state)
        shape = (n_draws,) + self.shape
        on = rng.random(shape) < self.pip
        uniform = torch.from_numpy(rng.random(shape))
        loc = torch.from_numpy(np.broadcast_to(self.loc, shape).copy())
        slab = truncated_normal_draw(loc, torch.from_numpy(self.scale), uniform).numpy()
        return np.where(on, slab, 0.0)
