"""Simulate data from the model: the seed notebook's sanity-check designs.

Used by the tests and by ``simulations/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Simulation",
    "BatchSimulation",
    "simulate_point_normal",
    "simulate",
    "simulate_batch_effect",
    "MATCHED_FIT",
]

#: the seed notebook's design
SANITY_PI0 = (0.1, 0.9, 0.99)
SANITY_SLAB_SD = (0.5, 1.0, 2.0)
#: estimator settings of the model these simulators draw from: the softplus link,
#: and size factors only where the design has them (the estimator's defaults, the
#: exp link and library sizes, were chosen on real counts)
MATCHED_FIT = {"link": "softplus", "library_size": False}


@dataclass
class Simulation:
    """A simulated data set and the truth behind it."""

    x: np.ndarray  # (n, p) data
    loadings: np.ndarray  # (n, k) true L
    factors: np.ndarray  # (p, k) true F
    mean: np.ndarray  # (n, p) true E[x] (size factor included)
    size_factors: np.ndarray | None  # (n,)
    likelihood: str
    intercept: np.ndarray | None = None  # (p,) true per-feature intercept of eta


def simulate_point_normal(rng, m, pi0, slab_sd):
    """``m x k`` matrix with entries ``(1 - pi0_k) N(0, sd_k^2) + pi0_k delta_0``.

    ``pi0`` is the probability of a zero (the notebook's convention).
    """
    pi0 = np.asarray(pi0, dtype=float)
    sd = np.asarray(slab_sd, dtype=float)
    k = len(pi0)
    out = np.zeros((m, k))
    nonzero = rng.uniform(size=(m, k)) > pi0
    out[nonzero] = rng.normal(size=(m, k), scale=sd)[nonzero]
    return out


def simulate(
    likelihood="gaussian",
    *,
    n=100,
    p=500,
    pi0=SANITY_PI0,
    slab_sd=SANITY_SLAB_SD,
    size_factors=None,
    inverse_dispersion=5.0,
    zero_inflation=0.0,
    intercept=None,
    seed=1,
) -> Simulation:
    """Simulate from the notebook's design (defaults) or a variant.

    Parameters
    ----------
    likelihood : {"gaussian", "poisson", "negative_binomial", "zinb"}
        Gaussian: ``x ~ N(L F^T, 1)``; counts: mean ``s * softplus(L F^T)``
        (for ``"zinb"`` the mean of the NB part). The zero-truncated models
        have no simulator of their own: simulate the untruncated one and fit
        its non-zero entries.
    size_factors : None, "random" or array of shape (n,)
        ``"random"`` draws log-normal size factors (sd 0.5, median 1).
    inverse_dispersion : float or array broadcastable to (n, p)
        NB ``r`` (variance ``mu + mu^2 / r``): one value, per feature
        ``(p,)``, or per entry ``(n, p)`` (e.g. ``(n, 1)`` for groups of samples).
    zero_inflation : float or array of shape (p,)
        ``"zinb"`` only: probability that an entry is an extra zero.
    intercept : None, "random" or array of shape (p,)
        Per-feature baseline added to ``eta = L F^T``; ``"random"`` draws
        ``N(-1.5, 1)``, which with softplus gives sparse, single-cell-like counts.
    seed : int
        ``numpy.random.default_rng`` seed; ``seed=1`` with the defaults draws
        the notebook's own L and F.
    """
    rng = np.random.default_rng(seed)
    loadings = simulate_point_normal(rng, n, pi0, slab_sd)
    factors = simulate_point_normal(rng, p, pi0, slab_sd)
    eta = loadings @ factors.T
    b = None
    if isinstance(intercept, str) and intercept == "random":
        b = rng.normal(loc=-1.5, size=p)
    elif intercept is not None:
        b = np.asarray(intercept, dtype=float)
    if b is not None:
        eta = eta + b
    if likelihood == "gaussian":
        return Simulation(rng.normal(loc=eta), loadings, factors, eta, None, likelihood, b)
    s = None
    if isinstance(size_factors, str) and size_factors == "random":
        s = np.exp(rng.normal(scale=0.5, size=n))
    elif size_factors is not None:
        s = np.asarray(size_factors, dtype=float)
    mean = np.logaddexp(0.0, eta) * (1.0 if s is None else s[:, None])
    if likelihood == "poisson":
        x = rng.poisson(mean)
    elif likelihood in ("negative_binomial", "zinb"):
        r = np.broadcast_to(np.asarray(inverse_dispersion, dtype=float), mean.shape)
        x = rng.poisson(rng.gamma(shape=r, scale=mean / r))
        if likelihood == "zinb":
            pi = np.broadcast_to(np.asarray(zero_inflation, dtype=float), (p,))
            x = np.where(rng.uniform(size=x.shape) < pi, 0, x)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    return Simulation(x.astype(float), loadings, factors, mean, s, likelihood, b)


@dataclass
class SparseSimulation:
    """A large sparse count data set and the truth behind it (no dense ``n x p`` array)."""

    x: object  # scipy.sparse.csr_matrix (n, p)
    loadings: np.ndarray  # (n, k)
    factors: np.ndarray  # (p, k)
    intercept: np.ndarray  # (p,)
    size_factors: np.ndarray  # (n,)

    def mean(self, rows) -> np.ndarray:
        """True ``E[x]`` of the given rows, ``(len(rows), p)``."""
        eta = self.loadings[rows] @ self.factors.T + self.intercept
        return np.logaddexp(0.0, eta) * self.size_factors[rows, None]


def simulate_sparse_counts(
    n, p, k=10, *, pi0=0.8, slab_sd=1.0, baseline=-3.3, chunk=4096, seed=1
) -> SparseSimulation:
    """Poisson counts ``x ~ Poisson(s softplus(L F^T + b))`` built in chunks of rows as CSR.

    Single-cell-like: per-feature baselines ``b ~ N(baseline, 0.5)``, log-normal
    size factors (sd 0.5, median 1), point-normal ``L`` and ``F`` with
    probability ``pi0`` of a zero and slab sd ``slab_sd``. The default gives
    about 5 % non-zero entries at ``k = 10``. Memory is that of the sparse
    result plus one ``chunk x p`` block.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    loadings = simulate_point_normal(rng, n, [pi0] * k, [slab_sd] * k)
    factors = simulate_point_normal(rng, p, [pi0] * k, [slab_sd] * k)
    intercept = rng.normal(baseline, 0.5, size=p)
    s = np.exp(rng.normal(scale=0.5, size=n))
    sim = SparseSimulation(None, loadings, factors, intercept, s)
    blocks = []
    for a in range(0, n, chunk):
        rows = np.arange(a, min(a + chunk, n))
        counts = rng.poisson(sim.mean(rows)).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    sim.x = sp.vstack(blocks, format="csr")
    return sim


def simulate_parts(
    *, n=200, p=500, k=4, pi0=(0.7, 0.9), mean=(1.5, 1.5), intercept=-2.0, seed=1
) -> Simulation:
    """Non-negative parts-based counts: ``x ~ Poisson(softplus(b + L F^T))``.

    Each entry of ``L`` (``F``) is 0 with probability ``pi0[0]`` (``pi0[1]``)
    and otherwise exponential with mean ``mean[0]`` (``mean[1]``): each sample
    uses a few programmes, each programme raises a few features above the
    baseline ``softplus(intercept)``.
    """
    rng = np.random.default_rng(seed)

    def draw(m, zero, scale):
        on = rng.uniform(size=(m, k)) > zero
        return np.where(on, rng.exponential(scale, size=(m, k)), 0.0)

    loadings, factors = draw(n, pi0[0], mean[0]), draw(p, pi0[1], mean[1])
    b = np.full(p, float(intercept))
    rate = np.logaddexp(0.0, loadings @ factors.T + b)
    x = rng.poisson(rate).astype(float)
    return Simulation(x, loadings, factors, rate, None, "poisson", b)


@dataclass
class BatchSimulation:
    """Counts with a batch effect, and the truth behind them."""

    x: np.ndarray  # (n, p) counts
    batch: np.ndarray  # (n,) the batch of each sample, 0 .. n_batches - 1
    covariates: np.ndarray  # (n, n_batches) one-hot batch
    loadings: np.ndarray  # (n, k)
    factors: np.ndarray  # (p, k)
    batch_coef: np.ndarray  # (p, n_batches) each feature's shift in each batch
    intercept: np.ndarray  # (p,)
    mean: np.ndarray  # (n, p)


def simulate_batch_effect(
    *,
    n=600,
    p=300,
    k=3,
    n_batches=3,
    pi0=0.7,
    factor_pi0=0.8,
    batch_sd=0.8,
    baseline=-1.0,
    seed=0,
) -> BatchSimulation:
    """Poisson counts ``x ~ Poisson(exp(L F^T + C B^T + b))`` with a batch effect.

    Samples fall into ``n_batches`` batches at random (``C`` is the one-hot batch);
    each feature is shifted by ``B_jc ~ N(0, batch_sd^2)`` in batch ``c``. ``L`` and
    ``F`` are point-normal (probability ``pi0`` and ``factor_pi0`` of a zero, slab sd
    1), the intercepts ``b_j ~ N(baseline, 0.5^2)``. A fit without the covariates
    turns the batch into factors; only contrasts of ``B`` between batches are
    identified beside an intercept.
    """
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(n, k)) * (rng.random((n, k)) >= pi0)
    factors = rng.normal(size=(p, k)) * (rng.random((p, k)) >= factor_pi0)
    batch = rng.integers(0, n_batches, size=n)
    covariates = np.eye(n_batches)[batch]
    coef = rng.normal(scale=batch_sd, size=(p, n_batches))
    intercept = rng.normal(baseline, 0.5, size=p)
    mean = np.exp(loadings @ factors.T + covariates @ coef.T + intercept)
    x = rng.poisson(mean).astype(float)
    return BatchSimulation(x, batch, covariates, loadings, factors, coef, intercept, mean)


