"""Posterior summaries of a matrix with independent entries: the shared part.

Every prior family (:mod:`spfa.priors`) describes its variational posterior
``q`` of an ``(m, k)`` matrix by a subclass of :class:`Posterior`, in float64
numpy, which supplies the moments, ``cdf``, the mass ``q(theta = 0)`` of a
point at zero (0 for a continuous ``q``) and draws. From these the base class
gives what users read off a fit:

* ``sd``, and ``pip = 1 - q(theta = 0)`` (each family defines it; 1 for a
  continuous ``q``);
* the local false sign rate (Stephens 2017), the posterior probability that
  the sign of the entry is not the one reported, counting the point mass on
  both sides (a zero has no sign to get right)::

      lfsr = min(P(theta <= 0), P(theta >= 0))

* quantiles (the smallest ``t`` with ``cdf(t) >= q``; by bisection unless a
  family has a closed form) and equal-tailed credible intervals, which contain
  0 whenever the point mass straddles either tail probability.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["Posterior", "top_features"]

#: bisection steps of the generic quantile: the bracket shrinks by 2^-60
_BISECTION_STEPS = 60


class Posterior:
    """Base class of the posterior summaries of an ``(m, k)`` matrix (float64 numpy)."""

    #: the names of the constructor's arrays, each with the matrix's rows first (so that
    #: summaries of row blocks can be stacked: :class:`spfa.priors.ViewFamily`)
    fields: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.mean.shape

    @property
    def mean(self) -> np.ndarray:
        """Posterior mean, ``(m, k)``."""
        raise NotImplementedError

    @property
    def var(self) -> np.ndarray:
        """Posterior variance, ``(m, k)``."""
        raise NotImplementedError

    @property
    def zero_mass(self) -> np.ndarray:
        """``q(theta = 0)``, ``(m, k)``: the point mass at zero (0 for a continuous ``q``)."""
        return np.zeros(self.shape)

    @property
    def sd(self) -> np.ndarray:
        """Posterior standard deviation."""
        return np.sqrt(np.maximum(self.var, 0.0))

    def cdf(self, t) -> np.ndarray:
        """``P(theta <= t)`` elementwise (``t`` broadcasts against the matrix)."""
        raise NotImplementedError

    def prob_below_zero(self) -> np.ndarray:
        """``P(theta < 0)``, ``(m, k)``; families override it to keep tail precision."""
        return self.cdf(0.0) - self.zero_mass

    def prob_above_zero(self) -> np.ndarray:
        """``P(theta > 0)``, ``(m, k)``."""
        return 1.0 - self.cdf(0.0)

    @property
    def lfsr(self) -> np.ndarray:
        """Local false sign rate ``min(P(theta <= 0), P(theta >= 0))``."""
        below, above, zero = self.prob_below_zero(), self.prob_above_zero(), self.zero_mass
        return np.clip(np.minimum(below, above) + zero, 0.0, 1.0)

    @property
    def sign(self) -> np.ndarray:
        """The sign the lfsr refers to: the more probable side (0 where ``pip = 0``)."""
        side = np.where(self.prob_above_zero() >= self.prob_below_zero(), 1.0, -1.0)
        return np.where(self.zero_mass < 1, side, 0.0)

    def quantile(self, q) -> np.ndarray:
        """Quantile function: the smallest ``t`` with ``cdf(t) >= q``, elementwise.

        Parameters
        ----------
        q : float or array broadcastable to the matrix, in (0, 1)
        """
        q = self._check_levels(q)
        return self._bisect(q)

    def _check_levels(self, q) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        if np.any((q <= 0) | (q >= 1)):
            raise ValueError("quantile levels must lie strictly between 0 and 1")
        return np.broadcast_to(q, np.broadcast_shapes(q.shape, self.shape))

    def _bisect(self, q: np.ndarray) -> np.ndarray:
        """Generic quantile by bisection on ``cdf`` (monotone, right-continuous)."""
        width = 40.0 * np.sqrt(np.maximum(self.var, 0.0)) + 1e-300
        lo = np.broadcast_to(self.mean - width, q.shape).copy()
        hi = np.broadcast_to(self.mean + width, q.shape).copy()
        lo = np.minimum(lo, 0.0)  # the point mass at 0 may lie outside mean +- width
        hi = np.maximum(hi, 0.0)
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            above = self.cdf(mid) >= q
            hi = np.where(above, mid, hi)
            lo = np.where(above, lo, mid)
        # a point mass is an atom of the cdf: snap to it when the bracket holds it
        at_zero = (lo <= 0) & (hi >= 0) & (self.cdf(0.0) >= q)
        return np.where(at_zero, 0.0, hi)

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Equal-tailed credible interval of each entry.

        Parameters
        ----------
        level : float in (0, 1), default=0.95

        Returns
        -------
        lower, upper : ndarray of shape (m, k)
        """
        if not 0 < level < 1:
            raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
        tail = 0.5 * (1.0 - level)
        return self.quantile(tail), self.quantile(1.0 - tail)

    def sample(self, n_draws: int, random_state=None) -> np.ndarray:
        """Independent draws from ``q``, shape ``(n_draws, m, k)``."""
        raise NotImplementedError


def check_same_shape(names, arrays) -> list[np.ndarray]:
    """``arrays`` as float64, with a ValueError naming them unless they share a shape."""
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    if any(a.shape != arrays[0].shape for a in arrays):
        shapes = [a.shape for a in arrays]
        raise ValueError(f"{', '.join(names)} must have one shape, got {shapes}")
    return arrays


def top_features(posterior: Posterior, active, names, n_top=10, min_pip=0.5) -> list[dict]:
    """The features that make up each factor, strongest first.

    Within each kept factor, the features with PIP at least ``min_pip`` are
    ranked by the size of their posterior mean effect ``|E[f_jk]|`` (which
    weighs confidence and size together).

    Parameters
    ----------
    posterior : Posterior
        Of the factors, ``(p, k)``.
    active : ndarray of bool, shape (k,)
        Kept factors (pruned ones have no features).
    names : ndarray of str, shape (p,)
    n_top : int, default=10
        At most this many features per factor.
    min_pip : float in [0, 1], default=0.5

    Returns
    -------
    list of dict
        One record per (factor, feature), ready for ``pandas.DataFrame``:
        ``component``, ``rank``, ``feature``, ``index``, ``pip``, ``mean``,
        ``sd``, ``lfsr``.
    """
    if isinstance(n_top, bool) or not isinstance(n_top, numbers.Integral) or n_top < 1:
        raise ValueError(f"n_top must be an integer >= 1, got {n_top!r}")
    if not (isinstance(min_pip, numbers.Real) and 0 <= min_pip <= 1):
        raise ValueError(f"min_pip must lie in [0, 1], got {min_pip!r}")
    pip, mean, sd, lfsr = posterior.pip, posterior.mean, posterior.sd, posterior.lfsr
    records = []
    for k in np.flatnonzero(active):
        keep = np.flatnonzero(pip[:, k] >= min_pip)
        ranked = keep[np.argsort(-np.abs(mean[keep, k]), kind="stable")][:n_top]
        for rank, j in enumerate(ranked):
            records.append(
                {
                    "component": int(k),
                    "rank": rank,
                    "feature": str(names[j]),
                    "index": int(j),
                    "pip": float(pip[j, k]),
                    "mean": float(mean[j, k]),
                    "sd": float(sd[j, k]),
                    "lfsr": float(lfsr[j, k]),
                }
            )
    return records
