"""Choosing the number of factors by held-out log-likelihood.

Without ``--real``: simulates a rank-3 Poisson design (n=150, p=200, 50/40/30 %
non-zero, slab sd 1), then for each k fits spfa on 80 % of the data (entries
masked, or counts binomially thinned) and prints the mean log posterior
predictive density of the held-out 20 % with the number of factors kept after
pruning.

With ``--real NAME`` (a data set of :mod:`simulations.real_data`; needs
``pip install -e .[bench]``): :func:`spfa.choose_k` on real counts (binomial
thinning, half held out, library-size size factors), printing the table and the
choice and drawing the curve to ``--figure``.

    python -m simulations.choose_k [--ks 1 2 3 4 6] [--seed 3]
    python -m simulations.choose_k --real pbmc68k_reduced --ks 2 5 10 15 20 30
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis, choose_k
from spfa.heldout import heldout_score
from spfa.simulate import MATCHED_FIT, simulate

logger = logging.getLogger("simulations.choose_k")


def simulated(args) -> list:
    sim = simulate(
        "poisson", n=150, p=200, pi0=(0.5, 0.6, 0.7), slab_sd=(1.0, 1.0, 1.0), seed=args.seed
    )
    logger.info(f"{'method':<6} {'k':>3} {'held-out loglik':>16} {'kept':>5} {'sec':>6}")
    rows = []
    for method in ("mask", "thin"):
        for k in args.ks:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est = SparseFactorAnalysis(k, random_state=0, device="cpu", **MATCHED_FIT)
                score, fitted = heldout_score(est, sim.x, method=method, fraction=args.fraction)
            sec = time.perf_counter() - t0
            rows.append((method, k, score, fitted.n_effective_components_))
            logger.info(
                f"{method:<6} {k:>3} {score:16.4f} {fitted.n_effective_components_:>5} {sec:6.1f}"
            )
    return rows


def real(args):
    from simulations import real_data

    counts, _, description = real_data.load(args.real)
    x = counts[:, real_data.select_genes(counts, args.n_genes)]
    x = x[np.asarray(x.sum(axis=1)).ravel() > 0]
    library = np.asarray(x.sum(axis=1)).ravel()
    logger.info(f"{args.real}: {x.shape[0]} cells x {x.shape[1]} genes ({description})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        choice = choose_k(
            SparseFactorAnalysis(random_state=0, device="cpu"),
            x,
            args.ks,
            size_factors=library / library.mean(),
            random_state=args.seed,
        )
    logger.info("| k | held-out loglik / entry | factors kept | seconds |")
    logger.info("|---|---|---|---|")
    for row in choice.table:
        logger.info(
            f"| {row['k']} | {row['score']:.4f} | {row['n_effective']} | {row['seconds']:.1f} |"
        )
    logger.info(f"chosen k = {choice.k}")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ks = [row["k"] for row in choice.table]
        ax.plot(ks, [row["score"] for row in choice.table], "o-")
        ax.axvline(choice.k, color="grey", ls=":", label=f"chosen k = {choice.k}")
        ax.set_xlabel("n_components")
        ax.set_ylabel("held-out log-lik per entry")
        ax.set_title(f"choose_k: {args.real}", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.figure, dpi=120)
        logger.info(f"wrote {args.figure}")
    return choice


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m simulations.choose_k", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--seed", type=int, default=3, help="simulation / split seed")
    parser.add_argument("--fraction", type=float, default=0.2, help="share held out")
    parser.add_argument("--real", default=None, help="a data set of simulations.real_data")
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--figure", default=None, help="where to draw the curve (--real)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return real(args) if args.real else simulated(args)


if __name__ == "__main__":
    main()
