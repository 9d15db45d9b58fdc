"""Summaries of a point-normal posterior: mean, sd, PIP, lfsr, credible intervals.

Each entry of ``L`` or ``F`` has the variational posterior::

    q(m) = alpha N(mu, s^2) + (1 - alpha) delta_0

a mixture with a point mass at zero, so its intervals and sign probabilities
are those of the mixture, not of the slab alone:

* ``cdf(t) = alpha Phi((t - mu) / s) + (1 - alpha) 1[t >= 0]``;
* the equal-tailed ``level`` interval is ``[Q((1-level)/2), Q((1+level)/2)]``
  with ``Q`` the mixture's quantile function; it contains 0 whenever the
  point mass straddles either tail probability, i.e. whenever
  ``1 - alpha`` is large enough;
* the local false sign rate (Stephens 2017) is the posterior probability that
  the sign of the entry is not the one reported:
  ``lfsr = min(P(m >= 0), P(m <= 0)) = (1 - alpha) + alpha Phi(-|mu| / s)``,
  counting the point mass on both sides (a zero has no sign to get right).

Everything here is float64 numpy; tail probabilities use ``scipy.special``
(``ndtr``, ``ndtri``) on the smaller tail so that they keep their relative
precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

__all__ = ["PointNormalPosterior"]


@dataclass(frozen=True)
class PointNormalPosterior:
    """Posterior of an ``(m, k)`` matrix with independent point-normal entries.

    Parameters
    ----------
    pip : ndarray of shape (m, k)
        Posterior inclusion probability ``alpha``; 0 for a pruned factor.
    slab_mean : ndarray of shape (m, k)
        Mean ``mu`` of the slab (the normal component).
    slab_sd : ndarray of shape (m, k)
        Standard deviation ``s > 0`` of the slab.
    """

    pip: np.ndarray
    slab_mean: np.ndarray
    slab_sd: np.ndarray

    def __post_init__(self):
        arrays = [np.asarray(a, dtype=np.float64) for a in (self.pip, self.slab_mean, self.slab_sd)]
        shape = arrays[0].shape
        if any(a.shape != shape for a in arrays):
            raise ValueError(
                f"pip, slab_mean and slab_sd must have one shape, got {[a.shape for a in arrays]}"
            )
        if np.any((arrays[0] < 0) | (arrays[0] > 1)) or np.any(~(arrays[2] > 0)):
            raise ValueError("pip must lie in [0, 1] and slab_sd must be > 0")
        for name, a in zip(("pip", "slab_mean", "slab_sd"), arrays, strict=True):
            object.__setattr__(self, name, a)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pip.shape

    @property
    def mean(self) -> np.ndarray:
        """Posterior mean ``alpha mu``."""
        return self.pip * self.slab_mean

    @property
    def var(self) -> np.ndarray:
        """Posterior variance ``alpha s^2 + alpha (1 - alpha) mu^2``."""
        a = self.pip
        return a * self.slab_sd**2 + a * (1.0 - a) * self.slab_mean**2

    @property
    def sd(self) -> np.ndarray:
        """Posterior standard deviation."""
        return np.sqrt(self.var)

    @property
    def lfsr(self) -> np.ndarray:
        """Local false sign rate ``(1 - alpha) + alpha Phi(-|mu| / s)``."""
        return (1.0 - self.pip) + self.pip * special.ndtr(-np.abs(self.slab_mean) / self.slab_sd)

    @property
    def sign(self) -> np.ndarray:
        """The sign the lfsr refers to: that of ``mu`` (0 where ``alpha = 0``)."""
        return np.where(self.pip > 0, np.sign(self.slab_mean), 0.0)

    def cdf(self, t) -> np.ndarray:
        """``P(m <= t)`` elementwise (``t`` broadcasts against the matrix)."""
        t = np.asarray(t, dtype=np.float64)
        slab = special.ndtr((t - self.slab_mean) / self.slab_sd)
        return self.pip * slab + (1.0 - self.pip) * (t >= 0)

    def quantile(self, q) -> np.ndarray:
        """Quantile function: the smallest ``t`` with ``cdf(t) >= q``, elementwise.

        Parameters
        ----------
        q : float or array broadcastable to the matrix, in (0, 1)
        """
        q = np.asarray(q, dtype=np.float64)
        if np.any((q <= 0) | (q >= 1)):
            raise ValueError("quantile levels must lie strictly between 0 and 1")
        a, mu, s = self.pip, self.slab_mean, self.slab_sd
        q = np.broadcast_to(q, np.broadcast_shapes(q.shape, a.shape))
        below = a * special.ndtr(-mu / s)  # mass of the slab below 0
        with np.errstate(divide="ignore", invalid="ignore"):
            # lower part: alpha Phi((t - mu)/s) = q
            lower = mu + s * special.ndtri(q / a)
            # upper part: alpha (1 - Phi((t - mu)/s)) = 1 - q, solved on the upper tail
            upper = mu - s * special.ndtri((1.0 - q) / a)
        return np.where(q <= below, lower, np.where(q <= below + (1.0 - a), 0.0, upper))

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
        rng = np.random.default_rng(random_state)
        shape = (n_draws,) + self.shape
        on = rng.random(shape) < self.pip
        return np.where(on, self.slab_mean + self.slab_sd * rng.standard_normal(shape), 0.0)
