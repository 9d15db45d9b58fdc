"""Observation models ``p(x_ij | eta_ij)`` and their expected log-likelihoods.

A likelihood is a small :class:`torch.nn.Module` that owns its per-feature
nuisance parameters (noise variance, inverse dispersion) and supplies

* ``log_prob(x, eta, log_s)`` -- elementwise ``log p(x | eta)``;
* ``expected_log_prob(x, eta_mean, eta_var, log_s, n_samples, generator)`` --
  elementwise ``E_q[log p(x | eta)]`` for ``eta ~ N(eta_mean, eta_var)``; the
  base class estimates it by Monte Carlo (local reparameterisation), a subclass
  with a closed form overrides it;
* ``mean(eta, log_s)`` -- the mean on the data scale, ``s * h(eta)``.

Adding a likelihood is a change in this module only: subclass
:class:`Likelihood` and add it to ``LIKELIHOODS`` (or pass an instance to the
estimator). Shapes: ``x``, ``eta`` are ``[n, p]`` (or broadcastable, e.g.
``[S, n, p]`` for ``eta``), ``log_s`` is ``[n, 1]`` or ``None``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from .links import LOG_2PI, Link, get_link

__all__ = [
    "Likelihood",
    "Gaussian",
    "Poisson",
    "NegativeBinomial",
    "LIKELIHOODS",
    "get_likelihood",
]

_HALF_LOG_2PI = 0.5 * LOG_2PI
# Stirling series is used for lgamma(z) at and above this argument.
_STIRLING_MIN = 8.0


class Likelihood(torch.nn.Module):
    """Base class of the observation models.

    Parameters
    ----------
    link : str or Link, default="softplus"
        Maps the linear predictor to the mean. Ignored by :class:`Gaussian`.
    """

    #: name under which the class is registered in ``LIKELIHOODS``
    name: str = ""
    #: the data must be non-negative integers
    is_count: bool = False

    def __init__(self, link: str | Link = "softplus"):
        super().__init__()
        self.link = get_link(link)
        if self.is_count and not self.link.positive:
            raise ValueError(
                f"the {self.name} likelihood needs a positive link, not {self.link.name!r}"
            )

    # -- set-up ---------------------------------------------------------------
    def initialize(self, feature_mean: np.ndarray, feature_var: np.ndarray) -> None:
        """Create the per-feature nuisance parameters from data summaries.

        Parameters
        ----------
        feature_mean, feature_var : ndarray of shape (p,)
            Per-feature mean of ``x / s`` and variance of the residual from the
            initial low-rank fit, on the data scale.
        """

    def variance_function(self, mu: np.ndarray) -> np.ndarray:
        """Variance of ``x`` at mean ``mu`` (numpy), used to weight the initialisation."""
        return np.ones_like(mu)

    # -- model ----------------------------------------------------------------
    def log_prob(
        self, x: torch.Tensor, eta: torch.Tensor, log_s: torch.Tensor | None
    ) -> torch.Tensor:
        """Elementwise ``log p(x | eta)``; shape of ``x`` broadcast with ``eta``."""
        raise NotImplementedError

    def mean(self, eta: torch.Tensor, log_s: torch.Tensor | None = None) -> torch.Tensor:
        """``E[x | eta] = s * h(eta)``."""
        mu = self.link(eta)
        return mu if log_s is None else mu * torch.exp(log_s)

    def expected_log_prob(
        self,
        x: torch.Tensor,
        eta_mean: torch.Tensor,
        eta_var: torch.Tensor,
        log_s: torch.Tensor | None,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Monte Carlo estimate of ``E_q[log p(x | eta)]``, elementwise ``[n, p]``.

        Draws ``eta = eta_mean + sqrt(eta_var) * eps`` (local reparameterisation,
        Kingma, Salimans & Welling 2015) ``n_samples`` times and averages.
        """
        tiny = torch.finfo(eta_var.dtype).tiny
        sd = torch.sqrt(torch.clamp(eta_var, min=tiny))
        eps = torch.randn(
            (n_samples,) + tuple(eta_mean.shape),
            generator=generator,
            device=eta_mean.device,
            dtype=eta_mean.dtype,
        )
        return self.log_prob(x, eta_mean + sd * eps, log_s).mean(0)

    def sample(self, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw data with the given mean ``s h(eta)`` (numpy, any shape ending in ``p``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sample()")

    def fitted_attributes(self) -> dict[str, np.ndarray]:
        """Fitted nuisance parameters, exposed by the estimator as attributes."""
        return {}

    def extra_repr(self) -> str:
        return f"link={self.link.name!r}"


class Gaussian(Likelihood):
    """``x_ij ~ N(eta_ij, sigma2_j)`` with learned per-feature noise variance.

    The expected log-likelihood is exact (no sampling):
    ``E[(x - eta)^2] = (x - E[eta])^2 + V[eta]``.

    The noise variance is bounded below by ``1e-6`` times the average feature
    variance, so a feature the model explains exactly (e.g. a constant one)
    cannot drive the ELBO to infinity; the bound never binds on noisy data.
    """

    name = "gaussian"

    def __init__(self, link: str | Link = "identity"):
        super().__init__("identity")

    def initialize(self, feature_mean, feature_var):
        var = np.asarray(feature_var, dtype=float)
        scale = float(np.mean(var)) if np.mean(var) > 0 else 1.0
        floor = 1e-6 * scale
        raw = np.log(np.maximum(var - floor, floor))
        self.register_buffer("var_floor", torch.tensor(floor))
        self.log_noise_var = torch.nn.Parameter(torch.as_tensor(raw).float())

    @property
    def noise_variance(self) -> torch.Tensor:
        return self.var_floor + torch.exp(self.log_noise_var)

    def log_prob(self, x, eta, log_s):
        var = self.noise_variance
        return -0.5 * (LOG_2PI + torch.log(var) + (x - eta) ** 2 / var)

    def expected_log_prob(self, x, eta_mean, eta_var, log_s, n_samples=1, generator=None):
        var = self.noise_variance
        return -0.5 * (LOG_2PI + torch.log(var) + ((x - eta_mean) ** 2 + eta_var) / var)

    def mean(self, eta, log_s=None):
        return eta

    def sample(self, mean, rng):
        sd = np.sqrt(self.noise_variance.detach().cpu().double().numpy())
        return mean + sd * rng.standard_normal(np.shape(mean))

    def fitted_attributes(self):
        return {"noise_variance_": self.noise_variance.detach().cpu().double().numpy()}


class Poisson(Likelihood):
    """``x_ij ~ Poisson(s_i h(eta_ij))``.

    ``log p = x log(s h(eta)) - s h(eta) - lgamma(x + 1)``, with ``log h``
    evaluated stably by the link (no ``log(softplus)`` underflow).
    """

    name = "poisson"
    is_count = True

    def log_prob(self, x, eta, log_s):
        log_mu = self.link.log(eta)
        mu = self.link(eta)
        if log_s is not None:
            log_mu = log_mu + log_s
            mu = mu * torch.exp(log_s)
        return x * log_mu - mu - torch.lgamma(x + 1.0)

    def variance_function(self, mu):
        return mu

    def sample(self, mean, rng):
        return rng.poisson(mean).astype(np.float64)


def _stirling_remainder(z: torch.Tensor) -> torch.Tensor:
    """``lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2]`` for ``z > 0``.

    Series in ``1/z`` above ``_STIRLING_MIN`` (error < 1e-10), direct below.
    """
    zs = torch.clamp(z, max=_STIRLING_MIN)
    direct = torch.lgamma(zs) - ((zs - 0.5) * torch.log(zs) - zs + _HALF_LOG_2PI)
    zl = torch.clamp(z, min=_STIRLING_MIN)
    inv = 1.0 / zl
    inv2 = inv * inv
    series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))
    return torch.where(z < _STIRLING_MIN, direct, series)