@dataclass
class ViewSimulation:
    """Two or more views of the same samples (:func:`simulate_views`)."""

    x: np.ndarray  # (n, p): the views' features side by side
    feature_groups: np.ndarray  # (p,) each feature's view
    activity: np.ndarray  # (n_views, k) bool: where each factor lives
    loadings: np.ndarray  # (n, k)
    factors: np.ndarray  # (p, k)
    intercept: np.ndarray  # (p,)
    mean: np.ndarray  # (n, p) each view's E[x]


def simulate_views(
    *,
    n=400,
    views=(("rna", "poisson", 300), ("adt", "gaussian", 50)),
    activity=((1, 1, 1, 0, 0), (1, 0, 0, 1, 1)),
    pi0=0.3,
    factor_pi0=0.6,
    slab_sd=(0.7, 1.0),
    noise_sd=1.0,
    seed=0,
) -> ViewSimulation:
    """Views measured on the same samples, with shared and view-specific factors.

    ``eta = L F^T + b`` over all features, ``L`` point-normal (probability ``pi0`` of
    a zero, slab sd 1). Factor ``t`` has entries in view ``v`` only where
    ``activity[v][t]``: point-normal there (probability ``factor_pi0`` of a zero, slab
    sd ``slab_sd[v]``), zero elsewhere. A ``"poisson"`` view draws ``x ~
    Poisson(softplus(eta))`` with ``b_j ~ N(1, 0.5^2)`` (MOFA+'s Poisson rate, so that
    both models are right); a ``"gaussian"`` view ``x ~ N(eta, noise_sd^2)`` with
    ``b_j ~ N(0, 1)``.

    Parameters
    ----------
    views : sequence of (name, likelihood, n_features)
    activity : array-like of shape (n_views, k), 0/1
    """
    rng = np.random.default_rng(seed)
    activity = np.asarray(activity, dtype=bool)
    k = activity.shape[1]
    loadings = rng.normal(size=(n, k)) * (rng.random((n, k)) >= pi0)
    blocks, groups, intercepts, means, xs = [], [], [], [], []
    for v, (name, likelihood, p) in enumerate(views):
        on = (rng.random((p, k)) >= factor_pi0) & activity[v]
        f = rng.normal(scale=slab_sd[v], size=(p, k)) * on
        if likelihood == "poisson":
            b = rng.normal(1.0, 0.5, size=p)
            mean = np.logaddexp(0.0, loadings @ f.T + b)
            x = rng.poisson(mean).astype(float)
        elif likelihood == "gaussian":
            b = rng.normal(0.0, 1.0, size=p)
            mean = loadings @ f.T + b
            x = mean + rng.normal(scale=noise_sd, size=mean.shape)
        else:
            raise ValueError(f"views are 'poisson' or 'gaussian', not {likelihood!r}")
        blocks.append(f)
        xs.append(x)
        groups += [name] * p
        intercepts.append(b)
        means.append(mean)
    return ViewSimulation(
        np.concatenate(xs, 1),
        np.asarray(groups),
        activity,
        loadings,
        np.concatenate(blocks),
        np.concatenate(intercepts),
        np.concatenate(means, 1),
    )
