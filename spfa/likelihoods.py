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
from scipy import stats

from ._validation import check_positive_int
from .expectation import Expectation
from .links import LOG_2PI, Link, get_link, log_softplus

__all__ = [
    "Likelihood",
    "Gaussian",
    "Poisson",
    "NegativeBinomial",
    "NegativeBinomialShared",
    "NegativeBinomialFull",
    "ZeroInflatedNegativeBinomial",
    "ZeroTruncatedPoisson",
    "ZeroTruncatedNegativeBinomial",
    "LIKELIHOODS",
    "get_likelihood",
]

_HALF_LOG_2PI = 0.5 * LOG_2PI
# Stirling series is used for lgamma(z) at and above this argument.
_STIRLING_MIN = 8.0
# NB inverse dispersions are smoothly bounded by 1e10 (see log_inverse_dispersion_at)
_R_MAX = 1e10
_LOG_R_MAX = float(np.log(_R_MAX))


# log(1 - exp(-a)) = log(a) - a/2 + O(a^2): below this log(a) it equals log(a) in float64
_LOG1MEXP_TINY = -20.0
_LOG_2 = float(np.log(2.0))


def log1mexp_from_log(log_a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-a))`` for ``a > 0`` given ``log a``, stable for every ``a``.

    Three branches (Maechler 2012), each fed only inputs where it is accurate
    so that none produces inf/NaN gradients through ``torch.where``:
    ``log a - a/2`` for tiny ``a`` (where ``a`` itself may underflow),
    ``log(-expm1(-a))`` up to ``a = log 2`` and ``log1p(-exp(-a))`` above.
    """
    tiny = log_a < _LOG1MEXP_TINY
    small = log_a < float(np.log(_LOG_2))
    a_tiny = torch.exp(torch.clamp(log_a, max=_LOG1MEXP_TINY))
    a_mid = torch.exp(torch.clamp(log_a, min=_LOG1MEXP_TINY, max=float(np.log(_LOG_2))))
    a_big = torch.exp(torch.clamp(log_a, min=float(np.log(_LOG_2))))
    return torch.where(
        tiny,
        torch.clamp(log_a, max=_LOG1MEXP_TINY) - 0.5 * a_tiny,
        torch.where(small, torch.log(-torch.expm1(-a_mid)), torch.log1p(-torch.exp(-a_big))),
    )


class Likelihood(torch.nn.Module):
    """Base class of the observation models.

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

    Helpers :meth:`per_feature` and :meth:`per_entry` do the gathering.
    """

    #: name under which the class is registered in ``LIKELIHOODS``
    name: str = ""
    #: the data must be non-negative integers
    is_count: bool = False
    #: False for a model of the non-zero entries only (zero-truncated): the
    #: estimator then fits the non-zero entries and nothing else
    observes_zeros: bool = True
    #: names of parameters with one row per sample (``[n, d]``): like the
    #: loadings they are refitted for new samples and not shared
    row_parameters: tuple[str, ...] = ()
    #: gather per-sample parameters with sparse gradients (set by the model
    #: during minibatch training, so that SparseAdam updates only the batch's rows)
    sparse_rows: bool = False

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

    def initialize_rows(self, n_samples: int) -> None:
        """Create the per-sample parameters listed in ``row_parameters`` (if any)."""

    def variance_function(self, mu: np.ndarray) -> np.ndarray:
        """Variance of ``x`` at mean ``mu`` (numpy), used to weight the initialisation."""
        return np.ones_like(mu)

    # -- indexing helpers -----------------------------------------------------
    @staticmethod
    def per_feature(param: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        """A per-feature parameter ``[p]`` for the grid (``[p]``) or the entries (``[m]``)."""
        return param if cols is None or param.dim() == 0 else param[cols]

    def per_entry(
        self,
        row_factors: torch.Tensor,
        feature_factors: torch.Tensor,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
    ) -> torch.Tensor:
        """Low-rank term ``U V^T`` (``U``: ``[n, d]``, ``V``: ``[p, d]``) at the entries."""
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
        """``log(s h(eta))``, stable for every finite ``eta``."""
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
        """Elementwise ``log p(x | eta)``; shape of ``x`` broadcast with ``eta``."""
        raise NotImplementedError

    def mean(self, eta: torch.Tensor, log_s: torch.Tensor | None = None) -> torch.Tensor:
        """``E[x | eta]`` on the grid of all features, ``s h(eta)`` for most models."""
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
        """
        eta, weights = expectation.points(eta_mean, eta_var, generator)
        return (weights * self.log_prob(x, eta, log_s, rows, cols)).sum(0)

    def sample(self, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw data at the grid mean ``s h(eta)`` (numpy, ``[..., n, p]``) of the training rows."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sample()")

    def fitted_attributes(self) -> dict[str, np.ndarray]:
        """Fitted nuisance parameters, exposed by the estimator as attributes."""
        return {}

    def extra_repr(self) -> str:
        return f"link={self.link.name!r}"


