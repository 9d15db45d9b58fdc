"""Scale mixture of normals on a fixed grid (adaptive shrinkage, as ash / flash).

For an ``m x k`` matrix::

    prior      g_k = sum_c w_kc N(0, sigma_kc^2)            (grid sigma fixed, w learned)
    posterior  q(theta_ik, z_ik = c) = psi_ikc N(mu_ikc, s_ikc^2)

The KL is that of the joint of ``theta`` and the component ``z`` (the usual
mean-field treatment of a mixture prior, an upper bound on the KL of the
marginal)::

    KL = sum_c psi_c [log(psi_c / w_c) + KL(N(mu_c, s_c^2) || N(0, sigma_c^2))]
    E[theta] = sum_c psi_c mu_c      V[theta] = sum_c psi_c (s_c^2 + (mu_c - E[theta])^2)

There is no point mass: no entry is exactly zero, shrinkage is continuous and
significance is read from the lfsr. The grid is geometric, ``2^-6 .. 2`` times
each factor's scale at the start (the scale of a factor is traded freely
between ``L`` and ``F``, so a fixed grid loses nothing).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import special

from .._convert import to_numpy
from ..posterior import Posterior, check_same_shape
from ..special import normal_logpdf
from .base import PriorFamily, as_tensor_like, start_second_moment

__all__ = ["NormalMixture", "NormalMixturePosterior", "GRID_MULTIPLIERS"]

#: grid of prior standard deviations, relative to each factor's starting scale
GRID_MULTIPLIERS = 2.0 ** np.arange(-6, 2)


class NormalMixture(PriorFamily):
    """Normal scale-mixture prior and mixture-of-normals posterior.

    Parameters
    ----------
    m, k : int
        Shape of the matrix.
    """

    name = "normal_mixture"
    widens = True
    sign_symmetric = True
    n_values = len(GRID_MULTIPLIERS)
    row_parameter_names = ("logits", "mean", "log_prec")
    prior_parameter_names = ("prior_logits",)
    factor_buffer_names = ("grid_log_sd",)

    def __init__(self, m: int, k: int):
        super().__init__(m, k)
        grid = torch.as_tensor(np.log(GRID_MULTIPLIERS), dtype=torch.float32)
        self.register_buffer("grid_log_sd", grid.expand(k, self.n_values).clone())

    def _moments(self, logits, mu, log_prec):
        psi = torch.softmax(logits, -1)
        mean = (psi * mu).sum(-1)
        var = (psi * (torch.exp(-log_prec) + (mu - mean.unsqueeze(-1)) ** 2)).sum(-1)
        return mean, var

    def _kl(self, logits, mu, log_prec):
        log_psi = torch.log_softmax(logits, -1)
        log_w = torch.log_softmax(self.prior_logits, -1)
        log_var = 2.0 * self.grid_log_sd
        kl_normal = 0.5 * (
            log_var + log_prec - 1.0 + (torch.exp(-log_prec) + mu**2) * torch.exp(-log_var)
        )
        return (torch.exp(log_psi) * (log_psi - log_w + kl_normal)).sum(-1)

    def _component(self, logits, generator, shape):
        """Component draws by the Gumbel-max trick, ``shape[:-1]`` of int."""
        u = torch.rand(shape, generator=generator, device=logits.device, dtype=logits.dtype)
        tiny = torch.finfo(u.dtype).tiny
        gumbel = -torch.log(-torch.log(torch.clamp(u, min=tiny)))
        return torch.argmax(torch.log_softmax(logits, -1) + gumbel, dim=-1)

    def _sample(self, generator, logits, mu, log_prec):
        z = self._component(logits, generator, logits.shape).unsqueeze(-1)
        eps = torch.randn(mu.shape[:-1], generator=generator, device=mu.device, dtype=mu.dtype)
        pick = lambda t: t.gather(-1, z).squeeze(-1)  # noqa: E731
        return pick(mu) + torch.exp(-0.5 * pick(log_prec)) * eps

    def _draw(self, n_draws, generator, logits, mu, log_prec):
        shape = (n_draws,) + tuple(logits.shape)
        z = self._component(logits, generator, shape).unsqueeze(-1)
        eps = torch.randn(shape[:-1], generator=generator, dtype=mu.dtype, device=mu.device)
        mu, log_prec = mu.expand(shape), log_prec.expand(shape)
        value = (
            mu.gather(-1, z).squeeze(-1)
            + torch.exp(-0.5 * log_prec.gather(-1, z)).squeeze(-1) * eps
        )
        return {"value": value, "component": z.squeeze(-1)}

    def _log_density(self, latent, prior, logits, mu, log_prec):
        value, z = latent["value"], latent["component"].unsqueeze(-1)
        if prior:
            log_w = torch.log_softmax(self.prior_logits, -1).expand(value.shape + (-1,))
            log_sd = self.grid_log_sd.expand(value.shape + (-1,))
            return log_w.gather(-1, z).squeeze(-1) + normal_logpdf(
                value, 0.0, log_sd.gather(-1, z).squeeze(-1)
            )
        shape = value.shape + (self.n_values,)
        log_psi = torch.log_softmax(logits, -1).expand(shape).gather(-1, z).squeeze(-1)
        mean = mu.expand(shape).gather(-1, z).squeeze(-1)
        log_sd = -0.5 * log_prec.expand(shape).gather(-1, z).squeeze(-1)
        return log_psi + normal_logpdf(value, mean, log_sd)

    @torch.no_grad()
    def start_prior_(self, values):
        rms = np.sqrt(start_second_moment(values))
        grid = np.log(rms)[:, None] + np.log(GRID_MULTIPLIERS)[None, :]
        self.grid_log_sd.copy_(as_tensor_like(grid, self.grid_log_sd))
        self.prior_logits.zero_()

    @torch.no_grad()
    def start_(self, values, precision, rows=None):
        """The normal-means posterior of each entry given ``values`` observed with
        ``precision`` (as ash does): component ``c`` has precision
        ``precision + 1/sigma_c^2``, the shrunk mean, and responsibility
        ``w_c N(values; 0, sigma_c^2 + 1/precision)``."""
        index = self._index(rows)
        values = as_tensor_like(values, self.mean).unsqueeze(-1)
        precision = as_tensor_like(precision, self.log_prec).unsqueeze(-1)
        b = values.shape[0]
        prior_var = torch.exp(2.0 * self.grid_log_sd)
        prec = precision + 1.0 / prior_var
        self.mean[index] = (precision * values / prec).reshape(b, -1)
        self.log_prec[index] = torch.log(prec).reshape(b, -1)
        # no data on an entry (a row or feature with nothing observed): the prior
        informed = (precision > 0).expand(-1, -1, self.n_values)
        # log(sigma_c^2 + 1/precision) in log space: a tiny precision (a factor the start
        # barely sees) overflows 1/precision in float32
        log_data_var = -torch.log(torch.where(informed, precision, 1.0))
        log_marginal_var = torch.logaddexp(2.0 * self.grid_log_sd, log_data_var)
        log_w = torch.log_softmax(self.prior_logits, -1)
        log_resp = log_w + normal_logpdf(values, 0.0, 0.5 * log_marginal_var)
        log_resp = torch.where(informed, log_resp, log_w.expand_as(log_resp))
        self.logits[index] = torch.log_softmax(log_resp, -1).reshape(b, -1)

    @torch.no_grad()
    def update_prior_(self):
        (logits,) = self._rows(None, False)[:1]
        self.prior_logits.copy_(torch.log(torch.softmax(logits, -1).mean(0)))

    def _prior_var(self):
        w = torch.softmax(self.prior_logits, -1)
        return (w * torch.exp(2.0 * self.grid_log_sd)).sum(-1)

    def prior_precision(self):
        return 1.0 / self._prior_var()

    def prior_summary(self):
        return {
            "prior_scale": torch.sqrt(self._prior_var()) * self.active,
            "prior_weights": torch.softmax(self.prior_logits, -1) * self.active.unsqueeze(-1),
        }

    @torch.no_grad()
    def posterior(self, extra_var=None) -> NormalMixturePosterior:
        logits, mu, log_prec = self._rows(None, False)
        log_prec = self._widened(log_prec, extra_var)
        active = to_numpy(self.active).astype(bool)
        return NormalMixturePosterior(
            to_numpy(torch.softmax(logits, -1)),
            to_numpy(mu),
            to_numpy(torch.exp(-0.5 * log_prec)),
            np.broadcast_to(active, (self.m, self.k)),
        )


class NormalMixturePosterior(Posterior):
    """Posterior of an ``(m, k)`` matrix whose entries are mixtures of normals.

    Parameters
    ----------
    weights, means, sds : ndarray of shape (m, k, C)
        Component probabilities (summing to 1 over the last axis), means and
        standard deviations (``> 0``).
    active : ndarray of bool, shape (m, k), optional
        False for a switched-off factor, whose entries are exactly 0.
    """

    #: the constructor's arrays, each with one row per entry's row (stacked by views)
    fields = ("weights", "means", "sds", "active")

    def __init__(self, weights, means, sds, active=None):
        self.weights, self.means, self.sds = check_same_shape(
            ("weights", "means", "sds"), (weights, means, sds)
        )
        if self.weights.ndim != 3 or np.any(~(self.sds > 0)):
            raise ValueError("weights, means and sds must be (m, k, C), with sds > 0")
        if not np.allclose(self.weights.sum(-1), 1.0):
            raise ValueError("the component weights of each entry must sum to 1")
        shape = self.weights.shape[:2]
        self.active = np.ones(shape, bool) if active is None else np.asarray(active, bool)

    @property
    def shape(self):
        return self.weights.shape[:2]

    @property
    def pip(self):
        """1 for every entry of a kept factor: ``q`` has no point mass at zero."""
        return self.active.astype(np.float64)

    @property
    def zero_mass(self):
        return 1.0 - self.pip

    @property
    def mean(self):
        return self.pip * (self.weights * self.means).sum(-1)

    @property
    def var(self):
        centre = (self.weights * self.means).sum(-1, keepdims=True)
        spread = (self.weights * (self.sds**2 + (self.means - centre) ** 2)).sum(-1)
        return self.pip * spread

    def _mixture_cdf(self, t) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)[..., None]
        return (self.weights * special.ndtr((t - self.means) / self.sds)).sum(-1)

    def prob_below_zero(self):
        return self.pip * self._mixture_cdf(0.0)

    def prob_above_zero(self):
        return self.pip * (self.weights * special.ndtr(self.means / self.sds)).sum(-1)

    def cdf(self, t):
        t = np.asarray(t, dtype=np.float64)
        return self.pip * self._mixture_cdf(t) + self.zero_mass * (t >= 0)

    def sample(self, n_draws, random_state=None):
        rng = np.random.default_rng(random_state)
        shape = (n_draws,) + self.shape
        cum = np.cumsum(self.weights, -1)
        z = (rng.random(shape)[..., None] > cum).sum(-1)
        z = np.minimum(z, self.weights.shape[-1] - 1)[..., None]
        mean = np.take_along_axis(np.broadcast_to(self.means, shape + (cum.shape[-1],)), z, -1)
        sd = np.take_along_axis(np.broadcast_to(self.sds, shape + (cum.shape[-1],)), z, -1)
        value = mean[..., 0] + sd[..., 0] * rng.standard_normal(shape)
        return np.where(self.active, value, 0.0)
