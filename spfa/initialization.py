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

__all__ = ["Start", "initialize", "initialize_streamed"]


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

    eta0, mu0, slope = _baseline(link, feature_mean, (obs * s[:, None]).sum(0), fit_intercept, p)

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
        l0, f0 = _split(u, sv, vt, likelihood.data_unit)
        f0 = f0 / np.sqrt(w)[:, None]
        if any(nonnegative):
            l0, f0 = _nonnegative_signs(l0, f0, nonnegative)

    # residual variance on the data scale, for the Gaussian noise and NB dispersion
    resid = obs * ((y - mu0) - (l0 @ f0.T) * slope)
    feature_var = (resid**2).sum(0) / n_obs
    likelihood.initialize(feature_mean, feature_var)
    if not likelihood.variance_from_mean:
        # the free noise variance, now learned from the residual, weights the precisions
        w = working_weights(likelihood, mu0, slope)

    return Start(
        loadings=l0,
        factors=f0,
        loadings_precision=(w[None, :] * obs) @ (f0**2),
        factors_precision=w[:, None] * (obs.T @ (l0**2)),
        intercept=_intercept(eta0, w, obs.sum(0), likelihood.data_unit) if fit_intercept else None,
    )


def _orthonormal(a: np.ndarray) -> np.ndarray:
    return np.linalg.qr(a)[0]


def initialize_streamed(
    blocks,
    n: int,
    p: int,
    n_components: int,
    likelihood: Likelihood,
    fit_intercept: bool,
    random_state: np.random.RandomState,
    nonnegative: tuple[bool, bool] = (False, False),
    n_power_iter: int = 2,
    oversample: int = 10,
) -> Start:
    """:func:`initialize` over blocks of rows: no array larger than one block's
    ``(rows, p)`` or than ``(n + p) x (k + oversample)`` is formed.

    The same start, with the weighted SVD of the working residual computed by a
    randomised range finder (Halko, Martinsson & Tropp 2011) whose products with
    the residual are accumulated block by block, ``n_power_iter`` power
    iterations: ``2 n_power_iter + 5`` passes over the data in all.

    Parameters
    ----------
    blocks : callable
        ``blocks()`` iterates over ``(rows, x, mask, s)``: a slice of rows in
        order, their dense data (missing entries at 0), mask (or None) and size
        factors (or None); together the blocks cover every row once.
    n, p : int
        Shape of the data.
    n_components, likelihood, fit_intercept, random_state, nonnegative
        As in :func:`initialize` (the data are never given whole).
    """
    link = likelihood.link
    k = n_components

    def each():
        for rows, x, mask, s in blocks():
            size = np.ones((x.shape[0], 1)) if s is None else np.asarray(s, float)[:, None]
            obs = np.ones_like(x) if mask is None else mask
            yield rows, x, obs, size

    # pass 1: per-feature mean and variance of x / s over observed entries
    sum_x, sum_s, n_obs, sum_y, sum_yy = (np.zeros(p) for _ in range(5))
    for _, x, obs, size in each():
        y = x / size
        sum_x += (obs * x).sum(0)
        sum_s += (obs * size).sum(0)
        n_obs += obs.sum(0)
        sum_y += (obs * y).sum(0)
        sum_yy += (obs * y**2).sum(0)
    counts, n_obs = n_obs, np.maximum(n_obs, 1.0)
    feature_mean = sum_x / np.maximum(sum_s, 1e-300)
    feature_var = np.maximum(sum_yy - 2 * feature_mean * sum_y + feature_mean**2 * n_obs, 0.0)
    feature_var = feature_var / n_obs
    eta0, mu0, slope = _baseline(link, feature_mean, sum_s, fit_intercept, p)
    likelihood.initialize(feature_mean, feature_var)
    w = working_weights(likelihood, mu0, slope) if likelihood.variance_from_mean else np.ones(p)
    root_w = np.sqrt(w)

    def residual(x, obs, size):  # the weighted working residual of a block
        return obs * working_response(link, x / size, mu0, eta0, slope) * root_w

    # randomised range finder of the weighted residual A, block by block
    width = min(k + oversample, n, p)
    omega = random_state.normal(size=(p, width))

    def times(right):  # A @ right, (n, width)
        out = np.empty((n, right.shape[1]))
        for rows, x, obs, size in each():
            out[rows] = residual(x, obs, size) @ right
        return out

    def transposed_times(left):  # A^T @ left, (p, width)
        out = np.zeros((p, left.shape[1]))
        for rows, x, obs, size in each():
            out += residual(x, obs, size).T @ left[rows]
        return out

    q = _orthonormal(times(omega))
    for _ in range(n_power_iter):
        q = _orthonormal(times(_orthonormal(transposed_times(q))))
    u_b, sv, vt = np.linalg.svd(transposed_times(q).T, full_matrices=False)
    u, sv, vt = (q @ u_b)[:, :k], sv[:k], vt[:k]
    l0, f0 = _split(u, sv, vt, likelihood.data_unit)
    f0 = f0 / root_w[:, None]
    if any(nonnegative):
        l0, f0 = _nonnegative_signs(l0, f0, nonnegative)

    # last passes: residual variance on the data scale, then the precisions
    resid_ss, l0_sq = np.zeros(p), np.zeros((p, k))
    for rows, x, obs, size in each():
        resid = obs * ((x / size - mu0) - (l0[rows] @ f0.T) * slope)
        resid_ss += (resid**2).sum(0)
        l0_sq += obs.T @ l0[rows] ** 2
    likelihood.initialize(feature_mean, resid_ss / n_obs)
    if not likelihood.variance_from_mean:
        w = working_weights(likelihood, mu0, slope)
    loadings_precision = np.empty((n, k))
    for rows, _, obs, _ in each():
        loadings_precision[rows] = obs @ (w[:, None] * f0**2)
    return Start(
        loadings=l0,
        factors=f0,
        loadings_precision=loadings_precision,
        factors_precision=w[:, None] * l0_sq,
        intercept=_intercept(eta0, w, counts, likelihood.data_unit) if fit_intercept else None,
    )


