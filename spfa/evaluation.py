"""Compare a fit with a planted truth: matching, support recovery, PIP calibration.

Used by ``simulations/`` and the recovery tests. Factor models are identified
only up to the order and sign of the factors (and a scale traded between ``L``
and ``F``), so every comparison first matches estimated factors to true ones
with :func:`match_factors` and uses scale-free measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "FactorMatch",
    "Calibration",
    "relative_error",
    "match_factors",
    "support_recovery",
    "calibration",
    "truth_in_estimate_gauge",
    "posterior_checks",
]


def relative_error(estimate, truth) -> float:
    """``||estimate - truth||_F / ||truth||_F``."""
    estimate, truth = np.asarray(estimate, float), np.asarray(truth, float)
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(k_a, k_b)`` cosine similarity of columns; 0 where a column is zero."""
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    denom = np.outer(na, nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a.T @ b) / denom
    return np.where(denom > 0, out, 0.0)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class FactorMatch:
    """Estimated factors matched to true ones.

    Attributes
    ----------
    order : ndarray of shape (k_true,)
        ``order[t]`` is the estimated factor matched to true factor ``t``.
    sign : ndarray of shape (k_true,)
        ``+1`` or ``-1``: flip the matched estimate by this to align it.
    similarity : ndarray of shape (k_true,)
        ``|cos|`` between the matched rank-one terms ``l f^T`` (1 is perfect).
    loadings_corr, factors_corr : ndarray of shape (k_true,)
        Pearson correlation of the sign-aligned matched columns of ``L`` and ``F``.
    """

    order: np.ndarray
    sign: np.ndarray
    similarity: np.ndarray
    loadings_corr: np.ndarray
    factors_corr: np.ndarray

    def align(self, a: np.ndarray) -> np.ndarray:
        """Columns of an estimate ``(m, k_est)`` in true-factor order and sign, ``(m, k_true)``."""
        return np.asarray(a)[:, self.order] * self.sign

    def reorder(self, a: np.ndarray) -> np.ndarray:
        """Columns of ``(m, k_est)`` (e.g. PIPs, per-factor priors) in true-factor order."""
        return np.asarray(a)[..., self.order]


def match_factors(loadings, factors, true_loadings, true_factors) -> FactorMatch:
    """Match estimated factors to true ones, invariant to sign and scale.

    The similarity of estimated factor ``a`` and true factor ``t`` is the
    ``|cos|`` of the rank-one terms ``l_a f_a^T`` and ``l_t f_t^T``, which is
    ``|cos(l_a, l_t)| |cos(f_a, f_t)|``; the matching maximises its sum
    (Hungarian algorithm).

    Parameters
    ----------
    loadings : ndarray of shape (n, k_est)
    factors : ndarray of shape (p, k_est)
    true_loadings : ndarray of shape (n, k_true)
    true_factors : ndarray of shape (p, k_true)
        ``k_est >= k_true``.

    Returns
    -------
    FactorMatch
    """
    loadings, factors = np.asarray(loadings, float), np.asarray(factors, float)
    true_loadings, true_factors = np.asarray(true_loadings, float), np.asarray(true_factors, float)
    k_est, k_true = loadings.shape[1], true_loadings.shape[1]
    if k_est < k_true:
        raise ValueError(f"need at least as many estimated factors ({k_est}) as true ({k_true})")
    cos_l = _cosine(true_loadings, loadings)  # (k_true, k_est)
    cos_f = _cosine(true_factors, factors)
    sim = np.abs(cos_l) * np.abs(cos_f)
    rows, cols = linear_sum_assignment(-sim)
    order = np.empty(k_true, dtype=int)
    order[rows] = cols
    # sign from the better-determined side
    use_f = np.abs(cos_f[np.arange(k_true), order]) >= np.abs(cos_l[np.arange(k_true), order])
    side = np.where(use_f, cos_f[np.arange(k_true), order], cos_l[np.arange(k_true), order])
    sign = np.where(side < 0, -1.0, 1.0)
    l_al, f_al = loadings[:, order] * sign, factors[:, order] * sign
    ts = range(k_true)
    return FactorMatch(
        order=order,
        sign=sign,
        similarity=sim[np.arange(k_true), order],
        loadings_corr=np.array([_correlation(l_al[:, t], true_loadings[:, t]) for t in ts]),
        factors_corr=np.array([_correlation(f_al[:, t], true_factors[:, t]) for t in ts]),
    )


def support_recovery(score, truth) -> dict:
    """How well ``score`` ranks the true non-zeros above the zeros.

    Parameters
    ----------
    score : array-like
        Higher means "more likely non-zero": a PIP, or ``|estimate|``.
    truth : array-like, same shape
        The true coefficients (non-zero = in the support).

    Returns
    -------
    dict
        ``auroc``, ``average_precision`` (``nan`` where the truth has only one
        class), ``n_nonzero`` and ``n``.
    """
    score = np.ravel(np.asarray(score, float))
    positive = np.ravel(np.asarray(truth) != 0)
    if score.shape != positive.shape:
        raise ValueError(f"score has {score.size} entries, truth {positive.size}")
    both = 0 < positive.sum() < positive.size
    return {
        "auroc": float(roc_auc_score(positive, score)) if both else float("nan"),
        "average_precision": (
            float(average_precision_score(positive, score)) if both else float("nan")
        ),
        "n_nonzero": int(positive.sum()),
        "n": int(positive.size),
    }


