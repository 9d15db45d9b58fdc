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

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas
from sklearn.utils.extmath import randomized_svd

from .likelihoods import Likelihood
from .views import size_grid

__all__ = ["Start", "initialize", "initialize_streamed"]


@dataclass
class Start:
    """Starting point estimates and precisions (numpy, float64), handed to the
    prior families' ``start_prior_`` / ``start_``."""

    loadings: np.ndarray | None  # (n, k) point estimate of L; None when streamed
    factors: np.ndarray  # (p, k) point estimate of F
    loadings_precision: np.ndarray | None  # (n, k) data precision of L given F, or None
    factors_precision: np.ndarray  # (p, k) the same for F given L
    intercept: dict | None  # mean, log_var (p,); prior_mean, prior_log_prec ()
    #: a streamed start's loadings: each factor's root mean square over the rows (of the
    #: positive part for a non-negative family), ``(k,)``, and ``loading_blocks()``,
    #: which yields ``(rows, point estimates, precisions)`` block by block
    loadings_rms: np.ndarray | None = None
    loading_blocks: Callable[[], Iterator[tuple[slice, np.ndarray, np.ndarray]]] | None = None
    #: known covariates' effects ``B`` (``(p, c)``): the least-squares fit of the working
    #: response on the covariates, which the SVD then does not see; their data precision
    covariate_coef: np.ndarray | None = None
    covariate_precision: np.ndarray | None = None

    def loadings_scale(self) -> np.ndarray:
        """What the loadings' family needs for its prior's start (``start_prior_``): the
        point estimates, or for a streamed start one row of their root mean squares,
        ``(1, k)``, which the families read the same way (they use each factor's mean
        square only)."""
        return self.loadings if self.loadings is not None else self.loadings_rms[None, :]


def _column_parts(a: np.ndarray) -> np.ndarray:
    """Norms of the positive and of the negative part of each column, ``(2, k)``."""
    return np.stack(
        [np.linalg.norm(np.maximum(a, 0), axis=0), np.linalg.norm(np.minimum(a, 0), axis=0)]
    )


