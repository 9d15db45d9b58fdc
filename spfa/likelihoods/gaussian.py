"""The Gaussian likelihood with learned per-feature noise variance."""

from __future__ import annotations

import numpy as np
import torch

from ..links import Link
from ..special import LOG_2PI
from .base import Likelihood

__all__ = ["Gaussian"]


class Gaussian(Likelihood):
    """``x_ij ~ N(eta_ij, sigma2_j)`` with learned per-feature noise variance.

    The expected log-likelihood is exact (no sampling, whatever the
    ``expectation`` rule): ``E[(x - eta)^2] = (x - E[eta])^2 + V[eta]``.

    The noise variance is bounded below by ``1e-6`` times the average feature
    variance (or, where the features are constant, ``1e-6`` times their mean square),
    so data the model explains exactly (constant features, exactly low-rank data)
    cannot drive the ELBO to infinity; the bound never binds on noisy data.

    Parameters
    ----------
    link : str or Link, default="identity"
        Ignored: the link is always the identity.
    """

    name = "gaussian"
    integer_support = False
    positive_mean = False
    variance_from_mean = False

    def __init__(self, link: str | Link = "identity"):
        super().__init__("identity")

    def initialize(self, feature_mean, feature_var):
        var = np.asarray(feature_var, dtype=float)
        if "var_floor" not in self._buffers:
            # the floor is set once, by the first summaries: the initialisation gives the
            # data's own feature variances first and the low-rank residual's after, which
            # is ~0 on exactly low-rank data (a floor from it would not bound anything)
            # where every feature is (nearly) constant, their variance is rounding
            # (~1e-32): their mean square sets the scale then
            magnitude = float(np.mean(np.asarray(feature_mean, dtype=float) ** 2))
            scale = float(np.mean(var))
            scale = scale if scale > 1e-6 * magnitude else magnitude
            scale = scale if scale > 0 else 1.0
            self.register_buffer("var_floor", torch.tensor(1e-6 * scale))
            # eta is in the data's units: their typical size sets the optimiser's steps
            self.data_unit = float(np.sqrt(scale))
        floor = float(self.var_floor)
        raw = np.log(np.maximum(var - floor, floor))
        self.log_noise_var = torch.nn.Parameter(torch.as_tensor(raw).float())

    @property
    def noise_variance(self) -> torch.Tensor:
        """``sigma2_j``, shape ``[p]``."""
        return self.var_floor + torch.exp(self.log_noise_var)

    def variance_function(self, mu):
        """The noise variance ``sigma2_j``, whatever the mean, broadcast to ``mu``'s shape."""
        var = self.noise_variance.detach().cpu().double().numpy()
        return np.broadcast_to(var, np.shape(mu)).copy()

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        var = self.per_feature(self.noise_variance, cols)
        return -0.5 * (LOG_2PI + torch.log(var) + (x - eta) ** 2 / var)

    closed_form = True

    def expected_log_prob(
        self, x, eta_mean, eta_var, log_s, expectation, generator=None, rows=None, cols=None
    ):
        var = self.per_feature(self.noise_variance, cols)
        return -0.5 * (LOG_2PI + torch.log(var) + ((x - eta_mean) ** 2 + eta_var) / var)

    def mean(self, eta, log_s=None):
        return eta

    def sample(self, mean, rng):
        sd = np.sqrt(self.noise_variance.detach().cpu().double().numpy())
        return mean + sd * rng.standard_normal(np.shape(mean))

    def fitted_attributes(self):
        return {"noise_variance_": self.noise_variance.detach().cpu().double().numpy()}
