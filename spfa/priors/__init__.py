"""Prior families on the loadings and factors (see :mod:`spfa.priors.base`).

A family is chosen by name with ``SparseFactorAnalysis(prior=...)``: one name
for both ``L`` and ``F``, or ``{"loadings": name, "factors": name}``. Adding a
family is one module and one line in :data:`PRIORS`.
"""

from __future__ import annotations

from .base import Moments, PriorFamily
from .covariate_effects import CovariateEffects
from .normal_effect import NormalEffect, normal_kl
from .normal_mixture import NormalMixture, NormalMixturePosterior
from .point_exponential import PointExponential, PointExponentialPosterior
from .point_normal import PointNormal, PointNormalPosterior, point_normal_kl, point_normal_moments
from .views import ViewFamily

__all__ = [
    "PRIORS",
    "SIDES",
    "CovariateEffects",
    "Moments",
    "PriorFamily",
    "PointNormal",
    "PointNormalPosterior",
    "PointExponential",
    "PointExponentialPosterior",
    "NormalMixture",
    "NormalMixturePosterior",
    "NormalEffect",
    "ViewFamily",
    "get_prior",
    "normal_kl",
    "point_normal_kl",
    "point_normal_moments",
    "resolve_priors",
]

#: the registered families, by name
PRIORS: dict[str, type[PriorFamily]] = {
    cls.name: cls for cls in (PointNormal, PointExponential, NormalMixture)
}

#: the matrices a family can be put on
SIDES = ("loadings", "factors")


def get_prior(name: str) -> type[PriorFamily]:
    """The family registered as ``name``; ValueError naming the choices otherwise."""
    if isinstance(name, str) and name in PRIORS:
        return PRIORS[name]
    raise ValueError(f"unknown prior {name!r}; expected one of {sorted(PRIORS)}")


def resolve_priors(prior) -> dict[str, str]:
    """``{"loadings": name, "factors": name}`` from a name or such a dict.

    Raises
    ------
    ValueError
        For an unknown name, or a dict whose keys are not exactly the sides.
    """
    if isinstance(prior, str):
        get_prior(prior)
        return dict.fromkeys(SIDES, prior)
    if isinstance(prior, dict):
        if set(prior) != set(SIDES):
            raise ValueError(
                f"a prior dict needs exactly the keys {list(SIDES)}, got {sorted(prior)}"
            )
        for name in prior.values():
            get_prior(name)
        return {side: prior[side] for side in SIDES}
    raise ValueError(
        f"prior must be a name in {sorted(PRIORS)} or a dict {{'loadings': name, "
        f"'factors': name}}, got {prior!r}"
    )
