"""spfa: variational sparse (spike-and-slab) factor analysis in PyTorch."""

from .estimator import SparseFactorAnalysis
from .likelihoods import LIKELIHOODS, Likelihood, get_likelihood
from .links import LINKS, Link

__version__ = "0.1.0"

__all__ = [
    "SparseFactorAnalysis",
    "Likelihood",
    "Link",
    "LIKELIHOODS",
    "LINKS",
    "get_likelihood",
    "__version__",
]
