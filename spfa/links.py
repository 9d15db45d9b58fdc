"""Link functions ``h`` mapping the linear predictor ``eta`` to the mean scale.

Each link supplies ``h(eta)``, a numerically stable ``log h(eta)`` (count
likelihoods only ever need the log-mean, see DESIGN.md), the inverse used for
initialisation and the derivative used by the initial linearisation.

New links are added by subclassing :class:`Link` and registering the class in
``LINKS``; nothing else in spfa names a link.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .special import log_softplus, softplus

__all__ = ["Link", "Softplus", "Exp", "Sigmoid", "Identity", "LINKS", "get_link"]


class Link:
    """Base class: a strictly increasing map from the real line to the mean scale."""

    name: str = ""
    #: the range of h is the positive half-line (usable by count likelihoods)
    positive: bool = True

    def __call__(self, eta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log(self, eta: torch.Tensor) -> torch.Tensor:
        """``log h(eta)``, finite with finite gradients for every finite ``eta``."""
        raise NotImplementedError

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """``h^{-1}(y)`` in numpy, used to initialise the intercept."""
        raise NotImplementedError

    def derivative(self, eta: np.ndarray) -> np.ndarray:
        """``h'(eta)`` in numpy, used by the initial linearisation."""
        raise NotImplementedError

    def positive_at(self, p: int) -> np.ndarray:
        """Whether the mean is positive at each of ``p`` features (one link: all alike)."""
        return np.full(p, self.positive)

    def inverse_at(self, y: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``h^{-1}`` of values ``y`` at features ``cols`` (one link: of ``y`` alone)."""
        return self.inverse(y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Softplus(Link):
    """``h(eta) = log(1 + exp(eta))``: linear for large eta, exp-like for small."""

    name = "softplus"

    def __call__(self, eta):
        return softplus(eta)

    def log(self, eta):
        return log_softplus(eta)

    def inverse(self, y):
        y = np.asarray(y, dtype=float)
        # log(expm1(y)) written to avoid overflow for large y
        return y + np.log(-np.expm1(-y))

    def derivative(self, eta):
        return 1.0 / (1.0 + np.exp(-np.asarray(eta, dtype=float)))


class Exp(Link):
    """``h(eta) = exp(eta)``, the canonical Poisson link.

    In float32, ``exp(eta)`` overflows above ``eta ~ 88``; ``log h`` is exact
    everywhere.
    """

    name = "exp"

    def __call__(self, eta):
        return torch.exp(eta)

    def log(self, eta):
        return eta

    def inverse(self, y):
        return np.log(np.asarray(y, dtype=float))

    def derivative(self, eta):
        return np.exp(np.asarray(eta, dtype=float))


class Sigmoid(Link):
    """``h(eta) = scale * sigmoid(eta)``: a mean bounded above by ``scale``.

    With a count likelihood and size factors equal to each sample's total
    count (library size), ``s_i sigmoid(eta_ij)`` makes ``sigmoid(eta_ij)`` the
    expected *proportion* of sample ``i``'s counts in feature ``j``, which
    cannot exceed 1: the natural reading of seed 002's sigmoid activation.
    ``log h = log scale + logsigmoid(eta)`` is exact everywhere. Fitting
    data whose mean of ``x / s`` reaches ``scale`` raises ``ValueError``.

    Parameters
    ----------
    scale : float, default=1.0
        Upper bound of the mean per unit size factor.
    """

    name = "sigmoid"

    def __init__(self, scale: float = 1.0):
        scale = float(scale)
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"the sigmoid link's scale must be finite and > 0, got {scale!r}")
        self.scale = scale
        self._log_scale = math.log(scale)

    def __call__(self, eta):
        return self.scale * torch.sigmoid(eta)

    def log(self, eta):
        return self._log_scale + F.logsigmoid(eta)

    def inverse(self, y):
        q = np.asarray(y, dtype=float) / self.scale
        if np.any(q >= 1):
            raise ValueError(
                f"the sigmoid link bounds the mean of x / s by scale={self.scale:g}, but some "
                f"features have a mean of {q.max() * self.scale:.3g}; give library sizes as "
                "size_factors or use Sigmoid(scale=...) with a larger bound"
            )
        return np.log(q) - np.log1p(-q)

    def derivative(self, eta):
        e = np.asarray(eta, dtype=float)
        return self.scale / ((1.0 + np.exp(-e)) * (1.0 + np.exp(e)))

    def __repr__(self) -> str:
        return f"Sigmoid(scale={self.scale:g})"


class Identity(Link):
    """``h(eta) = eta``; the Gaussian likelihood's link."""

    name = "identity"
    positive = False

    def __call__(self, eta):
        return eta

    def log(self, eta):  # pragma: no cover - never used by a positive likelihood
        raise TypeError("the identity link has no log-mean")

    def inverse(self, y):
        return np.asarray(y, dtype=float)

    def derivative(self, eta):
        return np.ones_like(np.asarray(eta, dtype=float))


LINKS: dict[str, type[Link]] = {cls.name: cls for cls in (Softplus, Exp, Sigmoid, Identity)}


def get_link(link: str | Link) -> Link:
    """Return a :class:`Link` instance from a name or an instance."""
    if isinstance(link, Link):
        return link
    if isinstance(link, str) and link in LINKS:
        return LINKS[link]()
    raise ValueError(f"unknown link {link!r}; expected one of {sorted(LINKS)} or a Link instance")