class Gaussian(Likelihood):
    """``x_ij ~ N(eta_ij, sigma2_j)`` with learned per-feature noise variance.

    The expected log-likelihood is exact (no sampling, whatever the
    ``expectation`` rule): ``E[(x - eta)^2] = (x - E[eta])^2 + V[eta]``.

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

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        var = self.per_feature(self.noise_variance, cols)
        return -0.5 * (LOG_2PI + torch.log(var) + (x - eta) ** 2 / var)

    def expected_log_prob(
        self, x, eta_mean, eta_var, log_s, expectation, generator=None, rows=None, cols=None
    ):
        var = self.per_feature(self.noise_variance, cols)
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

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        log_mu = self.log_mean(eta, log_s)
        return x * log_mu - torch.exp(log_mu) - torch.lgamma(x + 1.0)

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


def _bound_log_r(t: torch.Tensor) -> torch.Tensor:
    """``log r`` from its unconstrained value: smoothly below ``log(1e8)``."""
    return _LOG_R_MAX - F.softplus(_LOG_R_MAX - t)


class NegativeBinomial(Likelihood):
    """``x_ij ~ NB(mean = s_i h(eta_ij), inverse dispersion r_ij)``.

    Variance ``mu + mu^2 / r``. Evaluated in the logits form
    ``lgamma(x + r) - lgamma(r) - lgamma(x + 1) + r logsigmoid(-l) + x logsigmoid(l)``
    with ``l = log mu - log r``, exact at ``x = 0`` and float32-stable for
    ``r`` up to at least ``1e8`` (see :func:`lgamma_ratio`).

    Parameters
    ----------
    link : str or Link, default="softplus"
    dispersion : {"feature", "shared", "full"}, default="feature"
        How ``r`` varies (``log r`` is unconstrained in every case, so any
        ``r > 0`` is reachable: overdispersion far above Poisson's as well as
        close to it):

        * ``"feature"`` -- one ``r_j`` per feature, the usual choice for
          single-cell and bulk RNA-seq, where genes differ in their
          biological variability;
        * ``"shared"`` -- one ``r`` for all entries: few samples per feature
          (a per-feature ``r`` would be poorly determined), or technical
          noise known to be common to all features;
        * ``"full"`` -- ``log r_ij = a_j + u_i . v_j`` with a rank
          ``dispersion_rank`` term of its own (per-sample ``u_i`` are refitted
          for new samples, like the loadings): when overdispersion differs
          between groups of samples (batches, cell types, sequencing depth)
          in a way the mean does not capture. It costs ``(n + p) d`` more
          parameters, estimated by maximum likelihood.
    dispersion_rank : int, default=1
        ``d`` of the ``"full"`` dispersion.
    """

    name = "negative_binomial"
    is_count = True
    DISPERSIONS = ("feature", "shared", "full")

    def __init__(
        self, link: str | Link = "softplus", dispersion: str = "feature", dispersion_rank: int = 1
    ):
        super().__init__(link)
        if dispersion not in self.DISPERSIONS:
            raise ValueError(f"dispersion must be one of {self.DISPERSIONS}, got {dispersion!r}")
        self.dispersion = dispersion
        self.dispersion_rank = check_positive_int(dispersion_rank, "dispersion_rank")
        if dispersion == "full":
            self.row_parameters = ("dispersion_rows",)

    def initialize(self, feature_mean, feature_var):
        # method of moments, r = mu^2 / (var - mu), kept in a sane range
        mu = np.maximum(np.asarray(feature_mean, dtype=float), 1e-8)
        excess = np.asarray(feature_var, dtype=float) - mu
        r = np.where(excess > 0, mu**2 / np.maximum(excess, 1e-12), 1e3)
        log_r = np.log(np.clip(r, 1e-2, 1e3))
        self.n_features = log_r.size
        if self.dispersion == "shared":
            log_r = np.asarray(np.median(log_r))
        self.log_inverse_dispersion = torch.nn.Parameter(torch.as_tensor(log_r).float())
        if self.dispersion == "full":
            # u = 0 (r starts per feature) and v's first column 1, so that u_i
            # starts as a per-sample shift of log r, the strongest single
            # direction; further columns start small and random (fixed seed)
            # so that no two are at the symmetric saddle
            gen = torch.Generator().manual_seed(0)
            v = 0.1 * torch.randn(log_r.size, self.dispersion_rank, generator=gen)
            v[:, 0] = 1.0
            self.dispersion_features = torch.nn.Parameter(v)

    def initialize_rows(self, n_samples):
        if self.dispersion == "full":
            rows = torch.zeros(n_samples, self.dispersion_rank)
            self.dispersion_rows = torch.nn.Parameter(rows)

    def log_inverse_dispersion_at(self, rows=None, cols=None) -> torch.Tensor:
        """``log r`` at the entries (``[p]`` or ``[n, p]`` on the grid, ``[m]`` at entries).

        The unconstrained value ``t`` is mapped to ``log r = c - softplus(c - t)``
        with ``c = log(1e10)``: the identity (to 1e-7) for ``r <= 1e3`` and a
        smooth bound ``r < 1e10`` above. Data with no overdispersion (Poisson)
        drive the maximum-likelihood ``r`` to infinity (and, through the
        ``"full"`` product ``u_i v_j``, to float32 overflow); the bound keeps it
        where the log-probability is accurate in float32, and an NB with
        ``r = 1e10`` differs from the Poisson by a variance of ``mu^2 / 1e10``,
        which no count data can detect. It is a reparameterisation, not a
        penalty: every ``r`` below the bound is reachable.
        """
        log_r = self.per_feature(self.log_inverse_dispersion, cols)
        if self.dispersion == "full":
            log_r = log_r + self.per_entry(
                self.dispersion_rows, self.dispersion_features, rows, cols
            )
        return _bound_log_r(log_r)

    def set_inverse_dispersion(self, r) -> None:
        """Set the per-feature (or shared) ``r``, each in ``(0, 1e10)``, e.g. to fix it."""
        r = torch.as_tensor(r, dtype=torch.float64)
        if not bool(torch.all((r > 0) & (r < _R_MAX))):
            raise ValueError(f"inverse dispersions must lie in (0, {_R_MAX:g}), got {r}")
        t = _LOG_R_MAX - torch.log(torch.expm1(_LOG_R_MAX - torch.log(r)))
        with torch.no_grad():
            self.log_inverse_dispersion.copy_(t.expand_as(self.log_inverse_dispersion))

    @property
    def inverse_dispersion(self) -> torch.Tensor:
        """``r`` of the training entries: ``[p]``, or ``[n, p]`` for ``"full"``."""
        r = torch.exp(self.log_inverse_dispersion_at())
        return r.expand(self.n_features) if r.dim() == 0 else r

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        log_r = self.log_inverse_dispersion_at(rows, cols)
        logits = self.log_mean(eta, log_s) - log_r
        return (
            lgamma_ratio(x, torch.exp(log_r))
            - torch.lgamma(x + 1.0)
            + torch.exp(log_r) * F.logsigmoid(-logits)
            + x * F.logsigmoid(logits)
        )

    def _baseline_inverse_dispersion(self) -> np.ndarray:
        """Per-feature (or shared) ``r``, numpy; for ``"full"`` the baseline ``exp(bound(a_j))``."""
        return torch.exp(_bound_log_r(self.log_inverse_dispersion)).detach().cpu().double().numpy()

    def variance_function(self, mu):
        return mu + mu**2 / self._baseline_inverse_dispersion()

    def sample(self, mean, rng):
        # numpy's NB(n, p) has mean n (1 - p) / p: n = r, p = r / (r + mean)
        r = self.inverse_dispersion.detach().cpu().double().numpy()
        return rng.negative_binomial(r, r / (r + mean)).astype(np.float64)

    def fitted_attributes(self):
        r = np.broadcast_to(self._baseline_inverse_dispersion(), (self.n_features,)).copy()
        out = {"inverse_dispersion_": r, "dispersion_": 1.0 / r}
        if self.dispersion == "full":
            out["dispersion_row_factors_"] = self.dispersion_rows.detach().cpu().double().numpy()
            out["dispersion_feature_factors_"] = (
                self.dispersion_features.detach().cpu().double().numpy()
            )
        return out

    def extra_repr(self) -> str:
        return f"link={self.link.name!r}, dispersion={self.dispersion!r}"


class NegativeBinomialShared(NegativeBinomial):
    """:class:`NegativeBinomial` with one inverse dispersion ``r`` for all entries."""

    name = "negative_binomial_shared"

    def __init__(self, link: str | Link = "softplus"):
        super().__init__(link, dispersion="shared")


class NegativeBinomialFull(NegativeBinomial):
    """:class:`NegativeBinomial` with per-entry ``log r_ij = a_j + u_i . v_j`` (rank 1)."""

    name = "negative_binomial_full"

    def __init__(self, link: str | Link = "softplus", dispersion_rank: int = 1):
        super().__init__(link, dispersion="full", dispersion_rank=dispersion_rank)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """``x_ij ~ pi_j delta_0 + (1 - pi_j) NB(s_i h(eta_ij), r_j)``: zero-inflated NB.

    A per-feature zero-inflation probability ``pi_j = sigmoid(psi_j)`` (as in
    scVI's ZINB) with per-feature ``r_j``. In log space,
    ``log p(0) = logaddexp(log pi, log(1 - pi) + log NB(0))`` and
    ``log p(x > 0) = log(1 - pi) + log NB(x)``, each from ``logsigmoid`` and
    finite with finite gradients for every ``psi``. The mean is
    ``(1 - pi) s h(eta)``; ``L`` and ``F`` describe the NB part.
    """

    name = "zinb"

    def __init__(self, link: str | Link = "softplus"):
        super().__init__(link, dispersion="feature")

    def initialize(self, feature_mean, feature_var):
        super().initialize(feature_mean, feature_var)
        # start at pi = 0.05: free to grow where zeros are in excess, or to vanish
        start = torch.full((self.n_features,), float(np.log(0.05 / 0.95)))
        self.zero_logit = torch.nn.Parameter(start)

    @property
    def zero_inflation(self) -> torch.Tensor:
        return torch.sigmoid(self.zero_logit)

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        psi = self.per_feature(self.zero_logit, cols)
        log_keep = F.logsigmoid(-psi) + super().log_prob(x, eta, log_s, rows, cols)
        return torch.where(x > 0, log_keep, torch.logaddexp(F.logsigmoid(psi), log_keep))

    def mean(self, eta, log_s=None):
        return torch.sigmoid(-self.zero_logit) * super().mean(eta, log_s)

    def sample(self, mean, rng):
        keep = 1.0 - self.zero_inflation.detach().cpu().double().numpy()
        counts = super().sample(mean / keep, rng)
        return np.where(rng.uniform(size=np.shape(counts)) < keep, counts, 0.0)

    def fitted_attributes(self):
        out = super().fitted_attributes()
        out["zero_inflation_"] = self.zero_inflation.detach().cpu().double().numpy()
        return out

    def extra_repr(self) -> str:
        return f"link={self.link.name!r}"


class ZeroTruncatedPoisson(Poisson):
    """``x_ij | x_ij > 0 ~ Poisson(s_i h(eta_ij))`` truncated at zero.

    ``log p(x | x > 0) = log p(x) - log(1 - exp(-mu))``, with the second term
    from :func:`log1mexp_from_log` of ``log mu``, so it stays finite (and
    tends to ``log p(x) - log mu``) when ``mu`` underflows.

    Only the non-zero entries are fitted (``observes_zeros = False``), at a
    cost that scales with their number rather than ``n p``. The model then
    says how large a count is *given* that it is non-zero; it says nothing
    about which entries are zero (whether a zero is biological, technical or
    a dropped entry), so it cannot be used to predict or score zeros, and
    a feature that is rarely non-zero is barely informed. ``mean`` and
    ``inverse_transform`` give the untruncated ``s h(eta)``; ``sample`` draws
    from the truncated distribution at every entry.
    """

    name = "zt_poisson"
    observes_zeros = False

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        log_mu = self.log_mean(eta, log_s)
        return x * log_mu - torch.exp(log_mu) - torch.lgamma(x + 1.0) - log1mexp_from_log(log_mu)

    def sample(self, mean, rng):
        p0 = np.exp(-mean)
        return stats.poisson.ppf(rng.uniform(p0, 1.0), mean).astype(np.float64)


class ZeroTruncatedNegativeBinomial(NegativeBinomial):
    """``x_ij | x_ij > 0 ~ NB(s_i h(eta_ij), r_j)`` truncated at zero.

    ``log p(0) = -r softplus(l)`` with ``l = log mu - log r``, so
    ``log(-log p(0)) = log r + log softplus(l)`` is available in log space and
    ``log(1 - p(0))`` comes from :func:`log1mexp_from_log`. Fitted to the
    non-zero entries only; see :class:`ZeroTruncatedPoisson` for what that
    does and does not say about the zeros.
    """

    name = "zt_negative_binomial"
    observes_zeros = False

    def __init__(self, link: str | Link = "softplus"):
        super().__init__(link, dispersion="feature")

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        log_r = self.log_inverse_dispersion_at(rows, cols)
        log_a = log_r + log_softplus(self.log_mean(eta, log_s) - log_r)
        return super().log_prob(x, eta, log_s, rows, cols) - log1mexp_from_log(log_a)

    def sample(self, mean, rng):
        r = self.inverse_dispersion.detach().cpu().double().numpy()
        prob = r / (r + mean)
        p0 = np.exp(r * np.log(prob))
        return stats.nbinom.ppf(rng.uniform(p0, 1.0), r, prob).astype(np.float64)

    def extra_repr(self) -> str:
        return f"link={self.link.name!r}"


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls
    for cls in (
        Gaussian,
        Poisson,
        NegativeBinomial,
        NegativeBinomialShared,
        NegativeBinomialFull,
        ZeroInflatedNegativeBinomial,
        ZeroTruncatedPoisson,
        ZeroTruncatedNegativeBinomial,
    )
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
