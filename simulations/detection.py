"""Why the sanity designs' second factor is often missed: training, pruning or the data.

The sanity designs plant three factors; the second (10 % of the entries of ``L`` and
``F`` non-zero, slab sd 1) is kept in only some replicates of the count designs, and
its entries' intervals are then exactly ``[0, 0]``. For each replicate this script fits
the design twice, from spfa's own start and from the true ``L`` and ``F``, and reports:

- ``before``: the largest |correlation| between the planted factor's loadings and any
  fitted factor's, a pruned factor's as pruning left it (its parameters are kept,
  switched off, and training on does not move them) and a kept one's as fitted;
- whether that factor was kept, and the ELBO of the fit;
- ``gain``: what the planted factor adds to the log-likelihood of the data at the true
  values (the likelihood's log-density by scipy, with and without it) — an upper view
  of the evidence for it, before any price for learning which entries carry it.

A factor lost from both starts with ``before`` small was lost in training, by the
objective itself; one found before pruning and switched off was pruned.

    python -m simulations.detection [--designs poisson negative_binomial] [--n-reps 10]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

#: the planted factor examined (0-based): the sanity designs' sparse second factor
FACTOR = 1


def log_likelihood(x, eta, likelihood, size_factors=None, inverse_dispersion=5.0) -> float:
    """``log p(x | eta)`` under the simulator's model (:func:`spfa.simulate.simulate`),
    by scipy."""
    if likelihood == "gaussian":
        return float(stats.norm.logpdf(x, loc=eta).sum())
    mean = np.logaddexp(0.0, eta)
    if size_factors is not None:
        mean = mean * size_factors[:, None]
    if likelihood == "poisson":
        return float(stats.poisson.logpmf(x, mean).sum())
    r = inverse_dispersion
    return float(stats.nbinom.logpmf(x, r, r / (r + mean)).sum())


def before_pruning(est) -> np.ndarray:
    """``E[L]`` of every factor, ``(n, k)``, a pruned one's as pruning left it: its
    parameters stay in the model, switched off (they get no gradient after)."""
    model = est.get_model()
    model.loadings.active.fill_(1.0)
    return model.loadings.moments().mean.detach().cpu().numpy()


def _best(truth: np.ndarray, estimate: np.ndarray) -> tuple[float, int]:
    r = [
        abs(np.corrcoef(truth, estimate[:, j])[0, 1]) if estimate[:, j].std() > 0 else 0.0
        for j in range(estimate.shape[1])
    ]
    return float(np.max(r)), int(np.argmax(r))


def replicate(design: str, seed: int) -> dict:
    """One replicate of a sanity design: both starts, and the factor's gain at the truth."""
    from simulations.peers import fit_spfa
    from simulations.sanity_checks import DESIGNS, K
    from spfa.simulate import simulate

    spec = DESIGNS[design]
    sim = simulate(seed=seed, **spec)
    likelihood = spec["likelihood"]
    r = spec.get("inverse_dispersion", 5.0)
    eta = sim.loadings @ sim.factors.T
    without = eta - np.outer(sim.loadings[:, FACTOR], sim.factors[:, FACTOR])
    gain = log_likelihood(sim.x, eta, likelihood, sim.size_factors, r) - log_likelihood(
        sim.x, without, likelihood, sim.size_factors, r
    )
    out = {"design": design, "seed": seed, "gain": gain}
    truth = sim.loadings[:, FACTOR]
    for start, init in (("own", None), ("truth", (sim.loadings, sim.factors))):
        est = fit_spfa(sim.x, K, likelihood, sim.size_factors, seed, init=init).estimator
        before, j = _best(truth, before_pruning(est))
        out[start] = {"before": before, "kept": bool(est.active_components_[j]), "elbo": est.elbo_}
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.detection", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--designs", nargs="+", default=["poisson", "negative_binomial"])
    parser.add_argument("--seed", type=int, default=1, help="first replicate's seed")
    parser.add_argument("--n-reps", type=int, default=10)
    args = parser.parse_args(argv)
    rows = []
    print("| design | seed | gain at the truth | own start: before, kept, ELBO | truth start |")
    print("|---|---|---|---|---|")
    for design in args.designs:
        for seed in range(args.seed, args.seed + args.n_reps):
            row = replicate(design, seed)
            rows.append(row)
            cells = [
                f"{row[s]['before']:.2f}, {'kept' if row[s]['kept'] else 'pruned'}, "
                f"{row[s]['elbo']:.1f}"
                for s in ("own", "truth")
            ]
            line = f"| {design} | {seed} | {row['gain']:.1f} | {cells[0]} | {cells[1]} |"
            print(line, flush=True)
    return rows


if __name__ == "__main__":
    main()