def _nonnegative_signs(l_parts, f_parts, nonnegative: tuple[bool, bool]) -> np.ndarray:
    """The sign of each component under which the non-negative side(s) keep the larger
    part, from the norms of the positive and negative parts of ``l0`` and ``f0``
    (:func:`_column_parts`): with both sides non-negative, the sign whose positive parts
    carry the larger share of ``l f^T`` (as NNDSVD, Boutsidis & Gallopoulos 2008); with
    one, the sign under which that side's positive part is the larger. A non-negative
    family then starts from the positive parts. ``(k,)`` of +-1."""
    (lp, ln), (fp, fn) = l_parts, f_parts
    if all(nonnegative):
        pos, neg = lp * fp, ln * fn
    else:
        pos, neg = (lp, ln) if nonnegative[0] else (fp, fn)
    return np.where(neg > pos, -1.0, 1.0)


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
    covariates: np.ndarray | None = None,
) -> Start:
    """Starting values for the model and the likelihood's nuisance parameters.

    Parameters
    ----------
    x : ndarray of shape (n, p)
        Data with missing entries set to 0.
    mask : ndarray of shape (n, p) or None
        1 for observed entries.
    size_factors : ndarray of shape (n,), or a multi-view fit's (n, n_views), or None
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
    covariates : ndarray of shape (n, c), optional
        Known covariates: their effects start at the least-squares fit of the
        working response, which is taken out before the SVD.
    """
    n, p = x.shape
    link = likelihood.link
    s = np.ones((n, 1)) if size_factors is None else size_grid(size_factors, likelihood)
    y = x / s

    def observed(a):  # the observed entries of a grid: all of them without a mask
        return a if mask is None else mask * a

    # per-feature mean and variance of x / s over observed entries
    counted = np.full(p, float(n)) if mask is None else mask.sum(0)
    n_obs = np.maximum(counted, 1.0)
    sum_s = np.broadcast_to(s, x.shape).sum(0) if mask is None else (mask * s).sum(0)
    feature_mean = observed(x).sum(0) / np.maximum(sum_s, 1e-300)
    feature_var = observed((y - feature_mean) ** 2).sum(0) / n_obs

    eta0, mu0, slope = _baseline(link, feature_mean, sum_s, fit_intercept, p)

    likelihood.initialize(feature_mean, feature_var)
    # a free noise variance is not known before the low-rank fit: unweighted SVD
    w = working_weights(likelihood, mu0, slope) if likelihood.variance_from_mean else np.ones(p)

    z = observed(working_response(link, y, mu0, eta0, slope))
    coef = coef_precision = None
    if covariates is not None:
        cov = np.asarray(covariates, dtype=np.float64)
        coef = _covariate_fit(cov.T @ cov, cov.T @ z)
        z -= observed(cov @ coef.T)
    k = n_components
    if start is not None:
        l0, f0 = (np.asarray(a, dtype=float) for a in start)
        if fit_intercept:
            # the intercept absorbs the mean of the working residual that L F^T leaves
            eta0 = eta0 + observed(z - l0 @ f0.T).sum(0) / n_obs
            mu0 = link(torch.as_tensor(eta0, dtype=torch.float64)).numpy()
            slope = link.derivative(eta0)
    else:
        y_w = z * np.sqrt(w)
        if min(n, p) <= 500:
            u, sv, vt = np.linalg.svd(y_w, full_matrices=False)
            u, sv, vt = u[:, :k], sv[:k], vt[:k]
        else:
            # in float32, as training computes: 0.73 -> 0.46 s at 5,000 x 2,000, the
            # product U S V^T within 5e-7 of float64's
            u, sv, vt = randomized_svd(y_w.astype(np.float32), k, random_state=random_state)
            u, sv, vt = (a.astype(np.float64) for a in (u, sv, vt))
        l0, f0 = _split(u, sv, vt, likelihood.data_unit)
        f0 = f0 / np.sqrt(w)[:, None]
        if any(nonnegative):
            sign = _nonnegative_signs(_column_parts(l0), _column_parts(f0), nonnegative)
            l0, f0 = l0 * sign, f0 * sign

    # residual variance on the data scale, for the Gaussian noise and NB dispersion
    fitted = l0 @ f0.T if coef is None else l0 @ f0.T + cov @ coef.T
    resid = observed((y - mu0) - fitted * slope)
    feature_var = (resid**2).sum(0) / n_obs
    likelihood.initialize(feature_mean, feature_var)
    if likelihood.residual_weights:
        # the free noise variance (of a Gaussian view too), now learned from the
        # residual, weights the precisions
        w = working_weights(likelihood, mu0, slope)
    if coef is not None:
        coef_precision = w[:, None] * _observed_sums(mask, cov**2, p)

    return Start(
        loadings=l0,
        factors=f0,
        loadings_precision=_observed_sums(None if mask is None else mask.T, w[:, None] * f0**2, n),
        factors_precision=w[:, None] * _observed_sums(mask, l0**2, p),
        intercept=_intercept(eta0, w, counted, likelihood.data_unit) if fit_intercept else None,
        covariate_coef=coef,
        covariate_precision=coef_precision,
    )


def _observed_sums(mask: np.ndarray | None, values: np.ndarray, m: int) -> np.ndarray:
    """``mask^T values`` (``(m, c)``): each column's sum of ``values`` (``(n, c)``) over
    the rows observed in it; without a mask every row is, in every one of the ``m``."""
    if mask is None:
        return np.broadcast_to(values.sum(0), (m, values.shape[1])).copy()
    return mask.T @ values