def lgamma_ratio(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + r) - lgamma(r)`` without cancellation when ``r >> x``.

    Written as ``x log(x + r) + (r - 1/2) log1p(x / r) - x`` plus the
    difference of Stirling remainders, every term of which is O(x) rather than
    O(r log r). Exact zero at ``x = 0``.
    """
    return (
        x * torch.log(x + r)
        + (r - 0.5) * torch.log1p(x / r)
        - x
        + _stirling_remainder(x + r)
        - _stirling_remainder(r)
    )


class NegativeBinomial(Likelihood):
    """``x_ij ~ NB(mean = s_i h(eta_ij), inverse dispersion r_j)``.

    Variance ``mu + mu^2 / r``. Evaluated in the logits form
    ``lgamma(x + r) - lgamma(r) - lgamma(x + 1) + r logsigmoid(-l) + x logsigmoid(l)``
    with ``l = log mu - log r``, exact at ``x = 0`` and float32-stable for
    ``r`` up to at least ``1e8`` (see :func:`lgamma_ratio`).
    """

    name = "negative_binomial"
    is_count = True

    def initialize(self, feature_mean, feature_var):
        # method of moments, r = mu^2 / (var - mu), kept in a sane range
        mu = np.maximum(np.asarray(feature_mean, dtype=float), 1e-8)
        excess = np.asarray(feature_var, dtype=float) - mu
        r = np.where(excess > 0, mu**2 / np.maximum(excess, 1e-12), 1e3)
        r = np.clip(r, 1e-2, 1e3)
        self.log_inverse_dispersion = torch.nn.Parameter(torch.as_tensor(np.log(r)).float())

    @property
    def inverse_dispersion(self) -> torch.Tensor:
        return torch.exp(self.log_inverse_dispersion)

    def log_prob(self, x, eta, log_s):
        log_r = self.log_inverse_dispersion
        r = torch.exp(log_r)
        log_mu = self.link.log(eta)
        if log_s is not None:
            log_mu = log_mu + log_s
        logits = log_mu - log_r
        return (
            lgamma_ratio(x, r)
            - torch.lgamma(x + 1.0)
            + r * F.logsigmoid(-logits)
            + x * F.logsigmoid(logits)
        )

    def variance_function(self, mu):
        r = self.inverse_dispersion.detach().cpu().double().numpy()
        return mu + mu**2 / r

    def sample(self, mean, rng):
        # numpy's NB(n, p) has mean n (1 - p) / p: n = r, p = r / (r + mean)
        r = self.inverse_dispersion.detach().cpu().double().numpy()
        return rng.negative_binomial(r, r / (r + mean)).astype(np.float64)

    def fitted_attributes(self):
        r = self.inverse_dispersion.detach().cpu().double().numpy()
        return {"inverse_dispersion_": r, "dispersion_": 1.0 / r}


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Gaussian, Poisson, NegativeBinomial)
}


def get_likelihood(likelihood: str | Likelihood, link: str | Link = "softplus") -> Likelihood:
    """Build a fresh likelihood from a registered name, or copy a given instance.

    Raises
    ------
    ValueError
        If the name is not registered.
    """
    if isinstance(likelihood, Likelihood):
        return copy.deepcopy(likelihood)
    if isinstance(likelihood, str) and likelihood in LIKELIHOODS:
        return LIKELIHOODS[likelihood](link)
    raise ValueError(
        f"unknown likelihood {likelihood!r}; expected one of {sorted(LIKELIHOODS)} "
        "or a spfa.likelihoods.Likelihood instance"
    )
