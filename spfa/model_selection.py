"""Choosing the number of factors ``k`` by held-out log-likelihood.

:func:`choose_k` holds out the same part of ``X`` for every candidate (binomial
thinning of counts, or masked entries), fits each ``k`` on the rest and scores
the held-out part by its log posterior predictive density per entry
(:func:`spfa.heldout.heldout_score`). Because unsupported factors are pruned,
the score rises with ``k`` up to what the data support and then flattens; the
choice is the smallest ``k`` that reaches all but ``tolerance`` of the best
candidate's gain over the smallest one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from sklearn.base import clone

from ._validation import check_positive_int
from .heldout import heldout_score

__all__ = ["KChoice", "choose_k"]


@dataclass(frozen=True)
class KChoice:
    """The result of :func:`choose_k`.

    Attributes
    ----------
    k : int
        The chosen number of factors.
    table : list of dict
        One record per candidate, in increasing ``k``: ``k``, ``score`` (held-out
        log-likelihood per entry), ``n_effective`` (factors kept after pruning)
        and ``seconds``; ``pandas.DataFrame(choice.table)`` makes a table.
    """

    k: int
    table: list


def choose_k(
    estimator,
    X,
    candidates,
    *,
    method="thin",
    fraction=0.5,
    size_factors=None,
    covariates=None,
    feature_groups=None,
    tolerance=0.1,
    n_draws=100,
    random_state=0,
) -> KChoice:
    """Choose ``n_components`` by held-out log-likelihood.

    Parameters
    ----------
    estimator : SparseFactorAnalysis
        Template whose other parameters are kept (it is not modified).
    X : array-like or sparse matrix of shape (n_samples, n_features)
    candidates : iterable of int
        Values of ``n_components`` to try (at least two).
    method : {"thin", "mask"}, default="thin"
        Binomial thinning of counts (the default for count likelihoods), or
        held-out random entries (any likelihood).
    fraction : float in (0, 1), default=0.5
        Share held out.
    size_factors : array-like of shape (n_samples,), default=None
    covariates : array-like of shape (n_samples, c), default=None
        Known covariates of the rows, fitted beside the factors at every ``k``.
    feature_groups : array-like of shape (n_features,), default=None
        Each feature's view, for a multi-view ``estimator``.
    tolerance : float in [0, 1), default=0.1
        The choice is the smallest ``k`` whose score is at least
        ``best - tolerance * (best - score of the smallest k)``.
    n_draws : int, default=100
        Posterior draws of the predictive density.
    random_state : int, default=0
        Seeds the split (the same for every candidate) and the draws.

    Returns
    -------
    KChoice
    """
    ks = sorted({check_positive_int(k, "each candidate") for k in candidates})
    if len(ks) < 2:
        raise ValueError(f"choose_k needs at least two candidates, got {ks}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance!r}")
    table = []
    for k in ks:
        start = time.perf_counter()
        template = clone(estimator).set_params(n_components=k)
        score, fitted = heldout_score(
            template,
            X,
            method=method,
            fraction=fraction,
            size_factors=size_factors,
            covariates=covariates,
            feature_groups=feature_groups,
            n_draws=n_draws,
            random_state=random_state,
        )
        table.append(
            {
                "k": k,
                "score": float(score),
                "n_effective": int(fitted.n_effective_components_),
                "seconds": time.perf_counter() - start,
            }
        )
    scores = np.array([row["score"] for row in table])
    best = scores.max()
    threshold = best - tolerance * (best - scores[0])
    chosen = ks[int(np.flatnonzero(scores >= threshold)[0])]
    return KChoice(k=chosen, table=table)
