"""Data-driven starting point: one linearised (Fisher-scoring) step, then a weighted SVD.

Around the intercept-only fit ``eta0_j = h^{-1}(mean_j)`` the GLM is
linearised: the working residual ``z_ij = (x_ij / s_i - h(eta0_j)) / h'(eta0_j)``
has approximate variance ``1 / w_j`` with ``w_j = h'(eta0_j)^2 / V(h(eta0_j))``.
The rank-``k`` SVD of ``sqrt(w_j) z_ij`` (Pearson residuals, for Poisson)
gives ``L0 = U sqrt(S)``, ``F0 = V sqrt(S) / sqrt(w)``. The variational
precisions start at their coordinate-ascent values given the other side,
``nu_ik = sum_j w_j F0_jk^2 + tau_k``, so the posterior starts neither
over- nor under-confident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.extmath import randomized_svd

from .likelihoods import Likelihood

__all__ = ["Start", "initialize"]


@dataclass
class Start:
    """Starting point estimates and precisions (numpy, float64), handed to the
    prior families' ``start_prior_`` / ``start_``."""

    loadings: np.ndarray  # (n, k) point estimate of L
    factors: np.ndarray  # (p, k) point estimate of F
    loadings_precision: np.ndarray  # (n, k) data precision of each entry of L given F
    factors_precision: np.ndarray  # (p, k) the same for F given L
    intercept: dict | None  # mean, log_var (p,); prior_mean, prior_log_prec ()


def _nonnegative_signs(l0, f0, nonnegative: tuple[bool, bool]):
    """Flip each component's sign so that the non-negative side(s) keep the larger
    part: with both sides non-negative, the sign whose positive parts carry the
    larger share of ``l f^T`` (as NNDSVD, Boutsidis & Gallopoulos 2008); with one,
    the sign under which that side's positive part is the larger. A non-negative
    family then starts from the positive parts."""

    def parts(a):
        return np.linalg.norm(np.maximum(a, 0), axis=0), np.linalg.norm(np.minimum(a, 0), axis=0)

    (lp, ln), (fp, fn) = parts(l0), parts(f0)
    if all(nonnegative):
        pos, neg = lp * fp, ln * fn
    else:
        pos, neg = (lp, ln) if nonnegative[0] else (fp, fn)
    sign = np.where(neg > pos, -1.0, 1.0)
    return l0 * sign, f0 * sign


