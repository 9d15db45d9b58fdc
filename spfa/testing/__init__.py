"""Conformance checks for extensions of spfa: a new likelihood or prior family runs
``check_likelihood(name)`` / ``check_prior(name)`` in one line (the test suite runs
them for every registered one)."""

from .likelihoods import check_likelihood
from .priors import check_prior

__all__ = ["check_likelihood", "check_prior"]
