"""The negative binomial likelihood, with per-feature, shared or low-rank dispersion."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from .._validation import check_positive_int
from ..links import Link
from ..special import lgamma_ratio, log_softplus
from .base import Likelihood

__all__ = ["NegativeBinomial", "NegativeBinomialShared", "NegativeBinomialFull"]

# NB inverse dispersions are smoothly bounded to (1e-10, 1e10) (see log_inverse_dispersion_at)
_R_MIN, _R_MAX = 1e-10, 1e10
_LOG_R_MIN, _LOG_R_MAX = math.log(_R_MIN), math.log(_R_MAX)


def _bound_log_r(t: torch.Tensor) -> torch.Tensor:
    """``log r`` from its unconstrained value ``t``: smoothly inside
    ``(log 1e-10, log 1e10)``, the identity (to 1e-7) for ``1e-3 <= r <= 1e3``."""
    upper = _LOG_R_MAX - F.softplus(_LOG_R_MAX - t)
    return _LOG_R_MIN + F.softplus(upper - _LOG_R_MIN)


def _unbound_log_r(log_r: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_bound_log_r`, for ``log r`` inside the bounds."""
    upper = _LOG_R_MIN + torch.log(torch.expm1(log_r - _LOG_R_MIN))
    return _LOG_R_MAX - torch.log(torch.expm1(_LOG_R_MAX - upper))


class NegativeBinomial(Likelihood):
    """``x_ij ~ NB(mean mu_ij = s_i h(eta_ij), inverse dispersion r_ij)``.

    Variance ``mu + mu^2 / r``. Evaluated in the logits form
    ``lgamma(x + r) - lgamma(r) - lgamma(x + 1) + r logsigmoid(-l) + x logsigmoid(l)``
    with ``l = log mu - log r``, exact at ``x = 0`` and float32-stable for
    ``r`` up to at least ``1e8`` (see :func:`spfa.special.lgamma_ratio`).
    ``log p(0) = -r softplus(l)``, so ``log(-log p(0)) = log r + log softplus(l)``.

    Parameters
    ----------
    link : str or Link, default="softplus"
        A positive link.
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
    integer_support = True
    positive_mean = True
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

        The unconstrained value ``t`` is mapped to ``u = c - softplus(c - t)``
        with ``c = log(1e10)``, then to ``log r = d + softplus(u - d)`` with
        ``d = log(1e-10)``: the identity (to 1e-7) for ``1e-3 <= r <= 1e3`` and
        smooth bounds ``1e-10 < r < 1e10``. Data with no overdispersion (Poisson)
        drive the maximum-likelihood ``r`` to infinity (and, through the
        ``"full"`` product ``u_i v_j``, to float32 overflow); the upper bound keeps
        it where the log-probability is accurate in float32, and an NB with
        ``r = 1e10`` differs from the Poisson by a variance of ``mu^2 / 1e10``,
        which no count data can detect. Below, the ``"full"`` product can drive
        ``r`` to underflow to 0 on sparse counts, where ``lgamma(x + r) -
        lgamma(r)`` and its gradient are not finite (2 of 3 fits of the sparse
        likelihood design ended at non-finite gradients without the lower
        bound). It is a reparameterisation, not a penalty: every ``r`` between the
        bounds is reachable.
        """
        log_r = self.per_feature(self.log_inverse_dispersion, cols)
        if self.dispersion == "full":
            log_r = log_r + self.per_entry(
                self.dispersion_rows, self.dispersion_features, rows, cols
            )
        return _bound_log_r(log_r)

    def set_inverse_dispersion(self, r) -> None:
        """Set the per-feature (or shared) ``r``, each in ``(1e-10, 1e10)``, e.g. to fix it.

        Raises
        ------
        ValueError
            If some ``r`` is outside ``(1e-10, 1e10)``.
        """
        r = torch.as_tensor(r, dtype=torch.float64)
        if not bool(torch.all((r > _R_MIN) & (r < _R_MAX))):
            raise ValueError(f"inverse dispersions must lie in ({_R_MIN:g}, {_R_MAX:g}), got {r}")
        t = _unbound_log_r(torch.log(r))
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

    def log_neg_log_prob_zero(self, eta, log_s, rows=None, cols=None):
        log_r = self.log_inverse_dispersion_at(rows, cols)
        return log_r + log_softplus(self.log_mean(eta, log_s) - log_r)

    def _baseline_inverse_dispersion(self) -> np.ndarray:
        """Per-feature (or shared) ``r``, numpy; for ``"full"`` the baseline ``exp(bound(a_j))``."""
        return torch.exp(_bound_log_r(self.log_inverse_dispersion)).detach().cpu().double().numpy()

    def variance_function(self, mu):
        return mu + mu**2 / self._baseline_inverse_dispersion()

    def sample(self, mean, rng):
        # numpy's NB(n, p) has mean n (1 - p) / p: n = r, p = r / (r + mean)
        r = self.inverse_dispersion.detach().cpu().double().numpy()
        return rng.negative_binomial(r, r / (r + mean)).astype(np.float64)

    def scipy_distribution(self, mean):
        r = self.inverse_dispersion.detach().cpu().double().numpy()
        return stats.nbinom(r, r / (r + mean))

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
