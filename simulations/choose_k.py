"""Choosing the number of factors by held-out log-likelihood.

Simulates a rank-3 Poisson design (n=150, p=200, 50/40/30 % non-zero, slab sd 1),
then for each k fits spfa on 80 % of the data (entries masked, or counts
binomially thinned) and prints the mean log posterior predictive density of the
held-out 20 % with the number of factors kept after pruning.

    python -m simulations.choose_k [--ks 1 2 3 4 6] [--seed 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis
from spfa.heldout import heldout_score
from spfa.simulate import simulate


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m simulations.choose_k", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--seed", type=int, default=3, help="simulation seed")
    parser.add_argument("--fraction", type=float, default=0.2, help="share held out")
    args = parser.parse_args(argv)
    sim = simulate(
        "poisson", n=150, p=200, pi0=(0.5, 0.6, 0.7), slab_sd=(1.0, 1.0, 1.0), seed=args.seed
    )
    print(f"{'method':<6} {'k':>3} {'held-out loglik':>16} {'kept':>5} {'sec':>6}")
    rows = []
    for method in ("mask", "thin"):
        for k in args.ks:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est = SparseFactorAnalysis(k, random_state=0, device="cpu")
                score, fitted = heldout_score(est, sim.x, method=method, fraction=args.fraction)
            sec = time.perf_counter() - t0
            rows.append((method, k, score, fitted.n_effective_components_))
            print(
                f"{method:<6} {k:>3} {score:16.4f} {fitted.n_effective_components_:>5} {sec:6.1f}"
            )
    return rows


if __name__ == "__main__":
    main()