def initialize(
    x: np.ndarray,
    mask: np.ndarray | None,
    size_factors: np.ndarray | None,
    n_components: int,
    likelihood: Likelihood,
    fit_intercept: bool,
    random_state: np.random.RandomState,
    start: tuple[np.ndarray, np.ndarray] | None = None,
    nonnegative: tuple[bool, bool] = (False, False),
) -> Start:
    """Starting values for the model and the likelihood's nuisance parameters.

    Parameters
    ----------
    x : ndarray of shape (n, p)
        Data with missing entries set to 0.
    mask : ndarray of shape (n, p) or None
        1 for observed entries.
    size_factors : ndarray of shape (n,) or None
    n_components : int
    likelihood : Likelihood
        Its ``initialize`` is called here; its link and variance function are used.
    fit_intercept : bool
    random_state : RandomState
        Used by the randomised SVD on large inputs.
    start : (ndarray of shape (n, k), ndarray of shape (p, k)), optional
        Given starting means of ``L`` and ``F`` (e.g. the truth, in a
        simulation), used in place of the SVD; the intercept then starts at
        the linearised fit of what ``L F^T`` leaves.
    nonnegative : (bool, bool)
        Whether the family on ``L`` and on ``F`` is non-negative: each SVD
        component's sign is then chosen so that the positive parts dominate.
    """
    n, p = x.shape
    link = likelihood.link
    s = np.ones(n) if size_factors is None else np.asarray(size_factors, dtype=float)
    obs = np.ones_like(x) if mask is None else mask
    y = x / s[:, None]

    # per-feature mean and variance of x / s over observed entries
    n_obs = np.maximum(obs.sum(0), 1.0)
    feature_mean = (obs * x).sum(0) / np.maximum((obs * s[:, None]).sum(0), 1e-300)
    feature_var = (obs * (y - feature_mean) ** 2).sum(0) / n_obs

    if fit_intercept:
        if likelihood.link.positive:
            # half a count over the feature keeps h^{-1} finite for all-zero features
            floor = 0.5 / np.maximum((obs * s[:, None]).sum(0), 1.0)
            eta0 = link.inverse(np.maximum(feature_mean, floor))
        else:
            eta0 = link.inverse(feature_mean)
    else:
        eta0 = np.zeros(p)
    mu0 = link(torch.as_tensor(eta0, dtype=torch.float64)).numpy()
    slope = link.derivative(eta0)

    likelihood.initialize(feature_mean, feature_var)
    # a free noise variance is not known before the low-rank fit: unweighted SVD
    w = working_weights(likelihood, mu0, slope) if likelihood.variance_from_mean else np.ones(p)

    z = obs * working_response(link, y, mu0, eta0, slope)
    k = n_components
    if start is not None:
        l0, f0 = (np.asarray(a, dtype=float) for a in start)
        if fit_intercept:
            # the intercept absorbs the mean of the working residual that L F^T leaves
            eta0 = eta0 + (obs * (z - l0 @ f0.T)).sum(0) / n_obs
            mu0 = link(torch.as_tensor(eta0, dtype=torch.float64)).numpy()
            slope = link.derivative(eta0)
    else:
        y_w = z * np.sqrt(w)
        if min(n, p) <= 500:
            u, sv, vt = np.linalg.svd(y_w, full_matrices=False)
            u, sv, vt = u[:, :k], sv[:k], vt[:k]
        else:
            u, sv, vt = randomized_svd(y_w, k, random_state=random_state)
        l0 = u * np.sqrt(sv)
        f0 = (vt.T * np.sqrt(sv)) / np.sqrt(w)[:, None]
        if any(nonnegative):
            l0, f0 = _nonnegative_signs(l0, f0, nonnegative)

    # residual variance on the data scale, for the Gaussian noise and NB dispersion
    resid = obs * ((y - mu0) - (l0 @ f0.T) * slope)
    feature_var = (resid**2).sum(0) / n_obs
    likelihood.initialize(feature_mean, feature_var)
    if not likelihood.variance_from_mean:
        # the free noise variance, now learned from the residual, weights the precisions
        w = working_weights(likelihood, mu0, slope)

    intercept = None
    if fit_intercept:
        tau = 1.0 / max(float(np.var(eta0)), 1e-2)
        intercept = {
            "mean": eta0,
            "log_var": -np.log(w * obs.sum(0) + tau),
            "prior_mean": np.asarray(np.mean(eta0)),
            "prior_log_prec": np.asarray(np.log(tau)),
        }
    return Start(
        loadings=l0,
        factors=f0,
        loadings_precision=(w[None, :] * obs) @ (f0**2),
        factors_precision=w[:, None] * (obs.T @ (l0**2)),
        intercept=intercept,
    )


def working_response(link, y, mu0, eta0, slope) -> np.ndarray:
    """The linearised deviation ``(y - mu0) / h'(eta0)`` of ``eta`` from ``eta0``,
    never beyond the exact one ``h^{-1}(y) - eta0`` where the data lie above the
    start's mean. For a convex link (exp, softplus) the tangent overshoots there: a
    rare feature's single count of 5 at a mean of 1e-3 is a deviation of 5000 on
    the tangent, but of log 5000 = 8.5 under the exp link."""
    z = (y - mu0) / slope
    above = y > mu0
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            exact = link.inverse(np.where(above, y, mu0)) - eta0
    except ValueError:  # data outside a bounded link's range: the tangent alone
        return z
    return np.where(above & np.isfinite(exact), np.minimum(z, exact), z)


def working_weights(likelihood: Likelihood, mu0: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """``w_j = h'(eta0_j)^2 / V(h(eta0_j))``, the precision of the working residual."""
    var_fn = likelihood.variance_function(np.maximum(mu0, 1e-12))
    w = slope**2 / np.maximum(var_fn, 1e-300)
    return np.where(np.isfinite(w) & (w > 0), w, 1.0)
