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
from scipy.special import logit
from sklearn.utils.extmath import randomized_svd

from .likelihoods import Likelihood

__all__ = ["Initialization", "initialize"]

#: starting posterior inclusion probability (and prior pi) of every coefficient
PIP_INIT = 0.9


@dataclass
class Initialization:
    """Starting values, numpy, float64."""

    intercept: dict | None  # mean, log_var (p,); prior_mean, prior_log_prec ()
    loadings: dict  # logits, mean, log_prec (n, k); prior_logit, prior_log_prec (k,)
    factors: dict  # same for (p, k)
    feature_mean: np.ndarray  # (p,) mean of x / s
    feature_var: np.ndarray  # (p,) residual variance after the rank-k fit


def _point_normal_start(m0: np.ndarray, prec: np.ndarray) -> dict:
    """Point-normal parameters whose posterior mean is ``m0``."""
    second = np.mean(m0**2, axis=0)
    tau = np.where(second > 0, 1.0 / np.where(second > 0, second, 1.0), 1.0)
    return {
        "logits": np.full(m0.shape, logit(PIP_INIT)),
        # E[m] = alpha * mu: start the slab mean so that E[m] = m0
        "mean": m0 / PIP_INIT,
        "log_prec": np.log(prec + tau),
        "prior_logit": np.full(m0.shape[1], logit(PIP_INIT)),
        "prior_log_prec": np.log(tau),
    }


def initialize(
    x: np.ndarray,
    mask: np.ndarray | None,
    size_factors: np.ndarray | None,
    n_components: int,
    likelihood: Likelihood,
    fit_intercept: bool,
    random_state: np.random.RandomState,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> Initialization:
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
    var_fn = likelihood.variance_function(np.maximum(mu0, 1e-12))
    w = slope**2 / np.maximum(var_fn, 1e-300)
    w = np.where(np.isfinite(w) & (w > 0), w, 1.0)

    z = obs * (y - mu0) / slope
    k = n_components
    if start is not None:
        l0, f0 = (np.asarray(a, dtype=float) for a in start)
        if fit_intercept:
            # the intercept absorbs the mean of the working residual that L F^T leaves
            eta0 = eta0 + (obs * (z - l0 @ f0.T)).sum(0) / n_obs
            mu0 = link(torch.as_tensor(eta0, dtype=torch.float64)).numpy()
            slope = link.derivative(eta0)
            z = obs * (y - mu0) / slope
    else:
        y_w = z * np.sqrt(w)
        if min(n, p) <= 500:
            u, sv, vt = np.linalg.svd(y_w, full_matrices=False)
            u, sv, vt = u[:, :k], sv[:k], vt[:k]
        else:
            u, sv, vt = randomized_svd(y_w, k, random_state=random_state)
        l0 = u * np.sqrt(sv)
        f0 = (vt.T * np.sqrt(sv)) / np.sqrt(w)[:, None]

    # residual variance on the data scale, for the Gaussian noise and NB dispersion
    resid = obs * (z - l0 @ f0.T) * slope
    feature_var = (resid**2).sum(0) / n_obs
    likelihood.initialize(feature_mean, feature_var)
    if not likelihood.is_count:
        w = 1.0 / np.maximum(feature_var, 1e-12 * max(feature_var.mean(), 1e-300))

    loadings = _point_normal_start(l0, (w[None, :] * obs) @ (f0**2))
    factors = _point_normal_start(f0, w[:, None] * (obs.T @ (l0**2)))
    intercept = None
    if fit_intercept:
        tau = 1.0 / max(float(np.var(eta0)), 1e-2)
        intercept = {
            "mean": eta0,
            "log_var": -np.log(w * obs.sum(0) + tau),
            "prior_mean": np.asarray(np.mean(eta0)),
            "prior_log_prec": np.asarray(np.log(tau)),
        }
    return Initialization(intercept, loadings, factors, feature_mean, feature_var)