def _baseline(link, feature_mean, sum_s, fit_intercept: bool, p: int):
    """The intercept-only fit ``eta0`` and ``h(eta0)``, ``h'(eta0)``, ``(p,)`` each."""
    if fit_intercept:
        if link.positive:
            # half a count over the feature keeps h^{-1} finite for all-zero features
            floor = 0.5 / np.maximum(sum_s, 1.0)
            eta0 = link.inverse(np.maximum(feature_mean, floor))
        else:
            eta0 = link.inverse(feature_mean)
    else:
        eta0 = np.zeros(p)
    mu0 = link(torch.as_tensor(eta0, dtype=torch.float64)).numpy()
    return eta0, mu0, link.derivative(eta0)


def _split(u, sv, vt, unit: float) -> tuple[np.ndarray, np.ndarray]:
    """``U S V^T`` as ``L F^T`` with the loadings unitless and the factors in ``eta``'s
    units: ``L = U sqrt(S / unit)``, ``F = V sqrt(S unit)``. The optimiser's steps are in
    the parameters' own units, so loadings of size 1 make a fit of data in any units alike
    (``unit`` is 1 for the count likelihoods)."""
    return u * np.sqrt(sv / unit), vt.T * np.sqrt(sv * unit)


def _intercept(eta0, w, n_obs, unit=1.0) -> dict:
    """The intercept's start: ``q(b)`` at ``eta0`` with its data precision, and the prior
    (its variance at least ``(0.1 unit)^2``, ``unit`` being ``eta``'s, so that features
    with one baseline do not start with a point prior)."""
    tau = 1.0 / max(float(np.var(eta0)), 1e-2 * unit**2)
    return {
        "mean": eta0,
        "log_var": -np.log(w * n_obs + tau),
        "prior_mean": np.asarray(np.mean(eta0)),
        "prior_log_prec": np.asarray(np.log(tau)),
    }


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