def _covariate_fit(gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """Least-squares effects ``B`` (``(p, c)``) from ``C^T C`` and ``C^T Z``: the
    minimum-norm solution, so that collinear covariates (every level of a one-hot
    batch beside the intercept) split an effect evenly rather than fail."""
    return (np.linalg.pinv(gram, hermitian=True) @ cross).T


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
    reduce: Callable | None = None,
    covariates: np.ndarray | None = None,
) -> Start:
    """:func:`initialize` over blocks of rows, in memory ``O(block p + p w)``.

    The same start, with the weighted SVD of the working residual ``A`` computed by
    subspace iteration on ``A^T A`` (Halko, Martinsson & Tropp 2011, alg. 4.4, on
    the features' side) and a Rayleigh--Ritz step: ``V <- orth(A^T A V)`` from a
    Gaussian ``p x w`` start (``w = k + oversample``), each product accumulated
    block by block, ``n_power_iter + 2`` times, and the right singular vectors and
    values from the eigen-decomposition of ``V^T A^T A V``. Its subspace is that of
    the randomised range finder with ``n_power_iter`` power iterations. No array of
    ``n`` rows is formed: the loadings' point estimates and precisions are
    recomputed block by block when the model is set (:meth:`Start.loading_blocks`).

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
    reduce : callable, optional
        ``reduce(*arrays)`` returns each pass's sums over rows summed over the ranks
        of a data-parallel fit (:meth:`spfa.distributed.Group.sum`), whose ``blocks``
        are this rank's rows and ``n`` every rank's; ``random_state`` must then draw
        alike on every rank. None: the blocks are all the rows.
    covariates : ndarray of shape (n, c), optional
        Every row's known covariates (of this rank's rows, in the blocks' order): their
        effects start at the least-squares fit of the working response (one more pass),
        which every later pass takes out.
    """
    if reduce is None:

        def reduce(*arrays):
            return arrays[0] if len(arrays) == 1 else arrays

    link = likelihood.link
    k = n_components

    def each():
        for rows, x, mask, s in blocks():
            size = None if s is None else size_grid(s, likelihood)
            yield rows, x, mask, size

    def observed(mask, shape):  # observed entries per feature of a block
        return np.full(shape[1], float(shape[0])) if mask is None else mask.sum(0)

    # each pass is a function, so that no block outlives its pass
    def feature_sums():  # per-feature sums of x / s over observed entries
        sums = np.zeros((5, p))  # x, s, observed, y, y^2
        for _, x, mask, size in each():
            y = x if size is None else x / size
            xo, yo = (x, y) if mask is None else (mask * x, mask * y)
            sums[0] += xo.sum(0)
            if size is None:
                sums[1] += observed(mask, x.shape)
            else:
                sums[1] += (size * (1.0 if mask is None else mask)).sum(0)
            sums[2] += observed(mask, x.shape)
            sums[3] += yo.sum(0)
            sums[4] += (yo * y).sum(0)
        return reduce(sums)

    sum_x, sum_s, n_obs, sum_y, sum_yy = feature_sums()
    counts, n_obs = n_obs, np.maximum(n_obs, 1.0)
    feature_mean = sum_x / np.maximum(sum_s, 1e-300)
    feature_var = np.maximum(sum_yy - 2 * feature_mean * sum_y + feature_mean**2 * n_obs, 0.0)
    feature_var = feature_var / n_obs
    eta0, mu0, slope = _baseline(link, feature_mean, sum_s, fit_intercept, p)
    likelihood.initialize(feature_mean, feature_var)
    w = working_weights(likelihood, mu0, slope) if likelihood.variance_from_mean else np.ones(p)
    root_w = np.sqrt(w)

    cov = None if covariates is None else np.asarray(covariates, dtype=np.float64)
    coef = coef_precision = None

    def residual(x, mask, size, rows=None):  # the weighted working residual of a block
        z = working_response(link, x if size is None else x / size, mu0, eta0, slope)
        if coef is not None:
            z -= cov[rows] @ coef.T
        z *= root_w
        return z if mask is None else z * mask

    if cov is not None:  # one pass: C^T C, C^T Z and each effect's observed C^2

        def covariate_sums():
            gram, cross, square = np.zeros((cov.shape[1],) * 2), np.zeros((cov.shape[1], p)), 0.0
            for rows, x, mask, size in each():
                c = cov[rows]
                z = working_response(link, x if size is None else x / size, mu0, eta0, slope)
                if mask is not None:
                    z *= mask
                gram += c.T @ c
                cross += c.T @ z
                square = square + ((c**2).sum(0)[None, :] if mask is None else mask.T @ c**2)
            return reduce(gram, cross, np.broadcast_to(square, (p, cov.shape[1])).copy())

        gram, cross, square = covariate_sums()
        coef = _covariate_fit(gram, cross)

    # subspace iteration on A^T A; the last product also gives V^T A^T A V
    # (z accumulates in place through BLAS, so that no third p x w array is formed)
    def gram_times(v, z):  # z <- A^T A v
        z.fill(0.0)
        for rows, x, mask, size in each():
            a = residual(x, mask, size, rows)
            z = blas.dgemm(1.0, a, a @ v, beta=1.0, c=z, trans_a=True, overwrite_c=True)
        return reduce(z)

    width = min(k + oversample, n, p)
    v = _orthonormal(random_state.normal(size=(p, width)))
    z = np.zeros((p, width), order="F")
    for i in range(n_power_iter + 2):
        if i:
            v = None  # freed before the QR allocates its own
            v = _orthonormal(z)
        z = gram_times(v, z)
    eigval, eigvec = np.linalg.eigh(v.T @ z)
    del z
    top = np.argsort(eigval)[::-1][:k]
    sv = np.sqrt(np.maximum(eigval[top], 0.0))
    right = v @ eigvec[:, top]  # (p, k) right singular vectors
    del v
    unit = likelihood.data_unit
    f0 = right * np.sqrt(sv * unit) / root_w[:, None]  # _split's F = V sqrt(S unit), unweighted
    # L0 = U sqrt(S / unit), U = A V_k / S: L0 = A @ project for each block
    with np.errstate(divide="ignore", invalid="ignore"):
        project = np.where(sv > 0, 1.0 / np.sqrt(sv * unit), 0.0) * right

    def loadings(x, mask, size, rows=None):
        return residual(x, mask, size, rows) @ project

    # last pass: residual variance on the data scale, the factors' precisions, and the
    # loadings' column norms (their sign and the prior's scale)
    def residual_sums():
        resid_ss, l0_sq = np.zeros(p), np.zeros((p, k))
        positive, negative = np.zeros(k), np.zeros(k)
        for rows, x, mask, size in each():
            l0 = loadings(x, mask, size, rows)
            resid = l0 @ f0.T  # then (y - mu0) - (L0 F0^T + C B0^T) h'(eta0), in place
            if coef is not None:
                resid += cov[rows] @ coef.T
            resid *= -slope
            resid += x if size is None else x / size
            resid -= mu0
            if mask is not None:
                resid *= mask
            resid_ss += np.einsum("ij,ij->j", resid, resid)
            l0_sq += (l0**2).sum(0) if mask is None else mask.T @ l0**2
            positive += (np.maximum(l0, 0.0) ** 2).sum(0)
            negative += (np.minimum(l0, 0.0) ** 2).sum(0)
        return reduce(resid_ss, l0_sq, positive, negative)

    resid_ss, l0_sq, positive, negative = residual_sums()
    sign = np.ones(k)
    if any(nonnegative):
        l_parts = np.sqrt(np.stack([positive, negative]))
        sign = _nonnegative_signs(l_parts, _column_parts(f0), nonnegative)
        f0 = f0 * sign
    # each factor's mean square over the rows (of the positive part for a non-negative L)
    if nonnegative[0]:
        second = np.where(sign > 0, positive, negative) / n
    else:
        second = (positive + negative) / n
    likelihood.initialize(feature_mean, resid_ss / n_obs)
    if likelihood.residual_weights:
        w = working_weights(likelihood, mu0, slope)
    weighted = w[:, None] * f0**2
    if coef is not None:
        coef_precision = w[:, None] * square

    def loading_blocks():
        for rows, x, mask, size in each():
            if mask is None:
                precision = np.repeat(weighted.sum(0)[None, :], x.shape[0], axis=0)
            else:
                precision = mask @ weighted
            yield rows, loadings(x, mask, size, rows) * sign, precision

    return Start(
        loadings=None,
        factors=f0,
        loadings_precision=None,
        factors_precision=w[:, None] * l0_sq,
        intercept=_intercept(eta0, w, counts, unit) if fit_intercept else None,
        loadings_rms=np.sqrt(second),
        loading_blocks=loading_blocks,
        covariate_coef=coef,
        covariate_precision=coef_precision,
    )


