"""The methods spfa is compared with, behind one interface.

Each ``fit_<method>(x, k, likelihood, size_factors, seed)`` returns a
:class:`PeerFit`: the estimated mean of ``x`` (size factors included), the
estimated loadings ``(n, k)`` and factors ``(p, k)``, a support score for each
(PIPs where the method has them, ``|estimate|`` otherwise), the held-out
log-likelihood function, and the wall time. A method that does not apply to a
design raises :class:`NotApplicable`; an optional peer that is not installed
raises :class:`NotInstalled`. Both are reported in the tables, never dropped.

Methods that accept missing entries (spfa, MOFA+) are fitted with ``NaN`` in
the held-out entries; the others see every entry.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.decomposition import NMF, PCA, FactorAnalysis, TruncatedSVD
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis
from spfa.simulate import MATCHED_FIT


class NotApplicable(Exception):
    """The method does not fit this kind of data."""


class NotInstalled(Exception):
    """An optional peer (``pip install -e .[bench]``) is missing."""


@dataclass
class PeerFit:
    mean: np.ndarray  # (n, p) estimated E[x], size factors included
    loadings: np.ndarray  # (n, k)
    factors: np.ndarray  # (p, k)
    loadings_score: np.ndarray  # (n, k) support score: PIP or |estimate|
    factors_score: np.ndarray  # (p, k)
    seconds: float
    accepts_missing: bool = False
    noise_variance: np.ndarray | None = None  # (p,) Gaussian fits
    inverse_dispersion: np.ndarray | None = None  # (p,) NB fits
    note: str = ""
    estimator: object = None


def heldout_loglik(fit: PeerFit, x, heldout, likelihood) -> float:
    """Mean log-likelihood of the held-out entries at the fit's plug-in mean.

    Each method is scored under its own observation model: the Gaussian with its
    own noise variance (1 if it has none), Poisson, or NB with its fitted ``r``.
    """
    if not fit.accepts_missing:
        return float("nan")
    rows, cols = np.nonzero(heldout)
    xo, mu = x[rows, cols], fit.mean[rows, cols]
    if likelihood == "gaussian":
        var = np.ones(x.shape[1]) if fit.noise_variance is None else fit.noise_variance
        return float(np.mean(stats.norm.logpdf(xo, mu, np.sqrt(var[cols]))))
    mu = np.maximum(mu, 1e-300)
    if fit.inverse_dispersion is not None:
        r = fit.inverse_dispersion[cols]
        return float(np.mean(stats.nbinom.logpmf(xo, r, r / (r + mu))))
    return float(np.mean(stats.poisson.logpmf(xo, mu)))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _scale(size_factors, n):
    return np.ones(n) if size_factors is None else np.asarray(size_factors, float)


def fit_spfa(x, k, likelihood, size_factors=None, seed=0, log_dir=None, init=None, **kw):
    kw = {**MATCHED_FIT, **kw}  # the simulators' model, unless told otherwise
    est = SparseFactorAnalysis(k, likelihood=likelihood, random_state=seed, log_dir=log_dir, **kw)
    start = {} if init is None else dict(init_loadings=init[0], init_factors=init[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _, seconds = _timed(lambda: est.fit(x, size_factors=size_factors, **start))
    s = _scale(size_factors, x.shape[0])
    return PeerFit(
        mean=est.inverse_transform(est.loadings_) * s[:, None],
        loadings=est.loadings_,
        factors=est.components_.T,
        loadings_score=est.loadings_pip_,
        factors_score=est.factors_pip_,
        seconds=seconds,
        accepts_missing=True,
        noise_variance=getattr(est, "noise_variance_", None),
        inverse_dispersion=getattr(est, "inverse_dispersion_", None),
        estimator=est,
    )


def _filled(x):
    """Methods without missing-data support see the held-out entries' true values."""
    if np.isnan(x).any():
        raise ValueError("internal: peers that need complete data get the complete matrix")
    return x


def _from_svd(u_s, v_s, mean, seconds, note=""):
    return PeerFit(mean, u_s, v_s, np.abs(u_s), np.abs(v_s), seconds, note=note)


def fit_svd(x, k, likelihood, size_factors=None, seed=0):
    """Gaussian: truncated SVD of ``x`` (the model has no mean). Counts: PCA of ``x / s``."""
    x = _filled(x)
    s = _scale(size_factors, x.shape[0])
    if likelihood == "gaussian":
        svd, seconds = _timed(lambda: TruncatedSVD(k, random_state=seed).fit(x))
        u_s = svd.transform(x)  # U S
        sv = svd.singular_values_
        return _from_svd(
            u_s / np.sqrt(sv), svd.components_.T * np.sqrt(sv), u_s @ svd.components_, seconds
        )
    y = x / s[:, None]
    pca, seconds = _timed(lambda: PCA(k, random_state=seed).fit(y))
    u_s = pca.transform(y)
    sv = pca.singular_values_
    mean = (u_s @ pca.components_ + pca.mean_) * s[:, None]
    return _from_svd(u_s / np.sqrt(sv), pca.components_.T * np.sqrt(sv), mean, seconds)


