"""How ``E_q[log p(x | eta)]`` is estimated for ``eta ~ N(m, v)``, elementwise.

The ELBO's data term is an expectation over the Gaussian of the linear
predictor ``eta`` (local reparameterisation, Kingma, Salimans & Welling 2015).
Except for the Gaussian likelihood it has no closed form; an
:class:`Expectation` turns it into a weighted sum over points::

    E[g(eta)] ~ sum_s w_s g(m + sqrt(v) z_s)

* :class:`MonteCarlo` -- ``z_s`` standard normal draws, ``w_s = 1/S``:
  unbiased, noisy, any ``S``.
* :class:`GaussHermite` -- ``z_s = sqrt(2) t_s`` at the nodes ``t_s`` of the
  ``S``-point Gauss--Hermite rule and ``w_s`` its weights over ``sqrt(pi)``:
  deterministic, exact for ``g`` a polynomial of degree ``< 2S``, and accurate
  to many digits for the smooth log-likelihoods of spfa at ``S ~ 10``; it
  costs ``S`` evaluations per entry, like ``S`` Monte Carlo draws.

Likelihoods call :meth:`Expectation.points`; nothing else in spfa needs to
know which rule is in use.
"""

from __future__ import annotations

import numpy as np
import torch

from ._validation import check_positive_int

__all__ = ["Expectation", "MonteCarlo", "GaussHermite", "EXPECTATIONS", "get_expectation"]


class Expectation:
    """Base class: a rule ``E[g(eta)] ~ sum_s w_s g(eta_s)`` for Gaussian ``eta``."""

    name: str = ""
    #: the rule gives the same value every time (no random numbers)
    deterministic: bool = False

    def __init__(self, n_points: int):
        self.n_points = check_positive_int(n_points, "n_points")

    def points(
        self,
        mean: torch.Tensor,
        var: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation points and weights.

        Parameters
        ----------
        mean, var : Tensor of shape (...)
            Moments of ``eta``.
        generator : torch.Generator, optional
            Used by random rules.

        Returns
        -------
        eta : Tensor of shape (S, ...)
        weights : Tensor of shape (S, 1, ..., 1)
            Broadcastable against ``eta``; they sum to 1.
        """
        tiny = torch.finfo(var.dtype).tiny
        sd = torch.sqrt(torch.clamp(var, min=tiny))
        z, w = self._standard(mean, generator)
        return mean + sd * z, w.view((-1,) + (1,) * mean.dim())

    def _standard(self, like: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard-normal points ``(S, ...)`` (or broadcastable) and weights ``(S,)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_points={self.n_points})"


class MonteCarlo(Expectation):
    """``S`` independent standard normal draws per entry, equal weights."""

    name = "mc"

    def _standard(self, like, generator):
        z = torch.randn(
            (self.n_points,) + tuple(like.shape),
            generator=generator,
            device=like.device,
            dtype=like.dtype,
        )
        w = torch.full((self.n_points,), 1.0 / self.n_points, device=like.device, dtype=like.dtype)
        return z, w


class GaussHermite(Expectation):
    """The ``S``-point Gauss--Hermite rule for a normal expectation (deterministic).

    Nodes and weights come from :func:`numpy.polynomial.hermite.hermgauss` in
    float64 and are cast once per call to the data's dtype and device.
    """

    name = "quadrature"
    deterministic = True

    def __init__(self, n_points: int):
        super().__init__(n_points)
        t, w = np.polynomial.hermite.hermgauss(self.n_points)
        self._nodes = np.sqrt(2.0) * t
        self._weights = w / np.sqrt(np.pi)

    def _standard(self, like, generator):
        z = torch.as_tensor(self._nodes, device=like.device, dtype=like.dtype)
        z = z.view((-1,) + (1,) * like.dim())
        w = torch.as_tensor(self._weights, device=like.device, dtype=like.dtype)
        return z, w


EXPECTATIONS: dict[str, type[Expectation]] = {cls.name: cls for cls in (MonteCarlo, GaussHermite)}


def get_expectation(name: str, n_points: int) -> Expectation:
    """Build the rule registered under ``name`` with ``n_points`` points."""
    if isinstance(name, str) and name in EXPECTATIONS:
        return EXPECTATIONS[name](n_points)
    raise ValueError(f"unknown expectation {name!r}; expected one of {sorted(EXPECTATIONS)}")