def _baseline(link, feature_mean, sum_s, fit_intercept: bool, p: int):
    """The intercept-only fit ``eta0`` and ``h(eta0)``, ``h'(eta0)``, ``(p,)`` each."""
    if fit_intercept:
        # half a count over the feature keeps h^{-1} finite for all-zero features (under
        # a positive link: each view's own, in a multi-view fit)
        floor = np.where(link.positive_at(p), 0.5 / np.maximum(sum_s, 1.0), -np.inf)
        eta0 = link.inverse(np.maximum(feature_mean, floor))
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
    z = np.subtract(y, mu0)
    z /= slope
    # only the entries above the start's mean (few, for sparse counts) need the exact one
    rows, cols = np.nonzero(y > mu0)
    if rows.size == 0:
        return z
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            exact = (
                link.inverse_at(y[rows, cols], cols) - np.broadcast_to(eta0, y.shape)[rows, cols]
            )
    except ValueError:  # data outside a bounded link's range: the tangent alone
        return z
    ok = np.isfinite(exact)
    rows, cols = rows[ok], cols[ok]
    z[rows, cols] = np.minimum(z[rows, cols], exact[ok])
    return z


def working_weights(likelihood: Likelihood, mu0: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """``w_j = h'(eta0_j)^2 / V(h(eta0_j))``, the precision of the working residual."""
    var_fn = likelihood.variance_function(np.maximum(mu0, 1e-12))
    w = slope**2 / np.maximum(var_fn, 1e-300)
    return np.where(np.isfinite(w) & (w > 0), w, 1.0)