@dataclass
class Calibration:
    """Binned PIPs against the fraction truly non-zero.

    Attributes
    ----------
    edges : ndarray of shape (n_bins + 1,)
    count : ndarray of shape (n_bins,)
        Entries per bin.
    mean_pip : ndarray of shape (n_bins,)
        Mean PIP in the bin (``nan`` if empty).
    fraction_nonzero : ndarray of shape (n_bins,)
        Fraction of the bin's entries that are truly non-zero (``nan`` if empty).
    """

    edges: np.ndarray
    count: np.ndarray
    mean_pip: np.ndarray
    fraction_nonzero: np.ndarray

    def max_gap(self, min_count: int = 50) -> float:
        """Largest ``|fraction_nonzero - mean_pip|`` over bins with ``>= min_count`` entries."""
        ok = self.count >= min_count
        if not ok.any():
            return float("nan")
        return float(np.max(np.abs(self.fraction_nonzero[ok] - self.mean_pip[ok])))

    def as_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in self.__dataclass_fields__}


def calibration(pip, truth, n_bins: int = 10) -> Calibration:
    """Bin PIPs into ``n_bins`` equal-width bins on [0, 1] and compare with the truth.

    A calibrated PIP of 0.3 means that 30 % of the coefficients given it are non-zero.

    Parameters
    ----------
    pip : array-like
        Posterior inclusion probabilities.
    truth : array-like, same shape
        True coefficients.
    n_bins : int, default=10
    """
    pip = np.ravel(np.asarray(pip, float))
    positive = np.ravel(np.asarray(truth) != 0).astype(float)
    if pip.shape != positive.shape:
        raise ValueError(f"pip has {pip.size} entries, truth {positive.size}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(pip, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pip = np.bincount(which, weights=pip, minlength=n_bins) / count
        frac = np.bincount(which, weights=positive, minlength=n_bins) / count
    return Calibration(edges, count, mean_pip, frac)


def truth_in_estimate_gauge(match: FactorMatch, loadings, factors, true_loadings, true_factors):
    """The true ``L`` and ``F`` in the estimate's column order, sign and scale.

    ``L F^T`` is unchanged by ``l_k -> c l_k, f_k -> f_k / c``, so entries of
    ``L`` and ``F`` can be compared with the truth only in a common gauge. True
    factor ``t``, matched to estimated factor ``e``, is moved to column ``e``
    with the estimate's sign and rescaled by
    ``c = sqrt(||E[l_e]|| ||f_t|| / (||l_t|| ||E[f_e]||))``, which splits the
    scale of the true rank-one term between its two sides as the estimate
    does (``c = 1`` where either side is zero, e.g. a pruned factor).
    Estimated factors matched to no true factor get a true column of zeros.

    Returns
    -------
    true_loadings, true_factors : ndarray of shape (n, k_est), (p, k_est)
    """
    loadings, factors = np.asarray(loadings, float), np.asarray(factors, float)
    true_loadings, true_factors = np.asarray(true_loadings, float), np.asarray(true_factors, float)
    out_l = np.zeros_like(loadings)
    out_f = np.zeros_like(factors)
    for t, e in enumerate(match.order):
        norms = (
            np.linalg.norm(loadings[:, e]),
            np.linalg.norm(true_factors[:, t]),
            np.linalg.norm(true_loadings[:, t]),
            np.linalg.norm(factors[:, e]),
        )
        c = np.sqrt(norms[0] * norms[1] / (norms[2] * norms[3])) if min(norms) > 0 else 1.0
        out_l[:, e] = match.sign[t] * c * true_loadings[:, t]
        out_f[:, e] = match.sign[t] * true_factors[:, t] / c
    return out_l, out_f


def posterior_checks(posterior, truth, level: float = 0.95, lfsr_threshold: float = 0.05) -> dict:
    """Frequentist checks of a point-normal posterior against the truth.

    Parameters
    ----------
    posterior : spfa.posterior.PointNormalPosterior
    truth : ndarray, same shape
        True values in the posterior's gauge (:func:`truth_in_estimate_gauge`).
    level : float, default=0.95
        Credible level of the intervals.
    lfsr_threshold : float, default=0.05

    Returns
    -------
    dict
        ``coverage`` (fraction of entries inside their interval), with
        ``coverage_nonzero`` and ``coverage_zero`` split by the truth (with
        the counts ``n``, ``n_nonzero``, ``n_zero``);
        ``n_confident`` (entries with lfsr below the threshold) and
        ``sign_accuracy`` (fraction of those whose reported sign is the true
        one; a true zero counts as wrong), ``nan`` when there are none.
    """
    truth = np.asarray(truth, float)
    lower, upper = posterior.interval(level)
    inside = (lower <= truth) & (truth <= upper)
    nonzero = truth != 0
    confident = posterior.lfsr < lfsr_threshold
    right = posterior.sign[confident] == np.sign(truth[confident])

    def frac(a):
        return float(a.mean()) if a.size else float("nan")

    return {
        "coverage": frac(inside),
        "coverage_nonzero": frac(inside[nonzero]),
        "coverage_zero": frac(inside[~nonzero]),
        "n": int(truth.size),
        "n_nonzero": int(nonzero.sum()),
        "n_zero": int((~nonzero).sum()),
        "n_confident": int(confident.sum()),
        "sign_accuracy": frac(right),
    }