def fit_fa(x, k, likelihood, size_factors=None, seed=0):
    """scikit-learn FactorAnalysis of ``x`` (Gaussian) or ``x / s`` (counts)."""
    x = _filled(x)
    s = _scale(size_factors, x.shape[0])
    y = x if likelihood == "gaussian" else x / s[:, None]
    fa, seconds = _timed(lambda: FactorAnalysis(k, random_state=seed).fit(y))
    z = fa.transform(y)
    mean = (z @ fa.components_ + fa.mean_) * (1.0 if likelihood == "gaussian" else s[:, None])
    return _from_svd(z, fa.components_.T, mean, seconds)


def fit_nmf(x, k, likelihood, size_factors=None, seed=0, max_iter=1000):
    """NMF with KL loss (multiplicative updates) on the counts; ``W H`` estimates the mean."""
    if likelihood == "gaussian":
        raise NotApplicable("needs non-negative data")
    x = _filled(x)
    nmf = NMF(
        k,
        beta_loss="kullback-leibler",
        solver="mu",
        init="nndsvda",
        max_iter=max_iter,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w, seconds = _timed(lambda: nmf.fit_transform(x))
    return _from_svd(w, nmf.components_.T, w @ nmf.components_, seconds)


def fit_glmpca(x, k, likelihood, size_factors=None, seed=0, max_iter=1000):
    """GLM-PCA (``glmpca``): Poisson or NB, log link, size factors as offsets."""
    if likelihood == "gaussian":
        raise NotApplicable("no Gaussian family")
    try:
        from glmpca.glmpca import glmpca
    except ImportError as err:
        raise NotInstalled(f"glmpca: {err}") from None
    x = _filled(x)
    s = _scale(size_factors, x.shape[0])
    keep = x.sum(0) > 0  # glmpca refuses all-zero features
    fam = "nb" if likelihood == "negative_binomial" else "poi"
    np.random.seed(seed)  # noqa: NPY002 - glmpca draws its start from the global RNG
    res, seconds = _timed(
        lambda: glmpca(x[:, keep].T, k, fam=fam, sz=s, ctl={"maxIter": max_iter, "eps": 1e-4})
    )
    u, v = res["factors"], res["loadings"]  # (n, k) cells, (p_kept, k) genes
    eta = np.log(s)[:, None] + u @ v.T + res["coefX"][:, 0][None, :]
    mean = np.zeros(x.shape)
    mean[:, keep] = np.exp(eta)
    factors = np.zeros((x.shape[1], k))
    factors[keep] = v
    note = f"{int((~keep).sum())} all-zero features dropped" if (~keep).any() else ""
    return _from_svd(u, factors, mean, seconds, note=note)


def fit_mofa(x, k, likelihood, size_factors=None, seed=0, max_iter=1000):
    """MOFA+ (``mofapy2``): spike-and-slab weights with ARD; Gaussian or Poisson.

    MOFA+ has no size factors and no NB likelihood: count designs use its
    Poisson likelihood (softplus rate, like the simulation's link) on the raw
    counts. Its weights ``W`` (features) carry PIPs; its factors ``Z`` (cells)
    do not, so the loadings' support score is ``|E[Z]|``.
    """
    try:
        from mofapy2.run.entry_point import entry_point
    except ImportError as err:
        raise NotInstalled(f"mofapy2: {err}") from None
    lik = "gaussian" if likelihood == "gaussian" else "poisson"

    def run():
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ent = entry_point()
            ent.set_data_options(scale_views=False, center_groups=False)
            ent.set_data_matrix([[x]], likelihoods=[lik])
            ent.set_model_options(factors=k, spikeslab_weights=True, ard_weights=True)
            ent.set_train_options(
                iter=max_iter, convergence_mode="fast", seed=seed, quiet=True, verbose=False
            )
            ent.build()
            ent.run()
        return ent.model

    model, seconds = _timed(run)
    nodes = model.getNodes()
    z = nodes["Z"].getExpectation()
    w = nodes["W"].getExpectation()[0]
    theta = nodes["W"].getParameters()[0]["theta"]
    eta = z @ w.T
    noise = None
    if lik == "gaussian":
        mean = eta
        noise = 1.0 / nodes["Tau"].getExpectation()[0]
        noise = np.broadcast_to(np.mean(noise, axis=0) if noise.ndim == 2 else noise, x.shape[1])
    else:
        mean = np.logaddexp(0.0, eta) + 1e-4  # mofapy2's Poisson rate function
    note = "no size factors" if size_factors is not None else ""
    if likelihood == "negative_binomial":
        note = "Poisson likelihood (no NB)"
    return PeerFit(
        mean,
        z,
        w,
        np.abs(z),
        theta,
        seconds,
        accepts_missing=True,
        noise_variance=None if noise is None else np.asarray(noise, float),
        note=note,
    )


#: peers that take NaN for missing entries (the benchmark gives them the masked matrix)
ACCEPTS_MISSING = {"mofa+"}

#: name -> fit function, in the order of the tables
PEERS = {
    "truncated_svd": fit_svd,
    "factor_analysis": fit_fa,
    "nmf_kl": fit_nmf,
    "glmpca": fit_glmpca,
    "mofa+": fit_mofa,
}
