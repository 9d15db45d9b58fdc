"""Recovery of planted structure on the seed notebook's sanity-check design
(n=100, p=500, k=3, pi0 = [0.1, 0.9, 0.99], slab sd = [0.5, 1, 2]), from spfa's
own initialisation, against the peers a user would otherwise pick."""

import numpy as np
import pytest

from simulations.peers import fit_fa, fit_nmf, fit_svd
from spfa import SparseFactorAnalysis
from spfa.evaluation import relative_error as rel_error
from spfa.simulate import MATCHED_FIT, simulate


def spfa_mean(est):
    """E[L F^T] + E[b] (Gaussian) or the fitted mean h(.) (counts), size factor 1."""
    return est.inverse_transform(est.loadings_)


def gaussian_peers(x, truth):
    return {
        "svd": rel_error(fit_svd(x, 3, "gaussian").mean, truth),
        "fa": rel_error(fit_fa(x, 3, "gaussian").mean, truth),
    }


def count_peers(x, truth, s=None):
    scale = 1.0 if s is None else s[:, None]
    null = x.sum(0, keepdims=True) / (np.ones((x.shape[0], 1)) * scale).sum(0) * scale
    return {
        "null": rel_error(null, truth),
        "nmf_kl": rel_error(fit_nmf(x, 3, "poisson", s).mean, truth),
    }


def fit(x, likelihood, seed, **kw):
    return SparseFactorAnalysis(3, likelihood=likelihood, random_state=seed, **kw).fit(x)


@pytest.mark.parametrize("seed", [11])
def test_gaussian_recovery_beats_svd_and_fa(seed):
    sim = simulate("gaussian", seed=seed)
    est = fit(sim.x, "gaussian", seed)
    err = rel_error(spfa_mean(est), sim.mean)
    best = min(gaussian_peers(sim.x, sim.mean).values())
    assert err < 0.75 * best, (err, best)


@pytest.mark.parametrize("seed", [11])
def test_poisson_recovery_beats_null_and_nmf(seed):
    sim = simulate("poisson", seed=seed)
    est = fit(sim.x, "poisson", seed)
    err = rel_error(spfa_mean(est), sim.mean)
    best = min(count_peers(sim.x, sim.mean).values())
    assert err < 0.85 * best, (err, best)


def test_unsupported_factor_is_pruned():
    """Planted rank 1; asked for 3: the learned prior switches the extra factors off."""
    sim = simulate("gaussian", n=100, p=300, pi0=(0.2,), slab_sd=(1.0,), seed=5)
    est = fit(sim.x, "gaussian", 0)
    strength = est.loadings_prior_pi_ * est.factors_prior_pi_
    order = np.argsort(strength)[::-1]
    assert strength[order[0]] > 0.5
    # what the extra factors still explain is negligible next to the real one
    contrib = [np.linalg.norm(np.outer(est.loadings_[:, j], est.components_[j])) for j in range(3)]
    assert max(contrib[j] for j in order[1:]) < 0.1 * contrib[order[0]]


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["gaussian", "poisson", "negative_binomial"])
def test_recovery_over_replicates(likelihood):
    """Five unseen seeds; also shows the default intercept does not hurt these designs."""
    errs, errs_no_b, peers = [], [], []
    for seed in range(101, 106):
        sim = simulate(likelihood, seed=seed, inverse_dispersion=5.0)
        errs.append(rel_error(spfa_mean(fit(sim.x, likelihood, seed)), sim.mean))
        errs_no_b.append(
            rel_error(spfa_mean(fit(sim.x, likelihood, seed, fit_intercept=False)), sim.mean)
        )
        p = gaussian_peers if likelihood == "gaussian" else count_peers
        peers.append(min(p(sim.x, sim.mean).values()))
    errs, errs_no_b, peers = map(np.array, (errs, errs_no_b, peers))
    assert np.all(errs < peers), (errs, peers)
    assert errs.mean() < 0.8 * peers.mean(), (errs, peers)
    # the learned-prior intercept costs at most a few percent where there is none
    assert errs.mean() < 1.05 * errs_no_b.mean(), (errs, errs_no_b)


@pytest.mark.slow
def test_size_factors_recovery():
    errs, nulls = [], []
    for seed in range(201, 204):
        sim = simulate("poisson", seed=seed, size_factors="random")
        est = SparseFactorAnalysis(3, random_state=seed).fit(sim.x, size_factors=sim.size_factors)
        mean = est.inverse_transform(est.loadings_) * sim.size_factors[:, None]
        errs.append(rel_error(mean, sim.mean))
        nulls.append(count_peers(sim.x, sim.mean, sim.size_factors)["null"])
    assert np.mean(errs) < 0.85 * np.mean(nulls), (errs, nulls)


@pytest.mark.slow
def test_point_exponential_beats_nmf_kl_on_parts_based_counts():
    """Sparse non-negative L and F, softplus rate: the non-negative family is
    non-negative and at most half of NMF-KL's error (same k)."""
    from spfa.simulate import simulate_parts

    sim = simulate_parts(k=4, seed=2)
    est = SparseFactorAnalysis(
        4, prior="point_exponential", random_state=0, device="cpu", **MATCHED_FIT
    )
    est.fit(sim.x)
    assert est.loadings_.min() >= 0 and est.components_.min() >= 0
    ours = rel_error(spfa_mean(est), sim.mean)
    nmf = rel_error(fit_nmf(sim.x, 4, "poisson").mean, sim.mean)
    assert ours <= 0.5 * nmf, (ours, nmf)
