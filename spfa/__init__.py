"""spfa: variational sparse factor analysis in PyTorch."""

import logging

from ._validation import NonIntegerCountsWarning, SizeFactorsWarning
from ._version import __version__
from .estimator import SparseFactorAnalysis
from .likelihoods import LIKELIHOODS, Likelihood, get_likelihood
from .links import LINKS, Link
from .model_selection import choose_k
from .priors import PRIORS

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "SparseFactorAnalysis",
    "Likelihood",
    "Link",
    "LIKELIHOODS",
    "LINKS",
    "NonIntegerCountsWarning",
    "SizeFactorsWarning",
    "PRIORS",
    "choose_k",
    "get_likelihood",
    "__version__",
]
