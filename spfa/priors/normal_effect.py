"""The intercept's prior: a normal random effect per feature with a learned normal prior.

``b_j ~ N(b0, 1/tau)``, ``q(b_j) = N(m_j, v_j)``; ``b0`` and ``tau`` are learned
(empirical Bayes). Not a sparse family: it is not chosen by ``prior=``.
"""

from __future__ import annotations

import torch

from .base import Moments

__all__ = ["NormalEffect", "normal_kl"]


def normal_kl(
    mean: torch.Tensor,
    log_var: torch.Tensor,
    prior_mean: torch.Tensor,
    prior_log_prec: torch.Tensor,
) -> torch.Tensor:
    """Elementwise ``KL(N(mean, exp(log_var)) || N(prior_mean, exp(-prior_log_prec)))``."""
    tau = torch.exp(prior_log_prec)
    return 0.5 * (
        tau * (torch.exp(log_var) + (mean - prior_mean) ** 2) - 1.0 - prior_log_prec - log_var
    )


class NormalEffect(torch.nn.Module):
    """Gaussian random effect per feature with a learned normal prior (empirical Bayes).

    ``b_j ~ N(b0, 1/tau)``, ``q(b_j) = N(m_j, v_j)``. Used for the intercept: when
    the features' baselines really differ (genes) the learned ``1/tau`` is wide
    and ``b`` is effectively free; when they do not, ``b`` shrinks to ``b0``
    instead of spending one noisy free parameter per feature.

    Parameters
    ----------
    m : int
        Number of effects (features).
    """

    #: the parameters in the effects' own units (they scale with the data)
    location_parameter_names = ("mean", "prior_mean")

    def __init__(self, m: int):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.zeros(m))
        self.log_var = torch.nn.Parameter(torch.zeros(m))
        self.prior_mean = torch.nn.Parameter(torch.zeros(()))
        self.prior_log_prec = torch.nn.Parameter(torch.zeros(()))

    def moments(self) -> Moments:
        return Moments(self.mean, torch.exp(self.log_var))

    def kl(self) -> torch.Tensor:
        return normal_kl(self.mean, self.log_var, self.prior_mean, self.prior_log_prec).sum()

    @property
    def prior_scale(self) -> torch.Tensor:
        return torch.exp(-0.5 * self.prior_log_prec)

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``b`` from ``q``, ``[m]``."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + torch.exp(0.5 * self.log_var) * eps
