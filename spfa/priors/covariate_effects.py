"""Known covariates' effects: one normal coefficient per feature and covariate.

    eta_ij += sum_c C_ic B_jc,   B_jc ~ N(0, 1/tau_c),   q(B_jc) = N(m_jc, v_jc)

``C`` (``n x c``) is given with the data (a one-hot batch, a continuous
covariate); ``B`` (``p x c``) is learned, with each covariate's prior
precision ``tau_c`` learned too (empirical Bayes). Not sparse: a batch moves
every gene a little. In the factored linear predictor the covariates are
known loadings (variance 0) and ``B`` is their factors, so every likelihood's
ELBO takes them without a change (:mod:`spfa.linear_predictor`).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Moments
from .normal_effect import normal_kl

__all__ = ["CovariateEffects"]

#: smallest prior variance a covariate's effects start with, in ``eta``'s units squared
#: (as the intercept's): a covariate whose start finds no effect is not pinned at 0
START_PRIOR_VARIANCE = 1e-2


class CovariateEffects(torch.nn.Module):
    """``q(B)`` and its prior for ``p`` features and ``c`` covariates.

    Parameters
    ----------
    p, c : int
        Features and covariates.
    """

    #: the parameters in ``eta``'s units
    location_parameter_names = ("mean",)

    def __init__(self, p: int, c: int):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.zeros(p, c))
        self.log_var = torch.nn.Parameter(torch.zeros(p, c))
        self.prior_log_prec = torch.nn.Parameter(torch.zeros(c))

    @property
    def n_covariates(self) -> int:
        return self.mean.shape[1]

    def moments(self) -> Moments:
        """``E[B]`` and ``V[B]``, ``[p, c]`` each."""
        return Moments(self.mean, torch.exp(self.log_var))

    def kl(self) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.mean.dtype, device=self.mean.device)
        return normal_kl(self.mean, self.log_var, zero, self.prior_log_prec).sum()

    @property
    def prior_scale(self) -> torch.Tensor:
        """Each covariate's prior sd ``1 / sqrt(tau_c)``, ``[c]``."""
        return torch.exp(-0.5 * self.prior_log_prec)

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``B`` from ``q``, ``[p, c]``."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + torch.exp(0.5 * self.log_var) * eps

    @torch.no_grad()
    def start_(self, coef: np.ndarray, precision: np.ndarray, unit: float = 1.0) -> None:
        """Start at point estimates ``coef`` (``(p, c)``, e.g. a least-squares fit of the
        linearised data) with their data ``precision`` (``(p, c)``): the prior's variance
        is each covariate's mean square of ``coef`` (at least ``START_PRIOR_VARIANCE``
        ``unit^2``), ``q``'s precision the data's plus the prior's."""
        coef = np.asarray(coef, dtype=np.float64)
        variance = np.maximum((coef**2).mean(0), START_PRIOR_VARIANCE * unit**2)
        tau = 1.0 / variance
        like = self.mean
        self.mean.copy_(torch.as_tensor(coef, dtype=like.dtype, device=like.device))
        log_var = -np.log(np.asarray(precision, dtype=np.float64) + tau)
        self.log_var.copy_(torch.as_tensor(log_var, dtype=like.dtype, device=like.device))
        self.prior_log_prec.copy_(torch.as_tensor(np.log(tau), dtype=like.dtype))
